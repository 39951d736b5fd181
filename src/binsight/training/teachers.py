"""The teachers' answers a student learns from (distillation): computed once per run, kept in the run
folder under the teachers' hashes, looked up by training row."""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import numpy as np

from binsight.errors import BinsightError
from binsight.training.evaluate import photo_probabilities
from binsight.utils.io import sha256_file

log = logging.getLogger(__name__)


def teacher_probabilities(
    teachers: list[Path],
    data_dir: Path,
    rows: list[dict[str, str]],
    out: Path,
    device: str = "cpu",
    workers: int = 0,
) -> np.ndarray:
    """The teachers' averaged probabilities for each training photo (each also on its mirror image),
    computed once and kept in the run folder under the teachers' hashes."""
    key = hashlib.sha256("".join(sha256_file(t) for t in teachers).encode()).hexdigest()[:16]
    target = out / f"teachers-{key}.npy"
    if target.is_file():
        cached: np.ndarray = np.load(target)
        if len(cached) == len(rows):
            return cached
    answers = []
    for teacher in teachers:
        log.info("computing the answers of teacher %s for %d training photos", teacher, len(rows))
        answers.append(
            photo_probabilities(teacher, data_dir, rows, mirrored=True, device=device, workers=workers)
        )
    if len({a.shape[1] for a in answers}) != 1:
        raise BinsightError(
            "the teachers answer different numbers of classes", hint="give teachers of one kind"
        )
    probabilities: np.ndarray = np.mean(answers, axis=0)
    out.mkdir(parents=True, exist_ok=True)
    np.save(target, probabilities)
    return probabilities
