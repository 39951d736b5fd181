"""Folders that outlive the machine: the same small API over a local folder and an S3 prefix.

Used by the model registry (versions and aliases) and by training (checkpoints that a preemptible
job resumes from on another machine). A write is atomic on both: a rename on disk, one PUT on S3.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import tempfile
from pathlib import Path
from typing import Protocol

from binsight.errors import BinsightError
from binsight.utils.io import atomic_write_bytes
from binsight.utils.s3 import parse_s3_uri, s3_client


class Store(Protocol):
    url: str

    def read(self, key: str) -> bytes | None: ...
    def read_tagged(self, key: str) -> tuple[bytes | None, str | None]: ...
    def write(self, key: str, data: bytes) -> None: ...
    def write_if(self, key: str, data: bytes, tag: str | None) -> bool: ...
    def create(self, key: str, data: bytes) -> bool: ...
    def put_file(self, key: str, path: Path) -> None: ...
    def get_file(self, key: str, path: Path) -> None: ...
    def list(self, prefix: str) -> list[str]: ...


class LocalStore:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.url = str(root)

    def read(self, key: str) -> bytes | None:
        try:
            return (self.root / key).read_bytes()
        except FileNotFoundError:
            return None

    def write(self, key: str, data: bytes) -> None:
        atomic_write_bytes(self.root / key, data)

    def read_tagged(self, key: str) -> tuple[bytes | None, str | None]:
        data = self.read(key)
        return data, None if data is None else hashlib.sha256(data).hexdigest()

    def write_if(self, key: str, data: bytes, tag: str | None) -> bool:
        """Write only if the object is still what was read (`tag`; None: still absent). Writers of one
        folder take its lock file for the compare and the rename, so none overwrites another unseen."""
        path = self.root / key
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path.parent / ".lock", "a+b") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                if self.read_tagged(key)[1] != tag:
                    return False
                atomic_write_bytes(path, data)
                return True
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def create(self, key: str, data: bytes) -> bool:
        """Write only if absent (claims a version number against concurrent registrations)."""
        path = self.root / key
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            with open(path, "xb") as handle:
                handle.write(data)
            return True
        except FileExistsError:
            return False

    def put_file(self, key: str, path: Path) -> None:
        atomic_write_bytes(self.root / key, path.read_bytes())

    def get_file(self, key: str, path: Path) -> None:
        source = self.root / key
        if not source.exists():
            raise BinsightError(f"{source} is missing from the registry")
        # Atomic: worker processes of one server may fetch the same version at the same moment.
        atomic_write_bytes(path, source.read_bytes())

    def list(self, prefix: str) -> list[str]:
        base = self.root / prefix
        return sorted(p.name for p in base.iterdir()) if base.is_dir() else []


class S3Store:
    def __init__(self, url: str, endpoint_url: str | None = None) -> None:
        location = parse_s3_uri(url, allow_prefix=True)
        self.url, self.bucket, self.prefix = url, location.bucket, location.key.strip("/")
        self.client = s3_client(endpoint_url)

    def _key(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def read(self, key: str) -> bytes | None:
        try:
            return bytes(self.client.get_object(Bucket=self.bucket, Key=self._key(key))["Body"].read())
        except self.client.exceptions.NoSuchKey:
            return None

    def write(self, key: str, data: bytes) -> None:
        self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data)

    def read_tagged(self, key: str) -> tuple[bytes | None, str | None]:
        try:
            response = self.client.get_object(Bucket=self.bucket, Key=self._key(key))
        except self.client.exceptions.NoSuchKey:
            return None, None
        return bytes(response["Body"].read()), str(response["ETag"])

    def write_if(self, key: str, data: bytes, tag: str | None) -> bool:
        """S3's conditional write: `If-Match` the ETag read, or `If-None-Match: *` for a new object."""
        condition = {"IfMatch": tag} if tag is not None else {"IfNoneMatch": "*"}
        return self._conditional_put(key, data, condition)

    def create(self, key: str, data: bytes) -> bool:
        return self._conditional_put(key, data, {"IfNoneMatch": "*"})

    def _conditional_put(self, key: str, data: bytes, condition: dict[str, str]) -> bool:
        from botocore.exceptions import ClientError

        try:
            self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data, **condition)
            return True
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in {
                "PreconditionFailed",
                "412",
                "ConditionalRequestConflict",
                "409",
            }:
                return False
            raise

    def put_file(self, key: str, path: Path) -> None:
        self.client.upload_file(str(path), self.bucket, self._key(key))

    def get_file(self, key: str, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".part")
        os.close(fd)
        try:
            self.client.download_file(self.bucket, self._key(key), tmp)
            os.replace(tmp, path)
        finally:
            Path(tmp).unlink(missing_ok=True)

    def list(self, prefix: str) -> list[str]:
        names: set[str] = set()
        paginator = self.client.get_paginator("list_objects_v2")
        full = self._key(prefix).rstrip("/") + "/"
        for page in paginator.paginate(Bucket=self.bucket, Prefix=full, Delimiter="/"):
            names.update(p["Prefix"][len(full) :].rstrip("/") for p in page.get("CommonPrefixes", []))
            names.update(o["Key"][len(full) :] for o in page.get("Contents", []))
        return sorted(names)


def open_store(url: str | os.PathLike[str], endpoint_url: str | None = None) -> Store:
    text = str(url)
    if text.startswith("s3://"):
        if len(text) <= 5:
            raise BinsightError(f"{text!r} names no bucket", hint="use s3://bucket/prefix")
        return S3Store(text, endpoint_url)
    return LocalStore(Path(text))
