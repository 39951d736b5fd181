"""Model registry: numbered versions with everything needed to trust and serve them, and aliases.

Layout, the same on disk and on S3 (``s3://bucket/prefix``)::

    versions/v0003/model.pt        the training checkpoint
    versions/v0003/model.onnx      the verified ONNX export
    versions/v0003/metrics.json    test metrics at registration
    versions/v0003/meta.json       config, data/split fingerprints, git commit, time, notes
    aliases/production.json        {"version": "v0003", "history": ["v0001", "v0002"], ...}

An alias moves by rewriting one small object (atomic rename on disk, a single PUT on S3), so a reader
sees the old or the new version, never a mixture. `rollback` moves an alias back along its history.
Servers follow an alias through `AliasSource`, which notices the change and fetches the new ONNX file.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import tempfile
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

from binsight.errors import BinsightError
from binsight.utils.io import atomic_write_bytes
from binsight.utils.s3 import parse_s3_uri, s3_client

VERSION_PATTERN = re.compile(r"^v(\d{4,})$")
ALIAS_PATTERN = re.compile(r"^[a-z][a-z0-9_-]{0,40}$")
ARTIFACTS = ("model.pt", "model.onnx", "metrics.json", "meta.json")


class Store(Protocol):
    url: str

    def read(self, key: str) -> bytes | None: ...
    def write(self, key: str, data: bytes) -> None: ...
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
            return self.client.get_object(Bucket=self.bucket, Key=self._key(key))["Body"].read()
        except self.client.exceptions.NoSuchKey:
            return None

    def write(self, key: str, data: bytes) -> None:
        self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data)

    def create(self, key: str, data: bytes) -> bool:
        from botocore.exceptions import ClientError

        try:
            self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data, IfNoneMatch="*")
            return True
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in {
                "PreconditionFailed",
                "412",
                "ConditionalRequestConflict",
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
        names = set()
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


def git_commit() -> str | None:
    try:
        done = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, cwd=Path(__file__).parent
        )
        return done.stdout.strip() or None if done.returncode == 0 else None
    except (OSError, subprocess.TimeoutExpired):
        return None


@dataclass(frozen=True)
class Version:
    name: str
    meta: dict[str, Any]
    metrics: dict[str, Any]


class Registry:
    def __init__(self, url: str | os.PathLike[str], endpoint_url: str | None = None) -> None:
        self.store = open_store(url, endpoint_url)

    def versions(self) -> list[str]:
        return sorted(
            (n for n in self.store.list("versions") if VERSION_PATTERN.match(n)), key=lambda n: int(n[1:])
        )

    def _json(self, key: str) -> dict[str, Any] | None:
        raw = self.store.read(key)
        return None if raw is None else json.loads(raw)

    def get(self, name: str) -> Version:
        meta = self._json(f"versions/{name}/meta.json")
        if meta is None:
            known = ", ".join(self.versions()) or "none"
            raise BinsightError(f"no version {name!r} in {self.store.url}", hint=f"known versions: {known}")
        return Version(name, meta, self._json(f"versions/{name}/metrics.json") or {})

    def register(self, checkpoint: Path, onnx: Path, metrics: dict[str, Any], meta: dict[str, Any]) -> str:
        """Add a version; artifacts first, meta.json last, so a version is visible only when complete."""
        existing = self.versions()
        number = int(existing[-1][1:]) + 1 if existing else 1
        while not self.store.create(f"versions/v{number:04d}/.claim", b""):
            number += 1
        name = f"v{number:04d}"
        self.store.put_file(f"versions/{name}/model.pt", checkpoint)
        self.store.put_file(f"versions/{name}/model.onnx", onnx)
        self.store.write(f"versions/{name}/metrics.json", json.dumps(metrics, indent=2, default=str).encode())
        record = {
            "version": name,
            "created": datetime.now(UTC).isoformat(timespec="seconds"),
            "git_commit": git_commit(),
            **meta,
        }
        self.store.write(f"versions/{name}/meta.json", json.dumps(record, indent=2, default=str).encode())
        return name

    def alias(self, alias: str) -> dict[str, Any] | None:
        return self._json(f"aliases/{alias}.json")

    def aliases(self) -> dict[str, str]:
        names = [n[:-5] for n in self.store.list("aliases") if n.endswith(".json")]
        return {n: (self.alias(n) or {}).get("version", "?") for n in names}

    def resolve(self, alias_or_version: str) -> str:
        if VERSION_PATTERN.match(alias_or_version):
            self.get(alias_or_version)
            return alias_or_version
        record = self.alias(alias_or_version)
        if record is None:
            raise BinsightError(
                f"no alias {alias_or_version!r} in {self.store.url}",
                hint="promote a version first: `binsight models promote VERSION --alias NAME`",
            )
        return str(record["version"])

    def set_alias(self, alias: str, version: str, reason: str = "") -> dict[str, Any]:
        if not ALIAS_PATTERN.match(alias):
            raise BinsightError(f"alias {alias!r} must be lower-case letters, digits, '-' or '_'")
        self.get(version)
        current = self.alias(alias)
        history = list(current.get("history", [])) if current else []
        if current and current["version"] != version:
            history.append(current["version"])
        record = {
            "version": version,
            "history": history[-50:],
            "reason": reason,
            "updated": datetime.now(UTC).isoformat(timespec="seconds"),
        }
        self.store.write(f"aliases/{alias}.json", json.dumps(record, indent=2).encode())
        return record

    def rollback(self, alias: str) -> dict[str, Any]:
        current = self.alias(alias)
        if not current or not current.get("history"):
            raise BinsightError(f"alias {alias!r} has no earlier version to roll back to")
        history = list(current["history"])
        previous = history.pop()
        record = {
            "version": previous,
            "history": history,
            "reason": f"rollback from {current['version']}",
            "updated": datetime.now(UTC).isoformat(timespec="seconds"),
        }
        self.store.write(f"aliases/{alias}.json", json.dumps(record, indent=2).encode())
        return record

    def fetch(self, version: str, artifact: str, destination: Path) -> Path:
        if artifact not in ARTIFACTS:
            raise BinsightError(f"unknown artifact {artifact!r}; one of {ARTIFACTS}")
        self.store.get_file(f"versions/{version}/{artifact}", destination)
        return destination


class AliasSource:
    """What a server loads when it follows a registry alias: the alias's version, fetched locally."""

    def __init__(self, registry: Registry, alias: str, cache_dir: Path) -> None:
        self.registry, self.alias, self.cache_dir = registry, alias, cache_dir

    def signature(self) -> str:
        return self.registry.resolve(self.alias)

    def local_path(self, signature: str) -> Path:
        target = self.cache_dir / f"{signature}.onnx"
        if not target.exists():
            self.registry.fetch(signature, "model.onnx", target)
        return target
