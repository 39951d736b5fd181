"""A training run: data, model and optimiser set up, resumed where a checkpoint says, then epochs of
training and validation (`loop.py`) with checkpoints, history and monitors after each."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DistributedSampler

from binsight.data.split import fingerprint, load_split
from binsight.errors import BinsightError
from binsight.models.factory import build_model
from binsight.training.cached import CachedTrainer
from binsight.training.checkpoint import (
    CHECKPOINT_FORMAT,
    rng_state,
)
from binsight.training.config import TrainConfig
from binsight.training.data import (
    build_datasets,
    make_loader,
)
from binsight.training.distributed import (
    DistContext,
    gather_objects,
    init_distributed,
    shutdown_distributed,
    unwrap,
)
from binsight.training.hardware import Precision, resolve_device, wants_channels_last
from binsight.training.loop import predict, train_one_epoch
from binsight.training.metrics import Metric, counting_metrics, majority_baseline
from binsight.training.monitors import Monitors
from binsight.training.objective import build_objective
from binsight.training.optim import build_optimizer, build_scheduler
from binsight.training.profiling import make_profiler, write_profile_summary
from binsight.training.progress import Progress, resume, save_checkpoints
from binsight.training.results import BestEpoch, EpochRecord, TrainSummary, model_card
from binsight.training.teachers import teacher_probabilities
from binsight.utils.io import atomic_write_json, exclusive_folder
from binsight.utils.plots import history_curves
from binsight.utils.storage import Store, open_store

log = logging.getLogger(__name__)


def stream_seed(*parts: int) -> int:
    """A seed for one (seed, rank, epoch) stream. Arithmetic like seed*1000 + epoch*10 + rank collides
    (rank 10 of epoch 0 is rank 0 of epoch 1); NumPy's SeedSequence hashes the parts instead."""
    return int(np.random.SeedSequence(list(parts)).generate_state(1, dtype=np.uint64)[0] >> 1)


def _fetch_remote_checkpoints(remote: Store, out: Path) -> None:
    """A new machine for a preempted run: bring its checkpoints home, so it resumes where it stopped."""
    present = set(remote.list(""))
    if "last.pt" not in present:
        return
    for name in ("best.pt", "last.pt"):
        if name in present:
            remote.get_file(name, out / name)
    log.info("fetched the checkpoints of %s into %s", remote.url, out)


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
    device = resolve_device(config.device, context)
    out = Path(config.out)
    data_dir = Path(config.data)
    train_rows, val_rows = load_split(data_dir, "train"), load_split(data_dir, "val")
    train_counts = np.array([int(r["count"]) for r in train_rows])
    num_classes = config.num_classes or int(train_counts.max()) + 1

    torch.manual_seed(config.seed)
    np.random.seed(config.seed)
    model = build_model(
        config.arch,
        config.head,
        num_classes,
        config.pretrained,
        config.weights,
        config.dropout,
        config.input_hw,
    ).to(device)
    channels_last = wants_channels_last(config, device) and not config.train_on_cache
    if channels_last:
        model = model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]  # torch's stub omits it
    head = model.head
    head.start_from_prior(
        torch.bincount(torch.from_numpy(np.minimum(train_counts, num_classes - 1)), minlength=num_classes)
    )
    precision = Precision(config, device)

    cached: CachedTrainer | None = None
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
        train_loader = make_loader(
            train_set, config.batch_size, True, config.workers, config.seed, context.enabled, pin
        )
        val_loader = make_loader(
            val_set, config.batch_size, False, config.workers, config.seed, context.enabled, pin
        )
        steps_per_epoch = (
            len(train_loader)
            if config.max_train_batches is None
            else min(len(train_loader), config.max_train_batches)
        )

    trained: nn.Module = model
    if context.enabled:
        trained = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    optimizer = build_optimizer(trained, config)
    scheduler = build_scheduler(optimizer, config, steps_per_epoch)
    teacher = (
        teacher_probabilities(config.teachers, data_dir, train_rows, out)
        if config.teachers and config.distill > 0
        else None
    )
    objective = build_objective(config, head, np.minimum(train_counts, num_classes - 1), num_classes, teacher)
    monitors = Monitors()
    monitors.check_class_balance(
        np.bincount(np.minimum(train_counts, num_classes - 1), minlength=num_classes)
    )

    progress = Progress(history=[], best=BestEpoch(metric=config.select_metric))
    last_path = out / "last.pt"
    remote = open_store(config.checkpoint_dir) if config.checkpoint_dir else None
    if remote is not None and not config.fresh and not last_path.exists():
        _fetch_remote_checkpoints(remote, out)
    # Per-rank stream for dropout and augmentation; a resumed run replaces it with the saved state.
    torch.manual_seed(stream_seed(config.seed, context.rank))
    if last_path.exists() and not config.fresh:
        progress = resume(last_path, config, context, model, optimizer, scheduler, precision, monitors)
    elif context.is_main:
        out.mkdir(parents=True, exist_ok=True)

    writer = None
    if config.tensorboard and context.is_main:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(out / "tensorboard"), purge_step=progress.start_epoch)
    if context.is_main:
        atomic_write_json(out / "config.json", config.model_dump(mode="json"))
        log.info(
            "training %s/%s on %s: %d train, %d val images, %d classes, world size %d",
            config.arch,
            config.head,
            device,
            len(train_rows),
            len(val_rows),
            num_classes,
            context.world_size,
        )

    for epoch in range(progress.start_epoch, config.epochs):
        if progress.stopped_early(config.early_stopping):
            break
        if cached is not None:
            stats = cached.train_epoch(
                objective, optimizer, scheduler, monitors, epoch, stream_seed(config.seed, 0, epoch)
            )
            probabilities, val_loss = cached.validate()
            val_counts = cached.val_counts
        else:
            if isinstance(train_loader.sampler, DistributedSampler):
                train_loader.sampler.set_epoch(epoch)
            train_loader.generator.manual_seed(stream_seed(config.seed, context.rank, epoch))
            profiler = None
            if config.profile_steps and epoch == progress.start_epoch and context.is_main:
                profiler = make_profiler(config, device, out)
                profiler.start()
            stats = train_one_epoch(
                trained,
                objective,
                train_loader,
                optimizer,
                scheduler,
                precision,
                device,
                config,
                monitors,
                epoch,
                context,
                profiler,
            )
            if profiler is not None:
                profiler.stop()
                write_profile_summary(profiler, out, stats)
            _, probabilities, val_loss = predict(
                trained, head, val_loader, device, precision, context, channels_last, config.label_smoothing
            )
            val_counts = val_set.counts
        metrics = counting_metrics(val_counts, probabilities)
        record = EpochRecord(
            epoch=epoch + 1,
            **stats.model_dump(),
            val_loss=val_loss,
            lr=optimizer.param_groups[0]["lr"],
            **{f"val_{k}": metrics[k] for k in ("accuracy", "off_by_one_accuracy", "mae", "rmse", "ece")},
        )
        history = progress.history
        history.append(record)
        monitors.check_epoch(epoch, [h.train_loss for h in history], [h.val_loss for h in history])
        value = val_loss if config.select_metric == Metric.LOSS else metrics[config.select_metric]
        improved = progress.record(epoch, value, config.select_metric)
        log.info(
            "epoch %d/%d: train loss %.4f, val loss %.4f, val acc %.3f, mae %.3f, %.1f img/s, "
            "data wait %.0f%%%s",
            epoch + 1,
            config.epochs,
            stats.train_loss,
            val_loss,
            metrics["accuracy"],
            metrics["mae"],
            stats.train_images_per_second,
            100 * stats.data_wait_fraction,
            " (best)" if improved else "",
        )
        rng_states = gather_objects(context, rng_state())
        if context.is_main:
            checkpoint = {
                "config": config.model_dump(mode="json"),
                "num_classes": num_classes,
                "checkpoint_format": CHECKPOINT_FORMAT,
                "epoch": epoch + 1,
                "history": [h.model_dump() for h in progress.history],
                "best": progress.best.model_dump(mode="json"),
                "train_fingerprint": fingerprint(train_rows),
                "val_fingerprint": fingerprint(val_rows),
                "card": model_card(
                    config, num_classes, fingerprint(train_rows), fingerprint(val_rows)
                ).model_dump(mode="json"),
                "model": unwrap(model).state_dict(),
            }
            training_state = {
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "scaler": precision.scaler.state_dict(),
                "monitors": monitors.state_dict(),
                "stale_epochs": progress.stale_epochs,
                "rng": rng_states,
            }
            save_checkpoints(out, remote, checkpoint, training_state, metrics if improved else None)
            if writer is not None:
                for key, number in record.model_dump().items():
                    if key != "epoch" and isinstance(number, float) and math.isfinite(number):
                        writer.add_scalar(key.replace("_", "/", 1), number, epoch + 1)
                writer.flush()
        if on_epoch_end is not None:
            on_epoch_end(record)

    # DDP keeps replicas identical by construction; a mismatch means a rank diverged (e.g. a bug that
    # skipped an all-reduce) and the saved model is not what every rank trained.
    checksums = gather_objects(
        context, float(sum(p.detach().double().sum() for p in unwrap(model).parameters()))
    )
    in_sync = all(abs(c - checksums[0]) <= 1e-6 * max(1.0, abs(checksums[0])) for c in checksums)
    if not in_sync:
        log.error("model replicas diverged across ranks: parameter checksums %s", checksums)
    summary = TrainSummary(
        out=str(out),
        replicas_in_sync=in_sync,
        num_classes=num_classes,
        epochs_run=len(progress.history),
        best=progress.best,
        majority_baseline_val_accuracy=majority_baseline(
            train_counts, np.array([int(r["count"]) for r in val_rows])
        ),
        history=progress.history,
        findings=list(monitors.findings),
        world_size=context.world_size,
        device=str(device),
    )
    if context.is_main:
        if writer is not None:
            writer.close()
        summary.write(out / "history.json")
        history_curves([h.model_dump() for h in progress.history], out / "curves.png")
        log.info(
            "best %s %.4f at epoch %s; summary in %s",
            config.select_metric,
            progress.best.value,
            progress.best.epoch,
            out / "history.json",
        )
    return summary
