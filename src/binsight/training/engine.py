"""A training run: data, model and optimiser set up, resumed where a checkpoint says, then epochs of
training and validation (`loop.py`) with checkpoints, history and monitors after each."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DistributedSampler

from binsight.data.split import fingerprint, load_split
from binsight.errors import BinsightError
from binsight.models.factory import build_model
from binsight.models.heads import CountingModel
from binsight.training.averaging import WeightAverage
from binsight.training.cached import CachedTrainer
from binsight.training.checkpoint import CHECKPOINT_FORMAT, Checkpoint, JsonObject, rng_state
from binsight.training.config import TrainConfig
from binsight.training.data import Loader, build_datasets, make_loader
from binsight.training.distributed import (
    DistContext,
    gather_objects,
    init_distributed,
    shutdown_distributed,
)
from binsight.training.hardware import Precision, resolve_device, wants_channels_last
from binsight.training.loop import predict, train_one_epoch
from binsight.training.metrics import CountingMetrics, counting_metrics, majority_baseline
from binsight.training.monitors import Monitors
from binsight.training.objective import Objective, build_objective
from binsight.training.optim import build_optimizer, build_scheduler
from binsight.training.probe import start_from_probe
from binsight.training.profiling import make_profiler, write_profile_summary
from binsight.training.progress import Progress, fetch_remote_checkpoints, resume, save_checkpoints
from binsight.training.results import BestEpoch, EpochRecord, EpochStats, TrainSummary, model_card
from binsight.training.teachers import teacher_probabilities
from binsight.utils.io import atomic_write_json, exclusive_folder
from binsight.utils.plots import history_curves
from binsight.utils.storage import Store, open_store

if TYPE_CHECKING:
    from torch.utils.tensorboard import SummaryWriter

log = logging.getLogger(__name__)


def stream_seed(*parts: int) -> int:
    """A seed for one (seed, rank, epoch) stream. Arithmetic like seed*1000 + epoch*10 + rank collides
    (rank 10 of epoch 0 is rank 0 of epoch 1); NumPy's SeedSequence hashes the parts instead."""
    return int(np.random.SeedSequence(list(parts)).generate_state(1, dtype=np.uint64)[0] >> 1)


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


@dataclass
class _Run:
    """What one training run holds from its set-up to its summary."""

    config: TrainConfig
    context: DistContext
    device: torch.device
    out: Path
    train_rows: list[dict[str, str]]
    val_rows: list[dict[str, str]]
    num_classes: int
    model: CountingModel  # the model itself, under any DDP wrapper
    trained: nn.Module  # what the optimiser steps: the model, or its DDP wrapper
    channels_last: bool
    precision: Precision
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    objective: Objective
    monitors: Monitors
    cached: CachedTrainer | None
    loaders: tuple[Loader, Loader] | None  # train, val; None when training on cached features
    progress: Progress
    fingerprints: tuple[str, str]  # of the train and val splits, for the checkpoints and the card
    card: JsonObject  # the model card every checkpoint carries
    average: WeightAverage | None = None  # validated, kept and exported instead of `model` when set
    remote: Store | None = None
    writer: SummaryWriter | None = None

    @property
    def train_counts(self) -> np.ndarray:
        return np.array([int(r["count"]) for r in self.train_rows])

    @property
    def kept(self) -> CountingModel:
        """The weights validated, kept in `best.pt` and exported."""
        return self.model if self.average is None else self.average.module  # type: ignore[return-value]


def _train(
    config: TrainConfig,
    context: DistContext,
    on_epoch_end: Callable[[EpochRecord], None] | None,
) -> TrainSummary:
    run = _build(config, context)
    _restore(run)
    for epoch in range(run.progress.start_epoch, config.stop_after or config.epochs):
        if run.progress.stopped_early(config.early_stopping):
            break
        stats, probabilities, val_loss, val_counts = _fit_epoch(run, epoch)
        record, metrics, improved = _record(run, epoch, stats, probabilities, val_loss, val_counts)
        _save(run, epoch, record, metrics if improved else None)
        if on_epoch_end is not None:
            on_epoch_end(record)
    return _finish(run)


def _build(config: TrainConfig, context: DistContext) -> _Run:
    """Data, model, optimiser, schedule and objective, as the config says."""
    device = resolve_device(config.device, context)
    data_dir = Path(config.data)
    train_rows, val_rows = load_split(data_dir, "train"), load_split(data_dir, "val")
    if config.refit:
        train_rows = train_rows + val_rows
    train_counts = np.array([int(r["count"]) for r in train_rows])
    num_classes = config.num_classes or int(train_counts.max()) + 1
    clipped_counts = np.minimum(train_counts, num_classes - 1)

    torch.manual_seed(config.seed if config.init_seed is None else config.init_seed)
    np.random.seed(config.seed)
    model = build_model(
        config.arch,
        config.head,
        num_classes,
        config.pretrained,
        config.weights,
        config.dropout,
        config.input_hw,
    )
    model.head.start_from_prior(torch.bincount(torch.from_numpy(clipped_counts), minlength=num_classes))
    # A run resuming from a local last.pt starts from its checkpoint's head (one fetched from
    # --checkpoint-dir is only seen later, in _restore, and overwrites the probe there).
    if config.probe_start and context.is_main and not _resumes(config):
        # The other ranks receive the probe from DDP, which broadcasts rank 0's weights as it wraps.
        start_from_probe(config, model, train_rows, val_rows, num_classes)
    model = model.to(device)
    channels_last = wants_channels_last(config, device) and not config.train_on_cache
    if channels_last:
        model = model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]  # torch's stub omits it
    precision = Precision(config, device)

    cached, loaders = None, None
    if config.train_on_cache:
        if context.enabled or device.type != "cpu":
            raise BinsightError(
                "--train-on-cache runs in one CPU process", hint="run it without torchrun, with --device cpu"
            )
        cached = CachedTrainer(config, model, train_rows, val_rows, num_classes, precision)
        steps_per_epoch = cached.steps_per_epoch
    else:
        train_set, val_set = build_datasets(config, context, train_rows, val_rows, num_classes)
        pin = device.type == "cuda"
        loaders = (
            make_loader(
                train_set, config.batch_size, True, config.workers, config.seed, context.enabled, pin
            ),
            make_loader(val_set, config.batch_size, False, config.workers, config.seed, context.enabled, pin),
        )
        steps_per_epoch = min(len(loaders[0]), config.max_train_batches or len(loaders[0]))

    trained: nn.Module = model
    if context.enabled:
        trained = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    optimizer = build_optimizer(trained, config)
    average = None
    if config.average_decay is not None:
        average = WeightAverage(model, config.average_decay)
        # A hook rather than a call in each loop: it runs only when the step did (an fp16 scaler skips
        # steps whose gradients overflowed), in the image loop and the cached one alike.
        optimizer.register_step_post_hook(lambda *_: average.update(model))
    teacher = (
        teacher_probabilities(
            config.teachers, data_dir, train_rows, Path(config.out), str(device), config.workers
        )
        if config.teachers and config.distill > 0
        else None
    )
    fingerprints = (fingerprint(train_rows), fingerprint(val_rows))
    monitors = Monitors()
    monitors.check_class_balance(np.bincount(clipped_counts, minlength=num_classes))
    return _Run(
        config=config,
        context=context,
        device=device,
        out=Path(config.out),
        train_rows=train_rows,
        val_rows=val_rows,
        num_classes=num_classes,
        model=model,
        trained=trained,
        channels_last=channels_last,
        precision=precision,
        optimizer=optimizer,
        scheduler=build_scheduler(optimizer, config, steps_per_epoch),
        objective=build_objective(config, model.head, clipped_counts, num_classes, teacher),
        monitors=monitors,
        cached=cached,
        loaders=loaders,
        progress=Progress(history=[], best=BestEpoch(metric=config.select_metric)),
        fingerprints=fingerprints,
        card=model_card(config, num_classes, *fingerprints).model_dump(mode="json"),
        average=average,
    )


def _resumes(config: TrainConfig) -> bool:
    """Whether the run continues from the last.pt in its folder."""
    return (Path(config.out) / "last.pt").exists() and not config.fresh


def _restore(run: _Run) -> None:
    """Resume from `last.pt` (fetched from the checkpoint store on a new machine) unless told not to;
    open the run's folder, TensorBoard writer and log line."""
    config, context, out = run.config, run.context, run.out
    last_path = out / "last.pt"
    run.remote = open_store(config.checkpoint_dir) if config.checkpoint_dir else None
    if run.remote is not None and not config.fresh and not last_path.exists():
        fetch_remote_checkpoints(run.remote, out)
    # Per-rank stream for dropout and augmentation; a resumed run replaces it with the saved state.
    torch.manual_seed(stream_seed(config.seed, context.rank))
    if _resumes(config):
        run.progress = resume(
            last_path,
            config,
            context,
            run.model,
            run.optimizer,
            run.scheduler,
            run.precision,
            run.monitors,
            run.average,
        )
    elif context.is_main:
        out.mkdir(parents=True, exist_ok=True)
    if not context.is_main:
        return
    if config.tensorboard:
        from torch.utils.tensorboard import SummaryWriter

        run.writer = SummaryWriter(str(out / "tensorboard"), purge_step=run.progress.start_epoch)
    atomic_write_json(out / "config.json", config.model_dump(mode="json"))
    log.info(
        "training %s/%s on %s: %d train, %d val images, %d classes, world size %d",
        config.arch,
        config.head,
        run.device,
        len(run.train_rows),
        len(run.val_rows),
        run.num_classes,
        context.world_size,
    )
    if config.refit:
        log.info(
            "refit: the %d validation photos train too, so their figures below are fit, not accuracy; "
            "epoch %d of the %d-epoch schedule is kept: judge it on the test split",
            len(run.val_rows),
            config.stop_after or config.epochs,
            config.epochs,
        )


def _fit_epoch(run: _Run, epoch: int) -> tuple[EpochStats, np.ndarray, float, np.ndarray]:
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
    run: _Run,
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


def _save(run: _Run, epoch: int, record: EpochRecord, best_metrics: CountingMetrics | None) -> None:
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


def _finish(run: _Run) -> TrainSummary:
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
