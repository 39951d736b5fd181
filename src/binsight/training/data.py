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

from binsight.errors import BinsightError
from binsight.imaging import Preprocess, Size, as_hw
from binsight.training.config import TrainConfig
from binsight.training.distributed import DistContext
from binsight.utils.progress import track

log = logging.getLogger(__name__)
# (image, class, row index) batches, as BinDataset yields them.
Loader = DataLoader[tuple[torch.Tensor, int, int]]


Stats = tuple[float, ...]


def train_transform(preprocess: Preprocess, strength: float, flip: str) -> v2.Compose:
    """Augmentation that keeps every item in view, or the label would be wrong: the photo is first
    resized to the model's input (as in evaluation, so the cached and uncached paths see the same
    pixels), then zoomed *out* a little (never in, beyond a 2% shift), flipped, and jittered in
    brightness, contrast and saturation for lighting and camera changes. A flip never changes a count.
    No hue jitter: the lighting is fixed, and its HSV round trip would double the loader's CPU time
    per image (measured 3.5 vs 1.6 ms at 224 px), which on a small CPU is taken from the model."""
    steps: list[v2.Transform | FixedResize | Normalised] = [FixedResize(preprocess), v2.ToImage()]
    if strength > 0:
        steps.append(
            v2.RandomAffine(
                degrees=3.0 * strength,
                translate=(0.02 * strength, 0.02 * strength),
                scale=(1.0 - 0.12 * strength, 1.0),
            )
        )
    if flip in ("h", "hv"):
        steps.append(v2.RandomHorizontalFlip())
    if flip == "hv":
        steps.append(v2.RandomVerticalFlip())
    if strength > 0:
        steps.append(
            v2.ColorJitter(
                brightness=0.3 * strength,
                contrast=0.3 * strength,
                saturation=0.25 * strength,
            )
        )
    steps.append(Normalised(preprocess))
    return v2.Compose(steps)


class FixedResize:
    """The first step of every transform: `Preprocess.pixels` (picklable: loader workers may be
    spawned)."""

    def __init__(self, preprocess: Preprocess) -> None:
        self.preprocess = preprocess

    def __call__(self, image: Image.Image) -> Image.Image:
        return Image.fromarray(self.preprocess.pixels(image))


class Normalised:
    """The last step of every transform: `Preprocess.normalise`, what the server and batch runs
    apply, so a model sees the same numbers in training, evaluation and production."""

    def __init__(self, preprocess: Preprocess) -> None:
        self.preprocess = preprocess

    def __call__(self, image: torch.Tensor | Image.Image) -> torch.Tensor:
        pixels = np.asarray(image) if isinstance(image, Image.Image) else image.permute(1, 2, 0).numpy()
        return torch.from_numpy(self.preprocess.normalise(pixels))


def eval_transform(preprocess: Preprocess) -> v2.Compose:
    """Exactly the serving path: `Preprocess` without augmentation."""
    return v2.Compose([FixedResize(preprocess), Normalised(preprocess)])


class BinDataset(Dataset[tuple[torch.Tensor, int, int]]):
    """(image tensor, class, row index) for every row of a split.

    The last class means "num_classes - 1 or more": the model is trained to say so for larger counts.
    `counts` keeps the recorded counts, against which the metrics judge every prediction.
    """

    def __init__(
        self,
        data_dir: Path,
        rows: list[dict[str, str]],
        transform: v2.Compose,
        preprocess: Preprocess,
        num_classes: int,
        cache_file: Path | None = None,
    ) -> None:
        self.data_dir = data_dir
        self.paths = [str(data_dir / row["image"]) for row in rows]
        self.counts = np.array([int(row["count"]) for row in rows], dtype=np.int64)
        overflow = int((self.counts >= num_classes).sum())
        if overflow:
            log.info(
                "%d images count more than %d objects: they train as the overflow class %d+",
                overflow,
                num_classes - 1,
                num_classes - 1,
            )
        self.targets = np.minimum(self.counts, num_classes - 1)
        self.transform = transform
        self.preprocess = preprocess
        self.cache: np.ndarray | None = None
        if cache_file is not None:
            self.cache = build_cache(self.paths, preprocess, cache_file)

    def __len__(self) -> int:
        return len(self.paths)

    def load(self, index: int) -> Image.Image:
        if self.cache is not None:
            return Image.fromarray(self.cache[index])
        try:
            return self.preprocess.decode(self.paths[index])
        except (OSError, SyntaxError) as exc:
            raise BinsightError(
                f"cannot decode {self.paths[index]}: {exc}",
                hint="re-run `binsight data index` to drop broken files",
            ) from None

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, int]:
        return self.transform(self.load(index)), int(self.targets[index]), index


class SumMosaic(Dataset[tuple[torch.Tensor, int, int]]):
    """Training photos of which a share is shown beside a second photo, each squeezed to half the
    width, and labelled with the sum of the two counts.

    Two bins side by side hold exactly the items of both, so the label stays true, and pairs of the
    plentiful 1- and 2-item photos make middle counts the data has few of. The partner's count is drawn
    uniformly among those that keep the sum within `largest_sum`, then a photo of that count. On real
    ABID photos it did not teach the middle counts (they fell further: docs/benchmarks.md, sixth round);
    it is an option, not part of a recipe. The index returned is the first photo's: per-photo side
    information (a teacher's answers) would be wrong for a pair, so distillation refuses mosaics.
    """

    def __init__(self, photos: BinDataset, share: float, largest_sum: int) -> None:
        self.photos, self.share, self.largest_sum = photos, share, largest_sum
        self.counts, self.targets = photos.counts, photos.targets
        self.of_count = [
            torch.from_numpy(np.flatnonzero(photos.targets == count)) for count in range(largest_sum + 1)
        ]

    def __len__(self) -> int:
        return len(self.photos)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, int]:
        first = int(self.targets[index])
        # torch's generator, as the transforms use: seeded per epoch and worker, so resumes are exact.
        if 1 <= first < self.largest_sum and float(torch.rand(())) < self.share:
            second = int(torch.randint(1, self.largest_sum - first + 1, ()))
            partners = self.of_count[second]
            if len(partners):
                partner = int(partners[int(torch.randint(len(partners), ()))])
                return self.photos.transform(self.pair(index, partner)), first + second, index
        return self.photos[index]

    def at_input_size(self, index: int) -> Image.Image:
        # `load` reads the cache where there is one; `pixels` leaves a photo already at size alone.
        return Image.fromarray(self.photos.preprocess.pixels(self.photos.load(index)))

    def pair(self, index: int, partner: int) -> Image.Image:
        left, right = self.at_input_size(index), self.at_input_size(partner)
        if float(torch.rand(())) < 0.5:
            left, right = right, left
        width, height = left.size
        half = width // 2
        canvas = Image.new("RGB", (width, height))
        canvas.paste(left.resize((half, height), Image.Resampling.BILINEAR), (0, 0))
        canvas.paste(right.resize((width - half, height), Image.Resampling.BILINEAR), (half, 0))
        return canvas


Photos = BinDataset | SumMosaic


def cache_path(data_dir: Path, split: str, rows: list[dict[str, str]], size: Size) -> Path:
    digest = hashlib.sha256("\n".join(r["image"] for r in rows).encode()).hexdigest()[:12]
    height, width = as_hw(size)
    return data_dir / ".cache" / f"{split}-{height}x{width}px-{digest}.npy"


def build_cache(paths: list[str], preprocess: Preprocess, target: Path) -> np.ndarray:
    """`Preprocess.pixels` of every image once, into a memory-mapped uint8 array (reused if present)."""
    height, width = preprocess.input_hw
    shape = (len(paths), height, width, 3)
    if target.exists():
        cache: np.ndarray = np.load(target, mmap_mode="r")
        if cache.shape == shape:
            return cache
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_suffix(".npy.part")
    array = np.lib.format.open_memmap(partial, mode="w+", dtype=np.uint8, shape=shape)

    def fill(index: int) -> None:
        array[index] = preprocess.pixels(preprocess.decode(paths[index]))

    with ThreadPoolExecutor(os.cpu_count() or 1) as pool:
        for _ in track(pool.map(fill, range(len(paths))), len(paths), f"caching {target.stem}", "img"):
            pass
    array.flush()
    os.replace(partial, target)
    built: np.ndarray = np.load(target, mmap_mode="r")
    return built


def seed_worker(worker_id: int) -> None:
    # Each worker's torch seed is derived from the loader's generator; numpy follows it.
    np.random.seed(torch.initial_seed() % 2**32)


def make_loader(
    dataset: Photos,
    batch_size: int,
    train: bool,
    workers: int,
    seed: int,
    distributed: bool,
    pin_memory: bool,
) -> Loader:
    sampler: DistributedSampler[tuple[torch.Tensor, int, int]] | None = (
        DistributedSampler(dataset, shuffle=train, seed=seed, drop_last=False) if distributed else None
    )
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


def build_datasets(
    config: TrainConfig,
    context: DistContext,
    train_rows: list[dict[str, str]],
    val_rows: list[dict[str, str]],
    num_classes: int,
) -> tuple[Photos, BinDataset]:
    """The two splits as datasets (with `mosaic`, training photos in pairs too); with `cache`, rank 0
    builds the decoded cache and the others open it."""
    data_dir = Path(config.data)
    cache = config.cache and context.is_main
    size, preprocess = config.input_hw, config.preprocess
    train_set = BinDataset(
        data_dir,
        train_rows,
        train_transform(preprocess, config.augment, config.flip),
        preprocess,
        num_classes,
        cache_path(data_dir, "train", train_rows, size) if cache else None,
    )
    val_set = BinDataset(
        data_dir,
        val_rows,
        eval_transform(preprocess),
        preprocess,
        num_classes,
        cache_path(data_dir, "val", val_rows, size) if cache else None,
    )
    if config.cache and context.enabled:
        torch.distributed.barrier()  # rank 0 built the cache; the others now open it
        if not context.is_main:
            train_set.cache = np.load(cache_path(data_dir, "train", train_rows, size), mmap_mode="r")
            val_set.cache = np.load(cache_path(data_dir, "val", val_rows, size), mmap_mode="r")
    if config.mosaic > 0:
        largest_sum = min(config.mosaic_max_sum or num_classes - 2, num_classes - 2)
        return SumMosaic(train_set, config.mosaic, largest_sum), val_set
    return train_set, val_set
