"""`binsight tune`: an Optuna study over learning rate, batch size, epochs, backbone and augmentation.

Trials report validation metrics every epoch, so the pruner (median or Hyperband) stops hopeless
ones early. The study lives in shared storage: SQLite by default, any Optuna RDB URL (PostgreSQL,
MySQL) or an append-only journal file, so any number of workers, on any number of machines, run the
same command and share one study. The study is bounded by finished trials in total, so re-running a
killed worker resumes the search rather than restarting it.
"""

from __future__ import annotations

import logging
import os
import random
import socket
import time
import warnings
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import optuna
from pydantic import BaseModel, ConfigDict, Field, model_validator

from binsight.data.split import load_split
from binsight.errors import BinsightError
from binsight.reporting.html import HtmlReport
from binsight.training.config import TrainConfig, load_config
from binsight.training.metrics import Metric
from binsight.training.results import EpochRecord
from binsight.utils.io import atomic_write_csv, atomic_write_text
from binsight.utils.records import JsonRecord
from binsight.utils.redact import SecretUrl, redact

log = logging.getLogger(__name__)


class TuneConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    data: Path = Field(description="dataset directory with splits/")
    out: Path = Field(Path("runs/tune"), description="study folder (results, report, best config)")
    study_name: str = Field("binsight", description="the study's name in the storage")
    storage: SecretUrl | None = Field(
        None, description="Optuna RDB URL or journal:PATH (default sqlite in out/)"
    )
    n_trials: int = Field(20, ge=1, description="finished trials in the whole study, all workers together")
    timeout_s: float | None = Field(None, gt=0, description="seconds this worker may search")
    metric: Metric = Field(Metric.ACCURACY, description="validation metric to optimise")
    pruner: Literal["median", "hyperband", "none"] = Field("median", description="stops weak trials early")
    lr: tuple[float, float] = Field((1e-4, 1e-1), description="learning-rate range (searched on a log scale)")
    batch_sizes: list[int] = Field(default_factory=lambda: [64, 128, 256], description="batch sizes to try")
    epochs: tuple[int, int] = Field((3, 15), description="range of epochs")
    # The backbones whose ImageNet weights install with binsight: a default search must run offline
    # (torchvision's need their weights fetched by hand first).
    archs: list[str] = Field(
        default_factory=lambda: ["efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"],
        description="backbones to try",
    )
    augment: tuple[float, float] = Field((0.0, 2.0), description="range of augmentation strength")
    base_config: Path | None = Field(None, description="JSON training config for everything not searched")
    fixed: dict[str, Any] = Field(
        default_factory=dict, description='training settings fixed for every trial, e.g. {"image_size": 128}'
    )
    seed: int | None = Field(None, description="sampler seed")

    @model_validator(mode="after")
    def _ranges(self) -> TuneConfig:
        if not 0 < self.lr[0] <= self.lr[1]:
            raise ValueError("lr range must be positive and increasing")
        if not 1 <= self.epochs[0] <= self.epochs[1]:
            raise ValueError("epochs range must be increasing and at least 1")
        if not self.batch_sizes or not self.archs:
            raise ValueError("batch_sizes and archs need at least one value each")
        return self

    def storage_url(self) -> str:
        return self.storage or f"sqlite:///{(self.out / 'study.db').resolve()}"

    def shown_storage(self) -> str:
        """The storage URL as it may be printed or written: its password replaced by ***."""
        return redact(self.storage_url())


def make_storage(url: str) -> optuna.storages.BaseStorage:
    if url.startswith("journal:"):
        from optuna.storages.journal import JournalFileBackend

        path = Path(url[len("journal:") :])
        path.parent.mkdir(parents=True, exist_ok=True)
        return optuna.storages.JournalStorage(JournalFileBackend(str(path)))
    # A worker that dies leaves its trial RUNNING; heartbeats let the others mark it failed and retry it.
    # Optuna flags heartbeats as experimental (since v2.8, unchanged): that one warning is silenced here,
    # where it is raised, not for the whole process.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.storages.RDBStorage(
            url,
            heartbeat_interval=30,
            grace_period=120,
            heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=1),
            engine_kwargs={"connect_args": {"timeout": 60}} if url.startswith("sqlite") else None,
        )


def _pruner(kind: str) -> optuna.pruners.BasePruner:
    if kind == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=1)
    if kind == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1)
    return optuna.pruners.NopPruner()


def trial_config(trial: optuna.trial.BaseTrial, config: TuneConfig) -> TrainConfig:
    sampled = {
        "lr": trial.suggest_float("lr", *config.lr, log=True),
        "batch_size": trial.suggest_categorical("batch_size", config.batch_sizes),
        "epochs": trial.suggest_int("epochs", *config.epochs),
        "arch": trial.suggest_categorical("arch", config.archs),
        "augment": trial.suggest_float("augment", *config.augment),
    }
    return config_from_params(sampled, trial.number, config)


def config_from_params(params: dict[str, Any], number: int, config: TuneConfig) -> TrainConfig:
    """The training config of a trial's parameters. Not re-sampled through the search space: a
    shared study may hold a best trial from a worker searching a different space."""
    overrides = {
        **config.fixed,
        **params,
        "data": config.data,
        "out": config.out / "trials" / f"trial-{number:04d}",
        "select_metric": config.metric,
        "early_stopping": None,
    }
    return load_config(config.base_config, overrides)


def objective(config: TuneConfig) -> Any:
    from binsight.training.engine import train

    def run(trial: optuna.Trial) -> float:
        train_config = trial_config(trial, config)
        trial.set_user_attr("out", str(train_config.out))
        # Which machine and process ran it: several workers share one study.
        trial.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")

        def report(record: EpochRecord) -> None:
            value = record.value(config.metric)
            trial.report(value, record.epoch)
            if trial.should_prune():
                raise optuna.TrialPruned(f"epoch {record.epoch}: val_{config.metric} {value:.4f}")

        try:
            summary = train(train_config, on_epoch_end=report)
        except BinsightError as exc:  # kept for the failure streak's message (Optuna keeps no reason)
            trial.set_user_attr("error", str(exc)[:1000])
            raise
        if summary.best.value is None:
            raise optuna.TrialPruned("the trial ended before its first epoch")
        return summary.best.value

    return run


def _open_study(config: TuneConfig) -> optuna.Study:
    """Create or join the study. Workers started together race to create a fresh database's schema;
    the loser sees a constraint error and simply joins once the winner is done."""
    from sqlalchemy.exc import SQLAlchemyError

    for attempt in range(6):
        try:
            return optuna.create_study(
                study_name=config.study_name,
                storage=make_storage(config.storage_url()),
                direction=config.metric.optuna_direction,
                sampler=optuna.samplers.TPESampler(
                    seed=None if config.seed is None else config.seed + os.getpid(), n_startup_trials=5
                ),
                pruner=_pruner(config.pruner),
                load_if_exists=True,
            )
        except (SQLAlchemyError, optuna.exceptions.DuplicatedStudyError) as exc:
            if attempt == 5:
                raise BinsightError(
                    f"cannot open the study in {config.shown_storage()}: {redact(str(exc))}"
                ) from None
            time.sleep(0.3 + random.random())
        except (ValueError, ImportError) as exc:
            raise BinsightError(
                f"cannot open the study storage {config.shown_storage()}: {redact(str(exc))}",
                hint="PostgreSQL needs binsight's [postgres] extra: pip install 'binsight[postgres]'",
            ) from None
    raise AssertionError("unreachable")


class TuneSummary(JsonRecord):
    """`summary.json`: the study's trials and its best so far (storage shown without its password)."""

    study: str
    storage: str
    trials: int
    states: dict[str, int]
    best_value: float | None = None
    best_params: dict[str, Any] | None = None
    best_trial: int | None = None
    best_config: str | None = None


def preflight(config: TuneConfig) -> None:
    """What would fail every trial, found before the first: settings that do not make a training
    config (a base config or `--fixed` of the wrong shape), and a dataset without its splits."""
    first = {
        "lr": config.lr[0],
        "batch_size": config.batch_sizes[0],
        "epochs": config.epochs[0],
        "arch": config.archs[0],
        "augment": config.augment[0],
    }
    config_from_params(first, 0, config)
    for split in ("train", "val"):
        load_split(config.data, split)


# Trials failed in a row after which a worker stops: the same cause (a photo deleted, a disk full)
# would fail every later trial too, and fill a shared study with failures until the timeout.
FAILURES_IN_A_ROW = 3


class _FailureStreak:
    def __init__(self) -> None:
        self.length = 0
        self.last_error = ""

    def __call__(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        if trial.state != optuna.trial.TrialState.FAIL:
            self.length = 0
            return
        self.length += 1
        self.last_error = str(trial.user_attrs.get("error", "see the log above"))
        if self.length >= FAILURES_IN_A_ROW:
            study.stop()


def tune(config: TuneConfig) -> TuneSummary:
    preflight(config)
    config.out.mkdir(parents=True, exist_ok=True)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = _open_study(config)
    done = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    remaining = config.n_trials - len(study.get_trials(deepcopy=False, states=done))
    streak = _FailureStreak()
    if remaining > 0:
        study.optimize(
            objective(config),
            timeout=config.timeout_s,
            callbacks=[optuna.study.MaxTrialsCallback(config.n_trials, states=done), streak],
            catch=(BinsightError,),
        )
    summary = write_results(study, config)
    if streak.length >= FAILURES_IN_A_ROW:
        raise BinsightError(
            f"{streak.length} trials in a row failed, so this worker stopped; the last: {streak.last_error}",
            hint="fix that and run the same command again: the study keeps its finished trials",
        )
    return summary


def trial_rows(study: optuna.Study) -> list[dict[str, Any]]:
    rows = []
    for trial in study.get_trials(deepcopy=False):
        seconds = (
            (trial.datetime_complete - trial.datetime_start).total_seconds()
            if trial.datetime_complete and trial.datetime_start
            else None
        )
        rows.append(
            {
                "number": trial.number,
                "state": trial.state.name,
                "value": trial.value,
                "epochs_reported": len(trial.intermediate_values),
                "seconds": seconds,
                "worker": trial.user_attrs.get("worker", ""),
                **{f"param_{k}": v for k, v in trial.params.items()},
            }
        )
    return rows


def write_results(study: optuna.Study, config: TuneConfig) -> TuneSummary:
    rows = trial_rows(study)
    columns = sorted(
        {c for row in rows for c in row}, key=lambda c: (not c.startswith(("number", "state", "value")), c)
    )
    atomic_write_csv(config.out / "results.csv", rows, columns)
    summary = TuneSummary(
        study=study.study_name,
        storage=config.shown_storage(),
        trials=len(rows),
        states=dict(Counter(row["state"] for row in rows)),
    )
    if any(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials):
        best = study.best_trial
        best_config = config_from_params(best.params, best.number, config)
        best_config = best_config.model_copy(update={"out": config.out / "best-model"})
        atomic_write_text(config.out / "best_config.json", best_config.model_dump_json(indent=2))
        summary.best_value, summary.best_params, summary.best_trial = best.value, best.params, best.number
        summary.best_config = str(config.out / "best_config.json")
    summary.write(config.out / "summary.json")
    if summary.best_value is not None:
        _report(study, config, summary)
    return summary


def _report(study: optuna.Study, config: TuneConfig, summary: TuneSummary) -> None:
    import warnings

    from optuna.visualization import matplotlib as optuna_plots

    from binsight.utils.plots import save_figure

    report = HtmlReport(f"binsight tune: {study.study_name}")
    report.paragraph(
        f"{summary.trials} trials ({summary.states}); best {config.metric} "
        f"{summary.best_value:.4f} (trial {summary.best_trial}) with {summary.best_params}."
    )
    report.paragraph(f"Train it: binsight train --config {summary.best_config}")
    plots: dict[str, Callable[[optuna.Study], Any]] = {
        "optimization_history": optuna_plots.plot_optimization_history,
        "intermediate_values": optuna_plots.plot_intermediate_values,
        "slice": optuna_plots.plot_slice,
        "param_importances": optuna_plots.plot_param_importances,
    }
    for name, plot in plots.items():
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # Optuna marks its matplotlib plots experimental
                axes = plot(study)
            figure = (axes.flat[0] if hasattr(axes, "flat") else axes).figure
            save_figure(figure, config.out / f"{name}.png")
            report.figure(config.out / f"{name}.png", name.replace("_", " "))
        except (ValueError, RuntimeError, ZeroDivisionError) as exc:  # e.g. importances need 2+ trials
            log.info("skipped the %s plot: %s", name, exc)
    rows = trial_rows(study)
    columns = list(rows[0]) if rows else []
    report.table(columns, [[row[c] for c in columns] for row in rows])
    report.write(config.out / "report.html")
