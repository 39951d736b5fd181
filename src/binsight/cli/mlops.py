"""`binsight models` and `pipeline`: the registry and the retrain-compare-promote loop."""

from __future__ import annotations

import argparse
import json
import logging
from typing import Any

from binsight.cliargs import add_config_arguments, config_from_args

log = logging.getLogger("binsight")


def _cmd_models(args: argparse.Namespace) -> int:
    from binsight.registry import Registry

    registry = Registry(args.registry, args.s3_endpoint_url)
    if args.action == "list":
        aliases = registry.aliases()
        print(f"{'version':<8} {'created':<26} {'accuracy':>9} {'mae':>7}  aliases")
        for name in registry.versions():
            version = registry.get(name)
            tags = ", ".join(a for a, v in aliases.items() if v == name)
            accuracy, mae = (version.metrics.get(k, float("nan")) for k in ("accuracy", "mae"))
            print(f"{name:<8} {version.meta.get('created', ''):<26} {accuracy:>9.4f} {mae:>7.3f}  {tags}")
    elif args.action == "show":
        version = registry.get(registry.resolve(args.target))
        print(
            json.dumps(
                {"version": version.name, "meta": version.meta, "metrics": version.metrics},
                indent=2,
                default=str,
            )
        )
    elif args.action == "promote":
        record = registry.set_alias(
            args.alias, registry.resolve(args.target), args.reason or "manual promote"
        )
        print(f"{args.alias} -> {record['version']}")
    else:
        record = registry.rollback(args.alias)
        print(f"{args.alias} rolled back to {record['version']}")
    return 0


def _cmd_pipeline(args: argparse.Namespace) -> int:
    from binsight.pipeline.retrain import Pipeline, PipelineConfig

    result = Pipeline(config_from_args(args, PipelineConfig)).run()
    promote, decision = result["promote"], result["decide"]
    print(
        f"pipeline {result['run_id']}: candidate {result['register']['version']} "
        f"{'promoted' if promote['promoted'] else 'not promoted'} ({decision['reason']}); "
        f"production is {promote['production']}"
    )
    return 0


def register(verbs: Any) -> None:
    models = verbs.add_parser("models", help="model registry: list, show, promote, rollback")
    models.add_argument("action", choices=["list", "show", "promote", "rollback"])
    models.add_argument("target", nargs="?", default="production", help="version (v0003) or alias")
    models.add_argument("--registry", required=True, help="folder or s3://bucket/prefix")
    models.add_argument("--alias", default="production", help="alias to move (promote/rollback)")
    models.add_argument("--reason", default=None)
    models.add_argument("--s3-endpoint-url", default=None)
    models.set_defaults(handler=_cmd_models)

    pipe = verbs.add_parser("pipeline", help="retrain, compare with production, promote if better")
    from binsight.pipeline.retrain import PipelineConfig

    add_config_arguments(pipe, PipelineConfig, title="pipeline")
    pipe.set_defaults(handler=_cmd_pipeline)
