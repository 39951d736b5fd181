"""The server past its capacity, on real photos: does it shed load fast and keep accepted requests fast,
and does it lose nothing when a worker is killed?

One run, one model (an exported ONNX file), loopback:
1. unloaded latency: one connection, one request at a time (the baseline for "within 2x");
2. capacity: `wrk` with --connections keep-alive connections (closed loop, as bench_serve.py);
3. 2x capacity for --duration seconds, open loop (binsight's load generator, which reports whether it
   kept its schedule), with data capture on: accepted, shed (503), errors, p99 of accepted, p99 of
   shed, server RSS before/after, capture records vs successful requests;
4. the same with --workers 2 and one worker killed with SIGKILL a third of the way in.

The latency bound (--max-queue-ms of `binsight serve`) trades accepted latency against throughput
under overload; several bounds are compared in the same run.

Run: .venv/bin/python benchmarks/bench_overload.py MODEL.onnx [--abid ../shared/abid] [--duration 60]
     [--max-queue-ms 200 50 15] [--serve-flag NAME=VALUE ...]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx

from bench_serve import free_port, serve_command, start, stop
from binsight.serving.loadtest import LoadResult, run_load
from binsight.utils.io import atomic_write_json
from wrk_load import have_wrk, run_wrk

HERE = Path(__file__).resolve().parent


def tree_rss_mb(pid: int) -> float:
    """Resident memory of a process and all its descendants (the supervisor and its workers)."""
    total, pending = 0, [pid]
    while pending:
        current = pending.pop()
        try:
            status = Path(f"/proc/{current}/status").read_text()
            total += int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmRSS")))
            for task in Path(f"/proc/{current}/task").iterdir():
                children = (task / "children").read_text().split()
                pending += [int(child) for child in children]
        except (OSError, StopIteration):
            continue
    return total / 1024


def worker_pids(url: str) -> list[int]:
    text = httpx.get(f"{url}/metrics").text
    return sorted(
        {
            int(line.split('pid="')[1].split('"')[0])
            for line in text.splitlines()
            if line.startswith("binsight_model_info{") and line.rstrip().endswith(" 1.0")
        }
    )


def captured(folder: Path) -> int:
    return sum(
        sum(1 for line in path.read_text().splitlines() if line.strip())
        for path in folder.glob("capture-*.jsonl")
    )


def overload_phase(
    name: str,
    model: Path,
    bodies: list[bytes],
    rate: float,
    args: argparse.Namespace,
    flags: dict[str, Any],
    kill_after_s: float | None = None,
) -> dict[str, Any]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryDirectory() as capture:
        proc = start(serve_command(model, port, capture_dir=capture, **flags), port)
        killed: list[int] = []
        try:
            asyncio.run(run_load(f"{url}/invocations", bodies, 3, concurrency=2))  # warm-up
            time.sleep(1.0)  # capture is written by a background thread
            warm_captured = captured(Path(capture))
            rss_before = tree_rss_mb(proc.pid)
            if kill_after_s is not None:

                def kill_one() -> None:
                    time.sleep(kill_after_s)
                    victim = worker_pids(url)[0]
                    os.kill(victim, signal.SIGKILL)
                    killed.append(victim)

                threading.Thread(target=kill_one, daemon=True).start()
            result = asyncio.run(
                run_load(f"{url}/invocations", bodies, args.duration, concurrency=8, rate=rate)
            )
            time.sleep(1.0)
            rss_after = tree_rss_mb(proc.pid)
            alive = proc.poll() is None and httpx.get(f"{url}/ping").status_code == 200
        finally:
            stop(proc)
        records = captured(Path(capture)) - warm_captured
    summary = result.summary()
    row = {
        "name": name,
        "rate": round(rate, 1),
        "accepted": result.ok,
        "shed_503": result.statuses.get("503", 0),
        "other_errors": result.errors - result.statuses.get("503", 0),
        "statuses": dict(result.statuses),
        "accepted_ms": summary.latency_ms.model_dump(),
        "shed_ms": shed.model_dump() if (shed := summary.latency_ms_by_status.get("503")) else None,
        "rss_mb_before": round(rss_before, 1),
        "rss_mb_after": round(rss_after, 1),
        "capture_records": records,
        "server_alive_after": alive,
        "killed_worker": killed[0] if killed else None,
        "client": summary.client.model_dump(),
    }
    print(json.dumps(row), flush=True)
    return row


def unloaded(model: Path, bodies: list[bytes], flags: dict[str, Any]) -> LoadResult:
    port = free_port()
    proc = start(serve_command(model, port, **flags), port)
    try:
        url = f"http://127.0.0.1:{port}/invocations"
        asyncio.run(run_load(url, bodies, 2, concurrency=1))
        return asyncio.run(run_load(url, bodies, 10, concurrency=1))
    finally:
        stop(proc)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("model", type=Path)
    parser.add_argument("--abid", type=Path, default=HERE.parent.parent / "shared" / "abid")
    parser.add_argument("--duration", type=float, default=60.0)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--overload", type=float, default=2.0, help="multiple of capacity to offer")
    parser.add_argument(
        "--serve-flag", action="append", default=[], help="NAME=VALUE passed to binsight serve"
    )
    parser.add_argument(
        "--max-queue-ms",
        type=float,
        nargs="+",
        default=[200.0, 50.0, 15.0],
        help="latency bounds to compare at overload; the first (the default) also runs the kill phase",
    )
    parser.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()) / "binsight-overload.json")
    args = parser.parse_args()
    photos = sorted((args.abid / "images").glob("*.jpg"))[:256]
    if not photos or not have_wrk():
        print("SKIP: needs real ABID photos (--abid) and wrk (apt-get install wrk)", file=sys.stderr)
        return 0
    bodies = [p.read_bytes() for p in photos]
    flags: dict[str, Any] = dict(item.split("=", 1) for item in args.serve_flag)

    calm = unloaded(args.model, bodies, flags).summary()
    print(f"unloaded: {calm.latency_ms.model_dump_json()}", flush=True)

    port = free_port()
    # Capacity is throughput with nothing shed: wrk's closed loop keeps --connections requests in
    # flight, a standing queue that a latency bound would shed (and wrk would resend at once).
    proc = start(serve_command(args.model, port, **{**flags, "max_queue_ms": 0}), port)
    try:
        url = f"http://127.0.0.1:{port}/invocations"
        run_wrk(url, photos, 3, args.connections)
        capacity = run_wrk(url, photos, 15, args.connections)
    finally:
        stop(proc)
    per_second = capacity.per_minute / 60
    print(f"capacity: {per_second:.1f} req/s (wrk, {args.connections} connections)", flush=True)

    rate = args.overload * per_second
    rows = [
        overload_phase(
            f"{args.overload:g}x capacity, 1 process, max_queue_ms {bound:g}",
            args.model,
            bodies,
            rate,
            args,
            {**flags, "max_queue_ms": bound},
        )
        for bound in args.max_queue_ms
    ]
    rows.append(
        overload_phase(
            f"{args.overload:g}x capacity, 2 workers, one killed (SIGKILL), max_queue_ms "
            f"{args.max_queue_ms[0]:g}",
            args.model,
            bodies,
            rate,
            args,
            {**flags, "workers": 2, "max_queue_ms": args.max_queue_ms[0]},
            kill_after_s=args.duration / 3,
        )
    )
    atomic_write_json(
        args.out,
        {
            "unloaded_ms": calm.latency_ms.model_dump(),
            "capacity_per_s": per_second,
            "rows": rows,
            "flags": flags,
            "duration_s": args.duration,
        },
    )
    print(
        "\n| phase | offered/s | accepted | shed 503 | other errors | accepted p50 / p99 ms | "
        "shed p99 ms | RSS MB before → after | capture records / accepted | accepted/s | client |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for row in rows:
        shed = row["shed_ms"]["p99"] if row["shed_ms"] else float("nan")
        client = row["client"]
        print(
            f"| {row['name']} | {row['rate']:.0f} | {row['accepted']} | {row['shed_503']} | "
            f"{row['other_errors']} | {row['accepted_ms']['p50']:.1f} / {row['accepted_ms']['p99']:.1f} | "
            f"{shed:.1f} | {row['rss_mb_before']:.0f} → {row['rss_mb_after']:.0f} | "
            f"{row['capture_records']} / {row['accepted']} | {row['accepted'] / args.duration:.0f} | "
            f"{100 * client['cpu_share_of_one_core']:.0f}% core, saturated {client['saturated']} |"
        )
    print(
        f"\nunloaded p50 / p99: {calm.latency_ms.p50:.1f} / {calm.latency_ms.p99:.1f} ms "
        f"(target: accepted p99 under {2 * calm.latency_ms.p99:.1f} ms); capacity {per_second:.1f}/s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
