"""`binsight recheck`: the library stage called with its whole config; here only what it prints."""

from __future__ import annotations

from collections import Counter
from typing import Any

from binsight.cliargs import add_command
from binsight.recheck.commands import RecheckConfig, RecheckOutcome, recheck


def _report(config: RecheckConfig, outcome: RecheckOutcome) -> int:
    if config.action == "load":
        kinds = ", ".join(f"{n} {k}" for k, n in sorted(Counter(e.reason for e in outcome.queued).items()))
        print(
            f"recheck: {outcome.added} bins queued ({kinds}); "
            f"{len(outcome.queued) - outcome.added} were already queued"
        )
    elif config.action == "export":
        print(
            f"recheck: {outcome.settled} settled labels -> {config.out} "
            f"(use: binsight data index DATA --recounts {config.out})"
        )
        if outcome.conflicting:
            print(
                f"recheck: {len(outcome.conflicting)} photos left out, settled differently in two queues: "
                f"{outcome.conflicting[:5]}"
            )
    else:
        states = ", ".join(f"{n} {s}" for s, n in sorted(outcome.statuses.items())) or "none"
        print(
            f"recheck: {sum(outcome.statuses.values())} bins: {states}; "
            f"{outcome.recounts} recounts by {outcome.people} people"
        )
    return 0


def register(verbs: Any) -> None:
    add_command(
        verbs,
        "recheck",
        RecheckConfig,
        recheck,
        _report,
        help="the recount queue: load bins to recount, status, export settled labels",
        positional=("action",),
        title="recheck",
    )
