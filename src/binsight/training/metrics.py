"""Counting metrics, computed from integer predictions and per-class probabilities.

Accuracy alone hides how wrong a count is, so RMSE, MAE and off-by-one accuracy come with it; ECE
says whether the probabilities can be trusted, which the audit depends on.

Counts beyond the model's range are judged honestly: the last class means "K or more", its answer as a
number is K, and accuracy, MAE and RMSE compare that number with the *recorded* count. A bin of 12 that
the model calls "6+" is an error of 6, never a hit; `overflow` reports how often such bins were at
least recognised as large. The confusion matrix and ECE are over classes (12 is in class "6+").
"""

from __future__ import annotations

import itertools
from enum import StrEnum
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field


class Metric(StrEnum):
    """A metric a run can be judged by, with its direction: training picks `best.pt` by one, a
    search optimises one, and the pipeline promotes on one; all three read the direction here."""

    ACCURACY = "accuracy"
    OFF_BY_ONE_ACCURACY = "off_by_one_accuracy"
    MAE = "mae"
    RMSE = "rmse"
    LOSS = "loss"

    @property
    def higher_is_better(self) -> bool:
        return self in (Metric.ACCURACY, Metric.OFF_BY_ONE_ACCURACY)

    def gain(self, new: float, old: float) -> float:
        """How much better `new` is than `old` (negative when worse), whichever the direction."""
        return new - old if self.higher_is_better else old - new

    def improves(self, new: float, best: float | None) -> bool:
        return best is None or self.gain(new, best) > 0

    @property
    def optuna_direction(self) -> Literal["maximize", "minimize"]:
        return "maximize" if self.higher_is_better else "minimize"


def confusion_matrix(targets: np.ndarray, predictions: np.ndarray, num_classes: int) -> np.ndarray:
    matrix = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(matrix, (targets, np.clip(predictions, 0, num_classes - 1)), 1)
    return matrix


def expected_calibration_error(probabilities: np.ndarray, targets: np.ndarray, bins: int = 15) -> float:
    """Weighted mean gap between confidence and accuracy over equal-width confidence bins."""
    confidence = probabilities.max(axis=1)
    correct = probabilities.argmax(axis=1) == targets
    edges = np.linspace(0.0, 1.0, bins + 1)
    ece = 0.0
    for low, high in itertools.pairwise(edges):
        members = (confidence > low) & (confidence <= high)
        if members.any():
            ece += members.mean() * abs(confidence[members].mean() - correct[members].mean())
    return float(ece)


class OverflowMetrics(BaseModel):
    """How the bins beyond the last class fared: judged against their real count elsewhere, here only
    whether the model put them in the overflow class."""

    model_config = ConfigDict(validate_by_name=True, validate_by_alias=True, serialize_by_alias=True)

    overflow_class: str = Field(alias="class")
    images_beyond: int
    recognised_as_overflow: float | None


class ClassMetrics(BaseModel):
    support: int
    precision: float | None
    recall: float | None


class CountingMetrics(BaseModel):
    """A model's answers against the recorded counts: what an epoch's validation, `evaluate` and the
    export's checks report."""

    n: int
    accuracy: float
    off_by_one_accuracy: float
    mae: float
    rmse: float
    ece: float
    overflow: OverflowMetrics
    per_class: dict[str, ClassMetrics]
    confusion_matrix: list[list[int]]


def counting_metrics(counts: np.ndarray, probabilities: np.ndarray) -> CountingMetrics:
    """Metrics of per-class probabilities against the recorded counts (which may exceed the classes)."""
    counts = np.asarray(counts, dtype=np.int64)
    probabilities = np.asarray(probabilities, dtype=np.float64)
    num_classes = probabilities.shape[1]
    overflow_class = num_classes - 1
    targets = np.minimum(counts, overflow_class)
    predictions = probabilities.argmax(axis=1)
    errors = predictions - counts
    beyond = counts > overflow_class
    matrix = confusion_matrix(targets, predictions, num_classes)
    true_per_class = matrix.sum(axis=1)
    predicted_per_class = matrix.sum(axis=0)
    diagonal = np.diag(matrix)
    with np.errstate(divide="ignore", invalid="ignore"):
        precision = np.where(predicted_per_class > 0, diagonal / predicted_per_class, np.nan)
        recall = np.where(true_per_class > 0, diagonal / true_per_class, np.nan)
    return CountingMetrics(
        n=int(targets.size),
        accuracy=float((errors == 0).mean()),
        off_by_one_accuracy=float((np.abs(errors) <= 1).mean()),
        mae=float(np.abs(errors).mean()),
        rmse=float(np.sqrt((errors.astype(np.float64) ** 2).mean())),
        ece=expected_calibration_error(probabilities, targets),
        overflow=OverflowMetrics(
            overflow_class=f"{overflow_class}+",
            images_beyond=int(beyond.sum()),
            recognised_as_overflow=float((predictions[beyond] == overflow_class).mean())
            if beyond.any()
            else None,
        ),
        per_class={
            str(k): ClassMetrics(
                support=int(true_per_class[k]),
                precision=None if np.isnan(precision[k]) else float(precision[k]),
                recall=None if np.isnan(recall[k]) else float(recall[k]),
            )
            for k in range(num_classes)
        },
        confusion_matrix=matrix.tolist(),
    )


def majority_baseline(train_counts: np.ndarray, eval_counts: np.ndarray) -> float:
    """Accuracy of always answering the most common training count: the bar any model must clear."""
    majority = np.bincount(np.asarray(train_counts)).argmax()
    return float((np.asarray(eval_counts) == majority).mean())
