"""Where and in what precision training runs: the device, mixed precision where the hardware computes it
natively, and the memory layout its fast kernels want."""

from __future__ import annotations

import contextlib
from typing import Any

import torch

from binsight.cpu import native_bf16
from binsight.errors import BinsightError
from binsight.training.config import TrainConfig
from binsight.training.distributed import DistContext


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


class Precision:
    """Mixed precision: bfloat16 where the hardware runs it natively (no loss scaling needed), float16 on
    GPUs without bf16."""

    def __init__(self, config: TrainConfig, device: torch.device) -> None:
        native = device.type == "cuda" or (device.type == "cpu" and native_bf16())
        enabled = config.amp == "on" or (config.amp == "auto" and native)
        self.device_type = device.type
        if device.type == "cuda":
            self.dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        else:
            self.dtype = torch.bfloat16
        self.enabled = enabled
        self.scaler = torch.amp.GradScaler(device.type, enabled=enabled and self.dtype == torch.float16)
        if config.sam and self.scaler.is_enabled():
            # The scaler unscales one backward per step; SAM takes two.
            raise BinsightError(
                "--sam cannot train in float16 with loss scaling (this GPU has no bfloat16)",
                hint="add --amp off to train SAM in float32, or drop --sam",
            )

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        return torch.autocast(self.device_type, dtype=self.dtype, enabled=self.enabled)


def wants_channels_last(config: TrainConfig, device: torch.device) -> bool:
    # oneDNN's convolutions are fastest in NHWC in fp32 too (Lite0 training at 224x304, 2 cores: 1.5x
    # on AVX2, 1.6x on AVX-512; benchmarks/bench_recipe_speed.py); cuDNN's only with fp16/bf16.
    if config.channels_last != "auto":
        return config.channels_last == "on"
    return device.type == "cpu" or Precision(config, device).enabled
