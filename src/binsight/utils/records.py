"""Typed records kept as JSON files (`history.json`, `metrics.json`): what is written is what is read
back, through the same model."""

from __future__ import annotations

from pathlib import Path
from typing import Self

from pydantic import BaseModel

from binsight.errors import BinsightError
from binsight.utils.io import atomic_write_text


class JsonRecord(BaseModel):
    def write(self, path: Path) -> None:
        atomic_write_text(path, self.model_dump_json(indent=2) + "\n")

    @classmethod
    def read(cls, path: Path) -> Self:
        try:
            return cls.model_validate_json(path.read_text())
        except (OSError, ValueError) as exc:
            raise BinsightError(f"cannot read {path}: {exc}") from None
