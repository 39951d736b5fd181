import math

import numpy as np
import pytest
import torch

from binsight.models.heads import CountHead
from binsight.training.metrics import counting_metrics, expected_calibration_error, majority_baseline
from binsight.training.monitors import Monitors, MonitorSettings


def one_hot_probs(predictions: list[int], num_classes: int, confidence: float = 1.0) -> np.ndarray:
    probs = np.full((len(predictions), num_classes), (1 - confidence) / (num_classes - 1))
    probs[np.arange(len(predictions)), predictions] = confidence
    return probs


def test_metrics_match_hand_computation() -> None:
    targets = np.array([0, 1, 2, 3, 3])
    predictions = [0, 2, 2, 1, 3]  # errors: 0, +1, 0, -2, 0
    m = counting_metrics(targets, one_hot_probs(predictions, 4)).model_dump(by_alias=True)
    assert m["accuracy"] == pytest.approx(3 / 5)
    assert m["off_by_one_accuracy"] == pytest.approx(4 / 5)
    assert m["mae"] == pytest.approx(3 / 5)
    assert m["rmse"] == pytest.approx(math.sqrt(5 / 5))
    assert m["confusion_matrix"] == [[1, 0, 0, 0], [0, 0, 1, 0], [0, 0, 1, 0], [0, 1, 0, 1]]
    assert m["per_class"]["2"] == {"support": 1, "precision": 0.5, "recall": 1.0}
    assert m["per_class"]["1"] == {"support": 1, "precision": 0.0, "recall": 0.0}
    assert m["per_class"]["3"]["recall"] == 0.5
    assert m["ece"] == pytest.approx(2 / 5)  # all confidence 1.0, accuracy 0.6


def test_ece_by_hand() -> None:
    probs = np.array([[0.9, 0.1], [0.9, 0.1], [0.6, 0.4], [0.6, 0.4]])
    targets = np.array([0, 1, 0, 0])
    # bin (0.8,0.867]: conf .9 acc .5 -> |.4| * 2/4 ; bin (0.533,0.6]: conf .6 acc 1 -> |.4| * 2/4
    assert expected_calibration_error(probs, targets) == pytest.approx(0.4)


def test_majority_baseline() -> None:
    assert majority_baseline(np.array([2, 2, 3]), np.array([2, 3, 3, 2])) == 0.5


@pytest.mark.parametrize("kind", ["classification", "ordinal", "regression"])
def test_heads_give_probability_distributions(kind: str) -> None:
    torch.manual_seed(0)
    head = CountHead(kind, 8, 6).eval()
    outputs = head(torch.randn(5, 8) * 3)
    probs = head.probabilities(outputs)
    assert probs.shape == (5, 6)
    assert torch.all(probs >= 0)
    assert torch.allclose(probs.sum(1), torch.ones(5), atol=1e-5)
    targets = torch.tensor([0, 1, 2, 5, 3])
    per_image = head.loss(outputs, targets, reduction="none")
    assert per_image.shape == (5,)
    assert head.loss(outputs, targets).item() == pytest.approx(per_image.mean().item(), rel=1e-5)


def test_regression_probabilities_peak_at_the_rounded_count() -> None:
    head = CountHead("regression", 4, 6)
    probs = head.probabilities(torch.tensor([2.2, 4.8, -1.0]))
    assert probs.argmax(1).tolist() == [2, 5, 0]


def test_monitors_fire_once_each_with_reasons() -> None:
    monitors = Monitors(MonitorSettings(vanishing_steps=3, stall_epochs=2, overfit_epochs=2))
    monitors.check_class_balance(np.array([100, 5, 50]))
    monitors.check_gradient(float("nan"), epoch=0, step=1)
    monitors.check_gradient(5e3, epoch=0, step=2)  # same rule: reported once
    for step in range(3):
        monitors.check_gradient(1e-9, epoch=1, step=step)
    train = [1.0, 0.8, 0.6, 0.5, 0.4]
    val = [1.0, 0.9, 0.95, 1.0, 1.1]
    for epoch in range(len(train)):
        monitors.check_epoch(epoch, train[: epoch + 1], val[: epoch + 1])
    rules = [f.rule for f in monitors.findings]
    assert rules == ["class_imbalance", "exploding_gradient", "vanishing_gradient", "overfitting"]
    assert "20x" in monitors.findings[0].message

    stalled = Monitors(MonitorSettings(stall_epochs=2))
    for epoch, losses in enumerate([[1.0], [1.0, 0.999], [1.0, 0.999, 0.998]]):
        stalled.check_epoch(epoch, losses, [])
    assert [f.rule for f in stalled.findings] == ["loss_not_decreasing"]

    healthy = Monitors()
    healthy.check_class_balance(np.array([10, 12, 9]))
    for epoch, losses in enumerate([[1.0], [1.0, 0.7], [1.0, 0.7, 0.5], [1.0, 0.7, 0.5, 0.4]]):
        healthy.check_gradient(1.5, epoch, 0)
        healthy.check_epoch(epoch, losses, [x + 0.05 for x in losses])
    assert healthy.findings == []

    restored = Monitors()
    restored.load_state_dict(monitors.state_dict())
    assert [f.rule for f in restored.findings] == rules
