"""The verdict on one bin: given the model's count probabilities and the recorded quantity.

P(count == recorded) is the model's belief that the record is right. Above `ok_above` the bin passes;
below `mismatch_below` it is flagged as a mismatch; in between, a person should look. The thresholds
trade how many bins people re-check against how many errors they catch; the audit's evaluation mode
measures that trade on labelled data.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

OK, MISMATCH, REVIEW = "ok", "mismatch", "review"


@dataclass(frozen=True)
class VerdictThresholds:
    ok_above: float = 0.5
    mismatch_below: float = 0.1

    def __post_init__(self) -> None:
        if not 0.0 <= self.mismatch_below <= self.ok_above <= 1.0:
            raise ValueError("need 0 <= mismatch_below <= ok_above <= 1")


@dataclass(frozen=True)
class Verdict:
    expected_count: int
    p_expected: float
    predicted_count: int
    verdict: str

    @property
    def agrees(self) -> bool:
        return self.predicted_count == self.expected_count


def p_of_count(probabilities: np.ndarray, count: int) -> float:
    """P(count); a recorded count beyond the model's classes gets the top class's mass, which reads
    as "that many or more" for a model whose last class absorbed larger counts."""
    if count < 0:
        return 0.0
    return float(probabilities[min(count, len(probabilities) - 1)])


def judge(probabilities: np.ndarray, expected_count: int, thresholds: VerdictThresholds) -> Verdict:
    p_expected = p_of_count(probabilities, expected_count)
    if p_expected >= thresholds.ok_above:
        verdict = OK
    elif p_expected < thresholds.mismatch_below:
        verdict = MISMATCH
    else:
        verdict = REVIEW
    return Verdict(expected_count, p_expected, int(np.argmax(probabilities)), verdict)
