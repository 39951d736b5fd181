"""`binsight models` and `pipeline`: the registry and the retrain-compare-promote loop."""

from __future__ import annotations

import argparse
import json
import logging
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from binsight.cliargs import add_command, config_from_args
from binsight.utils.redact import SecretUrl

log = logging.getLogger("binsight")


class ModelsConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    action: Literal["list", "show", "promote", "rollback"] = Field(
        "list", description="list, show, promote or rollback"
    )
    target: str = Field("production", description="version (v0003) or alias to show or promote")
    registry: str = Field(description="folder or s3://bucket/prefix")
    alias: str = Field(
        "production", pattern=r"^[a-z][a-z0-9_-]{0,40}$", description="alias to move (promote, rollback)"
    )
    reason: str | None = Field(None, description="recorded with the alias's move")
    s3_endpoint_url: SecretUrl | None = Field(None, description="S3-compatible endpoint (default AWS)")


def _cmd_models(args: argparse.Namespace) -> int:
    from binsight.registry import Registry

    config = config_from_args(args, ModelsConfig)
    registry = Registry(config.registry, config.s3_endpoint_url)
    if config.action == "list":
        aliases = registry.aliases()
        complete, incomplete = registry.listing()
        print(f"{'version':<8} {'created':<26} {'accuracy':>9} {'mae':>7}  aliases")
        for name in complete:
            version = registry.get(name)
            tags = ", ".join(a for a, v in aliases.items() if v == name)
            accuracy, mae = (float(version.metrics.get(k, float("nan"))) for k in ("accuracy", "mae"))
            print(f"{name:<8} {version.meta.get('created', '')!s:<26} {accuracy:>9.4f} {mae:>7.3f}  {tags}")
        if incomplete:
            print(
                f"incomplete (no meta.json: a registration that failed, or is running now): "
                f"{', '.join(incomplete)}"
            )
    elif config.action == "show":
        version = registry.get(registry.resolve(config.target))
        print(
            json.dumps(
                {"version": version.name, "meta": version.meta, "metrics": version.metrics},
                indent=2,
                default=str,
            )
        )
    elif config.action == "promote":
        record = registry.set_alias(
            config.alias, registry.resolve(config.target), config.reason or "manual promote"
        )
        print(f"{config.alias} -> {record.version}")
    else:
        record = registry.rollback(config.alias)
        print(f"{config.alias} rolled back to {record.version}")
    return 0


def _cmd_pipeline(args: argparse.Namespace) -> int:
    from binsight.pipeline.retrain import Pipeline, PipelineConfig

    state = Pipeline(config_from_args(args, PipelineConfig)).run()
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
        _cmd_models,
        help="model registry: list, show, promote, rollback",
        positional=("action", "target"),
        title="registry",
    )

    from binsight.pipeline.retrain import PipelineConfig

    add_command(
        verbs,
        "pipeline",
        PipelineConfig,
        _cmd_pipeline,
        help="retrain, compare with production, promote if better",
        title="pipeline",
    )
