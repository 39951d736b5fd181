"""Batch prediction on real ABID photos: one process against Ray Data on a local 2-CPU cluster, in one
run, and how many such nodes a night of 536k photos needs.

Three measurements bound the answer:
- the model alone (pre-decoded batches, all cores): the node's physical limit for this model;
- decoding alone (read + JPEG decode + resize, one core): what one decode CPU supplies;
- `binsight predict` end to end, in one process and on Ray (cluster start-up timed apart: a nightly
  job pays it once).

Run: .venv/bin/python benchmarks/bench_batch.py --model MODEL.onnx [--photos ../shared/abid/images]
(MODEL: `binsight export` of the lite0 recipe's checkpoint, see bench_accuracy.py)
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from binsight.audit.audit import write_audit
from binsight.batch.config import AuditConfig, BatchConfig
from binsight.batch.run import run_batch
from binsight.batch.stages import DecodeSettings, ScorerSettings, fetch_and_decode
from binsight.imaging import Preprocess, normalise
from binsight.inference.runtime import load_counter
from binsight.inference.verdict import VerdictSettings

os.environ.setdefault("BINSIGHT_PROGRESS", "0")
ABID_PHOTOS = 536_434


def model_only(model: Path, input_hw: tuple[int, int], batch_size: int, seconds: float = 10.0) -> float:
    counter = load_counter(model)
    batch = normalise(np.random.default_rng(0).integers(0, 255, (batch_size, *input_hw, 3), dtype=np.uint8))
    counter.predict(batch)
    done, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        counter.predict(batch)
        done += batch_size
    return done / (time.perf_counter() - started)


def decode_only(photos: list[str], preprocess: Preprocess, batch_size: int) -> float:
    rows = {
        "row": np.arange(len(photos)),
        "image": np.asarray(photos, dtype=object),
        "recorded": np.full(len(photos), -1),
        "record_source": np.asarray([""] * len(photos), dtype=object),
    }
    started = time.perf_counter()
    for start in range(0, len(photos), batch_size):
        part = {k: v[start : start + batch_size] for k, v in rows.items()}
        fetch_and_decode(part, DecodeSettings(preprocess, threads=1))
    return len(photos) / (time.perf_counter() - started)


def predict(manifest: Path, model: Path, out: Path, **settings: object) -> dict[str, object]:
    shutil.rmtree(out, ignore_errors=True)
    config = BatchConfig(source=str(manifest), out=out, model=model, **settings)  # type: ignore[arg-type]
    started = time.perf_counter()
    run = run_batch(config, model, ScorerSettings(config.backend, config.precision, config.threads))
    return {"photos_per_s": run.photos / (time.perf_counter() - started), "photos": run.photos}


def audit(bins: Path, model: Path, out: Path, **settings: object) -> dict[str, object]:
    """`binsight audit BINS.csv`: verdicts on every photo against its recorded count, then the ranked
    list and the report (all timed)."""
    shutil.rmtree(out, ignore_errors=True)
    config = AuditConfig(source=str(bins), out=out, model=model, **settings)  # type: ignore[arg-type]
    verdicts = VerdictSettings()
    started = time.perf_counter()
    scoring = ScorerSettings(config.backend, config.precision, config.threads, judge=True, verdicts=verdicts)
    run = run_batch(config, model, scoring)
    summary = write_audit(out, run, verdicts.policy(load_counter(model).info.calibration).basis)
    seconds = time.perf_counter() - started
    return {"photos_per_s": run.photos / seconds, "photos": run.photos, "verdicts": summary.verdicts}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--photos", type=Path, default=Path("../shared/abid/images"))
    parser.add_argument("--limit", type=int, default=None, help="at most this many photos")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args()

    photos = sorted(str(p.resolve()) for p in args.photos.glob("*.jpg"))[: args.limit]
    work = Path(tempfile.mkdtemp(prefix="bench-batch-"))
    manifest = work / "photos.txt"
    manifest.write_text("".join(f"{p}\n" for p in photos))
    info = load_counter(args.model).info
    cores = os.cpu_count() or 1
    print(f"{len(photos)} real ABID photos, model {info.arch} at {info.input_hw}, {cores} cores")

    results: dict[str, object] = {"photos": len(photos), "cores": cores, "arch": info.arch}
    results["model_only_photos_per_s"] = model_only(args.model, info.input_hw, args.batch_size)
    results["decode_one_core_photos_per_s"] = decode_only(
        photos[:400], Preprocess.from_card(info.card), args.batch_size
    )
    results["one_process"] = predict(manifest, args.model, work / "one", batch_size=args.batch_size)
    # The records: labels.csv's counts (EXPECTED_QUANTITY), beside the photos.
    with open(args.photos.parent / "labels.csv", newline="") as handle:
        labels = {row["id"]: row["count"] for row in csv.DictReader(handle)}
    bins = work / "bins.csv"
    bins.write_text("image,recorded_quantity\n" + "".join(f"{p},{labels[Path(p).stem]}\n" for p in photos))
    results["audit_one_process"] = audit(bins, args.model, work / "audit-one", batch_size=args.batch_size)

    import ray

    started = time.perf_counter()
    ray.init(num_cpus=cores, logging_level="WARNING", log_to_driver=False)
    results["ray_start_s"] = time.perf_counter() - started
    for name, extra in {
        "ray_1_replica": {},
        "ray_1_replica_2_threads": {"threads": 2},
    }.items():
        results[name] = predict(
            manifest, args.model, work / name, batch_size=args.batch_size, ray="auto", **extra
        )
    results["audit_ray_2_threads"] = audit(
        bins, args.model, work / "audit-ray", batch_size=args.batch_size, ray="auto", threads=2
    )
    ray.shutdown()
    shutil.rmtree(work, ignore_errors=True)

    base = results["one_process"]["photos_per_s"]  # type: ignore[index]
    model_limit = results["model_only_photos_per_s"]
    print(f"physical limit of this node for this model (model alone, all {cores} cores): {model_limit:.1f}/s")
    decode = results["decode_one_core_photos_per_s"]
    # Both stages share the cores: core-seconds per photo are cores/model_limit + 1/decode.
    node_limit = cores / (cores / model_limit + 1 / decode)  # type: ignore[operator]
    results["node_limit_photos_per_s"] = node_limit
    print(f"decoding on one core: {decode:.1f} photos/s")
    print(f"node limit, decode and model sharing the {cores} cores: {node_limit:.1f} photos/s")
    print(f"Ray cluster start: {results['ray_start_s']:.1f} s (once per job)")
    print(f"{'run':34} {'photos/s':>9} {'vs one process':>15} {'nodes for 536k in 8 h':>22} {'in 1 h':>7}")
    for name in (
        "one_process",
        "ray_1_replica",
        "ray_1_replica_2_threads",
        "audit_one_process",
        "audit_ray_2_threads",
    ):
        rate = results[name]["photos_per_s"]  # type: ignore[index]
        night = math.ceil(ABID_PHOTOS / (rate * 8 * 3600))
        hour = math.ceil(ABID_PHOTOS / (rate * 3600))
        print(
            f"{name:34} {rate:9.1f} {rate / base:14.2f}x {night:22d} {hour:7d}"
            f"   ({100 * rate / node_limit:.0f}% of the node limit)"
        )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
