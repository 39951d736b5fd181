"""What a training step minimises: the head's loss on the recorded counts, optionally weighted against
the class imbalance, optionally mixed with a teacher's answers (distillation).

ABID is bimodal (many 1s and 5s, few 3s): a model that answers only 1 or 5 already scores well, and
cross-entropy rewards it for that. `class_balance` weights each count by (1/frequency)**b. A teacher
(a stronger model, e.g. DINOv2 fine-tuned) gives a full distribution for every training photo, which
tells a small student how a 3 differs from a 4 better than one label does; its answers are computed
once per run (`teachers.py`) and looked up by row.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch

from binsight.errors import BinsightError
from binsight.models.heads import CountHead
from binsight.training.config import TrainConfig

log = logging.getLogger(__name__)


@dataclass
class Objective:
    head: CountHead
    config: TrainConfig
    class_weights: torch.Tensor | None = None  # per class
    teacher: torch.Tensor | None = None  # (training photos, classes): the teacher's probabilities

    def __call__(self, outputs: torch.Tensor, targets: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        config = self.config
        per_image = self.head.loss(
            outputs,
            targets,
            config.label_smoothing,
            reduction="none",
            neighbour_smoothing=config.neighbour_smoothing,
        )
        if config.rps_weight > 0:
            per_image = per_image + config.rps_weight * ranked_probability_score(
                self.head.probabilities(outputs), targets
            )
        if self.class_weights is not None:
            weights = self.class_weights.to(per_image.device)[targets]
            loss = (per_image * weights).sum() / weights.sum()
        else:
            loss = per_image.mean()
        if self.teacher is not None and config.distill > 0:
            soft = self.teacher.to(outputs.device)[rows.to(outputs.device)]
            log_p = torch.log(self.head.probabilities(outputs).clamp_min(1e-8))
            loss = (1 - config.distill) * loss + config.distill * -(soft * log_p).sum(dim=1).mean()
        return loss


def ranked_probability_score(probabilities: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per photo, the sum over thresholds k of (P(answer <= k) - [count <= k])^2: zero for a certain
    right answer, growing with the distance of the mass from the count (Epstein's RPS, the discrete
    squared earth mover's distance)."""
    classes = probabilities.shape[1]
    levels = torch.arange(classes - 1, device=targets.device)
    at_or_below = (targets[:, None] <= levels[None, :]).to(probabilities.dtype)
    return ((probabilities.cumsum(dim=1)[:, :-1] - at_or_below) ** 2).sum(dim=1)


def class_weights(train_targets: np.ndarray, num_classes: int, strength: float) -> torch.Tensor | None:
    """(1/frequency)**strength, normalised to mean 1 over the training photos; None at strength 0."""
    if strength <= 0:
        return None
    frequency = np.bincount(train_targets, minlength=num_classes).astype(np.float64)
    weights = (frequency.sum() / np.maximum(frequency, 1.0) / num_classes) ** strength
    weights /= float((weights[train_targets]).mean())
    return torch.tensor(weights, dtype=torch.float32)


def build_objective(
    config: TrainConfig,
    head: CountHead,
    train_targets: np.ndarray,
    num_classes: int,
    teacher: np.ndarray | None,
) -> Objective:
    """The loss for `config`; `teacher`: the teachers' probabilities per training photo (`teachers.py`)."""
    answers = None
    if teacher is not None and config.distill > 0:
        if teacher.shape[1] != num_classes:
            raise BinsightError(
                f"the teacher answers {teacher.shape[1]} classes, this model {num_classes}",
                hint="train the student with the teacher's --num-classes",
            )
        answers = torch.from_numpy(teacher.astype(np.float32))
    return Objective(head, config, class_weights(train_targets, num_classes, config.class_balance), answers)
