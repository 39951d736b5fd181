"""Verdicts with a guaranteed false-alarm rate: class-conditional (Mondrian) split conformal prediction.

On a held-out labelled calibration split, each photo's nonconformity score is 1 - P(its true count).
Scores are kept per count, because how hard a bin is grows with its count. For a new bin whose record
says r, the conformal p-value is

    p = (1 + #{calibration bins of count r with score >= this bin's score}) / (n_r + 1),

and the record lies outside the model's prediction set at level alpha when p <= alpha. When the record
is right and bins of count r are exchangeable with the calibration bins of count r, P(p <= alpha) <=
alpha: on correct records the false-alarm rate is at most alpha, whatever the model's quality (a weak
model gives large prediction sets and flags little, rather than flagging everything). With fewer than
1/alpha - 1 calibration bins of a count, no record of that count can be flagged at that level, which
is the honest answer.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np

from binsight.errors import BinsightError

PRECISION = 5  # decimals kept per score: a few kB in the model file for thousands of photos


@dataclass(frozen=True)
class Calibration:
    classes: tuple[int, ...]
    scores: dict[int, np.ndarray]  # per class index, sorted ascending
    source: str = ""

    @classmethod
    def fit(
        cls, probabilities: np.ndarray, targets: np.ndarray, classes: tuple[int, ...], source: str = ""
    ) -> Calibration:
        """`targets` are class indices (counts past the top class already folded into it)."""
        probabilities = np.asarray(probabilities, dtype=np.float64)
        targets = np.asarray(targets, dtype=np.int64)
        if len(probabilities) != len(targets) or not len(targets):
            raise BinsightError("calibration needs one label per prediction, and at least one")
        own = probabilities[np.arange(len(targets)), targets]
        scores = {k: np.sort(np.round(1.0 - own[targets == k], PRECISION)) for k in range(len(classes))}
        return cls(tuple(classes), scores, source)

    def class_index(self, count: int) -> int:
        return min(max(count, 0), len(self.classes) - 1)

    def p_value(self, probabilities: np.ndarray, count: int) -> float:
        k = self.class_index(count)
        calibration = self.scores[k]
        score = round(1.0 - float(probabilities[k]), PRECISION)
        at_least = len(calibration) - int(np.searchsorted(calibration, score, side="left"))
        return (1 + at_least) / (len(calibration) + 1)

    def prediction_set(self, probabilities: np.ndarray, alpha: float) -> list[int]:
        """Counts the model cannot rule out at level alpha."""
        return [self.classes[k] for k in range(len(self.classes)) if self.p_value(probabilities, k) > alpha]

    def sizes(self) -> dict[str, int]:
        return {str(self.classes[k]): len(v) for k, v in self.scores.items()}

    def to_json(self) -> str:
        return json.dumps(
            {
                "method": "class-conditional split conformal, score 1 - P(recorded count)",
                "source": self.source,
                "classes": list(self.classes),
                "scores": {str(k): v.tolist() for k, v in self.scores.items()},
            },
            separators=(",", ":"),
        )

    @classmethod
    def from_json(cls, text: str) -> Calibration:
        try:
            document = json.loads(text)
            return cls(
                tuple(int(c) for c in document["classes"]),
                {int(k): np.asarray(v, dtype=np.float64) for k, v in document["scores"].items()},
                str(document.get("source", "")),
            )
        except (ValueError, KeyError, TypeError) as exc:
            raise BinsightError(f"the model's calibration cannot be read ({exc})") from None
