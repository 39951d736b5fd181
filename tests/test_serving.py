"""The HTTP endpoint, on a real uvicorn server bound to 127.0.0.1."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
import zlib
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from binsight.card import ModelCard
from binsight.cli import main
from binsight.errors import BinsightError
from binsight.export.onnx import ExportConfig, export
from binsight.imaging import Preprocess
from binsight.inference import engines
from binsight.inference.runtime import OnnxCounter, load_counter
from binsight.inference.verdict import p_record_wrong
from binsight.serving.app import create_app
from binsight.serving.config import ServeConfig
from binsight.serving.loadtest import LoadResult, run_load
from binsight.training.checkpoint import load_checkpoint
from tests.background import BackgroundServer

from .conftest import BUCKET, post_jpeg, unused_loopback_port


def images(trained: dict[str, Path], n: int = 8) -> list[bytes]:
    return [p.read_bytes() for p in sorted((trained["data"] / "images").glob("*.jpg"))[:n]]


def server(trained: dict[str, Path], **settings: object) -> BackgroundServer:
    settings.setdefault("model", trained["onnx_a"])
    settings.setdefault("reload_interval_s", 0)
    # Exact comparisons below are against ONNX Runtime fp32; other engines have a test of their own.
    settings.setdefault("backend", "onnxruntime")
    return BackgroundServer(create_app(config := ServeConfig(**settings)), config)  # type: ignore[arg-type]


def metric_samples(text: str) -> dict[str, float]:
    samples: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            key = sample.name + ("" if not sample.labels else json.dumps(sample.labels, sort_keys=True))
            samples[key] = sample.value
    return samples


def test_export_is_verified_self_describing_and_quantizable(trained: dict[str, Path], tmp_path: Path) -> None:
    counter = OnnxCounter(trained["onnx_a"])
    info = counter.info
    assert (info.input_hw, info.classes[0], info.version, info.arch) == (
        (32, 32),
        0,
        "v-a",
        "mobilenet_v3_small",
    )
    assert info.mean == pytest.approx((0.485, 0.456, 0.406))
    # One model card: the checkpoint's, carried unchanged by the exported file.
    checkpoint_card = ModelCard.model_validate(load_checkpoint(trained["checkpoint_a"])["card"])
    assert info.card == checkpoint_card and checkpoint_card.training["arch"] == "mobilenet_v3_small"
    assert len(info.card.train_fingerprint) > 0 and info.card.val_fingerprint
    probs = counter.predict(np.zeros((3, 3, 32, 32), np.float32))
    assert probs.shape == (3, len(info.classes)) and np.allclose(probs.sum(1), 1, atol=1e-5)

    report = export(
        ExportConfig(checkpoint=trained["checkpoint_a"], out=tmp_path / "m.onnx", quantize="int8")
    )
    assert report.max_abs_diff_vs_pytorch < 1e-4 and report.calibration and report.monitoring_baseline
    # A calibration per engine this machine can serve with, each from that engine's own outputs.
    assert {"onnxruntime/fp32", "openvino/fp32"} <= set(report.engines)
    int8 = report.int8
    assert int8 is not None and Path(int8.onnx).stat().st_size < 0.6 * report.bytes
    assert set(int8.by_engine) == {"onnxruntime/int8", "openvino/int8"}
    # The export's verdict follows its own numbers: within half a point it serves, else it is marked.
    assert (int8.serving == "ok") == (int8.accuracy_cost <= 0.005), int8
    for backend in ("onnxruntime", "openvino"):
        fp32 = load_counter(report.onnx, backend=backend, precision="fp32")
        assert fp32.check is not None and fp32.check.passed and fp32.check.max_prob_diff < 2e-3
        assert fp32.info.calibrated_for == f"{backend}/fp32"
        if int8.serving == "ok":
            quantized = load_counter(int8.onnx, backend=backend)
            assert quantized.runtime.precision == "int8" and quantized.check is not None
            # int8 holds to fp32 on the reference photos within the stated tolerance, on this CPU.
            assert quantized.check.agreement >= 0.9 and quantized.check.max_prob_diff <= 0.12, quantized.check
            assert quantized.info.calibrated_for == f"{backend}/int8"


def test_engines_agree_and_the_choice_is_explained(
    trained: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    batch = np.random.default_rng(0).normal(size=(4, 3, 32, 32)).astype(np.float32)
    reference = load_counter(trained["onnx_a"], backend="onnxruntime").predict(batch)
    openvino = load_counter(trained["onnx_a"], backend="openvino", precision="fp32")
    assert (openvino.runtime.backend, openvino.runtime.precision) == ("openvino", "fp32")
    np.testing.assert_allclose(openvino.predict(batch), reference, atol=1e-4)
    bf16 = load_counter(trained["onnx_a"], backend="openvino", precision="bf16")
    assert np.abs(bf16.predict(batch) - reference).max() < 0.05  # bf16 keeps 8 bits of mantissa

    monkeypatch.setattr(engines, "cpu_features", lambda: {"avx512f", "avx512_vnni"})
    plain = engines.choose_runtime("auto", "auto")
    assert (plain.backend, plain.precision) == ("openvino", "fp32") and "no native bf16" in plain.reason
    asked = engines.choose_runtime("openvino", "bf16")  # emulated bf16 would be slower than fp32
    assert asked.precision == "fp32" and "no native bf16" in asked.reason
    monkeypatch.setattr(engines, "cpu_features", lambda: {"avx512f", "amx_bf16", "amx_int8"})
    assert engines.choose_runtime("auto", "auto").precision == "bf16"
    with pytest.raises(BinsightError, match="no bf16 path"):
        engines.choose_runtime("onnxruntime", "bf16")
    with server(trained, backend="openvino", precision="fp32") as s:
        described = httpx.get(f"{s.url}/v1/model").json()["runtime"]
    assert described == {"backend": "openvino", "precision": "fp32", "reason": "asked for"}


def test_routes_answer_like_the_model(trained: dict[str, Path], abid_bucket: dict) -> None:
    jpeg = images(trained, 1)[0]
    counter = OnnxCounter(trained["onnx_a"])
    expected = counter.predict(Preprocess((32, 32))(jpeg)[None])[0]
    png = io.BytesIO()
    Image.open(io.BytesIO(jpeg)).save(png, "PNG")
    b64 = base64.b64encode(jpeg).decode()
    with server(
        trained,
        s3_endpoint_url=abid_bucket["endpoint"],
        s3_unsigned=True,
        s3_allow=[f"s3://{BUCKET}/bin-images/"],
    ) as s:
        assert httpx.get(f"{s.url}/ping").json() == {
            "status": "ok",
            "model_version": "v-a",
            "last_reload_failure": None,
        }
        described = httpx.get(f"{s.url}/v1/model").json()
        assert described["input_hw"] == [32, 32] and described["version"] == "v-a"
        assert described["card"]["arch"] == "mobilenet_v3_small" and described["card"]["classes"][0] == 0
        assert described["calibrated"] is True and described["verdicts"].startswith("conformal")
        assert str(trained["onnx_a"].parent) not in json.dumps(described)  # no server paths
        for content_type in ("image/jpeg", "application/x-image"):
            body = httpx.post(
                f"{s.url}/invocations", content=jpeg, headers={"content-type": content_type}
            ).json()
            assert body["count"] == int(np.argmax(expected))
            assert [body["probabilities"][str(k)] for k in range(len(expected))] == pytest.approx(
                expected, abs=1e-5
            )
            assert body["confidence"] == pytest.approx(expected.max(), abs=1e-5)
            assert body["model_version"] == "v-a" and body["latency_ms"] > 0
        from_png = httpx.post(
            f"{s.url}/invocations", content=png.getvalue(), headers={"content-type": "image/png"}
        )
        assert from_png.status_code == 200 and "count" in from_png.json()

        judged = httpx.post(f"{s.url}/invocations", json={"image": b64, "expected_count": 2}).json()
        assert judged["expected_count"] == 2
        assert judged["p_expected"] == pytest.approx(expected[2], abs=1e-5)
        assert judged["verdict"] in {"ok", "review", "mismatch"} and judged["agrees"] == (
            judged["count"] == 2
        )
        assert judged["expected_within_range"] is True
        assert 0 < judged["p_value"] <= 1  # the record's conformal p-value: mismatch when <= alpha
        # The number the audit ranks bins by, so a client scanning bins here ranks them as it does.
        assert judged["p_record_wrong"] == pytest.approx(float(p_record_wrong(expected, 2)[0]), abs=1e-5)
        # Past the top class the model can only say "at least top": the answer says so.
        beyond = httpx.post(f"{s.url}/invocations", json={"image": b64, "expected_count": 5000}).json()
        assert beyond["expected_within_range"] is False
        assert beyond["p_expected"] == pytest.approx(expected[-1], abs=1e-5)

        s3 = httpx.post(f"{s.url}/invocations", json={"s3_uri": f"s3://{BUCKET}/bin-images/synth-000001.jpg"})
        assert s3.status_code == 200, s3.text
        many = httpx.post(
            f"{s.url}/v1/count",
            json={
                "instances": [
                    {"image": b64},
                    {"image": b64, "expected_count": 1},
                    {"s3_uri": f"s3://{BUCKET}/bin-images/synth-000002.jpg"},
                ]
            },
        )
        predictions = many.json()["predictions"]
        assert len(predictions) == 3 and predictions[0]["count"] == predictions[1]["count"]
        assert "verdict" in predictions[1] and "verdict" not in predictions[0]
        raw = post_jpeg(f"{s.url}/v1/count?expected_count=3", jpeg)
        assert raw.json()["predictions"][0]["expected_count"] == 3


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims a huge image: the classic decompression-bomb probe."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    return (
        b"\x89PNG\r\n\x1a\n"
        + struct.pack(">I", len(ihdr))
        + chunk
        + struct.pack(">I", zlib.crc32(chunk))
        + b"\x00\x00\x00\x00IEND\xaeB`\x82"
    )


def test_bad_inputs_get_clear_errors_and_the_server_keeps_serving(
    trained: dict[str, Path], abid_bucket: dict
) -> None:
    jpeg = images(trained, 1)[0]
    dead_port = unused_loopback_port()
    cases = [
        ("image/jpeg", b"hello, I am text", 400, "not_an_image"),
        ("image/jpeg", jpeg[: len(jpeg) // 2], 400, "corrupt_image"),
        ("image/jpeg", b"", 400, "empty_image"),
        ("image/png", _png_header_only(30000, 30000), 413, "image_too_large"),
        ("image/jpeg", b"\xff" * 300_000, 413, "body_too_large"),
        ("text/plain", b"3 items", 415, "unsupported_media_type"),
        ("application/json", b'{"image": "not base64!!"}', 400, "bad_base64"),
        ("application/json", b"{broken", 400, "bad_json"),
        ("application/json", b'{"s3_uri": "https://example/x.jpg"}', 400, "bad_s3_uri"),
        (
            "application/json",
            json.dumps({"s3_uri": f"s3://{BUCKET}/bin-images/none.jpg"}).encode(),
            404,
            "s3_unavailable",
        ),
        (
            "application/json",
            json.dumps({"image": base64.b64encode(jpeg).decode(), "expected_count": -1}).encode(),
            400,
            "bad_expected_count",
        ),
        (
            "application/json",
            json.dumps({"instances": [{"image": "AA=="}] * 9}).encode(),
            413,
            "too_many_images",
        ),
        ("application/json", b'{"instances": []}', 400, "bad_instances"),
        # Found by a hostile caller; each used to answer 500 or reach S3.
        ("application/json", b"[" * 100_000 + b"]" * 100_000, 400, "bad_json"),
        ("application/json", b'{"image": "AA==", "expected_count": ' + b"9" * 5000 + b"}", 400, "bad_json"),
        ("application/json", b'{"image": "AA==", "expected_count": 99999999999}', 400, "bad_expected_count"),
        ("application/json", b'{"s3_uri": "s3://BAD_BUCKET!/x.jpg"}', 400, "bad_s3_uri"),
        (
            "application/json",
            f'{{"s3_uri": "s3://{BUCKET}/bin-images/../secret.jpg"}}'.encode(),
            400,
            "bad_s3_uri",
        ),
        ("application/json", f'{{"s3_uri": "s3://{BUCKET}/"}}'.encode(), 400, "bad_s3_uri"),
    ]
    with server(
        trained,
        max_body_bytes=200_000,
        max_images_per_request=8,
        s3_endpoint_url=abid_bucket["endpoint"],
        s3_unsigned=True,
        s3_allow=[f"s3://{BUCKET}/"],
    ) as s:
        for content_type, body, status, code in cases:
            response = httpx.post(
                f"{s.url}/invocations", content=body, headers={"content-type": content_type}
            )
            assert (response.status_code, response.json()["error"]["code"]) == (status, code), (
                code,
                response.text,
            )
            assert response.json()["error"]["message"]
        assert httpx.get(f"{s.url}/ping").status_code == 200
        assert post_jpeg(f"{s.url}/invocations", jpeg).status_code == 200
        for query in ("²", "1" * 5000, "-1", "1.5"):
            response = post_jpeg(f"{s.url}/invocations?expected_count={query}", jpeg)
            assert response.status_code == 400, (query, response.text)
            assert response.json()["error"]["code"] == "bad_expected_count"
        errors = metric_samples(httpx.get(f"{s.url}/metrics").text)
        assert errors['binsight_request_errors_total{"code": "corrupt_image", "route": "/invocations"}'] == 1
        assert not any('"code": "internal"' in key for key in errors)

    with server(
        trained,
        s3_endpoint_url=f"http://127.0.0.1:{dead_port}",
        s3_timeout_s=1,
        s3_unsigned=True,
        s3_allow=["s3://bin-photos/"],
    ) as s:
        response = httpx.post(f"{s.url}/invocations", json={"s3_uri": "s3://bin-photos/k.jpg"}, timeout=30)
        assert response.status_code == 502 and response.json()["error"]["code"] == "s3_unreachable"


async def _burst(url: str, bodies: list[bytes]) -> list[httpx.Response]:
    async with httpx.AsyncClient(timeout=30, limits=httpx.Limits(max_connections=len(bodies))) as client:
        return await asyncio.gather(
            *(client.post(url, content=b, headers={"content-type": "image/jpeg"}) for b in bodies)
        )


def test_concurrent_requests_are_batched(trained: dict[str, Path]) -> None:
    bodies = images(trained, 8) * 3
    with server(trained, max_batch_size=16, max_wait_ms=200) as s:
        responses = asyncio.run(_burst(f"{s.url}/invocations", bodies))
        assert [r.status_code for r in responses] == [200] * 24
        samples = metric_samples(httpx.get(f"{s.url}/metrics").text)
    calls, images_seen = samples["binsight_batch_size_count"], samples["binsight_batch_size_sum"]
    assert images_seen == 24
    assert calls <= 6, f"24 concurrent images took {calls} model calls"
    assert samples['binsight_batch_size_bucket{"le": "1.0"}'] < calls  # not all singletons


def test_full_queue_answers_503_with_retry_after(trained: dict[str, Path]) -> None:
    bodies = images(trained, 8) * 5
    with server(trained, max_batch_size=1, max_wait_ms=0, queue_size=2) as s:
        responses = asyncio.run(_burst(f"{s.url}/invocations", bodies))
        statuses = Counter(r.status_code for r in responses)
        assert statuses[503] > 0 and statuses[200] > 0 and set(statuses) == {200, 503}
        rejected = next(r for r in responses if r.status_code == 503)
        assert rejected.headers["retry-after"] == "1" and rejected.json()["error"]["code"] == "overloaded"
        assert post_jpeg(f"{s.url}/invocations", bodies[0]).status_code == 200


def test_hot_reload_under_load_loses_no_request(trained: dict[str, Path], tmp_path: Path) -> None:
    live = tmp_path / "model.onnx"
    shutil.copy(trained["onnx_a"], live)
    bodies = images(trained, 8)

    async def load(url: str) -> list[tuple[int, str | None]]:
        outcomes: list[tuple[int, str | None]] = []
        deadline = time.monotonic() + 4.0
        swapped = False
        async with httpx.AsyncClient(timeout=30) as client:

            async def worker(k: int) -> None:
                nonlocal swapped
                while time.monotonic() < deadline:
                    r = await client.post(url, content=bodies[k % 8], headers={"content-type": "image/jpeg"})
                    outcomes.append((r.status_code, r.json().get("model_version")))
                    if not swapped and len(outcomes) > 40:
                        swapped = True
                        staged = tmp_path / "staged.onnx"
                        shutil.copy(trained["onnx_b"], staged)
                        os.replace(staged, live)  # how the registry promotes: an atomic rename

            await asyncio.gather(*(worker(k) for k in range(8)))
        return outcomes

    with server(trained, model=live, reload_interval_s=0.1) as s:
        outcomes = asyncio.run(load(f"{s.url}/invocations"))
        assert httpx.get(f"{s.url}/ping").json()["model_version"] == "v-b"
        samples = metric_samples(httpx.get(f"{s.url}/metrics").text)
    statuses = Counter(status for status, _ in outcomes)
    versions = Counter(version for _, version in outcomes)
    assert statuses == {200: len(outcomes)}, statuses
    assert versions["v-a"] > 0 and versions["v-b"] > 0
    assert samples["binsight_model_reloads_total"] == 2
    assert samples['binsight_model_info{"version": "v-b"}'] == 1


def test_metrics_endpoint_is_valid_prometheus(trained: dict[str, Path]) -> None:
    with server(trained) as s:
        post_jpeg(f"{s.url}/invocations", images(trained, 1)[0])
        text = httpx.get(f"{s.url}/metrics").text
    names = {family.name for family in text_string_to_metric_families(text)}
    assert {
        "binsight_requests",
        "binsight_request_latency_seconds",
        "binsight_batch_size",
        "binsight_queue_depth",
        "binsight_model_info",
        "binsight_images",
    } <= names
    samples = metric_samples(text)
    assert samples['binsight_requests_total{"route": "/invocations", "status": "200"}'] == 1


def test_data_capture_writes_rotated_jsonl(trained: dict[str, Path], tmp_path: Path) -> None:
    bodies = images(trained, 8)
    with server(
        trained, capture_dir=tmp_path / "capture", capture_sample_rate=1.0, capture_max_file_bytes=2048
    ) as s:
        for body in bodies * 2:
            post_jpeg(f"{s.url}/invocations?expected_count=2", body)
    files = sorted((tmp_path / "capture").glob("capture-*.jsonl"))
    assert len(files) >= 2
    records = [json.loads(line) for f in files for line in f.read_text().splitlines()]
    assert len(records) == 16
    import hashlib

    assert {r["image_sha256"] for r in records} == {hashlib.sha256(b).hexdigest() for b in bodies}
    first = records[0]
    assert {"time", "count", "probabilities", "confidence", "latency_ms", "model_version", "verdict"} <= set(
        first
    )
    assert first["expected_count"] == 2 and first["width"] == 64


@pytest.mark.alone  # the client must keep a 20/s schedule to 5 ms: another worker's training delays it
def test_loadtest_open_and_closed_loop(trained: dict[str, Path], capsys: pytest.CaptureFixture) -> None:
    bodies = images(trained, 4)
    with server(trained) as s:
        opened = asyncio.run(run_load(f"{s.url}/invocations", bodies, duration_s=1.5, rate=20)).summary()
        assert 28 <= opened.requests <= 31 and opened.errors == 0
        assert opened.latency_ms.p50 <= opened.latency_ms.p99
        assert opened.client.saturated is False, opened.client
        assert opened.client.cpu_share_of_one_core < 0.5
        samples = metric_samples(httpx.get(f"{s.url}/metrics").text)
        assert samples["binsight_images_total"] == opened.ok  # every request reached the server once
        callers = asyncio.run(
            run_load(f"{s.url}/invocations", bodies, duration_s=2.0, rate=20, poisson=True, seed=3)
        ).summary()
        assert 20 <= callers.requests <= 60 and callers.errors == 0  # Poisson(40): 40 +- 3 sd
        code = main(
            [
                "loadtest",
                f"{s.url}/invocations",
                "--images",
                str(trained["data"] / "images"),
                "--duration",
                "1",
                "--concurrency",
                "4",
                "--max-images",
                "10",
            ]
        )
    assert code == 0
    out = capsys.readouterr().out
    assert "invocations/min" in out and "p95" in out and "WARNING" not in out


def test_a_late_send_or_two_is_not_a_saturated_client_but_a_late_share_is() -> None:
    def late(sent_late: int, scheduled: int, cpu_s: float = 0.1) -> bool:
        return LoadResult(
            duration_s=1.0, client_cpu_s=cpu_s, scheduled=scheduled, sent_late=sent_late
        ).saturated

    assert not late(1, 30) and not late(2, 30)  # scheduler hiccups on a short run
    assert late(3, 30) and late(20, 1000) and not late(10, 1000)  # over 1% late, and more than noise
    assert late(0, 30, cpu_s=0.9)  # or most of a core spent generating load


def test_loadtest_reports_shed_requests_apart_and_flags_a_saturated_client(trained: dict[str, Path]) -> None:
    bodies = images(trained, 4)
    with server(trained, max_batch_size=1, queue_size=1, max_queue_ms=1) as s:
        # Far past what one server thread can take: most requests are shed.
        flood = asyncio.run(run_load(f"{s.url}/invocations", bodies, duration_s=1.5, rate=20_000)).summary()
    assert flood.statuses.get("503", 0) > 0 and flood.ok > 0
    by_status = flood.latency_ms_by_status
    assert by_status["503"].n == flood.statuses["503"]
    assert flood.latency_ms.n == flood.ok
    # 20,000 requests/s from Python on a small machine cannot keep its schedule: it must say so.
    assert flood.client.saturated is True, flood.client


def _wait_until(check: Callable[[], bool], what: str, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if check():
                return
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        time.sleep(0.2)


def _per_pid(samples: dict[str, float], name: str) -> dict[str, float]:
    """`{labels-json: value}` of a multiprocess gauge (one sample per live worker pid)."""
    return {key[len(name) :]: value for key, value in samples.items() if key.startswith(name + "{")}


def _serving_pids(samples: dict[str, float]) -> set[int]:
    info = _per_pid(samples, "binsight_model_info")
    return {int(json.loads(labels)["pid"]) for labels, value in info.items() if value == 1}


def test_serve_cli_workers_share_load_survive_kill_and_report_reloads(
    trained: dict[str, Path], tmp_path: Path
) -> None:
    live = tmp_path / "model.onnx"
    shutil.copy(trained["onnx_a"], live)
    port = unused_loopback_port()
    command = [sys.executable, "-m", "binsight", "serve", "--model", str(live), "--port", str(port)]
    command += ["--workers", "2", "--reload-interval-s", "0.2", "--backend", "onnxruntime"]
    env = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
    log_file = (tmp_path / "server.log").open("wb")
    proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=log_file)
    url = f"http://127.0.0.1:{port}"

    def metrics() -> dict[str, float]:
        return metric_samples(httpx.get(f"{url}/metrics").text)

    def versions_seen(n: int = 16) -> set[str]:  # fresh connections reach both workers
        return {httpx.get(f"{url}/ping").json()["model_version"] for _ in range(n)}

    try:
        _wait_until(lambda: httpx.get(f"{url}/ping", timeout=1).status_code == 200, "the server is up")
        _wait_until(lambda: len(_serving_pids(metrics())) == 2, "both workers are up")
        body = images(trained, 1)[0]
        # 32 keep-alive connections, as a load balancer holds them: the kernel spreads them.
        clients = [httpx.Client(base_url=url) for _ in range(32)]
        for client in clients:
            for _ in range(2):
                response = client.post("/invocations", content=body, headers={"content-type": "image/jpeg"})
                assert response.status_code == 200
        samples = metrics()
        assert samples["binsight_images_total"] == 64  # summed over both worker processes
        per_worker = {w: samples[f'binsight_worker_requests_total{{"worker": "{w}"}}'] for w in "01"}
        assert min(per_worker.values()) >= 8, per_worker

        staged = tmp_path / "staged.onnx"
        shutil.copy(trained["onnx_b"], staged)
        os.replace(staged, live)
        _wait_until(lambda: versions_seen() == {"v-b"}, "both workers serve v-b")
        info = _per_pid(metrics(), "binsight_model_info")
        assert sorted(info.values()) == [0, 0, 1, 1] and all(
            ('"v-b"' in labels) == (value == 1) for labels, value in info.items()
        ), info

        victim = min(_serving_pids(metrics()))
        os.kill(victim, signal.SIGKILL)
        for client in clients:  # the survivor serves; connections to the dead worker fail once
            with contextlib.suppress(httpx.HTTPError):
                client.post("/invocations", content=body, headers={"content-type": "image/jpeg"})
        _wait_until(
            lambda: len(serving := _serving_pids(metrics())) == 2 and victim not in serving,
            "the killed worker is replaced",
        )
        assert post_jpeg(f"{url}/invocations", body).status_code == 200
        for client in clients:
            client.close()

        staged.write_bytes(b"not an onnx file")
        os.replace(staged, live)
        _wait_until(
            lambda: all(httpx.get(f"{url}/ping").json()["last_reload_failure"] is not None for _ in range(8)),
            "the failed reload is reported",
        )
        assert versions_seen() == {"v-b"}  # the previous model keeps serving
        failing = _per_pid(metrics(), "binsight_model_reload_failing")
        assert list(failing.values()) == [1, 1], (failing, _per_pid(metrics(), "binsight_model_info"))
        assert "v-b" in httpx.get(f"{url}/v1/model").json()["version"]
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    assert proc.returncode == 0, (tmp_path / "server.log").read_text()


def test_serve_refuses_a_missing_model(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["serve", "--model", str(tmp_path / "none.onnx")]) == 2
    assert "cannot read model" in capsys.readouterr().err
