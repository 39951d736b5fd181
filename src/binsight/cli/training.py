"""`binsight train`, `evaluate` and `tune`: each a library stage called with its whole config."""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path
from typing import Any

from binsight.cliargs import add_command
from binsight.training.config import TrainConfig
from binsight.training.evaluate import EvaluateConfig, evaluate
from binsight.training.results import EvaluationReport, TrainSummary
from binsight.training.soup import SoupConfig, SoupResult, soup
from binsight.tuning.study import TuneConfig, TuneSummary, tune

log = logging.getLogger("binsight")


def _train_config(args: argparse.Namespace) -> TrainConfig:
    """A recipe, then --config, then every flag given (all TrainConfig fields, none copied by hand)."""
    from binsight.training.config import load_config

    overrides = {name: getattr(args, name, None) for name in TrainConfig.model_fields}
    return load_config(args.config, overrides, recipe=args.recipe, refit=args.refit)


def _train(config: TrainConfig) -> TrainSummary:
    from binsight.training.engine import train

    return train(config)


def _report_train(config: TrainConfig, summary: TrainSummary) -> int:
    if int(os.environ.get("RANK", "0")) != 0:
        return 0
    best = summary.best
    if config.refit:
        print(
            f"train: refit on train+val, epoch {best.epoch} kept (its validation photos were trained on); "
            f"run in {config.out}; judge it on the test split: binsight evaluate {config.out / 'best.pt'}"
        )
        return 0
    print(
        f"train: best val {best.metric} {best.value or float('nan'):.4f} at epoch {best.epoch} "
        f"(majority-class accuracy {summary.majority_baseline_val_accuracy:.3f}); run in {config.out}"
    )
    check = EvaluateConfig(checkpoint=config.out / "best.pt", split="val", workers=config.workers)
    result = evaluate(check)
    print(
        f"val report: {check.out_dir / 'report.html'} (accuracy {result.accuracy:.3f}, MAE {result.mae:.3f})"
    )
    return 0


def _report_evaluate(config: EvaluateConfig, result: EvaluationReport) -> int:
    print(
        f"{config.split}: accuracy {result.accuracy:.4f}  off-by-one {result.off_by_one_accuracy:.4f}  "
        f"MAE {result.mae:.4f}  RMSE {result.rmse:.4f}  ECE {result.ece:.4f}  n={result.n}"
    )
    print(f"metrics.json, confusion_matrix.png, curves.png and report.html in {config.out_dir}")
    return 0


def _report_soup(config: SoupConfig, result: SoupResult) -> int:
    for step in result.greedy or []:
        print(
            f"greedy: {step.checkpoint} (val accuracy {step.val_accuracy:.4f} alone): "
            f"soup {step.soup_val_accuracy:.4f}, {'kept' if step.kept else 'left out'}"
        )
    print(
        f"soup: {len(result.members)} {result.arch} runs averaged ({result.parameters_averaged:,} weights) "
        f"into {result.out}; check it before use: binsight evaluate {result.out} --split val"
    )
    if result.temperature is not None and result.val_nll is not None:
        before, after = result.val_nll
        print(
            f"calibrated on validation: temperature {result.temperature:.3f} folded into the head "
            f"(log-loss {before:.4f} -> {after:.4f})"
        )
    elif result.temperature is not None:
        print(f"temperature {result.temperature:.3f} (given) folded into the head")
    return 0


def _report_tune(config: TuneConfig, summary: TuneSummary) -> int:
    print(f"tune: {summary.trials} trials {summary.states} in {summary.storage}")
    if summary.best_value is not None:
        print(
            f"best {config.metric} {summary.best_value:.4f} (trial {summary.best_trial}): "
            f"{summary.best_params}\nbest config: {summary.best_config} (binsight train --config ...)"
        )
    return 0


def register(verbs: Any) -> None:
    parser = add_command(
        verbs,
        "train",
        TrainConfig,
        _train,
        _report_train,
        help="train a counting model (also under torchrun for DDP)",
        title="training",
        make_config=_train_config,
    )
    parser.add_argument(
        "--recipe",
        default=None,
        help="a named, measured set of settings (abid: real ABID photos; see docs/recipes.md); "
        "--config and flags override it",
    )
    parser.add_argument(
        "--refit",
        type=Path,
        default=None,
        metavar="RUN",
        help="train a finished run's settings again on its training and validation photos, stopping "
        "at the epoch its validation chose (--out defaults to RUN-refit); --config and flags override",
    )
    add_command(
        verbs,
        "evaluate",
        EvaluateConfig,
        evaluate,
        _report_evaluate,
        help="metrics, confusion matrix and HTML report for a model",
        positional=("checkpoint",),
        title="evaluation",
    )
    add_command(
        verbs,
        "soup",
        SoupConfig,
        soup,
        _report_soup,
        help="average the weights of runs of one recipe (other seeds) into one model: an ensemble's "
        "gain at one model's speed",
        title="soup",
    )
    add_command(
        verbs,
        "tune",
        TuneConfig,
        tune,
        _report_tune,
        help="Optuna hyperparameter search (parallel workers share a study)",
        title="search",
    )
