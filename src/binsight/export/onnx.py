"""`binsight export`: a checkpoint -> a self-describing ONNX file, checked against PyTorch, optionally int8.

The graph ends in the head's probabilities (not logits), so every head (classification, ordinal,
regression) serves the same way.
"""

from __future__ import annotations

import io
import logging
import os
import tempfile
import warnings
from pathlib import Path

import numpy as np
import onnx
import torch
from pydantic import BaseModel, ConfigDict
from torch import nn

from binsight.card import ModelCard
from binsight.data.split import load_split
from binsight.errors import BinsightError
from binsight.imaging import Size, as_hw
from binsight.inference.conformal import Calibration
from binsight.inference.runtime import META_PREFIX, OnnxCounter
from binsight.models.heads import CountingModel
from binsight.monitoring.baseline import build_baseline
from binsight.training.checkpoint import load_checkpoint
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
    evaluated_on: int
    fp32_accuracy: float
    int8_accuracy: float
    accuracy_cost: float
    fp32_mae: float
    int8_mae: float


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
    rows = load_split(data_dir, split)[:limit]
    size = config.input_hw
    dataset = BinDataset(data_dir, rows, eval_transform(size, *config.mean_std), size, num_classes)
    images = np.stack([dataset[i][0].numpy() for i in range(len(dataset))]).astype(np.float32)
    return images, dataset.counts[: len(images)]


def _calibrate(
    model_path: Path, data_dir: Path, config: TrainConfig, num_classes: int, limit: int
) -> Calibration | None:
    """Conformal calibration of the exported file on the validation split (its own outputs, so an int8
    file gets its own), streamed in batches so thousands of photos fit in memory."""
    try:
        rows = load_split(data_dir, "val")[:limit]
    except BinsightError:
        return None
    if not rows:
        return None
    size = config.input_hw
    dataset = BinDataset(data_dir, rows, eval_transform(size, *config.mean_std), size, num_classes)
    counter = OnnxCounter(model_path)
    probabilities = []
    for start in range(0, len(dataset), 64):
        batch = [dataset[i][0].numpy() for i in range(start, min(start + 64, len(dataset)))]
        probabilities.append(counter.predict(np.stack(batch).astype(np.float32)))
    targets = np.minimum(dataset.counts[: len(dataset)], num_classes - 1)
    return Calibration.fit(
        np.concatenate(probabilities), targets, tuple(range(num_classes)), f"val split of {data_dir.name}"
    )


def _add_metadata(path: Path, entries: dict[str, str]) -> None:
    proto = onnx.load(str(path))
    for key, value in entries.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = META_PREFIX + key, value
    atomic_write_bytes(path, proto.SerializeToString())


def _describe_for_serving(
    path: Path, data_dir: Path, config: TrainConfig, num_classes: int, limit: int
) -> tuple[Calibrated | None, Baselined | None]:
    """Write the file's conformal calibration and its monitoring baseline, both from its own outputs on
    the validation split; returns what was written."""
    entries: dict[str, str] = {}
    calibrated, baselined = None, None
    calibration = _calibrate(path, data_dir, config, num_classes, limit)
    if calibration is not None:
        entries["calibration"] = calibration.to_json()
        calibrated = Calibrated(split="val", photos_per_count=calibration.sizes())
    try:
        rows = load_split(data_dir, "val")[:limit]
    except BinsightError:
        rows = []
    if rows:
        baseline = build_baseline(
            OnnxCounter(path), [data_dir / r["image"] for r in rows], f"val split of {data_dir.name}"
        )
        entries["baseline"] = baseline.to_json()
        baselined = Baselined(split="val", photos=baseline.size)
    if entries:
        _add_metadata(path, entries)
    return calibrated, baselined


def _quantize_int8(fp32_path: Path, calibration: np.ndarray) -> bytes:
    """Static QDQ quantisation calibrated on real validation images (dynamic quantisation leaves the
    convolutions, which are nearly all of a CNN's time, in float)."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):  # type: ignore[misc]  # onnxruntime ships no type hints
        def __init__(self) -> None:
            self.batches = iter([{"images": calibration[i : i + 8]} for i in range(0, len(calibration), 8)])

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.batches, None)

    # The quantiser logs one line per rescaled depthwise channel (thousands for EfficientNet) through the
    # root logger at INFO; keep them out of the user's log.
    root = logging.getLogger()
    level = root.level
    root.setLevel(max(level, logging.WARNING))
    try:
        with tempfile.TemporaryDirectory() as tmp:
            prepared, output = Path(tmp) / "prepared.onnx", Path(tmp) / "int8.onnx"
            quant_pre_process(str(fp32_path), str(prepared), skip_symbolic_shape=True)
            quantize_static(
                str(prepared),
                str(output),
                Reader(),
                quant_format=QuantFormat.QDQ,
                activation_type=QuantType.QUInt8,
                weight_type=QuantType.QInt8,
                per_channel=True,
            )
            return output.read_bytes()
    finally:
        root.setLevel(level)


def export(
    checkpoint_path: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    data: str | os.PathLike[str] | None = None,
    quantize: bool = False,
    version: str | None = None,
    verify_images: int = 16,
    quant_eval_images: int = 512,
    calibration_images: int = 5000,
    tolerance: float = 1e-4,
) -> ExportReport:
    checkpoint = load_checkpoint(checkpoint_path)
    model, config, num_classes = load_model(checkpoint)
    data_dir = Path(data) if data else Path(config.data)
    size = config.input_hw
    # Checkpoints from before the card existed get theirs rebuilt from what they do hold.
    card = (
        ModelCard.model_validate(checkpoint["card"])
        if "card" in checkpoint
        else model_card(
            config,
            num_classes,
            checkpoint.get("train_fingerprint", ""),
            checkpoint.get("val_fingerprint", ""),
        )
    )
    metadata = {
        "card": card.model_dump_json(),
        "version": version or "",
        "source_checkpoint": str(checkpoint_path),
        "quantized": "",
        "embedding_dim": str(EMBEDDING_DIM),
    }
    onnx_bytes = _with_metadata(_to_onnx_bytes(model, size), metadata)
    out = Path(out)
    atomic_write_bytes(out, onnx_bytes)

    # Verify on real images when the data is at hand, else on random inputs.
    try:
        samples, targets = _sample_inputs(
            data_dir, "val", config, num_classes, max(verify_images, quant_eval_images)
        )
    except BinsightError:
        samples, targets = (
            np.random.default_rng(0).normal(size=(verify_images, 3, *size)).astype(np.float32),
            None,
        )
    check = samples[:verify_images]
    with torch.no_grad():
        expected = ProbabilityModel(model)(torch.from_numpy(check))[0].numpy()
    got = OnnxCounter(out).predict(check)
    max_diff = float(np.abs(expected - got).max())
    if max_diff > tolerance:
        out.unlink(missing_ok=True)
        raise BinsightError(
            f"ONNX output differs from PyTorch by {max_diff:.2e} (tolerance {tolerance:g})",
            hint="report this with the checkpoint; the export was removed",
        )
    report = ExportReport(
        onnx=str(out),
        bytes=len(onnx_bytes),
        max_abs_diff_vs_pytorch=max_diff,
        verified_on=len(check),
        input_hw=size,
        classes=num_classes,
    )
    log.info(
        "exported %s (%.1f MB); ONNX Runtime matches PyTorch within %.1e",
        out,
        len(onnx_bytes) / 1e6,
        max_diff,
    )

    report.calibration, report.monitoring_baseline = _describe_for_serving(
        out, data_dir, config, num_classes, calibration_images
    )
    if report.calibration is not None:
        log.info(
            "conformal calibration on %s validation photos per count, monitoring baseline of %d photos",
            report.calibration.photos_per_count,
            report.monitoring_baseline.photos if report.monitoring_baseline else 0,
        )

    if quantize:
        if targets is None:
            raise BinsightError(
                "int8 quantisation needs validation images to calibrate on",
                hint=f"pass --data with a split (looked in {data_dir})",
            )
        int8_path = out.with_name(out.stem + ".int8.onnx")
        calibration = samples[: min(64, len(samples))]
        int8_bytes = _with_metadata(_quantize_int8(out, calibration), {**metadata, "quantized": "int8"})
        atomic_write_bytes(int8_path, int8_bytes)
        _describe_for_serving(int8_path, data_dir, config, num_classes, calibration_images)
        fp32_metrics = counting_metrics(targets, OnnxCounter(out).predict(samples))
        int8_metrics = counting_metrics(targets, OnnxCounter(int8_path).predict(samples))
        report.int8 = Quantised(
            onnx=str(int8_path),
            bytes=len(int8_bytes),
            evaluated_on=len(samples),
            fp32_accuracy=fp32_metrics["accuracy"],
            int8_accuracy=int8_metrics["accuracy"],
            accuracy_cost=fp32_metrics["accuracy"] - int8_metrics["accuracy"],
            fp32_mae=fp32_metrics["mae"],
            int8_mae=int8_metrics["mae"],
        )
        log.info(
            "int8 model %s: accuracy %.4f vs %.4f in fp32 on %d validation images",
            int8_path,
            int8_metrics["accuracy"],
            fp32_metrics["accuracy"],
            len(samples),
        )
    return report
