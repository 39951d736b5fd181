"""Model registry: numbered versions with everything needed to trust and serve them, and aliases.

Layout, the same on disk and on S3 (``s3://bucket/prefix``)::

    versions/v0003/model.pt        the training checkpoint
    versions/v0003/model.onnx      the verified ONNX export
    versions/v0003/metrics.json    test metrics at registration
    versions/v0003/meta.json       config, fingerprints, git commit, time, notes, artifacts' sha256
    aliases/production.json        {"version": "v0003", "history": ["v0001", "v0002"], ...}

A version exists once its meta.json does: it is written last, after the artifacts were checked (the
ONNX file loads and carries a card), so a registration that failed or was killed leaves a folder that
readers skip and report rather than trip over. meta.json records each artifact's sha256; whoever
fetches an artifact checks it (`fetch_verified`), so a cache cannot be poisoned into serving another
model.

An alias moves by a conditional write: read it with its tag (an S3 ETag, or a content hash on disk),
write only if it is unchanged (S3 `If-Match`/`If-None-Match`; a lock on disk), retry otherwise. Two
promotes at the same moment therefore both land in the history, and `rollback` goes where it should.

Version and alias names are checked on every read and write: a name is never a path.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
import subprocess
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from binsight.errors import BinsightError
from binsight.utils.io import sha256_file
from binsight.utils.redact import SecretUrl
from binsight.utils.storage import open_store

log = logging.getLogger(__name__)

VERSION_PATTERN = re.compile(r"^v(\d{4,9})$")
ALIAS_PATTERN = re.compile(r"^[a-z][a-z0-9_-]{0,40}$")
ARTIFACTS = ("model.pt", "model.onnx", "metrics.json", "meta.json")
HISTORY_KEPT = 50


def git_commit() -> str | None:
    try:
        done = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, cwd=Path(__file__).parent
        )
        return done.stdout.strip() or None if done.returncode == 0 else None
    except (OSError, subprocess.TimeoutExpired):
        return None


def check_version_name(name: str) -> str:
    if not isinstance(name, str) or not VERSION_PATTERN.match(name):
        raise BinsightError(f"{str(name)[:60]!r} is not a version name", hint="versions look like v0003")
    return name


def check_alias_name(alias: str) -> str:
    if not isinstance(alias, str) or not ALIAS_PATTERN.match(alias):
        raise BinsightError(
            f"alias {str(alias)[:60]!r} must be lower-case letters, digits, '-' or '_', "
            "starting with a letter"
        )
    return alias


class Artifact(BaseModel):
    sha256: str
    bytes: int


class AliasRecord(BaseModel):
    version: str
    history: list[str] = []
    reason: str = ""
    updated: str = ""


@dataclass(frozen=True)
class Version:
    name: str
    meta: dict[str, Any]  # meta.json as written: free-form notes from whoever registered it
    metrics: dict[str, Any]

    def artifact(self, name: str) -> Artifact | None:
        """The recorded digest of an artifact (None for versions registered before digests were)."""
        raw = self.meta.get("artifacts", {}).get(name)
        try:
            return Artifact.model_validate(raw) if raw else None
        except ValidationError:
            return None


class Registry:
    def __init__(self, url: str | os.PathLike[str], endpoint_url: str | None = None) -> None:
        self.store = open_store(url, endpoint_url)
        self.identity = hashlib.sha256(f"{self.store.url}\n{endpoint_url or ''}".encode()).hexdigest()[:16]

    # ------------------------------------------------------------------ reading

    def folders(self) -> list[str]:
        return sorted(
            (n for n in self.store.list("versions") if VERSION_PATTERN.match(n)), key=lambda n: int(n[1:])
        )

    def listing(self) -> tuple[list[str], list[str]]:
        """(complete versions, incomplete ones: a folder without meta.json, from a failed or running
        registration)."""
        complete: list[str] = []
        incomplete: list[str] = []
        for name in self.folders():
            (complete if self.store.read(f"versions/{name}/meta.json") is not None else incomplete).append(
                name
            )
        return complete, incomplete

    def versions(self) -> list[str]:
        return self.listing()[0]

    def _json(self, key: str) -> dict[str, Any] | None:
        raw = self.store.read(key)
        if raw is None:
            return None
        try:
            value = json.loads(raw)
        except ValueError:
            raise BinsightError(f"{self.store.url}/{key} is not valid JSON") from None
        if not isinstance(value, dict):
            raise BinsightError(f"{self.store.url}/{key} is not a JSON object")
        return value

    def get(self, name: str) -> Version:
        check_version_name(name)
        meta = self._json(f"versions/{name}/meta.json")
        if meta is None:
            known = ", ".join(self.versions()) or "none"
            raise BinsightError(
                f"no complete version {name!r} in {self.store.url}", hint=f"complete versions: {known}"
            )
        return Version(name, meta, self._json(f"versions/{name}/metrics.json") or {})

    # ------------------------------------------------------------------ registering

    def register(self, checkpoint: Path, onnx: Path, metrics: dict[str, Any], meta: dict[str, Any]) -> str:
        """Add a version: the artifacts are checked first, uploaded, and meta.json (with their sha256)
        is written last, so a version is visible only when complete."""
        from binsight.inference.runtime import model_info

        if not checkpoint.is_file():
            raise BinsightError(f"cannot register: no checkpoint at {checkpoint}")
        card = model_info(onnx).card  # raises a clear error for a file that is not a binsight model
        artifacts = {
            "model.pt": Artifact(sha256=sha256_file(checkpoint), bytes=checkpoint.stat().st_size),
            "model.onnx": Artifact(sha256=sha256_file(onnx), bytes=onnx.stat().st_size),
        }
        existing = self.folders()
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
            "artifacts": {key: value.model_dump() for key, value in artifacts.items()},
            # The model card, as the exported file carries it: what the version is and takes.
            "card": card.model_dump(mode="json"),
        }
        self.store.write(f"versions/{name}/meta.json", json.dumps(record, indent=2, default=str).encode())
        return name

    # ------------------------------------------------------------------ aliases

    def alias(self, alias: str) -> AliasRecord | None:
        raw = self._json(f"aliases/{check_alias_name(alias)}.json")
        if raw is None:
            return None
        try:
            return AliasRecord.model_validate(raw)
        except ValidationError:
            raise BinsightError(f"alias {alias!r} in {self.store.url} is not a valid alias record") from None

    def aliases(self) -> dict[str, str]:
        names = [
            n[:-5] for n in self.store.list("aliases") if n.endswith(".json") and ALIAS_PATTERN.match(n[:-5])
        ]
        found = {}
        for name in names:
            record = self.alias(name)
            found[name] = record.version if record else "?"
        return found

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
        return check_version_name(record.version)

    def _move(self, alias: str, change: Any) -> AliasRecord:
        """Read-modify-write of an alias that loses no concurrent move: `change(current)` gives the new
        record, written only if the alias is still what was read."""
        key = f"aliases/{check_alias_name(alias)}.json"
        for attempt in range(64):
            raw, tag = self.store.read_tagged(key)
            current = AliasRecord.model_validate_json(raw) if raw is not None else None
            record: AliasRecord = change(current)
            if self.store.write_if(key, record.model_dump_json(indent=2).encode(), tag):
                return record
            time.sleep(min(0.5, 0.005 * 2 ** min(attempt, 6)) * random.random())
        raise BinsightError(f"alias {alias!r} keeps changing under this move; try again")

    def set_alias(self, alias: str, version: str, reason: str = "") -> AliasRecord:
        check_alias_name(alias)
        self.get(version)

        def change(current: AliasRecord | None) -> AliasRecord:
            history = list(current.history) if current else []
            if current and current.version != version:
                history.append(current.version)
            return AliasRecord(
                version=version,
                history=history[-HISTORY_KEPT:],
                reason=reason,
                updated=datetime.now(UTC).isoformat(timespec="seconds"),
            )

        return self._move(alias, change)

    def rollback(self, alias: str) -> AliasRecord:
        def change(current: AliasRecord | None) -> AliasRecord:
            if not current or not current.history:
                raise BinsightError(f"alias {alias!r} has no earlier version to roll back to")
            history = list(current.history)
            previous = check_version_name(history.pop())
            return AliasRecord(
                version=previous,
                history=history,
                reason=f"rollback from {current.version}",
                updated=datetime.now(UTC).isoformat(timespec="seconds"),
            )

        return self._move(alias, change)

    # ------------------------------------------------------------------ fetching

    def fetch(self, version: str, artifact: str, destination: Path) -> Path:
        check_version_name(version)
        if artifact not in ARTIFACTS:
            raise BinsightError(f"unknown artifact {artifact!r}; one of {ARTIFACTS}")
        self.store.get_file(f"versions/{version}/{artifact}", destination)
        return destination

    def fetch_verified(self, version: str, artifact: str, cache_dir: Path) -> Path:
        """The artifact in a private cache, checked against meta.json's sha256 on every call: a cached
        file that differs (tampered, truncated, another registry's) is fetched again, and a fetched
        file that differs is refused. Versions registered before digests were recorded are fetched
        afresh each time, since nothing can vouch for a cached copy."""
        recorded = self.get(version).artifact(artifact)
        folder = private_folder(cache_dir / self.identity)
        suffix = Path(artifact).suffix
        if recorded is None:
            log.warning(
                "%s of %s has no recorded sha256 (registered by an older binsight): fetched unverified",
                artifact,
                version,
            )
            return self.fetch(version, artifact, folder / f"{version}-unverified-{os.getpid()}{suffix}")
        target = folder / f"{version}-{recorded.sha256[:16]}{suffix}"
        if target.is_file() and sha256_file(target) == recorded.sha256:
            return target
        self.fetch(version, artifact, target)
        actual = sha256_file(target)
        if actual != recorded.sha256:
            target.unlink(missing_ok=True)
            raise BinsightError(
                f"{artifact} of {version} in {self.store.url} has sha256 {actual[:16]}…, not the "
                f"{recorded.sha256[:16]}… its meta.json records",
                hint="the registry's copy was changed after registration; register the model again",
            )
        return target


class ModelsConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    action: Literal["list", "show", "promote", "rollback"] = Field(
        "list", description="list, show, promote or rollback"
    )
    target: str = Field("production", description="version (v0003) or alias to show or promote")
    registry: str = Field(description="folder or s3://bucket/prefix")
    alias: str = Field(
        "production", pattern=r"^[a-z][a-z0-9_-]{0,40}$", description="alias to move (promote, rollback)"
    )
    reason: str | None = Field(None, description="recorded with the alias's move")
    s3_endpoint_url: SecretUrl | None = Field(None, description="S3-compatible endpoint (default AWS)")


@dataclass(frozen=True)
class ModelsAnswer:
    """What `binsight models` found or did."""

    versions: list[Version]  # list: every complete version; show: the one shown
    incomplete: list[str]
    aliases: dict[str, str]
    moved: AliasRecord | None = None  # promote, rollback


def manage_models(config: ModelsConfig) -> ModelsAnswer:
    registry = Registry(config.registry, config.s3_endpoint_url)
    if config.action == "list":
        complete, incomplete = registry.listing()
        return ModelsAnswer([registry.get(n) for n in complete], incomplete, registry.aliases())
    if config.action == "show":
        return ModelsAnswer([registry.get(registry.resolve(config.target))], [], {})
    if config.action == "promote":
        moved = registry.set_alias(
            config.alias, registry.resolve(config.target), config.reason or "manual promote"
        )
    else:
        moved = registry.rollback(config.alias)
    return ModelsAnswer([], [], {config.alias: moved.version}, moved)


def private_folder(path: Path) -> Path:
    """A folder only this user may read or write; refuses one that another user owns or could write,
    since whoever can write a cache chooses what is loaded from it."""
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    info = path.stat()
    if info.st_uid != os.getuid():
        raise BinsightError(
            f"{path} belongs to another user", hint="pass a cache folder of your own (--registry-cache)"
        )
    if info.st_mode & 0o077:
        os.chmod(path, 0o700)
    return path


def default_cache() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "binsight" / "registry"


def fetch_alias(
    url: str, alias: str, cache_dir: Path | None = None, endpoint_url: str | None = None
) -> tuple[Path, str]:
    """The ONNX file an alias (or a version name) points at, fetched and verified."""
    registry = Registry(url, endpoint_url)
    version = registry.resolve(alias)
    return registry.fetch_verified(version, "model.onnx", cache_dir or default_cache()), version
