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
    p_record_wrong,
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


def test_p_record_wrong_is_bayes_over_how_records_go_wrong() -> None:
    probabilities = np.array([0.0, 0.1, 0.5, 0.3, 0.1, 0.0, 0.0])
    # By hand: a wrong record is 1 away 3 times in 4, 2 away otherwise, farther with share 0.02, each
    # normalised over the records a bin holding `count` could wrongly show.
    shares = {1: 0.75, 2: 0.25}

    def share(distance: int) -> float:
        return shares.get(distance, 0.02)

    def wrong_record_reads_2(count: int) -> float:
        return share(abs(2 - count)) / sum(share(abs(r - count)) for r in range(7) if r != count)

    wrong = 0.1 * sum(probabilities[c] * wrong_record_reads_2(c) for c in range(7) if c != 2)
    expected = wrong / (wrong + 0.9 * 0.5)
    assert p_record_wrong(probabilities, 2, 0.1)[0] == pytest.approx(expected, rel=1e-9)

    # At equal P(record), doubt next to the record is the likelier miscount than doubt far from it.
    near = np.array([0.0, 0.4, 0.6, 0.0, 0.0, 0.0, 0.0])
    far = np.array([0.0, 0.4, 0.0, 0.0, 0.0, 0.6, 0.0])
    scores = p_record_wrong(np.stack([near, far]), np.array([1, 1]))
    assert scores[0] > 2 * scores[1]
    # A blatant error (the photo is sure the bin is empty, the record says 5) still outranks a
    # doubtful record whose doubt is a neighbour.
    blatant = np.array([0.995, 0.004, 0.0, 0.0, 0.0, 0.001, 0.0])
    doubtful = np.array([0.0, 0.0, 0.25, 0.5, 0.25, 0.0, 0.0])
    scores = p_record_wrong(np.stack([blatant, doubtful]), np.array([5, 3]))
    assert scores[0] > 0.5 > scores[1]
    # The prior scales the probability, never the order; a record past the classes is judged as the
    # top class ("6 or more"), a negative one is wrong; a sure photo agreeing with its record is right.
    many = simulated(200, 2.0, seed=4)[0]
    recorded = np.random.default_rng(4).integers(0, 6, 200)
    low, high = p_record_wrong(many, recorded, 0.02), p_record_wrong(many, recorded, 0.3)
    assert np.all(low < high) and (np.argsort(low, kind="stable") == np.argsort(high, kind="stable")).all()
    assert p_record_wrong(probabilities, 40)[0] == p_record_wrong(probabilities, 6)[0] == 1.0
    assert p_record_wrong(probabilities, -1)[0] == 1.0
    assert p_record_wrong(np.eye(7)[3], 3)[0] == 0.0


def test_ranking_by_p_record_wrong_catches_more_miscounts_than_one_minus_p_recorded() -> None:
    from binsight.audit.evaluation import catch_curve, simulate_errors

    probabilities, truth = simulated(12_000, 3.0, seed=5)
    recorded, is_error = simulate_errors(truth, 0.1, len(CLASSES), seed=5)
    budget = 1200  # re-check 10% of the bins
    by_record = catch_curve(1 - probabilities[np.arange(len(truth)), recorded], is_error)[1][budget - 1]
    by_posterior = catch_curve(p_record_wrong(probabilities, recorded), is_error)[1][budget - 1]
    assert by_posterior > by_record + 0.02, (by_posterior, by_record)
