"""Settings of `binsight predict` and `binsight audit`: one typed model each, from which the command
line is generated (`cliargs.py`)."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, model_validator

from binsight.inference.engines import Backend, EnginePrecision
from binsight.inference.verdict import RECORD_ERROR_RATE, VerdictSettings
from binsight.utils.redact import SecretUrl


class BatchConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    source: str | None = Field(
        None,
        description="photos: a manifest (.csv with an image column, or .txt of one image per line; local "
        "or s3://), a folder, or an s3://bucket/prefix/",
    )
    out: Path = Field(Path("runs/predict"), description="output folder (Parquet shards, summary)")
    model: Path | None = Field(None, description="ONNX model file from `binsight export`")
    registry: str | None = Field(None, description="or a model registry (folder or s3://), with --alias")
    alias: str = Field("production", description="registry alias to use")
    ray: str | None = Field(
        None,
        description="run on Ray: 'auto' (the cluster in RAY_ADDRESS, else a local one) or a cluster "
        "address; without it, one process",
    )
    replicas: int = Field(1, ge=1, description="Ray: model replicas (actors)")
    replica_cpus: int = Field(1, ge=1, description="Ray: CPUs (inference threads) per model replica")
    decode_cpus: float = Field(1.0, gt=0.0, description="Ray: CPUs per decode task")
    threads: int | None = Field(
        None, ge=1, description="inference threads per model (default: all cores; on Ray, --replica-cpus)"
    )
    batch_size: int = Field(32, ge=1, le=1024, description="photos per model call")
    shard_size: int = Field(4096, ge=1, description="photos per Parquet shard (the unit of resumption)")
    fetch_threads: int = Field(16, ge=1, le=256, description="concurrent reads per decode task")
    backend: Backend = Field("auto", description="auto, onnxruntime or openvino")
    precision: EnginePrecision = Field(
        "auto", description="auto, fp32 or bf16; an int8 model file runs in int8"
    )
    s3_endpoint_url: SecretUrl | None = Field(None, description="S3-compatible endpoint (default AWS)")
    s3_unsigned: bool = Field(False, description="read S3 anonymously (public buckets such as ABID's)")
    restart: bool = Field(False, description="discard results of an earlier run in --out and start over")
    allow_roots: list[str] = Field(
        default_factory=list,
        description="a manifest on S3 names only objects under its own folder; these S3 prefixes or "
        "local folders too",
    )
    max_image_bytes: int = Field(16 * 1024 * 1024, ge=1024, description="bytes per photo, at most")
    max_image_pixels: int = Field(40_000_000, ge=1, description="pixels per photo (from its header), at most")

    @model_validator(mode="after")
    def _one_model(self) -> BatchConfig:
        if (self.model is None) == (self.registry is None):
            raise ValueError("give either --model FILE.onnx or --registry URL (with --alias)")
        return self


class AuditConfig(BatchConfig, VerdictSettings):
    out: Path = Field(Path("runs/audit"), description="output folder (ranked audit.csv, report.html, shards)")
    review_budget: float | None = Field(
        None, gt=0.0, le=1.0, description="flag exactly this share of bins, the most suspicious (e.g. 0.1)"
    )
    evaluate: bool = Field(False, description="simulate inventory errors on labelled data (with --data)")
    data: Path | None = Field(None, description="dataset with splits (for --evaluate)")
    split: str = Field("test", description="split to evaluate on")
    error_rate: float = Field(
        RECORD_ERROR_RATE,
        gt=0.0,
        lt=1.0,
        description="share of records that are wrong: with --evaluate, the share corrupted; otherwise the "
        "prior that scales p_record_wrong (the order of the bins does not depend on it)",
    )
    seed: int = Field(0, description="--evaluate: seed of the simulated errors")
    recheck_storage: SecretUrl | None = Field(
        None, description="label store whose recounts of these bins the report shows (`binsight recheck`)"
    )
