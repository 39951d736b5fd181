"""`binsight serve`: the counting endpoint (FastAPI + uvicorn, ONNX Runtime, dynamic batching).

Routes:
- ``GET /ping`` — health (SageMaker contract): 200 once a model is loaded.
- ``POST /invocations`` — SageMaker contract: an image body (image/jpeg, image/png,
  application/x-image) or JSON ``{"image": <base64>}`` / ``{"s3_uri": "s3://..."}``, optionally with
  ``expected_count``; or JSON ``{"instances": [...]}`` for several.
- ``POST /v1/count`` — the same inputs; always answers ``{"predictions": [...]}``.
- ``GET /v1/model`` — what is loaded. ``GET /metrics`` — Prometheus text format.

Every failure is a JSON error with a status that says whose fault it is (4xx: the request, 502: S3,
503: overloaded), and the server keeps serving.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hashlib
import json
import logging
import os
import tempfile
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from PIL import Image, UnidentifiedImageError
from pydantic import BaseModel, ConfigDict, Field, model_validator

from binsight.audit.verdict import VerdictThresholds, judge
from binsight.errors import BinsightError
from binsight.imaging import ImageTooLargeError, draft_rgb, open_image, to_model_input
from binsight.serving.batching import DynamicBatcher, QueueFullError
from binsight.serving.capture import DataCapture
from binsight.serving.metrics import ServerMetrics
from binsight.serving.runtime import Backend, LoadedModel, Precision, load_counter
from binsight.serving.web import static_file, traffic_summary

if TYPE_CHECKING:
    from binsight.registry import AliasSource

log = logging.getLogger(__name__)

IMAGE_TYPES = {"image/jpeg", "image/jpg", "image/png", "application/x-image", "image/webp", "image/bmp"}
CONFIG_ENV = "BINSIGHT_SERVE_CONFIG"


class ServeConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: Path | None = Field(None, description="ONNX file from `binsight export`")
    registry: str | None = Field(None, description="model registry (folder or s3://) to follow instead")
    alias: str = Field("production", description="registry alias to serve and follow")
    registry_cache: Path | None = Field(None, description="where registry models are fetched to")
    host: str = "127.0.0.1"
    port: int = Field(8080, ge=0, le=65535)
    workers: int = Field(1, ge=1, le=64, description="server processes, each with its own model")
    threads: int | None = Field(
        None, ge=1, description="inference threads per process (default cores/workers)"
    )
    backend: Backend = Field("auto", description="auto, onnxruntime or openvino (auto: see choose_runtime)")
    precision: Precision = Field("auto", description="auto, fp32 or bf16; an int8 model file runs in int8")
    max_batch_size: int = Field(16, ge=1, le=512)
    max_wait_ms: float = Field(5.0, ge=0.0, le=1000.0)
    queue_size: int = Field(256, ge=1)
    max_body_bytes: int = Field(16 * 1024 * 1024, ge=1024)
    max_image_pixels: int = Field(40_000_000, ge=1)
    max_images_per_request: int = Field(64, ge=1)
    reload_interval_s: float = Field(2.0, ge=0.0, description="model file poll period; 0 disables reload")
    capture_dir: Path | None = None
    capture_sample_rate: float = Field(0.1, ge=0.0, le=1.0)
    capture_max_file_bytes: int = Field(64 * 1024 * 1024, ge=1024)
    s3_endpoint_url: str | None = None
    s3_unsigned: bool = Field(False, description="anonymous S3 reads (public buckets such as ABID)")
    s3_timeout_s: float = Field(10.0, gt=0.0)
    ok_above: float = Field(0.5, ge=0.0, le=1.0)
    mismatch_below: float = Field(0.1, ge=0.0, le=1.0)

    @model_validator(mode="after")
    def _one_model_source(self) -> ServeConfig:
        if (self.model is None) == (self.registry is None):
            raise ValueError("give either model (an ONNX file) or registry (with alias)")
        return self

    def source(self) -> FileSource | AliasSource:
        if self.model is not None:
            return FileSource(self.model)
        from binsight.registry import AliasSource, Registry

        cache = self.registry_cache or Path(tempfile.gettempdir()) / "binsight-registry-cache"
        return AliasSource(Registry(self.registry), self.alias, cache)  # type: ignore[arg-type]

    def threads_per_worker(self) -> int:
        return self.threads or max(1, (os.cpu_count() or 1) // self.workers)


class RequestError(Exception):
    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers or {}


@dataclass
class Prepared:
    model: LoadedModel
    pixels: np.ndarray
    width: int
    height: int
    digest: str
    size_bytes: int


class FileSource:
    """A model file; it changes when its inode, size or mtime does (an atomic replace changes all)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def signature(self) -> tuple[int, int, int] | None:
        try:
            stat = self.path.stat()
        except OSError:
            return None
        return stat.st_ino, stat.st_size, stat.st_mtime_ns

    def local_path(self, signature: object) -> Path:
        return self.path


class CountingService:
    """The model, the batcher, capture and metrics of one server process."""

    def __init__(self, config: ServeConfig, metrics: ServerMetrics) -> None:
        self.config = config
        self.metrics = metrics
        self.thresholds = VerdictThresholds(config.ok_above, config.mismatch_below)
        self.source = config.source()
        self._signature = self.source.signature()
        self.counter = self._load(self._signature)
        self.metrics.model_loaded(self.counter.info.version)
        self.batcher = DynamicBatcher(
            lambda model, batch: model.predict(batch),
            config.max_batch_size,
            config.max_wait_ms,
            config.queue_size,
            on_batch=self.metrics.observe_batch,
        )
        self.decoder = ThreadPoolExecutor(max(2, os.cpu_count() or 1), thread_name_prefix="decode")
        self.capture = (
            DataCapture(config.capture_dir, config.capture_sample_rate, config.capture_max_file_bytes)
            if config.capture_dir
            else None
        )
        self._s3: Any = None
        self._reloader: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self.batcher.start()
        if self.config.reload_interval_s > 0:
            self._reloader = asyncio.get_running_loop().create_task(self._watch_model(), name="model-reload")

    async def stop(self) -> None:
        if self._reloader:
            self._reloader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reloader
        await self.batcher.stop()
        self.decoder.shutdown(wait=False)
        if self.capture:
            self.capture.close()

    # ------------------------------------------------------------------ hot reload

    def _load(self, signature: Any) -> LoadedModel:
        if signature is None:
            raise BinsightError(f"the model at {self.config.model or self.config.registry} is missing")
        version = signature if isinstance(signature, str) else None  # a registry version name
        return load_counter(
            self.source.local_path(signature),
            self.config.threads_per_worker(),
            version=version,
            backend=self.config.backend,
            precision=self.config.precision,
        )

    async def _watch_model(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self.config.reload_interval_s)
            try:
                signature = await loop.run_in_executor(None, self.source.signature)
            except Exception as exc:  # the registry may be briefly unreachable; keep serving
                log.warning("could not check the model source: %s", exc)
                continue
            if signature is not None and signature != self._signature:
                await self.reload(signature)

    async def reload(self, signature: Any) -> bool:
        """Load the new model and swap it in; requests already prepared finish on the old one."""
        loop = asyncio.get_running_loop()
        try:
            fresh = await loop.run_in_executor(None, self._load, signature)
        except Exception as exc:  # keep serving the old model; a half-written file may be retried
            log.error("model reload failed, keeping %s: %s", self.counter.info.version, exc)
            self.metrics.reload_failed()
            self._signature = signature  # do not retry the same broken model every poll
            return False
        previous = self.counter.info.version
        self.counter = fresh
        self._signature = signature
        self.metrics.model_loaded(fresh.info.version)
        log.info("model reloaded: %s -> %s", previous, fresh.info.version)
        return True

    # ------------------------------------------------------------------ inputs

    def _prepare(self, data: bytes) -> Prepared:
        if not data:
            raise RequestError(400, "empty_image", "the image is empty (0 bytes)")
        model = self.counter
        size = model.info.input_hw
        try:
            image = open_image(data, max_pixels=self.config.max_image_pixels)
            width, height = image.size
            image = draft_rgb(image, size)
            pixels = to_model_input(image, size, model.info.mean, model.info.std)
        except ImageTooLargeError as exc:
            raise RequestError(413, "image_too_large", str(exc)) from None
        except Image.DecompressionBombError as exc:
            raise RequestError(413, "image_too_large", str(exc)) from None
        except UnidentifiedImageError:
            raise RequestError(
                400, "not_an_image", "the body is not an image Pillow can read (JPEG, PNG, ...)"
            ) from None
        except (OSError, SyntaxError, ValueError) as exc:
            raise RequestError(400, "corrupt_image", f"the image could not be decoded: {exc}") from None
        return Prepared(model, pixels, width, height, hashlib.sha256(data).hexdigest(), len(data))

    async def fetch_s3(self, uri: str) -> bytes:
        if not uri.startswith("s3://") or "/" not in uri[5:] or uri.endswith("/"):
            raise RequestError(400, "bad_s3_uri", f"{uri!r} is not an s3://bucket/key URI")
        bucket, key = uri[5:].split("/", 1)
        return await asyncio.get_running_loop().run_in_executor(
            self.decoder, self._get_s3_object, uri, bucket, key
        )

    def _get_s3_object(self, uri: str, bucket: str, key: str) -> bytes:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            response = self._s3_client().get_object(Bucket=bucket, Key=key)
            if response.get("ContentLength", 0) > self.config.max_body_bytes:
                raise RequestError(
                    413, "image_too_large", f"{uri} is over {self.config.max_body_bytes} bytes"
                )
            return response["Body"].read()
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code", "")
            if code in {"NoSuchKey", "NoSuchBucket", "404"}:
                raise RequestError(404, "s3_not_found", f"{uri} does not exist") from None
            if code in {"AccessDenied", "403"}:
                raise RequestError(403, "s3_access_denied", f"access to {uri} was denied") from None
            raise RequestError(502, "s3_error", f"S3 answered {code or 'an error'} for {uri}") from None
        except BotoCoreError as exc:
            raise RequestError(502, "s3_unreachable", f"could not fetch {uri}: {exc}") from None

    def _s3_client(self) -> Any:
        if self._s3 is None:
            import boto3
            from botocore import UNSIGNED
            from botocore.config import Config

            self._s3 = boto3.session.Session().client(
                "s3",
                endpoint_url=self.config.s3_endpoint_url,
                config=Config(
                    signature_version=UNSIGNED if self.config.s3_unsigned else None,
                    connect_timeout=self.config.s3_timeout_s,
                    read_timeout=self.config.s3_timeout_s,
                    retries={"max_attempts": 2, "mode": "standard"},
                ),
            )
        return self._s3

    # ------------------------------------------------------------------ prediction

    async def count(self, data: bytes, source: str, expected_count: int | None) -> dict[str, Any]:
        started = time.perf_counter()
        prepared = await asyncio.get_running_loop().run_in_executor(self.decoder, self._prepare, data)
        try:
            probabilities = await self.batcher.submit(prepared.model, prepared.pixels)
        except QueueFullError:
            raise RequestError(
                503, "overloaded", "the server is at capacity; retry shortly", {"Retry-After": "1"}
            ) from None
        probabilities = np.asarray(probabilities, dtype=np.float64)
        info = prepared.model.info
        result: dict[str, Any] = {
            "count": int(info.classes[int(np.argmax(probabilities))]),
            "confidence": round(float(probabilities.max()), 6),
            "probabilities": {
                str(c): round(float(p), 6) for c, p in zip(info.classes, probabilities, strict=True)
            },
            "model_version": info.version,
        }
        if expected_count is not None:
            verdict = judge(probabilities, expected_count, self.thresholds)
            result.update(
                expected_count=expected_count,
                agrees=verdict.agrees,
                p_expected=round(verdict.p_expected, 6),
                verdict=verdict.verdict,
            )
        result["latency_ms"] = round(1000 * (time.perf_counter() - started), 3)
        if self.capture:
            self.capture.record(
                {
                    "time": datetime.now(UTC).isoformat(timespec="milliseconds"),
                    "source": source,
                    "image_sha256": prepared.digest,
                    "bytes": prepared.size_bytes,
                    "width": prepared.width,
                    "height": prepared.height,
                    **{k: result[k] for k in ("count", "confidence", "model_version", "latency_ms")},
                    "probabilities": [round(float(p), 5) for p in probabilities],
                    **(
                        {"expected_count": expected_count, "verdict": result["verdict"]}
                        if expected_count is not None
                        else {}
                    ),
                }
            )
        return result


async def read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise RequestError(413, "body_too_large", f"the body is {declared} bytes; the limit is {limit}")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise RequestError(413, "body_too_large", f"the body is over the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def _expected(value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise RequestError(
            400, "bad_expected_count", f"expected_count must be a non-negative integer, got {value!r}"
        )
    return value


async def _instance_bytes(service: CountingService, instance: Any) -> tuple[bytes, str]:
    if not isinstance(instance, dict):
        raise RequestError(400, "bad_instance", "each instance must be an object with 'image' or 's3_uri'")
    if "image" in instance or "b64" in instance:
        encoded = instance.get("image", instance.get("b64"))
        if not isinstance(encoded, str):
            raise RequestError(400, "bad_base64", "'image' must be a base64 string")
        try:
            return base64.b64decode(encoded, validate=True), "base64"
        except (binascii.Error, ValueError):
            raise RequestError(400, "bad_base64", "'image' is not valid base64") from None
    if "s3_uri" in instance:
        uri = instance["s3_uri"]
        if not isinstance(uri, str):
            raise RequestError(400, "bad_s3_uri", "'s3_uri' must be a string")
        return await service.fetch_s3(uri), uri
    raise RequestError(400, "missing_image", "give 'image' (base64) or 's3_uri'")


async def _predict_request(service: CountingService, request: Request) -> tuple[list[dict[str, Any]], bool]:
    """All predictions in the request, and whether it asked for several (JSON instances)."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    body = await read_body(request, service.config.max_body_bytes)
    if content_type in IMAGE_TYPES:
        expected = request.query_params.get("expected_count")
        if expected is not None and not expected.isdigit():
            raise RequestError(400, "bad_expected_count", "expected_count must be a non-negative integer")
        return [await service.count(body, "body", int(expected) if expected is not None else None)], False
    if content_type != "application/json":
        raise RequestError(
            415,
            "unsupported_media_type",
            f"content type {content_type or '(none)'!r} is not supported; send image/jpeg, image/png, "
            "application/x-image or application/json",
        )
    try:
        document = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise RequestError(400, "bad_json", f"the body is not valid JSON: {exc}") from None
    if not isinstance(document, dict):
        raise RequestError(400, "bad_json", "the JSON body must be an object")
    many = "instances" in document
    instances = document["instances"] if many else [document]
    if not isinstance(instances, list) or not instances:
        raise RequestError(400, "bad_instances", "'instances' must be a non-empty list")
    if len(instances) > service.config.max_images_per_request:
        raise RequestError(
            413,
            "too_many_images",
            f"{len(instances)} images; at most {service.config.max_images_per_request} per request",
        )
    default_expected = _expected(document.get("expected_count")) if many else None

    async def one(instance: Any) -> dict[str, Any]:
        data, source = await _instance_bytes(service, instance)
        expected = _expected(instance.get("expected_count", default_expected))
        return await service.count(data, source, expected)

    return list(await asyncio.gather(*(one(instance) for instance in instances))), many


def create_app(config: ServeConfig) -> FastAPI:
    metrics = ServerMetrics()
    state: dict[str, CountingService] = {}

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        service = CountingService(config, metrics)
        await service.start()
        state["service"] = service
        log.info(
            "serving %s (version %s, %s px) on %s %s (%s) with batches of up to %d, %d threads",
            service.counter.path,
            service.counter.info.version,
            "x".join(map(str, service.counter.info.input_hw)),
            service.counter.runtime.backend,
            service.counter.runtime.precision,
            service.counter.runtime.reason,
            config.max_batch_size,
            config.threads_per_worker(),
        )
        try:
            yield
        finally:
            await service.stop()

    app = FastAPI(title="binsight", version="1", lifespan=lifespan, docs_url="/docs", redoc_url=None)
    app.state.binsight = state

    @app.exception_handler(RequestError)
    async def request_error(request: Request, exc: RequestError) -> JSONResponse:
        metrics.error(request.url.path, exc.code)
        return JSONResponse(
            {"error": {"code": exc.code, "message": exc.message}}, exc.status, headers=exc.headers
        )

    @app.exception_handler(Exception)
    async def unexpected_error(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error on %s", request.url.path)
        metrics.error(request.url.path, "internal")
        return JSONResponse(
            {"error": {"code": "internal", "message": "internal error; see the server log"}}, 500
        )

    @app.middleware("http")
    async def observe(request: Request, call_next: Any) -> Response:
        started = time.perf_counter()
        response = await call_next(request)
        metrics.request(request.url.path, response.status_code, time.perf_counter() - started)
        if "service" in state:
            metrics.queue_depth(state["service"].batcher.depth)
        return response

    @app.get("/ping")
    async def ping() -> JSONResponse:
        service = state.get("service")
        if service is None:
            return JSONResponse({"status": "loading"}, 503)
        return JSONResponse({"status": "ok", "model_version": service.counter.info.version})

    @app.get("/v1/model")
    async def model_info() -> dict[str, Any]:
        service = state["service"]
        info = service.counter.info
        return {
            **info.__dict__,
            "path": str(service.counter.path),
            "max_batch_size": config.max_batch_size,
            "runtime": service.counter.runtime.__dict__,
        }

    @app.post("/invocations")
    async def invocations(request: Request) -> JSONResponse:
        predictions, many = await _predict_request(state["service"], request)
        return JSONResponse({"predictions": predictions} if many else predictions[0])

    @app.post("/v1/count")
    async def count(request: Request) -> JSONResponse:
        predictions, _ = await _predict_request(state["service"], request)
        return JSONResponse({"predictions": predictions})

    pages = {name: static_file(name) for name in ("index.html", "traffic.html", "style.css")}

    @app.get("/", response_class=HTMLResponse)
    async def index() -> str:
        return pages["index.html"]

    @app.get("/traffic", response_class=HTMLResponse)
    async def traffic_page() -> str:
        return pages["traffic.html"]

    @app.get("/static/style.css")
    async def stylesheet() -> Response:
        return Response(pages["style.css"], media_type="text/css")

    @app.get("/v1/traffic")
    async def traffic() -> dict[str, Any]:
        return await asyncio.get_running_loop().run_in_executor(None, traffic_summary, config.capture_dir)

    @app.get("/metrics")
    async def prometheus() -> Response:
        body, content_type = metrics.render()
        return Response(body, media_type=content_type)

    return app


def app_from_env() -> FastAPI:
    """uvicorn's factory for worker processes: the config travels in an environment variable."""
    return create_app(ServeConfig.model_validate_json(os.environ[CONFIG_ENV]))


def serve(config: ServeConfig) -> None:
    import tempfile

    import uvicorn

    source = config.source()
    # Fail here, clearly, rather than in every worker.
    load_counter(source.local_path(source.signature()), 1, backend=config.backend, precision=config.precision)
    if config.workers == 1:
        uvicorn.run(create_app(config), host=config.host, port=config.port, log_level="info")
        return
    os.environ[CONFIG_ENV] = config.model_dump_json()
    # Workers are separate processes; Prometheus metrics are aggregated through files in this folder.
    with tempfile.TemporaryDirectory(prefix="binsight-prometheus-") as folder:
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = folder
        uvicorn.run(
            "binsight.serving.app:app_from_env",
            factory=True,
            host=config.host,
            port=config.port,
            workers=config.workers,
            log_level="info",
        )
