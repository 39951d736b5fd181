"""Audit verdicts on real ABID photos: fixed thresholds (the previous default) against conformal
verdicts calibrated on the validation split, on the test split with simulated inventory errors.

Reports, for the test split with --error-rate of records corrupted (off by one or two):
- false alarms: the share of *correct* records called mismatch (and review-or-mismatch), observed
  against the level alpha at several levels (the guarantee is observed <= alpha), as a table and PNG;
- the prediction-set sizes at alpha;
- the share of wrong records each policy flags, and how many bins it sends to people;
- errors caught at 5/10/20% review budgets, ranking by 1 - P(recorded) (the previous ranking) and by
  the conformal p-value, compared first on the validation split (calibrate on one half, simulate
  errors on the other, both ways), never chosen on test.

Run: .venv/bin/python benchmarks/bench_conformal.py --checkpoint RUN/best.pt --data DATA
     [--error-rate 0.1] [--seeds 0 1 2 3 4]
(RUN and DATA from benchmarks/bench_accuracy.py: /tmp/bacc/runs/binsight and /tmp/bacc/data-1to5)
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from binsight.audit.evaluation import ALPHA_GRID, BUDGETS, catch_curve, conformal_plot, simulate_errors
from binsight.batch.run import score_photos
from binsight.data.split import load_split
from binsight.export.onnx import ExportConfig, export
from binsight.inference.conformal import Calibration
from binsight.inference.runtime import load_counter
from binsight.inference.verdict import MISMATCH, ConformalPolicy, VerdictThresholds, judge, p_of_count
from binsight.utils.io import atomic_write_json

os.environ.setdefault("BINSIGHT_PROGRESS", "0")


def probabilities_of(model: Path, data: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    counter = load_counter(model, backend="onnxruntime")
    rows = load_split(data, split)
    probs, problems = score_photos(counter, [str(data / r["image"]) for r in rows])
    assert not any(problems), [p for p in problems if p]
    top = len(counter.info.classes) - 1
    return probs, np.minimum(np.array([int(r["count"]) for r in rows]), top)


def caught_at_budgets(scores: np.ndarray, is_error: np.ndarray) -> dict[str, float]:
    _, caught = catch_curve(scores, is_error)
    return {f"{int(100 * b)}%": float(caught[max(1, round(b * len(scores))) - 1]) for b in BUDGETS}


def rank_scores(probs: np.ndarray, recorded: np.ndarray, calibration: Calibration) -> dict[str, np.ndarray]:
    """Higher = more suspicious. The p-value ranking breaks its ties by 1 - P(recorded)."""
    one_minus_p = np.array([1 - p_of_count(p, int(r)) for p, r in zip(probs, recorded, strict=True)])
    p_values = np.array([calibration.p_value(p, int(r)) for p, r in zip(probs, recorded, strict=True)])
    return {"1 - P(recorded)": one_minus_p, "conformal p-value": -p_values + 1e-6 * one_minus_p}


def policy_rates(
    policy: VerdictThresholds | ConformalPolicy, probs: np.ndarray, recorded: np.ndarray, is_error: np.ndarray
) -> dict[str, float]:
    verdicts = np.array([judge(p, int(r), policy).verdict for p, r in zip(probs, recorded, strict=True)])
    flagged = verdicts != "ok"
    mismatch = verdicts == MISMATCH
    correct = ~is_error
    return {
        "flagged_share": float(flagged.mean()),
        "mismatch_share": float(mismatch.mean()),
        "false_alarm_mismatch": float(mismatch[correct].mean()),
        "false_alarm_flagged": float(flagged[correct].mean()),
        "errors_called_mismatch": float(mismatch[is_error].mean()),
        "errors_flagged": float(flagged[is_error].mean()),
    }


def main() -> int:
    logging.basicConfig(level=logging.WARNING)
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--checkpoint", type=Path, default=Path("/tmp/bacc/runs/binsight/best.pt"))
    parser.add_argument("--data", type=Path, default=Path("/tmp/bacc/data-1to5"))
    parser.add_argument("--error-rate", type=float, default=0.1)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--alpha", type=float, default=0.05)
    parser.add_argument("--review-alpha", type=float, default=0.2)
    parser.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()) / "binsight-conformal")
    args = parser.parse_args()
    if not args.checkpoint.is_file() or not (args.data / "splits").is_dir():
        print(
            "SKIP: needs a trained checkpoint and its dataset (run bench_accuracy.py first)", file=sys.stderr
        )
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    model = args.out / "model.onnx"
    export(ExportConfig(checkpoint=args.checkpoint, out=model, data=args.data, version="bench-conformal"))

    val_probs, val_truth = probabilities_of(model, args.data, "val")
    test_probs, test_truth = probabilities_of(model, args.data, "test")
    classes = tuple(load_counter(model).info.classes)
    num_classes = len(classes)

    # Comparing rankings on validation: calibrate on one half, simulate errors on the other, both ways.
    order = np.random.default_rng(0).permutation(len(val_truth))
    halves = (order[: len(order) // 2], order[len(order) // 2 :])
    val_choice: dict[str, list[dict[str, float]]] = {}
    for fit, held in (halves, halves[::-1]):
        inner = Calibration.fit(val_probs[fit], val_truth[fit], classes)
        for seed in args.seeds:
            recorded, is_error = simulate_errors(val_truth[held], args.error_rate, num_classes, seed)
            for name, scores in rank_scores(val_probs[held], recorded, inner).items():
                val_choice.setdefault(name, []).append(caught_at_budgets(scores, is_error))
    val_means = {
        name: {b: float(np.mean([r[b] for r in runs])) for b in runs[0]} for name, runs in val_choice.items()
    }
    better_on_val = max(val_means, key=lambda name: sum(val_means[name].values()))

    calibration = Calibration.fit(val_probs, val_truth, classes, "val")
    conformal = ConformalPolicy(calibration, args.alpha, args.review_alpha)
    fixed = VerdictThresholds(0.5, 0.1)
    per_seed: list[dict[str, Any]] = []
    for seed in args.seeds:
        recorded, is_error = simulate_errors(test_truth, args.error_rate, num_classes, seed)
        p_values = np.array(
            [calibration.p_value(p, int(r)) for p, r in zip(test_probs, recorded, strict=True)]
        )
        per_seed.append(
            {
                "fixed": policy_rates(fixed, test_probs, recorded, is_error),
                "conformal": policy_rates(conformal, test_probs, recorded, is_error),
                "far_by_alpha": {f"{a:g}": float((p_values[~is_error] <= a).mean()) for a in ALPHA_GRID},
                "budgets": {
                    name: caught_at_budgets(scores, is_error)
                    for name, scores in rank_scores(test_probs, recorded, calibration).items()
                },
            }
        )

    def mean(path: tuple[str, ...]) -> float:
        values = []
        for run in per_seed:
            value: Any = run
            for key in path:
                value = value[key]
            values.append(value)
        return float(np.mean(values))

    # False alarms of correct records do not depend on which records were corrupted, beyond which
    # records are correct: on the full test split with every record right, the rate is exact.
    p_all = np.array([calibration.p_value(p, int(t)) for p, t in zip(test_probs, test_truth, strict=True)])
    far_all = {f"{a:g}": float((p_all <= a).mean()) for a in ALPHA_GRID}
    set_sizes = [len(calibration.prediction_set(p, args.alpha)) for p in test_probs]
    summary = {
        "test_bins": len(test_truth),
        "calibration_photos_per_count": calibration.sizes(),
        "error_rate": args.error_rate,
        "seeds": args.seeds,
        "false_alarm_rate_by_alpha_all_records_correct": far_all,
        "false_alarm_rate_by_alpha_correct_records_mean": {
            f"{a:g}": mean(("far_by_alpha", f"{a:g}")) for a in ALPHA_GRID
        },
        "mean_set_size": float(np.mean(set_sizes)),
        "set_sizes": {str(k): int(v) for k, v in zip(*np.unique(set_sizes, return_counts=True), strict=True)},
        "fixed": {k: mean(("fixed", k)) for k in per_seed[0]["fixed"]},
        "conformal": {k: mean(("conformal", k)) for k in per_seed[0]["conformal"]},
        "budgets_test": {
            name: {b: mean(("budgets", name, b)) for b in per_seed[0]["budgets"][name]}
            for name in per_seed[0]["budgets"]
        },
        "budgets_val_choice": val_means,
        "ranking_better_on_val": better_on_val,
    }
    atomic_write_json(args.out / "conformal.json", summary)
    conformal_plot(far_all, args.out / "calibration.png")
    print(json.dumps(summary, indent=1))
    print("\n| alpha | " + " | ".join(far_all) + " |")
    print("| --- |" + " --- |" * len(far_all))
    print(
        "| correct records flagged (all test records correct) | "
        + " | ".join(f"{v:.3f}" for v in far_all.values())
        + " |"
    )
    print(f"\nplot: {args.out / 'calibration.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
