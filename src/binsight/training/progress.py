"""Where a run stands between epochs, and the checkpoints that carry it: `last.pt` with everything a
resumed run needs to continue exactly, `best.pt` with the best epoch's model."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from binsight.errors import BinsightError
from binsight.models.heads import CountingModel
from binsight.training.averaging import WeightAverage
from binsight.training.checkpoint import (
    Checkpoint,
    epochs_finished,
    load_checkpoint,
    restore_rng_state,
    save_checkpoint,
)
from binsight.training.config import TrainConfig
from binsight.training.distributed import DistContext
from binsight.training.hardware import Precision
from binsight.training.metrics import CountingMetrics, Metric
from binsight.training.monitors import Monitors
from binsight.training.results import BestEpoch, EpochRecord
from binsight.utils.storage import Store

log = logging.getLogger(__name__)

# Settings that may change between a checkpoint and its resumption without changing the experiment.
RESUMABLE_CHANGES = {
    "out",
    "checkpoint_dir",
    "epochs",
    "stop_after",
    "workers",
    "early_stopping",
    "device",
    "profile_steps",
    "tensorboard",
    "cache",
    "fresh",
}


def _check_resumable(saved: dict[str, Any], config: TrainConfig) -> None:
    current = config.model_dump(mode="json")
    changed = sorted(k for k, v in saved.items() if k not in RESUMABLE_CHANGES and current.get(k) != v)
    if changed:
        raise BinsightError(
            f"{config.out} holds a run with different settings ({', '.join(changed)})",
            hint="use a new --out for a new experiment, or --fresh to overwrite this one",
        )


@dataclass
class Progress:
    """Where a run stands between epochs: what a checkpoint saves and a resumed run restores."""

    history: list[EpochRecord]
    best: BestEpoch
    stale_epochs: int = 0
    start_epoch: int = 0

    def record(self, epoch: int, value: float, metric: Metric, keep_last: bool = False) -> bool:
        """Take one epoch's validation value; True when it is the best so far (with `keep_last`, every
        epoch is: the last one is kept)."""
        if keep_last or metric.improves(value, self.best.value):
            self.best, self.stale_epochs = BestEpoch(epoch=epoch + 1, value=value, metric=metric), 0
            return True
        self.stale_epochs += 1
        return False

    def stopped_early(self, patience: int | None) -> bool:
        return self.best.epoch is not None and bool(patience) and self.stale_epochs >= (patience or 0)


def resume(
    last_path: Path,
    config: TrainConfig,
    context: DistContext,
    model: CountingModel,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    precision: Precision,
    monitors: Monitors,
    average: WeightAverage | None = None,
) -> Progress:
    """Restore everything `last.pt` holds, so the run continues as if it had never stopped."""
    state = load_checkpoint(last_path)
    _check_resumable(state["config"], config)
    if average is not None and "trained_model" in state:
        model.load_state_dict(state["trained_model"])
        average.restore(state["model"], state["average_updates"])  # type: ignore[arg-type]
    else:
        model.load_state_dict(state["model"])
        if average is not None:
            # A run begun before its recipe averaged weights (binsight older than --average-decay):
            # the average starts from where the run stands.
            average.restore(state["model"], 0)  # type: ignore[arg-type]
            log.warning("%s holds no weight average: the average starts at this epoch", last_path)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    precision.scaler.load_state_dict(state["scaler"])
    monitors.load_state_dict(state["monitors"])
    progress = Progress(
        history=[EpochRecord.model_validate(h) for h in state["history"]],
        best=BestEpoch.model_validate({**state["best"], "metric": config.select_metric}),
        stale_epochs=state["stale_epochs"],
        start_epoch=epochs_finished(state),
    )
    restore_rng_state(state["rng"][min(context.rank, len(state["rng"]) - 1)])
    log.info("resumed %s at epoch %d of %d", last_path, progress.start_epoch + 1, config.epochs)
    return progress


def save_checkpoints(
    out: Path,
    remote: Store | None,
    checkpoint: Checkpoint,
    training_state: Checkpoint,
    best_metrics: CountingMetrics | None,
) -> None:
    """`best.pt` when the epoch improved (`best_metrics` given), `last.pt` always (with what resuming
    needs), and their copies where they outlive the machine."""
    best_path, last_path = out / "best.pt", out / "last.pt"
    if best_metrics is not None:
        save_checkpoint(best_path, {**checkpoint, "val_metrics": best_metrics.model_dump()})
    save_checkpoint(last_path, {**checkpoint, **training_state})
    if remote is not None:
        # best first: a resumed run never finds a last.pt newer than the best.pt beside it.
        if best_metrics is not None:
            remote.put_file("best.pt", best_path)
        remote.put_file("last.pt", last_path)


def fetch_remote_checkpoints(remote: Store, out: Path) -> None:
    """A new machine for a preempted run: bring its checkpoints home, so it resumes where it stopped."""
    present = set(remote.list(""))
    if "last.pt" not in present:
        return
    for name in ("best.pt", "last.pt"):
        if name in present:
            remote.get_file(name, out / name)
    log.info("fetched the checkpoints of %s into %s", remote.url, out)
