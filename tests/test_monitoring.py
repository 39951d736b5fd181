"""Drift monitoring: traffic like the baseline raises no alarm; shifted traffic does, on the signal
that moved; the server reports it on /metrics and /traffic, and `binsight monitor` writes the report."""

from __future__ import annotations

import io
import json
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image, ImageEnhance, ImageFilter

from binsight.cli import main
from binsight.data.synth import SynthConfig, generate_dataset
from binsight.inference.runtime import load_counter
from binsight.monitoring.baseline import Baseline, Seen, build_baseline, observe_photos
from binsight.monitoring.drift import DriftDetector, ks_statistic, mmd2
from binsight.monitoring.watch import window_of

from .conftest import post_jpeg
from .test_serving import server


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Photos like the trained model's (same generator, other seed), non-square."""
    root = tmp_path_factory.mktemp("monitor-photos")
    generate_dataset(root, SynthConfig(n_images=260, image_size=72, seed=21, workers=2))
    return sorted((root / "images").glob("*.jpg"))


def jpeg(image: Image.Image, quality: int = 90) -> bytes:
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, "JPEG", quality=quality)
    return buffer.getvalue()


def seen_of(model: Path, datas: list[bytes]) -> list[Seen]:
    return observe_photos(load_counter(model, backend="onnxruntime"), datas)


SHIFTS: dict[str, tuple[Callable[[Image.Image], bytes], set[str]]] = {
    "darker": (lambda im: jpeg(ImageEnhance.Brightness(im).enhance(0.45)), {"brightness"}),
    "blurred": (lambda im: jpeg(im.filter(ImageFilter.GaussianBlur(3))), {"sharpness"}),
    "smaller": (lambda im: jpeg(im.resize((im.width // 2, im.height // 3))), {"width", "height"}),
    "recompressed": (lambda im: jpeg(im, quality=25), {"jpeg_quality"}),
    "another dataset": (
        lambda im: jpeg(
            Image.fromarray(np.random.default_rng(im.width).integers(0, 255, (72, 96, 3), np.uint8))
        ),
        {"embedding"},
    ),
}


def test_baseline_traffic_is_quiet_and_each_shift_names_its_signal(
    trained: dict[str, Path], photos: list[Path]
) -> None:
    counter = load_counter(trained["onnx_a"], backend="onnxruntime")
    baseline = build_baseline(counter, photos[:180], "test photos")
    assert baseline.embeddings.shape == (180, 16) and set(baseline.scalars) >= {"brightness", "confidence"}
    assert Baseline.from_json(baseline.to_json()).size == 180
    detector = DriftDetector(baseline, alpha=0.01)

    same = detector.check(window_of(seen_of(trained["onnx_a"], [p.read_bytes() for p in photos[180:260]])))
    assert same.status == "ok", (same.drifted, same.as_dict()["signals"])
    assert {s.signal for s in same.signals} >= {"brightness", "sharpness", "predicted_count", "embedding"}

    originals = [Image.open(p) for p in photos[180:260]]
    for name, (shift, expected) in SHIFTS.items():
        shifted = detector.check(window_of(seen_of(trained["onnx_a"], [shift(im) for im in originals])))
        assert shifted.status == "drift", name
        assert expected <= set(shifted.drifted), (name, shifted.drifted)


def test_statistics_behave() -> None:
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=500), rng.normal(size=500)
    assert ks_statistic(a, a) == 0 and 0 < ks_statistic(a, b) < 0.15 and ks_statistic(a, b + 3) > 0.8
    x, y = rng.normal(size=(200, 4)), rng.normal(size=(200, 4))
    assert abs(mmd2(x, y, 2.0)) < 0.02 < mmd2(x, y + 1.0, 2.0)


def test_server_reports_drift_and_monitor_writes_the_report(
    trained: dict[str, Path], photos: list[Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    capture = tmp_path / "capture"
    dark = [jpeg(ImageEnhance.Brightness(Image.open(p)).enhance(0.4)) for p in photos[:24]]
    with server(
        trained, capture_dir=capture, monitor_window=16, monitor_interval_s=0.3, monitor_alpha=0.01
    ) as s:
        before = httpx.get(f"{s.url}/v1/traffic").json()["drift"]
        assert before["status"] == "collecting"
        for body in dark:
            assert post_jpeg(f"{s.url}/invocations", body).status_code == 200
        deadline = time.monotonic() + 20
        while (drift := httpx.get(f"{s.url}/v1/traffic").json()["drift"])["status"] != "drift":
            assert time.monotonic() < deadline, drift
            time.sleep(0.2)
        assert "brightness" in drift["drifted"]
        metrics = httpx.get(f"{s.url}/metrics").text
        assert 'binsight_drift_alarm{signal="brightness"} 1.0' in metrics
    out = tmp_path / "monitor"
    code = main(
        [
            "monitor",
            str(capture),
            "--model",
            str(trained["onnx_a"]),
            "--out",
            str(out),
            "--window",
            "16",
            "--fail-on-drift",
        ]
    )
    assert code == 3
    result = json.loads((out / "monitor.json").read_text())
    assert result["status"] == "drift" and "brightness" in result["drifted_in_latest"]
    assert (out / "drift_over_time.png").read_bytes()[:4] == b"\x89PNG"
    assert "brightness" in (out / "report.html").read_text()
    assert "drift" in capsys.readouterr().out
