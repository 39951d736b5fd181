"""binsight against TorchServe tuned as its documentation advises, not against its defaults.

The peer rows, all resnet18 fp32 eager with the seeds' decode and transform, on real ABID photos:
- the seeds' stack (SageMaker toolkit starting TorchServe, benchmarks/sagemaker_stack) with its
  defaults, then with the worker count and threads per worker set for this machine
  (SAGEMAKER_MODEL_SERVER_WORKERS, OMP_NUM_THREADS);
- plain TorchServe with a batching handler (benchmarks/torchserve_stack/handler.py: one forward pass
  per server-side batch) over a small grid of workers x threads x batchSize/maxBatchDelay. The
  toolkit's own batching runs its handler once per request, so real batching needs this handler.
The binsight rows serve the same resnet18 checkpoint (its default engine, and OpenVINO int8). The
headline is the best binsight row against the best TorchServe row, both measured in this run.

Run: .venv/bin/python benchmarks/bench_torchserve_sweep.py --checkpoint RESNET18_RUN/best.pt
     [--abid ../shared/abid] [--torchserve-venv /tmp/ts-venv] [--duration 15]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from bench_serve import (
    HERE,
    SRC,
    free_port,
    measure,
    serve_command,
    torchserve_model,
    torchserve_python,
)
from binsight.cpu import cpu_class
from binsight.export.onnx import ExportConfig, export
from binsight.utils.io import atomic_write_json
from wrk_load import WrkResult, have_wrk


@dataclass(frozen=True)
class PeerSetting:
    stack: str  # "toolkit" (the seeds' SageMaker stack) or "plain" (TorchServe + batching handler)
    workers: int | None  # None: the stack's default
    threads: int | None  # torch threads per worker; None: the stack's default (all cores)
    batch: int = 1
    delay_ms: int = 0

    @property
    def label(self) -> str:
        name = "TorchServe + SageMaker toolkit" if self.stack == "toolkit" else "TorchServe, batching handler"
        if self.workers is None:
            return f"{name}, defaults"
        batching = f", batchSize {self.batch}, maxBatchDelay {self.delay_ms} ms" if self.batch > 1 else ""
        return f"{name}, {self.workers} workers x {self.threads} threads{batching}"


def peer_settings(cores: int) -> list[PeerSetting]:
    half = max(1, cores // 2)
    return [
        PeerSetting("toolkit", None, None),
        PeerSetting("toolkit", 1, cores),
        PeerSetting("toolkit", cores, 1),
        PeerSetting("plain", 1, cores),
        PeerSetting("plain", cores, 1),
        PeerSetting("plain", 1, cores, batch=8, delay_ms=10),
        PeerSetting("plain", cores, 1, batch=8, delay_ms=10),
        PeerSetting("plain", half, cores // half, batch=16, delay_ms=25),
    ]


def plain_torchserve(
    setting: PeerSetting, python: Path, base: Path, port: int
) -> tuple[list[str], dict[str, str]]:
    """Archive the batching handler with the weights and write TorchServe's properties for `setting`."""
    store = base / f"store-{port}"
    store.mkdir(parents=True)
    bin_dir = python.parent
    subprocess.run(
        [
            str(bin_dir / "torch-model-archiver"),
            "--model-name", "resnet18", "--version", "1.0",
            "--serialized-file", str(base / "model" / "model.pth"),
            "--handler", str(HERE / "torchserve_stack" / "handler.py"),
            "--export-path", str(store),
        ],
        check=True,
    )  # fmt: skip
    model = {
        "resnet18": {
            "1.0": {
                "defaultVersion": True,
                "marName": "resnet18.mar",
                "minWorkers": setting.workers,
                "maxWorkers": setting.workers,
                "batchSize": setting.batch,
                "maxBatchDelay": setting.delay_ms,
                "responseTimeout": 120,
            }
        }
    }
    properties = store / "config.properties"
    properties.write_text(
        f"inference_address=http://127.0.0.1:{port}\n"
        f"management_address=http://127.0.0.1:{free_port()}\n"
        f"metrics_address=http://127.0.0.1:{free_port()}\n"
        f"model_store={store}\nload_models=resnet18.mar\nmodels={json.dumps(model)}\n"
        "disable_system_metrics=true\n"
    )
    command = [
        str(bin_dir / "torchserve"), "--start", "--foreground", "--ncs", "--disable-token-auth",
        "--model-store", str(store), "--ts-config", str(properties),
    ]  # fmt: skip
    return command, {"BENCH_TORCH_THREADS": str(setting.threads), "OMP_NUM_THREADS": str(setting.threads)}


def toolkit_torchserve(
    setting: PeerSetting, python: Path, base: Path, port: int, num_classes: int
) -> tuple[list[str], dict[str, str]]:
    env = {
        "SAGEMAKER_BASE_DIR": str(base),
        "SAGEMAKER_PROGRAM": "inference.py",
        "SAGEMAKER_BIND_TO_PORT": str(port),
        "BINSIGHT_NUM_CLASSES": str(num_classes),
    }
    if setting.workers is not None:
        env |= {
            "SAGEMAKER_MODEL_SERVER_WORKERS": str(setting.workers),
            "OMP_NUM_THREADS": str(setting.threads),
        }
    command = [str(python), str(HERE / "sagemaker_stack" / "start.py"), str(base / f"ts-{port}.properties")]
    return command, env


def run_row(
    label: str,
    command: list[str],
    env: dict[str, str],
    port: int,
    path: str,
    photos: list[Path],
    args: argparse.Namespace,
) -> WrkResult:
    # TorchServe refuses to start while the process in its pid file (in TMPDIR) lives: each row its own.
    tmp = args.work / f"tmp-{port}"
    tmp.mkdir()
    proc_args = {"command": command, "env": {**os.environ, **env, "TMPDIR": str(tmp)}, "cwd": args.work}
    return measure(label, proc_args, port, photos, args, path)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--checkpoint", type=Path, required=True, help="a binsight resnet18 run's best.pt")
    parser.add_argument("--abid", type=Path, default=HERE.parent.parent / "shared" / "abid")
    parser.add_argument(
        "--torchserve-venv", type=Path, default=Path(tempfile.gettempdir()) / "binsight-torchserve"
    )
    parser.add_argument("--duration", type=float, default=15.0)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument(
        "--out", type=Path, default=Path(tempfile.gettempdir()) / "binsight-torchserve-sweep.json"
    )
    args = parser.parse_args()
    photos = sorted((args.abid / "images").glob("*.jpg"))[:256]
    if not photos or not have_wrk() or not shutil.which("java"):
        print("SKIP: needs real ABID photos (--abid), wrk and Java (Debian: wrk openjdk-17-jre-headless)")
        return 0
    cores = os.cpu_count() or 1
    python = torchserve_python(args.torchserve_venv)
    rows: dict[str, WrkResult] = {}
    with tempfile.TemporaryDirectory() as tmp:
        args.work = Path(tmp)
        base = args.work / "sagemaker"
        num_classes = torchserve_model(args.checkpoint, base)
        peer_env = {"PATH": f"{python.parent}:{os.environ['PATH']}", "PYTHONPATH": str(SRC)}
        for setting in peer_settings(cores):
            port = free_port()
            if setting.stack == "toolkit":
                command, env = toolkit_torchserve(setting, python, base, port, num_classes)
                path = "/invocations"
            else:
                command, env = plain_torchserve(setting, python, base, port)
                path = "/predictions/resnet18"
            rows[setting.label] = run_row(setting.label, command, peer_env | env, port, path, photos, args)

        report = export(
            ExportConfig(checkpoint=args.checkpoint, out=args.work / "resnet18.onnx", quantize="int8")
        )
        assert report.int8 is not None  # asked for
        for label, model, flags in (
            ("binsight serve, resnet18, default engine", Path(report.onnx), {}),
            ("binsight serve, resnet18, OpenVINO int8", Path(report.int8.onnx), {"backend": "openvino"}),
        ):
            port = free_port()
            command = serve_command(model, port, max_queue_ms=0, **flags)
            rows[label] = run_row(label, command, {}, port, "/invocations", photos, args)

    defaults = next(r for k, r in rows.items() if k.endswith("defaults"))
    best_peer = max((k for k in rows if k.startswith("TorchServe")), key=lambda k: rows[k].per_minute)
    best_ours = max((k for k in rows if k.startswith("binsight")), key=lambda k: rows[k].per_minute)
    print(f"\n{cores} cores, CPU class {cpu_class()}; real ABID JPEGs; wrk, {args.connections} connections, "
          f"{args.duration:.0f} s per row")  # fmt: skip
    print("| server | inv/min | p50 ms | p99 ms | non-2xx | vs TorchServe defaults | vs best TorchServe |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    peak = rows[best_peer].per_minute
    for label, r in rows.items():
        print(
            f"| {label} | {r.per_minute:.0f} | {r.p50_ms:.1f} | {r.p99_ms:.1f} | {r.non_2xx} "
            f"| {r.per_minute / defaults.per_minute:.1f}x | {r.per_minute / peak:.1f}x |"
        )
    print(f"\nheadline: {best_ours} is {rows[best_ours].per_minute / peak:.1f}x {best_peer}")
    atomic_write_json(
        args.out,
        {
            "cores": cores,
            "cpu_class": cpu_class(),
            "rows": {k: {**v.__dict__, "per_minute": v.per_minute} for k, v in rows.items()},
        },
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
