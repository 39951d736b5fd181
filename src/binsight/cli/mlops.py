"""`binsight models` and `pipeline`: the registry and the retrain-compare-promote loop."""

from __future__ import annotations

import json
import logging
from typing import Any

from binsight.cliargs import add_command
from binsight.pipeline.retrain import PipelineConfig, run_pipeline
from binsight.pipeline.state import PipelineState
from binsight.registry import ModelsAnswer, ModelsConfig, manage_models

log = logging.getLogger("binsight")


def _report_models(config: ModelsConfig, answer: ModelsAnswer) -> int:
    if config.action == "list":
        print(f"{'version':<8} {'created':<26} {'accuracy':>9} {'mae':>7}  aliases")
        for version in answer.versions:
            tags = ", ".join(a for a, v in answer.aliases.items() if v == version.name)
            accuracy, mae = (float(version.metrics.get(k, float("nan"))) for k in ("accuracy", "mae"))
            created = str(version.meta.get("created", ""))
            print(f"{version.name:<8} {created:<26} {accuracy:>9.4f} {mae:>7.3f}  {tags}")
        if answer.incomplete:
            print(
                "incomplete (no meta.json: a registration that failed, or is running now): "
                + ", ".join(answer.incomplete)
            )
    elif config.action == "show":
        version = answer.versions[0]
        shown = {"version": version.name, "meta": version.meta, "metrics": version.metrics}
        print(json.dumps(shown, indent=2, default=str))
    elif answer.moved is not None:
        verb = "->" if config.action == "promote" else "rolled back to"
        print(f"{config.alias} {verb} {answer.moved.version}")
    return 0


def _report_pipeline(config: PipelineConfig, state: PipelineState) -> int:
    assert state.promote is not None and state.decide is not None and state.registration is not None
    print(
        f"pipeline {state.run_id}: candidate {state.registration.version} "
        f"{'promoted' if state.promote.promoted else 'not promoted'} ({state.decide.reason}); "
        f"production is {state.promote.production}"
    )
    return 0


def register(verbs: Any) -> None:
    add_command(
        verbs,
        "models",
        ModelsConfig,
        manage_models,
        _report_models,
        help="model registry: list, show, promote, rollback",
        positional=("action", "target"),
        title="registry",
    )
    add_command(
        verbs,
        "pipeline",
        PipelineConfig,
        run_pipeline,
        _report_pipeline,
        help="retrain, compare with production, promote if better",
        title="pipeline",
    )
