"""`binsight export`, `serve`, `loadtest` and `monitor`."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from binsight.cliargs import add_command, config_from_args
from binsight.errors import BinsightError
from binsight.serving.auth import Scope, new_token, token_line

log = logging.getLogger("binsight")


def _cmd_export(args: argparse.Namespace) -> int:
    from binsight.export.onnx import export

    config = config_from_args(args, ExportConfig)
    report = export(
        config.checkpoint,
        config.out,
        data=config.data,
        quantize=config.quantize == "int8",
        version=config.version,
    )
    print(
        f"export: {report.onnx} ({report.bytes / 1e6:.1f} MB); ONNX Runtime matches PyTorch within "
        f"{report.max_abs_diff_vs_pytorch:.1e} on {report.verified_on} images; calibrated for "
        f"{', '.join(report.engines) or 'no engine (no validation split)'}"
    )
    if report.int8 is not None:
        q = report.int8
        engines = ", ".join(f"{k} {v:.4f}" for k, v in sorted(q.by_engine.items()))
        print(
            f"int8: {q.onnx} ({q.bytes / 1e6:.1f} MB); validation accuracy {engines} vs "
            f"{q.fp32_accuracy:.4f} in fp32 (cost up to {100 * q.accuracy_cost:+.2f} points); "
            f"serving: {q.serving}"
        )
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    from binsight.serving.config import ServeConfig
    from binsight.serving.server import serve

    serve(config_from_args(args, ServeConfig))
    return 0


class TokenConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    action: Literal["new"] = Field("new", description="new: make a token and add its hash to the file")
    name: str = Field(description="who holds it (shown in logs and errors), e.g. camera-7")
    scopes: list[Scope] = Field(
        default_factory=lambda: [Scope.INVOKE], description="invoke, admin, recheck (comma-separated)"
    )
    file: Path = Field(Path("tokens.txt"), description="tokens file to append to (created 0600)")


def _cmd_token(args: argparse.Namespace) -> int:
    config = config_from_args(args, TokenConfig)
    token = new_token()
    line = token_line(config.name, config.scopes, token)
    existing = config.file.read_text(encoding="utf-8") if config.file.exists() else ""
    if any(part.split()[:1] == [config.name] for part in existing.splitlines()):
        raise BinsightError(f"{config.file} already has a token named {config.name!r}")
    descriptor = os.open(config.file, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    with os.fdopen(descriptor, "a", encoding="utf-8") as out:
        out.write(("" if not existing or existing.endswith("\n") else "\n") + line + "\n")
    print(
        f"token for {config.name} ({', '.join(s.value for s in config.scopes)}), shown once; keep it secret:"
    )
    print(token)
    print(f"{config.file}: its sha256 was added; start the server with --tokens-file {config.file}")
    return 0


def _cmd_loadtest(args: argparse.Namespace) -> int:
    import asyncio

    from binsight.serving.loadtest import format_summary, run_load

    config = config_from_args(args, LoadtestConfig)
    folder = config.images
    files = sorted(folder.glob("*.jpg"))[: config.max_images] if folder.is_dir() else [folder]
    if not files or not files[0].is_file():
        raise BinsightError(f"no .jpg images at {folder}", hint="point --images at a folder of bin photos")
    bodies = [f.read_bytes() for f in files]
    result = asyncio.run(
        run_load(config.url, bodies, config.duration, config.concurrency, config.rate, poisson=config.poisson)
    )
    summary = result.summary()
    print(format_summary(summary))
    return 0 if summary["ok"] else 1


# `binsight monitor` exit codes, for cron jobs: 0 no drift (or not asked to fail), 3 drift in the latest
# window, 4 not enough usable captured records to judge, 2 a usage or input error.
EXIT_DRIFT, EXIT_CANNOT_JUDGE = 3, 4


def _cmd_monitor(args: argparse.Namespace) -> int:
    from binsight.inference.runtime import load_counter
    from binsight.monitoring.baseline import Baseline
    from binsight.monitoring.report import monitor, read_capture, write_report

    config = config_from_args(args, MonitorConfig)
    counter = load_counter(config.model, backend="onnxruntime")
    if not counter.info.baseline:
        raise BinsightError(
            f"{config.model} has no monitoring baseline", hint="export it again with this binsight version"
        )
    baseline = Baseline.from_json(counter.info.baseline)
    capture = read_capture(
        config.capture_dir,
        tuple(counter.info.classes),
        counter.info.version,
        tuple(name for name in baseline.scalars if name != "confidence"),
        baseline.embeddings.shape[1],
    )
    seen = capture.seen
    if capture.skipped:
        print(
            "monitor: skipped "
            + ", ".join(f"{n} ({reason})" for reason, n in sorted(capture.skipped.items()))
            + f"; comparing the {len(seen)} records of model {counter.info.version}"
        )
    result = monitor(baseline, seen, config.window, config.alpha)
    out = config.out
    write_report(result, baseline, seen, out)
    summary = result.as_dict()
    print(
        f"monitor: {summary['photos']} captured photos, {len(result.windows)} windows of {result.window}; "
        f"latest: {summary['status']}"
        + (f" ({', '.join(summary['drifted_in_latest'])})" if summary["drifted_in_latest"] else "")
        + f"; report in {out / 'report.html'}"
    )
    if config.fail_on_drift and result.latest is None:
        print(f"monitor: too few usable records to judge drift (exit {EXIT_CANNOT_JUDGE})", file=sys.stderr)
        return EXIT_CANNOT_JUDGE
    return EXIT_DRIFT if config.fail_on_drift and summary["drifted_in_latest"] else 0


class ExportConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    checkpoint: Path = Field(description="best.pt of a training run")
    out: Path = Field(description="ONNX file to write")
    data: Path | None = Field(
        None, description="dataset for verification and calibration (default: trained on)"
    )
    quantize: Literal["int8"] | None = Field(None, description="also write MODEL.int8.onnx")
    version: str | None = Field(None, description="version string stored in the file")


class LoadtestConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    url: str = Field(description="e.g. http://127.0.0.1:8080/invocations")
    images: Path = Field(description="folder of .jpg bin photos (or one file)")
    duration: float = Field(30.0, gt=0.0, description="seconds")
    concurrency: int = Field(8, ge=1, description="clients in flight (closed loop)")
    rate: float | None = Field(None, gt=0.0, description="requests/s (open loop) instead")
    poisson: bool = Field(False, description="open loop: independent callers (exponential gaps)")
    max_images: int = Field(200, ge=1, description="photos read from --images at most")


class MonitorConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    capture_dir: Path = Field(description="the server's --capture-dir")
    model: Path = Field(description="the served ONNX file (it holds the baseline)")
    out: Path = Field(Path("runs/monitor"), description="output folder")
    window: int = Field(200, ge=10, description="photos per window")
    alpha: float = Field(
        0.01, gt=0.0, lt=1.0, description="chance that a window like the baseline raises an alarm"
    )
    fail_on_drift: bool = Field(
        False, description="exit 3 when the latest window drifted, 4 when too few records to judge"
    )


def register(verbs: Any) -> None:
    add_command(
        verbs,
        "export",
        ExportConfig,
        _cmd_export,
        help="checkpoint -> verified ONNX file (optionally int8)",
        positional=("checkpoint",),
        title="export",
    )

    from binsight.serving.config import ServeConfig

    add_command(
        verbs,
        "serve",
        ServeConfig,
        _cmd_serve,
        help="HTTP counting endpoint (SageMaker-compatible)",
        title="serving",
    )

    add_command(
        verbs,
        "token",
        TokenConfig,
        _cmd_token,
        help="make a bearer token for `binsight serve --tokens-file`",
        positional=("action",),
        title="token",
    )

    add_command(
        verbs,
        "loadtest",
        LoadtestConfig,
        _cmd_loadtest,
        help="drive an endpoint and report invocations/min and latency",
        positional=("url",),
        title="load",
    )

    add_command(
        verbs,
        "monitor",
        MonitorConfig,
        _cmd_monitor,
        help="drift of captured traffic against the model's baseline",
        positional=("capture_dir",),
        title="monitoring",
    )
