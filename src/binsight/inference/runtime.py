"""An exported counting model in a CPU runtime, with everything needed to use it read from the file.

The ONNX file's metadata carries the input size, normalisation, class list and provenance, so a
server needs the file and nothing else. Two engines run it: ONNX Runtime (portable: any CPU, ARM,
GPUs through its providers) and OpenVINO (fastest on x86: bf16 on AMX/AVX512-BF16, int8 on VNNI/AMX).
`load_counter` picks one from what the CPU offers unless told.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import onnx
import onnxruntime as ort
from pydantic import BaseModel, field_serializer

from binsight.card import ModelCard
from binsight.errors import BinsightError
from binsight.imaging import Preprocess
from binsight.inference.engines import Backend, EnginePrecision, RuntimeChoice, choose_runtime
from binsight.inference.selfcheck import ReferenceSet, SelfCheck, run_self_check

log = logging.getLogger(__name__)
META_PREFIX = "binsight."
ONNXRUNTIME_FP32 = RuntimeChoice("onnxruntime", "fp32", "asked for")
OPENVINO_FP32 = RuntimeChoice("openvino", "fp32", "asked for")


@dataclass(frozen=True)
class ModelInfo:
    """A model file as a runtime sees it: its card, and what export added to this file."""

    card: ModelCard
    version: str
    quantized: bool
    # Conformal calibration written by `binsight export` (JSON; see inference/conformal.py), or None:
    # the one for the engine that runs the file, once `load_counter` has chosen it.
    calibration: str | None = dataclasses.field(default=None, repr=False)
    # Drift-monitoring baseline written by `binsight export` (JSON; see monitoring/baseline.py), or None.
    baseline: str | None = dataclasses.field(default=None, repr=False)
    embedding_dim: int = 0  # width of the model's second output (0: files exported before it existed)
    # Per engine ("openvino/bf16"): calibrations and baselines computed from that engine's own outputs.
    calibrations: dict[str, str] = dataclasses.field(default_factory=dict, repr=False)
    baselines: dict[str, str] = dataclasses.field(default_factory=dict, repr=False)
    calibrated_for: str | None = None  # the engine whose outputs `calibration` came from
    reference: str | None = dataclasses.field(default=None, repr=False)  # the self-check's photos
    not_for_serving: str | None = None  # why export judged this file unfit to serve (an int8 that lost)

    def for_engine(self, engine: str) -> ModelInfo:
        """The calibration and baseline of `engine`, or, for a file exported where that engine or
        precision was not available, the nearest one (same precision, then same engine), said so."""
        if not self.calibrations:
            return self
        backend, precision = engine.split("/")
        candidates = [engine, *(k for k in self.calibrations if k.endswith("/" + precision))]
        candidates += [k for k in self.calibrations if k.startswith(backend + "/")]
        key = next((k for k in candidates if k in self.calibrations), next(iter(self.calibrations)))
        note = key if key == engine else f"{key} (nearest to {engine}, which export could not run)"
        return dataclasses.replace(
            self,
            calibration=self.calibrations[key],
            baseline=self.baselines.get(key, self.baseline),
            calibrated_for=note,
        )

    @property
    def input_hw(self) -> tuple[int, int]:
        return self.card.input_hw

    @property
    def mean(self) -> tuple[float, ...]:
        return self.card.mean

    @property
    def std(self) -> tuple[float, ...]:
        return self.card.std

    @property
    def classes(self) -> tuple[int, ...]:
        return self.card.classes

    @property
    def arch(self) -> str:
        return self.card.arch

    def describe(self) -> ModelFacts:
        return ModelFacts(
            version=self.version,
            arch=self.card.arch,
            head=self.card.head,
            classes=list(self.card.classes),
            input_hw=list(self.card.input_hw),
            quantized=self.quantized,
            embedding_dim=self.embedding_dim,
            calibrated=self.calibration is not None,
            calibrated_for=self.calibrated_for,
            monitoring_baseline=self.baseline is not None,
            card=self.card,
        )


class ModelFacts(BaseModel):
    """What `/v1/model` shows of a file: the card and what export added, but not the calibration's raw
    scores, nor the training's file paths (they are the training machine's, and say nothing to a
    client)."""

    version: str
    arch: str
    head: str
    classes: list[int]
    input_hw: list[int]
    quantized: bool
    embedding_dim: int
    calibrated: bool
    calibrated_for: str | None
    monitoring_baseline: bool
    card: ModelCard

    @field_serializer("card")
    def _without_training_paths(self, card: ModelCard) -> dict[str, object]:
        return card.model_dump(mode="json", exclude={"training", "data"})


def _legacy_card(metadata: dict[str, str]) -> ModelCard:
    """Files exported before the card existed carry its fields as separate entries."""
    height = int(metadata[META_PREFIX + "image_size"])
    return ModelCard(
        input_height=height,
        # Files exported before non-square inputs existed have square inputs.
        input_width=int(metadata.get(META_PREFIX + "image_width") or height),
        mean=tuple(json.loads(metadata[META_PREFIX + "mean"])),
        std=tuple(json.loads(metadata[META_PREFIX + "std"])),
        classes=tuple(json.loads(metadata[META_PREFIX + "classes"])),
        arch=metadata.get(META_PREFIX + "arch", "unknown"),
        head=metadata.get(META_PREFIX + "head", "unknown"),
        train_fingerprint=metadata.get(META_PREFIX + "train_fingerprint", ""),
    )


def read_info(metadata: dict[str, str], file_digest: str) -> ModelInfo:
    try:
        card_json = metadata.get(META_PREFIX + "card")
        card = ModelCard.model_validate_json(card_json) if card_json else _legacy_card(metadata)
        per_engine = {
            kind: {
                key.removeprefix(f"{META_PREFIX}{kind}/"): value
                for key, value in metadata.items()
                if key.startswith(f"{META_PREFIX}{kind}/") and value
            }
            for kind in ("calibration", "baseline")
        }
        return ModelInfo(
            card=card,
            version=metadata.get(META_PREFIX + "version") or file_digest[:12],
            quantized=metadata.get(META_PREFIX + "quantized") == "int8",
            calibration=metadata.get(META_PREFIX + "calibration") or None,
            baseline=metadata.get(META_PREFIX + "baseline") or None,
            embedding_dim=int(metadata.get(META_PREFIX + "embedding_dim") or 0),
            calibrations=per_engine["calibration"],
            baselines=per_engine["baseline"],
            reference=metadata.get(META_PREFIX + "reference") or None,
            not_for_serving=metadata.get(META_PREFIX + "not_for_serving") or None,
        )
    except (KeyError, ValueError, TypeError) as exc:  # TypeError: a legacy field of the wrong JSON type
        raise BinsightError(
            f"the ONNX file lacks binsight metadata ({exc})", hint="export it with `binsight export`"
        ) from None


def _as_int8(choice: RuntimeChoice) -> RuntimeChoice:
    return RuntimeChoice(
        choice.backend, "int8", f"{choice.reason}; the model file is int8-quantised, so int8"
    )


def _read_model(path: Path, version: str | None) -> tuple[bytes, ModelInfo]:
    """The file's bytes and what its metadata says, whichever engine then runs it."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise BinsightError(f"cannot read model {path}: {exc.strerror}") from None
    try:
        proto = onnx.load_from_string(data)
    except Exception as exc:  # protobuf's DecodeError and friends
        raise BinsightError(f"{path} is not a loadable ONNX model: {exc}") from None
    info = read_info({p.key: p.value for p in proto.metadata_props}, hashlib.sha256(data).hexdigest())
    if version:  # a registry version name outranks what the file says
        info = dataclasses.replace(info, version=version)
    return data, info


def model_info(path: Path, version: str | None = None) -> ModelInfo:
    """What a model file says about itself, without compiling it."""
    return _read_model(path, version)[1]


class OnnxCounter:
    """One loaded model. Thread-safe: ONNX Runtime sessions may be run from several threads."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        threads: int | None = None,
        version: str | None = None,
        choice: RuntimeChoice = ONNXRUNTIME_FP32,
    ) -> None:
        self.path = Path(path)
        data, self.info = _read_model(self.path, version)
        self.runtime = _as_int8(choice) if self.info.quantized else choice
        self.check: SelfCheck | None = None
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        try:
            self.session = ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own exception types for bad graphs
            raise BinsightError(f"{self.path} is not a loadable ONNX model: {exc}") from None
        self.input_name = self.session.get_inputs()[0].name

    def predict(self, batch: np.ndarray) -> np.ndarray:
        """(N, 3, H, W) float32 -> (N, num_classes) probabilities."""
        return np.asarray(self.session.run(None, {self.input_name: batch})[0])

    def observe(self, batch: np.ndarray) -> np.ndarray:
        """(N, num_classes + embedding_dim): probabilities, then the photo's embedding, side by side."""
        outputs = self.session.run(None, {self.input_name: batch})
        return np.concatenate(outputs[: 2 if self.info.embedding_dim else 1], axis=1)


class OpenVinoCounter:
    """The same ONNX file compiled by OpenVINO for the CPU. Thread-safe: one infer request per thread."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        threads: int | None = None,
        version: str | None = None,
        choice: RuntimeChoice = OPENVINO_FP32,
    ) -> None:
        import openvino as ov

        self.path = Path(path)
        _, self.info = _read_model(self.path, version)
        self.runtime = _as_int8(choice) if self.info.quantized else choice
        self.check: SelfCheck | None = None
        properties: dict[str, object] = {
            # int8 graphs keep their int8 layers; the hint governs the float parts around them.
            "INFERENCE_PRECISION_HINT": "bf16" if choice.precision == "bf16" else "f32",
            "PERFORMANCE_HINT": "LATENCY",
            "NUM_STREAMS": 1,
        }
        if threads:
            properties["INFERENCE_NUM_THREADS"] = threads
        try:
            core = ov.Core()
            self.compiled = core.compile_model(core.read_model(str(self.path)), "CPU", properties)
        except Exception as exc:  # OpenVINO raises RuntimeError with its own message
            raise BinsightError(f"OpenVINO cannot compile {self.path}: {exc}") from None
        self._local = threading.local()

    def predict(self, batch: np.ndarray) -> np.ndarray:
        """(N, 3, H, W) float32 -> (N, num_classes) probabilities."""
        request = getattr(self._local, "request", None)
        if request is None:
            request = self._local.request = self.compiled.create_infer_request()
        request.infer({0: batch})
        return np.array(request.get_output_tensor(0).data, dtype=np.float32)

    def observe(self, batch: np.ndarray) -> np.ndarray:
        """(N, num_classes + embedding_dim): probabilities, then the photo's embedding, side by side."""
        probabilities = self.predict(batch)
        if not self.info.embedding_dim:
            return probabilities
        embedding = np.array(self._local.request.get_output_tensor(1).data, dtype=np.float32)
        return np.concatenate([probabilities, embedding], axis=1)


class LoadedModel(Protocol):
    path: Path
    info: ModelInfo
    runtime: RuntimeChoice
    check: SelfCheck | None

    def predict(self, batch: np.ndarray) -> np.ndarray: ...

    def observe(self, batch: np.ndarray) -> np.ndarray: ...


def fp32_companion(path: Path) -> Path | None:
    """`model.onnx` beside `model.int8.onnx`: what export writes, and what serves when int8 cannot."""
    if not path.name.endswith(".int8.onnx"):
        return None
    companion = path.with_name(path.name.removesuffix(".int8.onnx") + ".onnx")
    return companion if companion.is_file() else None


def _open(path: Path, threads: int | None, version: str | None, choice: RuntimeChoice) -> LoadedModel:
    counter: LoadedModel = (
        OpenVinoCounter(path, threads, version, choice)
        if choice.backend == "openvino"
        else OnnxCounter(path, threads, version, choice)
    )
    info = counter.info.for_engine(f"{counter.runtime.backend}/{counter.runtime.precision}")
    counter.info = info
    counter.check = None
    if info.reference:
        counter.check = run_self_check(
            counter.predict,
            ReferenceSet.from_json(info.reference),
            Preprocess.from_card(info.card),
            counter.runtime.backend,
            counter.runtime.precision,
        )
        log.info("self-check of %s: %s", path.name, counter.check.summary())
    return counter


def load_counter(
    path: str | os.PathLike[str],
    threads: int | None = None,
    version: str | None = None,
    backend: Backend = "auto",
    precision: EnginePrecision = "auto",
) -> LoadedModel:
    """A model from an exported ONNX file, in the engine `choose_runtime` picks (or the one asked for),
    proven on this CPU by its self-check. A file that fails it at reduced precision falls back: bf16 to
    fp32 on the same engine, an int8 file to its fp32 companion (`model.onnx` beside
    `model.int8.onnx`); with nothing to fall back to, loading fails with the numbers and what to do."""
    path = Path(path)
    choice = choose_runtime(backend, precision)
    info = model_info(path, version)
    if info.not_for_serving:
        companion = fp32_companion(path)
        if companion is None:
            raise BinsightError(
                f"{path} is marked not for serving: {info.not_for_serving}",
                hint="serve the fp32 file that export wrote beside it",
            )
        log.warning(
            "%s is marked not for serving (%s); serving %s instead",
            path.name,
            info.not_for_serving,
            companion.name,
        )
        return load_counter(companion, threads, version, backend, precision)
    counter = _open(path, threads, version, choice)
    if counter.check is None or counter.check.passed:
        return counter
    failed = counter.check
    log.warning("self-check failed: %s", failed.summary())
    if counter.runtime.precision == "bf16":
        fallback = _open(
            path,
            threads,
            version,
            dataclasses.replace(
                choice,
                precision="fp32",
                reason=(
                    f"{choice.reason}; bf16 failed its self-check on this CPU ({failed.summary()}), so fp32"
                ),
            ),
        )
        if fallback.check is None or fallback.check.passed:
            return fallback
        failed = fallback.check
    companion = fp32_companion(path) if counter.runtime.precision == "int8" else None
    if companion is not None:
        log.warning("int8 fails its self-check here; serving the fp32 companion %s", companion.name)
        fallback = load_counter(companion, threads, version, backend, precision)
        why = f"{path.name} (int8) failed its self-check here: {failed.summary()}"
        fallback.runtime = dataclasses.replace(fallback.runtime, reason=f"{fallback.runtime.reason}; {why}")
        return fallback
    raise BinsightError(
        f"{path} fails its self-check on this CPU: {failed.summary()}",
        hint="serve the fp32 export, or choose another engine: --backend onnxruntime|openvino, "
        "--precision fp32",
    )
