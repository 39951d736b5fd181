"""`binsight <verb>`: a thin layer that turns arguments into typed configs and calls the library."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from pydantic import ValidationError

from binsight import __version__
from binsight.cli import batch, data, mlops, serving, training
from binsight.errors import BinsightError

log = logging.getLogger("binsight")


def _format_validation_error(exc: ValidationError) -> str:
    problems = []
    for error in exc.errors():
        where = ".".join(str(part) for part in error["loc"]) or "config"
        problems.append(f"{where}: {error['msg']}")
    return "invalid configuration: " + "; ".join(problems)


def _cmd_demo(args: argparse.Namespace) -> int:
    from binsight.demo import run_demo

    run_demo(Path(args.out), n_images=args.n, seed=args.seed)
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

    demo = verbs.add_parser("demo", help="the whole job on synthetic bins (no network, no GPU)")
    demo.add_argument("--out", default="runs/demo", help="output directory")
    demo.add_argument("--n", type=int, default=1500, help="synthetic images to generate")
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(handler=_cmd_demo)
    for group in (data, training, serving, mlops, batch):
        group.register(verbs)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    logging.getLogger("matplotlib").setLevel(logging.WARNING)
    try:
        return int(args.handler(args) or 0)
    except BinsightError as exc:
        print(f"binsight: error: {exc}", file=sys.stderr)
        return 2
    except ValidationError as exc:
        print(f"binsight: error: {_format_validation_error(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("binsight: interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
