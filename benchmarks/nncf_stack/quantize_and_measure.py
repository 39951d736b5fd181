"""Runs inside the NNCF virtualenv (nncf + openvino only, no torch): quantise the fp32 ONNX model with
NNCF's post-training quantisation on the calibration photos, then measure, on the same test photos and
the same OpenVINO build, fp32, the ONNX QDQ int8 file binsight exports, and the NNCF int8 model:
accuracy and model-only throughput. Prints one JSON object.

Args: FP32.onnx QDQ_INT8.onnx CALIBRATION.npy TEST.npy TEST_LABELS.npy THREADS
"""

from __future__ import annotations

import json
import sys
import time

import nncf
import numpy as np
import openvino as ov


def throughput(compiled: ov.CompiledModel, images: np.ndarray, batch: int, seconds: float = 5.0) -> float:
    request = compiled.create_infer_request()
    sample = images[:batch]
    for _ in range(3):
        request.infer({0: sample})
    done, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        request.infer({0: sample})
        done += batch
    return done / (time.perf_counter() - started)


def predict(compiled: ov.CompiledModel, images: np.ndarray) -> np.ndarray:
    request = compiled.create_infer_request()
    out = [request.infer({0: images[i : i + 32]})[0] for i in range(0, len(images), 32)]
    return np.concatenate(out)


def main() -> None:
    fp32_path, qdq_path, calibration_path, test_path, labels_path, threads = sys.argv[1:7]
    calibration, test = np.load(calibration_path), np.load(test_path)
    labels = np.load(labels_path)
    core = ov.Core()
    config = {"INFERENCE_NUM_THREADS": int(threads), "INFERENCE_PRECISION_HINT": "f32"}
    started = time.perf_counter()
    quantized = nncf.quantize(
        core.read_model(fp32_path),
        nncf.Dataset([calibration[i : i + 1] for i in range(len(calibration))]),
        preset=nncf.QuantizationPreset.PERFORMANCE,
        subset_size=len(calibration),
    )
    quantize_s = time.perf_counter() - started
    models = {
        "fp32 (OpenVINO)": core.read_model(fp32_path),
        "ONNX QDQ int8 (binsight export)": core.read_model(qdq_path),
        "NNCF int8": quantized,
    }
    rows = {}
    for name, model in models.items():
        compiled = core.compile_model(model, "CPU", config)
        probabilities = predict(compiled, test)
        top = probabilities.shape[1] - 1
        predicted = probabilities.argmax(axis=1)
        rows[name] = {
            "accuracy": float((predicted == np.minimum(labels, top)).mean()),
            "mae": float(np.abs(predicted - labels).mean()),
            "img_per_s_batch32": throughput(compiled, test, 32),
            "img_per_s_batch1": throughput(compiled, test, 1),
        }
    print(
        json.dumps(
            {"nncf": nncf.__version__, "openvino": ov.__version__, "quantize_s": quantize_s, "rows": rows}
        )
    )


if __name__ == "__main__":
    main()
