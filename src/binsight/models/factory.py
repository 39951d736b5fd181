"""Build a counting model from its description, and rebuild it from a checkpoint."""

from __future__ import annotations

import os

from binsight.models.backbones import build_backbone
from binsight.models.heads import CountHead, CountingModel


def build_model(
    arch: str,
    head: str,
    num_classes: int,
    pretrained: bool = False,
    weights_path: str | os.PathLike[str] | None = None,
    dropout: float = 0.2,
    input_hw: tuple[int, int] = (224, 224),
    drop_path: float = 0.0,
) -> CountingModel:
    backbone, features = build_backbone(
        arch, pretrained=pretrained, weights_path=weights_path, input_hw=input_hw, drop_path=drop_path
    )
    return CountingModel(backbone, CountHead(head, features, num_classes, dropout=dropout))
