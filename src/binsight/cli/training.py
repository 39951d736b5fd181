"""`binsight train`, `evaluate` and `tune`."""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from binsight.cliargs import add_command, config_from_args

log = logging.getLogger("binsight")


def _cmd_train(args: argparse.Namespace) -> int:
    from binsight.training.config import TrainConfig, load_config
    from binsight.training.engine import train
    from binsight.training.evaluate import evaluate

    overrides = {name: getattr(args, name, None) for name in TrainConfig.model_fields}
    config = load_config(args.config, overrides, recipe=args.recipe)
    summary = train(config, fresh=args.fresh)
    if int(os.environ.get("RANK", "0")) != 0:
        return 0
    best = summary.best
    print(
        f"train: best val {best.metric} {best.value or float('nan'):.4f} at epoch {best.epoch} "
        f"(majority-class accuracy {summary.majority_baseline_val_accuracy:.3f}); run in {config.out}"
    )
    result = evaluate(Path(config.out) / "best.pt", split="val", workers=config.workers)
    print(
        f"val report: {Path(config.out) / 'eval-val' / 'report.html'} "
        f"(accuracy {result.accuracy:.3f}, MAE {result.mae:.3f})"
    )
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from binsight.training.evaluate import evaluate

    config = config_from_args(args, EvaluateConfig)
    result = evaluate(
        config.checkpoint,
        data=config.data,
        split=config.split,
        out=config.out,
        batch_size=config.batch_size,
        workers=config.workers,
        device=config.device,
    )
    print(
        f"{config.split}: accuracy {result.accuracy:.4f}  off-by-one {result.off_by_one_accuracy:.4f}  "
        f"MAE {result.mae:.4f}  RMSE {result.rmse:.4f}  ECE {result.ece:.4f}  n={result.n}"
    )
    out = config.out or config.checkpoint.parent / f"eval-{config.split}"
    print(f"metrics.json, confusion_matrix.png, curves.png and report.html in {out}")
    return 0


def _cmd_tune(args: argparse.Namespace) -> int:
    from binsight.tuning.study import TuneConfig, tune

    config = config_from_args(args, TuneConfig)
    summary = tune(config)
    print(f"tune: {summary['trials']} trials {summary['states']} in {summary['storage']}")
    if "best_value" in summary:
        print(
            f"best {config.metric} {summary['best_value']:.4f} (trial {summary['best_trial']}): "
            f"{summary['best_params']}\nbest config: {summary['best_config']} (binsight train --config ...)"
        )
    return 0


class EvaluateConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    checkpoint: Path = Field(description="best.pt or last.pt of a training run")
    data: Path | None = Field(None, description="dataset directory (default: the one trained on)")
    split: Literal["train", "val", "test"] = Field("test", description="split to evaluate on")
    out: Path | None = Field(None, description="output directory (default RUN/eval-SPLIT)")
    batch_size: int = Field(64, ge=1, description="images per forward pass")
    workers: int = Field(2, ge=0, description="data loader processes")
    device: str = Field("auto", description="auto, cpu, cuda or cuda:N")


def register(verbs: Any) -> None:
    from binsight.training.config import TrainConfig
    from binsight.tuning.study import TuneConfig

    train = add_command(
        verbs,
        "train",
        TrainConfig,
        _cmd_train,
        help="train a counting model (also under torchrun for DDP)",
        title="training",
    )
    train.add_argument(
        "--recipe",
        default=None,
        help="a named, measured set of settings (abid: real ABID photos; see docs/recipes.md); "
        "--config and flags override it",
    )
    train.add_argument("--fresh", action="store_true", help="ignore an existing checkpoint in --out")

    add_command(
        verbs,
        "evaluate",
        EvaluateConfig,
        _cmd_evaluate,
        help="metrics, confusion matrix and HTML report for a model",
        positional=("checkpoint",),
        title="evaluation",
    )

    add_command(
        verbs,
        "tune",
        TuneConfig,
        _cmd_tune,
        help="Optuna hyperparameter search (parallel workers share a study)",
        title="search",
    )
