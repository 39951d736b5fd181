"""int8 quantisation of an exported ONNX file: static QDQ, calibrated on real validation photos, by a
recipe measured across CPU classes (`benchmarks/bench_int8.py`)."""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx


@dataclass(frozen=True)
class Int8Recipe:
    """How the int8 file is quantised (static QDQ, calibrated on validation photos). Measured across
    CPUs in `benchmarks/bench_int8.py`: 8-bit weights with u8 activations saturate the 16-bit
    intermediate sums of int8 kernels on CPUs without VNNI (AVX2, AVX-512 before Cascade Lake), which
    costs whole counts; 7-bit weights (`reduce_range`) leave the headroom."""

    reduce_range: bool = True
    signed_activations: bool = False
    per_channel: bool = True
    exclude_depthwise: bool = False


def _depthwise_convs(path: Path) -> list[str]:
    proto = onnx.load(str(path))
    names = []
    for node in proto.graph.node:
        if node.op_type == "Conv":
            group = next((a.i for a in node.attribute if a.name == "group"), 1)
            if group > 1:
                names.append(node.name)
    return names


def quantize_int8(fp32_path: Path, calibration: np.ndarray, recipe: Int8Recipe = Int8Recipe()) -> bytes:
    """Static QDQ quantisation calibrated on real validation images (dynamic quantisation leaves the
    convolutions, which are nearly all of a CNN's time, in float)."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):  # type: ignore[misc]  # onnxruntime ships no type hints
        def __init__(self) -> None:
            self.batches = iter([{"images": calibration[i : i + 8]} for i in range(0, len(calibration), 8)])

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.batches, None)

    # The quantiser logs one line per rescaled depthwise channel (thousands for EfficientNet) through the
    # root logger at INFO; keep them out of the user's log.
    root = logging.getLogger()
    level = root.level
    root.setLevel(max(level, logging.WARNING))
    try:
        with tempfile.TemporaryDirectory() as tmp:
            prepared, output = Path(tmp) / "prepared.onnx", Path(tmp) / "int8.onnx"
            quant_pre_process(str(fp32_path), str(prepared), skip_symbolic_shape=True)
            quantize_static(
                str(prepared),
                str(output),
                Reader(),
                quant_format=QuantFormat.QDQ,
                activation_type=QuantType.QInt8 if recipe.signed_activations else QuantType.QUInt8,
                weight_type=QuantType.QInt8,
                per_channel=recipe.per_channel,
                reduce_range=recipe.reduce_range,
                nodes_to_exclude=_depthwise_convs(prepared) if recipe.exclude_depthwise else None,
            )
            return output.read_bytes()
    finally:
        root.setLevel(level)
