"""Serving throughput on real ABID photos: the seeds' SageMaker stack, a naive endpoint, and binsight serve
on each backend and precision, one run, same trained models, same photos, same machine.

Rows (each server in its own process, driven by `wrk` for --duration seconds at --connections):
- TorchServe as SageMaker runs it: sagemaker-pytorch-inference's `serving.main` starting TorchServe
  (Java frontend, Python worker) with the seeds' model_fn/input_fn/predict_fn/output_fn
  (benchmarks/sagemaker_stack/inference.py), in its own virtualenv (--torchserve-venv, built on first
  use with pinned versions). Needs Java 17 (Debian: openjdk-17-jre-headless).
- the naive endpoint (benchmarks/naive_sagemaker_server.py): the same handler functions in FastAPI;
- binsight serve with ONNX Runtime fp32/int8 and OpenVINO fp32/bf16/int8, and the default (auto).
Also: each runtime's accuracy on the real test split (vs PyTorch fp32), each runtime's model-only
ceiling (batch 32, no HTTP, no decode), the CPU's measured GEMM peak per precision, and the latency at
half of the best row's capacity.

Run: .venv/bin/python benchmarks/bench_serve.py --checkpoint RUN/best.pt [--checkpoint-lite RUN2/best.pt]
     [--abid ../shared/abid] [--duration 15] [--connections 16]
(the checkpoints come from benchmarks/bench_accuracy.py: runs/scratch is resnet18, runs/binsight lite0)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import torch

from binsight.cpu import cpu_features
from binsight.data.split import load_split
from binsight.export.onnx import ExportConfig, export
from binsight.imaging import Preprocess
from binsight.inference.engines import Backend, EnginePrecision
from binsight.inference.runtime import load_counter
from binsight.serving.loadtest import run_load
from binsight.training.checkpoint import load_checkpoint
from binsight.training.evaluate import load_model
from binsight.utils.io import atomic_write_json
from wrk_load import WrkResult, have_wrk, run_wrk

os.environ.setdefault("BINSIGHT_PROGRESS", "0")
HERE = Path(__file__).resolve().parent
SRC = HERE.parent / "src"
TORCHSERVE_PINS = [
    "torch==2.13.0",
    "torchvision==0.28.0",
    "torchserve==0.12.0",
    "torch-model-archiver==0.12.0",
    "sagemaker-pytorch-inference==2.0.25",
    "setuptools<81",  # the toolkit imports pkg_resources
    "pyyaml",
    "pillow",
]
RESNET18_GMAC = 1.82  # multiply-accumulates per 224x224 image


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start(
    command: list[str], port: int, env: dict[str, str] | None = None, cwd: Path | None = None
) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(
        command,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env,
        cwd=cwd,
        start_new_session=True,
    )
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/ping", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.5)
    stop(proc)
    raise RuntimeError(f"server did not start: {' '.join(command)}")


def stop(proc: subprocess.Popen[bytes], timeout_s: float = 60.0) -> None:
    """The server's whole process group, gone: its children (TorchServe's Java frontend and Python
    workers, uvicorn's workers) outlive the leader by a moment, and the next row must not share the
    cores with them."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        pass
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)


def wanted(name: str, args: argparse.Namespace) -> bool:
    return args.only is None or any(part in name for part in args.only)


def measure(
    name: str,
    proc_args: dict[str, Any],
    port: int,
    photos: list[Path],
    args: argparse.Namespace,
    path: str = "/invocations",
) -> WrkResult:
    proc = start(port=port, **proc_args)
    try:
        url = f"http://127.0.0.1:{port}{path}"
        run_wrk(url, photos, 3, args.connections)  # warm-up: first batches, JIT, thread pools
        result = run_wrk(url, photos, args.duration, args.connections)
    finally:
        stop(proc)
    print(
        f"{name}: {result.per_minute:.0f} inv/min, p50 {result.p50_ms:.1f} ms, p99 {result.p99_ms:.1f} ms, "
        f"non-2xx {result.non_2xx}, socket errors {result.socket_errors}",
        flush=True,
    )
    return result


def torchserve_python(venv: Path) -> Path:
    python = venv / "bin" / "python"
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        pip = [str(python), "-m", "pip", "install", "--quiet"]
        subprocess.run([*pip, "--upgrade", "pip"], check=True)
        subprocess.run([*pip, "torch==2.13.0"], check=True)  # the CPU wheel first, as binsight's Makefile
        subprocess.run([*pip, *TORCHSERVE_PINS], check=True)
    return python


def torchserve_model(checkpoint: Path, base: Path) -> int:
    """The binsight resnet18 checkpoint as the plain torchvision state dict the seeds' model_fn loads."""
    state = load_checkpoint(checkpoint)["model"]
    plain = {k.removeprefix("backbone."): v for k, v in state.items() if k.startswith("backbone.")}
    plain["fc.weight"], plain["fc.bias"] = state["head.fc.weight"], state["head.fc.bias"]
    (base / "model" / "code").mkdir(parents=True, exist_ok=True)
    torch.save(plain, base / "model" / "model.pth")
    (base / "model" / "code" / "inference.py").write_bytes(
        (HERE / "sagemaker_stack" / "inference.py").read_bytes()
    )
    return int(plain["fc.weight"].shape[0])


def serve_command(model: Path, port: int, **flags: object) -> list[str]:
    """`binsight serve` on loopback, no model-file polling; `max_wait_ms=5` becomes `--max-wait-ms 5`."""
    command = [sys.executable, "-m", "binsight", "serve", "--model", str(model), "--port", str(port)]
    for name, value in {"reload_interval_s": 0, **flags}.items():
        command += [f"--{name.replace('_', '-')}", str(value)]
    return command


def gemm_peak_gmacs(dtype: torch.dtype, seconds: float = 2.0) -> float:
    """Multiply-accumulates per second of a large matrix product: what this CPU really sustains."""
    n = 2048
    if dtype == torch.int8:
        a = torch.randint(-100, 100, (n, n), dtype=torch.int8)
        b = torch.randint(-100, 100, (n, n), dtype=torch.int8)
        product = lambda: torch._int_mm(a, b)  # noqa: E731
    else:
        a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
        product = lambda: a @ b  # noqa: E731
    product()
    runs, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        product()
        runs += 1
    return runs * n**3 / (time.perf_counter() - started) / 1e9


def test_inputs(
    data: Path, hw: tuple[int, int], mean: tuple[float, ...], std: tuple[float, ...]
) -> tuple[np.ndarray, np.ndarray]:
    rows = load_split(data, "test")
    preprocess = Preprocess(hw, mean, std)
    pixels = np.stack([preprocess(data / r["image"]) for r in rows])
    return pixels, np.array([int(r["count"]) for r in rows])


def accuracy_and_ceiling(
    model_file: Path, backend: Backend, precision: EnginePrecision, pixels: np.ndarray, counts: np.ndarray
) -> dict[str, Any]:
    counter = load_counter(model_file, threads=os.cpu_count(), backend=backend, precision=precision)
    predictions = np.concatenate(
        [counter.predict(pixels[i : i + 32]).argmax(1) for i in range(0, len(pixels), 32)]
    )
    batch = pixels[:32]
    counter.predict(batch)
    runs, started = 0, time.perf_counter()
    while time.perf_counter() - started < 3.0:
        counter.predict(batch)
        runs += 1
    return {
        "accuracy": float((predictions == counts).mean()),
        "ceiling_img_s": runs * len(batch) / (time.perf_counter() - started),
        "runtime": counter.runtime.__dict__,
    }


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--checkpoint", type=Path, required=True, help="resnet18 run's best.pt")
    parser.add_argument("--checkpoint-lite", type=Path, default=None, help="efficientnet_lite0 run's best.pt")
    parser.add_argument("--abid", type=Path, default=HERE.parent.parent / "shared" / "abid")
    parser.add_argument("--duration", type=float, default=15.0)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--max-batch", type=int, default=32, help="binsight serve --max-batch-size")
    parser.add_argument("--max-wait-ms", type=float, default=5.0, help="binsight serve --max-wait-ms")
    parser.add_argument(
        "--torchserve-venv", type=Path, default=Path(tempfile.gettempdir()) / "binsight-torchserve"
    )
    parser.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()) / "binsight-serve-bench.json")
    parser.add_argument(
        "--only",
        nargs="+",
        default=None,
        help="measure only the end-to-end rows whose name contains one of these (e.g. TorchServe naive); "
        "skips the runtime table",
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if not have_wrk():
        print("SKIP: wrk not installed (Debian: apt-get install wrk)", file=sys.stderr)
        return 0
    cores = os.cpu_count() or 1
    photos = sorted((args.abid / "images").glob("*.jpg"))[:256]
    if not photos:
        print(f"WARNING: no real ABID photos at {args.abid}; no fallback here, pass --abid", file=sys.stderr)
        return 0
    results: dict[str, Any] = {
        "cores": cores,
        "cpu_features": sorted(cpu_features()),
        "rows": {},
        "runtimes": {},
    }

    print("GEMM peak of this CPU (2048x2048, all cores):", flush=True)
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16), ("int8", torch.int8)):
        results.setdefault("gemm_gmacs", {})[name] = gemm_peak_gmacs(dtype)
        print(f"  {name}: {results['gemm_gmacs'][name]:.0f} GMAC/s", flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        models = {}
        for key, checkpoint in (("resnet18", args.checkpoint), ("lite0", args.checkpoint_lite)):
            if checkpoint is None:
                continue
            onnx = work / f"{key}.onnx"
            report = export(ExportConfig(checkpoint=checkpoint, out=onnx, quantize="int8"))
            assert report.int8 is not None  # asked for
            models[key] = {"fp32": onnx, "int8": Path(report.int8.onnx), "checkpoint": checkpoint}

        print("\naccuracy on the real test split and model-only ceiling (batch 32):", flush=True)
        for key, files in models.items() if args.only is None else ():
            model, config, _ = load_model(load_checkpoint(files["checkpoint"]))
            pixels, counts = test_inputs(Path(config.data), config.input_hw, *config.mean_std)
            with torch.no_grad():
                reference = np.concatenate(
                    [
                        model(torch.from_numpy(pixels[i : i + 64])).argmax(1).numpy()
                        for i in range(0, len(pixels), 64)
                    ]
                )
            results["runtimes"][f"{key} pytorch fp32"] = {"accuracy": float((reference == counts).mean())}
            for backend, precision, file in (
                ("onnxruntime", "fp32", "fp32"),
                ("onnxruntime", "fp32", "int8"),
                ("openvino", "fp32", "fp32"),
                ("openvino", "bf16", "fp32"),
                ("openvino", "fp32", "int8"),
            ):
                label = f"{key} {backend} {'int8' if file == 'int8' else precision}"
                results["runtimes"][label] = accuracy_and_ceiling(
                    files[file], backend, precision, pixels, counts
                )
                r = results["runtimes"][label]
                print(
                    f"  {label}: accuracy {r['accuracy']:.4f}, ceiling {r['ceiling_img_s']:.0f} img/s",
                    flush=True,
                )
            print(
                f"  {key} pytorch fp32: accuracy {results['runtimes'][f'{key} pytorch fp32']['accuracy']:.4f}"
            )

        print(f"\nend to end, {args.connections} connections, {args.duration:.0f} s each:", flush=True)
        base = work / "sagemaker"
        num_classes = torchserve_model(models["resnet18"]["checkpoint"], base)
        torchserve_label = "TorchServe + SageMaker toolkit (seeds' handler), resnet18 fp32 eager"
        if not wanted(torchserve_label, args):
            pass
        elif shutil.which("java"):
            python = torchserve_python(args.torchserve_venv)
            env = {
                **os.environ,
                "PATH": f"{python.parent}:{os.environ['PATH']}",
                "PYTHONPATH": str(SRC),  # for binsight's torchvision shim only
                "SAGEMAKER_BASE_DIR": str(base),
                "SAGEMAKER_PROGRAM": "inference.py",
                "BINSIGHT_NUM_CLASSES": str(num_classes),
            }
            port = free_port()
            env["SAGEMAKER_BIND_TO_PORT"] = str(port)
            results["rows"][torchserve_label] = measure(
                "torchserve",
                {
                    "command": [
                        str(python),
                        str(HERE / "sagemaker_stack" / "start.py"),
                        str(work / "ts.properties"),
                    ],
                    "env": env,
                    "cwd": work,
                },
                port,
                photos,
                args,
            )
        else:
            print(
                "TorchServe row skipped: no Java (Debian: apt-get install openjdk-17-jre-headless)",
                flush=True,
            )
        port = free_port()
        naive_label = "naive FastAPI endpoint (same handler), resnet18 fp32 eager"
        if wanted(naive_label, args):
            results["rows"][naive_label] = measure(
                "naive",
                {
                    "command": [
                        sys.executable,
                        str(HERE / "naive_sagemaker_server.py"),
                        str(models["resnet18"]["checkpoint"]),
                        str(port),
                    ]
                },
                port,
                photos,
                args,
            )
        serve_rows = [
            ("resnet18", "fp32", "onnxruntime", "fp32"),
            ("resnet18", "int8", "onnxruntime", "fp32"),
            ("resnet18", "fp32", "openvino", "fp32"),
            ("resnet18", "fp32", "openvino", "bf16"),
            ("resnet18", "int8", "openvino", "fp32"),
            ("resnet18", "fp32", "auto", "auto"),
            ("lite0", "fp32", "openvino", "bf16"),
            ("lite0", "int8", "openvino", "fp32"),
            ("lite0", "fp32", "auto", "auto"),  # what `binsight serve` picks on this CPU (and under a cap)
        ]
        commands = {}
        for key, file, backend, precision in serve_rows:
            if key not in models:
                continue
            label = f"binsight serve, {key} {backend} {'int8' if file == 'int8' else precision}"
            if not wanted(label, args):
                continue
            # Capacity under a closed loop: nothing shed (--max-queue-ms 0), or the 16 connections'
            # standing queue would be shed by the latency bound and resent at once by wrk.
            commands[label] = lambda port, f=models[key][file], b=backend, p=precision: serve_command(
                f,
                port,
                backend=b,
                precision=p,
                max_batch_size=args.max_batch,
                max_wait_ms=args.max_wait_ms,
                max_queue_ms=0,
            )
            port = free_port()
            results["rows"][label] = measure(label, {"command": commands[label](port)}, port, photos, args)

        if not commands:
            print_tables(results, args)
            return 0
        best_label = max(commands, key=lambda k: results["rows"][k].per_minute)
        half_rate = results["rows"][best_label].per_minute / 60 / 2
        port = free_port()
        proc = start(commands[best_label](port), port)
        try:
            url = f"http://127.0.0.1:{port}/invocations"
            run_wrk(url, photos, 3, args.connections)
            half = run_wrk(url, photos, args.duration, args.connections, rate=half_rate)
            # wrk paces each connection with a fixed delay, so its 16 connections fire in step (bursts
            # of 16); independent callers arrive as a Poisson process, which binsight's generator
            # produces (at ~2.5% of one core at this rate).
            poisson = asyncio.run(
                run_load(url, [p.read_bytes() for p in photos], args.duration, 16, half_rate, poisson=True)
            ).summary()
        finally:
            stop(proc)
        results["half_capacity"] = {
            "row": best_label,
            "target_rps": half_rate,
            **half.__dict__,
            "per_minute": half.per_minute,
            "poisson": poisson.model_dump(include={"ok", "statuses", "latency_ms", "client"}),
        }

    print_tables(results, args)
    as_json = json.dumps(results, default=lambda o: {**o.__dict__, "per_minute": o.per_minute})
    atomic_write_json(args.out, json.loads(as_json))
    print(f"\nresults in {args.out}")
    return 0


def print_tables(results: dict[str, Any], args: argparse.Namespace) -> None:
    cores = results["cores"]
    rows = results["rows"]
    torchserve = next((v for k, v in rows.items() if k.startswith("TorchServe")), None)
    naive = next((v for k, v in rows.items() if k.startswith("naive")), None)
    features = ", ".join(results["cpu_features"])
    print(f"\n{cores} cores, CPU features {features}; real ABID JPEGs; wrk, {args.connections} connections")
    print("| server | inv/min | inv/min/core | p50 ms | p99 ms | non-2xx | vs TorchServe | vs naive |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for label, r in rows.items():
        vs_ts = f"{r.per_minute / torchserve.per_minute:.1f}x" if torchserve else "n/a"
        print(
            f"| {label} | {r.per_minute:.0f} | {r.per_minute / cores:.0f} | {r.p50_ms:.1f} | {r.p99_ms:.1f} "
            f"| {r.non_2xx} | {vs_ts} | {f'{r.per_minute / naive.per_minute:.1f}x' if naive else 'n/a'} |"
        )
    print("\n| model, runtime | accuracy (real test split) | model-only img/s | MAC rate vs 2048² GEMM |")
    print("| --- | --- | --- | --- |")
    for label, r in results["runtimes"].items():
        if "ceiling_img_s" not in r:
            print(f"| {label} | {r['accuracy']:.4f} | | |")
            continue
        precision = r["runtime"]["precision"]
        share = ""
        if label.startswith("resnet18"):
            share = f"{r['ceiling_img_s'] * RESNET18_GMAC / results['gemm_gmacs'][precision]:.0%}"
        print(f"| {label} | {r['accuracy']:.4f} | {r['ceiling_img_s']:.0f} | {share} |")
    half = results.get("half_capacity")
    if half is None:
        return
    print(
        f"\nhalf capacity ({half['row']}, target {half['target_rps']:.0f} req/s): achieved "
        f"{half['per_minute'] / 60:.0f} req/s, p50 {half['p50_ms']:.1f} ms, p99 {half['p99_ms']:.1f} ms "
        "(wrk, connections paced in step)"
    )
    poisson = half["poisson"]
    client_share = 100 * poisson["client"]["cpu_share_of_one_core"]
    print(
        f"half capacity, Poisson arrivals (binsight loadtest, {client_share:.1f}%"
        f" of a core): {poisson['ok'] / args.duration:.0f} req/s, p50 {poisson['latency_ms']['p50']:.1f} ms, "
        f"p99 {poisson['latency_ms']['p99']:.1f} ms, statuses {poisson['statuses']}"
    )


if __name__ == "__main__":
    sys.exit(main())
