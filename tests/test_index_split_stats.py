from __future__ import annotations

import json
import random
import shutil
from collections import Counter
from pathlib import Path

import pytest

from binsight.cli import main
from binsight.data.index import build_index, load_index
from binsight.data.split import SplitConfig, assign_splits, load_split, spread_rows, write_splits
from binsight.data.stats import dataset_stats
from binsight.errors import BinsightError
from binsight.utils.io import read_csv


@pytest.fixture()
def dataset(synth_dir: Path, tmp_path: Path) -> Path:
    root = tmp_path / "data"
    shutil.copytree(synth_dir, root)
    return root


def test_index_skips_and_reports_broken_files(dataset: Path) -> None:
    good = (dataset / "images/synth-000001.jpg").read_bytes()
    (dataset / "images/synth-000001.jpg").write_bytes(good[: len(good) // 3])  # truncated JPEG
    (dataset / "metadata/synth-000002.json").write_text("{broken")
    (dataset / "images/synth-000003.jpg").unlink()
    (dataset / "images/synth-000004.jpg").write_bytes(b"")
    result = build_index(dataset, workers=2)
    problems = {s["id"]: s["problem"] for s in result.skipped}
    assert set(problems) == {"synth-000001", "synth-000002", "synth-000003", "synth-000004"}
    assert problems["synth-000001"].startswith("corrupt image")
    assert problems["synth-000002"].startswith("bad metadata")
    assert problems["synth-000003"] == "image file missing"
    assert len(result.rows) == 116
    rows = load_index(dataset)
    assert {r["id"] for r in rows}.isdisjoint(problems)
    row = rows[0]
    assert row["image"] == f"images/{row['id']}.jpg" and row["width"] == "96"
    assert int(row["count"]) == int(row["quantity_sum"])


def test_split_is_stratified_stable_and_order_independent(dataset: Path) -> None:
    build_index(dataset)
    rows = load_index(dataset)
    config = SplitConfig(val_fraction=0.2, test_fraction=0.2, seed=3)
    splits = assign_splits(rows, config)
    assert sum(len(v) for v in splits.values()) == len(rows)
    ids = [set(r["id"] for r in splits[name]) for name in ("train", "val", "test")]
    assert not (ids[0] & ids[1] or ids[0] & ids[2] or ids[1] & ids[2])
    totals = Counter(r["count"] for r in rows)
    for name in ("val", "test"):
        per_class = Counter(r["count"] for r in splits[name])
        for cls, n in totals.items():
            if n >= 3:
                assert abs(per_class[cls] - 0.2 * n) <= 1, (name, cls)

    shuffled = rows[:]
    random.Random(0).shuffle(shuffled)
    assert assign_splits(shuffled, config) == splits
    assert assign_splits(rows, SplitConfig(val_fraction=0.2, test_fraction=0.2, seed=4)) != splits

    write_splits(dataset, config)
    first = {p.name: p.read_bytes() for p in (dataset / "splits").iterdir()}
    write_splits(dataset, config)
    assert {p.name: p.read_bytes() for p in (dataset / "splits").iterdir()} == first


def test_split_keeps_test_set_when_data_grows(dataset: Path) -> None:
    build_index(dataset)
    rows = load_index(dataset)
    config = SplitConfig(seed=0)
    test_before = {r["id"] for r in assign_splits(rows[:80], config)["test"]}
    test_after = {r["id"] for r in assign_splits(rows, config)["test"]}
    assert len(test_before & test_after) >= 0.6 * len(test_before)


def test_stats_writes_plots_and_numbers(dataset: Path) -> None:
    build_index(dataset)
    write_splits(dataset, SplitConfig())
    stats = dataset_stats(dataset)
    assert stats.images == 120
    assert sum(stats.classes.values()) == 120
    assert sum(sum(v.values()) for v in stats.per_split.values()) == 120
    for name in ("class_histogram.png", "image_sizes.png"):
        data = (dataset / "stats" / name).read_bytes()
        assert data[:4] == b"\x89PNG" and len(data) > 5000
    assert json.loads((dataset / "stats/stats.json").read_text())["images"] == 120


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["data", "index", "/nonexistent/dir"], "not a dataset directory"),
        (["data", "split", "/nonexistent/dir"], "no index at"),
        (["data", "split", ".", "--val-fraction", "0.6", "--test-fraction", "0.5"], "below 1"),
        (["data", "synth", "/tmp/x", "--n-images", "0"], "--n-images"),
        (["data", "download", "/tmp/x", "--classes", "a-b"], "not a range"),
    ],
)
def test_cli_errors_are_one_clear_line(argv: list[str], message: str, capsys: pytest.CaptureFixture) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_cli_pipeline_index_split_stats(dataset: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["data", "index", str(dataset)]) == 0
    assert main(["data", "split", str(dataset), "--seed", "1"]) == 0
    assert main(["data", "stats", str(dataset)]) == 0
    out = capsys.readouterr().out
    assert "120 images indexed" in out and "fingerprint" in out and "majority class" in out
    assert len(read_csv(dataset / "splits/train.csv")) > 80


def test_split_needs_enough_images(tmp_path: Path, dataset: Path) -> None:
    build_index(dataset)
    lines = (dataset / "index.csv").read_text().splitlines()
    (dataset / "index.csv").write_text("\n".join(lines[:3]) + "\n")
    with pytest.raises(BinsightError, match="at least 3"):
        write_splits(dataset, SplitConfig())


def test_a_spread_subset_of_a_split_keeps_every_count(dataset: Path) -> None:
    build_index(dataset)
    write_splits(dataset, SplitConfig(val_fraction=0.5, test_fraction=0.2))
    rows = load_split(dataset, "val")
    assert [int(r["count"]) for r in rows] == sorted(int(r["count"]) for r in rows)  # why spreading matters
    subset = spread_rows(rows, 8)
    assert len(subset) == 8 and len({r["id"] for r in subset}) == 8
    assert {r["count"] for r in subset} == {r["count"] for r in rows}  # not only the first counts
    assert spread_rows(rows, len(rows) + 5) == rows
