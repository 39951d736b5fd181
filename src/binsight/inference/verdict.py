"""The verdict on one bin: given the model's count probabilities and the recorded quantity.

Two policies decide it:
- `ConformalPolicy` (used whenever the model file carries a calibration, which `binsight export` writes):
  `mismatch` when the recorded count is outside the model's conformal prediction set at level `alpha`,
  `review` when outside it at `review_alpha`, else `ok`. On correct records the share flagged
  `mismatch` is at most `alpha` (and `review` or worse at most `review_alpha`): a guarantee, see
  `conformal.py`.
- `VerdictThresholds`, fixed cut-offs on P(count == recorded), for models without a calibration:
  above `ok_above` the bin passes; below `mismatch_below` it is a mismatch; in between, review. Their
  false-alarm rate depends on the model and is not known in advance.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

import numpy as np
from pydantic import BaseModel, Field, model_validator

from binsight.inference.conformal import Calibration

OK, MISMATCH, REVIEW = "ok", "mismatch", "review"
# The one place the default levels live; the server, the audit and batch runs take them from here.
ALPHA, REVIEW_ALPHA = 0.05, 0.2
OK_ABOVE, MISMATCH_BELOW = 0.5, 0.1


@dataclass(frozen=True)
class VerdictThresholds:
    ok_above: float = OK_ABOVE
    mismatch_below: float = MISMATCH_BELOW

    def __post_init__(self) -> None:
        if not 0.0 <= self.mismatch_below <= self.ok_above <= 1.0:
            raise ValueError("need 0 <= mismatch_below <= ok_above <= 1")

    basis = "fixed thresholds on P(recorded count)"

    def decide(self, probabilities: np.ndarray, count: int) -> tuple[str, float | None]:
        p_expected = p_of_count(probabilities, count)
        if p_expected >= self.ok_above:
            return OK, None
        return (MISMATCH if p_expected < self.mismatch_below else REVIEW), None


@dataclass(frozen=True)
class ConformalPolicy:
    calibration: Calibration
    alpha: float = ALPHA
    review_alpha: float = REVIEW_ALPHA

    def __post_init__(self) -> None:
        if not 0.0 < self.alpha <= self.review_alpha < 1.0:
            raise ValueError("need 0 < alpha <= review_alpha < 1")

    @property
    def basis(self) -> str:
        return f"conformal, alpha {self.alpha:g} (mismatch) / {self.review_alpha:g} (review)"

    def decide(self, probabilities: np.ndarray, count: int) -> tuple[str, float | None]:
        p_value = self.calibration.p_value(probabilities, count)
        if p_value <= self.alpha:
            return MISMATCH, p_value
        return (REVIEW if p_value <= self.review_alpha else OK), p_value


VerdictPolicy = VerdictThresholds | ConformalPolicy


def policy_for(
    calibration_json: str | None,
    thresholds: VerdictThresholds,
    alpha: float = ALPHA,
    review_alpha: float = REVIEW_ALPHA,
) -> VerdictPolicy:
    """The conformal policy when the model carries a calibration, else the fixed thresholds."""
    if not calibration_json:
        return thresholds
    return ConformalPolicy(Calibration.from_json(calibration_json), alpha, review_alpha)


class VerdictSettings(BaseModel):
    """The verdict levels a user sets (`binsight serve`, `audit`, batch runs): one definition, with
    the flags' help, that each command's config inherits."""

    alpha: float = Field(
        ALPHA,
        gt=0.0,
        lt=1.0,
        description="calibrated models: mismatch when the record is outside the conformal prediction set "
        "at this level; at most this share of correct records is flagged",
    )
    review_alpha: float = Field(REVIEW_ALPHA, gt=0.0, lt=1.0, description="calibrated models: review level")
    ok_above: float = Field(
        OK_ABOVE, ge=0.0, le=1.0, description="uncalibrated models: P(recorded) above which ok"
    )
    mismatch_below: float = Field(
        MISMATCH_BELOW, ge=0.0, le=1.0, description="uncalibrated models: P(recorded) below which mismatch"
    )

    @model_validator(mode="after")
    def _ordered(self) -> VerdictSettings:
        if self.alpha > self.review_alpha:
            raise ValueError("alpha (mismatch) must be at most review_alpha")
        if self.mismatch_below > self.ok_above:
            raise ValueError("mismatch_below must be at most ok_above")
        return self

    def policy(self, calibration_json: str | None) -> VerdictPolicy:
        """Conformal when the model carries a calibration, else the fixed thresholds."""
        thresholds = VerdictThresholds(self.ok_above, self.mismatch_below)
        return policy_for(calibration_json, thresholds, self.alpha, self.review_alpha)


@dataclass(frozen=True)
class Verdict:
    expected_count: int
    p_expected: float
    predicted_count: int
    verdict: str
    p_record_wrong: float  # what the audit ranks bins by
    p_value: float | None = None  # conformal p-value of the record (None under fixed thresholds)

    @property
    def agrees(self) -> bool:
        return self.predicted_count == self.expected_count


def p_of_count(probabilities: np.ndarray, count: int) -> float:
    """P(count); a recorded count beyond the model's classes gets the top class's mass, which reads
    as "that many or more" for a model whose last class absorbed larger counts."""
    if count < 0:
        return 0.0
    return float(probabilities[min(count, len(probabilities) - 1)])


# How a wrong record differs from the count in the bin, as the audit assumes (and its evaluation
# simulates, `audit.evaluation.simulate_errors`): by one three times in four, by two otherwise, and a
# small share farther, so that a blatant error (an empty bin recorded as 5) still ranks near the top.
ERROR_SIZE_SHARES = {1: 0.75, 2: 0.25}
FARTHER_ERROR_SHARE = 0.02
# The share of records assumed wrong before looking at the photo; it scales P(record wrong), never
# the order of the bins.
RECORD_ERROR_RATE = 0.1


@cache  # judged once per bin in batch runs and requests: built once per number of classes
def _wrong_record_given_count(classes: int) -> np.ndarray:
    """(count, record): P(the record reads `record` | the bin holds `count`, the record is wrong);
    read-only, since every caller shares it."""
    distance = np.abs(np.subtract.outer(np.arange(classes), np.arange(classes)))
    shares = np.full(distance.shape, FARTHER_ERROR_SHARE)
    for size, share in ERROR_SIZE_SHARES.items():
        shares[distance == size] = share
    shares[distance == 0] = 0.0
    totals = shares.sum(axis=1, keepdims=True)
    normalised: np.ndarray = np.divide(shares, totals, out=np.zeros_like(shares), where=totals > 0)
    normalised.flags.writeable = False
    return normalised


def p_record_wrong(
    probabilities: np.ndarray, recorded: np.ndarray | int, error_rate: float = RECORD_ERROR_RATE
) -> np.ndarray:
    """P(record wrong | photo, record) per bin, by Bayes: right with weight (1 - rate) P(count ==
    record), wrong with weight rate * sum over other counts c of P(count == c) P(record | c, wrong).

    1 - P(record) treats every other count as an equally likely truth; inventory goes wrong by one
    or two, so a photo whose doubt sits next to the record is the likelier error (measured on real
    photos: docs/benchmarks.md, eleventh round). A record beyond the model's classes is judged
    as its top class, as `p_of_count` does; a negative one is wrong."""
    probabilities = np.atleast_2d(np.asarray(probabilities, dtype=np.float64))
    recorded = np.atleast_1d(np.asarray(recorded, dtype=np.int64))
    classes = probabilities.shape[1]
    column = np.clip(recorded, 0, classes - 1)
    rows = np.arange(len(recorded))
    right = (1 - error_rate) * probabilities[rows, column]
    wrong = error_rate * (probabilities * _wrong_record_given_count(classes)[:, column].T).sum(axis=1)
    total = right + wrong
    posterior = np.divide(wrong, total, out=np.ones_like(total), where=total > 0)
    return np.where(recorded < 0, 1.0, posterior)


def judge(
    probabilities: np.ndarray,
    expected_count: int,
    policy: VerdictPolicy,
    error_rate: float = RECORD_ERROR_RATE,
) -> Verdict:
    verdict, p_value = policy.decide(probabilities, expected_count)
    return Verdict(
        expected_count,
        p_of_count(probabilities, expected_count),
        int(np.argmax(probabilities)),
        verdict,
        float(p_record_wrong(probabilities, expected_count, error_rate)[0]),
        p_value,
    )
