"""Where a served model comes from, behind one protocol: a file, or a registry alias. `signature`
changes when the model does; `local_path` makes that model a local file. The server polls the
signature and reloads on a change."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from binsight.registry import Registry, default_cache

if TYPE_CHECKING:
    from binsight.serving.config import ServeConfig


@dataclass(frozen=True)
class ReloadFailure:
    at: str
    error: str


class FileSource:
    """A model file; it changes when its inode, size or mtime does (an atomic replace changes all)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def signature(self) -> tuple[int, int, int] | None:
        try:
            stat = self.path.stat()
        except OSError:
            return None
        return stat.st_ino, stat.st_size, stat.st_mtime_ns

    def local_path(self, signature: object) -> Path:
        return self.path


class ModelSource(Protocol):
    """Where the served model comes from: a file, or a registry alias. `signature` changes when the
    model does; `local_path` makes that model a local file."""

    def signature(self) -> Any: ...

    def local_path(self, signature: Any) -> Path: ...


def model_source(config: ServeConfig) -> ModelSource:
    if config.model is not None:
        return FileSource(config.model)
    assert config.registry is not None  # the config validator allows exactly one source
    registry = Registry(config.registry, config.s3_endpoint_url)
    return AliasSource(registry, config.alias, config.registry_cache or default_cache())


class AliasSource:
    """What a server loads when it follows a registry alias: the alias's version, fetched into a
    private cache keyed by the registry and the file's sha256, and verified on every load."""

    def __init__(self, registry: Registry, alias: str, cache_dir: Path) -> None:
        self.registry, self.alias, self.cache_dir = registry, alias, cache_dir

    def signature(self) -> str:
        return self.registry.resolve(self.alias)

    def local_path(self, signature: str) -> Path:
        return self.registry.fetch_verified(signature, "model.onnx", self.cache_dir)
