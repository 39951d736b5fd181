"""Training on cached features: the frozen part of the backbone runs once per photo and view, and only
the rest of the network trains, on what it computed.

On a CPU a fine-tuning epoch of a pretrained backbone on real ABID photos takes minutes (Lite0 at
224x304, 2.7k photos) to tens of minutes (DINOv2-S), and it is redone every epoch for layers whose
weights barely move. Here the frozen blocks' outputs are computed once (fp16, memory-mapped, under
`DATA/.cache/features-*`; resumed if interrupted) for each view of each photo (as is, flipped: a flip
never changes a count), and each epoch draws one view per batch. What trains: for DINOv2 the blocks
after `frozen_blocks`, the final norm and the head; for a CNN the head alone. The checkpoint holds the
whole model, so evaluation, export and serving are unchanged.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from binsight.data.split import fingerprint
from binsight.models.heads import CountingModel
from binsight.training.config import TrainConfig
from binsight.training.data import build_cache, cache_path
from binsight.training.hardware import Precision
from binsight.training.results import EpochStats
from binsight.utils.io import atomic_write_json
from binsight.utils.progress import bar

log = logging.getLogger(__name__)

VIEWS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "o": lambda pixels: pixels,
    "h": lambda pixels: pixels[:, :, ::-1],
    "v": lambda pixels: pixels[:, ::-1],
    "hv": lambda pixels: pixels[:, ::-1, ::-1],
}
# Photos per chunk of a feature-cache build; its progress is saved after each chunk.
CACHE_CHUNK = 32


class SplitBackbone(Protocol):
    """A backbone cut after `blocks` blocks: `tail(prefix(x, n), n)` is the pooled features."""

    depth: int

    def prefix(self, images: torch.Tensor, blocks: int) -> torch.Tensor: ...

    def tail(self, tokens: torch.Tensor, blocks: int) -> torch.Tensor: ...

    def prefix_parameters(self, blocks: int) -> list[nn.Parameter]: ...


class WholeBackbone:
    """A CNN is cached whole: its pooled features are the cache, and only the head trains."""

    depth = 1

    def __init__(self, backbone: nn.Module) -> None:
        self.backbone = backbone

    def prefix(self, images: torch.Tensor, blocks: int) -> torch.Tensor:
        return torch.flatten(self.backbone(images), 1) if blocks else images

    def tail(self, tokens: torch.Tensor, blocks: int) -> torch.Tensor:
        return tokens if blocks else torch.flatten(self.backbone(tokens), 1)

    def prefix_parameters(self, blocks: int) -> list[nn.Parameter]:
        return list(self.backbone.parameters()) if blocks else []


def split_backbone(backbone: nn.Module) -> SplitBackbone:
    if hasattr(backbone, "prefix") and hasattr(backbone, "tail"):
        return backbone  # type: ignore[return-value]  # DINOv2: it splits at any block itself
    return WholeBackbone(backbone)


def frozen_depth(config: TrainConfig, backbone: SplitBackbone) -> int:
    frozen = backbone.depth if config.frozen_blocks is None else min(config.frozen_blocks, backbone.depth)
    if isinstance(backbone, WholeBackbone):
        frozen = 1  # a CNN does not split: all of it is frozen
    return frozen


class CachedTail(nn.Module):
    """What trains on the cache: the backbone after the frozen blocks, then the head."""

    def __init__(self, model: CountingModel, backbone: SplitBackbone, frozen: int) -> None:
        super().__init__()
        self.model, self.frozen = model, frozen
        self.backbone = backbone

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.model.head(self.backbone.tail(features, self.frozen))
        return out


def _key(
    config: TrainConfig, frozen: int, split: str, rows: list[dict[str, str]], precision: Precision
) -> str:
    """What the cached features depend on: the backbone and its weights, input, normalisation, depth,
    the precision it ran in (bf16 features are not fp32 ones) and the photos (changing any of them makes
    a new cache, never a stale one)."""
    settings = {
        "precision": str(precision.dtype) if precision.enabled else "float32",
        "arch": config.arch,
        "weights": str(config.weights or "packaged"),
        "pretrained": config.pretrained,
        "input_hw": config.input_hw,
        "mean_std": config.mean_std,
        "frozen": frozen,
        "split": split,
        "photos": fingerprint(rows),
    }
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


@torch.no_grad()
def feature_cache(
    config: TrainConfig,
    backbone: SplitBackbone,
    frozen: int,
    split: str,
    rows: list[dict[str, str]],
    views: list[str],
    precision: Precision,
    batch_size: int = CACHE_CHUNK,
) -> dict[str, np.ndarray]:
    """Per view, the frozen blocks' output for every photo of `rows` (fp16, memory-mapped). Built in
    chunks with the progress saved after each, so an interrupted build resumes where it stopped."""
    data_dir = Path(config.data)
    pixels = build_cache(
        [str(data_dir / r["image"]) for r in rows],
        config.preprocess,
        cache_path(data_dir, split, rows, config.input_hw),
    )
    folder = data_dir / ".cache" / f"features-{_key(config, frozen, split, rows, precision)}"
    folder.mkdir(parents=True, exist_ok=True)
    progress_file = folder / "progress.json"
    done: dict[str, int] = json.loads(progress_file.read_text()) if progress_file.is_file() else {}
    sample = backbone.prefix(torch.from_numpy(config.preprocess.normalise(pixels[:1])), frozen)
    shape = (len(rows), *sample.shape[1:])
    arrays: dict[str, np.ndarray] = {}
    for view in views:
        path = folder / f"{view}.npy"
        mode = "r+" if path.is_file() and done.get(view, 0) > 0 else "w+"
        array = np.lib.format.open_memmap(path, mode=mode, dtype=np.float16, shape=shape)
        start = done.get(view, 0) if mode == "r+" else 0
        if start < len(rows):
            started = time.perf_counter()
            with bar(len(rows) - start, f"features {split}/{view}", unit="img") as progress:
                for first in range(start, len(rows), batch_size):
                    chunk = np.ascontiguousarray(VIEWS[view](np.asarray(pixels[first : first + batch_size])))
                    with precision.autocast():
                        out = backbone.prefix(torch.from_numpy(config.preprocess.normalise(chunk)), frozen)
                    array[first : first + len(chunk)] = out.float().numpy().astype(np.float16)
                    array.flush()
                    done[view] = first + len(chunk)
                    atomic_write_json(progress_file, done)
                    progress.update(len(chunk))
            log.info(
                "cached %s/%s features of %d photos in %.0f s",
                split,
                view,
                len(rows) - start,
                time.perf_counter() - started,
            )
        arrays[view] = np.load(path, mmap_mode="r")
    return arrays


@torch.no_grad()
def pooled_features(
    config: TrainConfig,
    backbone: SplitBackbone,
    split: str,
    rows: list[dict[str, str]],
    precision: Precision,
    chunk: int = 256,
    view: str = "o",
) -> torch.Tensor:
    """The whole frozen backbone's pooled output (N, features) for every photo of `rows` in one view
    (as is by default, `VIEWS`), through the feature cache: a linear probe's input, or a learner's in a
    simulation."""
    tokens = feature_cache(config, backbone, backbone.depth, split, rows, [view], precision)[view]
    return torch.cat(
        [
            torch.flatten(
                backbone.tail(
                    torch.from_numpy(np.asarray(tokens[i : i + chunk], np.float32)), backbone.depth
                ),
                1,
            )
            for i in range(0, len(tokens), chunk)
        ]
    ).float()


class CachedBatches:
    """(features, targets, row indices) batches from the cache: shuffled photos, one view per batch."""

    def __init__(self, arrays: dict[str, np.ndarray], targets: np.ndarray, batch_size: int) -> None:
        self.arrays, self.targets, self.batch_size = arrays, targets, batch_size
        self.views = sorted(arrays)

    def __len__(self) -> int:
        return -(-len(self.targets) // self.batch_size)

    def epoch(self, generator: np.random.Generator, train: bool) -> Any:
        order = generator.permutation(len(self.targets)) if train else np.arange(len(self.targets))
        for first in range(0, len(order), self.batch_size):
            rows = np.sort(order[first : first + self.batch_size])  # sorted: memory-map reads in order
            view = self.views[int(generator.integers(len(self.views)))] if train else "o"
            features = torch.from_numpy(np.asarray(self.arrays[view][rows], dtype=np.float32))
            yield features, torch.from_numpy(self.targets[rows]), torch.from_numpy(rows)


class CachedTrainer:
    """Epochs of training and validation on the cache, for `engine.train` (one process)."""

    def __init__(
        self,
        config: TrainConfig,
        model: CountingModel,
        train_rows: list[dict[str, str]],
        val_rows: list[dict[str, str]],
        num_classes: int,
        precision: Precision,
    ) -> None:
        self.config, self.model, self.precision = config, model, precision
        backbone = split_backbone(model.backbone)
        frozen = frozen_depth(config, backbone)
        for parameter in backbone.prefix_parameters(frozen):
            parameter.requires_grad_(False)
        model.eval()
        train_targets = np.minimum([int(r["count"]) for r in train_rows], num_classes - 1).astype(np.int64)
        self.val_counts = np.array([int(r["count"]) for r in val_rows], dtype=np.int64)
        val_targets = np.minimum(self.val_counts, num_classes - 1)
        train_arrays = feature_cache(
            config, backbone, frozen, "train", train_rows, config.cache_views, precision
        )
        val_arrays = feature_cache(config, backbone, frozen, "val", val_rows, ["o"], precision)
        self.tail = CachedTail(model, backbone, frozen)
        self.train_batches = CachedBatches(train_arrays, train_targets, config.batch_size)
        self.val_batches = CachedBatches(val_arrays, val_targets, 256)
        self.train_size, self.val_size = len(train_rows), len(val_rows)
        self.frozen = frozen
        self.steps_per_epoch = min(
            len(self.train_batches), config.max_train_batches or len(self.train_batches)
        )
        log.info(
            "training on cached features: %s frozen up to block %d of %d; %s",
            config.arch,
            frozen,
            backbone.depth,
            "the head trains"
            if frozen == backbone.depth
            else f"blocks {frozen + 1}-{backbone.depth} and the head train",
        )

    def train_epoch(
        self,
        objective: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler,
        monitors: Any,
        epoch: int,
        seed: int,
    ) -> EpochStats:
        from binsight.training.distributed import DistContext
        from binsight.training.loop import batch_loss, epoch_stats, optimizer_step

        self.tail.train()
        generator = np.random.default_rng(seed)
        loss_sum, seen, grad_norms = 0.0, 0, []
        started = time.perf_counter()
        with bar(
            self.steps_per_epoch * self.config.batch_size,
            f"epoch {epoch + 1}/{self.config.epochs}",
            unit="img",
        ) as progress:
            for step, (features, targets, rows) in enumerate(self.train_batches.epoch(generator, train=True)):
                if step >= self.steps_per_epoch:
                    break
                loss_at = functools.partial(
                    batch_loss, self.tail, self.precision, objective, features, targets, rows
                )
                loss = loss_at()
                grad_norms.append(
                    optimizer_step(
                        loss,
                        self.tail,
                        optimizer,
                        scheduler,
                        self.precision,
                        self.config,
                        monitors,
                        epoch,
                        step,
                        loss_at,
                    )
                )
                loss_sum += float(loss.detach()) * len(targets)
                seen += len(targets)
                progress.update(len(targets))
        return epoch_stats(DistContext(), loss_sum, seen, time.perf_counter() - started, 0.0, grad_norms)

    @torch.no_grad()
    def validate(self, model: CountingModel) -> tuple[np.ndarray, float]:
        """`model`'s probabilities for every validation photo (as is, as served) and the mean loss:
        the trained model, or its weight average."""
        tail = (
            self.tail
            if model is self.model
            else CachedTail(model, split_backbone(model.backbone), self.frozen)
        )
        tail.eval()
        head = model.head
        probabilities, losses = [], []
        for features, targets, _ in self.val_batches.epoch(np.random.default_rng(0), train=False):
            with self.precision.autocast():
                outputs = tail(features).float()
            losses.append(head.loss(outputs, targets, self.config.label_smoothing, reduction="none").numpy())
            probabilities.append(head.probabilities(outputs).numpy())
        return np.concatenate(probabilities), float(np.concatenate(losses).mean())
