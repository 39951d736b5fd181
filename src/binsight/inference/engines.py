"""Which engine runs a model and at what precision, from what the CPU offers: plain logic, no engine
imported, so configs can name the choices without loading ONNX Runtime."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Literal

from binsight.cpu import NATIVE_BF16_FLAGS, cpu_features
from binsight.errors import BinsightError

Backend = Literal["auto", "onnxruntime", "openvino"]
EnginePrecision = Literal["auto", "fp32", "bf16"]


@dataclass(frozen=True)
class RuntimeChoice:
    """Which engine runs the model, at what precision, and why: reported by `/v1/model` and the log."""

    backend: str
    precision: str  # fp32, bf16, or int8 (an int8 file runs in int8 whatever was asked)
    reason: str


def choose_runtime(backend: Backend, precision: EnginePrecision) -> RuntimeChoice:
    """OpenVINO where it is installed and the CPU is x86 (its oneDNN kernels use AMX, AVX512-BF16 and
    VNNI, which ONNX Runtime's CPU provider leaves idle for bf16); ONNX Runtime otherwise, the portable
    fallback. bf16 is chosen only where the CPU computes it natively (AMX or AVX512-BF16)."""
    features = cpu_features()
    if backend == "auto":
        try:
            import openvino  # noqa: F401

            have_openvino = True
        except ImportError:
            have_openvino = False
        x86 = bool(features) or os.uname().machine in ("x86_64", "AMD64")
        backend = "openvino" if have_openvino and x86 else "onnxruntime"
        why = (
            "OpenVINO installed on an x86 CPU" if backend == "openvino" else "OpenVINO unavailable or not x86"
        )
    else:
        why = "asked for"
    native_bf16 = bool(features & NATIVE_BF16_FLAGS)
    if precision == "auto":
        precision = "bf16" if native_bf16 and backend == "openvino" else "fp32"
        flags = "+".join(sorted(features & NATIVE_BF16_FLAGS)) or "no native bf16"
        why += f"; {precision} because the CPU has {flags}"
    elif precision == "bf16" and backend == "onnxruntime":
        raise BinsightError(
            "ONNX Runtime's CPU provider has no bf16 path", hint="use --backend openvino or --precision fp32"
        )
    elif precision == "bf16" and not native_bf16:
        # OpenVINO would emulate bf16 slower than fp32, or, where its own CPUID check and oneDNN's ISA
        # cap disagree, fail to build its kernels at the first inference.
        precision = "fp32"
        why += "; fp32: bf16 was asked for, but this CPU has no native bf16"
    return RuntimeChoice(backend, precision, why)
