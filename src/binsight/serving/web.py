"""The server's own pages: count a dropped bin photo (`/`), and watch captured traffic (`/traffic`).

Plain HTML and a little JavaScript, no build step and nothing fetched from elsewhere, so the pages work
on a warehouse network with no internet. `/v1/traffic` aggregates the data-capture files.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from importlib import resources
from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import HTMLResponse, Response
from pydantic import BaseModel

from binsight.monitoring.capture_record import CaptureRecord
from binsight.monitoring.drift import Collecting, DriftOff, WindowReport
from binsight.serving.inputs import RequestError

STATIC = resources.files("binsight.serving") / "static"


def static_file(name: str) -> str:
    return (STATIC / name).read_text(encoding="utf-8")


def _tail_lines(path: Path, limit: int) -> list[str]:
    with path.open("rb") as handle:
        handle.seek(0, 2)
        size = handle.tell()
        handle.seek(max(0, size - 512 * limit))
        lines = handle.read().decode("utf-8", "replace").splitlines()
    return lines[-limit:] if size <= 512 * limit else lines[1:][-limit:]  # first may be cut


class TrafficBucket(BaseModel):
    start: str  # the minute, ISO 8601
    n: int
    counts: dict[str, int]  # answers in that minute, by count


class TrafficSummary(BaseModel):
    """`/v1/traffic`: the predicted-count distribution per minute over the newest captured records
    (all processes), and the live drift watch."""

    enabled: bool
    total: int = 0
    classes: list[str] = []
    by_count: dict[str, int] = {}
    by_verdict: dict[str, int] = {}
    buckets: list[TrafficBucket] = []
    recent: list[CaptureRecord] = []
    sample_rate: float = 1.0
    drift: WindowReport | Collecting | DriftOff | None = None


def traffic_summary(capture_dir: Path | None, limit: int = 5000, recent: int = 25) -> TrafficSummary:
    if capture_dir is None:
        return TrafficSummary(enabled=False)
    records: list[CaptureRecord] = []
    files = sorted(capture_dir.glob("capture-*.jsonl"), key=lambda p: p.stat().st_mtime)
    for path in reversed(files):
        for line in reversed(_tail_lines(path, limit)):
            if (record := CaptureRecord.parse(line)) is not None:
                records.append(record)
        if len(records) >= limit:
            break
    records.sort(key=lambda r: r.time)
    records = records[-limit:]
    buckets: dict[str, Counter[str]] = defaultdict(Counter)
    for record in records:
        buckets[record.time[:16]][str(record.count)] += 1
    return TrafficSummary(
        enabled=True,
        total=len(records),
        classes=sorted({str(r.count) for r in records}, key=int),
        by_count=dict(Counter(str(r.count) for r in records)),
        by_verdict=dict(Counter(r.verdict or "no record given" for r in records)),
        buckets=[
            TrafficBucket(start=start, n=sum(c.values()), counts=dict(c))
            for start, c in sorted(buckets.items())
        ],
        recent=records[-recent:][::-1],
    )


def add_pages(app: FastAPI) -> None:
    """The HTML pages and their assets: for people, not part of the API contract."""
    pages = {name: static_file(name) for name in ("index.html", "traffic.html")}
    assets = {"style.css": "text/css", "api.js": "text/javascript"}
    asset_bodies = {name: static_file(name) for name in assets}

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def index() -> str:
        return pages["index.html"]

    @app.get("/traffic", response_class=HTMLResponse, include_in_schema=False)
    async def traffic_page() -> str:
        return pages["traffic.html"]

    @app.get("/static/{name}", include_in_schema=False)
    async def asset(name: str) -> Response:
        if name not in assets:
            raise RequestError(404, "not_found", "no such file")
        return Response(asset_bodies[name], media_type=assets[name])
