"""Dataset statistics: class histogram per split, image sizes, label consistency."""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from binsight.data.index import load_index
from binsight.data.split import SPLIT_DIR, SPLITS
from binsight.errors import BinsightError
from binsight.utils.plots import bar_chart, histograms
from binsight.utils.records import JsonRecord


class Spread(BaseModel):
    min: float
    mean: float
    median: float
    max: float

    @classmethod
    def of(cls, values: list[float]) -> Spread:
        array = np.asarray(values, dtype=float)
        return cls(
            min=float(array.min()),
            mean=round(float(array.mean()), 2),
            median=float(np.median(array)),
            max=float(array.max()),
        )


class CountSummary(BaseModel):
    mean: float
    max: int


class MajorityClass(BaseModel):
    count: int
    share: float


class DatasetStats(JsonRecord):
    """`stats/stats.json` of `binsight data stats`."""

    images: int
    classes: dict[str, int]  # count -> images, over the whole index
    per_split: dict[str, dict[str, int]]
    count: CountSummary
    majority_class: MajorityClass
    quantity_mismatches: int
    width: Spread
    height: Spread
    kilobytes: Spread


def dataset_stats(
    data_dir: str | os.PathLike[str], out_dir: str | os.PathLike[str] | None = None
) -> DatasetStats:
    data_dir = Path(data_dir)
    out = Path(out_dir) if out_dir else data_dir / "stats"
    rows = load_index(data_dir)
    if not rows:
        raise BinsightError(f"the index of {data_dir} lists no photos", hint="index some photos first")
    per_split: dict[str, Counter[int]] = {"all": Counter(int(r["count"]) for r in rows)}
    for name in SPLITS:
        split_file = data_dir / SPLIT_DIR / f"{name}.csv"
        if split_file.exists():
            per_split[name] = Counter(int(r["count"]) for r in load_index(split_file))

    counts = np.array([int(r["count"]) for r in rows])
    majority_class, majority_n = per_split["all"].most_common(1)[0]
    stats = DatasetStats(
        images=len(rows),
        classes={str(k): v for k, v in sorted(per_split["all"].items())},
        per_split={
            name: {str(k): v for k, v in sorted(c.items())} for name, c in per_split.items() if name != "all"
        },
        count=CountSummary(mean=round(float(counts.mean()), 3), max=int(counts.max())),
        majority_class=MajorityClass(count=majority_class, share=round(majority_n / len(rows), 4)),
        quantity_mismatches=sum(int(r["quantity_mismatch"]) for r in rows),
        width=Spread.of([float(r["width"]) for r in rows]),
        height=Spread.of([float(r["height"]) for r in rows]),
        kilobytes=Spread.of([float(r["bytes"]) / 1024 for r in rows]),
    )
    bar_chart(
        {name: dict(c) for name, c in per_split.items() if name != "all" or len(per_split) == 1},
        f"Objects per bin ({len(rows)} images)",
        "objects in bin",
        out / "class_histogram.png",
    )
    histograms(
        {
            "width (px)": [float(r["width"]) for r in rows],
            "height (px)": [float(r["height"]) for r in rows],
            "file size (KiB)": [float(r["bytes"]) / 1024 for r in rows],
        },
        "Image sizes",
        out / "image_sizes.png",
    )
    stats.write(out / "stats.json")
    return stats


class StatsConfig(BaseModel):
    """`binsight data stats`."""

    model_config = ConfigDict(extra="forbid")

    data: Path = Field(description="dataset directory with index.csv")
    out: Path | None = Field(None, description="where to write plots (default DATA/stats)")


def describe_dataset(config: StatsConfig) -> DatasetStats:
    return dataset_stats(config.data, config.out)


def format_stats(stats: DatasetStats) -> str:
    lines = [f"images: {stats.images}   mean count: {stats.count.mean}   max count: {stats.count.max}"]
    splits = list(stats.per_split)
    header = f"{'count':>6} {'all':>8}" + "".join(f" {s:>8}" for s in splits)
    lines += [header, "-" * len(header)]
    for cls, n in stats.classes.items():
        lines.append(f"{cls:>6} {n:>8}" + "".join(f" {stats.per_split[s].get(cls, 0):>8}" for s in splits))
    share = stats.majority_class
    lines.append(f"majority class: {share.count} ({100 * share.share:.1f}% of images)")
    for key, s in (("width", stats.width), ("height", stats.height), ("kilobytes", stats.kilobytes)):
        lines.append(f"{key:>9}: min {s.min:.0f}  median {s.median:.0f}  mean {s.mean:.1f}  max {s.max:.0f}")
    lines.append(f"EXPECTED_QUANTITY != sum of item quantities: {stats.quantity_mismatches}")
    return "\n".join(lines)
