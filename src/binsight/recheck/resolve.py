"""From recounts to labels: when a bin's count is settled, who sees which bin next, and the labels CSV
the data stage reads.

A recount that agrees with the inventory record or with the model settles the bin. One that disagrees
with both might be a slip, so a second person recounts it independently (without seeing the first
answer); two that agree settle it, and two that disagree go to a third, whose answer settles it if it
matches either. "Bin not found" settles it as not found (for the warehouse, not for training); two
"can't tell" mark it unreadable. "Skip" only hands the bin to someone else.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

from binsight.recheck.store import Item, LabelStore, Recount
from binsight.utils.io import atomic_write_csv
from binsight.utils.text import spreadsheet_safe

LEASE = timedelta(minutes=10)  # a claimed bin goes back to the queue if its person walks away
LABEL_FIELDS = ("id", "count", "recorded", "recounts", "settled_by", "queue", "model_version")


@dataclass(frozen=True)
class Resolution:
    status: str  # open, settled, not_found, unreadable, disputed
    count: int | None = None
    needed: int = 0  # further independent recounts wanted
    settled_by: str = ""  # record, model, record+model, second person, majority

    @property
    def open(self) -> bool:
        return self.status == "open"


def resolve(item: Item, recounts: list[Recount]) -> Resolution:
    mine = [r for r in recounts if r.item_id == item.id]
    if any(r.outcome == "not_found" for r in mine):
        return Resolution("not_found", settled_by="a person")
    counted = [r.count for r in mine if r.outcome == "counted" and r.count is not None]
    if not counted:
        if sum(r.outcome == "cant_tell" for r in mine) >= 2:
            return Resolution("unreadable")
        return Resolution("open", needed=1)
    first = counted[0]
    if len(counted) == 1:
        agrees = [
            name for name, value in (("record", item.recorded), ("model", item.predicted)) if value == first
        ]
        if agrees:
            return Resolution("settled", first, settled_by="+".join(agrees))
        return Resolution("open", needed=1)
    votes = Counter(counted)
    count, n = votes.most_common(1)[0]
    if n >= 2:
        return Resolution("settled", count, settled_by="second person" if len(counted) == 2 else "majority")
    if len(counted) >= 3:
        return Resolution("disputed")
    return Resolution("open", needed=1)


def next_item(store: LabelStore, who: str, lease: timedelta = LEASE) -> Item | None:
    """The most important open bin this person has not answered yet, claimed for them."""
    recounts = store.recounts()
    answered = {r.item_id for r in recounts if r.who == who}
    by_item: dict[int, list[Recount]] = defaultdict(list)
    for recount in recounts:
        by_item[recount.item_id].append(recount)
    for item in store.items():  # highest priority first
        if item.id in answered or not resolve(item, by_item[item.id]).open:
            continue
        if store.claim(item.id, who, lease):
            return item
    return None


@dataclass(frozen=True)
class Label:
    photo_id: str
    count: int
    recorded: int | None
    recounts: int
    settled_by: str
    queue: str
    model_version: str


def labels(store: LabelStore) -> tuple[list[Label], list[str]]:
    """Settled counts, one per photo, and the photos left out because queues settled them differently."""
    recounts = store.recounts()
    by_item: dict[int, list[Recount]] = defaultdict(list)
    for recount in recounts:
        by_item[recount.item_id].append(recount)
    by_photo: dict[str, list[Label]] = defaultdict(list)
    for item in store.items():
        resolution = resolve(item, by_item[item.id])
        if resolution.status == "settled" and resolution.count is not None:
            by_photo[item.photo_id].append(
                Label(
                    item.photo_id,
                    resolution.count,
                    item.recorded,
                    len(by_item[item.id]),
                    resolution.settled_by,
                    item.queue,
                    item.model_version,
                )
            )
    settled, conflicting = [], []
    for photo_id, found in sorted(by_photo.items()):
        if len({label.count for label in found}) == 1:
            settled.append(found[0])
        else:
            conflicting.append(photo_id)
    return settled, conflicting


def export_labels(store: LabelStore, out: Path) -> tuple[int, list[str]]:
    """The labels CSV `binsight data index --recounts` reads: id, count, and where each came from."""
    settled, conflicting = labels(store)
    rows = [
        {
            "id": spreadsheet_safe(label.photo_id),
            "count": label.count,
            "recorded": "" if label.recorded is None else label.recorded,
            "recounts": label.recounts,
            "settled_by": label.settled_by,
            "queue": spreadsheet_safe(label.queue),
            "model_version": spreadsheet_safe(label.model_version),
        }
        for label in settled
    ]
    atomic_write_csv(out, rows, LABEL_FIELDS)
    return len(settled), conflicting


def recount_findings(store: LabelStore, queue: str) -> dict[str, str]:
    """Per photo of a queue, what its recount found, for the audit's report: whether it confirmed the
    record (the bin was right) or the model (the record was wrong)."""
    recounts = store.recounts()
    by_item: dict[int, list[Recount]] = defaultdict(list)
    for recount in recounts:
        by_item[recount.item_id].append(recount)
    findings = {}
    for item in store.items():
        if item.queue != queue:
            continue
        resolution = resolve(item, by_item[item.id])
        if resolution.status == "settled":
            if resolution.count == item.recorded:
                verdict = "the record was right"
            elif resolution.count == item.predicted:
                verdict = "confirms the model: the record was wrong"
            else:
                verdict = "the record was wrong, and the model too"
            findings[item.photo_id] = f"recounted {resolution.count}: {verdict}"
        elif resolution.status == "open":
            findings[item.photo_id] = "recount pending" if by_item[item.id] else "not recounted yet"
        else:
            findings[item.photo_id] = resolution.status.replace("_", " ")
    return findings
