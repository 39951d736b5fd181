"""The two stages of a batch run, written once for both executors: `fetch_and_decode` (I/O and JPEG
decoding, CPU tasks) and `Scorer` (the model, one long-lived instance per replica: a Ray actor or the
single process). Batches are dicts of NumPy columns, Ray Data's "numpy" batch format.

The decode stage ships uint8 pixels at the model's input size (a quarter of float32's bytes through
Ray's object store); the scorer normalises them with the same `imaging.normalise` the server uses.
"""

from __future__ import annotations

import os
import re
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image

from binsight.batch.sources import NO_RECORD
from binsight.imaging import Preprocess
from binsight.inference.engines import Backend, EnginePrecision
from binsight.inference.runtime import LoadedModel, load_counter
from binsight.inference.verdict import RECORD_ERROR_RATE, VerdictSettings, judge
from binsight.utils.reading import MAX_IMAGE_BYTES, MAX_IMAGE_PIXELS, read_source
from binsight.utils.text import printable

Batch = dict[str, np.ndarray]
_OBJECT_REPR = re.compile(r"<[\w.]+ object at 0x[0-9a-fA-F]+>")


def _recorded_from(uri: str, endpoint_url: str | None, unsigned: bool) -> int:
    from binsight.data.abid import MetadataError, parse_metadata

    try:
        return parse_metadata(read_source(uri, endpoint_url, unsigned), uri).count
    except MetadataError as exc:
        raise ValueError(f"bad metadata {uri}: {exc}") from None
    except RecursionError:
        raise ValueError(f"bad metadata {uri}: nested too deeply") from None


@dataclass(frozen=True)
class DecodeSettings:
    """How `fetch_and_decode` reads and prepares photos; picklable, so Ray can ship it to tasks."""

    preprocess: Preprocess
    endpoint_url: str | None = None
    unsigned: bool = False
    threads: int = 16  # concurrent reads: they overlap S3 round trips
    max_bytes: int = MAX_IMAGE_BYTES
    max_pixels: int = MAX_IMAGE_PIXELS


def fetch_and_decode(batch: Batch, settings: DecodeSettings) -> Batch:
    """Rows (row, image, recorded, record_source) -> the same rows with uint8 pixels at the model's
    input size, recorded quantities read from metadata where asked, and a problem per failed row.
    Threads overlap the S3 round trips; Pillow releases the GIL while it decodes."""
    preprocess, endpoint_url, unsigned = settings.preprocess, settings.endpoint_url, settings.unsigned
    images, sources = batch["image"], batch["record_source"]
    recorded = np.asarray(batch["recorded"], dtype=np.int64).copy()
    height, width = preprocess.input_hw
    pixels = np.zeros((len(images), height, width, 3), dtype=np.uint8)
    problems = [""] * len(images)

    def load(index: int) -> None:
        if sources[index]:
            try:
                recorded[index] = _recorded_from(str(sources[index]), endpoint_url, unsigned)
            except (OSError, ValueError) as exc:
                problems[index] = f"no record: {exc}"
                return
        try:
            data = read_source(str(images[index]), endpoint_url, unsigned, settings.max_bytes)
            pixels[index] = preprocess.pixels(preprocess.decode(data, settings.max_pixels))
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError, MemoryError) as exc:
            problems[index] = f"unreadable: {printable(_OBJECT_REPR.sub('the image', str(exc)))[:300]}"

    with ThreadPoolExecutor(max(1, min(settings.threads, len(images)))) as pool:
        list(pool.map(load, range(len(images))))
    return {
        "row": np.asarray(batch["row"], dtype=np.int64),
        "image": np.asarray(images, dtype=object),
        "recorded": recorded,
        "pixels": pixels,
        "problem": np.asarray(problems, dtype=object),
    }


@dataclass(frozen=True)
class ScorerSettings:
    """How a replica loads its model and judges records; picklable, so Ray can ship it to actors."""

    backend: Backend = "auto"
    precision: EnginePrecision = "auto"
    threads: int | None = None
    version: str | None = None
    judge: bool = False  # audit: verdict columns against the recorded quantity
    verdicts: VerdictSettings = field(default_factory=VerdictSettings)
    record_error_rate: float = RECORD_ERROR_RATE  # the prior share of wrong records (scales P(wrong))


def _load(model: str | bytes, settings: ScorerSettings) -> LoadedModel:
    if isinstance(model, bytes):
        handle, path = tempfile.mkstemp(suffix=".onnx")
        with os.fdopen(handle, "wb") as out:
            out.write(model)
        try:
            return load_counter(
                path, settings.threads, settings.version, settings.backend, settings.precision
            )
        finally:
            os.unlink(path)  # both engines hold the model in memory once loaded
    return load_counter(model, settings.threads, settings.version, settings.backend, settings.precision)


@dataclass(frozen=True)
class SharedModel:
    """The model file's bytes in Ray's object store, for actors on nodes without a copy. Held in a
    wrapper: a bare reference as an actor argument is resolved by Ray at creation, and restarted
    actors would then depend on it (Ray warns); the driver holds the reference for the whole run."""

    ref: Any  # ray.ObjectRef[bytes]; Ray ships no type for it


class Scorer:
    """The model replica: normalised pixels -> probabilities (and verdicts when judging)."""

    def __init__(self, model: LoadedModel | str | bytes | SharedModel, settings: ScorerSettings) -> None:
        if isinstance(model, SharedModel):
            import ray

            model = bytes(ray.get(model.ref))
        self.counter = _load(model, settings) if isinstance(model, str | bytes) else model
        info = self.counter.info
        self.settings = settings
        self.policy = settings.verdicts.policy(info.calibration)
        self.preprocess = Preprocess.from_card(info.card)
        self.classes = np.asarray(info.classes, dtype=np.int64)

    def __call__(self, batch: Batch) -> Batch:
        rows = len(batch["row"])
        info = self.counter.info
        problems = np.asarray(batch["problem"], dtype=object)
        good = np.flatnonzero(problems == "")
        probabilities = np.full((rows, len(info.classes)), np.nan, dtype=np.float32)
        predicted = np.full(rows, -1, dtype=np.int64)
        confidence = np.full(rows, np.nan, dtype=np.float32)
        if len(good):
            inputs = self.preprocess.normalise(np.asarray(batch["pixels"])[good])
            probabilities[good] = self.counter.predict(inputs)
            predicted[good] = self.classes[probabilities[good].argmax(1)]
            confidence[good] = probabilities[good].max(1)
        result: Batch = {
            "row": np.asarray(batch["row"], dtype=np.int64),
            "image": np.asarray(batch["image"], dtype=object),
            "predicted_count": predicted,
            "confidence": confidence,
            "probabilities": probabilities,
            "problem": problems,
        }
        if self.settings.judge:
            result.update(self._judge(probabilities, np.asarray(batch["recorded"]), problems))
        return result

    def _judge(self, probabilities: np.ndarray, recorded: np.ndarray, problems: np.ndarray) -> Batch:
        p_recorded = np.full(len(recorded), np.nan)
        wrong = np.full(len(recorded), np.nan)
        p_values = np.full(len(recorded), np.nan)
        verdicts = np.full(len(recorded), "error", dtype=object)
        for i, (probs, count) in enumerate(zip(probabilities, recorded, strict=True)):
            if problems[i] != "":
                continue
            if count == NO_RECORD:
                problems[i] = "no recorded quantity"
                continue
            verdict = judge(probs, int(count), self.policy, self.settings.record_error_rate)
            p_recorded[i], wrong[i], verdicts[i] = verdict.p_expected, verdict.p_record_wrong, verdict.verdict
            p_values[i] = np.nan if verdict.p_value is None else verdict.p_value
        return {
            "recorded_quantity": recorded.astype(np.int64),
            "p_recorded": p_recorded,
            "p_record_wrong": wrong,
            "p_value": p_values,
            "verdict": verdicts,
            "problem": problems,
        }
