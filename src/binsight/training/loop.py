"""One epoch of training and one pass of prediction, with the loader's share of the time measured."""

from __future__ import annotations

import contextlib
import functools
import math
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
from torch import nn

from binsight.models.heads import CountHead
from binsight.training.config import TrainConfig
from binsight.training.data import Loader
from binsight.training.distributed import DistContext, all_reduce_sum, gather_objects
from binsight.training.hardware import Precision, wants_channels_last
from binsight.training.monitors import Monitors
from binsight.training.objective import Objective
from binsight.training.results import EpochStats
from binsight.utils.progress import bar


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


def batch_loss(
    module: nn.Module,
    precision: Precision,
    objective: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
    inputs: torch.Tensor,
    targets: torch.Tensor,
    rows: torch.Tensor,
) -> torch.Tensor:
    """One batch's loss; called again at perturbed weights under --sam."""
    with precision.autocast():
        outputs = module(inputs)
    return objective(outputs.float(), targets, rows)


@contextlib.contextmanager
def _batchnorm_statistics_kept(model: nn.Module) -> Iterator[None]:
    """Batch statistics still normalise, but the running ones come back as they were: SAM's second
    pass sees the same batch at perturbed weights and must not count it twice."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    kept = [[b.clone() for b in m.buffers()] for m in norms]
    try:
        yield
    finally:
        with torch.no_grad():
            for module, buffers in zip(norms, kept, strict=True):
                for buffer, before in zip(module.buffers(), buffers, strict=True):
                    buffer.copy_(before)


def _sharpness_aware_gradient(
    model: nn.Module, optimizer: torch.optim.Optimizer, loss_at: Callable[[], torch.Tensor], rho: float
) -> None:
    """Replaces the gradients by those at the weights moved `rho` along the normalised gradient, the
    worst nearby point to first order (Foret et al., ICLR 2021), and moves the weights back."""
    gradients = {p: p.grad for p in model.parameters() if p.requires_grad and p.grad is not None}
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in gradients.values()]))
    offsets = {p: g * (rho / (norm + 1e-12)) for p, g in gradients.items()}
    with torch.no_grad():
        for parameter, offset in offsets.items():
            parameter.add_(offset)
    optimizer.zero_grad(set_to_none=True)
    with _batchnorm_statistics_kept(model):
        loss_at().backward()  # type: ignore[no-untyped-call]  # untyped in torch
    with torch.no_grad():
        for parameter, offset in offsets.items():
            parameter.sub_(offset)


def optimizer_step(
    loss: torch.Tensor,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    precision: Precision,
    config: TrainConfig,
    monitors: Monitors,
    epoch: int,
    step: int,
    loss_at: Callable[[], torch.Tensor] | None = None,
) -> float:
    """Backward, clip, check the gradient, step; returns the gradient norm. With `config.sam`,
    `loss_at` recomputes the batch's loss for the second, perturbed pass."""
    optimizer.zero_grad(set_to_none=True)
    precision.scaler.scale(loss).backward()  # type: ignore[no-untyped-call]  # untyped in torch
    if config.sam and loss_at is not None:
        _sharpness_aware_gradient(model, optimizer, loss_at, config.sam)
    precision.scaler.unscale_(optimizer)
    trainable = [p for p in model.parameters() if p.requires_grad]
    grad_norm = float(torch.nn.utils.clip_grad_norm_(trainable, max_norm=config.grad_clip or float("inf")))
    monitors.check_gradient(grad_norm, epoch, step)
    if math.isfinite(grad_norm) or precision.scaler.is_enabled():
        precision.scaler.step(optimizer)  # skips the step itself on inf/nan under fp16
    precision.scaler.update()
    scheduler.step()
    return grad_norm


def epoch_stats(
    context: DistContext,
    loss_sum: float,
    seen: int,
    seconds: float,
    data_seconds: float,
    grad_norms: list[float],
) -> EpochStats:
    loss_total, seen_total = all_reduce_sum(context, [loss_sum, float(seen)])
    finite = [g for g in grad_norms if math.isfinite(g)]
    return EpochStats(
        train_loss=loss_total / max(seen_total, 1.0),
        train_images_per_second=seen_total / seconds,
        data_wait_fraction=data_seconds / seconds,
        grad_norm_mean=float(np.mean(finite)) if finite else float("nan"),
        grad_norm_max=float(np.max(finite)) if finite else float("nan"),
        seconds=seconds,
    )


def train_one_epoch(
    model: nn.Module,
    objective: Objective,
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
) -> EpochStats:
    model.train()
    channels_last = wants_channels_last(config, device)
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
        for images, targets, rows, waited in _batches(loader, device, channels_last):
            if steps >= total_steps:
                break
            loss_at = functools.partial(batch_loss, model, precision, objective, images, targets, rows)
            loss = loss_at()
            grad_norm = optimizer_step(
                loss, model, optimizer, scheduler, precision, config, monitors, epoch, steps, loss_at
            )
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
    return epoch_stats(context, loss_sum, seen, time.perf_counter() - started, data_seconds, grad_norms)


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
