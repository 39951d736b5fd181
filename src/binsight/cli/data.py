"""`binsight data ...`: download, index, split, describe or synthesize photos: each a library stage
called with its whole config; here only what each prints."""

from __future__ import annotations

import logging
import sys
from typing import Any

from binsight.cliargs import add_command
from binsight.data.download import DownloadConfig, DownloadReport, download
from binsight.data.index import IndexConfig, IndexResult, index_dataset
from binsight.data.split import SplitRecord, SplitSettings, split_dataset
from binsight.data.stats import DatasetStats, StatsConfig, describe_dataset, format_stats
from binsight.data.synth import Synthesized, SynthSettings, synthesize

log = logging.getLogger("binsight")


def _report_synth(config: SynthSettings, done: Synthesized) -> int:
    print(
        f"synth: {done.written} new images ({done.requested - done.written} already there) in {done.out}"
        f" at {done.written / max(done.seconds, 1e-9):.0f} images/s"
    )
    return 0


def _report_download(config: DownloadConfig, report: DownloadReport) -> int:
    print(
        f"download: {report.selected} selected, {report.downloaded} downloaded, "
        f"{report.already_present} already present, {report.failed} failed "
        f"({report.images_per_second or 0} images/s); report in "
        f"{config.out / 'download_report.json'}"
    )
    for problem in report.problems[:10]:
        print(f"  {problem['id']}: {problem['problem']}", file=sys.stderr)
    if len(report.problems) > 10:
        print(f"  ... and {len(report.problems) - 10} more", file=sys.stderr)
    return 0 if report.failed == 0 else 1


def _report_index(config: IndexConfig, result: IndexResult) -> int:
    mismatches = sum(int(r["quantity_mismatch"]) for r in result.rows)
    recounted = sum(r["count_source"] == "recount" for r in result.rows)
    print(
        f"index ({result.layout} layout): {len(result.rows)} images indexed, {len(result.skipped)} skipped, "
        f"{mismatches} with EXPECTED_QUANTITY != sum of item quantities"
        + (f", {recounted} counts from people's recounts" if config.recounts else "")
        + f" -> {result.path}"
    )
    for skipped in result.skipped[:10]:
        print(f"  skipped {skipped['id']}: {skipped['problem']}", file=sys.stderr)
    return 0


def _report_split(config: SplitSettings, summary: SplitRecord) -> int:
    for name, info in summary.splits.items():
        print(
            f"{name:>5}: {info.images:>6} images  fingerprint {info.fingerprint}  per class {info.per_class}"
        )
    return 0


def _report_stats(config: StatsConfig, stats: DatasetStats) -> int:
    print(format_stats(stats))
    print(f"plots and stats.json in {config.out or config.data / 'stats'}")
    return 0


def register(verbs: Any) -> None:
    data = verbs.add_parser("data", help="download, index, split, describe or synthesize data")
    steps = data.add_subparsers(dest="data_verb", required=True, metavar="STEP")
    add_command(
        steps,
        "synth",
        SynthSettings,
        synthesize,
        _report_synth,
        help="generate synthetic bin photos (ABID layout)",
        positional=("out",),
        title="synthetic bins",
    )
    add_command(
        steps,
        "download",
        DownloadConfig,
        download,
        _report_download,
        help="fetch an ABID subset from S3 anonymously (resumable)",
        description="Select by --ids, --file-list, or --classes with optional --per-class/--limit. "
        "With no selection, the whole bucket (536k images) is fetched.",
        positional=("out",),
        title="download",
    )
    add_command(
        steps,
        "index",
        IndexConfig,
        index_dataset,
        _report_index,
        help="build index.csv from a dataset directory",
        positional=("data",),
        title="index",
    )
    add_command(
        steps,
        "split",
        SplitSettings,
        split_dataset,
        _report_split,
        help="stratified, stable train/val/test split",
        positional=("data",),
        title="split",
    )
    add_command(
        steps,
        "stats",
        StatsConfig,
        describe_dataset,
        _report_stats,
        help="class histogram and image-size statistics",
        positional=("data",),
        title="statistics",
    )
