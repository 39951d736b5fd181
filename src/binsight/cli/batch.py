"""`binsight predict` and `binsight audit`: many photos scored in one process or on Ray.

Both commands are generated from their config models (`batch/config.py`).
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

from binsight.batch.config import AuditConfig, BatchConfig
from binsight.cliargs import add_command, config_from_args
from binsight.errors import BinsightError

log = logging.getLogger("binsight")


def _model_file(config: BatchConfig) -> tuple[Path, str | None]:
    """The ONNX file to run, and the registry version name when it came from one."""
    if config.model is not None:
        return config.model, None
    from binsight.registry import fetch_alias

    assert config.registry is not None  # the config validator allows exactly one source
    return fetch_alias(config.registry, config.alias, None, config.s3_endpoint_url)


def _cmd_predict(args: argparse.Namespace) -> int:
    from binsight.batch.run import run_batch
    from binsight.batch.stages import ScorerSettings

    config = config_from_args(args, BatchConfig)
    model, version = _model_file(config)
    settings = ScorerSettings(config.backend, config.precision, config.threads, version)
    run = run_batch(config, model, settings)
    resumed = f", {run.shards_resumed} resumed" if run.shards_resumed else ""
    print(
        f"predict: {run.photos} photos in {run.shards} Parquet shards{resumed} under {run.out}/shards; "
        f"{run.photos_scored} scored now at {run.photos_per_s:.1f} photos/s ({run.executor}); "
        f"{run.unreadable} unreadable"
    )
    return 0


def _cmd_audit(args: argparse.Namespace) -> int:
    from binsight.batch.stages import ScorerSettings
    from binsight.inference.runtime import model_info
    from binsight.inference.verdict import VerdictSettings

    config = config_from_args(args, AuditConfig)
    model, version = _model_file(config)
    info = model_info(model, version)
    verdicts = VerdictSettings.model_validate(config.model_dump(include=set(VerdictSettings.model_fields)))
    try:
        policy = verdicts.policy(info.calibration)
    except ValueError as exc:
        raise BinsightError(str(exc)) from None
    log.info("verdicts by %s", policy.basis)
    if config.evaluate:
        return _evaluate(config, model, version, policy)
    if config.source is None:
        raise BinsightError("give the bins to audit (a CSV, or a folder or s3:// prefix in the ABID layout)")
    from binsight.audit.audit import write_audit
    from binsight.batch.run import run_batch

    settings = ScorerSettings(
        config.backend,
        config.precision,
        config.threads,
        version,
        judge=True,
        verdicts=verdicts,
    )
    run = run_batch(config, model, settings)
    findings = None
    if config.recheck_storage:
        from binsight.recheck.resolve import recount_findings
        from binsight.recheck.store import LabelStore

        findings = recount_findings(LabelStore(config.recheck_storage), f"audit:{config.out.name}")
    summary = write_audit(
        config.out,
        run,
        policy.basis,
        config.review_budget,
        config.s3_endpoint_url,
        config.s3_unsigned,
        recounts=findings,
    )
    print(
        f"audit: {summary.bins} bins {summary.verdicts} at {run.photos_per_s:.1f} photos/s "
        f"({run.executor}); ranked list in {config.out / 'audit.csv'}, report in {config.out / 'report.html'}"
    )
    return 0


def _evaluate(config: AuditConfig, model: Path, version: str | None, policy: Any) -> int:
    from binsight.audit.evaluation import evaluate_audit
    from binsight.inference.runtime import load_counter

    if config.data is None:
        raise BinsightError("--evaluate needs --data (a dataset with splits)")
    counter = load_counter(model, config.threads, version, config.backend, config.precision)
    result = evaluate_audit(
        counter, config.data, config.split, config.out, config.error_rate, config.seed, policy
    )
    print(f"audit evaluation on {result['bins']} bins with {result['simulated_errors']} simulated errors:")
    for budget, caught in result["caught_at_budget"].items():
        print(
            f"  re-check {budget:>4} of bins -> catch {100 * caught['errors_caught']:5.1f}% of errors "
            f"(random: {100 * caught['random_review_would_catch']:.0f}%)"
        )
    print(f"curve and report in {config.out}")
    return 0


def register(verbs: Any) -> None:
    add_command(
        verbs,
        "predict",
        BatchConfig,
        _cmd_predict,
        help="count the objects in many photos (a manifest, folder or S3 prefix) into Parquet shards",
        description="Resumable: run the same command again after a crash and finished shards are kept. "
        "--ray auto runs the decoding as Ray tasks and the model as a pool of actors.",
        positional=("source",),
        title="batch",
    )
    add_command(
        verbs,
        "audit",
        AuditConfig,
        _cmd_audit,
        help="flag bins whose photo disagrees with the recorded quantity",
        description="SOURCE: a CSV of image (path or s3://) and recorded_quantity, or a folder or s3:// "
        "prefix in the ABID layout (quantities from metadata/<id>.json). Resumable, and on Ray with --ray.",
        positional=("source",),
        title="audit",
    )
