"""Counting accuracy on real ABID photos: every family under one protocol, one split for all.

Rows (every one trained and tested on the same stratified split of ../shared/abid, seed 0, 60/20/20):
- majority class (the most common training count);
- the seeds' recipe: pretrained EfficientNet-Lite0 fine-tuned as the capstone notebooks did (squash to
  224, ImageNet mean/std, horizontal flip only, cross-entropy over counts 1-5 trained on 1-5 photos
  only, Adam lr 7.5e-4, batch 64, 6 epochs, no schedule, the last epoch's model);
- `binsight`: today's `--recipe abid` (Lite0 fine-tuned at 224x304);
- `binsight-balanced`: the same with class-balanced loss weights (against the 1-or-5 collapse);
- `dinov2`: DINOv2 ViT-S/14 (self-supervised, packaged weights) at 224x308, its first 8 blocks frozen
  and cached, the last 4 blocks and the head trained on the cache (`--train-on-cache`);
- `teacher`: the average of the binsight and dinov2 models' probabilities (evaluation only);
- `student`: `--recipe abid` distilled from the teacher (`--teachers`, `--distill 0.5`): one Lite0,
  what the server runs.
Rows whose settings differ only at evaluation (TTA) share a training run. Every row reports accuracy,
±1 accuracy, MAE, RMSE, ECE and per-count accuracy on all counts and on 1-5 (the seeds' protocol),
under three decision rules (argmax, posterior median, posterior mean: each chosen for the metric it
minimises, on validation), its training minutes on this machine, and the audit's catch rate at 5/10/20%
re-checked with 10% of the test records corrupted: ranked as the audit ranks (P(record wrong)), and
in brackets by 1 - P(recorded), its ranking before the eleventh round. Recipes are chosen on the
validation split only.

Runs live in --work and are resumed, not redone, when the command is repeated (training resumes
exactly from its checkpoints), so a row can be added without retraining the others.

Run: .venv/bin/python benchmarks/bench_accuracy.py [--abid ../shared/abid] [--work /tmp/binsight-accuracy]
     [--rows seeds,binsight,...] [--device auto|cpu|cuda] [--workers N]
(--device auto trains and tests on the GPU where there is one; the rows' results are comparable only
under one device and one set of photos: results.json records the CPU and the GPU.)
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from binsight.audit.evaluation import BUDGETS, catch_curve, simulate_errors
from binsight.cpu import cpu_class, cpu_features
from binsight.data.index import build_index
from binsight.data.split import SplitConfig, load_split, spread_rows, write_splits
from binsight.inference.verdict import p_record_wrong
from binsight.training.checkpoint import load_checkpoint
from binsight.training.config import load_config
from binsight.training.engine import train
from binsight.training.evaluate import photo_probabilities
from binsight.training.metrics import counting_metrics, majority_baseline
from binsight.training.soup import SoupConfig, soup
from binsight.utils.io import atomic_write_bytes, atomic_write_csv, atomic_write_json, read_csv

os.environ.setdefault("BINSIGHT_PROGRESS", "0")
SPLIT = SplitConfig(val_fraction=0.2, test_fraction=0.2, seed=0)
SUBSET = (1, 5)  # the seeds' protocol: counts 1-5
LEARNING_CURVE = (25, 50)  # percent of the training photos for the learning-curve rows


@dataclass
class Row:
    name: str
    settings: dict[str, Any] = field(default_factory=dict)
    data: str = "all"  # "all", "1-5" or "train25"/"train50" (a share of them): which photos it trains on
    checkpoint: str = "best.pt"  # the seeds kept their last epoch; binsight selects on validation
    recipe: str | None = "abid"
    tta: bool = False
    ensemble: tuple[str, ...] = ()  # an evaluation-only row: the average of these rows' probabilities
    teachers: tuple[str, ...] = ()  # rows whose best.pt teach this one (distillation)
    soup: tuple[str, ...] = ()  # an evaluation-only row: these rows' weights averaged (`binsight soup`)
    greedy: bool = False  # the soup keeps only the members that help on validation (`--greedy`)
    refit: str | None = None  # a row whose run this one repeats on train+val (`--refit`): its val is fit
    calibrate: bool = True  # a soup row fits its temperature on validation (`--no-calibrate`)
    temperature_from: str | None = None  # a soup row that takes this soup row's fitted temperature
    init_from: str | None = None  # a row whose best.pt this one starts from (`--init-from`)


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

SEED_TAGS = ((0, ""), (1, "-seed1"), (2, "-seed2"))
# The Lite0 runs at 224x304 trained to the end (the stopped second seeds of the mosaic rows left out).
LITE0_RUNS = (
    *(f"binsight{tag}" for _, tag in SEED_TAGS),
    *(f"binsight-avg{tag}" for _, tag in SEED_TAGS),
    "binsight-balanced",
    "shared-init-seed1",
    "shared-init-seed2",
    *(f"lpft{tag}" for _, tag in SEED_TAGS),
    "mosaic",
    "mosaic-middle",
    "student",
    "student-avg-x3",
)

ROWS = {
    row.name: row
    for row in (
        Row("seeds", SEEDS, data="1-5", checkpoint="last.pt", recipe=None),
        Row("binsight"),  # --recipe abid as it ships (weights averaged since the fourth round)
        Row("binsight-balanced", {"class_balance": 0.5}),
        Row("dinov2", recipe="abid-dinov2"),
        Row("dinov2-6", {"frozen_blocks": 6}, recipe="abid-dinov2"),  # how much of the encoder to tune
        Row("dinov2-6-avg", {"frozen_blocks": 6, "average_decay": 0.999}, recipe="abid-dinov2"),
        Row("teacher", ensemble=("binsight", "dinov2")),
        Row("teacher-6", ensemble=("binsight", "dinov2-6")),
        Row("student", {"distill": 0.5}, teachers=("binsight", "dinov2")),
        Row("scratch", {"arch": "resnet18", "pretrained": False, "image_width": 224}),
        Row("binsight-tta", tta=True),  # the photo and its mirror averaged: two passes per photo
        Row("binsight-seed1-tta", {"seed": 1}, tta=True),
        # ABID photos are ~470x346: at 224x304 a small item is a few dozen pixels wide.
        Row("binsight-288", {"image_size": 288, "image_width": 384}),
        Row("binsight-320", {"image_size": 320, "image_width": 432}),
        # A served size for 2-core AVX2-only CPUs: about half the pixels, twice the model-only rate.
        *(
            Row(f"binsight-160{tag}", {"image_size": 160, "image_width": 224, "seed": seed})
            for seed, tag in SEED_TAGS
        ),
        # Between the two: 1.5x the model-only rate of 224x304 on the Zen 3.
        *(
            Row(f"binsight-192{tag}", {"image_size": 192, "image_width": 256, "seed": seed})
            for seed, tag in SEED_TAGS
        ),
        # The recipe's trained weights adapted to 160x224 in three epochs at a tenth of its rate: the
        # smaller served size without learning the count again from the ImageNet weights.
        *(
            Row(
                f"adapt-160{tag}",
                {
                    "image_size": 160,
                    "image_width": 224,
                    "epochs": 3,
                    "lr": 1e-4,
                    "warmup_epochs": 0,
                    "seed": seed,
                },
                init_from=f"binsight{tag}",
            )
            for seed, tag in SEED_TAGS
        ),
        Row("binsight-seed1", {"seed": 1}),  # the recipe's spread over training seeds
        Row("binsight-seed2", {"seed": 2}),
        # The moving average of the weights validated, kept and served instead of the trained weights.
        Row("binsight-avg", {"average_decay": 0.999}),
        Row("binsight-avg-seed1", {"average_decay": 0.999, "seed": 1}),
        Row("binsight-avg-seed2", {"average_decay": 0.999, "seed": 2}),
        # What a GPU affords (--device cuda): the photos at their own size (ABID's median is 470x346),
        # and twice the epochs; three seeds each, as the recipe rows.
        *(Row(f"native{tag}", {"image_size": 352, "image_width": 480, "seed": s}) for s, tag in SEED_TAGS),
        *(Row(f"epochs16{tag}", {"epochs": 16, "seed": seed}) for seed, tag in SEED_TAGS),
        # Half the schedule (the recipe keeps epoch 4 of 8 most often): half the minutes.
        *(Row(f"epochs4{tag}", {"epochs": 4, "seed": seed}) for seed, tag in SEED_TAGS),
        # Twice the augmentation (rotation 6 degrees, shifts 4%, zoom-out to 76%, jitter 0.6): the
        # recipe overfits from the fifth epoch on, and its augmentation strength was never measured.
        *(Row(f"augment2{tag}", {"augment": 2.0, "seed": seed}) for seed, tag in SEED_TAGS),
        # Larger Lite backbones at the recipe's resolution: the backbone changes, nothing else.
        Row("lite1", {"arch": "efficientnet_lite1"}),
        Row("lite2", {"arch": "efficientnet_lite2"}),
        # Two Lite0 runs averaged: servable as two passes of the small model (half its img/s).
        Row("lite0-x2-resolutions", ensemble=("binsight", "binsight-288")),
        Row("lite0-x2-seeds", ensemble=("binsight", "binsight-seed1")),
        Row("lite0-x3-seeds", ensemble=("binsight", "binsight-seed1", "binsight-seed2")),
        Row("three-models", ensemble=("binsight", "binsight-288", "dinov2")),
        Row("lite0-x2-seeds-tta", ensemble=("binsight-tta", "binsight-seed1-tta")),
        Row("lite0-lite1", ensemble=("binsight", "lite1")),
        Row("lite0-lite1-dinov2", ensemble=("binsight", "lite1", "dinov2")),
        # One model from three: the seeds' weights averaged, served at one Lite0's speed.
        Row("lite0-soup-x3", soup=("binsight", "binsight-seed1", "binsight-seed2")),
        Row("lite0-avg-soup-x3", soup=("binsight-avg", "binsight-avg-seed1", "binsight-avg-seed2")),
        Row("lite0-avg-x3-seeds", ensemble=("binsight-avg", "binsight-avg-seed1", "binsight-avg-seed2")),
        Row("lite0-160-soup-x3", soup=tuple(f"binsight-160{tag}" for _, tag in SEED_TAGS)),
        # Soup members that share the head's initial weights (--init-seed 0) and differ only in the
        # order and augmentation of their photos: the plain seeds' heads started apart.
        *(
            Row(f"shared-init{tag}", {"average_decay": 0.999, "seed": seed, "init_seed": 0})
            for seed, tag in SEED_TAGS[1:]
        ),
        # A share of the training photos paired side by side, labelled with the sum of their counts
        # (`--mosaic`): 2-, 3- and 4-item examples made from the plentiful 1- and 2-item photos.
        *(Row(f"mosaic{tag}", {"mosaic": 0.3, "seed": seed}) for seed, tag in SEED_TAGS),
        # Pairs that add up to 2-4 only: the sums above made the 5s most of all (every paired 4).
        *(
            Row(f"mosaic-middle{tag}", {"mosaic": 0.3, "mosaic_max_sum": 4, "seed": seed})
            for seed, tag in SEED_TAGS
        ),
        # LP-FT: the head starts as a linear probe on the frozen ImageNet features (`--probe-start`).
        *(Row(f"lpft{tag}", {"probe_start": True, "seed": seed}) for seed, tag in SEED_TAGS),
        Row("lpft-x3", ensemble=("lpft", "lpft-seed1", "lpft-seed2")),
        Row("lpft-soup-x3", soup=("lpft", "lpft-seed1", "lpft-seed2")),
        # Every Lite0 run at the recipe's input so far, as one pool: its soup, and its greedy soup
        # (members tried from the best on validation down, each kept only if validation does not fall).
        Row("lite0-soup-all", soup=LITE0_RUNS),
        Row("lite0-greedy-soup", soup=LITE0_RUNS, greedy=True),
        # The recipe's three seeds refitted on train+val (a third more photos), each stopped at the
        # epoch its own validation chose: what every labelled photo but the test split buys.
        *(Row(f"refit{tag}", recipe=None, refit=f"binsight-avg{tag}") for _, tag in SEED_TAGS),
        Row("refit-x3", ensemble=tuple(f"refit{tag}" for _, tag in SEED_TAGS)),
        # The ranked probability score added to the loss (`--rps-weight`): mass far from the count
        # costs more than mass next to it, against the RMSE of answers spread over 1 and 5.
        *(Row(f"rps{tag}", {"rps_weight": 1.0, "seed": seed}) for seed, tag in SEED_TAGS),
        # Stochastic depth in the backbone (`--drop-path`), against the overfitting that sets in after
        # epoch 4 (validation loss rising while the training loss falls).
        *(Row(f"drop-path{tag}", {"drop_path": 0.2, "seed": seed}) for seed, tag in SEED_TAGS[:2]),
        # Sharpness-aware minimisation (`--sam`, rho 0.05): flat minima against the same overfitting,
        # and robust to noisy labels (ABID's counts are inventory records); twice the compute a step.
        *(Row(f"sam{tag}", {"sam": 0.05, "seed": seed}) for seed, tag in SEED_TAGS[:2]),
        # SAM's flat minima should average better than plain ones (weights and answers alike).
        Row("sam-soup", soup=("sam", "sam-seed1")),
        Row("sam-x2", ensemble=("sam", "sam-seed1")),
        # The learning rate, never swept on the 4,564 photos: half and twice the recipe's 1e-3 (the
        # backbone keeps its 0.5x), against validation loss that rises after epoch 4. One seed each.
        Row("lr-half", {"lr": 5e-4}),
        Row("lr-double", {"lr": 2e-3}),
        # Twice the neighbour smoothing: a 2- and a 4-item photo each put more of their target on 3, the
        # count every model here answers least. One seed.
        Row("smooth-0.2", {"neighbour_smoothing": 0.2}),
        # ... and none (plain cross-entropy), never measured on the 4,564 photos: if doubling the
        # smoothing collapsed the 3-item answers, removing it may bring them back. One seed.
        Row("smooth-0", {"neighbour_smoothing": 0.0}),
        # Half the batch at the same learning rate: twice the updates and more gradient noise, the cheap
        # flat-minimum lever beside SAM (which raised validation accuracy at twice the compute). One seed.
        Row("batch-16", {"batch_size": 16}),
        # Layer-wise learning rates (`--layer-decay`, BEiT's decay through timm's parameter groups):
        # the low-level ImageNet filters move least. One seed: an indication, not a choice.
        Row("layer-decay", {"layer_decay": 0.9}),
        # A soup of refits cannot be calibrated on the photos they trained on: it takes the temperature
        # fitted for the soup of the runs they repeat (`binsight soup --temperature`), measured against
        # the uncalibrated refit soup. The two drop-path seeds: the runs this machine had.
        *(Row(f"refit-drop-path{tag}", recipe=None, refit=f"drop-path{tag}") for _, tag in SEED_TAGS[:2]),
        Row("drop-path-soup", soup=("drop-path", "drop-path-seed1")),
        Row(
            "refit-drop-path-soup",
            soup=("refit-drop-path", "refit-drop-path-seed1"),
            temperature_from="drop-path-soup",
        ),
        Row("refit-drop-path-soup-raw", soup=("refit-drop-path", "refit-drop-path-seed1"), calibrate=False),
        # The recipe on a quarter and a half of the training photos: what more photos would buy.
        *(Row(f"recipe-train{percent}", data=f"train{percent}") for percent in LEARNING_CURVE),
        # The re-check loop's retraining: yesterday's model (half the photos) goes on with all of them
        # (`--init-from`) at half the recipe's rate for half its epochs, instead of starting from ImageNet.
        Row(
            "grow-from-train50",
            {"epochs": 4, "lr": 5e-4, "warmup_epochs": 0},
            init_from="recipe-train50",
        ),
        # The same, shrunk halfway back to a fresh start first (`--init-shrink`), at the recipe's rate.
        *(
            Row(
                f"grow-sp-train50{tag}",
                {"epochs": 4, "lr": 1e-3, "warmup_epochs": 0.5, "init_shrink": 0.5, "seed": seed},
                init_from="recipe-train50",
            )
            for seed, tag in SEED_TAGS[:2]
        ),
        # Their control: a fresh run from ImageNet on all the photos in the same 4 epochs.
        *(
            Row(f"recipe-4ep{tag}", {"epochs": 4, "warmup_epochs": 0.5, "seed": seed})
            for seed, tag in SEED_TAGS[:2]
        ),
        Row("lite0-shared-soup-x3", soup=("binsight-avg", "shared-init-seed1", "shared-init-seed2")),
        Row("lite0-shared-x3", ensemble=("binsight-avg", "shared-init-seed1", "shared-init-seed2")),
        # One Lite0 taught by the best ensemble measured (three averaged seeds): one pass, as served.
        Row(
            "student-avg-x3",
            {"distill": 0.5},
            teachers=("binsight-avg", "binsight-avg-seed1", "binsight-avg-seed2"),
        ),
    )
}
DEFAULT_ROWS = ("seeds", "binsight", "binsight-balanced", "dinov2", "teacher", "student")
# Rows sharing a training run (TTA is an evaluation-time choice).
RUN_OF = {"binsight-tta": "binsight", "binsight-seed1-tta": "binsight-seed1"}


def prepare_data(abid: Path, work: Path) -> dict[str, Path]:
    data = work / "data"
    if not (data / "index.csv").exists():
        build_index(abid, out=data)
    write_splits(data, SPLIT)
    folders = {"all": data}
    # Views of the same photos (their splits rewritten, the images referenced where they lie): the
    # seeds' counts 1-5 in every split, and for the learning curve a share of the training photos
    # (every count in proportion: split files are sorted by count) with the full val and test splits.
    views: dict[str, Callable[[str, list[dict[str, str]]], list[dict[str, str]]]] = {
        "1-5": lambda _, rows: [r for r in rows if SUBSET[0] <= int(r["count"]) <= SUBSET[1]],
        **{
            f"train{percent}": lambda split, rows, percent=percent: (
                spread_rows(rows, round(len(rows) * percent / 100)) if split == "train" else rows
            )
            for percent in LEARNING_CURVE
        },
    }
    for name, choose in views.items():
        folder = work / ("data-1to5" if name == "1-5" else f"data-{name}")
        for split in ("train", "val", "test"):
            rows = [
                {**r, "image": os.path.relpath(data / r["image"], folder)}
                for r in choose(split, load_split(data, split))
            ]
            atomic_write_csv(folder / "splits" / f"{split}.csv", rows, list(rows[0]))
        folders[name] = folder
    return folders


def run_dir(work: Path, name: str) -> Path:
    return work / "runs" / RUN_OF.get(name, name)


@dataclass(frozen=True)
class Runtime:
    """Where rows train and are evaluated: "auto" takes the GPU where there is one."""

    device: str = "auto"
    workers: int = 2


def row_probabilities(row: Row, work: Path, data: Path, split: str, runtime: Runtime) -> np.ndarray:
    """Count probabilities of a row on a split (padded to 7 classes, so rows of 6 and 7 classes mix)."""
    if row.ensemble:
        return np.mean(
            [row_probabilities(ROWS[name], work, data, split, runtime) for name in row.ensemble], axis=0
        )
    checkpoint = run_dir(work, row.name) / row.checkpoint
    # Ensembles reuse their members' answers: kept beside the checkpoint, redone when it is newer.
    cached = checkpoint.with_name(f"probabilities-{split}-{checkpoint.stem}{'-tta' if row.tta else ''}.npy")
    if cached.is_file() and cached.stat().st_mtime > checkpoint.stat().st_mtime:
        return np.load(cached)
    probabilities = photo_probabilities(
        checkpoint,
        data,
        load_split(data, split),
        mirrored=row.tta,
        device=runtime.device,
        workers=runtime.workers,
    )
    probabilities = np.pad(probabilities, ((0, 0), (0, 7 - probabilities.shape[1])))
    buffer = io.BytesIO()
    np.save(buffer, probabilities)
    atomic_write_bytes(cached, buffer.getvalue())
    return probabilities


def decisions(probabilities: np.ndarray) -> dict[str, np.ndarray]:
    """The three answers a distribution gives: the most likely count, the posterior median, the mean."""
    classes = np.arange(probabilities.shape[1])
    return {
        "argmax": probabilities.argmax(axis=1),
        "median": (probabilities.cumsum(axis=1) >= 0.5).argmax(axis=1),
        "mean": probabilities @ classes,
    }


def summarise(counts: np.ndarray, probabilities: np.ndarray) -> dict[str, Any]:
    """Metrics on all counts and on the 1-5 subset, under each decision rule."""
    in_subset = (counts >= SUBSET[0]) & (counts <= SUBSET[1])
    out: dict[str, Any] = {}
    for name, mask in (("all", np.ones_like(in_subset)), ("1-5", in_subset)):
        m = counting_metrics(counts[mask], probabilities[mask])
        answers = decisions(probabilities[mask])
        truth = counts[mask]
        predictions = answers["argmax"]
        per_count = {
            str(k): float((predictions[truth == k] == k).mean()) for k in range(SUBSET[0], SUBSET[1] + 1)
        }
        out[name] = m.model_dump(
            include={"n", "accuracy", "off_by_one_accuracy", "mae", "rmse", "ece", "confusion_matrix"}
        ) | {
            "per_count_accuracy": per_count,
            "by_rule": {
                rule: {
                    "accuracy": float((np.rint(a) == truth).mean()),
                    "mae": float(np.abs(a - truth).mean()),
                    "rmse": float(np.sqrt(((a - truth) ** 2).mean())),
                }
                for rule, a in answers.items()
            },
        }
    return out


def audit_catch(
    counts: np.ndarray, probabilities: np.ndarray, rank_by_p_recorded: bool = False, seeds: int = 5
) -> dict[str, float]:
    """Share of wrong records caught re-checking the top 5/10/20%, 10% corrupted: ranked as the audit
    ranks (P(record wrong)), or, the baseline, by 1 - P(recorded)."""
    classes = probabilities.shape[1]
    truth = np.minimum(counts, classes - 1)
    caught: dict[str, list[float]] = {f"{int(b * 100)}%": [] for b in BUDGETS}
    for seed in range(seeds):
        recorded, is_error = simulate_errors(truth, 0.1, classes, seed)
        if rank_by_p_recorded:
            scores = 1 - probabilities[np.arange(len(recorded)), recorded]
        else:
            scores = p_record_wrong(probabilities, recorded, 0.1)
        _, curve = catch_curve(scores, is_error)
        for budget in BUDGETS:
            caught[f"{int(budget * 100)}%"].append(float(curve[max(1, round(budget * len(scores))) - 1]))
    return {k: float(np.mean(v)) for k, v in caught.items()}


def train_row(row: Row, data: dict[str, Path], work: Path, runtime: Runtime) -> float:
    """Train (or resume) a row's run; returns its training minutes."""
    run = run_dir(work, row.name)
    overrides: dict[str, object] = {
        "data": data[row.data],
        "out": run,
        "device": runtime.device,
        "workers": runtime.workers,
        **row.settings,
    }
    if row.teachers:
        overrides["teachers"] = [run_dir(work, t) / ROWS[t].checkpoint for t in row.teachers]
    if row.init_from:
        overrides["init_from"] = run_dir(work, row.init_from) / ROWS[row.init_from].checkpoint
    refit = run_dir(work, row.refit) if row.refit else None
    config = load_config(None, overrides, recipe=row.recipe, refit=refit)
    started = time.perf_counter()
    summary = train(config)
    logging.info("%s: trained or resumed in %.1f min", row.name, (time.perf_counter() - started) / 60)
    return sum(h.seconds for h in summary.history) / 60


def evaluate_row(
    row: Row, data: dict[str, Path], work: Path, results: dict[str, Any], runtime: Runtime
) -> dict[str, Any]:
    minutes = 0.0
    if row.ensemble or row.soup:
        minutes = sum(results["rows"][name]["train_minutes"] for name in row.ensemble or row.soup)
    if row.soup:
        members = [run_dir(work, name) / ROWS[name].checkpoint for name in row.soup]
        made = run_dir(work, row.name) / row.checkpoint
        if not made.is_file() or made.stat().st_mtime < max(m.stat().st_mtime for m in members):
            temperature = None
            if row.temperature_from:
                source = run_dir(work, row.temperature_from) / ROWS[row.temperature_from].checkpoint
                temperature = load_checkpoint(source)["temperature"]
            soup(
                SoupConfig(
                    checkpoints=members,
                    out=made,
                    greedy=row.greedy,
                    calibrate=row.calibrate,
                    temperature=temperature,
                )
            )
    elif not row.ensemble:
        for teacher in row.teachers:
            minutes += results["rows"].get(teacher, {}).get("train_minutes", 0.0)
        minutes += train_row(row, data, work, runtime)
    counts = {
        split: np.array([int(r["count"]) for r in read_csv(data["all"] / "splits" / f"{split}.csv")])
        for split in ("val", "test")
    }
    # Every row is tested on the same photos: the full split, whatever it trained on.
    probabilities = {
        split: row_probabilities(row, work, data["all"], split, runtime) for split in ("val", "test")
    }
    return {
        "train_minutes": minutes,
        "val": summarise(counts["val"], probabilities["val"]),
        "test": summarise(counts["test"], probabilities["test"]),
        "audit_catch_test": audit_catch(counts["test"], probabilities["test"]),
        "audit_catch_test_by_p_recorded": audit_catch(counts["test"], probabilities["test"], True),
        # A refit trained on the validation photos: its val column measures fit, not accuracy.
        "val_is_fit": any(ROWS[name].refit for name in (row.name, *row.ensemble, *row.soup)),
    }


def add_data_options(parser: argparse.ArgumentParser) -> None:
    """--abid and --work, shared with the benchmarks that reuse this split and its runs."""
    parser.add_argument(
        "--abid", type=Path, default=Path(__file__).resolve().parents[1].parent / "shared" / "abid"
    )
    parser.add_argument("--work", type=Path, default=Path("/tmp/binsight-accuracy"))


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_data_options(parser)
    parser.add_argument(
        "--rows", default=",".join(DEFAULT_ROWS), help=f"comma-separated, from {', '.join(ROWS)}"
    )
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (training and testing)")
    parser.add_argument("--workers", type=int, default=2, help="photo-decoding processes (a GPU wants more)")
    args = parser.parse_args()
    runtime = Runtime(args.device, args.workers)
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
    results_path = args.work / "results.json"
    results: dict[str, Any] = json.loads(results_path.read_text()) if results_path.is_file() else {"rows": {}}
    results.update(
        cpu=[cpu_class(), *sorted(cpu_features())],
        gpu=torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        split={
            **SPLIT.model_dump(),
            "train": len(train_counts),
            "val": len(val_counts),
            "test": len(test_counts),
        },
        majority={
            "all": {"accuracy": majority_baseline(train_counts, test_counts)},
            "1-5": {"accuracy": majority_baseline(subset_train, test_counts[subset])},
        },
    )
    for row in chosen:
        evaluated = evaluate_row(row, data, args.work, results, runtime)
        # Another run of this benchmark may have added rows meanwhile (a long training in one process,
        # evaluation-only rows in another): keep them.
        if results_path.is_file():
            results["rows"] = json.loads(results_path.read_text())["rows"] | results["rows"]
        results["rows"][row.name] = evaluated
        atomic_write_json(results_path, results)
    print_table(results)
    return 0


def catch_cell(row: dict[str, Any]) -> str:
    """The audit's catch at 5/10/20%, and in brackets the same by 1 - P(recorded). A row evaluated
    before the eleventh round has only the first, ranked by 1 - P(recorded) then."""

    def rates(key: str) -> str:
        return "/".join(f"{100 * row[key][f'{int(100 * b)}%']:.0f}" for b in BUDGETS)

    cell = rates("audit_catch_test")
    if "audit_catch_test_by_p_recorded" in row:
        cell += f" (1-P: {rates('audit_catch_test_by_p_recorded')})"
    return cell


def print_table(results: dict[str, Any]) -> None:
    split = results["split"]
    sizes = f"train {split['train']} / val {split['val']} / test {split['test']}"
    print(f"\nsplit: seed {split['seed']}, {sizes} photos; CPU flags {', '.join(results['cpu'])}")
    seeds = results["rows"].get("seeds")
    for scope in ("1-5", "all"):
        print(f"\ntest, counts {scope}:")
        print(
            "| row | accuracy | vs seeds | ±1 acc | MAE (median) | RMSE (mean) | ECE "
            "| per-count acc 1/2/3/4/5 | audit catch 5/10/20% | train min | val acc |"
        )
        print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
        print(f"| majority class | {results['majority'][scope]['accuracy']:.3f} | | | | | | | | | |")
        for name, row in results["rows"].items():
            m = row["test"][scope]
            rules = m["by_rule"]
            delta = f"{100 * (m['accuracy'] - seeds['test'][scope]['accuracy']):+.1f} pt" if seeds else ""
            per = "/".join(f"{m['per_count_accuracy'].get(str(k), float('nan')):.2f}" for k in range(1, 6))
            catch = catch_cell(row)
            print(
                f"| {name} | {m['accuracy']:.3f} | {delta} | {m['off_by_one_accuracy']:.3f} "
                f"| {m['mae']:.3f} ({rules['median']['mae']:.3f}) "
                f"| {m['rmse']:.3f} ({rules['mean']['rmse']:.3f}) "
                f"| {m['ece']:.3f} | {per} | {catch} | {row['train_minutes']:.1f} | "
                f"{row['val'][scope]['accuracy']:.3f}{' (fit)' if row.get('val_is_fit') else ''} |"
            )


if __name__ == "__main__":
    sys.exit(main())
