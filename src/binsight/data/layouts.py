"""The shapes in which people hold ABID photos, recognised so that `binsight data index` takes any of them.

- ``bucket``: ``images/<id>.jpg`` with ``metadata/<id>.json`` (the count is EXPECTED_QUANTITY), as
  `binsight data download` writes it.
- ``labels-csv``: a CSV with ``id`` and ``count`` columns (``labels.csv`` in the root, or any file passed
  as ``--labels``) beside ``images/<id>.jpg``. Metadata files present for some ids add item details.
- ``count-folders``: ``<root>/<count>/<id>.jpg``, what the common download scripts produce.

ABID ids are strings (``121`` and ``00121`` are different bins): they are never parsed as numbers.
"""

from __future__ import annotations

import csv
import io
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from binsight.data import IMAGES_DIR, METADATA_DIR
from binsight.errors import BinsightError
from binsight.utils.io import read_text
from binsight.utils.text import whole_number

Layout = Literal["bucket", "labels-csv", "count-folders"]
LABELS_FILE = "labels.csv"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


@dataclass(frozen=True)
class Entry:
    """One photo to index. `count` is None where only the metadata file can say it (bucket layout)."""

    image_id: str
    image: Path
    metadata: Path | None
    count: int | None


@dataclass(frozen=True)
class Discovered:
    layout: Layout
    entries: list[Entry]
    problems: list[tuple[str, str]]  # (id, problem) for entries that cannot be indexed at all


def _images_by_id(folder: Path) -> dict[str, Path]:
    return (
        {p.stem: p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES} if folder.is_dir() else {}
    )


def _metadata_path(root: Path, image_id: str) -> Path | None:
    path = root / METADATA_DIR / f"{image_id}.json"
    return path if path.is_file() else None


def _from_labels(root: Path, labels: Path) -> Discovered:
    reader = csv.DictReader(io.StringIO(read_text(labels), newline=""))
    try:
        columns = {c.strip().lower(): c for c in reader.fieldnames or []}
        if not {"id", "count"} <= columns.keys():
            raise BinsightError(
                f"{labels} needs columns id and count (it has {', '.join(columns) or 'none'})",
                hint="write one row per photo: id,count",
            )
        # A short row leaves its missing cells None.
        rows = [((row[columns["id"]] or "").strip(), row[columns["count"]] or "") for row in reader]
    except csv.Error as exc:
        raise BinsightError(f"{labels} is not a readable CSV: {exc}") from None
    images = _images_by_id(root / IMAGES_DIR) or _images_by_id(root)
    entries, problems = [], []
    seen: Counter[str] = Counter(image_id for image_id, _ in rows)
    for image_id, raw_count in rows:
        if seen[image_id] > 1:
            problems.append((image_id, f"id listed {seen[image_id]} times in {labels.name}"))
        elif (count := whole_number(raw_count)) is None:
            problems.append((image_id, f"count {raw_count.strip()!r} is not a whole number"))
        elif image_id not in images:
            problems.append((image_id, "image file missing"))
        else:
            entries.append(Entry(image_id, images[image_id], _metadata_path(root, image_id), count))
    return Discovered("labels-csv", entries, problems)


def _from_bucket(root: Path) -> Discovered:
    images = _images_by_id(root / IMAGES_DIR)
    meta_ids = {p.stem for p in (root / METADATA_DIR).glob("*.json")}
    entries = [
        Entry(i, images.get(i, root / IMAGES_DIR / f"{i}.jpg"), root / METADATA_DIR / f"{i}.json", None)
        for i in meta_ids
    ]
    problems = [(i, "metadata file missing") for i in images.keys() - meta_ids]
    return Discovered("bucket", entries, problems)


def _from_count_folders(root: Path, folders: list[tuple[int, Path]]) -> Discovered:
    found: dict[str, list[tuple[int, Path]]] = {}
    for count, folder in folders:  # `3/` and `03/` are both 3
        for image_id, path in _images_by_id(folder).items():
            found.setdefault(image_id, []).append((count, path))
    entries, problems = [], []
    for image_id, places in found.items():
        if len(places) > 1:
            counts = ", ".join(str(count) for count, _ in sorted(places))
            problems.append((image_id, f"photo in several count folders ({counts})"))
        else:
            count, path = places[0]
            entries.append(Entry(image_id, path, _metadata_path(root, image_id), count))
    return Discovered("count-folders", entries, problems)


def discover(root: Path, labels: Path | None = None) -> Discovered:
    """Which layout `root` has, and the photos in it; a labels file, when given, decides."""
    if not root.is_dir():
        raise BinsightError(
            f"{root} is not a dataset directory (no such folder)",
            hint="pass the folder that holds the photos",
        )
    if labels is not None or (root / LABELS_FILE).is_file():
        return _from_labels(root, labels or root / LABELS_FILE)
    if any((root / METADATA_DIR).glob("*.json")):
        return _from_bucket(root)
    count_folders = [
        (count, p) for p in root.iterdir() if p.is_dir() and (count := whole_number(p.name)) is not None
    ]
    if count_folders:
        return _from_count_folders(root, count_folders)
    raise BinsightError(
        f"{root} holds no photos in a layout binsight knows",
        hint=f"use {IMAGES_DIR}/<id>.jpg with {METADATA_DIR}/<id>.json (`binsight data download`), "
        f"<count>/<id>.jpg folders, or {IMAGES_DIR}/ with a {LABELS_FILE} of id,count (or --labels FILE)",
    )
