"""A training run: set up and resumed (`build.py`), then epochs of training and validation (`loop.py`)
with checkpoints, history and monitors after each."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable

import numpy as np
from torch.utils.data import DistributedSampler

from binsight.training.build import Run, build_run, restore, stream_seed
from binsight.training.checkpoint import CHECKPOINT_FORMAT, Checkpoint, rng_state
from binsight.training.config import TrainConfig
from binsight.training.distributed import (
    DistContext,
    gather_objects,
    init_distributed,
    shutdown_distributed,
)
from binsight.training.hardware import resolve_device
from binsight.training.loop import predict, train_one_epoch
from binsight.training.metrics import CountingMetrics, counting_metrics, majority_baseline
from binsight.training.profiling import make_profiler, write_profile_summary
from binsight.training.progress import save_checkpoints
from binsight.training.results import EpochRecord, EpochStats, TrainSummary
from binsight.utils.io import exclusive_folder
from binsight.utils.plots import history_curves

log = logging.getLogger(__name__)


def train(config: TrainConfig, on_epoch_end: Callable[[EpochRecord], None] | None = None) -> TrainSummary:
    """Train, validate every epoch, keep the best model; returns the run summary.

    `on_epoch_end` sees each epoch's record after its checkpoint is saved; an exception it raises (a
    tuner pruning the trial, say) ends training there.
    """
    # The backend (NCCL or Gloo) depends only on the device type, known before the process group.
    context = init_distributed(resolve_device(config.device, DistContext()).type)
    if not context.is_main:
        logging.getLogger("binsight").setLevel(logging.WARNING)  # one voice in the log, not N
    try:
        if not context.is_main:
            return _train(config, context, on_epoch_end)
        with exclusive_folder(config.out, "training run"):
            return _train(config, context, on_epoch_end)
    finally:
        shutdown_distributed(context)


def _train(
    config: TrainConfig,
    context: DistContext,
    on_epoch_end: Callable[[EpochRecord], None] | None,
) -> TrainSummary:
    run = build_run(config, context)
    restore(run)
    for epoch in range(run.progress.start_epoch, config.stop_after or config.epochs):
        if run.progress.stopped_early(config.early_stopping):
            break
        stats, probabilities, val_loss, val_counts = _fit_epoch(run, epoch)
        record, metrics, improved = _record(run, epoch, stats, probabilities, val_loss, val_counts)
        _save(run, epoch, record, metrics if improved else None)
        if on_epoch_end is not None:
            on_epoch_end(record)
    return _finish(run)


def _fit_epoch(run: Run, epoch: int) -> tuple[EpochStats, np.ndarray, float, np.ndarray]:
    """One epoch of training, then validation: the epoch's stats, the validation photos' count
    probabilities, loss and true counts."""
    config, context = run.config, run.context
    if run.cached is not None:
        stats = run.cached.train_epoch(
            run.objective,
            run.optimizer,
            run.scheduler,
            run.monitors,
            epoch,
            stream_seed(config.seed, 0, epoch),
        )
        probabilities, val_loss = run.cached.validate(run.kept)
        return stats, probabilities, val_loss, run.cached.val_counts
    assert run.loaders is not None
    train_loader, val_loader = run.loaders
    if isinstance(train_loader.sampler, DistributedSampler):
        train_loader.sampler.set_epoch(epoch)
    train_loader.generator.manual_seed(stream_seed(config.seed, context.rank, epoch))
    profiler = None
    if config.profile_steps and epoch == run.progress.start_epoch and context.is_main:
        profiler = make_profiler(config, run.device, run.out)
        profiler.start()
    stats = train_one_epoch(
        run.trained,
        run.objective,
        train_loader,
        run.optimizer,
        run.scheduler,
        run.precision,
        run.device,
        config,
        run.monitors,
        epoch,
        context,
        profiler,
    )
    if profiler is not None:
        profiler.stop()
        write_profile_summary(profiler, run.out, stats)
    _, probabilities, val_loss = predict(
        run.trained if run.average is None else run.kept,
        run.model.head,
        val_loader,
        run.device,
        run.precision,
        context,
        run.channels_last,
        config.label_smoothing,
    )
    return stats, probabilities, val_loss, val_loader.dataset.counts  # type: ignore[attr-defined]


def _record(
    run: Run,
    epoch: int,
    stats: EpochStats,
    probabilities: np.ndarray,
    val_loss: float,
    val_counts: np.ndarray,
) -> tuple[EpochRecord, CountingMetrics, bool]:
    """The epoch's record in the history, the monitors' view of it, and whether it is the best yet."""
    config, progress = run.config, run.progress
    metrics = counting_metrics(val_counts, probabilities)
    record = EpochRecord(
        epoch=epoch + 1,
        **stats.model_dump(),
        val_loss=val_loss,
        lr=run.optimizer.param_groups[0]["lr"],
        **{
            f"val_{k}": getattr(metrics, k) for k in ("accuracy", "off_by_one_accuracy", "mae", "rmse", "ece")
        },
    )
    progress.history.append(record)
    run.monitors.check_epoch(
        epoch, [h.train_loss for h in progress.history], [h.val_loss for h in progress.history]
    )
    # A refit trained on its validation photos: nothing is chosen on them, the last epoch is kept.
    improved = progress.record(
        epoch, record.value(config.select_metric), config.select_metric, keep_last=config.refit
    )
    log.info(
        "epoch %d/%d: train loss %.4f, val loss %.4f, val acc %.3f, mae %.3f, %.1f img/s, data wait %.0f%%%s",
        epoch + 1,
        config.epochs,
        stats.train_loss,
        val_loss,
        metrics.accuracy,
        metrics.mae,
        stats.train_images_per_second,
        100 * stats.data_wait_fraction,
        " (best)" if improved else "",
    )
    return record, metrics, improved


def _save(run: Run, epoch: int, record: EpochRecord, best_metrics: CountingMetrics | None) -> None:
    """`last.pt` (and `best.pt` when the epoch improved), their remote copies, TensorBoard's scalars."""
    config, context, progress = run.config, run.context, run.progress
    rng_states = gather_objects(context, rng_state())  # every rank takes part; rank 0 writes
    if not context.is_main:
        return
    checkpoint = Checkpoint(
        config=config.model_dump(mode="json"),
        num_classes=run.num_classes,
        checkpoint_format=CHECKPOINT_FORMAT,
        epoch=epoch + 1,
        history=[h.model_dump() for h in progress.history],
        best=progress.best.model_dump(mode="json"),
        train_fingerprint=run.fingerprints[0],
        val_fingerprint=run.fingerprints[1],
        card=run.card,
        model=run.kept.state_dict(),
    )
    training_state = Checkpoint(
        optimizer=run.optimizer.state_dict(),
        scheduler=run.scheduler.state_dict(),
        scaler=run.precision.scaler.state_dict(),
        monitors=run.monitors.state_dict(),
        stale_epochs=progress.stale_epochs,
        rng=rng_states,
    )
    if run.average is not None:
        training_state["trained_model"] = run.model.state_dict()
        training_state["average_updates"] = run.average.updates
    save_checkpoints(run.out, run.remote, checkpoint, training_state, best_metrics)
    if run.writer is not None:
        for key, number in record.model_dump().items():
            if key != "epoch" and isinstance(number, float) and math.isfinite(number):
                run.writer.add_scalar(key.replace("_", "/", 1), number, epoch + 1)
        run.writer.flush()


def _finish(run: Run) -> TrainSummary:
    """The run's summary (`history.json`, curves), after checking every rank trained the same model."""
    context, progress = run.context, run.progress
    # DDP keeps replicas identical by construction; a mismatch means a rank diverged (e.g. a bug that
    # skipped an all-reduce) and the saved model is not what every rank trained.
    checksums = gather_objects(context, float(sum(p.detach().double().sum() for p in run.model.parameters())))
    in_sync = all(abs(c - checksums[0]) <= 1e-6 * max(1.0, abs(checksums[0])) for c in checksums)
    if not in_sync:
        log.error("model replicas diverged across ranks: parameter checksums %s", checksums)
    summary = TrainSummary(
        out=str(run.out),
        replicas_in_sync=in_sync,
        num_classes=run.num_classes,
        epochs_run=len(progress.history),
        best=progress.best,
        majority_baseline_val_accuracy=majority_baseline(
            run.train_counts, np.array([int(r["count"]) for r in run.val_rows])
        ),
        history=progress.history,
        findings=list(run.monitors.findings),
        world_size=context.world_size,
        device=str(run.device),
    )
    if context.is_main:
        if run.writer is not None:
            run.writer.close()
        summary.write(run.out / "history.json")
        history_curves([h.model_dump() for h in progress.history], run.out / "curves.png")
        log.info(
            "best %s %.4f at epoch %s; summary in %s",
            run.config.select_metric,
            progress.best.value,
            progress.best.epoch,
            run.out / "history.json",
        )
    return summary
