"""Checkpoints that resume exactly: model, optimiser, schedule, scaler, RNG states, history."""

from __future__ import annotations

import io
import os
import random
from pathlib import Path
from typing import TypedDict, cast

import numpy as np
import torch

from binsight.errors import BinsightError
from binsight.training.config import TrainConfig
from binsight.utils.io import atomic_write_bytes


class RngState(TypedDict, total=False):
    python: tuple[object, ...]
    numpy: tuple[str, np.ndarray, int, int, float]  # the legacy MT19937 state
    torch: torch.Tensor
    cuda: list[torch.Tensor]


# State dicts (model, optimiser, scheduler, scaler, monitors) are torch's own nested containers.
StateDict = dict[str, object]
JsonObject = dict[str, object]  # a pydantic record's model_dump, validated again when read


class Checkpoint(TypedDict, total=False):
    """What `best.pt` and `last.pt` hold (torch.save of plain containers). Both: the model, its card
    and how it was trained; `best.pt` adds the validation metrics of its epoch, `last.pt` what resuming
    needs. Not total: files of earlier formats lack keys, and their readers say which default applies."""

    config: JsonObject  # TrainConfig
    num_classes: int
    checkpoint_format: int
    epoch: int
    history: list[JsonObject]  # EpochRecord per epoch
    best: JsonObject  # BestEpoch
    train_fingerprint: str
    val_fingerprint: str
    card: JsonObject  # ModelCard
    model: StateDict  # the weights evaluated and exported: the moving average when the run keeps one
    val_metrics: JsonObject  # CountingMetrics (best.pt)
    optimizer: StateDict  # last.pt from here on
    scheduler: StateDict
    scaler: StateDict
    monitors: StateDict
    stale_epochs: int
    rng: list[RngState]  # one per rank
    trained_model: StateDict  # with a weight average: the weights the optimiser steps
    average_updates: int
    soup: list[str]  # `binsight soup`: the checkpoints whose weights were averaged into this one
    temperature: float  # a soup's: the temperature folded into its head (what `--temperature` takes)


def rng_state() -> RngState:
    legacy = cast(tuple[str, np.ndarray, int, int, float], np.random.get_state(legacy=True))
    state = RngState(python=random.getstate(), numpy=legacy, torch=torch.get_rng_state())
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: RngState) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# Format 2 counts "epoch" as epochs finished (1-based, as the history does); format 1 (no key) stored
# the 0-based index of the last finished epoch.
CHECKPOINT_FORMAT = 2


def epochs_finished(checkpoint: Checkpoint) -> int:
    epoch = int(checkpoint.get("epoch", -1))
    return epoch if checkpoint.get("checkpoint_format", 1) >= 2 else epoch + 1


def save_checkpoint(path: Path, state: Checkpoint) -> None:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def load_checkpoint(path: str | os.PathLike[str]) -> Checkpoint:
    path = Path(path)
    if not path.is_file():
        raise BinsightError(f"no checkpoint at {path}", hint="train a model first (`binsight train`)")
    try:
        # Checkpoints hold numpy RNG state and plain containers, hence weights_only=False: only load
        # checkpoints you made or trust, as with any pickle.
        checkpoint: Checkpoint = torch.load(path, map_location="cpu", weights_only=False)
        return checkpoint
    except Exception as exc:
        raise BinsightError(f"{path} is not a readable binsight checkpoint: {exc}") from None


def load_trained(path: Path) -> tuple[Checkpoint, TrainConfig]:
    """A run's checkpoint that holds a trained model, and the settings it was trained with."""
    checkpoint = load_checkpoint(path)
    if "model" not in checkpoint or "config" not in checkpoint:
        raise BinsightError(
            f"{path} holds no trained model", hint="give best.pt or last.pt of a training run"
        )
    return checkpoint, TrainConfig.model_validate(checkpoint["config"])
