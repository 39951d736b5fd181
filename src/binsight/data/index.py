"""The dataset index: one row per usable photo, built by reading every image and metadata file, in
any of the layouts `binsight.data.layouts` recognises.

Broken files are skipped and listed in ``index_report.json``, never fatal: one bad JPEG among 500k
must not stop the index.
"""

from __future__ import annotations

import io
import json
import os
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, UnidentifiedImageError
from pydantic import BaseModel, ConfigDict, Field

from binsight.data.abid import MetadataError, image_id_order, parse_metadata
from binsight.data.layouts import Entry, Layout, discover
from binsight.errors import BinsightError
from binsight.utils.io import atomic_write_csv, atomic_write_json, read_csv
from binsight.utils.progress import track
from binsight.utils.text import whole_number

INDEX_FILE = "index.csv"
INDEX_FIELDS = (
    "id",
    "image",
    "count",
    "recorded_count",  # the inventory record (EXPECTED_QUANTITY or the labels file), kept beside a recount
    "count_source",  # "record", or "recount" where a person's recount outranks the record
    "quantity_sum",
    "quantity_mismatch",
    "width",
    "height",
    "bytes",
    "n_products",
    "total_weight_lb",
    "max_dimension_in",
    "items",
)


# One line of index.csv as it is built (numbers stay numbers until the CSV writer writes them).
IndexRow = dict[str, str | int | float]


@dataclass(frozen=True)
class IndexResult:
    rows: list[IndexRow]
    skipped: list[dict[str, str]]
    path: Path
    layout: Layout


def _inspect_image(path: Path) -> tuple[int, int]:
    """Decode the whole stream at 1/8 scale (JPEG draft mode): catches truncated files at a fraction
    of the cost of a full decode."""
    data = path.read_bytes()
    if not data:
        raise ValueError("empty image file")
    try:
        with Image.open(io.BytesIO(data)) as image:
            size = image.size
            image.draft("RGB", (max(1, size[0] // 8), max(1, size[1] // 8)))
            image.load()
            return size
    except (UnidentifiedImageError, OSError, SyntaxError, Image.DecompressionBombError) as exc:
        raise ValueError(f"corrupt image: {exc}") from None


def _index_row(entry: Entry, base: Path) -> IndexRow | str:
    record = None
    if entry.metadata is not None:
        try:
            record = parse_metadata(entry.metadata.read_bytes(), entry.image_id)
        except FileNotFoundError:
            return "metadata file missing"
        except MetadataError as exc:
            if entry.count is None:
                return f"bad metadata: {exc}"
            # The labels file gives the count; a broken optional metadata file only loses item details.
    try:
        width, height = _inspect_image(entry.image)
    except FileNotFoundError:
        return "image file missing"
    except ValueError as exc:
        return str(exc)
    count = entry.count if entry.count is not None else record.count if record else 0
    items = record.items if record else ()
    return {
        "id": entry.image_id,
        "image": Path(os.path.relpath(entry.image, base)).as_posix(),
        "count": count,
        "recorded_count": count,
        "count_source": "record",
        "quantity_sum": record.quantity_sum if record else "",
        "quantity_mismatch": int(record is not None and count != record.quantity_sum),
        "width": width,
        "height": height,
        "bytes": entry.image.stat().st_size,
        "n_products": len(items) if record else "",
        "total_weight_lb": record.total_weight_lb if record and record.total_weight_lb is not None else "",
        "max_dimension_in": record.max_dimension_in if record and record.max_dimension_in is not None else "",
        "items": json.dumps(
            [
                {
                    "asin": i.asin,
                    "quantity": i.quantity,
                    "length_in": i.length_in,
                    "width_in": i.width_in,
                    "height_in": i.height_in,
                    "weight_lb": i.weight_lb,
                }
                for i in items
            ],
            separators=(",", ":"),
        ),
    }


class IndexConfig(BaseModel):
    """`binsight data index`."""

    model_config = ConfigDict(extra="forbid")

    data: Path = Field(
        description="photo folder: bucket layout, <count>/<id>.jpg folders, or images/ with labels.csv"
    )
    labels: Path | None = Field(None, description="CSV of id,count (default: DATA/labels.csv)")
    recounts: Path | None = Field(
        None, description="people's recounts (`binsight recheck export`): they outrank the recorded counts"
    )
    out: Path | None = Field(None, description="where index.csv (and then splits/) go (default: DATA)")
    workers: int | None = Field(None, ge=1, description="parallel readers (default: all cores)")


def index_dataset(config: IndexConfig) -> IndexResult:
    return build_index(config.data, config.workers, config.out, config.labels, config.recounts)


def build_index(
    root: str | os.PathLike[str],
    workers: int | None = None,
    out: str | os.PathLike[str] | None = None,
    labels: str | os.PathLike[str] | None = None,
    recounts: str | os.PathLike[str] | None = None,
) -> IndexResult:
    """Index the photos under `root` in whichever layout it has; the index (and later the splits) go to
    `out`, default `root` itself, with image paths relative to it (a read-only photo folder works).
    `recounts` (a labels CSV from `binsight recheck export`) outranks the recorded count of the photos it
    names; both are kept (`count`, `recorded_count`)."""
    root = Path(root)
    base = Path(out) if out else root
    found = discover(root, Path(labels) if labels else None)
    entries = sorted(found.entries, key=lambda e: image_id_order(e.image_id))
    if not entries and not found.problems:
        raise BinsightError(f"{root} holds no images or metadata", hint="download or synthesize data first")

    rows: list[IndexRow] = []
    skipped: list[dict[str, str]] = [{"id": i, "problem": p} for i, p in found.problems]
    base.mkdir(parents=True, exist_ok=True)
    with ThreadPoolExecutor(workers or min(8, (os.cpu_count() or 1) * 2)) as pool:
        results = pool.map(lambda entry: _index_row(entry, base), entries)
        for entry, result in track(zip(entries, results, strict=True), len(entries), "indexing", "img"):
            if isinstance(result, str):
                skipped.append({"id": entry.image_id, "problem": result})
            else:
                rows.append(result)
    skipped.sort(key=lambda s: image_id_order(s["id"]))
    recounted = apply_recounts(rows, Path(recounts)) if recounts else 0
    index_path = base / INDEX_FILE
    atomic_write_csv(index_path, rows, INDEX_FIELDS)
    mismatches = [r["id"] for r in rows if r["quantity_mismatch"]]
    atomic_write_json(
        base / "index_report.json",
        {
            "layout": found.layout,
            "source": str(root),
            "indexed": len(rows),
            "skipped": skipped,
            "skipped_by_problem": dict(Counter(s["problem"].split(":")[0].split(" (")[0] for s in skipped)),
            "recounted": recounted,
            "quantity_mismatches": len(mismatches),
            "quantity_mismatch_ids": mismatches[:1000],
        },
    )
    return IndexResult(rows=rows, skipped=skipped, path=index_path, layout=found.layout)


def apply_recounts(rows: list[IndexRow], path: Path) -> int:
    """Set `count` from people's recounts (`id,count` CSV); returns how many photos changed source."""
    recounted: dict[str, int] = {}
    for line in read_csv(path):
        count = whole_number(line.get("count"))
        if "id" not in line or count is None:
            raise BinsightError(
                f"{path} is not a recount labels file (id,count)",
                hint="write it with `binsight recheck export`",
            )
        recounted[line["id"]] = count
    changed = 0
    for row in rows:
        if (count := recounted.get(str(row["id"]))) is not None:
            row["count"], row["count_source"] = count, "recount"
            changed += 1
    return changed


def load_index(path: str | os.PathLike[str]) -> list[dict[str, str]]:
    """Rows of an index or split file; a directory means its index.csv."""
    path = Path(path)
    if path.is_dir():
        path = path / INDEX_FILE
    if not path.exists():
        raise BinsightError(f"no index at {path}", hint="run `binsight data index DATA_DIR` first")
    return checked_rows(read_csv(path), path)


def checked_rows(rows: list[dict[str, str]], path: Path) -> list[dict[str, str]]:
    """`rows` of an index or split file, refused whole if any lacks a column or a count: every stage
    after this one reads `count` as a number."""
    missing = {"id", "image", "count"} - set(rows[0].keys() if rows else INDEX_FIELDS)
    if missing:
        raise BinsightError(f"{path} is not a binsight index (missing columns {sorted(missing)})")
    for line, row in enumerate(rows, start=2):
        if whole_number(row["count"]) is None:
            raise BinsightError(
                f"{path} line {line}: count {row['count']!r} is not a whole number",
                hint="index the photos again (`binsight data index`) rather than editing the file",
            )
    return rows
