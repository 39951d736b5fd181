"""`binsight evaluate`: a checkpoint on a split -> metrics.json, confusion matrix, curves, HTML report."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from binsight.data.split import fingerprint, load_split
from binsight.errors import BinsightError
from binsight.models.factory import build_model
from binsight.models.heads import CountingModel
from binsight.reporting.html import HtmlReport
from binsight.training.checkpoint import Checkpoint, epochs_finished, load_checkpoint
from binsight.training.config import TrainConfig
from binsight.training.data import BinDataset, eval_transform, make_loader
from binsight.training.distributed import DistContext
from binsight.training.hardware import Precision, resolve_device
from binsight.training.loop import predict
from binsight.training.metrics import counting_metrics, majority_baseline
from binsight.training.monitors import Finding
from binsight.training.results import EpochRecord, EvaluationReport, TrainSummary
from binsight.utils.plots import confusion_matrix_plot, history_curves

log = logging.getLogger(__name__)


def load_model(checkpoint: Checkpoint) -> tuple[CountingModel, TrainConfig, int]:
    """Rebuild the trained model from a checkpoint alone (no pretrained weights needed)."""
    config = TrainConfig.model_validate(checkpoint["config"])
    num_classes = int(checkpoint["num_classes"])
    model = build_model(
        config.arch,
        config.head,
        num_classes,
        pretrained=False,
        dropout=config.dropout,
        input_hw=config.input_hw,
    )
    model.load_state_dict(checkpoint["model"])
    return model.eval(), config, num_classes


def photo_probabilities(
    checkpoint_path: Path,
    data_dir: Path,
    rows: list[dict[str, str]],
    *,
    mirrored: bool = False,
    batch_size: int = 64,
    device: str = "cpu",
    workers: int = 0,
) -> np.ndarray:
    """A trained model's probabilities for each photo of `rows`, through the evaluation path; with
    `mirrored`, averaged with those of the mirror image (a flip never changes a count). `device` as
    in training ("auto" takes the GPU where there is one); `workers` decode photos in parallel."""
    model, config, num_classes = load_model(load_checkpoint(checkpoint_path))
    probabilities, _, _ = _answers(
        model, config, num_classes, data_dir, rows, batch_size, device, workers, mirrored
    )
    return probabilities


def _answers(
    model: CountingModel,
    config: TrainConfig,
    num_classes: int,
    data_dir: Path,
    rows: list[dict[str, str]],
    batch_size: int,
    device: str,
    workers: int,
    mirrored: bool = False,
) -> tuple[np.ndarray, float, np.ndarray]:
    """(probabilities, mean loss of the plain pass, counts) of `model` on `rows`: the evaluation
    transform, mixed precision where it is native, the photos in the order of `rows`."""
    dataset = BinDataset(data_dir, rows, eval_transform(config.preprocess), config.preprocess, num_classes)
    target = resolve_device(device, DistContext())
    loader = make_loader(dataset, batch_size, False, workers, 0, False, target.type == "cuda")
    model.to(target)
    precision = Precision(config.model_copy(update={"amp": "auto"}), target)
    _, probabilities, loss = predict(model, model.head, loader, target, precision, DistContext())
    if mirrored:
        _, flipped, _ = predict(Mirrored(model), model.head, loader, target, precision, DistContext())
        probabilities = (probabilities + flipped) / 2
    return probabilities, loss, dataset.counts


class Mirrored(torch.nn.Module):
    """The model applied to the mirror image of each photo."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        output: torch.Tensor = self.model(torch.flip(images, dims=[3]))
        return output


class EvaluateConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    checkpoint: Path = Field(description="best.pt or last.pt of a training run")
    data: Path | None = Field(None, description="dataset directory (default: the one trained on)")
    split: Literal["train", "val", "test"] = Field("test", description="split to evaluate on")
    out: Path | None = Field(None, description="output directory (default RUN/eval-SPLIT)")
    batch_size: int = Field(64, ge=1, description="images per forward pass")
    workers: int = Field(2, ge=0, description="data loader processes")
    device: str = Field("auto", description="auto, cpu, cuda or cuda:N")

    @property
    def out_dir(self) -> Path:
        return self.out or self.checkpoint.parent / f"eval-{self.split}"


def evaluate(settings: EvaluateConfig) -> EvaluationReport:
    """A checkpoint on a split: metrics.json, the confusion matrix and curves as PNG, report.html."""
    checkpoint_path, split, batch_size, workers = (
        settings.checkpoint,
        settings.split,
        settings.batch_size,
        settings.workers,
    )
    checkpoint = load_checkpoint(checkpoint_path)
    model, config, num_classes = load_model(checkpoint)
    data_dir = settings.data or Path(config.data)
    out_dir = settings.out_dir
    if split == "val" and config.refit:
        log.warning(
            "%s was refitted on its validation photos: its figures on them measure fit, not accuracy "
            "(judge it on --split test)",
            checkpoint_path,
        )
    rows = load_split(data_dir, split)
    probabilities, loss, counts = _answers(
        model, config, num_classes, data_dir, rows, batch_size, settings.device, workers
    )
    metrics = counting_metrics(counts, probabilities)
    try:
        train_counts = np.array([int(r["count"]) for r in load_split(data_dir, "train")])
        baseline = majority_baseline(train_counts, counts)
    except BinsightError:
        baseline = None
    report = EvaluationReport(
        checkpoint=str(checkpoint_path),
        split=split,
        split_fingerprint=fingerprint(rows),
        loss=loss,
        majority_baseline_accuracy=baseline,
        arch=config.arch,
        head=config.head,
        epoch=None if "soup" in checkpoint else epochs_finished(checkpoint),
        soup=list(checkpoint.get("soup", [])),
        **metrics.model_dump(),
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    report.write(out_dir / "metrics.json")
    labels = [str(k) for k in range(num_classes)]
    labels[-1] = (
        f"{num_classes - 1}+" if int(max(int(r["count"]) for r in rows)) >= num_classes else labels[-1]
    )
    confusion_matrix_plot(
        np.asarray(metrics.confusion_matrix),
        labels,
        out_dir / "confusion_matrix.png",
        f"{split}: accuracy {metrics.accuracy:.3f}, n={metrics.n}",
    )
    history = [EpochRecord.model_validate(h) for h in checkpoint.get("history", [])]
    if history:
        history_curves([h.model_dump() for h in history], out_dir / "curves.png")
    findings = _findings(Path(checkpoint_path).parent)
    write_report(report, history, findings, out_dir)
    return report


def _findings(run_dir: Path) -> list[Finding]:
    """The monitors' findings, from the run summary that training writes next to its checkpoints."""
    summary = run_dir / "history.json"
    return TrainSummary.read(summary).findings if summary.exists() else []


def write_report(
    result: EvaluationReport, history: list[EpochRecord], findings: list[Finding], out_dir: Path
) -> None:
    report = HtmlReport(f"binsight evaluation: {result.arch} / {result.head} on {result.split}")
    origin = (
        f"a soup of {len(result.soup)} runs' weights: {', '.join(result.soup)}"
        if result.soup
        else f"epoch {result.epoch}"
    )
    report.paragraph(
        f"Checkpoint {result.checkpoint} ({origin}), {result.n} images, "
        f"split fingerprint {result.split_fingerprint}."
    )
    report.heading("Metrics")
    rows = [
        ("accuracy", result.accuracy),
        ("off-by-one accuracy", result.off_by_one_accuracy),
        ("MAE (objects)", result.mae),
        ("RMSE (objects)", result.rmse),
        ("expected calibration error", result.ece),
        ("loss", result.loss),
        ("majority-class accuracy (baseline)", result.majority_baseline_accuracy),
    ]
    report.table(["metric", "value"], rows)
    baseline = result.majority_baseline_accuracy
    if baseline is not None and result.accuracy <= baseline + 0.02:
        report.paragraph("Accuracy is no better than always answering the most common count.", "warn")
    report.heading("Per count")
    report.table(
        ["count", "support", "precision", "recall"],
        [(k, v.support, v.precision, v.recall) for k, v in result.per_class.items()],
    )
    report.figure(out_dir / "confusion_matrix.png", "Confusion matrix (rows: true count)")
    report.figure(out_dir / "curves.png", "Training curves")
    report.heading("Training monitors")
    if findings:
        for finding in findings:
            report.paragraph(f"{finding.rule} (epoch {finding.epoch + 1}): {finding.message}", "warn")
    else:
        report.paragraph("No monitor fired: no overfitting, stalled loss or bad gradients detected.", "ok")
    if history:
        report.heading("History")
        keys = ["epoch", "train_loss", "val_loss", "val_accuracy", "val_mae", "lr", "train_images_per_second"]
        report.table(keys, [[getattr(h, k) for k in keys] for h in history])
    report.write(out_dir / "report.html")
