"""`binsight <verb>`: a thin layer that turns arguments into typed configs and calls the library."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from botocore.exceptions import BotoCoreError, ClientError
from pydantic import ValidationError

from binsight import __version__
from binsight.cli import batch, data, mlops, recheck, serving, training
from binsight.cliargs import add_command, dispatch
from binsight.errors import BinsightError, invalid_settings
from binsight.utils.redact import configure_logging, redact

log = logging.getLogger("binsight")


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

    from binsight.demo import DemoConfig, run_demo

    add_command(
        verbs,
        "demo",
        DemoConfig,
        run_demo,
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
    configure_logging(args.verbose)
    try:
        return dispatch(args)
    except BinsightError as exc:
        print(f"binsight: error: {redact(str(exc))}", file=sys.stderr)
        return 2
    except ValidationError as exc:
        print(f"binsight: error: {redact(str(invalid_settings(exc)))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("binsight: interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
    except OSError as exc:
        # A path the system refused (an output folder that is a file, a full disk, no permission):
        # its own words name the problem; where in binsight it happened is for -v.
        log.debug("the system refused a file operation", exc_info=True)
        print(f"binsight: error: {redact(os_error_text(exc))}", file=sys.stderr)
        print("  hint: run again with -v to see where", file=sys.stderr)
        return 2
    except (BotoCoreError, ClientError) as exc:
        # An S3 call that the stage itself does not expect to fail (no credentials, no endpoint,
        # access denied): botocore's words name it.
        log.debug("an S3 call failed", exc_info=True)
        print(f"binsight: error: S3: {redact(str(exc))}", file=sys.stderr)
        print(
            "  hint: check the credentials (AWS_PROFILE, AWS_ACCESS_KEY_ID), bucket and --s3-endpoint-url",
            file=sys.stderr,
        )
        return 2


def os_error_text(exc: OSError) -> str:
    """`path: reason`, naming the path a person gave: a rename's target rather than its temporary file."""
    path = exc.filename2 if exc.filename2 is not None else exc.filename
    reason = exc.strerror or str(exc)
    return f"{path}: {reason}" if path is not None else reason
