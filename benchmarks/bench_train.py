"""Training throughput with real data loading vs the same steps on tensors already in memory.

The ratio (loader / in-memory) says how much the input pipeline slows training: 1.0 means the model is
the bottleneck, as it should be. Measured for plain JPEG decoding and for the pre-resized uint8 cache.

Run: .venv/bin/python benchmarks/bench_train.py [--image-size 224] [--steps 30] [--workers 2]
(uses CUDA with AMP and channels_last when a GPU is visible)
"""

from __future__ import annotations

import argparse
import logging
import os
import tempfile
import time
from pathlib import Path

import torch

from binsight.data.index import build_index
from binsight.data.split import SplitConfig, load_split, write_splits
from binsight.data.synth import SynthConfig, generate_dataset
from binsight.models.factory import build_model
from binsight.training.config import TrainConfig
from binsight.training.data import BinDataset, cache_path, make_loader, train_transform
from binsight.training.distributed import DistContext
from binsight.training.hardware import Precision, resolve_device
from binsight.training.loop import train_one_epoch
from binsight.training.monitors import Monitors
from binsight.training.optim import build_optimizer, build_scheduler

os.environ.setdefault("BINSIGHT_PROGRESS", "0")


class InMemoryBatches:
    """Stands where a DataLoader stands, but every batch is already a tensor in memory."""

    def __init__(
        self, batches: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], batch_size: int
    ) -> None:
        self.batches, self.batch_size = batches, batch_size

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(self.batches)


def run(config: TrainConfig, loader: object, steps: int) -> float:
    device = resolve_device(config.device, DistContext())
    torch.manual_seed(0)
    model = build_model(config.arch, "classification", 6).to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(model, config)
    scheduler = build_scheduler(optimizer, config, steps)
    stats = train_one_epoch(
        model,
        model.head,
        loader,
        optimizer,
        scheduler,
        Precision(config, device),  # type: ignore[arg-type]
        device,
        config,
        Monitors(),
        0,
        DistContext(),
    )
    return stats.train_images_per_second


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--arch", default="resnet18")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        n_images = args.batch_size * (args.steps + 1)
        # Real ABID photos are larger than the model input; synthesise at 2x so decoding does real work.
        generate_dataset(data, SynthConfig(n_images=int(n_images / 0.8) + 8, image_size=2 * args.image_size))
        build_index(data)
        write_splits(data, SplitConfig(val_fraction=0.1, test_fraction=0.1))
        rows = load_split(data, "train")
        config = TrainConfig(
            data=data,
            arch=args.arch,
            pretrained=False,
            image_size=args.image_size,
            batch_size=args.batch_size,
            workers=args.workers,
            max_train_batches=args.steps,
            epochs=1,
        )
        device = resolve_device("auto", DistContext())

        def loader(cache: bool) -> object:
            dataset = BinDataset(
                data,
                rows,
                train_transform(config.preprocess, 1.0, "hv"),
                config.preprocess,
                6,
                cache_path(data, "train", rows, args.image_size) if cache else None,
            )
            return make_loader(dataset, args.batch_size, True, args.workers, 0, False, device.type == "cuda")

        warm = run(config.model_copy(update={"max_train_batches": 3}), loader(False), 3)  # first-touch costs
        jpeg = run(config, loader(False), args.steps)
        cached_loader = loader(True)
        cached = run(config, cached_loader, args.steps)
        batches = [next(iter(cached_loader)) for _ in range(min(args.steps, 8))]
        in_memory = run(
            config, InMemoryBatches((batches * args.steps)[: args.steps], args.batch_size), args.steps
        )
        del warm
        print(
            f"device {device}, {args.arch} @ {args.image_size}px, batch {args.batch_size}, "
            f"{args.steps} steps, {args.workers} loader workers, torch threads {torch.get_num_threads()}"
        )
        print(f"  in-memory tensors       : {in_memory:8.1f} images/s (baseline)")
        print(f"  JPEG decode + augment   : {jpeg:8.1f} images/s  ratio {jpeg / in_memory:.2f}")
        print(f"  uint8 cache + augment   : {cached:8.1f} images/s  ratio {cached / in_memory:.2f}")
        started = time.perf_counter()
        for _ in cached_loader:  # type: ignore[attr-defined]
            pass
        alone = len(rows) / (time.perf_counter() - started)
        print(f"  loader alone (cache)    : {alone:8.1f} images/s")


if __name__ == "__main__":
    main()
