"""`binsight data ...`: download, index, split, describe or synthesize photos."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from binsight.cliargs import add_command, config_from_args
from binsight.data.download import DownloadConfig
from binsight.data.split import SplitConfig
from binsight.data.synth import SynthConfig

log = logging.getLogger("binsight")


class SynthSettings(SynthConfig):
    out: Path = Field(description="dataset directory to write")


class IndexSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    data: Path = Field(
        description="photo folder: bucket layout, <count>/<id>.jpg folders, or images/ with labels.csv"
    )
    labels: Path | None = Field(None, description="CSV of id,count (default: DATA/labels.csv)")
    recounts: Path | None = Field(
        None, description="people's recounts (`binsight recheck export`): they outrank the recorded counts"
    )
    out: Path | None = Field(None, description="where index.csv (and then splits/) go (default: DATA)")
    workers: int | None = Field(None, ge=1, description="parallel readers (default: all cores)")


class SplitSettings(SplitConfig):
    data: Path = Field(description="dataset directory with index.csv")


class StatsSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    data: Path = Field(description="dataset directory with index.csv")
    out: Path | None = Field(None, description="where to write plots (default DATA/stats)")


def _cmd_data_synth(args: argparse.Namespace) -> int:
    import time

    from binsight.data.synth import generate_dataset

    settings = config_from_args(args, SynthSettings)
    config = SynthConfig.model_validate(settings.model_dump(exclude={"out"}))
    started = time.perf_counter()
    written = generate_dataset(settings.out, config)
    seconds = time.perf_counter() - started
    print(
        f"synth: {written} new images ({config.n_images - written} already there) in {settings.out}"
        f" at {written / max(seconds, 1e-9):.0f} images/s"
    )
    return 0


def _cmd_data_download(args: argparse.Namespace) -> int:
    from binsight.data.download import download

    config = config_from_args(args, DownloadConfig)
    report = download(config)
    print(
        f"download: {report['selected']} selected, {report['downloaded']} downloaded, "
        f"{report['already_present']} already present, {report['failed']} failed "
        f"({report['images_per_second'] or 0} images/s); report in "
        f"{config.out / 'download_report.json'}"
    )
    for problem in report["problems"][:10]:
        print(f"  {problem['id']}: {problem['problem']}", file=sys.stderr)
    if len(report["problems"]) > 10:
        print(f"  ... and {len(report['problems']) - 10} more", file=sys.stderr)
    return 0 if report["failed"] == 0 else 1


def _cmd_data_index(args: argparse.Namespace) -> int:
    from binsight.data.index import build_index

    settings = config_from_args(args, IndexSettings)
    result = build_index(
        settings.data,
        workers=settings.workers,
        out=settings.out,
        labels=settings.labels,
        recounts=settings.recounts,
    )
    mismatches = sum(int(r["quantity_mismatch"]) for r in result.rows)
    print(
        f"index ({result.layout} layout): {len(result.rows)} images indexed, {len(result.skipped)} skipped, "
        f"{mismatches} with EXPECTED_QUANTITY != sum of item quantities -> {result.path}"
    )
    for skipped in result.skipped[:10]:
        print(f"  skipped {skipped['id']}: {skipped['problem']}", file=sys.stderr)
    return 0


def _cmd_data_split(args: argparse.Namespace) -> int:
    from binsight.data.split import write_splits

    settings = config_from_args(args, SplitSettings)
    summary = write_splits(settings.data, SplitConfig.model_validate(settings.model_dump(exclude={"data"})))
    for name, info in summary["splits"].items():
        print(
            f"{name:>5}: {info['images']:>6} images  fingerprint {info['fingerprint']}  "
            f"per class {info['per_class']}"
        )
    return 0


def _cmd_data_stats(args: argparse.Namespace) -> int:
    from binsight.data.stats import dataset_stats, format_stats

    settings = config_from_args(args, StatsSettings)
    stats = dataset_stats(settings.data, settings.out)
    print(format_stats(stats))
    print(f"plots and stats.json in {settings.out or settings.data / 'stats'}")
    return 0


def register(verbs: Any) -> None:
    data = verbs.add_parser("data", help="download, index, split, describe or synthesize data")
    data_verbs = data.add_subparsers(dest="data_verb", required=True, metavar="STEP")

    add_command(
        data_verbs,
        "synth",
        SynthSettings,
        _cmd_data_synth,
        help="generate synthetic bin photos (ABID layout)",
        positional=("out",),
        title="synthetic bins",
    )

    add_command(
        data_verbs,
        "download",
        DownloadConfig,
        _cmd_data_download,
        help="fetch an ABID subset from S3 anonymously (resumable)",
        description="Select by --ids, --file-list, or --classes with optional --per-class/--limit. "
        "With no selection, the whole bucket (536k images) is fetched.",
        positional=("out",),
        title="download",
    )

    add_command(
        data_verbs,
        "index",
        IndexSettings,
        _cmd_data_index,
        help="build index.csv from a dataset directory",
        positional=("data",),
        title="index",
    )

    add_command(
        data_verbs,
        "split",
        SplitSettings,
        _cmd_data_split,
        help="stratified, stable train/val/test split",
        positional=("data",),
        title="split",
    )

    add_command(
        data_verbs,
        "stats",
        StatsSettings,
        _cmd_data_stats,
        help="class histogram and image-size statistics",
        positional=("data",),
        title="statistics",
    )
