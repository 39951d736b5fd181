"""Everything a training run depends on, in one typed, validated, serialisable place.

A config file (JSON) holds any subset of these fields; command-line flags override it. The config is
stored in every checkpoint, so `evaluate`, `export` and resume rebuild exactly the same model.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from binsight.errors import BinsightError
from binsight.models.backbones import BACKBONES
from binsight.models.heads import HEADS


class TrainConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    data: Path = Field(description="dataset directory with splits/{train,val,test}.csv")
    out: Path = Field(Path("runs/train"), description="run directory (checkpoints, logs, report)")

    arch: str = "resnet18"
    head: str = "classification"
    pretrained: bool = True
    weights: Path | None = Field(None, description="ImageNet weights file (default: torch hub cache)")
    num_classes: int | None = Field(None, ge=2, description="counts 0..num_classes-1 (default: from data)")
    dropout: float = Field(0.2, ge=0.0, lt=1.0)

    image_size: int = Field(224, ge=32, le=1024)
    epochs: int = Field(10, ge=1)
    batch_size: int = Field(64, ge=1, description="per process; the global batch is this times world size")
    optimizer: Literal["adamw", "sgd"] = "adamw"
    lr: float = Field(1e-3, gt=0.0, le=10.0)
    weight_decay: float = Field(0.05, ge=0.0)
    momentum: float = Field(0.9, ge=0.0, lt=1.0)
    schedule: Literal["cosine", "onecycle", "constant"] = "cosine"
    warmup_epochs: float = Field(0.0, ge=0.0)
    label_smoothing: float = Field(0.0, ge=0.0, lt=1.0)
    augment: float = Field(1.0, ge=0.0, le=2.0, description="augmentation strength, 0 turns it off")
    grad_clip: float | None = Field(None, gt=0.0)

    amp: Literal["auto", "on", "off"] = "auto"
    channels_last: Literal["auto", "on", "off"] = "auto"
    device: str = Field("auto", description="auto, cpu, cuda or cuda:N")
    workers: int = Field(2, ge=0, description="data loader processes per training process")
    cache: bool = Field(False, description="decode and resize every image once into a uint8 cache")

    seed: int = 0
    early_stopping: int | None = Field(5, ge=1, description="epochs without val improvement before stopping")
    select_metric: Literal["accuracy", "mae", "rmse", "loss"] = "accuracy"
    max_train_batches: int | None = Field(None, ge=1, description="cap per epoch (smoke tests)")
    profile_steps: int = Field(0, ge=0, description="record a torch.profiler trace of N steps")
    tensorboard: bool = True

    @model_validator(mode="after")
    def _known_choices(self) -> TrainConfig:
        if self.arch not in BACKBONES:
            raise ValueError(f"arch {self.arch!r} is not one of {', '.join(BACKBONES)}")
        if self.head not in HEADS:
            raise ValueError(f"head {self.head!r} is not one of {', '.join(HEADS)}")
        return self

    @property
    def lower_is_better(self) -> bool:
        return self.select_metric != "accuracy"


def load_config(path: Path | None, overrides: dict[str, object]) -> TrainConfig:
    """A config file (optional) with command-line overrides applied on top; errors name the field."""
    values: dict[str, object] = {}
    if path is not None:
        try:
            values = json.loads(path.read_text())
        except OSError as exc:
            raise BinsightError(f"cannot read config {path}: {exc.strerror}") from None
        except json.JSONDecodeError as exc:
            raise BinsightError(f"config {path} is not valid JSON: {exc}") from None
        if not isinstance(values, dict):
            raise BinsightError(f"config {path} must hold a JSON object of settings")
    values.update({k: v for k, v in overrides.items() if v is not None})
    try:
        return TrainConfig.model_validate(values)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'config'}: {e['msg']}" for e in exc.errors()
        )
        raise BinsightError(
            f"invalid training config: {problems}", hint="see `binsight train --help` for the settings"
        ) from None
