"""Conformal verdicts: the false-alarm guarantee holds on exchangeable data, per recorded count, for a
good model and a bad one; the calibration travels in the model file."""

from __future__ import annotations

import numpy as np
import pytest

from binsight.inference.conformal import Calibration
from binsight.inference.verdict import (
    MISMATCH,
    OK,
    REVIEW,
    ConformalPolicy,
    VerdictThresholds,
    judge,
    policy_for,
)

CLASSES = (0, 1, 2, 3, 4, 5)


def simulated(n: int, sharpness: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Photos' probabilities and true counts; harder (flatter) for larger counts, as in real bins."""
    rng = np.random.default_rng(seed)
    truth = rng.integers(0, len(CLASSES), n)
    logits = rng.normal(size=(n, len(CLASSES)))
    logits[np.arange(n), truth] += sharpness / (1 + truth)
    probabilities = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    return probabilities, truth


@pytest.mark.parametrize("sharpness", [6.0, 0.5], ids=["good-model", "weak-model"])
def test_false_alarms_on_correct_records_stay_under_alpha_for_every_count(sharpness: float) -> None:
    probabilities, truth = simulated(12_000, sharpness, seed=1)
    calibration = Calibration.fit(probabilities[:6000], truth[:6000], CLASSES)
    test_probs, test_truth = probabilities[6000:], truth[6000:]
    p_values = np.array([calibration.p_value(p, int(t)) for p, t in zip(test_probs, test_truth, strict=True)])
    for alpha in (0.05, 0.1, 0.2):
        for count in CLASSES:
            mine = test_truth == count
            observed = float((p_values[mine] <= alpha).mean())
            # Four standard errors of the test sample and of the calibration sample (the guarantee holds
            # on average over calibration sets; any one set moves the rate by about that much).
            n_cal = len(calibration.scores[count])
            slack = 4 * np.sqrt(alpha * (1 - alpha) * (1 / mine.sum() + 1 / n_cal))
            assert observed <= alpha + slack, (alpha, count, observed)
            assert observed >= alpha - slack - 1 / mine.sum(), "the test should be tight, not trivially safe"


def test_wrong_records_are_caught_and_the_weak_model_flags_less() -> None:
    rates = {}
    for name, sharpness in (("good", 6.0), ("weak", 0.5)):
        probabilities, truth = simulated(6000, sharpness, seed=2)
        calibration = Calibration.fit(probabilities[:3000], truth[:3000], CLASSES)
        policy = ConformalPolicy(calibration, alpha=0.05, review_alpha=0.2)
        wrong = (truth[3000:] + 1) % len(CLASSES)
        verdicts = [
            judge(p, int(r), policy).verdict for p, r in zip(probabilities[3000:], wrong, strict=True)
        ]
        rates[name] = np.mean([v == MISMATCH for v in verdicts])
        set_sizes = [len(calibration.prediction_set(p, 0.05)) for p in probabilities[3000:]]
        rates[name + "_set"] = float(np.mean(set_sizes))
    assert rates["good"] > 0.6 and rates["weak"] < rates["good"] / 2, rates
    assert rates["good_set"] < rates["weak_set"]  # an unsure model answers with larger sets


def test_calibration_round_trips_and_small_classes_never_flag() -> None:
    probabilities, truth = simulated(400, 3.0, seed=3)
    truth[truth == 5] = 4  # nobody in the calibration holds 5 items ...
    truth[:5] = 5  # ... except five bins
    calibration = Calibration.fit(probabilities, truth, CLASSES, "unit test")
    again = Calibration.from_json(calibration.to_json())
    assert again.sizes() == calibration.sizes() and again.source == "unit test"
    sample = probabilities[100]
    assert again.p_value(sample, 2) == pytest.approx(calibration.p_value(sample, 2), abs=1e-9)
    # With 5 calibration bins, the smallest p-value is 1/6: such a record cannot be flagged at 0.05.
    hopeless = np.array([0.99, 0.002, 0.002, 0.002, 0.002, 0.002])
    assert calibration.p_value(hopeless, 5) == pytest.approx(1 / 6)
    assert judge(hopeless, 5, ConformalPolicy(calibration, 0.05, 0.2)).verdict == REVIEW
    assert judge(hopeless, 50, ConformalPolicy(calibration, 0.05, 0.2)).verdict == REVIEW  # "5 or more"


def test_policy_falls_back_to_fixed_thresholds_without_a_calibration() -> None:
    thresholds = VerdictThresholds(0.5, 0.1)
    assert policy_for(None, thresholds) is thresholds
    verdict = judge(np.array([0.7, 0.3]), 0, thresholds)
    assert verdict.verdict == OK and verdict.p_value is None
    with pytest.raises(ValueError, match="alpha"):
        ConformalPolicy(Calibration.fit(np.eye(2), np.arange(2), (0, 1)), alpha=0.3, review_alpha=0.1)
