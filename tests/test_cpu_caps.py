"""binsight on a smaller CPU than this one: AVX2 only (no AVX-512, no VNNI, no bf16), as most laptops.

What can be capped, and how (recorded in docs/benchmarks.md):
- PyTorch: `ATEN_CPU_CAPABILITY=avx2` (its own kernels) and `ONEDNN_MAX_CPU_ISA=AVX2` (oneDNN's);
- OpenVINO: `ONEDNN_MAX_CPU_ISA=AVX2` (its CPU plugin is oneDNN: kernels report `*_avx2`);
- ONNX Runtime: no switch (MLAS reads CPUID), so it runs under `qemu-x86_64 -cpu Haswell`, user-mode
  emulation of an AVX2 CPU: answers are real, timings are not.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from binsight.export.onnx import ExportConfig, export

QEMU = shutil.which("qemu-x86_64")
needs_qemu = pytest.mark.skipif(
    QEMU is None and not os.environ.get("CI"), reason="qemu-x86_64 not installed (Debian: qemu-user)"
)
AVX2 = {"ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"}


def run_python(code: str, env: dict[str, str] | None = None, emulate: bool = False) -> Any:
    command = [sys.executable, "-c", code]
    if emulate:
        command = [str(QEMU), "-cpu", "Haswell", *command]
    done = subprocess.run(
        command, capture_output=True, text=True, timeout=600, env={**os.environ, **(env or {})}
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def int8_pair(trained: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("caps")
    report = export(ExportConfig(checkpoint=trained["checkpoint_a"], out=folder / "m.onnx", quantize="int8"))
    assert report.int8 is not None
    return {"fp32": Path(report.onnx), "int8": Path(report.int8.onnx)}


def test_a_capped_cpu_is_seen_as_the_smaller_one() -> None:
    seen = run_python(
        "import json, torch; from binsight.cpu import cpu_class; "
        "from binsight.inference.engines import choose_runtime; "
        "from binsight.cpu import native_bf16; "
        "c = choose_runtime('auto', 'auto'); "
        "print(json.dumps({'class': cpu_class(), 'precision': c.precision, 'bf16': native_bf16(), "
        "'torch': torch.backends.cpu.get_cpu_capability()}))",
        AVX2,
    )
    # No bf16 is chosen where only emulated bf16 exists: training runs fp32, serving picks fp32.
    assert seen == {"class": "AVX2", "precision": "fp32", "bf16": False, "torch": "AVX2"}


_LOAD = (
    "import dataclasses, json; from binsight.inference.runtime import load_counter; "
    "loaded = [load_counter(m, backend=BACKEND) for m in MODELS]; "
    "print(json.dumps([{'path': str(c.path), 'precision': c.runtime.precision, 'reason': c.runtime.reason, "
    "'check': dataclasses.asdict(c.check) if c.check else None} for c in loaded]))"
)


def _load_capped(models: list[Path], backend: str, emulate: bool) -> list[dict[str, object]]:
    """Each model loaded as a server would, in one capped process (under emulation, starting Python
    is most of the cost)."""
    code = _LOAD.replace("MODELS", repr([str(m) for m in models])).replace("BACKEND", repr(backend))
    return run_python(code, AVX2, emulate=emulate)  # type: ignore[no-any-return]


def _holds_or_is_refused(loaded: dict[str, object], pair: dict[str, Path]) -> None:
    """int8 on an AVX2 CPU either agrees with fp32 within the tolerance, or the fp32 file serves and
    the reason says why: never a silently worse int8."""
    check = loaded["check"]
    assert isinstance(check, dict)
    if loaded["precision"] == "int8":
        assert check["passed"] and check["agreement"] >= 0.9 and check["max_prob_diff"] <= 0.12, loaded
    else:
        assert loaded["path"] == str(pair["fp32"]) and "failed its self-check" in str(loaded["reason"])


def test_openvino_int8_on_an_avx2_cpu(int8_pair: dict[str, Path]) -> None:
    (loaded,) = _load_capped([int8_pair["int8"]], "openvino", emulate=False)
    _holds_or_is_refused(loaded, int8_pair)


@needs_qemu
def test_onnxruntime_int8_on_an_emulated_avx2_cpu(int8_pair: dict[str, Path]) -> None:
    int8, fp32 = _load_capped([int8_pair["int8"], int8_pair["fp32"]], "onnxruntime", emulate=True)
    _holds_or_is_refused(int8, int8_pair)
    assert fp32["precision"] == "fp32" and fp32["check"]["passed"]  # type: ignore[index]
