"""`binsight recheck`: fill the recount queue, see where it stands, export the settled labels."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from binsight.errors import BinsightError
from binsight.recheck import queue
from binsight.recheck.resolve import export_labels, resolve
from binsight.recheck.store import LabelStore, QueueEntry, storage_url
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


@dataclass
class RecheckOutcome:
    queued: list[QueueEntry] = field(default_factory=list)  # load: what was asked for today
    added: int = 0  # load: of those, not already queued
    statuses: dict[str, int] = field(default_factory=dict)  # status
    recounts: int = 0
    people: int = 0
    settled: int = 0  # export
    conflicting: list[str] = field(default_factory=list)


def _load(config: RecheckConfig, store: LabelStore) -> RecheckOutcome:
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
    return RecheckOutcome(queued=chosen, added=store.add(chosen))


def recheck(config: RecheckConfig) -> RecheckOutcome:
    store = LabelStore(storage_url(config.storage, Path("runs/recheck")))
    if config.action == "load":
        return _load(config, store)
    if config.action == "export":
        settled, conflicting = export_labels(store, config.out)
        return RecheckOutcome(settled=settled, conflicting=conflicting)
    recounts = store.recounts()
    statuses = Counter(resolve(item, recounts).status for item in store.items())
    return RecheckOutcome(
        statuses=dict(statuses), recounts=len(recounts), people=len({r.who for r in recounts})
    )
