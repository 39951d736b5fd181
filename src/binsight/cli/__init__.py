"""`binsight <verb>`: a thin layer that turns arguments into typed configs and calls the library."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from binsight import __version__
from binsight.cli import batch, data, mlops, recheck, serving, training
from binsight.cliargs import add_command, config_from_args
from binsight.errors import BinsightError
from binsight.utils.redact import install_redaction, redact

log = logging.getLogger("binsight")


def _format_validation_error(exc: ValidationError) -> str:
    problems = []
    for error in exc.errors():
        where = ".".join(str(part) for part in error["loc"]) or "config"
        problems.append(f"{where}: {error['msg']}")
    return "invalid configuration: " + "; ".join(problems)


class DemoConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    out: Path = Field(Path("runs/demo"), description="output directory")
    n_images: int = Field(1500, ge=100, description="synthetic bin photos to generate")
    seed: int = Field(0, description="seed of the photos, the split and the training")
    training: Literal["auto", "fine-tune", "frozen"] = Field(
        "auto",
        description="fine-tune the backbone, or train a head on its frozen features (auto: by the CPU)",
    )


def _cmd_demo(args: argparse.Namespace) -> int:
    from binsight.demo import run_demo

    config = config_from_args(args, DemoConfig)
    run_demo(config.out, n_images=config.n_images, seed=config.seed, training=config.training)
    return 0


# ---------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="binsight",
        description="Count objects in warehouse bin photos and flag bins that disagree with "
        "the inventory record.",
    )
    parser.add_argument("--version", action="version", version=f"binsight {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="VERB")

    add_command(
        verbs,
        "demo",
        DemoConfig,
        _cmd_demo,
        help="the whole job on synthetic bins (no network, no GPU)",
        title="demo",
    )
    for group in (data, training, serving, mlops, batch, recheck):
        group.register(verbs)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse has printed the usage error (or the help): its code, returned
        return int(exc.code or 0)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    logging.getLogger("matplotlib").setLevel(logging.WARNING)
    install_redaction()
    try:
        return int(args.handler(args) or 0)
    except BinsightError as exc:
        print(f"binsight: error: {redact(str(exc))}", file=sys.stderr)
        return 2
    except ValidationError as exc:
        print(f"binsight: error: {redact(_format_validation_error(exc))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("binsight: interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
