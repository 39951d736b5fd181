"""The training loop: one epoch of SGD, one pass of evaluation, and the run that strings them together."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DistributedSampler

from binsight.data.split import fingerprint, load_split
from binsight.errors import BinsightError
from binsight.models.factory import build_model
from binsight.models.heads import CountHead, CountingModel
from binsight.training.checkpoint import (
    CHECKPOINT_FORMAT,
    epochs_finished,
    load_checkpoint,
    restore_rng_state,
    rng_state,
    save_checkpoint,
)
from binsight.training.config import TrainConfig
from binsight.training.data import (
    BinDataset,
    Loader,
    cache_path,
    eval_transform,
    make_loader,
    train_transform,
)
from binsight.training.distributed import (
    DistContext,
    all_reduce_sum,
    gather_objects,
    init_distributed,
    shutdown_distributed,
)
from binsight.training.metrics import Metric, counting_metrics, majority_baseline
from binsight.training.monitors import Monitors
from binsight.utils.io import atomic_write_json, atomic_write_text, exclusive_folder
from binsight.utils.plots import history_curves
from binsight.utils.progress import bar
from binsight.utils.storage import Store, open_store

log = logging.getLogger(__name__)

# Settings that may change between a checkpoint and its resumption without changing the experiment.
RESUMABLE_CHANGES = {
    "out",
    "checkpoint_dir",
    "epochs",
    "workers",
    "early_stopping",
    "device",
    "profile_steps",
    "tensorboard",
    "cache",
}


def resolve_device(requested: str, context: DistContext) -> torch.device:
    if requested == "auto":
        return torch.device(f"cuda:{context.local_rank}" if torch.cuda.is_available() else "cpu")
    device = torch.device(requested)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise BinsightError(
            f"device {requested!r} asked for, but no CUDA GPU is visible",
            hint="use --device cpu or --device auto",
        )
    if device.type == "cuda" and context.enabled:
        device = torch.device(f"cuda:{context.local_rank}")
    return device


def unwrap(model: nn.Module) -> CountingModel:
    inner = model.module if isinstance(model, DistributedDataParallel) else model
    assert isinstance(inner, CountingModel)
    return inner


def build_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """No weight decay on norms and biases (decaying them only hurts, as in timm and torchvision refs);
    the pretrained backbone moves at `backbone_lr_scale` of the new head's rate, so fine-tuning adapts
    the ImageNet features rather than overwriting them in the first noisy steps of the head."""
    groups = []
    for part, scale in ((unwrap(model).backbone, config.backbone_lr_scale), (unwrap(model).head, 1.0)):
        decay: list[nn.Parameter] = []
        no_decay: list[nn.Parameter] = []
        for parameter in part.parameters():
            if parameter.requires_grad:
                (no_decay if parameter.ndim <= 1 else decay).append(parameter)
        groups += [
            {"params": decay, "weight_decay": config.weight_decay, "lr": config.lr * scale},
            {"params": no_decay, "weight_decay": 0.0, "lr": config.lr * scale},
        ]
    groups = [g for g in groups if g["params"]]
    if config.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum, nesterov=True)
    return torch.optim.AdamW(groups, lr=config.lr)


def build_scheduler(
    optimizer: torch.optim.Optimizer, config: TrainConfig, steps_per_epoch: int
) -> torch.optim.lr_scheduler.LRScheduler:
    total = max(1, config.epochs * steps_per_epoch)
    if config.schedule == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(
            optimizer,
            max_lr=[group["lr"] for group in optimizer.param_groups],
            total_steps=total,
            pct_start=max(0.05, config.warmup_epochs / config.epochs),
        )
    warmup = int(config.warmup_epochs * steps_per_epoch)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if config.schedule == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def cpu_has_native_bf16() -> bool:
    """AVX512-BF16 or AMX: oneDNN then runs bf16 convolutions at 2x or more the fp32 rate (measured in
    docs/benchmarks.md); elsewhere bf16 on CPU is emulated and slower than fp32."""
    return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


class Precision:
    """Mixed precision: bfloat16 where the hardware runs it natively (no loss scaling needed), float16 on
    GPUs without bf16."""

    def __init__(self, config: TrainConfig, device: torch.device) -> None:
        native = device.type == "cuda" or (device.type == "cpu" and cpu_has_native_bf16())
        enabled = config.amp == "on" or (config.amp == "auto" and native)
        self.device_type = device.type
        if device.type == "cuda":
            self.dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        else:
            self.dtype = torch.bfloat16
        self.enabled = enabled
        self.scaler = torch.amp.GradScaler(device.type, enabled=enabled and self.dtype == torch.float16)

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        return torch.autocast(self.device_type, dtype=self.dtype, enabled=self.enabled)


def _batches(
    loader: Loader, device: torch.device, channels_last: bool
) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]]:
    """Batches on the device, with the seconds spent waiting for each (the loader's share of time)."""
    iterator = iter(loader)
    while True:
        started = time.perf_counter()
        try:
            images, targets, indices = next(iterator)
        except StopIteration:
            return
        waited = time.perf_counter() - started
        images = images.to(device, non_blocking=True)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        yield images, targets.to(device, non_blocking=True), indices, waited


def train_one_epoch(
    model: nn.Module,
    head: CountHead,
    loader: Loader,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    precision: Precision,
    device: torch.device,
    config: TrainConfig,
    monitors: Monitors,
    epoch: int,
    context: DistContext,
    profiler: Any = None,
) -> dict[str, float]:
    model.train()
    channels_last = _channels_last(config, device)
    loss_sum, seen, data_seconds, steps = 0.0, 0, 0.0, 0
    grad_norms: list[float] = []
    total_steps = (
        len(loader) if config.max_train_batches is None else min(len(loader), config.max_train_batches)
    )
    started = time.perf_counter()
    with bar(
        total_steps * (loader.batch_size or 1) * context.world_size,
        f"epoch {epoch + 1}/{config.epochs}",
        unit="img",
    ) as progress:
        for images, targets, _, waited in _batches(loader, device, channels_last):
            if steps >= total_steps:
                break
            with precision.autocast():
                outputs = model(images)
            loss = head.loss(
                outputs.float(),
                targets,
                config.label_smoothing,
                neighbour_smoothing=config.neighbour_smoothing,
            )
            optimizer.zero_grad(set_to_none=True)
            precision.scaler.scale(loss).backward()  # type: ignore[no-untyped-call]  # untyped in torch
            precision.scaler.unscale_(optimizer)
            grad_norm = float(
                torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=config.grad_clip or float("inf"))
            )
            monitors.check_gradient(grad_norm, epoch, steps)
            if math.isfinite(grad_norm) or precision.scaler.is_enabled():
                precision.scaler.step(optimizer)  # skips the step itself on inf/nan under fp16
            precision.scaler.update()
            scheduler.step()
            if profiler is not None:
                profiler.step()

            steps += 1
            batch = targets.shape[0]
            loss_sum += float(loss.detach()) * batch
            seen += batch
            data_seconds += waited
            grad_norms.append(grad_norm)
            progress.update(batch * context.world_size)
            progress.set_postfix(loss=f"{loss_sum / seen:.4f}", refresh=False)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - started
    loss_total, seen_total = all_reduce_sum(context, [loss_sum, float(seen)])
    finite = [g for g in grad_norms if math.isfinite(g)]
    return {
        "train_loss": loss_total / max(seen_total, 1.0),
        "train_images_per_second": seen_total / seconds,
        "data_wait_fraction": data_seconds / seconds,
        "grad_norm_mean": float(np.mean(finite)) if finite else float("nan"),
        "grad_norm_max": float(np.max(finite)) if finite else float("nan"),
        "seconds": seconds,
    }


@torch.no_grad()
def predict(
    model: nn.Module,
    head: CountHead,
    loader: Loader,
    device: torch.device,
    precision: Precision,
    context: DistContext,
    channels_last: bool = False,
    label_smoothing: float = 0.0,
) -> tuple[np.ndarray, np.ndarray, float]:
    """(targets, probabilities, mean loss) over the whole dataset, gathered from every process."""
    model.eval()
    indices_all: list[np.ndarray] = []
    probs_all: list[np.ndarray] = []
    targets_all: list[np.ndarray] = []
    losses_all: list[np.ndarray] = []
    for images, targets, indices, _ in _batches(loader, device, channels_last):
        with precision.autocast():
            outputs = model(images)
        outputs = outputs.float()
        losses = head.loss(outputs, targets, label_smoothing, reduction="none")
        indices_all.append(indices.numpy())
        probs_all.append(head.probabilities(outputs).cpu().numpy())
        targets_all.append(targets.cpu().numpy())
        losses_all.append(losses.cpu().numpy())
    local = tuple(
        np.concatenate(parts) if parts else np.zeros(0)
        for parts in (indices_all, probs_all, targets_all, losses_all)
    )
    # A DistributedSampler pads the last shard with repeats; keep one prediction per image.
    merged: dict[int, tuple[np.ndarray, int, float]] = {}
    for idx, probs, tgts, losses in gather_objects(context, local):
        for index, prob, target, loss in zip(idx, probs, tgts, losses, strict=True):
            merged.setdefault(int(index), (prob, int(target), float(loss)))
    order = sorted(merged)
    probabilities = np.stack([merged[i][0] for i in order])
    gathered_targets = np.array([merged[i][1] for i in order])
    return gathered_targets, probabilities, float(np.mean([merged[i][2] for i in order]))


def _channels_last(config: TrainConfig, device: torch.device) -> bool:
    # oneDNN's and cuDNN's fast bf16/fp16 convolutions want NHWC; in fp32 on CPU it is a wash.
    return config.channels_last == "on" or (
        config.channels_last == "auto" and Precision(config, device).enabled
    )


def _check_resumable(saved: dict[str, Any], config: TrainConfig) -> None:
    current = config.model_dump(mode="json")
    changed = sorted(k for k, v in saved.items() if k not in RESUMABLE_CHANGES and current.get(k) != v)
    if changed:
        raise BinsightError(
            f"{config.out} holds a run with different settings ({', '.join(changed)})",
            hint="use a new --out for a new experiment, or --fresh to overwrite this one",
        )


def _make_profiler(config: TrainConfig, device: torch.device, out: Path) -> Any:
    """Profile `profile_steps` steps after one warm-up step; the trace is written when they end."""
    from torch.profiler import ProfilerActivity, profile, schedule

    def write_trace(profiler: Any) -> None:
        folder = out / "profile"
        folder.mkdir(parents=True, exist_ok=True)
        profiler.export_chrome_trace(str(folder / "trace.json"))
        sort_key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
        profiler.binsight_table = profiler.key_averages().table(sort_by=sort_key, row_limit=15)

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    return profile(
        activities=activities,
        schedule=schedule(wait=0, warmup=1, active=config.profile_steps, repeat=1),
        on_trace_ready=write_trace,
    )


def _write_profile_summary(profiler: Any, out: Path, epoch_stats: dict[str, float]) -> None:
    table = getattr(profiler, "binsight_table", "(the epoch ended before the profiled steps did)")
    summary = (
        f"data loading: {100 * epoch_stats['data_wait_fraction']:.1f}% of epoch time spent waiting "
        f"for batches; {epoch_stats['train_images_per_second']:.1f} images/s\n\n"
        f"Top operators by self time over {out / 'profile' / 'trace.json'} "
        f"(open it in Perfetto or chrome://tracing):\n{table}\n"
    )
    atomic_write_text(out / "profile" / "summary.txt", summary)
    log.info("profile summary in %s", out / "profile" / "summary.txt")


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


def train(
    config: TrainConfig, fresh: bool = False, on_epoch_end: Callable[[dict[str, Any]], None] | None = None
) -> dict[str, Any]:
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
            return _train(config, context, fresh, on_epoch_end)
        with exclusive_folder(config.out, "training run"):
            return _train(config, context, fresh, on_epoch_end)
    finally:
        shutdown_distributed(context)


def _train(
    config: TrainConfig,
    context: DistContext,
    fresh: bool,
    on_epoch_end: Callable[[dict[str, Any]], None] | None,
) -> dict[str, Any]:
    device = resolve_device(config.device, context)
    out = Path(config.out)
    data_dir = Path(config.data)
    train_rows, val_rows = load_split(data_dir, "train"), load_split(data_dir, "val")
    train_counts = np.array([int(r["count"]) for r in train_rows])
    num_classes = config.num_classes or int(train_counts.max()) + 1

    torch.manual_seed(config.seed)
    np.random.seed(config.seed)
    model = build_model(
        config.arch, config.head, num_classes, config.pretrained, config.weights, config.dropout
    ).to(device)
    channels_last = _channels_last(config, device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]  # torch's stub omits it
    head = model.head
    head.start_from_prior(
        torch.bincount(torch.from_numpy(np.minimum(train_counts, num_classes - 1)), minlength=num_classes)
    )

    cache = config.cache and context.is_main
    size, (mean, std) = config.input_hw, config.mean_std
    train_set = BinDataset(
        data_dir,
        train_rows,
        train_transform(size, config.augment, config.flip, mean, std),
        size,
        num_classes,
        cache_path(data_dir, "train", train_rows, size) if cache else None,
    )
    val_set = BinDataset(
        data_dir,
        val_rows,
        eval_transform(size, mean, std),
        size,
        num_classes,
        cache_path(data_dir, "val", val_rows, size) if cache else None,
    )
    if config.cache and context.enabled:
        torch.distributed.barrier()  # rank 0 built the cache; the others now open it
        if not context.is_main:
            train_set.cache = np.load(cache_path(data_dir, "train", train_rows, size), mmap_mode="r")
            val_set.cache = np.load(cache_path(data_dir, "val", val_rows, size), mmap_mode="r")
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
    precision = Precision(config, device)
    monitors = Monitors()
    monitors.check_class_balance(
        np.bincount(np.minimum(train_counts, num_classes - 1), minlength=num_classes)
    )

    history: list[dict[str, Any]] = []
    best: dict[str, Any] = {"epoch": None, "value": None}
    start_epoch, stale_epochs = 0, 0
    last_path, best_path = out / "last.pt", out / "best.pt"
    remote = open_store(config.checkpoint_dir) if config.checkpoint_dir else None
    if remote is not None and not fresh and not last_path.exists():
        _fetch_remote_checkpoints(remote, out)
    # Per-rank stream for dropout and augmentation; a resumed run replaces it with the saved state.
    torch.manual_seed(stream_seed(config.seed, context.rank))
    if last_path.exists() and not fresh:
        state = load_checkpoint(last_path)
        _check_resumable(state["config"], config)
        unwrap(model).load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        precision.scaler.load_state_dict(state["scaler"])
        monitors.load_state_dict(state["monitors"])
        history, best, stale_epochs = state["history"], state["best"], state["stale_epochs"]
        start_epoch = epochs_finished(state)
        restore_rng_state(state["rng"][min(context.rank, len(state["rng"]) - 1)])
        log.info("resumed %s at epoch %d of %d", last_path, start_epoch + 1, config.epochs)
    elif context.is_main:
        out.mkdir(parents=True, exist_ok=True)

    writer = None
    if config.tensorboard and context.is_main:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(out / "tensorboard"), purge_step=start_epoch)
    if context.is_main:
        atomic_write_json(out / "config.json", config.model_dump(mode="json"))
        log.info(
            "training %s/%s on %s: %d train, %d val images, %d classes, world size %d",
            config.arch,
            config.head,
            device,
            len(train_set),
            len(val_set),
            num_classes,
            context.world_size,
        )

    for epoch in range(start_epoch, config.epochs):
        if best["epoch"] is not None and config.early_stopping and stale_epochs >= config.early_stopping:
            break
        if isinstance(train_loader.sampler, DistributedSampler):
            train_loader.sampler.set_epoch(epoch)
        train_loader.generator.manual_seed(stream_seed(config.seed, context.rank, epoch))
        profiler = None
        if config.profile_steps and epoch == start_epoch and context.is_main:
            profiler = _make_profiler(config, device, out)
            profiler.start()
        stats = train_one_epoch(
            trained,
            head,
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
            _write_profile_summary(profiler, out, stats)
        _, probabilities, val_loss = predict(
            trained, head, val_loader, device, precision, context, channels_last, config.label_smoothing
        )
        metrics = counting_metrics(val_set.counts, probabilities)
        record = {
            "epoch": epoch + 1,
            **stats,
            "val_loss": val_loss,
            "lr": optimizer.param_groups[0]["lr"],
            **{f"val_{k}": metrics[k] for k in ("accuracy", "off_by_one_accuracy", "mae", "rmse", "ece")},
        }
        history.append(record)
        monitors.check_epoch(epoch, [h["train_loss"] for h in history], [h["val_loss"] for h in history])
        value = val_loss if config.select_metric == Metric.LOSS else metrics[config.select_metric]
        improved = config.select_metric.improves(value, best["value"])
        if improved:
            best, stale_epochs = {"epoch": epoch + 1, "value": value, "metric": config.select_metric}, 0
        else:
            stale_epochs += 1
        log.info(
            "epoch %d/%d: train loss %.4f, val loss %.4f, val acc %.3f, mae %.3f, %.1f img/s, "
            "data wait %.0f%%%s",
            epoch + 1,
            config.epochs,
            stats["train_loss"],
            val_loss,
            metrics["accuracy"],
            metrics["mae"],
            stats["train_images_per_second"],
            100 * stats["data_wait_fraction"],
            " (best)" if improved else "",
        )
        rng_states = gather_objects(context, rng_state())
        if context.is_main:
            meta = {
                "config": config.model_dump(mode="json"),
                "num_classes": num_classes,
                "checkpoint_format": CHECKPOINT_FORMAT,
                "epoch": epoch + 1,
                "history": history,
                "best": best,
                "train_fingerprint": fingerprint(train_rows),
                "val_fingerprint": fingerprint(val_rows),
            }
            if improved:
                save_checkpoint(
                    best_path, {**meta, "model": unwrap(model).state_dict(), "val_metrics": metrics}
                )
            save_checkpoint(
                last_path,
                {
                    **meta,
                    "model": unwrap(model).state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "scaler": precision.scaler.state_dict(),
                    "monitors": monitors.state_dict(),
                    "stale_epochs": stale_epochs,
                    "rng": rng_states,
                },
            )
            if remote is not None:
                # best first: a resumed run never finds a last.pt newer than the best.pt beside it.
                if improved:
                    remote.put_file("best.pt", best_path)
                remote.put_file("last.pt", last_path)
            if writer is not None:
                for key, number in record.items():
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
    summary = {
        "out": str(out),
        "replicas_in_sync": in_sync,
        "num_classes": num_classes,
        "epochs_run": len(history),
        "best": best,
        "majority_baseline_val_accuracy": majority_baseline(train_counts, val_set.counts),
        "history": history,
        "findings": [f.__dict__ for f in monitors.findings],
        "world_size": context.world_size,
        "device": str(device),
    }
    if context.is_main:
        if writer is not None:
            writer.close()
        atomic_write_json(out / "history.json", summary)
        history_curves(history, out / "curves.png")
        log.info(
            "best %s %.4f at epoch %s; summary in %s",
            config.select_metric,
            best["value"],
            best["epoch"],
            out / "history.json",
        )
    plain: dict[str, Any] = json.loads(json.dumps(summary, default=float))
    return plain
