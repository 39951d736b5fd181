"""int8 by NNCF (OpenVINO's post-training quantisation) against the ONNX QDQ int8 that `binsight export
--quantize int8` writes, on real ABID photos: accuracy on the test split and model-only throughput,
both run by the same OpenVINO build with the same threads, fp32 as the reference.

Both quantisers calibrate on the same validation photos, preprocessed by binsight's own pipeline
(what the server feeds the model). NNCF runs in its own virtualenv (--nncf-venv, built on first use
with pinned versions) so that it never touches binsight's pins.

Run: .venv/bin/python benchmarks/bench_nncf.py --checkpoint RUN/best.pt --data DATA [--threads 2]
(RUN and DATA from benchmarks/bench_accuracy.py: runs/scratch is the resnet18, data-1to5 the split)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from binsight.data.split import load_split
from binsight.export.onnx import ExportConfig, export
from binsight.imaging import Preprocess
from binsight.inference.runtime import load_counter

os.environ.setdefault("BINSIGHT_PROGRESS", "0")
HERE = Path(__file__).resolve().parent
NNCF_PINS = ["nncf==3.4.0", "openvino==2026.4.1", "onnx==1.23.2", "numpy==2.4.6"]


def nncf_python(venv: Path) -> Path:
    python = venv / "bin" / "python"
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "--quiet", *NNCF_PINS], check=True)
    return python


def preprocessed(model: Path, data: Path, split: str, limit: int) -> tuple[np.ndarray, np.ndarray]:
    info = load_counter(model, backend="onnxruntime").info
    rows = load_split(data, split)[:limit]
    images = np.stack([Preprocess.from_card(info.card)(data / r["image"]) for r in rows])
    return images.astype(np.float32), np.array([int(r["count"]) for r in rows])


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--checkpoint", type=Path, default=Path("/tmp/bacc/runs/scratch/best.pt"))
    parser.add_argument("--data", type=Path, default=Path("/tmp/bacc/data-1to5"))
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--calibration-images", type=int, default=300)
    parser.add_argument("--nncf-venv", type=Path, default=Path(tempfile.gettempdir()) / "binsight-nncf")
    args = parser.parse_args()
    if not args.checkpoint.is_file() or not (args.data / "splits").is_dir():
        print(
            "SKIP: needs a trained checkpoint and its dataset (run bench_accuracy.py first)", file=sys.stderr
        )
        return 0
    python = nncf_python(args.nncf_venv)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        fp32 = work / "model.onnx"
        export(ExportConfig(checkpoint=args.checkpoint, out=fp32, data=args.data, quantize="int8"))
        qdq = work / "model.int8.onnx"
        calibration, _ = preprocessed(fp32, args.data, "val", args.calibration_images)
        test, labels = preprocessed(fp32, args.data, "test", 10_000)
        for name, array in (("calibration", calibration), ("test", test), ("labels", labels)):
            np.save(work / f"{name}.npy", array)
        done = subprocess.run(
            [
                str(python),
                str(HERE / "nncf_stack" / "quantize_and_measure.py"),
                str(fp32),
                str(qdq),
                str(work / "calibration.npy"),
                str(work / "test.npy"),
                str(work / "labels.npy"),
                str(args.threads),
            ],
            capture_output=True,
            text=True,
            check=True,
        )
    result = json.loads(done.stdout.strip().splitlines()[-1])
    rows = result["rows"]
    baseline = rows["ONNX QDQ int8 (binsight export)"]
    print(
        f"NNCF {result['nncf']}, OpenVINO {result['openvino']}, {args.threads} threads, "
        f"{len(labels)} test photos, calibration on {len(calibration)} validation photos "
        f"(NNCF took {result['quantize_s']:.0f} s)\n"
    )
    print("| model | test accuracy | MAE | img/s batch 32 | img/s batch 1 | batch 32 vs QDQ |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name, row in rows.items():
        ratio = row["img_per_s_batch32"] / baseline["img_per_s_batch32"]
        print(
            f"| {name} | {row['accuracy']:.4f} | {row['mae']:.3f} | {row['img_per_s_batch32']:.0f} | "
            f"{row['img_per_s_batch1']:.0f} | {ratio:.2f}x |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
