"""Model registry: numbered versions with everything needed to trust and serve them, and aliases.

Layout, the same on disk and on S3 (``s3://bucket/prefix``)::

    versions/v0003/model.pt        the training checkpoint
    versions/v0003/model.onnx      the verified ONNX export
    versions/v0003/metrics.json    test metrics at registration
    versions/v0003/meta.json       config, data/split fingerprints, git commit, time, notes
    aliases/production.json        {"version": "v0003", "history": ["v0001", "v0002"], ...}

An alias moves by rewriting one small object (atomic rename on disk, a single PUT on S3), so a reader
sees the old or the new version, never a mixture. `rollback` moves an alias back along its history.
Servers follow an alias through `serving.sources.AliasSource`, which notices the change and fetches the
new ONNX file.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from binsight.errors import BinsightError
from binsight.utils.storage import open_store

VERSION_PATTERN = re.compile(r"^v(\d{4,})$")
ALIAS_PATTERN = re.compile(r"^[a-z][a-z0-9_-]{0,40}$")
ARTIFACTS = ("model.pt", "model.onnx", "metrics.json", "meta.json")


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
        from binsight.inference.runtime import model_info

        record = {
            "version": name,
            "created": datetime.now(UTC).isoformat(timespec="seconds"),
            "git_commit": git_commit(),
            **meta,
            # The model card, as the exported file carries it: what the version is and takes.
            "card": model_info(onnx).card.model_dump(mode="json"),
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


def fetch_alias(
    url: str, alias: str, destination_dir: Path, endpoint_url: str | None = None
) -> tuple[Path, str]:
    """The ONNX file an alias (or a version name) points at, fetched once into `destination_dir`."""
    registry = Registry(url, endpoint_url)
    version = registry.resolve(alias)
    target = destination_dir / f"{version}.onnx"
    if not target.is_file():
        registry.fetch(version, "model.onnx", target)
    return target, version
