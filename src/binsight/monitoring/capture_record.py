"""One line of a capture file (`binsight serve --capture-dir`): what the server answered for one photo,
with the photo's signals. The server writes it; drift monitoring, the traffic page and the re-check
queue read it back, each through this one definition."""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, Field, ValidationError

from binsight.utils.text import MAX_COUNT

# Bounded like every count binsight reads: a line someone else wrote must not overflow the int64 and
# SQLite integers the re-check queue stores it in.
Count = Annotated[int, Field(ge=0, le=MAX_COUNT)]


class CaptureRecord(BaseModel):
    time: str  # ISO 8601, UTC
    source: str  # the S3 URI the request named, or "body"
    image_sha256: str
    bytes: int
    width: int
    height: int
    count: Count
    confidence: float
    model_version: str
    latency_ms: float
    probabilities: list[float]
    signals: dict[str, float]
    embedding: list[float]
    expected_count: Count | None = None  # the recorded quantity, when the request gave one
    verdict: str | None = None

    def line(self) -> str:
        return self.model_dump_json(exclude_none=True)

    @classmethod
    def parse(cls, line: str) -> CaptureRecord | None:
        """The record of a line, or None for a line that is not one (being written right now, cut by
        rotation, or put there by someone else: capture folders are files anyone with disk access
        controls)."""
        try:
            return cls.model_validate_json(line)
        except (ValidationError, ValueError, RecursionError):
            return None
