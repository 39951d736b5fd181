"""`binsight serve` settings: the model source, the engine, batching, and the limits that keep one
client from starving the others. The defaults are the measured best on 2 cores (docs/benchmarks.md)."""

from __future__ import annotations

import os
from pathlib import Path

from pydantic import ConfigDict, Field, field_validator, model_validator

from binsight.inference.engines import Backend, EnginePrecision
from binsight.inference.verdict import VerdictSettings
from binsight.utils.redact import SecretUrl
from binsight.utils.s3 import BadS3Uri, parse_s3_uri


class ServeConfig(VerdictSettings):
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
    precision: EnginePrecision = Field(
        "auto", description="auto, fp32 or bf16; an int8 model file runs in int8"
    )
    max_batch_size: int = Field(16, ge=1, le=512)
    max_wait_ms: float = Field(5.0, ge=0.0, le=1000.0)
    queue_size: int = Field(256, ge=1, description="images admitted at most (queued or in the model)")
    max_queue_ms: float = Field(
        200.0,
        ge=0.0,
        description="shed load (503) when the images admitted would take longer than this to run; 0: "
        "bound by queue_size only",
    )
    request_timeout_s: float = Field(10.0, gt=0.0, description="answer 504 past this deadline")
    max_body_bytes: int = Field(16 * 1024 * 1024, ge=1024)
    max_image_pixels: int = Field(40_000_000, ge=1)
    max_request_pixels: int = Field(
        64_000_000, ge=1, description="pixels of all images of one request together"
    )
    max_images_per_request: int = Field(64, ge=1)
    max_connections: int = Field(1024, ge=1, description="open connections per process; more get 503")
    header_timeout_s: float = Field(10.0, gt=0.0, description="time a client has to send its headers")
    max_header_bytes: int = Field(64 * 1024, ge=1024, description="request line and headers, at most")
    keep_alive_s: int = Field(5, ge=1, description="idle keep-alive connections close after this")
    access_log: bool = Field(False, description="log a line per request (Prometheus counts them anyway)")
    reload_interval_s: float = Field(2.0, ge=0.0, description="model file poll period; 0 disables reload")
    capture_dir: Path | None = None
    capture_sample_rate: float = Field(1.0, ge=0.0, le=1.0, description="share of requests captured")
    capture_max_file_bytes: int = Field(64 * 1024 * 1024, ge=1024)
    monitor_window: int = Field(
        200, ge=10, description="drift: compare the newest this many photos with the model's baseline"
    )
    monitor_interval_s: float = Field(30.0, ge=0.0, description="drift check period; 0 disables")
    monitor_alpha: float = Field(
        0.01, gt=0.0, lt=1.0, description="drift: chance that a window like the baseline raises an alarm"
    )
    tokens_file: Path | None = Field(
        None,
        description="bearer tokens with scopes (`binsight token new`); also $BINSIGHT_TOKENS. "
        "Without tokens the server runs open only on loopback",
    )
    no_auth: bool = Field(
        False,
        description="serve without authentication on a non-loopback interface (IAM or a proxy in front)",
    )
    allowed_hosts: list[str] = Field(
        default_factory=list,
        description="Host header names the pages (and, without auth, every route) answer to, besides "
        "loopback and --host; * for any",
    )
    metrics_public: bool = Field(False, description="/metrics without a token (default: admin scope)")
    s3_allow: list[str] = Field(
        default_factory=list,
        description="s3://bucket/prefix/ a request's s3_uri may name (repeatable); none: S3 inputs are off",
    )
    recheck: bool = Field(False, description="serve the recount page (/recheck) and its API")
    recheck_storage: SecretUrl | None = Field(
        None, description="label store URL (default sqlite in runs/recheck/); PostgreSQL for a team"
    )
    recheck_show_record: bool = Field(
        False, description="show recounters the recorded quantity and the model's answer (biases them)"
    )
    s3_endpoint_url: SecretUrl | None = None
    s3_unsigned: bool = Field(False, description="anonymous S3 reads (public buckets such as ABID)")
    s3_timeout_s: float = Field(10.0, gt=0.0)
    s3_fetch_threads: int = Field(8, ge=1, le=256, description="concurrent S3 reads per process")
    max_fetch_bytes: int = Field(
        256 * 1024 * 1024,
        ge=1024,
        description="bytes of S3 objects held by all requests of a process together; more get 503",
    )

    @model_validator(mode="after")
    def _one_model_source(self) -> ServeConfig:
        if (self.model is None) == (self.registry is None):
            raise ValueError("give either model (an ONNX file) or registry (with alias)")
        return self

    @field_validator("capture_dir")
    @classmethod
    def _a_folder(cls, folder: Path | None) -> Path | None:
        # Checked here, not when the first worker starts: there it would end the server with a traceback.
        if folder is not None and folder.exists() and not folder.is_dir():
            raise ValueError(f"{folder} is a file; give a folder (it is created if missing)")
        return folder

    @field_validator("s3_allow")
    @classmethod
    def _prefixes(cls, prefixes: list[str]) -> list[str]:
        for prefix in prefixes:
            try:
                parse_s3_uri(prefix, allow_prefix=True)
            except BadS3Uri as exc:
                raise ValueError(f"{prefix[:200]!r}: {exc.message}") from None
        return prefixes

    def threads_per_worker(self) -> int:
        return self.threads or max(1, (os.cpu_count() or 1) // self.workers)
