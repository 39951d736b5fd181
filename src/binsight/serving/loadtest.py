"""`binsight loadtest`: drive an endpoint at a fixed concurrency (closed loop) or a fixed rate (open loop)
for a duration, then report invocations per minute, latency percentiles per status, and errors.

Open loop matters: at a fixed rate, a slow server cannot slow the clients down, so queueing shows up in
the latencies as it would in production. A load generator on the same machine competes with the server
for the CPU, so this one is cheap by construction (pre-built requests written to raw keep-alive
connections, responses read by their Content-Length, no per-request logging: ~10x less CPU than an
HTTP library), and it watches itself: when it used most of a core, or could not send on schedule, the
report says the client was saturated and its latencies describe the client, not the server.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from binsight.errors import BinsightError

# Past these the client, not the server, limits what is measured.
SATURATED_CPU_SHARE = 0.8
SATURATED_LATE_SHARE = 0.01
# A send or two a few ms late is the OS scheduler's hiccup, not a saturated generator: on a 2-core CI
# box sharing the CPU with the server, 1 of 30 sends came 5 ms late in a run at 20 requests/s.
SATURATED_LATE_MIN = 3
LATE_AFTER_S = 0.005


class Percentiles(BaseModel):
    n: int
    p50: float
    p95: float
    p99: float
    max: float

    @classmethod
    def of(cls, values: list[float]) -> Percentiles:
        data = np.asarray(values) if values else np.zeros(1)
        p50, p95, p99 = (round(float(np.percentile(data, q)), 2) for q in (50, 95, 99))
        return cls(n=len(values), p50=p50, p95=p95, p99=p99, max=round(float(data.max()), 2))


class ClientLoad(BaseModel):
    """Whether the load generator kept its schedule: if not, the latencies describe it, not the server."""

    cpu_share_of_one_core: float
    scheduled: int
    sent_late: int
    not_sent: int
    saturated: bool


class LoadSummary(BaseModel):
    requests: int
    ok: int
    errors: int
    statuses: dict[str, int]
    duration_s: float
    invocations_per_minute: float
    latency_ms: Percentiles  # of the 200s
    latency_ms_by_status: dict[str, Percentiles]
    client: ClientLoad


@dataclass
class LoadResult:
    duration_s: float
    latencies_ms: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    statuses: Counter[str] = field(default_factory=Counter)
    client_cpu_s: float = 0.0
    scheduled: int = 0
    sent_late: int = 0
    not_sent: int = 0

    @property
    def ok(self) -> int:
        return self.statuses["200"]

    @property
    def errors(self) -> int:
        return sum(n for status, n in self.statuses.items() if status != "200")

    @property
    def client_cpu_share(self) -> float:
        return self.client_cpu_s / self.duration_s if self.duration_s else 0.0

    @property
    def saturated(self) -> bool:
        late = self.sent_late + self.not_sent
        late_share = late / self.scheduled if self.scheduled else 0.0
        return self.client_cpu_share > SATURATED_CPU_SHARE or (
            late >= SATURATED_LATE_MIN and late_share > SATURATED_LATE_SHARE
        )

    def summary(self) -> LoadSummary:
        return LoadSummary(
            requests=sum(self.statuses.values()),
            ok=self.ok,
            errors=self.errors,
            statuses=dict(self.statuses),
            duration_s=round(self.duration_s, 3),
            invocations_per_minute=round(60 * self.ok / self.duration_s, 1) if self.duration_s else 0.0,
            latency_ms=Percentiles.of(self.latencies_ms.get("200", [])),
            latency_ms_by_status={s: Percentiles.of(v) for s, v in sorted(self.latencies_ms.items())},
            client=ClientLoad(
                cpu_share_of_one_core=round(self.client_cpu_share, 3),
                scheduled=self.scheduled,
                sent_late=self.sent_late,
                not_sent=self.not_sent,
                saturated=self.saturated,
            ),
        )


class _Connection:
    """One keep-alive HTTP/1.1 connection that sends a prepared request and reads one response.

    Servers close idle keep-alive connections (uvicorn after 5 s), so, like any HTTP client, a
    connection idle for a while is reopened, and a request that finds its reused connection closed
    before any answer is sent again once on a fresh one rather than counted as the server's error.
    """

    MAX_IDLE_S = 2.0

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.last_used = 0.0

    async def exchange(self, request: bytes, timeout_s: float) -> str:
        if self.writer is not None and time.monotonic() - self.last_used > self.MAX_IDLE_S:
            self.close()
        reused = self.writer is not None
        try:
            return await self._exchange(request, timeout_s)
        except (asyncio.IncompleteReadError, ConnectionResetError) as exc:
            nothing_read = not isinstance(exc, asyncio.IncompleteReadError) or not exc.partial
            if not (reused and nothing_read):
                raise
            self.close()
            return await self._exchange(request, timeout_s)

    async def _exchange(self, request: bytes, timeout_s: float) -> str:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        assert self.reader is not None
        self.writer.write(request)
        head = await asyncio.wait_for(self.reader.readuntil(b"\r\n\r\n"), timeout_s)
        status_line, _, header_text = head.partition(b"\r\n")
        headers = {
            name.strip().lower(): value.strip()
            for name, _, value in (line.partition(b":") for line in header_text.split(b"\r\n") if line)
        }
        if headers.get(b"transfer-encoding", b"").lower() == b"chunked":
            while size := int((await self.reader.readuntil(b"\r\n")).strip() or b"0", 16):
                await self.reader.readexactly(size + 2)
            await self.reader.readuntil(b"\r\n")
        else:
            await self.reader.readexactly(int(headers.get(b"content-length", b"0")))
        self.last_used = time.monotonic()
        if headers.get(b"connection", b"").lower() == b"close":
            self.close()
        return status_line.split(b" ", 2)[1].decode()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None


def _requests(url: str, bodies: list[bytes], content_type: str) -> tuple[str, int, list[bytes]]:
    parts = urlsplit(url)
    if parts.scheme != "http" or not parts.hostname:
        raise ValueError(f"{url!r}: give an http://host:port/path URL")
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    host = f"{parts.hostname}:{parts.port or 80}"
    requests = [
        f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\n\r\n".encode()
        + body
        for body in bodies
    ]
    return parts.hostname, parts.port or 80, requests


async def _send(connection: _Connection, request: bytes, result: LoadResult, timeout_s: float) -> None:
    started = time.perf_counter()
    try:
        status = await connection.exchange(request, timeout_s)
    except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError) as exc:
        connection.close()
        status = type(exc).__name__
    result.statuses[status] += 1
    if status.isdigit():
        result.latencies_ms[status].append(1000 * (time.perf_counter() - started))


async def run_load(
    url: str,
    bodies: list[bytes],
    duration_s: float,
    concurrency: int = 8,
    rate: float | None = None,
    content_type: str = "image/jpeg",
    timeout_s: float = 30.0,
    poisson: bool = False,
    seed: int = 0,
) -> LoadResult:
    """Closed loop with `concurrency` connections, or open loop at `rate` requests/s on up to
    `concurrency` x 64 connections, evenly spaced or, with `poisson`, at exponentially distributed
    intervals (independent callers). Stops by itself after `duration_s`."""
    if not bodies:
        raise ValueError("no request bodies to send")
    host, port, requests = _requests(url, bodies, content_type)
    result = LoadResult(duration_s=duration_s)
    cycle = itertools.cycle(requests)
    cpu_started, started = time.thread_time(), time.perf_counter()
    deadline = started + duration_s
    if rate is None:

        async def worker() -> None:
            connection = _Connection(host, port)
            while time.perf_counter() < deadline:
                result.scheduled += 1
                await _send(connection, next(cycle), result, timeout_s)
            connection.close()

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    else:
        idle: list[_Connection] = []
        opened = 0
        tasks: set[asyncio.Task[None]] = set()

        async def one(connection: _Connection, request: bytes) -> None:
            await _send(connection, request, result, timeout_s)
            idle.append(connection)

        rng = np.random.default_rng(seed)
        due = started
        while (now := time.perf_counter()) < deadline:
            if now < due:
                await asyncio.sleep(due - now)
                continue
            result.scheduled += 1
            if now - due > LATE_AFTER_S:
                result.sent_late += 1
            due += rng.exponential(1.0 / rate) if poisson else 1.0 / rate
            if idle:
                connection = idle.pop()
            elif opened < concurrency * 64:
                connection, opened = _Connection(host, port), opened + 1
            else:
                result.not_sent += 1
                continue
            task = asyncio.create_task(one(connection, next(cycle)))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        if tasks:
            await asyncio.gather(*tasks)
        for connection in idle:
            connection.close()
    result.duration_s = time.perf_counter() - started
    result.client_cpu_s = time.thread_time() - cpu_started
    return result


def format_summary(summary: LoadSummary) -> str:
    latency, client = summary.latency_ms, summary.client
    lines = [
        f"requests {summary.requests}  ok {summary.ok}  errors {summary.errors}  "
        f"in {summary.duration_s:.1f}s",
        f"invocations/min {summary.invocations_per_minute:.0f}",
        f"latency ms (200)  p50 {latency.p50:.1f}  p95 {latency.p95:.1f}  p99 {latency.p99:.1f}  "
        f"max {latency.max:.1f}",
    ]
    for status, stats in summary.latency_ms_by_status.items():
        if status != "200":
            lines.append(f"latency ms ({status})  n {stats.n}  p50 {stats.p50:.1f}  p99 {stats.p99:.1f}")
    if summary.errors:
        lines.append(
            "errors by status: " + ", ".join(f"{k}: {v}" for k, v in summary.statuses.items() if k != "200")
        )
    lines.append(
        f"client: {100 * client.cpu_share_of_one_core:.0f}% of a core, "
        f"{client.sent_late + client.not_sent} of {client.scheduled} requests late or unsent"
    )
    if client.saturated:
        lines.append(
            "WARNING: the load generator was saturated; the latencies above describe it, not the server "
            "(use a lower --rate, a C generator such as wrk, or another machine)"
        )
    return "\n".join(lines)


class LoadtestConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    url: str = Field(description="e.g. http://127.0.0.1:8080/invocations")
    images: Path = Field(description="folder of .jpg bin photos (or one file)")
    duration: float = Field(30.0, gt=0.0, description="seconds")
    concurrency: int = Field(8, ge=1, description="clients in flight (closed loop)")
    rate: float | None = Field(None, gt=0.0, description="requests/s (open loop) instead")
    poisson: bool = Field(False, description="open loop: independent callers (exponential gaps)")
    max_images: int = Field(200, ge=1, description="photos read from --images at most")


def loadtest(config: LoadtestConfig) -> LoadSummary:
    """Drive an endpoint with the photos of `config.images`; the summary of `LoadResult`."""
    folder = config.images
    files = sorted(folder.glob("*.jpg"))[: config.max_images] if folder.is_dir() else [folder]
    if not files or not files[0].is_file():
        raise BinsightError(f"no .jpg images at {folder}", hint="point --images at a folder of bin photos")
    bodies = [f.read_bytes() for f in files]
    result = asyncio.run(
        run_load(config.url, bodies, config.duration, config.concurrency, config.rate, poisson=config.poisson)
    )
    return result.summary()
