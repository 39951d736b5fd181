"""`binsight export`, `serve`, `token`, `loadtest` and `monitor`: each a library stage called with its
whole config; here only what each prints."""

from __future__ import annotations

import logging
import sys
from typing import Any

from binsight.cliargs import add_command
from binsight.export.onnx import ExportConfig, ExportReport, export
from binsight.monitoring.report import MonitorConfig, MonitorRun, run_monitor
from binsight.serving.auth import IssuedToken, TokenConfig, issue_token
from binsight.serving.config import ServeConfig
from binsight.serving.loadtest import LoadSummary, LoadtestConfig, format_summary, loadtest

log = logging.getLogger("binsight")

# `binsight monitor` exit codes, for cron jobs: 0 no drift (or not asked to fail), 3 drift in the latest
# window, 4 not enough usable captured records to judge, 2 a usage or input error.
EXIT_DRIFT, EXIT_CANNOT_JUDGE = 3, 4


def _report_export(config: ExportConfig, report: ExportReport) -> int:
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


def _serve(config: ServeConfig) -> None:
    from binsight.serving.server import serve

    serve(config)


def _report_token(config: TokenConfig, issued: IssuedToken) -> int:
    scopes = ", ".join(s.value for s in issued.scopes)
    print(f"token for {issued.name} ({scopes}), shown once; keep it secret:")
    print(issued.token)
    print(f"{issued.file}: its sha256 was added; start the server with --tokens-file {issued.file}")
    return 0


def _report_loadtest(config: LoadtestConfig, summary: LoadSummary) -> int:
    print(format_summary(summary))
    return 0 if summary.ok else 1


def _report_monitor(config: MonitorConfig, run: MonitorRun) -> int:
    result = run.result
    if run.skipped:
        print(
            "monitor: skipped "
            + ", ".join(f"{n} ({reason})" for reason, n in sorted(run.skipped.items()))
            + f"; comparing the {result.photos} records of model {run.model_version}"
        )
    summary = result.summary()
    print(
        f"monitor: {summary.photos} captured photos, {len(result.windows)} windows of {result.window}; "
        f"latest: {summary.status}"
        + (f" ({', '.join(summary.drifted_in_latest)})" if summary.drifted_in_latest else "")
        + f"; report in {config.out / 'report.html'}"
    )
    if config.fail_on_drift and result.latest is None:
        print(f"monitor: too few usable records to judge drift (exit {EXIT_CANNOT_JUDGE})", file=sys.stderr)
        return EXIT_CANNOT_JUDGE
    return EXIT_DRIFT if config.fail_on_drift and summary.drifted_in_latest else 0


def register(verbs: Any) -> None:
    add_command(
        verbs,
        "export",
        ExportConfig,
        export,
        _report_export,
        help="checkpoint -> verified ONNX file (optionally int8)",
        positional=("checkpoint",),
        title="export",
    )
    add_command(
        verbs,
        "serve",
        ServeConfig,
        _serve,
        help="HTTP counting endpoint (SageMaker-compatible)",
        title="serving",
    )
    add_command(
        verbs,
        "token",
        TokenConfig,
        issue_token,
        _report_token,
        help="make a bearer token for `binsight serve --tokens-file`",
        positional=("action",),
        title="token",
    )
    add_command(
        verbs,
        "loadtest",
        LoadtestConfig,
        loadtest,
        _report_loadtest,
        help="drive an endpoint and report invocations/min and latency",
        positional=("url",),
        title="load",
    )
    add_command(
        verbs,
        "monitor",
        MonitorConfig,
        run_monitor,
        _report_monitor,
        help="drift of captured traffic against the model's baseline",
        positional=("capture_dir",),
        title="monitoring",
    )
