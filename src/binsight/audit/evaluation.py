"""Evaluating the audit on labelled data: corrupt a known fraction of records the way inventory goes
wrong (off by one or two) and measure the share of corrupted records caught at review budgets of 5,
10 and 20% of bins, and, for calibrated models, the observed false-alarm rate against the level.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from pathlib import Path

import numpy as np
from pydantic import BaseModel

from binsight.batch.run import score_photos
from binsight.inference.runtime import LoadedModel
from binsight.inference.verdict import (
    MISMATCH,
    ConformalPolicy,
    VerdictPolicy,
    VerdictThresholds,
    judge,
)
from binsight.reporting.html import HtmlReport
from binsight.utils.records import JsonRecord

# Shares of the bins people re-check, at which the catch rate is reported.
BUDGETS = (0.05, 0.10, 0.20)


def simulate_errors(
    true_counts: np.ndarray, error_rate: float, num_classes: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Recorded counts with a fraction corrupted as inventory goes wrong: mostly off by one, sometimes
    by two, within the counts the model knows. Returns (recorded, is_error)."""
    rng = np.random.default_rng(seed)
    recorded = true_counts.copy()
    is_error = np.zeros(len(true_counts), dtype=bool)
    chosen = rng.choice(len(true_counts), size=round(error_rate * len(true_counts)), replace=False)
    for i in chosen:
        step = int(rng.choice([1, 1, 1, 2])) * int(rng.choice([-1, 1]))
        new = true_counts[i] + step
        if not 0 <= new < num_classes:
            new = true_counts[i] - step
        recorded[i], is_error[i] = new, True
    return recorded, is_error


def catch_curve(scores: np.ndarray, is_error: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Share of true errors caught when reviewing the top-k bins by score, for every k."""
    order = np.argsort(-scores, kind="stable")
    caught = np.cumsum(is_error[order]) / max(1, is_error.sum())
    fraction = np.arange(1, len(scores) + 1) / len(scores)
    return fraction, caught


ALPHA_GRID = (0.01, 0.02, 0.05, 0.1, 0.15, 0.2, 0.3)


class BudgetCatch(BaseModel):
    bins_reviewed: int
    errors_caught: float  # share of the simulated errors among the most suspicious bins reviewed
    random_review_would_catch: float


class FalseAlarms(BaseModel):
    mismatch: float  # share of correct records called mismatch
    review_or_mismatch: float | None


class ConformalCheck(BaseModel):
    """Observed false-alarm rate on correct records at each level, against the level (the guarantee),
    and the size of the prediction sets."""

    alpha: float
    review_alpha: float | None
    calibration_photos_per_count: dict[str, int]
    false_alarm_rate_by_alpha: dict[str, float | None]
    mean_set_size: float
    set_size_counts: dict[str, int]


class AuditEvaluation(JsonRecord):
    """`audit_evaluation.json`: how many simulated record errors the ranking and the verdicts catch."""

    split: str
    bins: int
    simulated_errors: int
    error_rate: float
    seed: int
    model_version: str
    caught_at_budget: dict[str, BudgetCatch]
    verdicts: dict[str, int]
    flagged_share: float
    flagged_recall: float | None
    flagged_precision: float | None
    verdict_basis: str
    false_alarm_rate: FalseAlarms
    conformal: ConformalCheck | None = None


def conformal_summary(
    policy: ConformalPolicy, probabilities: np.ndarray, recorded: np.ndarray, correct: np.ndarray
) -> ConformalCheck:
    calibration = policy.calibration
    p_values = np.array(
        [calibration.p_value(p, int(r)) for p, r in zip(probabilities, recorded, strict=True)]
    )
    observed = {
        f"{alpha:g}": float((p_values[correct] <= alpha).mean()) if correct.any() else None
        for alpha in ALPHA_GRID
    }
    set_sizes = [len(calibration.prediction_set(p, policy.alpha)) for p in probabilities]
    return ConformalCheck(
        alpha=policy.alpha,
        review_alpha=policy.review_alpha,
        calibration_photos_per_count=calibration.sizes(),
        false_alarm_rate_by_alpha=observed,
        mean_set_size=float(np.mean(set_sizes)),
        set_size_counts={str(k): int(v) for k, v in sorted(Counter(set_sizes).items())},
    )


def conformal_plot(false_alarm_rate_by_alpha: Mapping[str, float | None], path: Path) -> None:
    import matplotlib.pyplot as plt

    from binsight.utils.plots import save_figure

    levels = [float(a) for a in false_alarm_rate_by_alpha]
    observed = [float("nan") if v is None else v for v in false_alarm_rate_by_alpha.values()]
    fig, ax = plt.subplots(figsize=(4.5, 4))
    ax.plot([0, max(levels)], [0, max(levels)], "--", color="grey", label="guarantee (at most alpha)")
    ax.plot(levels, observed, "o-", label="observed on correct records")
    ax.set_xlabel("alpha")
    ax.set_ylabel("correct records flagged")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left")
    save_figure(fig, path)


def evaluate_audit(
    counter: LoadedModel,
    data_dir: Path,
    split: str,
    out: Path,
    error_rate: float = 0.1,
    seed: int = 0,
    policy: VerdictPolicy | None = None,
) -> AuditEvaluation:
    """Score a labelled split, corrupt `error_rate` of its records, and write what the ranking and the
    verdicts catch to OUT (`audit_evaluation.json`, `catch_curve.png`, `report.html`)."""
    from binsight.data.split import load_split

    rows = load_split(data_dir, split)
    truth = np.array([int(r["count"]) for r in rows])
    probabilities, problems = score_photos(counter, [str(data_dir / r["image"]) for r in rows])
    usable = np.array([p is None for p in problems])
    probabilities, truth = probabilities[usable], truth[usable]
    recorded, is_error = simulate_errors(truth, error_rate, len(counter.info.classes), seed)
    policy = policy or VerdictThresholds()
    judged = [judge(p, int(r), policy, error_rate) for p, r in zip(probabilities, recorded, strict=True)]
    scores = np.array([j.p_record_wrong for j in judged])
    fraction, caught = catch_curve(scores, is_error)
    reviewed = {budget: max(1, round(budget * len(scores))) for budget in BUDGETS}
    verdicts = [j.verdict for j in judged]
    flagged = np.array([v != "ok" for v in verdicts])
    correct = ~is_error
    result = AuditEvaluation(
        split=split,
        bins=len(scores),
        simulated_errors=int(is_error.sum()),
        error_rate=error_rate,
        seed=seed,
        model_version=counter.info.version,
        caught_at_budget={
            f"{int(budget * 100)}%": BudgetCatch(
                bins_reviewed=k, errors_caught=float(caught[k - 1]), random_review_would_catch=budget
            )
            for budget, k in reviewed.items()
        },
        verdicts=dict(Counter(verdicts)),
        flagged_share=float(flagged.mean()),
        flagged_recall=float(flagged[is_error].mean()) if is_error.any() else None,
        flagged_precision=float(is_error[flagged].mean()) if flagged.any() else None,
        verdict_basis=policy.basis,
        false_alarm_rate=FalseAlarms(
            mismatch=float(np.mean([v == MISMATCH for v, c in zip(verdicts, correct, strict=True) if c])),
            review_or_mismatch=float(flagged[correct].mean()) if correct.any() else None,
        ),
        conformal=conformal_summary(policy, probabilities, recorded, correct)
        if isinstance(policy, ConformalPolicy)
        else None,
    )
    out.mkdir(parents=True, exist_ok=True)
    result.write(out / "audit_evaluation.json")
    catch_curve_plot(fraction, caught, reviewed, result, out / "catch_curve.png")
    write_report(result, out)
    return result


def catch_curve_plot(
    fraction: np.ndarray,
    caught: np.ndarray,
    reviewed: Mapping[float, int],
    result: AuditEvaluation,
    path: Path,
) -> None:
    import matplotlib.pyplot as plt

    from binsight.utils.plots import save_figure

    fig, ax = plt.subplots(figsize=(5.5, 4))
    ax.plot(100 * fraction, 100 * caught, label=f"binsight ({result.model_version})")
    ax.plot([0, 100], [0, 100], "--", color="grey", label="random review")
    for budget, k in reviewed.items():
        ax.plot(100 * budget, 100 * caught[k - 1], "o", color="C3")
        ax.annotate(
            f"{100 * caught[k - 1]:.0f}%",
            (100 * budget, 100 * caught[k - 1]),
            textcoords="offset points",
            xytext=(5, -12),
        )
    ax.set_xlabel("bins re-checked (%)")
    ax.set_ylabel("inventory errors caught (%)")
    ax.set_title(f"{result.simulated_errors} simulated errors in {result.bins} bins")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    save_figure(fig, path)


def write_report(result: AuditEvaluation, out: Path) -> None:
    """`report.html` beside the catch curve (and the calibration plot of a conformal policy)."""
    report = HtmlReport(
        f"binsight audit evaluation: {result.split} split, {100 * result.error_rate:.0f}% simulated errors"
    )
    report.table(
        ["review budget", "bins re-checked", "errors caught", "random review"],
        [
            (
                k,
                v.bins_reviewed,
                f"{100 * v.errors_caught:.1f}%",
                f"{100 * v.random_review_would_catch:.0f}%",
            )
            for k, v in result.caught_at_budget.items()
        ],
    )
    report.figure(out / "catch_curve.png", "Share of inventory errors caught vs bins re-checked")
    report.paragraph(
        f"Verdicts by {result.verdict_basis}: {100 * result.flagged_share:.1f}% of bins flagged, catching "
        f"{100 * (result.flagged_recall or 0):.1f}% of errors; "
        f"{100 * result.false_alarm_rate.mismatch:.1f}% of correct records called mismatch."
    )
    if result.conformal is not None:
        conformal_plot(result.conformal.false_alarm_rate_by_alpha, out / "calibration.png")
        report.figure(
            out / "calibration.png",
            "Correct records flagged vs the level alpha (the guarantee: on or under the diagonal)",
        )
    report.write(out / "report.html")
