"""The reference a served model is monitored against: how its validation photos looked and what it
answered for them, measured through the serving path itself, written into the model file by export.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from binsight.errors import BinsightError
from binsight.imaging import Preprocess
from binsight.monitoring.signals import SCALAR_SIGNALS, jpeg_quality, photo_signals

if TYPE_CHECKING:
    from binsight.inference.runtime import LoadedModel

DECIMALS = 4


@dataclass(frozen=True)
class Observation:
    """One photo as the server saw it: the model's input, and the signals measured on the way."""

    pixels: np.ndarray
    signals: dict[str, float]
    width: int
    height: int


def observe_photo(data: bytes, preprocess: Preprocess, max_pixels: int | None = None) -> Observation:
    """Decode and prepare one photo exactly as the model takes it (`Preprocess`), measuring its signals
    on the way: the monitoring is an observer of the decode, not a second one."""
    opened: list[tuple[tuple[int, int], float]] = []  # the decoder's view: size and JPEG quality

    def observe(image: Image.Image) -> None:
        opened.append((image.size, jpeg_quality(image)))

    rgb = preprocess.pixels(preprocess.decode(data, max_pixels, observe))
    (width, height), quality = opened[0]
    return Observation(
        preprocess.normalise(rgb), photo_signals(rgb, width, height, len(data), quality), width, height
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


@dataclass(frozen=True)
class Seen:
    """One answered photo, as monitoring keeps it: its signals (with the model's confidence), the
    predicted class index, its embedding, and when it was seen."""

    signals: dict[str, float]
    predicted: int
    embedding: np.ndarray
    time: str


def observe_photos(counter: LoadedModel, datas: list[bytes], batch_size: int = 32) -> list[Seen]:
    """What the server records for these photos: the same preparation, the same model outputs.
    Photos that cannot be decoded are left out, as the server answers them with an error."""
    info = counter.info
    classes = len(info.classes)
    seen: list[Seen] = []
    for start in range(0, len(datas), batch_size):
        observed = []
        for data in datas[start : start + batch_size]:
            try:
                observed.append(observe_photo(data, Preprocess.from_card(info.card)))
            except (OSError, SyntaxError, ValueError):
                continue
        if not observed:
            continue
        outputs = counter.observe(np.stack([o.pixels for o in observed]))
        for observation, output in zip(observed, outputs, strict=True):
            probabilities = output[:classes]
            signals = {**observation.signals, "confidence": float(probabilities.max())}
            seen.append(Seen(signals, int(probabilities.argmax()), output[classes:], ""))
    return seen


def build_baseline(counter: LoadedModel, photos: list[Path], source: str, batch_size: int = 32) -> Baseline:
    """Run `counter` over `photos` through the serving path, a batch of files in memory at a time."""
    seen: list[Seen] = []
    for start in range(0, len(photos), batch_size):
        datas = []
        for path in photos[start : start + batch_size]:
            try:
                datas.append(path.read_bytes())
            except OSError:
                continue  # an unreadable photo is not part of what the model normally sees
        seen += observe_photos(counter, datas, batch_size)
    if not seen:
        raise BinsightError("no readable photos to build a monitoring baseline from")
    names = (*SCALAR_SIGNALS, "confidence")
    return Baseline(
        {name: np.array([s.signals[name] for s in seen]) for name in names},
        np.array([s.predicted for s in seen]),
        np.stack([s.embedding for s in seen]),
        tuple(counter.info.classes),
        source,
    )
