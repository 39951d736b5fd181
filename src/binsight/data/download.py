"""Anonymous, parallel, resumable download of a chosen ABID subset from S3 (or any S3-compatible store).

Resumability rests on one rule: a file only appears under its final name after it was downloaded in
full and validated (written as a temporary ``.part`` file, then renamed). So a killed run leaves at
worst stray ``.part`` files, which never count as done, and a re-run fetches exactly what is missing.

Selecting by count class needs the counts first, so metadata is scanned (in a deterministic, seeded
order) into ``.cache/metadata`` until every class quota is filled; only then are images fetched.
"""

from __future__ import annotations

import io
import json
import random
import shutil
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    ConnectionClosedError,
    EndpointConnectionError,
    IncompleteReadError,
    ReadTimeoutError,
    ResponseStreamingError,
)
from PIL import Image, UnidentifiedImageError
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from binsight.data import IMAGES_DIR, METADATA_DIR
from binsight.data.abid import MetadataError, image_id_order, parse_metadata
from binsight.errors import BinsightError
from binsight.utils.io import atomic_write_bytes, atomic_write_text, read_text
from binsight.utils.progress import bar
from binsight.utils.records import JsonRecord
from binsight.utils.redact import SecretUrl
from binsight.utils.s3 import s3_client

ABID_BUCKET = "aft-vbi-pds"
CACHE_DIR = ".cache"
T = TypeVar("T")
R = TypeVar("R")

_TRANSIENT = (
    ConnectionClosedError,
    EndpointConnectionError,
    IncompleteReadError,
    ReadTimeoutError,
    ResponseStreamingError,
    ConnectionError,
    TimeoutError,
)


class DownloadConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    out: Path = Field(description="dataset directory to write")
    bucket: str = Field(ABID_BUCKET, description="bucket to read (ABID's public one by default)")
    endpoint_url: SecretUrl | None = Field(None, description="any S3-compatible endpoint (default AWS)")
    region: str = Field("us-east-1", description="the bucket's region")
    images_prefix: str = Field("bin-images/", description="where the photos are in the bucket")
    metadata_prefix: str = Field("metadata/", description="where the metadata documents are")
    ids: list[str] | None = Field(None, description="explicit image ids")
    file_list: Path | None = Field(None, description="text (one id or key per line) or JSON list")
    classes: tuple[int, int] | None = Field(None, description="inclusive count range, e.g. 0-5")
    per_class: int | None = Field(None, ge=1, description="images per count class")
    limit: int | None = Field(None, ge=1, description="stop after this many images")
    max_scan: int | None = Field(None, ge=1, description="metadata files to read at most")
    seed: int = Field(0, description="seed of the random selection order")
    workers: int = Field(16, ge=1, le=256, description="parallel connections")
    retries: int = Field(5, ge=0, le=20, description="retries per object")

    @field_validator("ids")
    @classmethod
    def _plain_ids(cls, ids: list[str] | None) -> list[str] | None:
        # An id names the files written under the dataset directory: `../x` would write outside it.
        for image_id in ids or ():
            if Path(image_id).name != image_id or image_id in ("", "..") or not image_id.isprintable():
                raise ValueError(f"{image_id!r} is not an image id (a file name without folders)")
        return ids

    @model_validator(mode="after")
    def _coherent(self) -> DownloadConfig:
        if self.ids is not None and self.file_list is not None:
            raise ValueError("give either ids or file_list, not both")
        if self.per_class is not None and self.classes is None:
            raise ValueError("per_class needs a class range (e.g. classes 0-5)")
        if self.classes is not None and not 0 <= self.classes[0] <= self.classes[1]:
            raise ValueError(f"class range {self.classes[0]}-{self.classes[1]} is empty or negative")
        return self


def _id_from_key(key: str) -> str:
    return Path(key.strip()).stem


def read_file_list(path: Path) -> list[str]:
    """Ids from a file list: text lines, a JSON list, or the JSON object of the common ~10k
    "1-5 objects" subset, which maps each count to a list of ``metadata/<id>.json`` paths."""
    text = read_text(path, "file list")
    stripped = text.lstrip()
    entries: Iterable[Any]
    if stripped.startswith(("{", "[")):
        try:
            doc = json.loads(text)
        except (ValueError, RecursionError) as exc:
            raise BinsightError(f"file list {path} is not valid JSON: {exc}") from None
        groups = list(doc.values()) if isinstance(doc, dict) else [doc]
        if not all(isinstance(group, list) for group in groups):
            raise BinsightError(
                f"file list {path} is neither a JSON list of ids nor an object of such lists",
                hint='write ["523", "100313"] or {"1": ["metadata/523.json"]}',
            )
        entries = (entry for group in groups for entry in group)
    else:
        entries = (line for line in text.splitlines() if line.strip() and not line.startswith("#"))
    ids = [_id_from_key(str(entry)) for entry in entries]
    if not ids:
        raise BinsightError(f"file list {path} names no images")
    return list(dict.fromkeys(ids))


def make_client(config: DownloadConfig) -> Any:
    """An unsigned client: ABID is public, and no credentials must be needed (or leaked)."""
    return s3_client(
        config.endpoint_url,
        unsigned=True,
        region=config.region,
        timeout_s=10,
        read_timeout_s=60,
        max_attempts=config.retries + 1,
        max_pool_connections=max(10, config.workers),
    )


def _explain_client_error(exc: ClientError, config: DownloadConfig) -> BinsightError:
    code = exc.response.get("Error", {}).get("Code", "")
    where = f"s3://{config.bucket}" + (f" at {config.endpoint_url}" if config.endpoint_url else "")
    if code in {"NoSuchBucket", "404"}:
        return BinsightError(f"bucket {where} does not exist", hint="check --bucket/--endpoint-url")
    if code in {"AccessDenied", "403"}:
        return BinsightError(
            f"anonymous access to {where} was denied", hint="the bucket must allow public reads"
        )
    return BinsightError(f"S3 error {code or 'unknown'} from {where}: {exc}")


def _with_retries(action: Callable[[], T], retries: int) -> T:
    """Retry what botocore's own retries do not cover: a body stream that breaks mid-read."""
    for attempt in range(retries + 1):
        try:
            return action()
        except _TRANSIENT:
            if attempt == retries:
                raise
            time.sleep(min(8.0, 0.2 * 2**attempt) * (0.5 + random.random()))
    raise AssertionError("unreachable")


def _get_bytes(client: Any, bucket: str, key: str, retries: int) -> bytes:
    def fetch() -> bytes:
        response = client.get_object(Bucket=bucket, Key=key)
        body = response["Body"].read()
        expected = response.get("ContentLength")
        if expected is not None and len(body) != expected:
            raise IncompleteReadError(actual_bytes=len(body), expected_bytes=expected)
        return bytes(body)

    return _with_retries(fetch, retries)


def list_ids(client: Any, config: DownloadConfig, cache: Path) -> list[str]:
    """Every image id in the bucket, from the metadata listing (cached: 536k keys take a while)."""
    listing = cache / "listing.txt"
    if listing.exists():
        return listing.read_text().split()
    ids: list[str] = []
    paginator = client.get_paginator("list_objects_v2")
    with bar(None, "listing bucket", unit="key") as progress:
        for page in paginator.paginate(Bucket=config.bucket, Prefix=config.metadata_prefix):
            keys = [obj["Key"] for obj in page.get("Contents", []) if obj["Key"].endswith(".json")]
            ids.extend(_id_from_key(key) for key in keys)
            progress.update(len(keys))
    ids.sort(key=image_id_order)
    atomic_write_text(listing, "\n".join(ids) + "\n")
    return ids


def _ordered_parallel(function: Callable[[T], R], items: list[T], workers: int) -> Iterator[tuple[T, R]]:
    """Run in parallel but yield in input order, in windows, so a caller can stop early and the
    outcome never depends on which thread finished first."""
    window = workers * 4
    with ThreadPoolExecutor(workers) as pool:
        for start in range(0, len(items), window):
            chunk = items[start : start + window]
            yield from zip(chunk, pool.map(function, chunk), strict=True)


class Downloader:
    def __init__(self, config: DownloadConfig) -> None:
        self.config = config
        self.client = make_client(config)
        self.root = Path(config.out)
        self.cache = self.root / CACHE_DIR
        self.problems: list[dict[str, str]] = []

    def _metadata_key(self, image_id: str) -> str:
        return f"{self.config.metadata_prefix}{image_id}.json"

    def _image_key(self, image_id: str) -> str:
        return f"{self.config.images_prefix}{image_id}.jpg"

    def _cached_metadata(self, image_id: str) -> bytes:
        final = self.root / METADATA_DIR / f"{image_id}.json"
        if final.exists():
            return final.read_bytes()
        cached = self.cache / METADATA_DIR / f"{image_id}.json"
        if cached.exists():
            return cached.read_bytes()
        raw = _get_bytes(self.client, self.config.bucket, self._metadata_key(image_id), self.config.retries)
        atomic_write_bytes(cached, raw)
        return raw

    def _scan_one(self, image_id: str) -> int | str:
        """The count of one id, or a reason it has none."""
        try:
            return parse_metadata(self._cached_metadata(image_id), image_id).count
        except MetadataError as exc:
            return f"bad metadata: {exc}"
        except ClientError as exc:
            return f"metadata not fetched: {exc.response.get('Error', {}).get('Code', exc)}"
        except (BotoCoreError, *_TRANSIENT) as exc:
            return f"metadata not fetched: {exc}"

    def candidates(self) -> list[str]:
        config = self.config
        if config.ids is not None:
            return list(dict.fromkeys(config.ids))
        if config.file_list is not None:
            return read_file_list(config.file_list)
        ids = list_ids(self.client, config, self.cache)
        order = np.random.default_rng(config.seed).permutation(len(ids))
        return [ids[i] for i in order]

    def select(self, candidates: list[str]) -> list[str]:
        config = self.config
        if config.classes is None:
            return candidates[: config.limit] if config.limit else candidates
        low, high = config.classes
        if config.max_scan:
            candidates = candidates[: config.max_scan]
        quota = config.per_class
        wanted = (high - low + 1) * quota if quota else None
        if config.limit:
            wanted = min(wanted, config.limit) if wanted else config.limit
        taken: Counter[int] = Counter()
        selected: list[str] = []
        with bar(len(candidates), "scanning metadata", unit="file") as progress:
            for image_id, outcome in _ordered_parallel(self._scan_one, candidates, config.workers):
                progress.update(1)
                if isinstance(outcome, str):
                    self.problems.append({"id": image_id, "problem": outcome})
                elif low <= outcome <= high and (quota is None or taken[outcome] < quota):
                    taken[outcome] += 1
                    selected.append(image_id)
                    if wanted is not None and len(selected) >= wanted:
                        break
        short = {c: quota - taken[c] for c in range(low, high + 1) if quota and taken[c] < quota}
        if short:
            self.problems.append({"id": "*", "problem": f"not enough images for classes (missing): {short}"})
        return selected

    def fetch_one(self, image_id: str) -> str:
        """Bring one image and its metadata to their final place; returns what happened."""
        image_path = self.root / IMAGES_DIR / f"{image_id}.jpg"
        meta_path = self.root / METADATA_DIR / f"{image_id}.json"
        if image_path.exists() and meta_path.exists():
            return "present"
        try:
            raw_meta = self._cached_metadata(image_id)
            parse_metadata(raw_meta, image_id)
            jpeg = (
                image_path.read_bytes()
                if image_path.exists()
                else _get_bytes(
                    self.client, self.config.bucket, self._image_key(image_id), self.config.retries
                )
            )
            check_jpeg(jpeg)
        except MetadataError as exc:
            return f"bad metadata: {exc}"
        except BadImageError as exc:
            return f"corrupt image: {exc}"
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code", "")
            return "not in bucket" if code in {"NoSuchKey", "404"} else f"S3 error {code}: {exc}"
        except (BotoCoreError, *_TRANSIENT) as exc:
            return f"network error after {self.config.retries} retries: {exc}"
        # Image first, metadata last: the pair only counts as done once both exist.
        atomic_write_bytes(image_path, jpeg)
        if not meta_path.exists():
            atomic_write_bytes(meta_path, raw_meta)
        (self.cache / METADATA_DIR / f"{image_id}.json").unlink(missing_ok=True)
        return "downloaded"

    def run(self) -> DownloadReport:
        started = time.perf_counter()
        for folder in (IMAGES_DIR, METADATA_DIR):
            (self.root / folder).mkdir(parents=True, exist_ok=True)
        try:
            self.client.head_bucket(Bucket=self.config.bucket)
            selected = self.select(self.candidates())
        except ClientError as exc:
            raise _explain_client_error(exc, self.config) from None
        except EndpointConnectionError:
            raise BinsightError(
                f"cannot reach the S3 endpoint {self.config.endpoint_url or '(AWS default)'}",
                hint="check the network or --endpoint-url",
            ) from None
        atomic_write_text(self.root / "selection.txt", "\n".join(selected) + "\n")

        outcomes: Counter[str] = Counter()
        fetch_started = time.perf_counter()
        with bar(len(selected), "downloading", unit="img") as progress:
            for image_id, outcome in _ordered_parallel(self.fetch_one, selected, self.config.workers):
                progress.update(1)
                if outcome in {"present", "downloaded"}:
                    outcomes[outcome] += 1
                else:
                    outcomes["failed"] += 1
                    self.problems.append({"id": image_id, "problem": outcome})
        fetch_seconds = time.perf_counter() - fetch_started
        if self.cache.exists() and not any((self.cache / METADATA_DIR).glob("*.json")):
            shutil.rmtree(self.cache / METADATA_DIR, ignore_errors=True)
        report = DownloadReport(
            bucket=self.config.bucket,
            endpoint_url=self.config.endpoint_url,
            selected=len(selected),
            downloaded=outcomes["downloaded"],
            already_present=outcomes["present"],
            failed=outcomes["failed"],
            problems=self.problems,
            seconds=round(time.perf_counter() - started, 3),
            images_per_second=round(outcomes["downloaded"] / fetch_seconds, 1) if fetch_seconds > 0 else None,
        )
        report.write(self.root / "download_report.json")
        return report


class BadImageError(ValueError):
    """Bytes that are not a complete, decodable image."""


def check_jpeg(data: bytes) -> tuple[int, int]:
    """Full decode (not just the header): a truncated JPEG has a valid header and a broken body."""
    if not data:
        raise BadImageError("empty file")
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            return image.size
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise BadImageError(str(exc) or type(exc).__name__) from None


class DownloadReport(JsonRecord):
    """`download_report.json`: what was selected, fetched, already there or failed (with why)."""

    bucket: str
    endpoint_url: SecretUrl | None
    selected: int
    downloaded: int
    already_present: int
    failed: int
    problems: list[dict[str, str]]  # {"id", "problem"} per photo that could not be fetched
    seconds: float
    images_per_second: float | None


def download(config: DownloadConfig) -> DownloadReport:
    return Downloader(config).run()
