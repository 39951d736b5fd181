"""torchvision backbones, their ImageNet weights loaded offline, and the feature width each produces.

Weights never come from the network at run time: they are read from an explicit file or from the
torch hub cache (``$TORCH_HOME/hub/checkpoints/<canonical file name>``), the place torchvision itself
would have saved them. A missing file is a clear error that says where to put it.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torchvision import models as tvm

from binsight.errors import BinsightError


@dataclass(frozen=True)
class Backbone:
    build: Callable[..., nn.Module]
    weights: tvm.WeightsEnum
    classifier_attr: str  # the ImageNet head replaced by an identity

    @property
    def weights_file(self) -> str:
        return os.path.basename(self.weights.url)


BACKBONES: dict[str, Backbone] = {
    "resnet18": Backbone(tvm.resnet18, tvm.ResNet18_Weights.IMAGENET1K_V1, "fc"),
    "resnet34": Backbone(tvm.resnet34, tvm.ResNet34_Weights.IMAGENET1K_V1, "fc"),
    "resnet50": Backbone(tvm.resnet50, tvm.ResNet50_Weights.IMAGENET1K_V2, "fc"),
    "efficientnet_b0": Backbone(tvm.efficientnet_b0, tvm.EfficientNet_B0_Weights.IMAGENET1K_V1, "classifier"),
    "mobilenet_v3_small": Backbone(
        tvm.mobilenet_v3_small, tvm.MobileNet_V3_Small_Weights.IMAGENET1K_V1, "classifier"
    ),
    "mobilenet_v3_large": Backbone(
        tvm.mobilenet_v3_large, tvm.MobileNet_V3_Large_Weights.IMAGENET1K_V2, "classifier"
    ),
    "convnext_tiny": Backbone(tvm.convnext_tiny, tvm.ConvNeXt_Tiny_Weights.IMAGENET1K_V1, "classifier"),
}


def weights_location(arch: str) -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints" / BACKBONES[arch].weights_file


def _load_state_dict(path: Path, arch: str) -> dict[str, torch.Tensor]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise BinsightError(
            f"cannot read pretrained weights {path}: {exc}",
            hint=f"replace it with {BACKBONES[arch].weights.url}",
        ) from None
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise BinsightError(f"{path} does not hold a state dict")
    return state


def build_backbone(
    arch: str, pretrained: bool, weights_path: str | os.PathLike[str] | None = None
) -> tuple[nn.Module, int]:
    """The feature extractor (ImageNet classifier removed) and its output width."""
    if arch not in BACKBONES:
        raise BinsightError(f"unknown architecture {arch!r}", hint=f"choose one of {', '.join(BACKBONES)}")
    spec = BACKBONES[arch]
    model = spec.build(weights=None)
    if pretrained or weights_path:
        path = Path(weights_path) if weights_path else weights_location(arch)
        if not path.is_file():
            raise BinsightError(
                f"ImageNet weights for {arch} not found at {path}",
                hint=f"download {spec.weights.url} to that path (or set TORCH_HOME, or pass "
                "--weights FILE), or train from scratch with --no-pretrained",
            )
        try:
            missing, unexpected = model.load_state_dict(_load_state_dict(path, arch), strict=False)
            problem = (
                f"{len(missing)} missing and {len(unexpected)} unexpected keys"
                if missing or unexpected
                else ""
            )
        except RuntimeError as exc:  # right names, wrong shapes
            problem = str(exc).splitlines()[-1].strip()
        if problem:
            raise BinsightError(
                f"{path} does not match {arch}: {problem}", hint=f"use the file from {spec.weights.url}"
            )
    head = getattr(model, spec.classifier_attr)
    if isinstance(head, nn.Sequential):
        # Keep the pre-classifier layers (MobileNetV3's hidden FC, ConvNeXt's LayerNorm+flatten).
        last_linear = [m for m in head if isinstance(m, nn.Linear)][-1]
        layers = [m for m in head if m is not last_linear and not isinstance(m, nn.Dropout)]
        features = last_linear.in_features
        setattr(model, spec.classifier_attr, nn.Sequential(*layers))
    else:
        features = head.in_features
        setattr(model, spec.classifier_attr, nn.Identity())
    return model, features
