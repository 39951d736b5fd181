"""Optimiser and learning-rate schedule, the way torchvision's and timm's references set them up."""

from __future__ import annotations

import math
from typing import Any

import torch
from timm.optim import param_groups_layer_decay  # type: ignore[attr-defined]  # re-exported without __all__
from torch import nn

from binsight.errors import BinsightError
from binsight.models.backbones import timm_module
from binsight.training.config import TrainConfig
from binsight.training.distributed import unwrap


def build_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """No weight decay on norms and biases (decaying them only hurts, as in timm and torchvision refs);
    the pretrained backbone moves at `backbone_lr_scale` of the new head's rate, so fine-tuning adapts
    the ImageNet features rather than overwriting them in the first noisy steps of the head. With
    `layer_decay` the backbone's blocks are grouped as timm's group matchers say (BEiT's layer-wise
    decay): the block next to the head at the backbone's rate, each one below at `layer_decay` times
    the rate above, so the general low-level filters move least."""
    core = unwrap(model)
    groups: list[dict[str, Any]] = []
    parts: list[tuple[nn.Module, float]] = [(core.head, 1.0)]
    if config.layer_decay is None:
        parts.insert(0, (core.backbone, config.backbone_lr_scale))
    else:
        backbone = timm_module(core.backbone)
        if backbone is None:
            raise BinsightError(
                "--layer-decay needs a timm backbone, whose blocks timm can group",
                hint="train without it, or on an efficientnet_lite, dinov2_small or timm: backbone",
            )
        for group in param_groups_layer_decay(
            backbone, weight_decay=config.weight_decay, layer_decay=config.layer_decay
        ):
            scale = config.backbone_lr_scale * group["lr_scale"]
            groups.append(
                {"params": group["params"], "weight_decay": group["weight_decay"], "lr": config.lr * scale}
            )
    for part, scale in parts:
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
