"""The server as an attacker meets it (issue: safe to expose): tokens and scopes, the Host allow-list,
S3 fetched only inside an allow-list, private capture files, formats by magic bytes, bounded fetches.
Every test drives a real uvicorn server on 127.0.0.1."""

from __future__ import annotations

import base64
import io
import json
import logging
import socket
import stat
import threading
import time
from pathlib import Path

import httpx
import pytest
from PIL import Image

from binsight.cli import main
from binsight.errors import BinsightError
from binsight.serving.app import create_app
from binsight.serving.auth import digest_of, new_token
from binsight.serving.config import ServeConfig
from tests.background import BackgroundServer

from .conftest import BUCKET, launch_chromium, needs_chromium, post_jpeg, s3_client, wait_in_page


def photo(trained: dict[str, Path]) -> bytes:
    return next((trained["data"] / "images").glob("*.jpg")).read_bytes()


def server(trained: dict[str, Path], **settings: object) -> BackgroundServer:
    settings.setdefault("model", trained["onnx_a"])
    settings.setdefault("reload_interval_s", 0)
    settings.setdefault("backend", "onnxruntime")
    return BackgroundServer(create_app(config := ServeConfig(**settings)), config)  # type: ignore[arg-type]


@pytest.fixture()
def tokens(tmp_path: Path) -> dict[str, object]:
    """A tokens file as `binsight token new` writes it: one invoke token, one admin token."""
    invoke, admin = new_token(), new_token()
    path = tmp_path / "tokens.txt"
    assert main(["token", "new", "--name", "camera", "--scopes", "invoke", "--file", str(path)]) == 0
    # The CLI printed its own token; make known ones for the test by appending hashed lines like it does.
    path.write_text(
        f"camera invoke sha256:{digest_of(invoke).hex()}\nops invoke,admin sha256:{digest_of(admin).hex()}\n"
    )
    return {"file": path, "invoke": invoke, "admin": admin}


def bearer(token: object) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"}


def test_the_token_command_writes_a_private_hashed_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "tokens.txt"
    assert main(["token", "new", "--name", "camera-7", "--scopes", "invoke,admin", "--file", str(path)]) == 0
    token = capsys.readouterr().out.splitlines()[1]
    assert token.startswith("bsk_") and len(token) > 40
    stored = path.read_text()
    assert token not in stored and digest_of(token).hex() in stored  # only the hash is at rest
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert main(["token", "new", "--name", "camera-7", "--file", str(path)]) == 2  # names are unique


def test_tokens_and_scopes_guard_every_route(trained: dict[str, Path], tokens: dict[str, object]) -> None:
    jpeg = photo(trained)
    with server(trained, tokens_file=tokens["file"]) as s:
        assert httpx.get(f"{s.url}/ping").status_code == 200  # health stays open for load balancers
        for headers in ({}, bearer("bsk_wrong"), {"authorization": "Basic dXNlcjpwdw=="}):
            refused = httpx.post(f"{s.url}/invocations", content=jpeg, headers=headers)
            assert refused.status_code == 401 and refused.json()["error"]["code"] == "unauthenticated"
            assert refused.headers["www-authenticate"].startswith("Bearer")
        ok = httpx.post(
            f"{s.url}/v1/count",
            content=jpeg,
            headers={"content-type": "image/jpeg", **bearer(tokens["invoke"])},
        )
        assert ok.status_code == 200 and ok.json()["predictions"][0]["count"] >= 0
        assert httpx.get(f"{s.url}/v1/model", headers=bearer(tokens["invoke"])).status_code == 200
        for route in ("/v1/traffic", "/metrics"):
            assert httpx.get(f"{s.url}{route}").status_code == 401
            denied = httpx.get(f"{s.url}{route}", headers=bearer(tokens["invoke"]))
            assert denied.status_code == 403 and denied.json()["error"]["code"] == "insufficient_scope"
            assert httpx.get(f"{s.url}{route}", headers=bearer(tokens["admin"])).status_code == 200
        # Refusals are counted like any other error.
        metrics = httpx.get(f"{s.url}/metrics", headers=bearer(tokens["admin"])).text
        assert 'code="unauthenticated"' in metrics
        spec = httpx.get(f"{s.url}/openapi.json").json()
        assert spec["components"]["securitySchemes"]["bearer"] == {
            "type": "http",
            "scheme": "bearer",
            "description": "a token from the server's tokens file (binsight token new)",
        }
        assert spec["paths"]["/invocations"]["post"]["security"] == [{"bearer": []}]
        assert "security" not in spec["paths"]["/ping"]["get"]
        page = httpx.get(f"{s.url}/")
        assert page.status_code == 200 and "binsight.call" in page.text  # the page asks for a token
        assert "frame-ancestors 'none'" in page.headers["content-security-policy"]


def test_tokens_from_the_environment_and_metrics_made_public(
    trained: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    token = new_token()
    monkeypatch.setenv("BINSIGHT_TOKENS", f"ops admin,invoke {token}")  # a plain token works too
    with server(trained, metrics_public=True) as s:
        assert httpx.get(f"{s.url}/metrics").status_code == 200
        assert httpx.get(f"{s.url}/v1/traffic").status_code == 401
        assert httpx.get(f"{s.url}/v1/traffic", headers=bearer(token)).status_code == 200


def test_open_only_on_loopback_and_loudly_when_told(
    trained: dict[str, Path], caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(BinsightError, match=r"refusing to listen on 0\.0\.0\.0 without authentication"):
        create_app(ServeConfig(model=trained["onnx_a"], host="0.0.0.0"))
    # The command line says so in one line, before loading anything.
    assert main(["serve", "--model", str(trained["onnx_a"]), "--host", "0.0.0.0"]) == 2
    assert "--tokens-file" in capsys.readouterr().err
    with caplog.at_level(logging.WARNING):
        create_app(ServeConfig(model=trained["onnx_a"], host="0.0.0.0", no_auth=True))
    assert "AUTHENTICATION IS OFF on 0.0.0.0" in caplog.text


def test_dns_rebinding_gets_nothing(trained: dict[str, Path], tmp_path: Path) -> None:
    with server(trained, capture_dir=tmp_path / "capture") as s:  # no tokens: loopback only
        for route in ("/", "/traffic", "/v1/traffic", "/v1/model", "/metrics"):
            evil = httpx.get(f"{s.url}{route}", headers={"host": "evil.example"})
            assert evil.status_code == 403 and evil.json()["error"]["code"] == "host_not_allowed", route
            assert httpx.get(f"{s.url}{route}").status_code == 200, route  # Host: 127.0.0.1:port
        rebound = httpx.post(
            f"{s.url}/invocations",
            content=photo(trained),
            headers={"content-type": "image/jpeg", "host": "evil.example:80"},
        )
        assert rebound.status_code == 403
        assert httpx.get(f"{s.url}/", headers={"host": "localhost"}).status_code == 200


def test_capture_is_private_to_the_server_user(trained: dict[str, Path], tmp_path: Path) -> None:
    capture = tmp_path / "capture"
    with server(trained, capture_dir=capture) as s:
        assert post_jpeg(f"{s.url}/invocations", photo(trained)).status_code == 200
        deadline = time.monotonic() + 5
        while not list(capture.glob("capture-*.jsonl")) or not next(capture.glob("*.jsonl")).stat().st_size:
            assert time.monotonic() < deadline
            time.sleep(0.05)
    assert stat.S_IMODE(capture.stat().st_mode) == 0o700
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in capture.glob("*.jsonl"))


def test_capture_pruning_covers_files_of_earlier_runs(trained: dict[str, Path], tmp_path: Path) -> None:
    from binsight.monitoring.capture_record import CaptureRecord
    from binsight.serving.capture import DataCapture

    capture = tmp_path / "capture"
    capture.mkdir()
    old = time.time() - 3600
    for pid in range(30):  # 30 files left by earlier processes
        path = capture / f"capture-20260101T000000-{90000 + pid}-000000001.jsonl"
        path.write_text('{"count": 1}\n')
        import os

        os.utime(path, (old + pid, old + pid))
    writer = DataCapture(capture, max_files=5)
    record = CaptureRecord(
        time="2026-01-01T00:00:00.000+00:00",
        source="body",
        image_sha256="0" * 64,
        bytes=1000,
        width=470,
        height=346,
        count=2,
        confidence=0.5,
        model_version="v-a",
        latency_ms=1.0,
        probabilities=[0.5, 0.5],
        signals={},
        embedding=[],
    )
    writer.record(record)
    writer.close()
    files = list(capture.glob("capture-*.jsonl"))
    assert len(files) <= 5 + 1 and writer.written == 1
    newest = max(files, key=lambda p: p.stat().st_mtime)
    assert CaptureRecord.parse(newest.read_text().strip()) == record


class CountingS3:
    """A TCP endpoint that accepts and counts connections and never answers: proof of whether the server
    asked S3 anything at all."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.sock.settimeout(0.05)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.held: list[socket.socket] = []

    def connections(self) -> int:
        while True:
            try:
                self.held.append(self.sock.accept()[0])
            except (TimeoutError, OSError):
                return len(self.held)

    def close(self) -> None:
        for conn in self.held:
            conn.close()
        self.sock.close()


def test_s3_is_off_unless_allowed_and_never_asked_outside_the_allow_list(trained: dict[str, Path]) -> None:
    s3 = CountingS3()
    try:
        with server(trained, s3_endpoint_url=s3.url, s3_unsigned=True, s3_timeout_s=1) as s:
            off = httpx.post(f"{s.url}/invocations", json={"s3_uri": "s3://payroll/secrets.jpg"})
            assert off.status_code == 403 and off.json()["error"]["code"] == "s3_not_allowed"
            assert "--s3-allow" in off.json()["error"]["message"]
        with server(
            trained, s3_endpoint_url=s3.url, s3_unsigned=True, s3_timeout_s=1, s3_allow=["s3://bins/photos"]
        ) as s:
            for uri in (
                "s3://payroll/secrets.jpg",
                "s3://bins/photos-private/x.jpg",  # a prefix is a folder, not a string prefix
                "s3://bins/other/x.jpg",
            ):
                denied = httpx.post(f"{s.url}/invocations", json={"s3_uri": uri})
                assert denied.status_code == 403 and denied.json()["error"]["code"] == "s3_not_allowed", uri
            assert s3.connections() == 0, "a denied URI reached S3"
    finally:
        s3.close()


def test_missing_and_forbidden_objects_look_the_same(
    trained: dict[str, Path], abid_bucket: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    client = s3_client(abid_bucket["endpoint"])
    client.create_bucket(Bucket="private-bins")  # no public policy: unsigned reads are denied
    client.put_object(Bucket="private-bins", Key="photos/a.jpg", Body=photo(trained))
    with server(
        trained,
        s3_endpoint_url=abid_bucket["endpoint"],
        s3_unsigned=True,
        s3_allow=[f"s3://{BUCKET}/bin-images/", "s3://private-bins/photos/"],
    ) as s:
        found = httpx.post(
            f"{s.url}/invocations", json={"s3_uri": f"s3://{BUCKET}/bin-images/synth-000001.jpg"}
        )
        assert found.status_code == 200
        answers = [
            httpx.post(f"{s.url}/invocations", json={"s3_uri": uri})
            for uri in (f"s3://{BUCKET}/bin-images/no-such.jpg", "s3://private-bins/photos/a.jpg")
        ]
        assert [(a.status_code, a.json()["error"]["code"]) for a in answers] == [(404, "s3_unavailable")] * 2
        assert abid_bucket["endpoint"] not in answers[0].text


def test_fetched_bytes_are_admitted_like_a_body(trained: dict[str, Path], abid_bucket: dict) -> None:
    big = io.BytesIO()
    Image.effect_noise((500, 500), 90).convert("RGB").save(big, "PNG")  # incompressible
    size = len(big.getvalue())
    client = s3_client(abid_bucket["endpoint"])
    # Beside the ABID layout, not in it: the bucket is shared by the session's tests.
    client.put_object(Bucket=BUCKET, Key="security/big.png", Body=big.getvalue())
    uri = f"s3://{BUCKET}/security/big.png"
    settings = {
        "s3_endpoint_url": abid_bucket["endpoint"],
        "s3_unsigned": True,
        "s3_allow": [f"s3://{BUCKET}/security/"],
    }
    with server(trained, max_body_bytes=int(2.5 * size), **settings) as s:
        assert (
            httpx.post(f"{s.url}/invocations", json={"instances": [{"s3_uri": uri}] * 2}).status_code == 200
        )
        too_many = httpx.post(f"{s.url}/invocations", json={"instances": [{"s3_uri": uri}] * 8})
        assert too_many.status_code == 413 and too_many.json()["error"]["code"] == "too_many_bytes"
    with server(trained, max_fetch_bytes=int(1.5 * size), **settings) as s:
        busy = httpx.post(f"{s.url}/invocations", json={"instances": [{"s3_uri": uri}] * 2})
        assert busy.status_code == 503 and busy.json()["error"]["code"] == "overloaded"
        # Bytes are given back when a request ends: the next one fits again.
        assert httpx.post(f"{s.url}/invocations", json={"s3_uri": uri}).status_code == 200


def test_a_silent_s3_endpoint_cannot_hold_the_decoders(trained: dict[str, Path]) -> None:
    s3 = CountingS3()
    try:
        with server(
            trained,
            s3_endpoint_url=s3.url,
            s3_unsigned=True,
            s3_timeout_s=30,
            s3_allow=["s3://bins/"],
            request_timeout_s=20,
        ) as s:
            stuck = [
                threading.Thread(
                    target=httpx.post,
                    args=(f"{s.url}/invocations",),
                    kwargs={"json": {"s3_uri": f"s3://bins/{i}.jpg"}, "timeout": 30},
                    daemon=True,
                )
                for i in range(6)  # more than the decode threads
            ]
            for thread in stuck:
                thread.start()
            time.sleep(0.5)
            started = time.monotonic()
            assert post_jpeg(f"{s.url}/invocations", photo(trained)).status_code == 200
            assert time.monotonic() - started < 2, "S3 fetches held the decode threads"
    finally:
        s3.close()


def _formats() -> dict[str, bytes]:
    image = Image.new("RGB", (40, 30), "red")
    out = {}
    for fmt in ("BMP", "TIFF", "GIF", "PPM", "TGA"):
        buffer = io.BytesIO()
        image.save(buffer, fmt)
        out[fmt] = buffer.getvalue()
    out["EPS"] = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n"
    return out


def test_only_jpeg_png_and_webp_are_decoded(trained: dict[str, Path]) -> None:
    image = Image.new("RGB", (50, 30), "blue")
    accepted = {}
    for fmt in ("PNG", "WEBP"):
        buffer = io.BytesIO()
        image.save(buffer, fmt)
        accepted[fmt] = buffer.getvalue()
    with server(trained) as s:
        for name, body in _formats().items():
            for content_type in ("image/jpeg", "image/png"):  # the declared type is not trusted
                refused = httpx.post(
                    f"{s.url}/invocations", content=body, headers={"content-type": content_type}
                )
                assert refused.status_code == 400 and refused.json()["error"]["code"] == "not_an_image", name
            b64 = httpx.post(f"{s.url}/invocations", json={"image": base64.b64encode(body).decode()})
            assert b64.status_code == 400, name
        for name, body in accepted.items():
            assert (
                httpx.post(
                    f"{s.url}/invocations", content=body, headers={"content-type": "image/png"}
                ).status_code
                == 200
            ), name
        corrupt = post_jpeg(f"{s.url}/invocations", photo(trained)[:200])
        assert corrupt.status_code == 400 and "object at 0x" not in corrupt.text


def test_odd_s3_uris_are_bad_requests_not_500s(trained: dict[str, Path]) -> None:
    with server(trained, s3_allow=["s3://bins/"]) as s:
        for key in ("a\u2028b.jpg", "a\u0085b.jpg", "a\u200eb.jpg", "a\ud800.jpg"):
            body = json.dumps({"s3_uri": f"s3://bins/{key}"})  # json.dumps escapes the surrogate
            answer = httpx.post(
                f"{s.url}/invocations", content=body, headers={"content-type": "application/json"}
            )
            assert answer.status_code == 400 and answer.json()["error"]["code"] == "bad_s3_uri", repr(key)


def test_expected_count_in_the_query_counts_for_json_bodies(trained: dict[str, Path]) -> None:
    b64 = base64.b64encode(photo(trained)).decode()
    with server(trained) as s:
        answer = httpx.post(f"{s.url}/invocations?expected_count=3", json={"image": b64}).json()
        assert answer["expected_count"] == 3 and "verdict" in answer
        both = httpx.post(f"{s.url}/invocations?expected_count=3", json={"image": b64, "expected_count": 4})
        assert both.status_code == 400 and both.json()["error"]["code"] == "bad_expected_count"


def test_no_server_paths_on_public_routes_and_honest_drift_status(
    trained: dict[str, Path], tmp_path: Path
) -> None:
    model = tmp_path / "served.onnx"
    model.write_bytes(trained["onnx_a"].read_bytes())
    with server(trained, model=model, reload_interval_s=0.1, monitor_interval_s=0) as s:
        model.write_bytes(b"not a model")  # a failed reload
        deadline = time.monotonic() + 10
        while httpx.get(f"{s.url}/ping").json()["last_reload_failure"] is None:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        assert str(tmp_path) not in httpx.get(f"{s.url}/ping").text
        drift = httpx.get(f"{s.url}/v1/traffic").json()["drift"]["status"]
        assert "--monitor-interval-s 0" in drift


@needs_chromium
def test_the_page_asks_for_a_token_and_uses_it(
    trained: dict[str, Path], tokens: dict[str, object], tmp_path: Path
) -> None:
    from playwright.sync_api import sync_playwright

    photo_path = next((trained["data"] / "images").glob("*.jpg"))
    settings = {"tokens_file": tokens["file"], "capture_dir": tmp_path / "capture"}
    with server(trained, **settings) as s, sync_playwright() as playwright:
        browser = launch_chromium(playwright)
        try:
            page = browser.new_page()
            page.goto(f"{s.url}/")
            page.wait_for_selector("#token-form:not([hidden])")  # /v1/model said 401
            page.fill("#token-input", str(tokens["invoke"]))
            page.click("#token-form button")
            wait_in_page(page, "document.getElementById('model').textContent.includes('v-a')")
            page.set_input_files("#file", str(photo_path))
            page.wait_for_selector("#result:not([hidden])")
            assert page.text_content("#count") != ""
            # The traffic needs admin: the invoke token is not enough, and the page says so.
            page.goto(f"{s.url}/traffic")
            page.wait_for_selector("#token-form:not([hidden])")
            assert "lacks the scope" in page.text_content("#token-note")
            page.fill("#token-input", str(tokens["admin"]))
            page.click("#token-form button")
            page.wait_for_selector("#total")
            # The token lives in this tab's session storage only: never a cookie, never the URL.
            assert page.context.cookies() == [] and "bsk_" not in page.url
        finally:
            browser.close()
