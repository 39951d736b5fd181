"""What a training run reports, typed: the object `train` returns is what `history.json` holds, and
what evaluation, the search and the pipeline read back."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict

from binsight.card import ModelCard
from binsight.training.config import TrainConfig
from binsight.training.metrics import Metric
from binsight.utils.records import JsonRecord


class BestEpoch(BaseModel):
    """The epoch `best.pt` holds, by the run's selection metric (none yet before the first epoch)."""

    model_config = ConfigDict(extra="forbid")

    epoch: int | None = None
    value: float | None = None
    metric: Metric = Metric.ACCURACY


class TrainSummary(JsonRecord):
    """`history.json`: the run, its best epoch and every epoch's record."""

    model_config = ConfigDict(extra="forbid")

    out: str
    replicas_in_sync: bool
    num_classes: int
    epochs_run: int
    best: BestEpoch
    majority_baseline_val_accuracy: float
    history: list[dict[str, Any]]
    findings: list[dict[str, Any]]
    world_size: int
    device: str


class ClassMetrics(BaseModel):
    support: int
    precision: float | None
    recall: float | None


class EvaluationReport(JsonRecord):
    """`metrics.json` of `binsight evaluate`: a checkpoint's metrics on one split, with provenance."""

    model_config = ConfigDict(extra="forbid")

    checkpoint: str
    split: str
    split_fingerprint: str
    arch: str
    head: str
    epoch: int
    loss: float
    majority_baseline_accuracy: float | None
    n: int
    accuracy: float
    off_by_one_accuracy: float
    mae: float
    rmse: float
    ece: float
    overflow: dict[str, Any]
    per_class: dict[str, ClassMetrics]
    confusion_matrix: list[list[int]]

    def value(self, metric: Metric) -> float:
        return float(getattr(self, metric.value))


def model_card(
    config: TrainConfig, num_classes: int, train_fingerprint: str = "", val_fingerprint: str = ""
) -> ModelCard:
    """The card of a model trained with `config`: written into every checkpoint, and by export into
    the model file."""
    mean, std = config.mean_std
    height, width = config.input_hw
    return ModelCard(
        input_height=height,
        input_width=width,
        mean=mean,
        std=std,
        classes=tuple(range(num_classes)),
        arch=config.arch,
        head=config.head,
        training=config.model_dump(mode="json"),
        data=str(config.data),
        train_fingerprint=train_fingerprint,
        val_fingerprint=val_fingerprint,
    )
