"""Checkpoints that resume exactly: model, optimiser, schedule, scaler, RNG states, history."""

from __future__ import annotations

import io
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from binsight.errors import BinsightError
from binsight.utils.io import atomic_write_bytes


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# Format 2 counts "epoch" as epochs finished (1-based, as the history does); format 1 (no key) stored
# the 0-based index of the last finished epoch.
CHECKPOINT_FORMAT = 2


def epochs_finished(checkpoint: dict[str, Any]) -> int:
    epoch = int(checkpoint.get("epoch", -1))
    return epoch if checkpoint.get("checkpoint_format", 1) >= 2 else epoch + 1


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def load_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise BinsightError(f"no checkpoint at {path}", hint="train a model first (`binsight train`)")
    try:
        # Checkpoints hold numpy RNG state and plain containers, hence weights_only=False: only load
        # checkpoints you made or trust, as with any pickle.
        checkpoint: dict[str, Any] = torch.load(path, map_location="cpu", weights_only=False)
        return checkpoint
    except Exception as exc:
        raise BinsightError(f"{path} is not a readable binsight checkpoint: {exc}") from None
