"""Every `binsight` command the README shows is accepted by the real command-line parser: a flag the
README promises and the CLI dropped (as `serve --registry` once was) fails here."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from binsight.cli import build_parser
from binsight.cliargs import config_from_args
from binsight.errors import BinsightError

README = Path(__file__).resolve().parent.parent / "README.md"


def readme_commands() -> list[str]:
    blocks = re.findall(r"```bash\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.S)
    commands = []
    for block in blocks:
        joined = re.sub(r"\\\n\s*", " ", block)  # continuation lines
        for line in joined.splitlines():
            line = line.split(" #", 1)[0].strip()
            if re.search(r"(^|/|-m )binsight ", line):
                commands.append(line)
    return commands


def binsight_argv(line: str) -> list[str]:
    """The arguments after `binsight` (also under `torchrun -m binsight`); `$VARS` become 0 and the
    README's `...` ellipses (meaning "the flags shown above") are dropped."""
    words = [w for w in shlex.split(re.sub(r"\$(\w+)", "0", line)) if w != "..."]
    start = next(i for i, w in enumerate(words) if w == "binsight" or w.endswith("/binsight"))
    return words[start + 1 :]


COMMANDS = readme_commands()


def test_the_readme_shows_the_main_verbs() -> None:
    verbs = {binsight_argv(line)[0] for line in COMMANDS}
    assert verbs >= {
        "data",
        "train",
        "export",
        "serve",
        "loadtest",
        "tune",
        "pipeline",
        "audit",
        "monitor",
    }


@pytest.mark.parametrize("line", COMMANDS)
def test_readme_command_parses_into_valid_settings(line: str) -> None:
    try:
        args = build_parser().parse_args(binsight_argv(line))
    except SystemExit as exc:  # argparse's way of saying "unknown flag" or "bad value"
        pytest.fail(f"the README's command does not parse ({exc.code}): {line}")
    # The flags also make valid settings for the verb (a value out of range, two model sources, a
    # missing required setting): what the command would do first when run. A --config FILE or the run
    # a --refit repeats would supply the rest, so such commands are checked by parsing only.
    if args.config is None and getattr(args, "refit", None) is None:
        try:
            config_from_args(args, args.config_model)
        except BinsightError as exc:
            pytest.fail(f"the README's command has invalid settings ({exc}): {line}")
