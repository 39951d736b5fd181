"""What a batch run reads: a manifest (CSV or a list of URIs, local or on S3), or every photo under a
folder or S3 prefix. A listing is taken once and kept with the run (`manifest.parquet`), so a resumed
run works through the same photos even if the prefix has changed since.

Recorded quantities come from the manifest's quantity column, or, for a folder or prefix in the ABID
layout, from the metadata document beside each photo (`.../metadata/<id>.json`), read by the same
tasks that fetch the photos.
"""

from __future__ import annotations

import csv
import io
import posixpath
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa

from binsight.errors import BinsightError
from binsight.utils.io import read_csv, read_text
from binsight.utils.progress import bar
from binsight.utils.s3 import S3AllowList, S3Uri, parse_s3_uri, s3_client
from binsight.utils.text import whole_number

IMAGE_COLUMNS = ("image", "image_path", "path", "s3_uri", "uri")
QUANTITY_COLUMNS = ("recorded_quantity", "recorded", "quantity", "expected_quantity", "expected_count")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
NO_RECORD = -1  # the manifest row carries no recorded quantity


@dataclass
class Manifest:
    """One row per photo, as columns (millions of rows stay a few hundred MB)."""

    images: list[str]
    recorded: list[int]  # NO_RECORD where unknown or still to be read from `record_sources`
    record_sources: list[str]  # ABID metadata document per photo, or "" where `recorded` is final
    rejected: list[dict[str, str]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.images)

    def table(self) -> pa.Table:
        return pa.table(
            {
                "row": pa.array(range(len(self.images)), pa.int64()),
                "image": pa.array(self.images, pa.string()),
                "recorded": pa.array(self.recorded, pa.int64()),
                "record_source": pa.array(self.record_sources, pa.string()),
            }
        )

    @classmethod
    def from_table(cls, table: pa.Table) -> Manifest:
        return cls(
            table.column("image").to_pylist(),
            table.column("recorded").to_pylist(),
            table.column("record_source").to_pylist(),
        )


def _rows_from_csv(rows: list[dict[str, str]], where: str, need_quantity: bool) -> Manifest:
    if not rows:
        raise BinsightError(f"{where} has no rows")
    columns = set(rows[0])
    image_column = next((c for c in IMAGE_COLUMNS if c in columns), None)
    quantity_column = next((c for c in QUANTITY_COLUMNS if c in columns), None)
    if image_column is None or (need_quantity and quantity_column is None):
        wanted = f"an image column ({' or '.join(IMAGE_COLUMNS)})"
        if need_quantity:
            wanted += f" and a quantity column ({' or '.join(QUANTITY_COLUMNS)})"
        raise BinsightError(f"{where} needs {wanted}; it has {sorted(columns)}")
    images, recorded, rejected = [], [], []
    first_line: dict[str, int] = {}
    for line, row in enumerate(rows, start=2):
        image = (row.get(image_column) or "").strip()
        quantity = (row.get(quantity_column) or "").strip() if quantity_column else ""
        count = whole_number(quantity)
        if not image or (need_quantity and count is None):
            rejected.append({"line": str(line), "image": image, "problem": f"bad row: quantity {quantity!r}"})
            continue
        if image in first_line:  # scored and ranked twice otherwise, and counted twice in the summary
            rejected.append(
                {"line": str(line), "image": image, "problem": f"duplicate of line {first_line[image]}"}
            )
            continue
        first_line[image] = line
        images.append(image)
        recorded.append(NO_RECORD if count is None else count)
    if not images:
        examples = "; ".join(f"line {r['line']}: {r['problem']}" for r in rejected[:3])
        raise BinsightError(
            f"none of the {len(rejected)} rows of {where} can be used ({examples})",
            hint=f"each row needs an image and a whole-number {quantity_column or 'quantity'}",
        )
    return Manifest(images, recorded, [""] * len(images), rejected)


def read_manifest_file(path: Path, need_quantity: bool) -> Manifest:
    """A local CSV (image and, for an audit, recorded quantity) or a text file of one image per line.
    Relative image paths are relative to the manifest, as a person writing it expects."""
    if not path.is_file():
        raise BinsightError(f"no manifest at {path}")
    if path.suffix.lower() == ".csv":
        manifest = _rows_from_csv(read_csv(path), str(path), need_quantity)
    else:
        manifest = _lines(read_text(path), str(path), need_quantity)
    manifest.images = [
        image if image.startswith("s3://") or Path(image).is_absolute() else str(path.parent / image)
        for image in manifest.images
    ]
    return manifest


def _lines(text: str, where: str, need_quantity: bool) -> Manifest:
    if need_quantity:
        raise BinsightError(
            f"{where} lists images without recorded quantities",
            hint="an audit needs a CSV with image and recorded_quantity columns",
        )
    images: list[str] = []
    rejected: list[dict[str, str]] = []
    first_line: dict[str, int] = {}
    for line, raw in enumerate(text.splitlines(), start=1):
        image = raw.strip()
        if not image or image.startswith("#"):
            continue
        if image in first_line:
            rejected.append(
                {"line": str(line), "image": image, "problem": f"duplicate of line {first_line[image]}"}
            )
            continue
        first_line[image] = line
        images.append(image)
    if not images:
        raise BinsightError(f"{where} lists no images")
    return Manifest(images, [NO_RECORD] * len(images), [""] * len(images), rejected)


def confine_to(manifest: Manifest, location: S3Uri, allowed_roots: tuple[str, ...]) -> Manifest:
    """A manifest read from S3 names objects under its own folder (relative names are resolved there),
    or under a root the operator allowed. Anyone who can write that one object must not be able to make
    the run read the machine's files (`/proc/self/environ`, a key file) or another bucket."""
    folder = location.key.rsplit("/", 1)[0] + "/" if "/" in location.key else ""
    own = S3AllowList((S3Uri(location.bucket, folder),))
    s3_roots = S3AllowList.parse([r for r in allowed_roots if r.startswith("s3://")])
    local_roots = [Path(r).resolve() for r in allowed_roots if not r.startswith("s3://")]
    images, recorded, sources = [], [], []
    rejected = list(manifest.rejected)
    kept: set[str] = set()
    for image, count, source in zip(manifest.images, manifest.recorded, manifest.record_sources, strict=True):
        problem = ""
        if image.startswith("s3://"):
            try:
                target = parse_s3_uri(image)
            except BinsightError as exc:
                problem = f"bad S3 URI: {exc.message}"
            else:
                if not (own.allows(target) or s3_roots.allows(target)):
                    problem = f"outside {own} (allow more with --allow-root)"
        elif "://" in image or image.startswith(("/", "~")):
            resolved = Path(image).expanduser().resolve() if "://" not in image else None
            if resolved is None or not any(resolved.is_relative_to(root) for root in local_roots):
                problem = "a manifest on S3 may not name local files (allow a folder with --allow-root)"
        else:
            key = posixpath.normpath(folder + image)
            if key == ".." or key.startswith("../") or not key.startswith(folder):
                problem = f"outside {own}"
            else:
                image = f"s3://{location.bucket}/{key}"
        if not problem and image in kept:
            problem = "duplicate of an earlier row (the same object)"
        if problem:
            rejected.append({"line": "", "image": image, "problem": problem})
            continue
        kept.add(image)
        images.append(image)
        recorded.append(count)
        sources.append(source)
    if not images:
        raise BinsightError(
            f"none of the rows of s3://{location.bucket}/{location.key} may be read",
            hint="a manifest on S3 names objects under its own folder; --allow-root adds others",
        )
    return Manifest(images, recorded, sources, rejected)


def abid_metadata_for(image: str) -> str:
    """`<root>/<images folder>/<id>.jpg` -> `<root>/metadata/<id>.json`, the ABID layout."""
    folder, name = posixpath.split(image)
    stem = posixpath.splitext(name)[0]
    return posixpath.join(posixpath.dirname(folder), "metadata", stem + ".json")


def _list_s3(uri: str, client: Any) -> list[str]:
    location = parse_s3_uri(uri, allow_prefix=True)
    prefix = location.key if not location.key or location.key.endswith("/") else location.key + "/"
    found: list[str] = []
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=location.bucket, Prefix=prefix)
    with bar(None, f"listing {uri}", unit="photo") as progress:
        for page in pages:
            keys = [o["Key"] for o in page.get("Contents", ()) if o["Key"].lower().endswith(IMAGE_SUFFIXES)]
            found.extend(f"s3://{location.bucket}/{key}" for key in keys)
            progress.update(len(keys))
    return found


def list_source(
    source: str,
    need_quantity: bool,
    endpoint_url: str | None = None,
    unsigned: bool = False,
    allowed_roots: tuple[str, ...] = (),
) -> Manifest:
    """The photos a run covers, in a stable order (listing order of the store, sorted)."""
    lowered = source.lower()
    is_manifest = lowered.endswith((".csv", ".txt"))
    if source.startswith("s3://"):
        client = s3_client(endpoint_url, unsigned=unsigned)
        if is_manifest:
            from botocore.exceptions import BotoCoreError, ClientError

            location = parse_s3_uri(source)
            try:
                body = client.get_object(Bucket=location.bucket, Key=location.key)["Body"].read()
            except (ClientError, BotoCoreError) as exc:
                raise BinsightError(f"cannot read the manifest {source}: {exc}") from None
            try:
                text = body.decode("utf-8-sig")
            except UnicodeDecodeError:
                raise BinsightError(
                    f"{source} is not UTF-8 text", hint="save the manifest as UTF-8"
                ) from None
            if lowered.endswith(".csv"):
                listed = _rows_from_csv(list(csv.DictReader(io.StringIO(text))), source, need_quantity)
            else:
                listed = _lines(text, source, need_quantity)
            return confine_to(listed, location, allowed_roots)
        try:
            images = sorted(_list_s3(source, client))
        except BinsightError:
            raise
        except Exception as exc:  # botocore's connection and client errors
            raise BinsightError(f"cannot list {source}: {exc}") from None
    elif is_manifest:
        return read_manifest_file(Path(source), need_quantity)
    else:
        root = Path(source)
        if not root.is_dir():
            raise BinsightError(
                f"{source} is neither a manifest (.csv, .txt), a folder nor an s3:// prefix",
                hint="give a CSV of images, a folder of photos, or s3://bucket/prefix/",
            )
        images = sorted(str(p) for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not images:
        raise BinsightError(f"no photos ({', '.join(IMAGE_SUFFIXES)}) under {source}")
    records = [abid_metadata_for(image) for image in images] if need_quantity else [""] * len(images)
    return Manifest(images, [NO_RECORD] * len(images), records)
