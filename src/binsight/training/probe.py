"""A head that starts as a linear probe (LP-FT, Kumar et al., ICLR 2022).

A new head starts random, and its first steps of fine-tuning send large, random gradients into the
pretrained backbone. Fitted first on the frozen backbone's features of the training photos, the head
starts where a linear model on those features is best, and fine-tuning then moves the backbone less.
On real ABID photos, three seeds with it scored below three without on validation (0.504 against 0.513
on counts 1-5; docs/benchmarks.md, "Seventh round"), so no recipe uses it.

The features come from the same cache as `--train-on-cache` (computed once per backbone, input and
photos, then reused by every seed); the probe is the head itself, fitted by L-BFGS on the run's own
objective (class weights, ranked probability score and teachers included) plus an L2 penalty on its
weights, whose strength is chosen on the validation photos.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import numpy as np
import torch

from binsight.models.heads import CountHead, CountingModel
from binsight.training.cached import pooled_features, split_backbone
from binsight.training.config import TrainConfig
from binsight.training.hardware import Precision
from binsight.training.metrics import Metric, counting_metrics
from binsight.training.objective import Objective

log = logging.getLogger(__name__)

# Strengths of the L2 penalty tried, per unit of the mean loss. On 2.7k real photos and Lite0's 1,280
# features the best lay at 0.03-0.1 (a weaker probe overfits: 80% training accuracy at 1e-3, 40% val).
L2_GRID = (1e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0)


def _fit(head: CountHead, training_loss: Callable[[], torch.Tensor], l2: float) -> None:
    """Minimise the head's training loss plus `l2` times its squared weights, by L-BFGS (a convex
    problem for a linear head: a few hundred full-batch steps, seconds on a CPU)."""
    lbfgs = torch.optim.LBFGS(
        [p for p in head.parameters() if p.requires_grad],
        lr=1.0,
        max_iter=500,
        history_size=20,
        line_search_fn="strong_wolfe",
    )

    def closure() -> torch.Tensor:
        lbfgs.zero_grad()
        loss = training_loss() + l2 * head.fc.weight.square().sum()
        loss.backward()  # type: ignore[no-untyped-call]  # untyped in torch
        return loss

    lbfgs.step(closure)  # type: ignore[no-untyped-call]  # torch leaves LBFGS.step unannotated


def _score(metric: Metric, counts: np.ndarray, probabilities: np.ndarray, loss: float) -> float:
    if metric == Metric.LOSS:
        return loss
    return float(getattr(counting_metrics(counts, probabilities), metric.value))


def start_from_probe(
    config: TrainConfig,
    model: CountingModel,
    train_rows: list[dict[str, str]],
    val_rows: list[dict[str, str]],
    num_classes: int,
    objective: Objective,
) -> None:
    """Set `model.head` to the linear probe of `objective` (the loss the run will train on) whose L2
    strength scores best on validation by the run's selection metric (each strength's fit is logged).
    The model must be on the CPU, where the cache is."""
    started = time.perf_counter()
    backbone = split_backbone(model.backbone)
    precision = Precision(config, torch.device("cpu"))
    was_training = model.training
    model.eval()  # BatchNorm's running statistics and dropout as a served model has them
    features = {
        split: pooled_features(config, backbone, split, rows, precision)
        for split, rows in (("train", train_rows), ("val", val_rows))
    }
    val_counts = np.array([int(r["count"]) for r in val_rows], dtype=np.int64)
    targets = {
        "train": torch.tensor([min(int(r["count"]), num_classes - 1) for r in train_rows]),
        "val": torch.from_numpy(np.minimum(val_counts, num_classes - 1)),
    }
    head = model.head
    start = {name: value.clone() for name, value in head.state_dict().items()}
    start["fc.weight"].zero_()

    train_positions = torch.arange(len(train_rows))  # the teachers' answers are looked up by row

    def training_loss() -> torch.Tensor:
        return objective(head(features["train"]), targets["train"], train_positions)

    best = None
    for l2 in sorted(L2_GRID, reverse=True):  # strongest first: a tie keeps the simpler probe
        head.load_state_dict(start)
        _fit(head, training_loss, l2)
        with torch.no_grad():
            train_accuracy = float(
                (head.probabilities(head(features["train"])).argmax(1) == targets["train"]).float().mean()
            )
            outputs = head(features["val"])
            val_loss = float(
                head.loss(outputs, targets["val"], config.label_smoothing)
            )  # as validation has it
            score = _score(config.select_metric, val_counts, head.probabilities(outputs).numpy(), val_loss)
        log.info(
            "linear probe, L2 %g: train accuracy %.3f, val %s %.4f",
            l2,
            train_accuracy,
            config.select_metric.value,
            score,
        )
        if best is None or config.select_metric.improves(score, best[0]):
            best = (score, {name: value.clone() for name, value in head.state_dict().items()}, l2)
    assert best is not None
    head.load_state_dict(best[1])
    model.train(was_training)
    log.info(
        "the head starts as the linear probe with L2 %g (val %s %.4f; %.0f s)",
        best[2],
        config.select_metric.value,
        best[0],
        time.perf_counter() - started,
    )
