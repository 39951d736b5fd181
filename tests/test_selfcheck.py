"""A model file proves itself on the CPU that loads it: reference photos and fp32 answers travel in the
file, every engine checks them at load, and a file that drifts falls back or is refused."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import httpx
import numpy as np
import onnx
import pytest

from binsight.errors import BinsightError
from binsight.export import onnx as onnx_export
from binsight.export.onnx import ExportConfig, export
from binsight.inference.runtime import META_PREFIX, load_counter
from binsight.inference.selfcheck import TOLERANCES, ReferenceSet
from binsight.serving.app import create_app
from binsight.serving.config import ServeConfig
from tests.background import BackgroundServer


def doctor_reference(path: Path) -> None:
    """Shift every stored answer by one class: what a broken engine or preprocessing would look like."""
    proto = onnx.load(str(path))
    for entry in proto.metadata_props:
        if entry.key == META_PREFIX + "reference":
            reference = ReferenceSet.from_json(entry.value)
            entry.value = ReferenceSet(
                reference.pixels, np.roll(reference.probabilities, 1, axis=1)
            ).to_json()
    onnx.save(proto, str(path))


@pytest.fixture(scope="module")
def exported(trained: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("selfcheck")
    report = export(
        ExportConfig(checkpoint=trained["checkpoint_a"], out=folder / "model.onnx", quantize="int8")
    )
    assert report.int8 is not None
    return {"fp32": Path(report.onnx), "int8": Path(report.int8.onnx), "folder": folder}


def test_the_reference_travels_in_the_file_and_passes_on_every_engine(exported: dict[str, Path]) -> None:
    for backend, precision in (("onnxruntime", "fp32"), ("openvino", "fp32"), ("openvino", "bf16")):
        counter = load_counter(exported["fp32"], backend=backend, precision=precision)  # type: ignore[arg-type]
        check = counter.check
        assert check is not None and check.photos == 16 and check.engine.startswith(backend)
        if counter.runtime.precision == precision:  # bf16 may have fallen back: then it says why
            assert check.passed and check.tolerance == TOLERANCES[precision]
        else:
            reason = counter.runtime.reason
            assert "failed its self-check" in reason or "no native bf16" in reason


def test_a_doctored_reference_is_refused(exported: dict[str, Path], tmp_path: Path) -> None:
    broken = tmp_path / "broken.onnx"
    shutil.copy(exported["fp32"], broken)
    doctor_reference(broken)
    for backend in ("onnxruntime", "openvino"):
        with pytest.raises(BinsightError, match="fails its self-check on this CPU") as raised:
            load_counter(broken, backend=backend, precision="fp32")  # type: ignore[arg-type]
        assert "agree with fp32" in str(raised.value) and "--precision fp32" in str(raised.value)


def test_a_failing_int8_file_serves_its_fp32_companion(exported: dict[str, Path], tmp_path: Path) -> None:
    shutil.copy(exported["fp32"], tmp_path / "m.onnx")
    shutil.copy(exported["int8"], tmp_path / "m.int8.onnx")
    doctor_reference(tmp_path / "m.int8.onnx")
    counter = load_counter(tmp_path / "m.int8.onnx", backend="onnxruntime")
    assert counter.path == tmp_path / "m.onnx" and counter.runtime.precision == "fp32"
    assert "m.int8.onnx (int8) failed its self-check" in counter.runtime.reason
    (tmp_path / "m.onnx").unlink()
    with pytest.raises(BinsightError, match="fails its self-check"):
        load_counter(tmp_path / "m.int8.onnx", backend="onnxruntime")


def test_an_int8_file_that_loses_accuracy_is_marked_and_never_served(
    trained: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(onnx_export, "INT8_MAX_COST", -1.0)  # any cost at all is too much
    report = export(
        ExportConfig(checkpoint=trained["checkpoint_a"], out=tmp_path / "m.onnx", quantize="int8")
    )
    assert report.int8 is not None and report.int8.serving.startswith("int8 loses")
    counter = load_counter(report.int8.onnx)
    assert counter.path == tmp_path / "m.onnx"  # the companion serves
    (tmp_path / "m.onnx").unlink()
    with pytest.raises(BinsightError, match="marked not for serving: int8 loses"):
        load_counter(report.int8.onnx)


def test_the_server_reports_its_self_check(exported: dict[str, Path]) -> None:
    config = ServeConfig(model=exported["fp32"], reload_interval_s=0, backend="openvino", precision="fp32")
    with BackgroundServer(create_app(config), config) as server:
        described = httpx.get(f"{server.url}/v1/model").json()
        metrics = httpx.get(f"{server.url}/metrics").text
    check = described["self_check"]
    assert check["engine"] == "openvino/fp32" and check["passed"] is True and check["photos"] == 16
    assert described["calibrated_for"] == "openvino/fp32"
    assert 'binsight_self_check_max_prob_diff{engine="openvino/fp32"}' in metrics
    assert json.dumps(check)  # plain JSON, for dashboards
