"""`binsight audit`: which bins' photos disagree with their recorded quantity, most suspicious first.

Every bin gets its count probabilities from the model (a batch run, `batch/run.py`, in one process or
on Ray); bins are ranked by P(record wrong) (`inference.verdict.p_record_wrong`: those probabilities
weighed by how records go wrong, mostly by one), so people re-check from the top of the list for as
long as their budget lasts. With a review budget (a share of bins), exactly that share is flagged,
whatever the verdict policy says, so the list matches the people available; the policy then only
splits flagged bins into mismatch and review.
"""

from __future__ import annotations

import html
import io
import logging
import math
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from binsight.audit.evaluation import AuditEvaluation
from binsight.batch.config import AuditConfig
from binsight.batch.run import BatchRun, read_results
from binsight.card import ModelCard
from binsight.errors import BinsightError
from binsight.imaging import decode_image
from binsight.inference.verdict import MISMATCH, OK, REVIEW
from binsight.reporting.html import HtmlReport, image_data_uri
from binsight.utils.io import atomic_write_bytes
from binsight.utils.reading import read_source
from binsight.utils.records import JsonRecord
from binsight.utils.text import printable, spreadsheet_safe

log = logging.getLogger(__name__)
OUTPUT_FIELDS = (
    "rank",
    "image",
    "recorded_quantity",
    "predicted_count",
    "p_recorded",
    "p_record_wrong",
    "p_value",
    "confidence",
    "verdict",
    "problem",
    "recount",
)


class AuditSummary(JsonRecord):
    """`audit.json`: what the ranked list holds and how it was made."""

    bins: int
    verdicts: dict[str, int]
    model_version: str
    verdict_basis: str
    review_budget: float | None
    rejected_rows: list[dict[str, str]]
    run: BatchRun
    model_card: ModelCard


def rank(results: pa.Table, review_budget: float | None = None) -> pa.Table:
    """Most suspicious first; unreadable photos last (they need a person, but for another reason)."""
    wrong = results.column("p_record_wrong").to_numpy(zero_copy_only=False)
    scored = ~np.isnan(wrong)
    order = np.lexsort((results.column("row").to_numpy(), -np.nan_to_num(wrong, nan=-1.0), ~scored))
    ranked = results.take(pa.array(order))
    verdicts = np.asarray(ranked.column("verdict").to_pylist(), dtype=object)
    if review_budget is not None:
        flagged = math.ceil(review_budget * int(scored.sum()))
        position = np.arange(len(verdicts))
        is_scored = scored[order]
        verdicts[is_scored & (position >= flagged)] = OK
        verdicts[is_scored & (position < flagged) & (verdicts == OK)] = REVIEW
    ranked = ranked.set_column(ranked.schema.get_field_index("verdict"), "verdict", pa.array(verdicts))
    return ranked.append_column("rank", pa.array(np.arange(1, len(order) + 1)))


def _with_recounts(ranked: pa.Table, findings: dict[str, str]) -> pa.Table:
    from binsight.recheck.queue import photo_id_of

    column = [findings.get(photo_id_of(image), "") for image in ranked.column("image").to_pylist()]
    return ranked.append_column("recount", pa.array(column, pa.string()))


def _csv_table(ranked: pa.Table) -> pa.Table:
    unreadable = pc.not_equal(ranked.column("problem"), "")
    columns: dict[str, pa.Array | pa.ChunkedArray] = {}
    for name in OUTPUT_FIELDS:
        column = ranked.column(name)
        if name == "predicted_count":
            column = pc.if_else(unreadable, pa.scalar(None, pa.int64()), column)
        elif pa.types.is_floating(column.type):
            column = pc.round(column, 6)
        elif pa.types.is_string(column.type):  # names and problems come from the manifest's author
            column = pa.array(
                [None if v is None else spreadsheet_safe(v) for v in column.to_pylist()], pa.string()
            )
        columns[name] = column
    return pa.table(columns)


def _thumbnail(source: str, endpoint_url: str | None, unsigned: bool) -> str | None:
    try:
        image = decode_image(read_source(source, endpoint_url, unsigned), 160)
        image.thumbnail((160, 160))
        buffer = io.BytesIO()
        image.save(buffer, "JPEG", quality=80)
        return image_data_uri(buffer.getvalue(), "image/jpeg")
    except (OSError, SyntaxError, ValueError):
        return None


def write_audit(
    out: Path,
    run: BatchRun,
    verdict_basis: str,
    review_budget: float | None = None,
    endpoint_url: str | None = None,
    unsigned: bool = False,
    max_thumbnails: int = 60,
    recounts: dict[str, str] | None = None,
) -> AuditSummary:
    """The ranked list (`audit.csv`), its summary (`audit.json`) and a report of the bins to re-check
    with their photos (`report.html`), from the shards of a finished batch run."""
    results = read_results(out)
    card = ModelCard.model_validate_json((results.schema.metadata or {})[b"binsight.card"])
    ranked = _with_recounts(rank(results, review_budget), recounts or {})
    buffer = io.BytesIO()
    pacsv.write_csv(_csv_table(ranked), buffer, pacsv.WriteOptions(quoting_style="needed"))
    atomic_write_bytes(out / "audit.csv", buffer.getvalue())
    verdicts = Counter(ranked.column("verdict").to_pylist())
    summary = AuditSummary(
        bins=ranked.num_rows,
        verdicts=dict(verdicts),
        model_version=run.model_version,
        verdict_basis=verdict_basis,
        review_budget=review_budget,
        rejected_rows=run.rejected_rows,
        run=run,
        model_card=card,
    )
    summary.write(out / "audit.json")

    report = HtmlReport(f"binsight audit: {ranked.num_rows} bins, model {run.model_version}")
    report.table(["verdict", "bins"], sorted(verdicts.items()))
    report.paragraph(f"Verdicts by {verdict_basis}.")
    if run.rejected_rows:
        report.paragraph(
            f"{len(run.rejected_rows)} rows of the input could not be used; see audit.json.", "warn"
        )
    is_flagged = pc.is_in(ranked.column("verdict"), pa.array([MISMATCH, REVIEW]))
    flagged = ranked.filter(is_flagged).slice(0, max_thumbnails).to_pylist()
    report.heading(f"Bins to re-check, most suspicious first ({len(flagged)} shown)")
    cells = []
    for row in flagged:
        uri = _thumbnail(row["image"], endpoint_url, unsigned)
        picture = f'<img src="{uri}" alt="bin photo">' if uri else "<em>no preview</em>"
        # File names and recorded values come from the user's manifest: escaped, or a hostile name runs
        # script.
        caption = (
            f"#{row['rank']} {row['verdict']}: recorded {row['recorded_quantity']}, photo shows "
            f"{row['predicted_count']} (P(record wrong) {row['p_record_wrong']:.2f})"
            + (f"; {row['recount']}" if row["recount"] else "")
        )
        cells.append(
            f"<figure>{picture}<figcaption>{html.escape(caption)}<br>"
            f"<small>{html.escape(printable(Path(row['image']).name))}</small></figcaption></figure>"
        )
    report.raw('<div class="thumbs">' + "".join(cells) + "</div>")
    report.write(out / "report.html")
    return summary


@dataclass(frozen=True)
class AuditOutcome:
    """`binsight audit`: the ranked list of a run, or, with --evaluate, the simulated-error evaluation."""

    summary: AuditSummary | None = None
    run: BatchRun | None = None
    evaluation: AuditEvaluation | None = None


def audit(config: AuditConfig) -> AuditOutcome:
    from binsight.batch.run import model_file, run_batch
    from binsight.batch.stages import ScorerSettings
    from binsight.inference.runtime import load_counter, model_info
    from binsight.inference.verdict import VerdictSettings

    model, version = model_file(config)
    info = model_info(model, version)
    verdicts = VerdictSettings.model_validate(config.model_dump(include=set(VerdictSettings.model_fields)))
    try:
        policy = verdicts.policy(info.calibration)
    except ValueError as exc:
        raise BinsightError(str(exc)) from None
    log.info("verdicts by %s", policy.basis)
    if config.evaluate:
        from binsight.audit.evaluation import evaluate_audit

        if config.data is None:
            raise BinsightError("--evaluate needs --data (a dataset with splits)")
        counter = load_counter(model, config.threads, version, config.backend, config.precision)
        evaluation = evaluate_audit(
            counter, config.data, config.split, config.out, config.error_rate, config.seed, policy
        )
        return AuditOutcome(evaluation=evaluation)
    if config.source is None:
        raise BinsightError("give the bins to audit (a CSV, or a folder or s3:// prefix in the ABID layout)")
    settings = ScorerSettings(
        config.backend,
        config.precision,
        config.threads,
        version,
        judge=True,
        verdicts=verdicts,
        record_error_rate=config.error_rate,
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
    return AuditOutcome(summary=summary, run=run)
