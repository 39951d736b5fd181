"""What people are asked to recount, and in which order: two budgets a day.

- **Suspicious** bins, most likely to hold a wrong record: an audit run's ranking (P(record wrong)),
  or live traffic whose verdict was not `ok`. This catches inventory errors.
- **Informative** bins, whose label would teach the model most: the model is unsure (small margin
  between its two likeliest counts), it leans to the counts it learns worst (2, 3 and 4 items), and
  the bins picked are spread out (greedy farthest-point selection over the model's answers, so ten
  near-identical photos do not take ten recounts). This grows the training data where it is weakest.

`--informative-share` splits a day's budget between them (measured by simulation in
benchmarks/bench_recheck.py).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from binsight.errors import BinsightError
from binsight.inference.verdict import p_record_wrong
from binsight.monitoring.capture_record import CaptureRecord
from binsight.recheck.store import QueueEntry
from binsight.utils.io import read_csv, read_json_object, read_shards, read_text
from binsight.utils.text import whole_number

MIDDLE = (2, 3, 4)  # the counts models learn worst on ABID (docs/benchmarks.md)


def photo_id_of(image: str) -> str:
    """ABID's id is the file name without its extension (ids are strings: `00121` is not `121`)."""
    return Path(image.rstrip("/")).name.rsplit(".", 1)[0]


def _probability(text: str | None, what: str) -> float:
    try:
        value = float(text or 0.0)
    except ValueError:
        value = math.nan
    if not 0.0 <= value <= 1.0:  # NaN included
        raise BinsightError(
            f"{what} is {text!r}, not a probability", hint="use the audit.csv `binsight audit` wrote"
        )
    return value


def from_audit(folder: Path, limit: int | None = None) -> list[QueueEntry]:
    """The flagged bins of `binsight audit ... --out FOLDER`, most suspicious first."""
    ranked = folder / "audit.csv"
    if not ranked.is_file():
        raise BinsightError(f"no audit.csv in {folder}", hint="run `binsight audit BINS --out FOLDER` first")
    summary_file = folder / "audit.json"
    summary = read_json_object(summary_file, "audit summary") if summary_file.is_file() else {}
    version = str(summary.get("model_version", ""))
    entries = []
    for row in read_csv(ranked):
        if row.get("verdict") not in ("mismatch", "review") or row.get("problem"):
            continue
        image = row["image"].removeprefix("'")  # audit.csv quotes cells a spreadsheet would evaluate
        entries.append(
            QueueEntry(
                photo_id=photo_id_of(image),
                image=image,
                queue=f"audit:{folder.name}",
                reason="suspicious",
                priority=_probability(row.get("p_record_wrong"), f"p_record_wrong of {image} in {ranked}"),
                recorded=whole_number(row.get("recorded_quantity")),
                predicted=whole_number(row.get("predicted_count")),
                model_version=version,
            )
        )
    return entries[:limit] if limit else entries


def from_list(path: Path, queue: str | None = None) -> list[QueueEntry]:
    """A plain list: a CSV with an image column (and optionally recorded_quantity), or one image per
    line; the order is the priority."""
    if path.suffix.lower() == ".csv":
        rows = read_csv(path)
        images = [(r.get("image") or r.get("s3_uri") or "", r.get("recorded_quantity")) for r in rows]
    else:
        images = [(line.strip(), None) for line in read_text(path).splitlines() if line.strip()]
    images = [(image, recorded) for image, recorded in images if image and not image.startswith("#")]
    if not images:
        raise BinsightError(f"{path} lists no images")
    name = queue or f"list:{path.name}"
    entries = []
    for i, (image, recorded) in enumerate(images):
        count = whole_number(recorded)
        if count is None and (recorded or "").strip():
            raise BinsightError(
                f"recorded_quantity {recorded!r} of {image} in {path} is not a whole number",
                hint="leave it empty where the record is unknown",
            )
        priority = float(len(images) - i)  # the list's order
        entries.append(QueueEntry(photo_id_of(image), image, name, "suspicious", priority, count))
    return entries


def from_traffic(capture_dir: Path) -> list[QueueEntry]:
    """Captured requests that named an S3 photo and a recorded quantity the model doubted."""
    entries: dict[str, QueueEntry] = {}
    for path in sorted(capture_dir.glob("capture-*.jsonl")):
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            record = CaptureRecord.parse(line)
            if (
                record is None
                or record.expected_count is None
                or not record.source.startswith("s3://")
                or record.verdict in (None, "ok")
            ):
                continue
            # A capture without probabilities cannot be weighed: first in line, as before.
            wrong = (
                float(p_record_wrong(np.asarray(record.probabilities), record.expected_count)[0])
                if record.probabilities
                else 1.0
            )
            entries[record.source] = QueueEntry(
                photo_id_of(record.source),
                record.source,
                f"traffic:{capture_dir.name}",
                "suspicious",
                wrong,
                record.expected_count,
                record.count,
                record.model_version,
            )
    return sorted(entries.values(), key=lambda e: -e.priority)


def informative_order(probabilities: np.ndarray, k: int | None = None) -> list[int]:
    """Rows to recount to teach the model most, best first: uncertain, leaning to the middle counts,
    and spread out over the answers' distributions. Spread is measured between probability vectors,
    not image embeddings: normalised embeddings of 384+ dimensions are all about equally far apart, so
    they spread nothing (measured: docs/benchmarks.md, the re-check simulation)."""
    probabilities = np.asarray(probabilities, dtype=np.float64)
    n = len(probabilities)
    k = n if k is None else min(k, n)
    top2 = np.sort(probabilities, axis=1)[:, -2:]
    uncertainty = 1.0 - (top2[:, 1] - top2[:, 0])  # 1 - margin
    middle = probabilities[:, [c for c in MIDDLE if c < probabilities.shape[1]]].sum(axis=1)
    score = uncertainty * (0.5 + middle)
    space = probabilities / (np.linalg.norm(probabilities, axis=1, keepdims=True) + 1e-12)
    chosen: list[int] = []
    # Greedy: the best score, discounted by closeness to what is already chosen.
    distance = np.full(n, 2.0)
    available = np.ones(n, dtype=bool)
    for _ in range(k):
        value = np.where(available, score * np.minimum(1.0, distance), -np.inf)
        best = int(np.argmax(value))
        chosen.append(best)
        available[best] = False
        distance = np.minimum(distance, np.linalg.norm(space - space[best], axis=1))
    return chosen


def split_budget(
    suspicious: list[QueueEntry], informative: list[QueueEntry], budget: int, share: float
) -> list[QueueEntry]:
    """`budget` bins for today: `share` of them informative, the rest suspicious (each list best
    first); a list too short leaves its place to the other."""
    n_informative = min(len(informative), round(budget * share))
    n_suspicious = min(len(suspicious), budget - n_informative)
    n_informative = min(len(informative), budget - n_suspicious)
    return suspicious[:n_suspicious] + informative[:n_informative]


def from_predictions(folder: Path, k: int) -> list[QueueEntry]:
    """The `k` most informative photos of a `binsight predict ... --out FOLDER` run (its Parquet
    shards), for the informative budget."""
    shards = sorted((folder / "shards").glob("part-*.parquet"))
    if not shards:
        raise BinsightError(
            f"no prediction shards under {folder}", hint="run `binsight predict SOURCE --out FOLDER`"
        )
    table = read_shards(shards)
    problems = table.column("problem").to_pylist()
    keep = [i for i, p in enumerate(problems) if not p]
    images = [table.column("image")[i].as_py() for i in keep]
    probabilities = np.asarray([table.column("probabilities")[i].as_py() for i in keep], dtype=np.float64)
    predicted = probabilities.argmax(axis=1)
    version = (table.schema.metadata or {}).get(b"binsight.model_version", b"").decode()
    order = informative_order(probabilities, k=k)
    return [
        QueueEntry(
            photo_id_of(images[i]),
            images[i],
            f"informative:{folder.name}",
            "informative",
            float(k - rank),
            None,
            int(predicted[i]),
            version,
        )
        for rank, i in enumerate(order)
    ]
