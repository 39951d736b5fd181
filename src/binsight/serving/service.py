"""One server process's counting service: the model (hot-reloaded), the batcher, admission, capture.

Routes (`app.py`) turn HTTP into calls here; a request's images are read and prepared by `inputs.py`,
and the model comes from a `sources.py` source. Nothing here depends on HTTP but the status codes
that `RequestError`s carry.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import numpy as np

from binsight.errors import BinsightError
from binsight.inference.runtime import LoadedModel, load_counter
from binsight.inference.verdict import VerdictPolicy, judge
from binsight.monitoring.baseline import Baseline, Seen
from binsight.monitoring.capture_record import CaptureRecord
from binsight.monitoring.watch import DriftWatch
from binsight.serving.api_schema import Prediction
from binsight.serving.batching import Admission, DynamicBatcher, QueueFullError
from binsight.serving.capture import DataCapture
from binsight.serving.inputs import RequestInputs, overloaded
from binsight.serving.metrics import ServerMetrics
from binsight.serving.sources import ReloadFailure, model_source

if TYPE_CHECKING:
    from binsight.serving.config import ServeConfig

log = logging.getLogger(__name__)


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
        self.metrics.self_check(self.counter.check)
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
        self.inputs = RequestInputs(config, self.decoder)
        self._reloader: asyncio.Task[None] | None = None
        self._drift_task: asyncio.Task[None] | None = None

    def _policy(self, counter: LoadedModel) -> VerdictPolicy:
        return self.config.policy(counter.info.calibration)

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
        self.inputs.close()
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
        self.metrics.self_check(fresh.check)
        log.info("model reloaded: %s -> %s", previous, fresh.info.version)
        return True

    # ------------------------------------------------------------------ prediction

    async def count(self, data: bytes, source: str, expected_count: int | None) -> Prediction:
        """Count the objects in one admitted image (the caller holds its place in `admission`)."""
        started = time.perf_counter()
        prepared = await asyncio.get_running_loop().run_in_executor(
            self.decoder, self.inputs.prepare, data, self.counter
        )
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
        classes = np.asarray(info.classes, dtype=np.float64)
        verdict = None if expected_count is None else judge(probabilities, expected_count, self.policy)
        result = Prediction(
            count=int(info.classes[int(np.argmax(probabilities))]),
            confidence=round(float(probabilities.max()), 6),
            # The other two answers a distribution gives (docs/benchmarks.md: argmax for accuracy,
            # median for absolute error, mean for squared error); the top class counts as its value.
            median_count=int(info.classes[int(np.searchsorted(np.cumsum(probabilities), 0.5))]),
            mean_count=round(float(probabilities @ classes), 4),
            probabilities={
                str(c): round(float(p), 6) for c, p in zip(info.classes, probabilities, strict=True)
            },
            model_version=info.version,
            latency_ms=round(1000 * (time.perf_counter() - started), 3),
            expected_count=expected_count,
            # The top class also holds every larger count, so past it the model can only say
            # "at least `top`": p_expected is then P(count >= top), and the answer says so.
            expected_within_range=None if expected_count is None else expected_count < info.classes[-1],
            agrees=None if verdict is None else verdict.agrees,
            p_expected=None if verdict is None else round(verdict.p_expected, 6),
            verdict=None if verdict is None else verdict.verdict,
            p_value=None if verdict is None or verdict.p_value is None else round(verdict.p_value, 6),
            p_record_wrong=None if verdict is None else round(verdict.p_record_wrong, 6),
        )
        if self.capture:
            self.capture.record(
                CaptureRecord(
                    time=now,
                    source=source,
                    image_sha256=prepared.digest,
                    bytes=prepared.size_bytes,
                    width=prepared.width,
                    height=prepared.height,
                    count=result.count,
                    confidence=result.confidence,
                    model_version=result.model_version,
                    latency_ms=result.latency_ms,
                    probabilities=[round(float(p), 5) for p in probabilities],
                    signals={k: round(v, 4) for k, v in prepared.signals.items()},
                    embedding=[round(float(v), 4) for v in embedding],
                    expected_count=expected_count,
                    verdict=result.verdict,
                )
            )
        return result
