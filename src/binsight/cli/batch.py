"""`binsight predict` and `binsight audit`: many photos scored in one process or on Ray; each a library
stage called with its whole config (`batch/config.py`); here only what each prints."""

from __future__ import annotations

import logging
from typing import Any

from binsight.audit.audit import AuditOutcome, audit
from binsight.batch.config import AuditConfig, BatchConfig
from binsight.batch.run import BatchRun, predict
from binsight.cliargs import add_command

log = logging.getLogger("binsight")


def _report_predict(config: BatchConfig, run: BatchRun) -> int:
    resumed = f", {run.shards_resumed} resumed" if run.shards_resumed else ""
    print(
        f"predict: {run.photos} photos in {run.shards} Parquet shards{resumed} under {run.out}/shards; "
        f"{run.photos_scored} scored now at {run.photos_per_s:.1f} photos/s ({run.executor}); "
        f"{run.unreadable} unreadable"
    )
    return 0


def _report_audit(config: AuditConfig, outcome: AuditOutcome) -> int:
    if outcome.evaluation is not None:
        result = outcome.evaluation
        print(f"audit evaluation on {result.bins} bins with {result.simulated_errors} simulated errors:")
        for budget, caught in result.caught_at_budget.items():
            print(
                f"  re-check {budget:>4} of bins -> catch {100 * caught.errors_caught:5.1f}% of errors "
                f"(random: {100 * caught.random_review_would_catch:.0f}%)"
            )
        print(f"curve and report in {config.out}")
        return 0
    summary, run = outcome.summary, outcome.run
    assert summary is not None and run is not None
    print(
        f"audit: {summary.bins} bins {summary.verdicts} at {run.photos_per_s:.1f} photos/s "
        f"({run.executor}); ranked list in {config.out / 'audit.csv'}, report in {config.out / 'report.html'}"
    )
    return 0


def register(verbs: Any) -> None:
    add_command(
        verbs,
        "predict",
        BatchConfig,
        predict,
        _report_predict,
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
        audit,
        _report_audit,
        help="flag bins whose photo disagrees with the recorded quantity",
        description="SOURCE: a CSV of image (path or s3://) and recorded_quantity, or a folder or s3:// "
        "prefix in the ABID layout (quantities from metadata/<id>.json). Resumable, and on Ray with --ray.",
        positional=("source",),
        title="audit",
    )
