"""The reference a served model is monitored against: how its validation photos looked and what it
answered for them, measured through the serving path itself, written into the model file by export.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from binsight.errors import BinsightError
from binsight.imaging import draft_rgb, normalise, open_image, resize_to
from binsight.monitoring.signals import SCALAR_SIGNALS, jpeg_quality, photo_signals

if TYPE_CHECKING:
    from binsight.serving.runtime import LoadedModel

DECIMALS = 4


@dataclass(frozen=True)
class Observation:
    """One photo as the server saw it: the model's input, and the signals measured on the way."""

    pixels: np.ndarray
    signals: dict[str, float]
    width: int
    height: int


def observe_photo(
    data: bytes,
    info_hw: tuple[int, int],
    mean: tuple[float, ...],
    std: tuple[float, ...],
    max_pixels: int | None = None,
) -> Observation:
    """Decode and prepare one photo exactly as the server does, measuring its signals on the way."""
    image = open_image(data, max_pixels=max_pixels)
    width, height = image.size
    quality = jpeg_quality(image)
    rgb = np.asarray(resize_to(draft_rgb(image, info_hw), info_hw))
    return Observation(
        normalise(rgb, mean, std), photo_signals(rgb, width, height, len(data), quality), width, height
    )


@dataclass
class Baseline:
    """Per-photo reference values: scalar signals, the model's answers, and embeddings."""

    scalars: dict[str, np.ndarray]  # signal name -> values (includes "confidence")
    predicted: np.ndarray  # predicted class index per photo
    embeddings: np.ndarray  # (n, d); (n, 0) for models without an embedding output
    classes: tuple[int, ...]
    source: str = ""

    @property
    def size(self) -> int:
        return len(self.predicted)

    def to_json(self) -> str:
        return json.dumps(
            {
                "source": self.source,
                "classes": list(self.classes),
                "scalars": {k: np.round(v, DECIMALS).tolist() for k, v in self.scalars.items()},
                "predicted": self.predicted.astype(int).tolist(),
                "embeddings": np.round(self.embeddings, DECIMALS).tolist(),
            },
            separators=(",", ":"),
        )

    @classmethod
    def from_json(cls, text: str) -> Baseline:
        try:
            document = json.loads(text)
            predicted = np.asarray(document["predicted"], dtype=np.int64)
            embeddings = np.asarray(document["embeddings"], dtype=np.float64).reshape(len(predicted), -1)
            return cls(
                {k: np.asarray(v, dtype=np.float64) for k, v in document["scalars"].items()},
                predicted,
                embeddings,
                tuple(int(c) for c in document["classes"]),
                str(document.get("source", "")),
            )
        except (ValueError, KeyError, TypeError) as exc:
            raise BinsightError(f"the model's monitoring baseline cannot be read ({exc})") from None


def build_baseline(counter: LoadedModel, photos: list[Path], source: str, batch_size: int = 32) -> Baseline:
    """Run `counter` over `photos` through the serving path."""
    info = counter.info
    hw, classes = info.input_hw, tuple(info.classes)
    scalars: dict[str, list[float]] = {name: [] for name in (*SCALAR_SIGNALS, "confidence")}
    predicted: list[int] = []
    embeddings: list[np.ndarray] = []
    for start in range(0, len(photos), batch_size):
        observed = []
        for path in photos[start : start + batch_size]:
            try:
                observed.append(observe_photo(path.read_bytes(), hw, info.mean, info.std))
            except (OSError, SyntaxError, ValueError):
                continue  # an unreadable photo is not part of what the model normally sees
        if not observed:
            continue
        outputs = counter.observe(np.stack([o.pixels for o in observed]))
        probabilities, embedding = outputs[:, : len(classes)], outputs[:, len(classes) :]
        for observation, probs in zip(observed, probabilities, strict=True):
            for name in SCALAR_SIGNALS:
                scalars[name].append(observation.signals[name])
            scalars["confidence"].append(float(probs.max()))
            predicted.append(int(probs.argmax()))
        embeddings.append(embedding)
    if not predicted:
        raise BinsightError("no readable photos to build a monitoring baseline from")
    return Baseline(
        {k: np.asarray(v) for k, v in scalars.items()},
        np.asarray(predicted),
        np.concatenate(embeddings),
        classes,
        source,
    )
