"""Prometheus metrics of a server process, or of all worker processes together.

With several uvicorn workers, prometheus_client's multiprocess mode (PROMETHEUS_MULTIPROC_DIR, set by
`serve`) writes each process's values to files and /metrics sums them, whichever worker answers.
"""

from __future__ import annotations

import os
from typing import Literal

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.multiprocess import MultiProcessCollector

from binsight.inference.selfcheck import SelfCheck
from binsight.monitoring.drift import DriftResult

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
KNOWN_ROUTES = {
    "/ping",
    "/invocations",
    "/v1/count",
    "/v1/model",
    "/metrics",
    "/",
    "/traffic",
    "/v1/traffic",
    "/static/style.css",
    "/static/api.js",
    "/recheck",
    "/v1/recheck/next",
}


class ServerMetrics:
    def __init__(self) -> None:
        self.multiprocess = "PROMETHEUS_MULTIPROC_DIR" in os.environ
        # In multiprocess mode values live in files, not in a registry; otherwise each app (tests
        # create many) gets its own registry so metrics never collide.
        self.registry = None if self.multiprocess else CollectorRegistry()
        registry = self.registry
        self.requests = Counter("binsight_requests", "HTTP requests", ["route", "status"], registry=registry)
        self.errors = Counter(
            "binsight_request_errors", "Failed requests by cause", ["route", "code"], registry=registry
        )
        self.latency = Histogram(
            "binsight_request_latency_seconds",
            "Request latency",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.batch_size = Histogram(
            "binsight_batch_size", "Images per model call", buckets=BATCH_BUCKETS, registry=registry
        )
        self.model_latency = Histogram(
            "binsight_model_latency_seconds",
            "Seconds per model call",
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.images = Counter("binsight_images", "Images counted", registry=registry)
        self.depth = self._gauge("binsight_queue_depth", "Images waiting for the model", mode="livesum")
        self.reloads = Counter(
            "binsight_model_reloads", "Model loads (first load and hot reloads)", registry=registry
        )
        self.reload_failures = Counter(
            "binsight_model_reload_failures", "Failed hot reloads", registry=registry
        )
        self.info = self._gauge("binsight_model_info", "The loaded model version (value 1)", ["version"])
        self.reload_failing = self._gauge(
            "binsight_model_reload_failing",
            "1 while the newest model could not be loaded (the previous one is served)",
        )
        self.shed_images = Counter(
            "binsight_shed_images", "Images refused with 503 to keep latency bounded", registry=registry
        )
        self.worker_requests = Counter(
            "binsight_worker_requests",
            "HTTP requests answered, per worker process (shows how load spreads)",
            ["worker"],
            registry=registry,
        )
        self.drift_statistic = self._gauge(
            "binsight_drift_statistic",
            "Drift statistic of the newest window of photos against the baseline, per signal",
            ["signal", "test"],
        )
        self.drift_threshold = self._gauge(
            "binsight_drift_threshold",
            "Alarm threshold of each drift statistic (from the baseline's own variability)",
            ["signal"],
        )
        self.drift_alarm = self._gauge(
            "binsight_drift_alarm", "1 while a signal's statistic is over its threshold", ["signal"]
        )
        self.self_check_diff = self._gauge(
            "binsight_self_check_max_prob_diff",
            "Largest probability difference from fp32 on the model's reference photos, on this CPU",
            ["engine"],
        )
        self.self_check_agreement = self._gauge(
            "binsight_self_check_agreement",
            "Share of the model's reference photos whose count agrees with fp32, on this CPU",
            ["engine"],
        )
        self.worker = os.environ.get("BINSIGHT_WORKER", "0")
        self._version: str | None = None

    def _gauge(
        self,
        name: str,
        documentation: str,
        labels: list[str] | None = None,
        mode: Literal["liveall", "livesum"] = "liveall",
    ) -> Gauge:
        # Across worker processes a gauge is each live worker's value ("liveall") unless summed.
        return Gauge(name, documentation, labels or [], registry=self.registry, multiprocess_mode=mode)

    def request(self, route: str, status: int, seconds: float) -> None:
        route = route if route in KNOWN_ROUTES else "other"  # unbounded label values would leak memory
        self.requests.labels(route, str(status)).inc()
        self.latency.labels(route).observe(seconds)
        self.worker_requests.labels(self.worker).inc()

    def error(self, route: str, code: str) -> None:
        self.errors.labels(route if route in KNOWN_ROUTES else "other", code).inc()

    def observe_batch(self, size: int, seconds: float) -> None:
        self.batch_size.observe(size)
        self.model_latency.observe(seconds)
        self.images.inc(size)

    def queue_depth(self, depth: int) -> None:
        self.depth.set(depth)

    def self_check(self, check: SelfCheck | None) -> None:
        if check is not None:
            self.self_check_diff.labels(check.engine).set(check.max_prob_diff)
            self.self_check_agreement.labels(check.engine).set(check.agreement)

    def model_loaded(self, version: str) -> None:
        if self._version is not None and self._version != version:
            # In multiprocess mode a removed label lingers in the process's file with its last value,
            # so the old version is set to 0 first: only the served version reads 1.
            self.info.labels(self._version).set(0)
            if not self.multiprocess:
                self.info.remove(self._version)
        self.info.labels(version).set(1)
        self._version = version
        self.reloads.inc()
        self.reload_failing.set(0)

    def reload_failed(self) -> None:
        self.reload_failures.inc()
        self.reload_failing.set(1)

    def drift(self, result: DriftResult) -> None:
        for signal in result.signals:
            self.drift_statistic.labels(signal.signal, signal.test).set(signal.statistic)
            self.drift_threshold.labels(signal.signal).set(signal.threshold)
            self.drift_alarm.labels(signal.signal).set(1 if signal.drifted else 0)

    def shed(self, images: int) -> None:
        self.shed_images.inc(images)

    def render(self) -> tuple[bytes, str]:
        registry = self.registry
        if registry is None:  # multiprocess mode: sum every worker's files into a fresh registry
            registry = CollectorRegistry()
            MultiProcessCollector(registry)  # type: ignore[no-untyped-call]  # unannotated upstream
        return generate_latest(registry), CONTENT_TYPE_LATEST
