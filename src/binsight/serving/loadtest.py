"""`binsight loadtest`: drive an endpoint at a fixed concurrency (closed loop) or a fixed rate (open loop)
for a duration, then report invocations per minute, latency percentiles and errors.

Open loop matters: at a fixed rate, a slow server cannot slow the clients down, so queueing shows up in
the latencies as it would in production.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import httpx
import numpy as np


@dataclass
class LoadResult:
    duration_s: float
    latencies_ms: list[float] = field(default_factory=list)
    statuses: Counter[str] = field(default_factory=Counter)

    @property
    def ok(self) -> int:
        return self.statuses["200"]

    @property
    def errors(self) -> int:
        return sum(n for status, n in self.statuses.items() if status != "200")

    def summary(self) -> dict[str, Any]:
        latencies = np.asarray(self.latencies_ms) if self.latencies_ms else np.zeros(1)
        return {
            "requests": sum(self.statuses.values()),
            "ok": self.ok,
            "errors": self.errors,
            "statuses": dict(self.statuses),
            "duration_s": round(self.duration_s, 3),
            "invocations_per_minute": round(60 * self.ok / self.duration_s, 1) if self.duration_s else 0.0,
            "latency_ms": {
                "p50": round(float(np.percentile(latencies, 50)), 2),
                "p95": round(float(np.percentile(latencies, 95)), 2),
                "p99": round(float(np.percentile(latencies, 99)), 2),
                "max": round(float(latencies.max()), 2),
            },
        }


async def _one(
    client: httpx.AsyncClient, url: str, body: bytes, content_type: str, result: LoadResult
) -> None:
    started = time.perf_counter()
    try:
        response = await client.post(url, content=body, headers={"content-type": content_type})
        status = str(response.status_code)
    except httpx.HTTPError as exc:
        status = type(exc).__name__
    result.statuses[status] += 1
    if status == "200":
        result.latencies_ms.append(1000 * (time.perf_counter() - started))


async def run_load(
    url: str,
    bodies: list[bytes],
    duration_s: float,
    concurrency: int = 8,
    rate: float | None = None,
    content_type: str = "image/jpeg",
    timeout_s: float = 30.0,
) -> LoadResult:
    """Closed loop with `concurrency` clients, or open loop at `rate` requests/s (at most
    `concurrency` x 64 in flight). Stops by itself after `duration_s`."""
    if not bodies:
        raise ValueError("no request bodies to send")
    result = LoadResult(duration_s=duration_s)
    cycle = itertools.cycle(bodies)
    limits = httpx.Limits(max_connections=concurrency if rate is None else concurrency * 64)
    async with httpx.AsyncClient(timeout=timeout_s, limits=limits) as client:
        started = time.perf_counter()
        deadline = started + duration_s
        if rate is None:

            async def worker() -> None:
                while time.perf_counter() < deadline:
                    await _one(client, url, next(cycle), content_type, result)

            await asyncio.gather(*(worker() for _ in range(concurrency)))
        else:
            tasks: set[asyncio.Task[None]] = set()
            interval = 1.0 / rate
            sent = 0
            while (now := time.perf_counter()) < deadline:
                due = started + sent * interval
                if now < due:
                    await asyncio.sleep(due - now)
                    continue
                if len(tasks) < concurrency * 64:
                    task = asyncio.create_task(_one(client, url, next(cycle), content_type, result))
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
                else:
                    result.statuses["client_saturated"] += 1
                sent += 1
            if tasks:
                await asyncio.gather(*tasks)
        result.duration_s = time.perf_counter() - started
    return result


def format_summary(summary: dict[str, Any]) -> str:
    latency = summary["latency_ms"]
    lines = [
        f"requests {summary['requests']}  ok {summary['ok']}  errors {summary['errors']}  "
        f"in {summary['duration_s']:.1f}s",
        f"invocations/min {summary['invocations_per_minute']:.0f}",
        f"latency ms  p50 {latency['p50']:.1f}  p95 {latency['p95']:.1f}  p99 {latency['p99']:.1f}  "
        f"max {latency['max']:.1f}",
    ]
    if summary["errors"]:
        lines.append(
            "errors by status: "
            + ", ".join(f"{k}: {v}" for k, v in summary["statuses"].items() if k != "200")
        )
    return "\n".join(lines)
