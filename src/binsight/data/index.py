"""The dataset index: one row per usable photo, built by reading every image and metadata file.

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
from typing import Any

from PIL import Image, UnidentifiedImageError

from binsight.data import IMAGES_DIR, METADATA_DIR
from binsight.data.abid import MetadataError, image_id_order, parse_metadata
from binsight.errors import BinsightError
from binsight.utils.io import atomic_write_csv, atomic_write_json, read_csv
from binsight.utils.progress import track

INDEX_FILE = "index.csv"
INDEX_FIELDS = (
    "id",
    "image",
    "count",
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


@dataclass(frozen=True)
class IndexResult:
    rows: list[dict[str, Any]]
    skipped: list[dict[str, str]]
    path: Path


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


def _index_row(root: Path, image_id: str) -> dict[str, Any] | str:
    image_path = root / IMAGES_DIR / f"{image_id}.jpg"
    meta_path = root / METADATA_DIR / f"{image_id}.json"
    try:
        record = parse_metadata(meta_path.read_bytes(), image_id)
    except FileNotFoundError:
        return "metadata file missing"
    except MetadataError as exc:
        return f"bad metadata: {exc}"
    try:
        width, height = _inspect_image(image_path)
    except FileNotFoundError:
        return "image file missing"
    except ValueError as exc:
        return str(exc)
    return {
        "id": image_id,
        "image": f"{IMAGES_DIR}/{image_id}.jpg",
        "count": record.count,
        "quantity_sum": record.quantity_sum,
        "quantity_mismatch": int(record.quantity_mismatch),
        "width": width,
        "height": height,
        "bytes": image_path.stat().st_size,
        "n_products": len(record.items),
        "total_weight_lb": record.total_weight_lb if record.total_weight_lb is not None else "",
        "max_dimension_in": record.max_dimension_in if record.max_dimension_in is not None else "",
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
                for i in record.items
            ],
            separators=(",", ":"),
        ),
    }


def build_index(root: str | os.PathLike[str], workers: int | None = None) -> IndexResult:
    root = Path(root)
    images_dir, meta_dir = root / IMAGES_DIR, root / METADATA_DIR
    if not images_dir.is_dir() and not meta_dir.is_dir():
        raise BinsightError(
            f"{root} is not a dataset directory (no {IMAGES_DIR}/ or {METADATA_DIR}/ inside)",
            hint="run `binsight data download` or `binsight data synth` first",
        )
    image_ids = {p.stem for p in images_dir.glob("*.jpg")} if images_dir.is_dir() else set()
    meta_ids = {p.stem for p in meta_dir.glob("*.json")} if meta_dir.is_dir() else set()
    ids = sorted(image_ids | meta_ids, key=image_id_order)
    if not ids:
        raise BinsightError(f"{root} holds no images or metadata", hint="download or synthesize data first")

    rows: list[dict[str, Any]] = []
    skipped: list[dict[str, str]] = []
    with ThreadPoolExecutor(workers or min(8, (os.cpu_count() or 1) * 2)) as pool:
        results = pool.map(lambda i: _index_row(root, i), ids)
        for image_id, result in track(zip(ids, results, strict=True), len(ids), "indexing", "img"):
            if isinstance(result, str):
                skipped.append({"id": image_id, "problem": result})
            else:
                rows.append(result)
    index_path = root / INDEX_FILE
    atomic_write_csv(index_path, rows, INDEX_FIELDS)
    mismatches = [r["id"] for r in rows if r["quantity_mismatch"]]
    atomic_write_json(
        root / "index_report.json",
        {
            "indexed": len(rows),
            "skipped": skipped,
            "skipped_by_problem": dict(Counter(s["problem"].split(":")[0] for s in skipped)),
            "quantity_mismatches": len(mismatches),
            "quantity_mismatch_ids": mismatches[:1000],
        },
    )
    return IndexResult(rows=rows, skipped=skipped, path=index_path)


def load_index(path: str | os.PathLike[str]) -> list[dict[str, str]]:
    """Rows of an index or split file; a directory means its index.csv."""
    path = Path(path)
    if path.is_dir():
        path = path / INDEX_FILE
    if not path.exists():
        raise BinsightError(f"no index at {path}", hint="run `binsight data index DATA_DIR` first")
    rows = read_csv(path)
    missing = {"id", "image", "count"} - set(rows[0].keys() if rows else INDEX_FIELDS)
    if missing:
        raise BinsightError(f"{path} is not a binsight index (missing columns {sorted(missing)})")
    return rows
