"""Serving throughput: a naive SageMaker-toolkit-style endpoint vs binsight serve, in one run.

Same trained checkpoint (exported to ONNX for binsight), same images, same machine, same load: a
closed loop of `--concurrency` clients for `--duration` seconds against each server, each server in
its own process. Printed: invocations/min, per core, latency percentiles, and the ratio.

Run: .venv/bin/python benchmarks/bench_serve.py [--image-size 224] [--duration 20] [--concurrency 16]
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from binsight.data.index import build_index
from binsight.data.split import SplitConfig, write_splits
from binsight.data.synth import SynthConfig, generate_dataset
from binsight.serving.export import export
from binsight.serving.loadtest import format_summary, run_load
from binsight.training.config import TrainConfig
from binsight.training.engine import train

os.environ.setdefault("BINSIGHT_PROGRESS", "0")
HERE = Path(__file__).resolve().parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start(command: list[str], port: int) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/ping", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError(f"server did not start: {command}")


def measure(name: str, command: list[str], port: int, bodies: list[bytes], args: argparse.Namespace) -> dict:
    proc = start(command, port)
    try:
        url = f"http://127.0.0.1:{port}/invocations"
        asyncio.run(run_load(url, bodies, 2.0, args.concurrency))  # warm-up
        summary = asyncio.run(run_load(url, bodies, args.duration, args.concurrency)).summary()
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    print(f"\n{name}\n{format_summary(summary)}")
    return summary


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--arch", default="resnet18")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--photo-size", type=int, default=448, help="side of the synthetic photos sent")
    parser.add_argument("--duration", type=float, default=20.0)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--workers", type=int, default=1, help="binsight serve processes")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    cores = os.cpu_count() or 1

    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        generate_dataset(data, SynthConfig(n_images=120, image_size=args.photo_size, seed=3))
        build_index(data)
        write_splits(data, SplitConfig())
        # Accuracy is not the point here; a briefly trained model has the real architecture and size.
        train(
            TrainConfig(
                data=data,
                out=Path(tmp) / "run",
                arch=args.arch,
                pretrained=False,
                image_size=args.image_size,
                epochs=1,
                batch_size=8,
                workers=0,
                max_train_batches=2,
                tensorboard=False,
            )
        )
        checkpoint = Path(tmp) / "run" / "best.pt"
        onnx = Path(tmp) / "model.onnx"
        report = export(checkpoint, onnx, quantize=True)
        bodies = [p.read_bytes() for p in sorted((data / "images").glob("*.jpg"))[:64]]

        port = free_port()
        naive = measure(
            "naive (eager PyTorch, one image per call)",
            [sys.executable, str(HERE / "naive_sagemaker_server.py"), str(checkpoint), str(port)],
            port,
            bodies,
            args,
        )
        serve = [
            sys.executable,
            "-m",
            "binsight",
            "serve",
            "--port",
            "{port}",
            "--workers",
            str(args.workers),
            "--reload-interval-s",
            "0",
            "--max-batch-size",
            "32",
            "--max-wait-ms",
            "10",
        ]
        results = {}
        for label, model in (("fp32", onnx), ("int8", Path(report["int8"]["onnx"]))):
            port = free_port()
            command = [part.replace("{port}", str(port)) for part in serve] + ["--model", str(model)]
            results[label] = measure(
                f"binsight serve, ONNX Runtime {label}, dynamic batching", command, port, bodies, args
            )

        base = naive["invocations_per_minute"]
        print(
            f"\n{args.arch} @ {args.image_size}px, {args.photo_size}px JPEGs, {args.concurrency} clients, "
            f"{cores} cores"
        )
        print(f"{'server':<34}{'inv/min':>10}{'inv/min/core':>14}{'p50 ms':>9}{'p99 ms':>9}{'ratio':>8}")
        rows = [("naive eager PyTorch", naive), *((f"binsight {k}", v) for k, v in results.items())]
        for label, summary in rows:
            rate = summary["invocations_per_minute"]
            print(
                f"{label:<34}{rate:>10.0f}{rate / cores:>14.0f}{summary['latency_ms']['p50']:>9.1f}"
                f"{summary['latency_ms']['p99']:>9.1f}{rate / base:>7.1f}x"
            )
        print(
            "int8 accuracy cost on the validation split: "
            f"{100 * report['int8']['accuracy_cost']:+.2f} points "
            "(this briefly trained model; see `binsight export --quantize int8` for a real one)"
        )


if __name__ == "__main__":
    main()
