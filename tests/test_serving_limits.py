"""What one client may hold: connections, headers, pixels, time; and the contract the spec states."""

from __future__ import annotations

import base64
import io
import socket
import struct
import threading
import time
import zlib
from pathlib import Path

import httpx
import hypothesis
import pytest
import schemathesis
from hypothesis import HealthCheck
from PIL import Image
from schemathesis.checks import positive_data_acceptance

from binsight.serving.batching import Admission

from .conftest import post_jpeg
from .test_serving import images, server


def _blank_png(width: int, height: int) -> bytes:
    """A real, decodable, all-black PNG: tiny on the wire, `width x height` pixels to decode."""
    row = b"\x00" + b"\x00" * width
    data = zlib.compress(row * height, 9)
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return (
            struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))
        )

    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", data) + chunk(b"IEND", b"")


def test_slow_and_oversized_connections_are_cut_while_real_requests_are_served(
    trained: dict[str, Path],
) -> None:
    jpeg = images(trained, 1)[0]
    with server(trained, header_timeout_s=1.0, max_header_bytes=8192) as s:
        slow: list[socket.socket] = []
        for k in range(60):
            sock = socket.create_connection((s.host, s.port))
            if k % 2:  # half send part of a request and stall; half send nothing at all
                sock.sendall(b"POST /invocations HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: image/jpeg\r\n")
            slow.append(sock)
        started = time.monotonic()
        for _ in range(5):
            assert post_jpeg(f"{s.url}/invocations", jpeg).status_code == 200
        assert time.monotonic() - started < 5
        time.sleep(1.6)
        for sock in slow:
            sock.settimeout(5)
            answer = sock.recv(4096)  # the server's 408 then EOF, or EOF alone
            assert answer == b"" or answer.startswith(b"HTTP/1.1 408"), answer[:80]
            sock.close()

        big = {f"x-filler-{k}": "a" * 1000 for k in range(40)}  # 40 kB of headers
        response = httpx.get(f"{s.url}/ping", headers=big)
        assert response.status_code == 431 and response.json()["error"]["code"] == "headers_too_large"
        assert httpx.get(f"{s.url}/ping").status_code == 200


def test_pixel_budget_and_deadline_keep_one_request_from_starving_others(trained: dict[str, Path]) -> None:
    jpeg = images(trained, 1)[0]
    bomb = base64.b64encode(_blank_png(6000, 6000)).decode()  # 36 MP each, under the per-image limit
    hung = socket.socket()  # accepts connections (the kernel's backlog) and never answers
    hung.bind(("127.0.0.1", 0))
    hung.listen(16)
    endpoint = f"http://127.0.0.1:{hung.getsockname()[1]}"
    try:
        with server(
            trained,
            request_timeout_s=1.0,
            s3_endpoint_url=endpoint,
            s3_timeout_s=30,
            s3_unsigned=True,
            s3_allow=["s3://bin-photos/"],
        ) as s:
            started = time.monotonic()
            response = httpx.post(f"{s.url}/invocations", json={"instances": [{"image": bomb}] * 16})
            assert response.status_code == 413 and response.json()["error"]["code"] == "too_many_pixels"
            assert time.monotonic() - started < 2, "the pixel budget is checked before decoding"

            outcome: dict[str, httpx.Response] = {}
            stuck = threading.Thread(
                target=lambda: outcome.update(
                    r=httpx.post(f"{s.url}/invocations", json={"s3_uri": "s3://bin-photos/a.jpg"}, timeout=30)
                )
            )
            stuck.start()
            time.sleep(0.2)
            quick = time.monotonic()
            assert post_jpeg(f"{s.url}/invocations", jpeg).status_code == 200
            assert time.monotonic() - quick < 0.5, "a stuck request delayed another"
            stuck.join(10)
            assert outcome["r"].status_code == 504, outcome["r"].text
            assert outcome["r"].json()["error"]["code"] == "deadline_exceeded"
    finally:
        hung.close()


def test_admission_sheds_by_expected_wait_not_queue_length() -> None:
    admission = Admission(max_wait_s=0.1, ceiling=256, floor=4)
    assert admission.limit == 256  # nothing measured yet: bounded by the queue only
    for _ in range(5):
        admission.observe(batch_size=10, seconds=0.05)  # 5 ms per image
    assert admission.limit == 20  # 100 ms of work at 5 ms per image
    assert all(admission.try_enter() for _ in range(20))
    assert not admission.try_enter()
    admission.leave(5)
    assert admission.try_enter(5) and not admission.try_enter(1)
    admission.observe(batch_size=1, seconds=2.0)  # one slow call (a reload beside it) moves nothing
    assert admission.limit == 20
    slow = Admission(max_wait_s=0.1, ceiling=256, floor=4)
    slow.observe(1, 1.0)  # one image takes a second: still admit a batch's worth
    assert slow.limit == 4
    alone = Admission(max_wait_s=0.001, ceiling=2)
    alone.observe(1, 1.0)
    assert alone.try_enter(8), "a request larger than the limit is admitted when nothing else is in"
    instant = Admission(max_wait_s=0.1, ceiling=64)
    instant.observe(8, 0.0)  # a batch faster than the clock's resolution
    assert instant.limit == 64 and instant.has_room(1)


def test_openapi_contract_holds_and_no_page_needs_the_internet(trained: dict[str, Path]) -> None:
    with server(trained) as s:
        assert httpx.get(f"{s.url}/docs").status_code == 404  # Swagger UI would load from a CDN
        spec = httpx.get(f"{s.url}/openapi.json").json()
        invocations = spec["paths"]["/invocations"]["post"]
        assert {"image/jpeg", "application/json"} <= set(invocations["requestBody"]["content"])
        assert {"400", "413", "415", "503", "504"} <= set(invocations["responses"])
        for page in ("/", "/traffic"):
            html = httpx.get(f"{s.url}{page}").text
            assert "https://" not in html and "http://" not in html

        schema = schemathesis.openapi.from_url(f"{s.url}/openapi.json")
        operations = [result.ok() for result in schema.get_all_operations()]
        assert {op.path for op in operations} >= {"/invocations", "/v1/count", "/ping", "/v1/model"}
        for operation in operations:

            @hypothesis.given(operation.as_strategy())
            @hypothesis.settings(
                max_examples=40,
                deadline=None,
                database=None,
                derandomize=True,
                suppress_health_check=list(HealthCheck),
            )
            def conforms(case: schemathesis.Case) -> None:
                # No schema can say "a decodable photo", so schema-valid bodies may rightly get 400.
                case.call_and_validate(base_url=s.url, excluded_checks=[positive_data_acceptance])

            conforms()


def test_a_valid_photo_through_the_documented_json_shape(trained: dict[str, Path]) -> None:
    image = Image.open(io.BytesIO(images(trained, 1)[0])).resize((470, 346))  # ABID's shape, not square
    buffer = io.BytesIO()
    image.save(buffer, "JPEG")
    body = {"instances": [{"image": base64.b64encode(buffer.getvalue()).decode(), "expected_count": 2}]}
    with server(trained) as s:
        response = httpx.post(f"{s.url}/v1/count", json=body)
    assert response.status_code == 200
    prediction = response.json()["predictions"][0]
    assert prediction["expected_count"] == 2 and prediction["verdict"] in {"ok", "review", "mismatch"}


@pytest.mark.parametrize("header", ["content-length", "transfer-encoding"])
def test_a_lying_body_length_is_answered_not_hung(trained: dict[str, Path], header: str) -> None:
    with server(trained, request_timeout_s=1.0) as s, socket.create_connection((s.host, s.port)) as sock:
        framing = b"Content-Length: 100000\r\n" if header == "content-length" else b""
        if header == "transfer-encoding":
            framing = b"Transfer-Encoding: chunked\r\n"
        sock.sendall(
            b"POST /invocations HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: image/jpeg\r\n"
            + framing
            + b"\r\n"
        )
        sock.settimeout(10)
        answer = sock.recv(4096)
    assert b" 504 " in answer.split(b"\r\n", 1)[0], answer[:100]
