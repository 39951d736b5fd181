"""`binsight data ...`: download, index, split, describe or synthesize photos."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

log = logging.getLogger("binsight")


def _cmd_data_synth(args: argparse.Namespace) -> int:
    import time

    from binsight.data.synth import SynthConfig, generate_dataset

    config = SynthConfig(
        n_images=args.n,
        image_size=args.size,
        max_count=args.max_count,
        seed=args.seed,
        start_index=args.start_index,
        **({"workers": args.workers} if args.workers else {}),
    )
    started = time.perf_counter()
    written = generate_dataset(args.out, config)
    seconds = time.perf_counter() - started
    print(
        f"synth: {written} new images ({config.n_images - written} already there) in {args.out}"
        f" at {written / max(seconds, 1e-9):.0f} images/s"
    )
    return 0


def _cmd_data_download(args: argparse.Namespace) -> int:
    from binsight.data.download import DownloadConfig, download, parse_class_range

    config = DownloadConfig(
        out=args.out,
        bucket=args.bucket,
        endpoint_url=args.endpoint_url,
        ids=[i.strip() for i in args.ids.split(",") if i.strip()] if args.ids else None,
        file_list=args.file_list,
        classes=parse_class_range(args.classes) if args.classes else None,
        per_class=args.per_class,
        limit=args.limit,
        max_scan=args.max_scan,
        seed=args.seed,
        workers=args.workers,
        retries=args.retries,
    )
    report = download(config)
    print(
        f"download: {report['selected']} selected, {report['downloaded']} downloaded, "
        f"{report['already_present']} already present, {report['failed']} failed "
        f"({report['images_per_second'] or 0} images/s); report in "
        f"{Path(args.out) / 'download_report.json'}"
    )
    for problem in report["problems"][:10]:
        print(f"  {problem['id']}: {problem['problem']}", file=sys.stderr)
    if len(report["problems"]) > 10:
        print(f"  ... and {len(report['problems']) - 10} more", file=sys.stderr)
    return 0 if report["failed"] == 0 else 1


def _cmd_data_index(args: argparse.Namespace) -> int:
    from binsight.data.index import build_index

    result = build_index(args.data, workers=args.workers, out=args.out, labels=args.labels)
    mismatches = sum(int(r["quantity_mismatch"]) for r in result.rows)
    print(
        f"index ({result.layout} layout): {len(result.rows)} images indexed, {len(result.skipped)} skipped, "
        f"{mismatches} with EXPECTED_QUANTITY != sum of item quantities -> {result.path}"
    )
    for skipped in result.skipped[:10]:
        print(f"  skipped {skipped['id']}: {skipped['problem']}", file=sys.stderr)
    return 0


def _cmd_data_split(args: argparse.Namespace) -> int:
    from binsight.data.split import SplitConfig, write_splits

    config = SplitConfig(val_fraction=args.val, test_fraction=args.test, seed=args.seed)
    summary = write_splits(args.data, config)
    for name, info in summary["splits"].items():
        print(
            f"{name:>5}: {info['images']:>6} images  fingerprint {info['fingerprint']}  "
            f"per class {info['per_class']}"
        )
    return 0


def _cmd_data_stats(args: argparse.Namespace) -> int:
    from binsight.data.stats import dataset_stats, format_stats

    stats = dataset_stats(args.data, args.out)
    print(format_stats(stats))
    print(f"plots and stats.json in {args.out or Path(args.data) / 'stats'}")
    return 0


def register(verbs: Any) -> None:
    data = verbs.add_parser("data", help="download, index, split, describe or synthesize data")
    data_verbs = data.add_subparsers(dest="data_verb", required=True, metavar="STEP")

    synth = data_verbs.add_parser("synth", help="generate synthetic bin photos (ABID layout)")
    synth.add_argument("out", help="dataset directory to write")
    synth.add_argument("--n", type=int, default=1200, help="number of images")
    synth.add_argument("--size", type=int, default=224, help="image side in pixels")
    synth.add_argument("--max-count", type=int, default=5, help="largest object count")
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--start-index", type=int, default=0, help="first image index (to add more later)")
    synth.add_argument("--workers", type=int, default=None, help="processes (default: all cores)")
    synth.set_defaults(handler=_cmd_data_synth)

    dl = data_verbs.add_parser(
        "download",
        help="fetch an ABID subset from S3 anonymously (resumable)",
        description="Select by --ids, --file-list, or --classes with optional --per-class/--limit. "
        "With no selection, the whole bucket (536k images) is fetched.",
    )
    dl.add_argument("out", help="dataset directory to write")
    dl.add_argument("--bucket", default="aft-vbi-pds")
    dl.add_argument("--endpoint-url", default=None, help="any S3-compatible endpoint")
    dl.add_argument("--ids", default=None, help="comma-separated image ids, e.g. 523,100313")
    dl.add_argument(
        "--file-list",
        type=Path,
        default=None,
        help="text file of ids/keys, or the JSON {count: [metadata paths]} subset list",
    )
    dl.add_argument("--classes", default=None, help="count range to keep, e.g. 0-5 or 1-5")
    dl.add_argument("--per-class", type=int, default=None, help="random images per count class")
    dl.add_argument("--limit", type=int, default=None, help="at most this many images")
    dl.add_argument(
        "--max-scan",
        type=int,
        default=None,
        help="read at most this many metadata files while selecting by class",
    )
    dl.add_argument("--seed", type=int, default=0, help="seed of the random selection order")
    dl.add_argument("--workers", type=int, default=16, help="parallel connections")
    dl.add_argument("--retries", type=int, default=5, help="retries per object")
    dl.set_defaults(handler=_cmd_data_download)

    index = data_verbs.add_parser("index", help="build index.csv from a dataset directory")
    index.add_argument(
        "data", help="photo folder: bucket layout, <count>/<id>.jpg folders, or images/ with labels.csv"
    )
    index.add_argument("--labels", type=Path, default=None, help="CSV of id,count (default: DATA/labels.csv)")
    index.add_argument(
        "--out", type=Path, default=None, help="where index.csv (and then splits/) go (default: DATA)"
    )
    index.add_argument("--workers", type=int, default=None)
    index.set_defaults(handler=_cmd_data_index)

    split = data_verbs.add_parser("split", help="stratified, stable train/val/test split")
    split.add_argument("data", help="dataset directory with index.csv")
    split.add_argument("--val", type=float, default=0.1, help="validation fraction")
    split.add_argument("--test", type=float, default=0.1, help="test fraction")
    split.add_argument("--seed", type=int, default=0)
    split.set_defaults(handler=_cmd_data_split)

    stats = data_verbs.add_parser("stats", help="class histogram and image-size statistics")
    stats.add_argument("data", help="dataset directory with index.csv")
    stats.add_argument("--out", default=None, help="where to write plots (default DATA/stats)")
    stats.set_defaults(handler=_cmd_data_stats)
