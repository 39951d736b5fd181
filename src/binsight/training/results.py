"""What a training run reports, typed: the object `train` returns is what `history.json` holds, and
what evaluation, the search and the pipeline read back."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict

from binsight.card import ModelCard
from binsight.errors import BinsightError
from binsight.training.config import TrainConfig
from binsight.training.metrics import Metric
from binsight.utils.io import atomic_write_text


class BestEpoch(BaseModel):
    """The epoch `best.pt` holds, by the run's selection metric (none yet before the first epoch)."""

    model_config = ConfigDict(extra="forbid")

    epoch: int | None = None
    value: float | None = None
    metric: Metric = Metric.ACCURACY


class TrainSummary(BaseModel):
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

    def write(self, path: Path) -> None:
        atomic_write_text(path, self.model_dump_json(indent=2) + "\n")

    @classmethod
    def read(cls, path: Path) -> TrainSummary:
        try:
            return cls.model_validate_json(path.read_text())
        except (OSError, ValueError) as exc:
            raise BinsightError(f"cannot read the training summary {path}: {exc}") from None


class ClassMetrics(BaseModel):
    support: int
    precision: float | None
    recall: float | None


class EvaluationReport(BaseModel):
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

    def write(self, path: Path) -> None:
        atomic_write_text(path, self.model_dump_json(indent=2) + "\n")

    @classmethod
    def read(cls, path: Path) -> EvaluationReport:
        try:
            return cls.model_validate_json(path.read_text())
        except (OSError, ValueError) as exc:
            raise BinsightError(f"cannot read the evaluation {path}: {exc}") from None


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
