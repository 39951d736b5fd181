"""An exported counting model in ONNX Runtime, with everything needed to use it read from the file.

The ONNX file's metadata carries the input size, normalisation, class list and provenance, so a
server needs the file and nothing else.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from binsight.errors import BinsightError

META_PREFIX = "binsight."


@dataclass(frozen=True)
class ModelInfo:
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    classes: tuple[int, ...]
    arch: str
    head: str
    version: str
    quantized: bool


def read_info(metadata: dict[str, str], file_digest: str) -> ModelInfo:
    try:
        return ModelInfo(
            image_size=int(metadata[META_PREFIX + "image_size"]),
            mean=tuple(json.loads(metadata[META_PREFIX + "mean"])),
            std=tuple(json.loads(metadata[META_PREFIX + "std"])),
            classes=tuple(json.loads(metadata[META_PREFIX + "classes"])),
            arch=metadata.get(META_PREFIX + "arch", "unknown"),
            head=metadata.get(META_PREFIX + "head", "unknown"),
            version=metadata.get(META_PREFIX + "version") or file_digest[:12],
            quantized=metadata.get(META_PREFIX + "quantized") == "int8",
        )
    except (KeyError, ValueError) as exc:
        raise BinsightError(
            f"the ONNX file lacks binsight metadata ({exc})", hint="export it with `binsight export`"
        ) from None


class OnnxCounter:
    """One loaded model. Thread-safe: ONNX Runtime sessions may be run from several threads."""

    def __init__(
        self, path: str | os.PathLike[str], threads: int | None = None, version: str | None = None
    ) -> None:
        self.path = Path(path)
        try:
            data = self.path.read_bytes()
        except OSError as exc:
            raise BinsightError(f"cannot read model {self.path}: {exc.strerror}") from None
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        try:
            self.session = ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own exception types for bad graphs
            raise BinsightError(f"{self.path} is not a loadable ONNX model: {exc}") from None
        metadata = self.session.get_modelmeta().custom_metadata_map
        self.info = read_info(metadata, hashlib.sha256(data).hexdigest())
        if version:  # a registry version name outranks what the file says
            self.info = dataclasses.replace(self.info, version=version)
        self.input_name = self.session.get_inputs()[0].name

    def predict(self, batch: np.ndarray) -> np.ndarray:
        """(N, 3, S, S) float32 -> (N, num_classes) probabilities."""
        return self.session.run(None, {self.input_name: batch})[0]
