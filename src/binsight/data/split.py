"""Stratified train/val/test splits that do not move when the command is run again.

Within each count class, images are ordered by a hash of (seed, id) and cut at the requested
fractions. The outcome depends only on the seed and the set of ids: not on file order, not on the
machine, not on the Python version, so a test set stays fixed across re-runs and re-downloads.
"""

from __future__ import annotations

import hashlib
import os
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from binsight.data.index import INDEX_FIELDS, checked_rows, load_index
from binsight.errors import BinsightError
from binsight.utils.io import atomic_write_csv, read_csv
from binsight.utils.records import JsonRecord

SPLITS = ("train", "val", "test")
SPLIT_DIR = "splits"


class SplitConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    val_fraction: float = Field(0.1, ge=0.0, lt=1.0, description="share of each count class for validation")
    test_fraction: float = Field(0.1, ge=0.0, lt=1.0, description="share of each count class for testing")
    seed: int = Field(0, description="seed of the stable assignment")

    @model_validator(mode="after")
    def _leaves_training_data(self) -> SplitConfig:
        if self.val_fraction + self.test_fraction >= 1.0:
            raise ValueError("val_fraction + test_fraction must be below 1 to leave training data")
        return self


def _rank(seed: int, image_id: str) -> bytes:
    return hashlib.sha256(f"{seed}:{image_id}".encode()).digest()


def assign_splits(rows: list[dict[str, str]], config: SplitConfig) -> dict[str, list[dict[str, str]]]:
    by_class: dict[str, list[dict[str, str]]] = defaultdict(list)
    for row in rows:
        # Stratified by the recorded count: a recount that corrects a label never moves its photo to
        # another split, so the test set stays the same photos as recounts arrive.
        by_class[str(row.get("recorded_count") or row["count"])].append(row)
    result: dict[str, list[dict[str, str]]] = {name: [] for name in SPLITS}
    for members in by_class.values():
        members = sorted(members, key=lambda r: _rank(config.seed, r["id"]))
        n = len(members)
        # A class too small to share still trains; every class of 3+ reaches val and test.
        n_test = max(1, round(n * config.test_fraction)) if n >= 3 and config.test_fraction else 0
        n_val = max(1, round(n * config.val_fraction)) if n >= 3 and config.val_fraction else 0
        result["test"].extend(members[:n_test])
        result["val"].extend(members[n_test : n_test + n_val])
        result["train"].extend(members[n_test + n_val :])
    for name in SPLITS:
        result[name].sort(key=lambda r: (int(r["count"]), _rank(config.seed, r["id"])))
    return result


def fingerprint(rows: Sequence[Mapping[str, object]]) -> str:
    """Identifies a split's content (ids and labels), for reports and the model registry."""
    digest = hashlib.sha256()
    for row in sorted(rows, key=lambda r: str(r["id"])):
        digest.update(f"{row['id']}:{row['count']}\n".encode())
    return digest.hexdigest()[:16]


class SplitPart(BaseModel):
    images: int
    fingerprint: str  # of the ids and counts: what a later comparison proves unchanged
    per_class: dict[str, int]


class SplitRecord(JsonRecord):
    """`splits/split.json`: the settings (so a re-split after new data keeps every old photo where it
    was) and each split's size, fingerprint and classes."""

    config: SplitConfig
    splits: dict[str, SplitPart]


def write_splits(
    data_dir: str | os.PathLike[str], config: SplitConfig, out_dir: str | os.PathLike[str] | None = None
) -> SplitRecord:
    rows = load_index(data_dir)
    if len(rows) < 3:
        raise BinsightError(f"the index has {len(rows)} images; a split needs at least 3")
    splits = assign_splits(rows, config)
    out = Path(out_dir) if out_dir else Path(data_dir) / SPLIT_DIR
    summary = SplitRecord(config=config, splits={})
    for name, members in splits.items():
        atomic_write_csv(out / f"{name}.csv", members, INDEX_FIELDS)
        counts: dict[str, int] = defaultdict(int)
        for row in members:
            counts[str(row["count"])] += 1
        summary.splits[name] = SplitPart(
            images=len(members),
            fingerprint=fingerprint(members),
            per_class=dict(sorted(counts.items(), key=lambda kv: int(kv[0]))),
        )
    summary.write(out / "split.json")
    return summary


class SplitSettings(SplitConfig):
    """`binsight data split`: the split's settings and the dataset to split."""

    data: Path = Field(description="dataset directory with index.csv")


def split_dataset(settings: SplitSettings) -> SplitRecord:
    return write_splits(settings.data, SplitConfig.model_validate(settings.model_dump(exclude={"data"})))


def spread_rows(rows: list[dict[str, str]], limit: int) -> list[dict[str, str]]:
    """At most `limit` rows, evenly spaced through a split. Split files are sorted by count, so the
    first rows are the empty and one-item bins only: a subset taken from the top would calibrate and
    check a model on the easiest photos."""
    if len(rows) <= limit:
        return rows
    return [rows[int(i)] for i in np.linspace(0, len(rows) - 1, limit).round()]


def load_split(data_dir: Path, split: str) -> list[dict[str, str]]:
    """The rows of one split (train, val or test) of a dataset, with a hint when it is missing."""
    path = data_dir / SPLIT_DIR / f"{split}.csv"
    if not path.exists():
        raise BinsightError(
            f"no {split} split at {path}",
            hint=f"run `binsight data index {data_dir}` and `binsight data split {data_dir}`",
        )
    rows = read_csv(path)
    if not rows:
        raise BinsightError(f"the {split} split at {path} is empty", hint="add data or change the fractions")
    return checked_rows(rows, path)
