"""Counting accuracy on real ABID photos: binsight's recipe against the seeds' recipe, one split for all.

Rows (every one trained and tested on the same stratified split of ../shared/abid, seed 0, 60/20/20):
- majority class (the most common training count);
- the seeds' recipe: pretrained EfficientNet-Lite0 fine-tuned as the capstone notebooks did (squash to
  224, ImageNet mean/std, horizontal flip only, cross-entropy over counts 1-5 trained on 1-5 photos
  only, Adam lr 7.5e-4, batch 64, 6 epochs, no schedule, the last epoch's model);
- resnet18 from scratch with binsight's recipe (at 224 x 224: it is also the serving benchmark's model);
- binsight's recipe (`--recipe abid`) and its variants; the best variant is chosen on the *validation*
  split, never the test split, and reported on test.
Each row reports accuracy, ±1 accuracy, MAE, RMSE, ECE and per-count recall on all counts and on the
1-5 subset (the seeds' protocol), and its training minutes on this machine. Every model trains with the
precision `amp=auto` gives here (bf16 on CPUs with AVX512-BF16 or AMX).

Runs live in --work and are resumed, not redone, when the command is repeated (training resumes
exactly from its checkpoints), so a variant can be added without retraining the others.

Run: .venv/bin/python benchmarks/bench_accuracy.py [--abid ../shared/abid] [--work /tmp/binsight-accuracy]
     [--rows seeds,scratch,binsight,...]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from binsight.data.index import build_index
from binsight.data.split import SplitConfig, load_split, write_splits
from binsight.training.checkpoint import load_checkpoint
from binsight.training.config import load_config
from binsight.training.data import BinDataset, eval_transform, make_loader
from binsight.training.distributed import DistContext
from binsight.training.engine import train
from binsight.training.evaluate import load_model
from binsight.training.hardware import Precision
from binsight.training.loop import predict
from binsight.training.metrics import counting_metrics, majority_baseline
from binsight.utils.io import atomic_write_csv, atomic_write_json, read_csv

os.environ.setdefault("BINSIGHT_PROGRESS", "0")
SPLIT = SplitConfig(val_fraction=0.2, test_fraction=0.2, seed=0)
SUBSET = (1, 5)  # the seeds' protocol: counts 1-5


@dataclass
class Row:
    name: str
    settings: dict[str, Any]
    data: str = "all"  # "all" or "1-5": which photos it trains on
    checkpoint: str = "best.pt"  # the seeds kept their last epoch; binsight selects on validation
    recipe: str | None = "abid"
    tta: bool = False
    variant: bool = True  # a candidate for "binsight's best variant"
    results: dict[str, Any] = field(default_factory=dict)


SEEDS = {
    "arch": "efficientnet_lite0",
    "head": "classification",
    "num_classes": 6,
    "image_size": 224,
    "normalization": "imagenet",
    "augment": 0.0,
    "flip": "h",
    "optimizer": "adamw",
    "weight_decay": 0.0,  # AdamW without decay is Adam
    "lr": 7.5e-4,
    "batch_size": 64,
    "epochs": 6,
    "schedule": "constant",
    "warmup_epochs": 0,
    "early_stopping": None,
    "cache": True,
}

ROWS = {
    row.name: row
    for row in (
        Row("seeds", SEEDS, data="1-5", checkpoint="last.pt", recipe=None, variant=False),
        Row("scratch", {"arch": "resnet18", "pretrained": False, "image_width": 224}, variant=False),
        Row("binsight", {}),  # the abid recipe as shipped
        Row("binsight-tta", {}, tta=True),
        Row("binsight-square", {"image_width": 224}),
        Row("binsight-square-tta", {"image_width": 224}, tta=True),
        Row("binsight-ordinal", {"head": "ordinal"}),
    )
}
# Rows sharing a training run (TTA is an evaluation-time choice).
RUN_OF = {"binsight-tta": "binsight", "binsight-square-tta": "binsight-square"}


def prepare_data(abid: Path, work: Path) -> dict[str, Path]:
    data = work / "data"
    if not (data / "index.csv").exists():
        build_index(abid, out=data)
    write_splits(data, SPLIT)
    subset = work / "data-1to5"
    for split in ("train", "val", "test"):
        rows = [
            {**r, "image": os.path.relpath(data / r["image"], subset)}
            for r in load_split(data, split)
            if SUBSET[0] <= int(r["count"]) <= SUBSET[1]
        ]
        atomic_write_csv(subset / "splits" / f"{split}.csv", rows, list(rows[0]))
    return {"all": data, "1-5": subset}


def probabilities(
    run: Path, checkpoint: str, data: Path, split: str, tta: bool
) -> tuple[np.ndarray, np.ndarray]:
    """Per-image count probabilities of a trained run on a split; with TTA, averaged with the mirror."""
    model, config, num_classes = load_model(load_checkpoint(run / checkpoint))
    rows = load_split(data, split)
    dataset = BinDataset(
        data, rows, eval_transform(config.input_hw, *config.mean_std), config.input_hw, num_classes
    )
    loader = make_loader(dataset, 64, False, 2, 0, False, False)
    precision = Precision(config, torch.device("cpu"))
    _, probs, _ = predict(model, model.head, loader, torch.device("cpu"), precision, DistContext())
    if tta:
        mirror = _Mirrored(model)
        _, flipped, _ = predict(mirror, model.head, loader, torch.device("cpu"), precision, DistContext())
        probs = (probs + flipped) / 2
    return dataset.counts, probs


class _Mirrored(torch.nn.Module):
    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(torch.flip(images, dims=[3]))


def summarise(counts: np.ndarray, probs: np.ndarray) -> dict[str, Any]:
    """Metrics on all counts and on the 1-5 subset; class probabilities are padded to a common width."""
    in_subset = (counts >= SUBSET[0]) & (counts <= SUBSET[1])
    out: dict[str, Any] = {}
    for name, mask in (("all", np.ones_like(in_subset)), ("1-5", in_subset)):
        m = counting_metrics(counts[mask], probs[mask])
        predictions = probs[mask].argmax(axis=1)
        per_count = {
            str(k): float((predictions[counts[mask] == k] == k).mean())
            for k in range(SUBSET[0], SUBSET[1] + 1)
            if (counts[mask] == k).any()
        }
        out[name] = {
            key: m[key]
            for key in ("n", "accuracy", "off_by_one_accuracy", "mae", "rmse", "ece", "confusion_matrix")
        } | {"per_count_accuracy": per_count}
    return out


def train_row(row: Row, data: dict[str, Path], work: Path) -> Path:
    run = work / "runs" / RUN_OF.get(row.name, row.name)
    overrides: dict[str, object] = {"data": data[row.data], "out": run, **row.settings}
    config = load_config(None, overrides, recipe=row.recipe)
    started = time.perf_counter()
    train(config)
    logging.info("%s: trained or resumed in %.1f min", row.name, (time.perf_counter() - started) / 60)
    return run


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--abid", type=Path, default=Path(__file__).resolve().parents[1].parent / "shared" / "abid"
    )
    parser.add_argument("--work", type=Path, default=Path("/tmp/binsight-accuracy"))
    parser.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated, from {', '.join(ROWS)}")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    if not (args.abid / "labels.csv").is_file():
        print(
            f"SKIP: no real ABID photos at {args.abid} (labels.csv missing); pass --abid DIR", file=sys.stderr
        )
        return 0
    data = prepare_data(args.abid, args.work)
    chosen = [ROWS[name.strip()] for name in args.rows.split(",") if name.strip()]

    train_counts = np.array([int(r["count"]) for r in read_csv(data["all"] / "splits" / "train.csv")])
    test_counts = np.array([int(r["count"]) for r in read_csv(data["all"] / "splits" / "test.csv")])
    val_counts = np.array([int(r["count"]) for r in read_csv(data["all"] / "splits" / "val.csv")])
    subset = (test_counts >= SUBSET[0]) & (test_counts <= SUBSET[1])
    subset_train = train_counts[(train_counts >= SUBSET[0]) & (train_counts <= SUBSET[1])]
    results: dict[str, Any] = {
        "split": {
            **SPLIT.model_dump(),
            "train": len(train_counts),
            "val": len(val_counts),
            "test": len(test_counts),
        },
        "majority": {
            "all": {"accuracy": majority_baseline(train_counts, test_counts)},
            "1-5": {"accuracy": majority_baseline(subset_train, test_counts[subset])},
        },
        "rows": {},
    }
    for row in chosen:
        run = train_row(row, data, args.work)
        history = json.loads((run / "history.json").read_text())
        minutes = sum(h["seconds"] for h in history["history"]) / 60
        # Every row is tested on the same photos: the full test split, whatever it trained on.
        test = summarise(*probabilities(run, row.checkpoint, data["all"], "test", row.tta))
        val = summarise(*probabilities(run, row.checkpoint, data["all"], "val", row.tta))
        results["rows"][row.name] = {
            "train_minutes": minutes,
            "epochs": len(history["history"]),
            "val": val,
            "test": test,
        }
        atomic_write_json(args.work / "results.json", results)

    variants = {n: r for n, r in results["rows"].items() if ROWS[n].variant}
    if variants:
        best = max(variants, key=lambda n: variants[n]["val"]["all"]["accuracy"])
        results["best_variant_by_val"] = best
    atomic_write_json(args.work / "results.json", results)
    print_table(results)
    return 0


def print_table(results: dict[str, Any]) -> None:
    split = results["split"]
    sizes = f"train {split['train']} / val {split['val']} / test {split['test']}"
    print(f"\nsplit: seed {split['seed']}, {sizes} photos")
    seeds = results["rows"].get("seeds")
    for scope in ("1-5", "all"):
        print(f"\ntest, counts {scope}:")
        print(
            "| row | accuracy | vs seeds | ±1 acc | MAE | RMSE | ECE | per-count acc 1/2/3/4/5 "
            "| train min | val acc |"
        )
        print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
        print(f"| majority class | {results['majority'][scope]['accuracy']:.3f} | | | | | | | | |")
        for name, row in results["rows"].items():
            m = row["test"][scope]
            delta = f"{100 * (m['accuracy'] - seeds['test'][scope]['accuracy']):+.1f} pt" if seeds else ""
            per = "/".join(f"{m['per_count_accuracy'].get(str(k), float('nan')):.2f}" for k in range(1, 6))
            print(
                f"| {name} | {m['accuracy']:.3f} | {delta} | {m['off_by_one_accuracy']:.3f} "
                f"| {m['mae']:.3f} | {m['rmse']:.3f} | {m['ece']:.3f} | {per} | {row['train_minutes']:.1f} | "
                f"{row['val'][scope]['accuracy']:.3f} |"
            )
    if "best_variant_by_val" in results:
        print(
            f"\nbest binsight variant by validation accuracy (all counts): {results['best_variant_by_val']}"
        )


if __name__ == "__main__":
    sys.exit(main())
