"""What a training step minimises: the head's loss on the recorded counts, optionally weighted against
the class imbalance, optionally mixed with a teacher's answers (distillation).

ABID is bimodal (many 1s and 5s, few 3s): a model that answers only 1 or 5 already scores well, and
cross-entropy rewards it for that. `class_balance` weights each count by (1/frequency)**b. A teacher
(a stronger model, e.g. DINOv2 fine-tuned) gives a full distribution for every training photo, which
tells a small student how a 3 differs from a 4 better than one label does; its answers are computed
once per run (`teacher_probabilities`) and looked up by row.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from binsight.errors import BinsightError
from binsight.models.heads import CountHead
from binsight.training.config import TrainConfig
from binsight.utils.io import sha256_file

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


def class_weights(train_targets: np.ndarray, num_classes: int, strength: float) -> torch.Tensor | None:
    """(1/frequency)**strength, normalised to mean 1 over the training photos; None at strength 0."""
    if strength <= 0:
        return None
    frequency = np.bincount(train_targets, minlength=num_classes).astype(np.float64)
    weights = (frequency.sum() / np.maximum(frequency, 1.0) / num_classes) ** strength
    weights /= float((weights[train_targets]).mean())
    return torch.tensor(weights, dtype=torch.float32)


def teacher_probabilities(
    teachers: list[Path], data_dir: Path, rows: list[dict[str, str]], out: Path
) -> np.ndarray:
    """The teachers' averaged probabilities for each training photo (each also on its mirror image),
    computed once and kept in the run folder under the teachers' hashes."""
    from binsight.training.evaluate import photo_probabilities

    key = hashlib.sha256("".join(sha256_file(t) for t in teachers).encode()).hexdigest()[:16]
    target = out / f"teachers-{key}.npy"
    if target.is_file():
        cached: np.ndarray = np.load(target)
        if len(cached) == len(rows):
            return cached
    answers = []
    for teacher in teachers:
        log.info("computing the answers of teacher %s for %d training photos", teacher, len(rows))
        answers.append(photo_probabilities(teacher, data_dir, rows, mirrored=True))
    if len({a.shape[1] for a in answers}) != 1:
        raise BinsightError(
            "the teachers answer different numbers of classes", hint="give teachers of one kind"
        )
    probabilities: np.ndarray = np.mean(answers, axis=0)
    out.mkdir(parents=True, exist_ok=True)
    np.save(target, probabilities)
    return probabilities


def build_objective(
    config: TrainConfig,
    head: CountHead,
    train_targets: np.ndarray,
    rows: list[dict[str, str]],
    num_classes: int,
) -> Objective:
    teacher = None
    if config.teachers and config.distill > 0:
        probabilities = teacher_probabilities(config.teachers, Path(config.data), rows, Path(config.out))
        if probabilities.shape[1] != num_classes:
            raise BinsightError(
                f"the teacher answers {probabilities.shape[1]} classes, this model {num_classes}",
                hint="train the student with the teacher's --num-classes",
            )
        teacher = torch.from_numpy(probabilities.astype(np.float32))
    return Objective(head, config, class_weights(train_targets, num_classes, config.class_balance), teacher)
