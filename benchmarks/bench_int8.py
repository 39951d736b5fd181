"""int8 on every CPU class: which quantisation holds its accuracy where there is no VNNI, measured.

One trained model (the Lite0 recipe's by default) is exported to fp32 ONNX, then quantised several
ways (static QDQ, calibrated on 64 validation photos):
- `u8s8`: u8 activations, 8-bit s8 weights per channel (binsight's earlier default);
- `u8s8-reduce`: the same with 7-bit weights (`reduce_range`), ONNX Runtime's advice for CPUs
  without VNNI;
- `s8s8`: signed activations;
- `u8s8-reduce-nodw`: 7-bit weights, depthwise convolutions left in float.
Each file runs on real validation photos of ../shared/abid with ONNX Runtime and OpenVINO:
- on this machine's CPU as it is;
- capped to AVX2 (no AVX-512, no VNNI, no bf16): OpenVINO by `ONEDNN_MAX_CPU_ISA=AVX2` (its CPU
  plugin is oneDNN; the cap is honoured: its kernels report `brgconv_avx2`), ONNX Runtime under
  `qemu-x86_64 -cpu Haswell` (ONNX Runtime has no switch: its MLAS kernels read CPUID, and qemu's
  user-mode emulation answers as a Haswell would). qemu emulates: its timings mean nothing, only
  its answers are compared.
Per row: accuracy against the recorded counts, agreement with the fp32 model (same count), the
largest probability difference, and img/s where the timing is real. The CPU's flags head the output.

Run: .venv/bin/python benchmarks/bench_int8.py [--checkpoint /tmp/binsight-accuracy/runs/binsight/best.pt]
     [--data /tmp/binsight-accuracy/data] [--photos 300] [--no-emulate]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("BINSIGHT_PROGRESS", "0")

VARIANTS = {
    "u8s8": {"reduce_range": False},
    "u8s8-reduce": {"reduce_range": True},
    "s8s8": {"reduce_range": False, "signed_activations": True},
    "u8s8-reduce-nodw": {"reduce_range": True, "exclude_depthwise": True},
}


def run_worker(model: Path, inputs: Path, backend: str, cap: str | None) -> dict[str, object]:
    """Probabilities (and img/s) of `model` on the saved inputs, in a fresh process with the cap."""
    env = dict(os.environ)
    command = [sys.executable, __file__, "--worker", str(model), str(inputs), backend]
    if cap == "avx2" and backend == "openvino":
        env["ONEDNN_MAX_CPU_ISA"] = "AVX2"
    if cap == "avx2" and backend == "onnxruntime":
        if shutil.which("qemu-x86_64") is None:
            return {"skipped": "qemu-x86_64 not installed (Debian: qemu-user)"}
        command = ["qemu-x86_64", "-cpu", "Haswell", *command]
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=3600)
    if done.returncode:
        return {"error": done.stderr[-500:]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def worker(model: Path, inputs: Path, backend: str) -> None:
    from binsight.inference.engines import RuntimeChoice
    from binsight.inference.runtime import OnnxCounter, OpenVinoCounter

    batch = np.load(inputs)["images"]
    choice = RuntimeChoice(backend, "fp32", "bench")
    counter = (
        OpenVinoCounter(model, choice=choice) if backend == "openvino" else OnnxCounter(model, choice=choice)
    )
    counter.predict(batch[:16])
    started = time.perf_counter()
    probabilities = np.concatenate([counter.predict(batch[i : i + 16]) for i in range(0, len(batch), 16)])
    seconds = time.perf_counter() - started
    print(json.dumps({"probabilities": probabilities.tolist(), "images_per_s": len(batch) / seconds}))


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--worker", nargs=3, metavar=("MODEL", "INPUTS", "BACKEND"), help=argparse.SUPPRESS)
    parser.add_argument(
        "--checkpoint", type=Path, default=Path("/tmp/binsight-accuracy/runs/binsight/best.pt")
    )
    parser.add_argument("--data", type=Path, default=Path("/tmp/binsight-accuracy/data"))
    parser.add_argument("--photos", type=int, default=300)
    parser.add_argument(
        "--no-emulate",
        action="store_true",
        help="skip ONNX Runtime under qemu's Haswell (it runs at about 1 img/s: minutes per file)",
    )
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "binsight-int8")
    args = parser.parse_args()
    if args.worker:
        worker(Path(args.worker[0]), Path(args.worker[1]), args.worker[2])
        return 0
    if not args.checkpoint.is_file():
        print(
            f"SKIP: no trained model at {args.checkpoint} (run benchmarks/bench_accuracy.py first)",
            file=sys.stderr,
        )
        return 0

    from binsight.cpu import cpu_class, cpu_features
    from binsight.export.int8 import Int8Recipe, quantize_int8
    from binsight.export.onnx import ExportConfig, _sample_inputs, export
    from binsight.training.checkpoint import load_checkpoint
    from binsight.training.evaluate import load_model

    args.work.mkdir(parents=True, exist_ok=True)
    _, config, num_classes = load_model(load_checkpoint(args.checkpoint))
    images, counts = _sample_inputs(args.data, "val", config, num_classes, args.photos)
    inputs = args.work / "inputs.npz"
    np.savez(inputs, images=images)
    fp32 = args.work / "fp32.onnx"
    export(ExportConfig(checkpoint=args.checkpoint, out=fp32, data=args.data, calibration_images=64))
    files = {"fp32": fp32}
    calibration, _ = _sample_inputs(args.data, "val", config, num_classes, 64)
    for name, settings in VARIANTS.items():
        files[name] = args.work / f"{name}.onnx"
        files[name].write_bytes(quantize_int8(fp32, calibration, Int8Recipe(**settings)))

    targets = np.minimum(counts, num_classes - 1)
    print(f"CPU: {cpu_class()} ({', '.join(sorted(cpu_features()))}); {len(images)} validation photos")
    print("| model | engine | CPU | accuracy | agrees with fp32 | max prob diff | img/s |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    reference: dict[tuple[str, str], np.ndarray] = {}
    results = []
    for cap in (None, "avx2"):
        for backend in ("onnxruntime", "openvino"):
            for name, path in files.items():
                if cap == "avx2" and backend == "onnxruntime" and args.no_emulate:
                    continue
                out = run_worker(path, inputs, backend, cap)
                cpu = "as is" if cap is None else "AVX2 (capped)"
                if "probabilities" not in out:
                    print(f"| {name} | {backend} | {cpu} | {out} | | | |")
                    continue
                probabilities = np.asarray(out["probabilities"])
                if name == "fp32":
                    reference[(backend, str(cap))] = probabilities
                base = reference[(backend, str(cap))]
                accuracy = float((probabilities.argmax(1) == targets).mean())
                agreement = float((probabilities.argmax(1) == base.argmax(1)).mean())
                difference = float(np.abs(probabilities - base).max())
                speed = (
                    "emulated" if cap == "avx2" and backend == "onnxruntime" else f"{out['images_per_s']:.0f}"
                )
                results.append(
                    {
                        "model": name,
                        "engine": backend,
                        "cpu": cpu,
                        "accuracy": accuracy,
                        "agreement": agreement,
                        "max_prob_diff": difference,
                        "speed": speed,
                    }
                )
                cells = [
                    name,
                    backend,
                    cpu,
                    f"{accuracy:.3f}",
                    f"{agreement:.3f}",
                    f"{difference:.3f}",
                    speed,
                ]
                print("| " + " | ".join(cells) + " |")
    (args.work / "results.json").write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
