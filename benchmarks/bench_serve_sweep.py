"""The serving defaults by measurement: batch size, batch wait, and processes x threads, on real photos.

One model (an exported ONNX file), one engine, each setting served in its own process and driven by
`wrk` exactly as in bench_serve.py; the baseline is the current defaults measured in the same run.

Run: .venv/bin/python benchmarks/bench_serve_sweep.py MODEL.onnx [--abid ../shared/abid] [--duration 12]
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from bench_serve import free_port, serve_command, start, stop
from wrk_load import have_wrk, run_wrk

HERE = Path(__file__).resolve().parent
DEFAULTS = {"max_batch": 16, "max_wait_ms": 5.0, "workers": 1}


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("model", type=Path)
    parser.add_argument("--abid", type=Path, default=HERE.parent.parent / "shared" / "abid")
    parser.add_argument("--duration", type=float, default=12.0)
    parser.add_argument("--connections", type=int, default=16)
    args = parser.parse_args()
    photos = sorted((args.abid / "images").glob("*.jpg"))[:256]
    if not photos or not have_wrk():
        print("SKIP: needs real ABID photos (--abid) and wrk (apt-get install wrk)", file=sys.stderr)
        return 0
    cores = os.cpu_count() or 1
    settings = [DEFAULTS]
    settings += [{**DEFAULTS, "max_batch": b} for b in (8, 32)]
    settings += [{**DEFAULTS, "max_wait_ms": w} for w in (2.0, 10.0)]
    settings += [{**DEFAULTS, "workers": cores}]
    rows = []
    for setting in settings:
        port = free_port()
        command = serve_command(
            args.model,
            port,
            max_batch_size=setting["max_batch"],
            max_wait_ms=setting["max_wait_ms"],
            workers=setting["workers"],
            # Capacity under a closed loop, as bench_serve measures it: with the latency bound on, a
            # CPU slower than the bound assumes sheds the standing queue and wrk counts fast refusals.
            max_queue_ms=0,
        )
        proc = start(command, port)
        try:
            url = f"http://127.0.0.1:{port}/invocations"
            run_wrk(url, photos, 3, args.connections)
            result = run_wrk(url, photos, args.duration, args.connections)
        finally:
            stop(proc)
        rows.append((setting, result))
        print(
            f"{setting}: {result.per_minute:.0f} inv/min, p99 {result.p99_ms:.1f} ms, "
            f"non-2xx {result.non_2xx}",
            flush=True,
        )
    base = rows[0][1].per_minute
    load = f"wrk {args.connections} connections, {args.duration:.0f} s each"
    print(f"\n{args.model.name}, {cores} cores, {load}")
    print(
        "| max batch | max wait ms | processes x threads | inv/min | p50 ms | p99 ms | non-2xx "
        "| vs defaults |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for setting, r in rows:
        layout = f"{setting['workers']} x {max(1, cores // setting['workers'])}"
        print(
            f"| {setting['max_batch']} | {setting['max_wait_ms']:g} | {layout} | {r.per_minute:.0f} "
            f"| {r.p50_ms:.1f} | {r.p99_ms:.1f} | {r.non_2xx} | {r.per_minute / base:.2f}x |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
