"""Bin photos as tensors, fast enough that the model, not the loader, sets the pace.

Decoding uses Pillow's JPEG draft mode: the decoder itself scales by 1/2, 1/4 or 1/8 to the smallest
size still at least as large as needed, which skips most of the work on large photos. With
``cache=True`` each image is decoded and resized once into a uint8 array on disk (memory-mapped), so
later epochs only read bytes.
"""

from __future__ import annotations

import hashlib
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from torchvision.transforms import v2

from binsight.data.split import SPLIT_DIR
from binsight.errors import BinsightError
from binsight.imaging import IMAGENET_MEAN, IMAGENET_STD, decode_image, resize_square
from binsight.utils.io import read_csv
from binsight.utils.progress import track

log = logging.getLogger(__name__)


def train_transform(size: int, strength: float) -> v2.Compose:
    """Mild geometry (items near the edge must stay in the crop, or the label becomes wrong), with
    flips and photometric jitter for lighting and camera changes."""
    if strength <= 0:
        return eval_transform(size)
    return v2.Compose(
        [
            v2.ToImage(),
            v2.RandomResizedCrop(size, scale=(1.0 - 0.15 * strength, 1.0), ratio=(0.8, 1.25), antialias=True),
            v2.RandomHorizontalFlip(),
            v2.ColorJitter(
                brightness=0.3 * strength,
                contrast=0.3 * strength,
                saturation=0.25 * strength,
                hue=0.02 * strength,
            ),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )


class SquareResize:
    """A picklable transform (loader workers may be spawned) wrapping binsight.imaging.resize_square."""

    def __init__(self, size: int) -> None:
        self.size = size

    def __call__(self, image: Image.Image) -> Image.Image:
        return resize_square(image, self.size)


def eval_transform(size: int) -> v2.Compose:
    # Pillow's resize, as the server does (binsight.imaging), so offline metrics hold in production.
    return v2.Compose(
        [
            SquareResize(size),
            v2.ToImage(),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )


def load_split(data_dir: Path, split: str) -> list[dict[str, str]]:
    path = data_dir / SPLIT_DIR / f"{split}.csv"
    if not path.exists():
        raise BinsightError(
            f"no {split} split at {path}",
            hint=f"run `binsight data index {data_dir}` and `binsight data split {data_dir}`",
        )
    rows = read_csv(path)
    if not rows:
        raise BinsightError(f"the {split} split at {path} is empty", hint="add data or change the fractions")
    return rows


class BinDataset(Dataset[tuple[torch.Tensor, int, int]]):
    """(image tensor, count, row index) for every row of a split."""

    def __init__(
        self,
        data_dir: Path,
        rows: list[dict[str, str]],
        transform: v2.Compose,
        size: int,
        num_classes: int,
        cache_file: Path | None = None,
    ) -> None:
        self.data_dir = data_dir
        self.paths = [str(data_dir / row["image"]) for row in rows]
        raw = np.array([int(row["count"]) for row in rows], dtype=np.int64)
        if (raw >= num_classes).any():
            log.warning(
                "%d images count more than %d objects; they are treated as %d",
                int((raw >= num_classes).sum()),
                num_classes - 1,
                num_classes - 1,
            )
        self.targets = np.minimum(raw, num_classes - 1)
        self.transform = transform
        self.size = size
        self.cache: np.ndarray | None = None
        if cache_file is not None:
            self.cache = build_cache(self.paths, size, cache_file)

    def __len__(self) -> int:
        return len(self.paths)

    def load(self, index: int) -> Image.Image:
        if self.cache is not None:
            return Image.fromarray(self.cache[index])
        try:
            return decode_image(self.paths[index], self.size)
        except (OSError, SyntaxError) as exc:
            raise BinsightError(
                f"cannot decode {self.paths[index]}: {exc}",
                hint="re-run `binsight data index` to drop broken files",
            ) from None

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, int]:
        return self.transform(self.load(index)), int(self.targets[index]), index


def cache_path(data_dir: Path, split: str, rows: list[dict[str, str]], size: int) -> Path:
    digest = hashlib.sha256("\n".join(r["image"] for r in rows).encode()).hexdigest()[:12]
    return data_dir / ".cache" / f"{split}-{size}px-{digest}.npy"


def build_cache(paths: list[str], size: int, target: Path) -> np.ndarray:
    """Decode and resize every image once into a memory-mapped uint8 array (reused if present)."""
    if target.exists():
        cache = np.load(target, mmap_mode="r")
        if cache.shape == (len(paths), size, size, 3):
            return cache
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_suffix(".npy.part")
    array = np.lib.format.open_memmap(partial, mode="w+", dtype=np.uint8, shape=(len(paths), size, size, 3))

    def fill(index: int) -> None:
        image = resize_square(decode_image(paths[index], size), size)
        array[index] = np.asarray(image)

    with ThreadPoolExecutor(os.cpu_count() or 1) as pool:
        for _ in track(pool.map(fill, range(len(paths))), len(paths), f"caching {target.stem}", "img"):
            pass
    array.flush()
    os.replace(partial, target)
    return np.load(target, mmap_mode="r")


def seed_worker(worker_id: int) -> None:
    # Each worker's torch seed is derived from the loader's generator; numpy follows it.
    np.random.seed(torch.initial_seed() % 2**32)


def make_loader(
    dataset: BinDataset,
    batch_size: int,
    train: bool,
    workers: int,
    seed: int,
    distributed: bool,
    pin_memory: bool,
) -> DataLoader:
    sampler = DistributedSampler(dataset, shuffle=train, seed=seed, drop_last=False) if distributed else None
    generator = torch.Generator()
    generator.manual_seed(seed)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=train and sampler is None,
        sampler=sampler,
        num_workers=workers,
        pin_memory=pin_memory,
        drop_last=train and len(dataset) > batch_size,
        # Not persistent: workers are re-seeded each epoch, which makes a resumed run exact.
        persistent_workers=False,
        worker_init_fn=seed_worker,
        generator=generator,
        prefetch_factor=4 if workers > 0 else None,
    )
