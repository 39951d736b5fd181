"""`binsight recheck`: fill the recount queue, see where it stands, export the settled labels."""

from __future__ import annotations

import argparse
from collections import Counter
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from binsight.cliargs import add_command, config_from_args
from binsight.errors import BinsightError
from binsight.utils.redact import SecretUrl


class RecheckConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    action: Literal["load", "status", "export"] = Field(
        "status", description="load: queue bins; status: where the queue stands; export: settled labels"
    )
    audit: Path | None = Field(None, description="load: an audit run's --out folder (its flagged bins)")
    list: Path | None = Field(
        None, description="load: a CSV (image[, recorded_quantity]) or a list of images"
    )
    traffic: Path | None = Field(None, description="load: a server's --capture-dir (doubted S3 requests)")
    predictions: Path | None = Field(
        None, description="load: a `binsight predict` run, for the informative budget"
    )
    budget: int | None = Field(None, ge=1, description="load: bins to queue today, both budgets together")
    informative_share: float = Field(
        0.3, ge=0.0, le=1.0, description="load: share of the budget for the bins that teach the model most"
    )
    storage: SecretUrl | None = Field(
        None,
        description="label store URL (default sqlite in runs/recheck/), e.g. postgresql://user@db/labels",
    )
    out: Path = Field(Path("recounts.csv"), description="export: the labels CSV for `data index --recounts`")


def _store(config: RecheckConfig) -> Any:
    from binsight.recheck.store import LabelStore, storage_url

    return LabelStore(storage_url(config.storage, Path("runs/recheck")))


def _load(config: RecheckConfig) -> int:
    from binsight.recheck import queue

    suspicious = []
    if config.audit:
        suspicious += queue.from_audit(config.audit)
    if config.list:
        suspicious += queue.from_list(config.list)
    if config.traffic:
        suspicious += queue.from_traffic(config.traffic)
    suspicious.sort(key=lambda e: -e.priority)
    share = config.informative_share if config.predictions else 0.0
    informative = []
    if config.predictions:
        if config.budget:
            wanted = round(config.budget * share)
        else:  # no budget: as many informative bins as the share asks beside the suspicious ones
            wanted = round(len(suspicious) * share / (1 - share)) if share < 1 else 100
        informative = queue.from_predictions(config.predictions, max(1, wanted))
    if not suspicious and not informative:
        raise BinsightError(
            "nothing to queue",
            hint="give --audit FOLDER, --list FILE, --traffic CAPTURE_DIR or --predictions FOLDER",
        )
    budget = config.budget or len(suspicious) + len(informative)
    chosen = queue.split_budget(suspicious, informative, budget, share)
    added = _store(config).add(chosen)
    kinds = Counter(e.reason for e in chosen)
    print(
        f"recheck: {added} bins queued ({', '.join(f'{n} {k}' for k, n in sorted(kinds.items()))}); "
        f"{len(chosen) - added} were already queued"
    )
    return 0


def _status(config: RecheckConfig) -> int:
    from binsight.recheck.resolve import resolve

    store = _store(config)
    recounts = store.recounts()
    statuses = Counter(resolve(item, recounts).status for item in store.items())
    people = Counter(r.who for r in recounts)
    print(
        f"recheck: {sum(statuses.values())} bins: "
        + (", ".join(f"{n} {s}" for s, n in sorted(statuses.items())) or "none")
        + f"; {len(recounts)} recounts by {len(people)} people"
    )
    return 0


def _export(config: RecheckConfig) -> int:
    from binsight.recheck.resolve import export_labels

    settled, conflicting = export_labels(_store(config), config.out)
    print(
        f"recheck: {settled} settled labels -> {config.out} "
        f"(use: binsight data index DATA --recounts {config.out})"
    )
    if conflicting:
        print(
            f"recheck: {len(conflicting)} photos left out, settled differently in two queues: "
            f"{conflicting[:5]}"
        )
    return 0


def _cmd_recheck(args: argparse.Namespace) -> int:
    config = config_from_args(args, RecheckConfig)
    return {"load": _load, "status": _status, "export": _export}[config.action](config)


def register(verbs: Any) -> None:
    add_command(
        verbs,
        "recheck",
        RecheckConfig,
        _cmd_recheck,
        help="the recount queue: load bins to recount, status, export settled labels",
        positional=("action",),
        title="recheck",
    )
