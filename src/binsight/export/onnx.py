"""`binsight export`: a checkpoint -> a self-describing ONNX file, checked against PyTorch, optionally int8.

The graph ends in the head's probabilities (not logits), so every head (classification, ordinal,
regression) serves the same way.
"""

from __future__ import annotations

import io
import logging
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import numpy as np
import onnx
import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from binsight.card import ModelCard
from binsight.cpu import native_bf16
from binsight.data.split import load_split, spread_rows
from binsight.errors import BinsightError
from binsight.export.int8 import quantize_int8
from binsight.imaging import Size, as_hw
from binsight.inference.conformal import Calibration
from binsight.inference.engines import RuntimeChoice
from binsight.inference.runtime import META_PREFIX, LoadedModel, OnnxCounter, OpenVinoCounter
from binsight.inference.selfcheck import ReferenceSet
from binsight.models.heads import CountingModel
from binsight.monitoring.baseline import build_baseline
from binsight.training.checkpoint import Checkpoint, load_checkpoint
from binsight.training.config import TrainConfig
from binsight.training.data import BinDataset, eval_transform
from binsight.training.evaluate import load_model
from binsight.training.metrics import counting_metrics
from binsight.training.results import model_card
from binsight.utils.io import atomic_write_bytes

log = logging.getLogger(__name__)


EMBEDDING_DIM = 16


class Calibrated(BaseModel):
    split: str
    photos_per_count: dict[str, int]


class Baselined(BaseModel):
    split: str
    photos: int


class Quantised(BaseModel):
    onnx: str
    bytes: int
    fp32_accuracy: float  # validation accuracy of the fp32 file on ONNX Runtime
    int8_accuracy: float  # the int8 file's, on the engine where it is lowest
    accuracy_cost: float  # the largest loss against the fp32 file on the same engine
    by_engine: dict[str, float]  # the int8 file's validation accuracy per engine
    serving: str  # "ok", or why the file is marked not for serving


class ExportReport(BaseModel):
    """What `binsight export` wrote and verified."""

    model_config = ConfigDict(extra="forbid")

    onnx: str
    bytes: int
    max_abs_diff_vs_pytorch: float
    verified_on: int
    input_hw: tuple[int, int]
    classes: int
    calibration: Calibrated | None = None
    monitoring_baseline: Baselined | None = None
    int8: Quantised | None = None
    engines: list[str] = []  # the engines/precisions calibrated for (each has its own calibration)


class ProbabilityModel(nn.Module):
    """The exported graph: count probabilities, and a compact embedding of the photo for drift
    monitoring (a fixed random projection of the backbone's pooled features, unit length; random
    projections keep distances between photos approximately, so a shift in what the backbone sees
    shows up in 16 numbers the server can capture with every request)."""

    projection: torch.Tensor

    def __init__(self, model: CountingModel, embedding_dim: int = EMBEDDING_DIM) -> None:
        super().__init__()
        self.model = model
        features = model.head.fc.in_features
        generator = torch.Generator().manual_seed(0)
        projection = torch.randn(features, embedding_dim, generator=generator) / embedding_dim**0.5
        self.register_buffer("projection", projection)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pooled = self.model.backbone(images)
        probabilities = self.model.head.probabilities(self.model.head(pooled))
        embedding = torch.nn.functional.normalize(pooled.flatten(1), dim=1) @ self.projection
        return probabilities, embedding


def _to_onnx_bytes(model: CountingModel, size: Size) -> bytes:
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript-based exporter announces its deprecation
        torch.onnx.export(
            ProbabilityModel(model).eval(),
            (torch.zeros(1, 3, *as_hw(size)),),
            buffer,  # type: ignore[arg-type]  # the stub says path; torch.onnx writes to any file object
            input_names=["images"],
            output_names=["probabilities", "embedding"],
            dynamic_axes={"images": {0: "batch"}, "probabilities": {0: "batch"}, "embedding": {0: "batch"}},
            opset_version=17,
            dynamo=False,
        )
    return buffer.getvalue()


def _with_metadata(onnx_bytes: bytes, metadata: dict[str, str]) -> bytes:
    proto = onnx.load_from_string(onnx_bytes)
    del proto.metadata_props[:]
    for key, value in metadata.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = META_PREFIX + key, value
    return bytes(proto.SerializeToString())


def _sample_inputs(
    data_dir: Path, split: str, config: TrainConfig, num_classes: int, limit: int
) -> tuple[np.ndarray, np.ndarray]:
    rows = spread_rows(load_split(data_dir, split), limit)
    dataset = BinDataset(data_dir, rows, eval_transform(config.preprocess), config.preprocess, num_classes)
    images = np.stack([dataset[i][0].numpy() for i in range(len(dataset))]).astype(np.float32)
    return images, dataset.counts[: len(images)]


def serving_engines(quantized: bool) -> list[RuntimeChoice]:
    """Every engine and precision this machine can serve the file with: each gets its own calibration
    and baseline, computed from its own outputs (engines disagree on borderline photos)."""
    precision = "int8" if quantized else "fp32"
    engines = [
        RuntimeChoice("onnxruntime", precision, "export"),
        RuntimeChoice("openvino", precision, "export"),
    ]
    if not quantized and native_bf16():
        engines.append(RuntimeChoice("openvino", "bf16", "export"))
    return engines


def _open_engine(path: Path, choice: RuntimeChoice) -> LoadedModel:
    requested = "fp32" if choice.precision == "int8" else choice.precision
    asked = RuntimeChoice(choice.backend, requested, "export")
    return (
        OpenVinoCounter(path, choice=asked)
        if choice.backend == "openvino"
        else OnnxCounter(path, choice=asked)
    )


def _probabilities(counter: LoadedModel, dataset: BinDataset) -> np.ndarray:
    """The engine's answers for a split, streamed in batches so thousands of photos fit in memory."""
    out = []
    for start in range(0, len(dataset), 64):
        batch = [dataset[i][0].numpy() for i in range(start, min(start + 64, len(dataset)))]
        out.append(counter.predict(np.stack(batch).astype(np.float32)))
    return np.concatenate(out)


def _describe_for_serving(
    path: Path, data_dir: Path, config: TrainConfig, num_classes: int, limit: int, quantized: bool
) -> tuple[Calibrated | None, Baselined | None, dict[str, float]]:
    """Per engine this machine has: the file's conformal calibration and monitoring baseline from that
    engine's own outputs on the validation split. Returns what was written, and each engine's
    validation accuracy (for the int8 verdict)."""
    try:
        rows = spread_rows(load_split(data_dir, "val"), limit)
    except BinsightError:
        rows = []
    if not rows:
        return None, None, {}
    dataset = BinDataset(data_dir, rows, eval_transform(config.preprocess), config.preprocess, num_classes)
    targets = np.minimum(dataset.counts[: len(dataset)], num_classes - 1)
    entries: dict[str, str] = {}
    accuracy: dict[str, float] = {}
    calibrated, baselined = None, None
    photos = [data_dir / r["image"] for r in rows]
    for choice in serving_engines(quantized):
        key = f"{choice.backend}/{choice.precision}"
        counter = _open_engine(path, choice)
        probabilities = _probabilities(counter, dataset)
        accuracy[key] = counting_metrics(dataset.counts[: len(dataset)], probabilities).accuracy
        calibration = Calibration.fit(
            probabilities, targets, tuple(range(num_classes)), f"val split of {data_dir.name}, {key}"
        )
        baseline = build_baseline(counter, photos, f"val split of {data_dir.name}, {key}")
        entries[f"calibration/{key}"] = calibration.to_json()
        entries[f"baseline/{key}"] = baseline.to_json()
        if choice.backend == "onnxruntime":  # what readers from before per-engine entries look for
            entries["calibration"], entries["baseline"] = (
                entries[f"calibration/{key}"],
                entries[f"baseline/{key}"],
            )
        calibrated = Calibrated(split="val", photos_per_count=calibration.sizes())
        baselined = Baselined(split="val", photos=baseline.size)
    _add_metadata(path, entries)
    return calibrated, baselined, accuracy


def _add_metadata(path: Path, entries: dict[str, str]) -> None:
    proto = onnx.load(str(path))
    for key, value in entries.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = META_PREFIX + key, value
    atomic_write_bytes(path, proto.SerializeToString())


def _card(checkpoint: Checkpoint, config: TrainConfig, num_classes: int) -> ModelCard:
    # Checkpoints from before the card existed get theirs rebuilt from what they do hold.
    if "card" in checkpoint:
        return ModelCard.model_validate(checkpoint["card"])
    return model_card(
        config,
        num_classes,
        str(checkpoint.get("train_fingerprint", "")),
        str(checkpoint.get("val_fingerprint", "")),
    )


def reference_set(
    model: CountingModel, data_dir: Path, config: TrainConfig, photos: int = 16
) -> ReferenceSet | None:
    """The self-check's photos (validation photos as the model takes them, uint8) and the fp32 PyTorch
    model's answers for them; None without a validation split."""
    try:
        rows = spread_rows(load_split(data_dir, "val"), photos)
    except BinsightError:
        return None
    preprocess = config.preprocess
    pixels = []
    for row in rows:
        try:
            pixels.append(preprocess.pixels(preprocess.decode(data_dir / row["image"])))
        except (OSError, SyntaxError, ValueError):
            continue
    if not pixels:
        return None
    stacked = np.stack(pixels)
    with torch.no_grad():
        inputs = torch.from_numpy(preprocess.normalise(stacked))
        probabilities = ProbabilityModel(model).eval()(inputs)[0].numpy()
    return ReferenceSet(stacked, probabilities.astype(np.float64))


def _write_verified(
    model: CountingModel, out: Path, metadata: dict[str, str], check: np.ndarray, tolerance: float
) -> tuple[int, float]:
    """Write the ONNX file and hold it to PyTorch's answers; a file that differs is removed."""
    onnx_bytes = _with_metadata(_to_onnx_bytes(model, check.shape[2:]), metadata)
    atomic_write_bytes(out, onnx_bytes)
    with torch.no_grad():
        expected = ProbabilityModel(model).eval()(torch.from_numpy(check))[0].numpy()
    max_diff = float(np.abs(expected - OnnxCounter(out).predict(check)).max())
    if max_diff > tolerance:
        out.unlink(missing_ok=True)
        raise BinsightError(
            f"ONNX output differs from PyTorch by {max_diff:.2e} (tolerance {tolerance:g})",
            hint="report this with the checkpoint; the export was removed",
        )
    log.info(
        "exported %s (%.1f MB); ONNX Runtime matches PyTorch within %.1e",
        out,
        len(onnx_bytes) / 1e6,
        max_diff,
    )
    return len(onnx_bytes), max_diff


# An int8 file that loses more than this (accuracy, on validation, on any engine here) beside its fp32
# file is marked not for serving: loading it serves the fp32 file instead, or fails, and says why.
INT8_MAX_COST = 0.005


def _write_int8(
    out: Path,
    metadata: dict[str, str],
    calibration: np.ndarray,
    fp32_accuracy: dict[str, float],
    describe: Callable[[Path, bool], tuple[Calibrated | None, Baselined | None, dict[str, float]]],
) -> Quantised:
    int8_path = out.with_name(out.stem + ".int8.onnx")
    int8_bytes = _with_metadata(quantize_int8(out, calibration), {**metadata, "quantized": "int8"})
    atomic_write_bytes(int8_path, int8_bytes)
    _, _, int8_accuracy = describe(int8_path, True)
    costs = {
        engine: fp32_accuracy[engine.replace("/int8", "/fp32")] - accuracy
        for engine, accuracy in int8_accuracy.items()
        if engine.replace("/int8", "/fp32") in fp32_accuracy
    }
    worst = max(costs, key=lambda e: costs[e]) if costs else None
    serving = "ok"
    if worst is not None and costs[worst] > INT8_MAX_COST:
        fp32_there = fp32_accuracy[worst.replace("/int8", "/fp32")]
        serving = (
            f"int8 loses {100 * costs[worst]:.1f} points of validation accuracy on {worst} here "
            f"({100 * int8_accuracy[worst]:.1f}% vs {100 * fp32_there:.1f}% in fp32; the limit is "
            f"{100 * INT8_MAX_COST:.1f})"
        )
        _add_metadata(int8_path, {"not_for_serving": serving})
        log.warning("%s is marked not for serving: %s", int8_path.name, serving)
    fp32_reference = fp32_accuracy.get("onnxruntime/fp32", float("nan"))
    return Quantised(
        onnx=str(int8_path),
        bytes=int8_path.stat().st_size,
        fp32_accuracy=fp32_reference,
        int8_accuracy=min(int8_accuracy.values()) if int8_accuracy else float("nan"),
        accuracy_cost=costs[worst] if worst else float("nan"),
        by_engine=int8_accuracy,
        serving=serving,
    )


class ExportConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    checkpoint: Path = Field(description="best.pt of a training run")
    out: Path = Field(description="ONNX file to write")
    data: Path | None = Field(
        None, description="dataset for verification and calibration (default: trained on)"
    )
    quantize: Literal["int8"] | None = Field(None, description="also write MODEL.int8.onnx")
    version: str | None = Field(None, description="version string stored in the file")
    verify_images: int = Field(16, ge=1, le=64, description="validation photos checked against PyTorch")
    calibration_images: int = Field(
        5000, ge=1, description="validation photos for the conformal calibration and the drift baseline"
    )
    tolerance: float = Field(1e-4, gt=0.0, description="largest ONNX vs PyTorch probability difference")


def export(settings: ExportConfig) -> ExportReport:
    """Write the verified ONNX file with everything serving needs inside it: the card, the self-check's
    reference photos, and per engine a conformal calibration and a drift baseline; optionally an int8
    file beside it, marked not for serving when it loses accuracy."""
    checkpoint = load_checkpoint(settings.checkpoint)
    model, config, num_classes = load_model(checkpoint)
    data_dir = settings.data or Path(config.data)
    out, verify_images, tolerance = settings.out, settings.verify_images, settings.tolerance
    metadata = {
        "card": _card(checkpoint, config, num_classes).model_dump_json(),
        "version": settings.version or "",
        "quantized": "",
        "embedding_dim": str(EMBEDDING_DIM),
    }
    reference = reference_set(model, data_dir, config, verify_images)
    if reference is not None:
        metadata["reference"] = reference.to_json()
        check = config.preprocess.normalise(reference.pixels)
    else:  # no validation photos at hand: verify on random inputs
        check = np.random.default_rng(0).normal(size=(verify_images, 3, *config.input_hw)).astype(np.float32)
    size_bytes, max_diff = _write_verified(model, out, metadata, check, tolerance)
    report = ExportReport(
        onnx=str(out),
        bytes=size_bytes,
        max_abs_diff_vs_pytorch=max_diff,
        verified_on=len(check),
        input_hw=config.input_hw,
        classes=num_classes,
    )

    def describe(path: Path, quantized: bool) -> tuple[Calibrated | None, Baselined | None, dict[str, float]]:
        return _describe_for_serving(
            path, data_dir, config, num_classes, settings.calibration_images, quantized
        )

    report.calibration, report.monitoring_baseline, fp32_accuracy = describe(out, False)
    report.engines = sorted(fp32_accuracy)
    if settings.quantize == "int8":
        if reference is None:
            raise BinsightError(
                "int8 quantisation needs validation images to calibrate on",
                hint=f"pass --data with a split (looked in {data_dir})",
            )
        calibration, _ = _sample_inputs(data_dir, "val", config, num_classes, 64)
        report.int8 = _write_int8(out, metadata, calibration, fp32_accuracy, describe)
    return report
