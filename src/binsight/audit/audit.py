"""`binsight audit`: which bins' photos disagree with their recorded quantity, most suspicious first.

Every bin gets P(count == recorded) from the model; bins are ranked by 1 - P, the model's belief that
the record is wrong, so people re-check from the top of the list for as long as their budget lasts.
The evaluation mode measures that trade on labelled data: it corrupts a known fraction of records
the way inventory goes wrong (off by one or two), and reports the share of corrupted records caught
at review budgets of 5, 10 and 20% of bins.
"""

from __future__ import annotations

import html
import io
import logging
import math
import os
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from binsight.audit.verdict import (
    MISMATCH,
    OK,
    REVIEW,
    ConformalPolicy,
    VerdictPolicy,
    VerdictThresholds,
    judge,
    p_of_count,
)
from binsight.errors import BinsightError
from binsight.imaging import decode_image, to_model_input
from binsight.reporting.html import HtmlReport, image_data_uri
from binsight.serving.runtime import LoadedModel
from binsight.utils.io import atomic_write_csv, atomic_write_json, read_csv
from binsight.utils.progress import bar
from binsight.utils.s3 import BadS3Uri, parse_s3_uri, s3_client

log = logging.getLogger(__name__)

IMAGE_COLUMNS = ("image", "image_path", "path", "s3_uri", "uri")
QUANTITY_COLUMNS = ("recorded_quantity", "recorded", "quantity", "expected_quantity", "expected_count")
BUDGETS = (0.05, 0.10, 0.20)
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
)


@dataclass(frozen=True)
class BinEntry:
    image: str
    recorded: int


def read_bins(path: Path) -> tuple[list[BinEntry], list[dict[str, str]]]:
    """Rows of an audit CSV, and the rows that could not be used (with the reason)."""
    if not path.is_file():
        raise BinsightError(f"no audit file at {path}")
    rows = read_csv(path)
    if not rows:
        raise BinsightError(f"{path} has no rows")
    columns = set(rows[0])
    image_column = next((c for c in IMAGE_COLUMNS if c in columns), None)
    quantity_column = next((c for c in QUANTITY_COLUMNS if c in columns), None)
    if image_column is None or quantity_column is None:
        raise BinsightError(
            f"{path} needs an image column ({' or '.join(IMAGE_COLUMNS)}) and a quantity column "
            f"({' or '.join(QUANTITY_COLUMNS)}); it has {sorted(columns)}"
        )
    bins, rejected = [], []
    for line, row in enumerate(rows, start=2):
        image, quantity = (row.get(image_column) or "").strip(), (row.get(quantity_column) or "").strip()
        if not image or not (quantity.isascii() and quantity.isdigit() and len(quantity) <= 9):
            rejected.append({"line": str(line), "image": image, "problem": f"bad row: quantity {quantity!r}"})
            continue
        if not image.startswith("s3://") and not Path(image).is_absolute():
            image = str(path.parent / image)  # relative to the CSV, as a person writing it expects
        bins.append(BinEntry(image, int(quantity)))
    if not bins:
        examples = "; ".join(f"line {r['line']}: {r['problem']}" for r in rejected[:3])
        raise BinsightError(
            f"none of the {len(rejected)} rows of {path} can be audited ({examples})",
            hint=f"each row needs an image and a whole-number {quantity_column}",
        )
    return bins, rejected


class ImageLoader:
    """Reads local files and s3:// objects (anonymously if asked), for a thread pool."""

    def __init__(self, s3_endpoint_url: str | None = None, s3_unsigned: bool = False) -> None:
        self.endpoint, self.unsigned = s3_endpoint_url, s3_unsigned
        self._client: Any = None

    def __call__(self, source: str) -> bytes:
        if not source.startswith("s3://"):
            return Path(source).read_bytes()
        from botocore.exceptions import BotoCoreError, ClientError

        if self._client is None:
            self._client = s3_client(self.endpoint, unsigned=self.unsigned)
        try:
            location = parse_s3_uri(source)
        except BadS3Uri as exc:
            raise OSError(str(exc)) from None
        bucket, key = location.bucket, location.key
        try:
            return self._client.get_object(Bucket=bucket, Key=key)["Body"].read()
        except (ClientError, BotoCoreError) as exc:
            raise OSError(f"cannot fetch {source}: {exc}") from None


def predict_sources(
    counter: LoadedModel,
    sources: list[str],
    loader: ImageLoader,
    batch_size: int = 32,
    workers: int | None = None,
) -> tuple[np.ndarray, list[str | None]]:
    """Probabilities for each source (NaN rows where the image could not be read) and the problems."""
    info = counter.info
    probabilities = np.full((len(sources), len(info.classes)), np.nan)
    problems: list[str | None] = [None] * len(sources)

    def prepare(index: int) -> np.ndarray | None:
        try:
            image = decode_image(loader(sources[index]), info.input_hw)
            return to_model_input(image, info.input_hw, info.mean, info.std)
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
            problems[index] = f"unreadable image: {exc}"
            return None

    with (
        ThreadPoolExecutor(workers or min(8, 2 * (os.cpu_count() or 1))) as pool,
        bar(len(sources), "auditing", unit="bin") as progress,
    ):
        for start in range(0, len(sources), batch_size):
            indices = list(range(start, min(start + batch_size, len(sources))))
            prepared = list(pool.map(prepare, indices))
            good = [i for i, x in zip(indices, prepared, strict=True) if x is not None]
            if good:
                batch = np.stack([x for x in prepared if x is not None])
                probabilities[good] = counter.predict(batch)
            progress.update(len(indices))
    return probabilities, problems


def audit(
    counter: LoadedModel,
    bins: list[BinEntry],
    policy: VerdictPolicy,
    loader: ImageLoader,
    batch_size: int = 32,
    review_budget: float | None = None,
) -> list[dict[str, Any]]:
    """Judge every bin and rank by P(record wrong). With `review_budget` (a share of bins), exactly the
    most suspicious share is flagged, whatever the policy says, so the list matches the people
    available to re-check it; the policy then only splits flagged bins into mismatch and review."""
    probabilities, problems = predict_sources(counter, [b.image for b in bins], loader, batch_size)
    results = []
    for entry, probs, problem in zip(bins, probabilities, problems, strict=True):
        if problem is not None:
            results.append(
                {
                    "image": entry.image,
                    "recorded_quantity": entry.recorded,
                    "verdict": "error",
                    "problem": problem,
                    "p_record_wrong": None,
                }
            )
            continue
        verdict = judge(probs, entry.recorded, policy)
        results.append(
            {
                "image": entry.image,
                "recorded_quantity": entry.recorded,
                "predicted_count": int(counter.info.classes[verdict.predicted_count]),
                "p_recorded": round(verdict.p_expected, 6),
                "p_record_wrong": round(1 - verdict.p_expected, 6),
                "p_value": "" if verdict.p_value is None else round(verdict.p_value, 6),
                "confidence": round(float(probs.max()), 6),
                "verdict": verdict.verdict,
                "problem": "",
            }
        )
    # Most suspicious first; unreadable photos go last (they need a person, but for another reason).
    results.sort(key=lambda r: -1.0 if r["p_record_wrong"] is None else r["p_record_wrong"], reverse=True)
    scored = [row for row in results if row["p_record_wrong"] is not None]
    if review_budget is not None:
        flagged = math.ceil(review_budget * len(scored))
        for position, row in enumerate(scored):
            if position >= flagged:
                row["verdict"] = OK
            elif row["verdict"] == OK:
                row["verdict"] = REVIEW
    for rank, row in enumerate(results, start=1):
        row["rank"] = rank
    return results


def _thumbnail(source: str, loader: ImageLoader) -> str | None:
    try:
        image = decode_image(loader(source), 160)
        image.thumbnail((160, 160))
        buffer = io.BytesIO()
        image.save(buffer, "JPEG", quality=80)
        return image_data_uri(buffer.getvalue(), "image/jpeg")
    except (OSError, SyntaxError, ValueError):
        return None


def write_audit(
    results: list[dict[str, Any]],
    rejected: list[dict[str, str]],
    out: Path,
    counter: LoadedModel,
    loader: ImageLoader,
    max_thumbnails: int = 60,
) -> dict[str, Any]:
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_csv(out / "audit.csv", results, OUTPUT_FIELDS)
    verdicts = Counter(r["verdict"] for r in results)
    summary = {
        "bins": len(results),
        "verdicts": dict(verdicts),
        "rejected_rows": rejected,
        "model_version": counter.info.version,
    }
    atomic_write_json(out / "audit.json", summary)

    report = HtmlReport(f"binsight audit: {len(results)} bins, model {counter.info.version}")
    report.table(["verdict", "bins"], sorted(verdicts.items()))
    if rejected:
        report.paragraph(f"{len(rejected)} rows of the input could not be used; see audit.json.", "warn")
    flagged = [r for r in results if r["verdict"] in {MISMATCH, REVIEW}][:max_thumbnails]
    report.heading(f"Bins to re-check, most suspicious first ({len(flagged)} shown)")
    cells = []
    for row in flagged:
        uri = _thumbnail(row["image"], loader)
        picture = f'<img src="{uri}" alt="bin photo">' if uri else "<em>no preview</em>"
        # File names and recorded values come from the user's CSV: escaped, or a hostile name runs script.
        caption = (
            f"#{row['rank']} {row['verdict']}: recorded {row['recorded_quantity']}, photo shows "
            f"{row['predicted_count']} (P(record right) {row['p_recorded']:.2f})"
        )
        cells.append(
            f"<figure>{picture}<figcaption>{html.escape(caption)}<br>"
            f"<small>{html.escape(Path(row['image']).name)}</small></figcaption></figure>"
        )
    report.raw('<div class="thumbs">' + "".join(cells) + "</div>")
    report.write(out / "report.html")
    return summary


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


def conformal_summary(
    policy: ConformalPolicy, probabilities: np.ndarray, recorded: np.ndarray, correct: np.ndarray
) -> dict[str, Any]:
    """Observed false-alarm rate on correct records at each level, against the level (the guarantee),
    and the size of the prediction sets."""
    calibration = policy.calibration
    p_values = np.array(
        [calibration.p_value(p, int(r)) for p, r in zip(probabilities, recorded, strict=True)]
    )
    observed = {
        f"{alpha:g}": float((p_values[correct] <= alpha).mean()) if correct.any() else None
        for alpha in ALPHA_GRID
    }
    set_sizes = [len(calibration.prediction_set(p, policy.alpha)) for p in probabilities]
    return {
        "alpha": policy.alpha,
        "review_alpha": policy.review_alpha,
        "calibration_photos_per_count": calibration.sizes(),
        "false_alarm_rate_by_alpha": observed,
        "mean_set_size": float(np.mean(set_sizes)),
        "set_size_counts": {str(k): int(v) for k, v in sorted(Counter(set_sizes).items())},
    }


def conformal_plot(summary: dict[str, Any], path: Path) -> None:
    import matplotlib.pyplot as plt

    from binsight.utils.plots import save_figure

    levels = [float(a) for a in summary["false_alarm_rate_by_alpha"]]
    observed = [v for v in summary["false_alarm_rate_by_alpha"].values()]
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
) -> dict[str, Any]:
    from binsight.training.data import load_split
    from binsight.utils.plots import save_figure

    rows = load_split(data_dir, split)
    truth = np.array([int(r["count"]) for r in rows])
    probabilities, problems = predict_sources(
        counter, [str(data_dir / r["image"]) for r in rows], ImageLoader()
    )
    usable = np.array([p is None for p in problems])
    probabilities, truth = probabilities[usable], truth[usable]
    num_classes = len(counter.info.classes)
    recorded, is_error = simulate_errors(truth, error_rate, num_classes, seed)
    scores = np.array([1 - p_of_count(p, int(r)) for p, r in zip(probabilities, recorded, strict=True)])
    fraction, caught = catch_curve(scores, is_error)
    reviewed = {budget: max(1, round(budget * len(scores))) for budget in BUDGETS}
    at_budget = {}
    for budget, k in reviewed.items():
        at_budget[f"{int(budget * 100)}%"] = {
            "bins_reviewed": k,
            "errors_caught": float(caught[k - 1]),
            "random_review_would_catch": budget,
        }
    policy = policy or VerdictThresholds()
    verdicts = [judge(p, int(r), policy).verdict for p, r in zip(probabilities, recorded, strict=True)]
    flagged = np.array([v != "ok" for v in verdicts])
    correct = ~is_error
    result = {
        "split": split,
        "bins": len(scores),
        "simulated_errors": int(is_error.sum()),
        "error_rate": error_rate,
        "seed": seed,
        "model_version": counter.info.version,
        "caught_at_budget": at_budget,
        "verdicts": dict(Counter(verdicts)),
        "flagged_share": float(flagged.mean()),
        "flagged_recall": float(flagged[is_error].mean()) if is_error.any() else None,
        "flagged_precision": float(is_error[flagged].mean()) if flagged.any() else None,
        "verdict_basis": policy.basis,
        "false_alarm_rate": {
            "mismatch": float(np.mean([v == MISMATCH for v, c in zip(verdicts, correct, strict=True) if c])),
            "review_or_mismatch": float(flagged[correct].mean()) if correct.any() else None,
        },
    }
    if isinstance(policy, ConformalPolicy):
        result["conformal"] = conformal_summary(policy, probabilities, recorded, correct)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "audit_evaluation.json", result)

    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4))
    ax.plot(100 * fraction, 100 * caught, label=f"binsight ({counter.info.version})")
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
    ax.set_title(f"{int(is_error.sum())} simulated errors in {len(scores)} bins")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    save_figure(fig, out / "catch_curve.png")

    report = HtmlReport(f"binsight audit evaluation: {split} split, {100 * error_rate:.0f}% simulated errors")
    report.table(
        ["review budget", "bins re-checked", "errors caught", "random review"],
        [
            (
                k,
                v["bins_reviewed"],
                f"{100 * v['errors_caught']:.1f}%",
                f"{100 * v['random_review_would_catch']:.0f}%",
            )
            for k, v in at_budget.items()
        ],
    )
    report.figure(out / "catch_curve.png", "Share of inventory errors caught vs bins re-checked")
    report.paragraph(
        f"Verdicts by {policy.basis}: {100 * result['flagged_share']:.1f}% of bins flagged, catching "
        f"{100 * (result['flagged_recall'] or 0):.1f}% of errors; "
        f"{100 * result['false_alarm_rate']['mismatch']:.1f}% of correct records called mismatch."
    )
    if "conformal" in result:
        conformal_plot(result["conformal"], out / "calibration.png")
        report.figure(
            out / "calibration.png",
            "Correct records flagged vs the level alpha (the guarantee: on or under the diagonal)",
        )
    report.write(out / "report.html")
    return result
