"""What a training run reports, typed: the object `train` returns is what `history.json` holds, and
what evaluation, the search and the pipeline read back."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from binsight.card import ModelCard
from binsight.training.config import TrainConfig
from binsight.training.metrics import CountingMetrics, Metric
from binsight.training.monitors import Finding
from binsight.utils.records import JsonRecord


class BestEpoch(BaseModel):
    """The epoch `best.pt` holds, by the run's selection metric (none yet before the first epoch)."""

    model_config = ConfigDict(extra="forbid")

    epoch: int | None = None
    value: float | None = None
    metric: Metric = Metric.ACCURACY


class EpochStats(BaseModel):
    """One epoch of training, summed over every rank."""

    train_loss: float
    train_images_per_second: float
    data_wait_fraction: float
    grad_norm_mean: float
    grad_norm_max: float
    seconds: float


class EpochRecord(EpochStats):
    """One line of `history.json` (and of a checkpoint's history): training and validation after an
    epoch. What the search prunes on and the curves plot."""

    epoch: int
    val_loss: float
    lr: float
    val_accuracy: float
    val_off_by_one_accuracy: float
    val_mae: float
    val_rmse: float
    val_ece: float

    def value(self, metric: Metric) -> float:
        """The validation value of a selection metric (what `--select-metric` and the search read)."""
        return float(getattr(self, f"val_{metric.value}"))


class TrainSummary(JsonRecord):
    """`history.json`: the run, its best epoch and every epoch's record."""

    model_config = ConfigDict(extra="forbid")

    out: str
    replicas_in_sync: bool
    num_classes: int
    epochs_run: int
    best: BestEpoch
    majority_baseline_val_accuracy: float
    history: list[EpochRecord]
    findings: list[Finding]
    world_size: int
    device: str


class EvaluationReport(CountingMetrics, JsonRecord):
    """`metrics.json` of `binsight evaluate`: a checkpoint's metrics on one split, with provenance."""

    model_config = ConfigDict(extra="forbid")

    checkpoint: str
    split: str
    split_fingerprint: str
    arch: str
    head: str
    epoch: int | None  # the training epoch the weights are from; None for a soup
    soup: list[str] = Field(default_factory=list)  # the runs whose weights a soup averaged
    loss: float
    majority_baseline_accuracy: float | None


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
