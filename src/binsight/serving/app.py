"""`binsight serve`'s HTTP routes (FastAPI); the work is done by `CountingService`.

Routes:
- ``GET /ping`` — health (SageMaker contract): 200 once a model is loaded, with the served version and
  the last failed reload, if the newest model file could not be loaded.
- ``POST /invocations`` — SageMaker contract: an image body (image/jpeg, image/png,
  application/x-image) or JSON ``{"image": <base64>}`` / ``{"s3_uri": "s3://..."}``, optionally with
  ``expected_count``; or JSON ``{"instances": [...]}`` for several.
- ``POST /v1/count`` — the same inputs; always answers ``{"predictions": [...]}``.
- ``GET /v1/model`` — what is loaded and how it runs. ``GET /metrics`` — Prometheus text format.
- ``GET /openapi.json`` — the contract, with every request body and error (no CDN-hosted docs page:
  warehouse networks are often offline).

Every failure is a JSON error with a status that says whose fault it is (4xx: the request, 502: S3,
503: overloaded, 504: past the deadline), and the server keeps serving.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import logging
import re
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from binsight.monitoring.drift import DriftOff
from binsight.serving.api_schema import (
    ERROR_RESPONSES,
    ModelDescription,
    Prediction,
    declare_security,
    error_json,
    invocation_body,
    invocation_responses,
)
from binsight.serving.auth import AccessControl, access_policy, route_scope
from binsight.serving.config import ServeConfig
from binsight.serving.inputs import FetchLedger, RequestError, overloaded, parse_json_object, read_body
from binsight.serving.metrics import ServerMetrics
from binsight.serving.service import CountingService
from binsight.serving.web import TrafficSummary, add_pages, traffic_summary

log = logging.getLogger(__name__)

IMAGE_TYPES = {"image/jpeg", "image/jpg", "image/png", "application/x-image", "image/webp"}
MAX_EXPECTED_COUNT = 1_000_000
_DIGITS = re.compile(r"[0-9]{1,7}")


def _bad_expected(got: str) -> RequestError:
    return RequestError(
        400,
        "bad_expected_count",
        f"expected_count must be a whole number from 0 to {MAX_EXPECTED_COUNT:,}, got {got[:40]}",
    )


def _expected(value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_EXPECTED_COUNT:
        raise _bad_expected(repr(value) if not isinstance(value, int) else f"{str(value)[:20]}...")
    return int(value)


def _expected_from_query(text: str | None) -> int | None:
    if text is None:
        return None
    if not _DIGITS.fullmatch(text) or int(text) > MAX_EXPECTED_COUNT:
        raise _bad_expected(repr(text))
    return int(text)


@contextlib.contextmanager
def _admitted(service: CountingService, images: int) -> Iterator[None]:
    if not service.admission.try_enter(images):
        service.metrics.shed(images)
        raise overloaded()
    try:
        yield
    finally:
        service.admission.leave(images)


async def _instance_bytes(service: CountingService, instance: Any, ledger: FetchLedger) -> tuple[bytes, str]:
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
        return await service.inputs.fetch_s3(uri, ledger), uri
    raise RequestError(400, "missing_image", "give 'image' (base64) or 's3_uri'")


async def _predict_request(service: CountingService, request: Request) -> tuple[list[Prediction], bool]:
    """All predictions in the request, and whether it asked for several (JSON instances)."""
    config = service.config
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    body = await read_body(request, config.max_body_bytes)
    if content_type in IMAGE_TYPES:
        expected = _expected_from_query(request.query_params.get("expected_count"))
        with _admitted(service, 1):
            service.inputs.check_request_pixels([body])
            return [await service.count(body, "body", expected)], False
    if content_type != "application/json":
        raise RequestError(
            415,
            "unsupported_media_type",
            f"content type {content_type[:100] or '(none)'!r} is not supported; send image/jpeg, "
            "image/png, application/x-image or application/json",
        )
    document = parse_json_object(body)
    many = "instances" in document
    instances = document["instances"] if many else [document]
    if not isinstance(instances, list) or not instances:
        raise RequestError(400, "bad_instances", "'instances' must be a non-empty list")
    if len(instances) > config.max_images_per_request:
        raise RequestError(
            413,
            "too_many_images",
            f"{len(instances)} images; at most {config.max_images_per_request} per request",
        )
    # The query's expected_count is honoured for JSON bodies too, as the default of every instance;
    # given in both places with different values, the request is ambiguous and refused.
    query_expected = _expected_from_query(request.query_params.get("expected_count"))
    body_expected = _expected(document.get("expected_count"))
    if query_expected is not None and body_expected is not None and query_expected != body_expected:
        raise RequestError(
            400, "bad_expected_count", "expected_count differs between the query and the JSON body"
        )
    default_expected = body_expected if body_expected is not None else query_expected
    expected_counts = [
        _expected(item.get("expected_count", default_expected)) if isinstance(item, dict) else None
        for item in instances
    ]
    ledger = service.inputs.ledger()
    try:
        with _admitted(service, len(instances)):
            fetched = await asyncio.gather(*(_instance_bytes(service, item, ledger) for item in instances))
            service.inputs.check_request_pixels([data for data, _ in fetched])
            predictions = await asyncio.gather(
                *(
                    service.count(data, source, count)
                    for (data, source), count in zip(fetched, expected_counts, strict=True)
                )
            )
    finally:
        ledger.close()
    return list(predictions), many


PREDICTION_ROUTES = {"/invocations", "/v1/count"}
_OVERLOADED_BODY = error_json("overloaded", "the server is at capacity; retry shortly")
_OVERLOADED_HEADERS = [
    (b"content-type", b"application/json"),
    (b"content-length", str(len(_OVERLOADED_BODY)).encode()),
    (b"retry-after", b"1"),
]


class ObserveRequests:
    """Request counts and latencies, and load shedding at the door, as plain ASGI middleware:
    Starlette's `@app.middleware("http")` wraps every request in extra tasks and streams, which cost
    more than the route itself here."""

    def __init__(self, app: ASGIApp, metrics: ServerMetrics, state: dict[str, CountingService]) -> None:
        self.app, self.metrics, self.state = app, metrics, state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500
        service = self.state.get("service")
        if service is not None and scope["path"] in PREDICTION_ROUTES and not service.admission.has_room(1):
            # Shed before routing and before reading the body: at 2x capacity half the requests
            # end here, so this path must cost next to nothing.
            self.metrics.shed(1)
            self.metrics.error(scope["path"], "overloaded")
            await send({"type": "http.response.start", "status": 503, "headers": _OVERLOADED_HEADERS})
            await send({"type": "http.response.body", "body": _OVERLOADED_BODY})
            self.metrics.request(scope["path"], 503, time.perf_counter() - started)
            return

        async def observed_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, observed_send)
        finally:
            self.metrics.request(scope["path"], status, time.perf_counter() - started)
            if "service" in self.state:
                self.metrics.queue_depth(self.state["service"].batcher.depth)


def create_app(config: ServeConfig) -> FastAPI:
    """The server as a list of parts: the service's lifetime, error bodies, access control (outermost),
    prediction routes, information routes, pages, and the recount API when asked for."""
    metrics = ServerMetrics()
    state: dict[str, CountingService] = {}
    policy = access_policy(
        config.host, config.tokens_file, config.no_auth, config.allowed_hosts, config.metrics_public
    )

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        service = CountingService(config, metrics)
        await service.start()
        state["service"] = service
        counter = service.counter
        log.info(
            "serving model version %s (%s px) on %s %s (%s) with batches of up to %d, %d threads",
            counter.info.version,
            "x".join(map(str, counter.info.input_hw)),
            counter.runtime.backend,
            counter.runtime.precision,
            counter.runtime.reason,
            config.max_batch_size,
            config.threads_per_worker(),
        )
        try:
            yield
        finally:
            await service.stop()

    app = FastAPI(
        title="binsight",
        version="1",
        summary="Counts the objects in warehouse bin photos",
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
    )
    app.state.binsight = state
    _add_error_handlers(app, metrics)
    app.add_middleware(ObserveRequests, metrics=metrics, state=state)

    def refused(path: str, status: int, code: str) -> None:
        metrics.error(path, code)
        metrics.request(path, status, 0.0)

    # Added last, so it runs first: nothing is routed, read or counted for a caller it refuses.
    app.add_middleware(AccessControl, policy=policy, on_refused=refused)
    _add_prediction_routes(app, config, state)
    _add_information_routes(app, config, state, metrics)
    add_pages(app)
    if config.recheck:
        from binsight.serving.recheck import add_recheck_routes

        add_recheck_routes(app, config, policy)
    declare_security(app, policy.auth_required, lambda path: route_scope(path, config.metrics_public))
    return app


def _add_error_handlers(app: FastAPI, metrics: ServerMetrics) -> None:
    @app.exception_handler(RequestError)
    async def request_error(request: Request, exc: RequestError) -> Response:
        metrics.error(request.url.path, exc.code)
        return Response(
            error_json(exc.code, exc.message), exc.status, headers=exc.headers, media_type="application/json"
        )

    @app.exception_handler(Exception)
    async def unexpected_error(request: Request, exc: Exception) -> Response:
        log.exception("unexpected error on %s", request.url.path)
        metrics.error(request.url.path, "internal")
        return Response(
            error_json("internal", "internal error; see the server log"), 500, media_type="application/json"
        )


def _add_prediction_routes(app: FastAPI, config: ServeConfig, state: dict[str, CountingService]) -> None:
    async def predict(request: Request) -> tuple[list[Prediction], bool]:
        try:
            async with asyncio.timeout(config.request_timeout_s):
                return await _predict_request(state["service"], request)
        except TimeoutError:
            raise RequestError(
                504, "deadline_exceeded", f"the request took over {config.request_timeout_s:g} s"
            ) from None

    @app.post(
        "/invocations",
        openapi_extra=invocation_body(),
        responses=invocation_responses(many_or_one=True),
    )
    async def invocations(request: Request) -> JSONResponse:
        predictions, many = await predict(request)
        # Absent, not null: the record's fields appear only when a record was given.
        answers = [p.model_dump(exclude_none=True) for p in predictions]
        return JSONResponse({"predictions": answers} if many else answers[0])

    @app.post("/v1/count", openapi_extra=invocation_body(), responses=invocation_responses(many_or_one=False))
    async def count(request: Request) -> JSONResponse:
        predictions, _ = await predict(request)
        return JSONResponse({"predictions": [p.model_dump(exclude_none=True) for p in predictions]})


def _add_information_routes(
    app: FastAPI, config: ServeConfig, state: dict[str, CountingService], metrics: ServerMetrics
) -> None:
    def reload_failure_time() -> dict[str, str] | None:
        # /ping is public: it says when, not what (the error names files on the server).
        failure = state["service"].last_reload_failure
        return None if failure is None else {"at": failure.at}

    @app.get("/ping", responses=ERROR_RESPONSES)
    async def ping() -> JSONResponse:
        service = state.get("service")
        if service is None:
            return JSONResponse({"status": "loading"}, 503)
        return JSONResponse(
            {
                "status": "ok",
                "model_version": service.counter.info.version,
                "last_reload_failure": reload_failure_time(),
            }
        )

    @app.get("/v1/model")
    async def model_info() -> ModelDescription:
        service = state["service"]
        return ModelDescription(
            **dict(service.counter.info.describe()),
            verdicts=service.policy.basis,
            max_batch_size=config.max_batch_size,
            runtime=service.counter.runtime,
            self_check=service.counter.check,
            last_reload_failure=service.last_reload_failure,
        )

    @app.get("/v1/traffic")
    async def traffic() -> TrafficSummary:
        summary = await asyncio.get_running_loop().run_in_executor(None, traffic_summary, config.capture_dir)
        summary.sample_rate = config.capture_sample_rate
        watch = state["service"].watch
        if watch is not None:
            summary.drift = watch.summary()
        elif config.monitor_interval_s <= 0:
            summary.drift = DriftOff(status="off (the server runs with --monitor-interval-s 0)")
        else:
            summary.drift = DriftOff(status="no baseline in the model file")
        return summary

    @app.get(
        "/metrics",
        response_class=PlainTextResponse,
        responses={200: {"content": {"text/plain": {}}, "description": "Prometheus text format"}},
    )
    async def prometheus() -> Response:
        body, content_type = metrics.render()
        return Response(body, media_type=content_type)
