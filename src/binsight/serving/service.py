"""One server process's counting service: the model (hot-reloaded), the batcher, admission, capture.

Routes (`app.py`) turn HTTP into calls here; everything here is independent of HTTP except
`RequestError`, which carries the status a failure should be answered with.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
from PIL import Image, UnidentifiedImageError

from binsight.errors import BinsightError
from binsight.imaging import ImageTooLargeError, open_image
from binsight.inference.runtime import LoadedModel, load_counter
from binsight.inference.verdict import VerdictPolicy, VerdictThresholds, judge, policy_for
from binsight.monitoring.baseline import Baseline, Seen, observe_photo
from binsight.monitoring.watch import DriftWatch
from binsight.serving.batching import Admission, DynamicBatcher, QueueFullError
from binsight.serving.capture import DataCapture
from binsight.serving.metrics import ServerMetrics
from binsight.utils.s3 import BadS3Uri, parse_s3_uri, s3_client

if TYPE_CHECKING:
    from binsight.serving.config import ServeConfig

log = logging.getLogger(__name__)


class RequestError(Exception):
    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers or {}


def overloaded() -> RequestError:
    return RequestError(503, "overloaded", "the server is at capacity; retry shortly", {"Retry-After": "1"})


@dataclass
class Prepared:
    model: LoadedModel
    pixels: np.ndarray
    width: int
    height: int
    digest: str
    size_bytes: int
    signals: dict[str, float]


@dataclass(frozen=True)
class ReloadFailure:
    at: str
    error: str


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


class ModelSource(Protocol):
    """Where the served model comes from: a file, or a registry alias. `signature` changes when the
    model does; `local_path` makes that model a local file."""

    def signature(self) -> Any: ...

    def local_path(self, signature: Any) -> Path: ...


def model_source(config: ServeConfig) -> ModelSource:
    if config.model is not None:
        return FileSource(config.model)
    from binsight.registry import AliasSource, Registry

    assert config.registry is not None  # the config validator allows exactly one source
    cache = config.registry_cache or Path(tempfile.gettempdir()) / "binsight-registry-cache"
    return AliasSource(Registry(config.registry), config.alias, cache)


def header_pixels(data: bytes) -> int:
    """Pixels the image header claims (0 if unreadable: decoding will say what is wrong)."""
    try:
        width, height = open_image(data).size
    except Exception:
        return 0
    return width * height


class CountingService:
    def __init__(self, config: ServeConfig, metrics: ServerMetrics) -> None:
        self.config = config
        self.metrics = metrics
        self.source = model_source(config)
        self._signature = self.source.signature()
        self.counter = self._load(self._signature)
        self.last_reload_failure: ReloadFailure | None = None
        self.policy = self._policy(self.counter)
        self.watch = self._watch(self.counter)
        self.metrics.model_loaded(self.counter.info.version)
        self.admission = Admission(config.max_queue_ms / 1000.0, ceiling=config.queue_size)
        self.batcher = DynamicBatcher(
            lambda model, batch: model.observe(batch),
            config.max_batch_size,
            config.max_wait_ms,
            config.queue_size,
            on_batch=self._observe_batch,
            on_the_way=self.admission.on_the_way,
        )
        self.decoder = ThreadPoolExecutor(max(2, os.cpu_count() or 1), thread_name_prefix="decode")
        self.capture = (
            DataCapture(config.capture_dir, config.capture_sample_rate, config.capture_max_file_bytes)
            if config.capture_dir
            else None
        )
        self._s3: Any = None
        self._reloader: asyncio.Task[None] | None = None
        self._drift_task: asyncio.Task[None] | None = None

    def _policy(self, counter: LoadedModel) -> VerdictPolicy:
        thresholds = VerdictThresholds(self.config.ok_above, self.config.mismatch_below)
        return policy_for(counter.info.calibration, thresholds, self.config.alpha, self.config.review_alpha)

    def _watch(self, counter: LoadedModel) -> DriftWatch | None:
        """The drift watch for this model, its thresholds drawn now (a second or two of CPU) rather
        than at the first check, which would land in the middle of traffic."""
        if not counter.info.baseline or self.config.monitor_interval_s <= 0:
            return None
        baseline = Baseline.from_json(counter.info.baseline)
        watch = DriftWatch(baseline, self.config.monitor_window, self.config.monitor_alpha)
        watch.detector.thresholds(watch.window)
        return watch

    async def _check_drift(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self.config.monitor_interval_s)
            watch = self.watch
            if watch is None:
                continue
            try:
                result = await loop.run_in_executor(None, watch.check)
            except Exception:  # monitoring must never take serving down
                log.exception("drift check failed")
                continue
            if result is not None:
                self.metrics.drift(result)
                if result.drifted:
                    log.warning("drift in the last %d photos: %s", result.window, ", ".join(result.drifted))

    def _observe_batch(self, size: int, seconds: float) -> None:
        self.metrics.observe_batch(size, seconds)
        self.admission.observe(size, seconds)

    async def start(self) -> None:
        self.batcher.start()
        if self.config.reload_interval_s > 0:
            self._reloader = asyncio.get_running_loop().create_task(self._watch_model(), name="model-reload")
        if self.config.monitor_interval_s > 0:
            self._drift_task = asyncio.get_running_loop().create_task(self._check_drift(), name="drift")

    async def stop(self) -> None:
        for task in (self._reloader, self._drift_task):
            if task:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
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
            fresh_watch = await loop.run_in_executor(None, self._watch, fresh)
        except Exception as exc:  # keep serving the old model; a half-written file may be retried
            log.error("model reload failed, keeping %s: %s", self.counter.info.version, exc)
            self.last_reload_failure = ReloadFailure(
                datetime.now(UTC).isoformat(timespec="seconds"), str(exc).splitlines()[0][:500]
            )
            self.metrics.reload_failed()
            self._signature = signature  # do not retry the same broken model every poll
            return False
        previous = self.counter.info.version
        self.policy = self._policy(fresh)
        self.watch = fresh_watch
        self.counter = fresh
        self._signature = signature
        self.last_reload_failure = None
        self.metrics.model_loaded(fresh.info.version)
        log.info("model reloaded: %s -> %s", previous, fresh.info.version)
        return True

    # ------------------------------------------------------------------ inputs

    def check_request_pixels(self, images: list[bytes]) -> None:
        """Refuse a request whose images together would take too long to decode, before decoding any."""
        total = sum(header_pixels(data) for data in images)
        if total > self.config.max_request_pixels:
            raise RequestError(
                413,
                "too_many_pixels",
                f"the request's images hold {total:,} pixels together; the limit is "
                f"{self.config.max_request_pixels:,} per request (send fewer or smaller images)",
            )

    def _prepare(self, data: bytes) -> Prepared:
        if not data:
            raise RequestError(400, "empty_image", "the image is empty (0 bytes)")
        model = self.counter
        info = model.info
        try:
            observed = observe_photo(data, info.input_hw, info.mean, info.std, self.config.max_image_pixels)
        except (ImageTooLargeError, Image.DecompressionBombError) as exc:
            raise RequestError(413, "image_too_large", str(exc)) from None
        except UnidentifiedImageError:
            raise RequestError(
                400, "not_an_image", "the body is not an image Pillow can read (JPEG, PNG, ...)"
            ) from None
        except (OSError, SyntaxError, ValueError) as exc:
            raise RequestError(400, "corrupt_image", f"the image could not be decoded: {exc}") from None
        return Prepared(
            model,
            observed.pixels,
            observed.width,
            observed.height,
            hashlib.sha256(data).hexdigest(),
            len(data),
            observed.signals,
        )

    async def fetch_s3(self, uri: str) -> bytes:
        try:
            location = parse_s3_uri(uri)
        except BadS3Uri as exc:
            raise RequestError(400, "bad_s3_uri", exc.message) from None
        return await asyncio.get_running_loop().run_in_executor(
            self.decoder, self._get_s3_object, uri, location.bucket, location.key
        )

    def _get_s3_object(self, uri: str, bucket: str, key: str) -> bytes:
        from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

        if self._s3 is None:
            self._s3 = s3_client(
                self.config.s3_endpoint_url,
                unsigned=self.config.s3_unsigned,
                timeout_s=self.config.s3_timeout_s,
                max_attempts=2,
            )
        try:
            response = self._s3.get_object(Bucket=bucket, Key=key)
            if response.get("ContentLength", 0) > self.config.max_body_bytes:
                raise RequestError(
                    413, "image_too_large", f"{uri} is over {self.config.max_body_bytes} bytes"
                )
            return bytes(response["Body"].read())
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code", "")
            if code in {"NoSuchKey", "NoSuchBucket", "404"}:
                raise RequestError(404, "s3_not_found", f"{uri} does not exist") from None
            if code in {"AccessDenied", "403"}:
                raise RequestError(403, "s3_access_denied", f"access to {uri} was denied") from None
            raise RequestError(502, "s3_error", f"S3 answered {code or 'an error'} for {uri}") from None
        except NoCredentialsError:
            raise RequestError(
                502,
                "s3_no_credentials",
                f"the server has no AWS credentials to read {uri} (public buckets: serve with --s3-unsigned)",
            ) from None
        except BotoCoreError as exc:
            raise RequestError(502, "s3_unreachable", f"could not fetch {uri}: {exc}") from None

    # ------------------------------------------------------------------ prediction

    async def count(self, data: bytes, source: str, expected_count: int | None) -> dict[str, Any]:
        """Count the objects in one admitted image (the caller holds its place in `admission`)."""
        started = time.perf_counter()
        prepared = await asyncio.get_running_loop().run_in_executor(self.decoder, self._prepare, data)
        try:
            outputs = await self.batcher.submit(prepared.model, prepared.pixels)
        except QueueFullError:
            raise overloaded() from None
        info = prepared.model.info
        probabilities = np.asarray(outputs[: len(info.classes)], dtype=np.float64)
        embedding = np.asarray(outputs[len(info.classes) :], dtype=np.float64)
        now = datetime.now(UTC).isoformat(timespec="milliseconds")
        if self.watch is not None and prepared.model is self.counter:
            signals = {**prepared.signals, "confidence": float(probabilities.max())}
            self.watch.add(Seen(signals, int(np.argmax(probabilities)), embedding, now))
        result: dict[str, Any] = {
            "count": int(info.classes[int(np.argmax(probabilities))]),
            "confidence": round(float(probabilities.max()), 6),
            "probabilities": {
                str(c): round(float(p), 6) for c, p in zip(info.classes, probabilities, strict=True)
            },
            "model_version": info.version,
        }
        if expected_count is not None:
            verdict = judge(probabilities, expected_count, self.policy)
            top = info.classes[-1]
            result.update(
                expected_count=expected_count,
                # The top class also holds every larger count, so past it the model can only say
                # "at least `top`": p_expected is then P(count >= top), and the answer says so.
                expected_within_range=expected_count < top,
                agrees=verdict.agrees,
                p_expected=round(verdict.p_expected, 6),
                verdict=verdict.verdict,
            )
            if verdict.p_value is not None:
                result["p_value"] = round(verdict.p_value, 6)
        result["latency_ms"] = round(1000 * (time.perf_counter() - started), 3)
        if self.capture:
            self.capture.record(
                {
                    "time": now,
                    "source": source,
                    "image_sha256": prepared.digest,
                    "bytes": prepared.size_bytes,
                    "width": prepared.width,
                    "height": prepared.height,
                    **{k: result[k] for k in ("count", "confidence", "model_version", "latency_ms")},
                    "probabilities": [round(float(p), 5) for p in probabilities],
                    "signals": {k: round(v, 4) for k, v in prepared.signals.items()},
                    "embedding": [round(float(v), 4) for v in embedding],
                    **(
                        {"expected_count": expected_count, "verdict": result["verdict"]}
                        if expected_count is not None
                        else {}
                    ),
                }
            )
        return result
