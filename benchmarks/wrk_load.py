"""Drive an HTTP endpoint with `wrk` (a C load generator, Debian package `wrk`) so that the client costs
the measured cores as little as possible, and read back its throughput and latency percentiles.

Bodies rotate through real photos (a Lua script reads them once). With `rate`, each connection waits
between requests so the whole load approaches that many requests per second: at half a server's
capacity that is an open loop in practice (the server never holds the clients back).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

LUA = r"""
local files = {}
for line in io.lines("%(list)s") do files[#files + 1] = line end
local bodies = {}
for i, name in ipairs(files) do
  local f = io.open(name, "rb"); bodies[i] = f:read("*all"); f:close()
end
local n = 0
wrk.method = "POST"
wrk.headers["Content-Type"] = "image/jpeg"
request = function()
  n = n + 1
  return wrk.format(nil, nil, nil, bodies[(n %% #bodies) + 1])
end
%(delay)s
"""


@dataclass(frozen=True)
class WrkResult:
    requests: int
    seconds: float
    non_2xx: int
    socket_errors: int
    p50_ms: float
    p99_ms: float

    @property
    def per_minute(self) -> float:
        return 60 * (self.requests - self.non_2xx) / self.seconds


def have_wrk() -> bool:
    return shutil.which("wrk") is not None


def _ms(text: str) -> float:
    number, unit = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text).groups()  # type: ignore[union-attr]
    return float(number) * {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 6e4}[unit]


def run_wrk(
    url: str, photos: list[Path], seconds: float, connections: int, rate: float | None = None
) -> WrkResult:
    with tempfile.TemporaryDirectory() as tmp:
        listing = Path(tmp) / "bodies.txt"
        listing.write_text("\n".join(str(p.resolve()) for p in photos) + "\n")
        # wrk's delay() is per connection: spread the target rate over all of them.
        delay = f"delay = function() return {1000 * connections / rate:.3f} end" if rate else ""
        script = Path(tmp) / "post.lua"
        script.write_text(LUA % {"list": listing, "delay": delay})
        done = subprocess.run(
            [
                "wrk",
                "-t1",
                f"-c{connections}",
                f"-d{max(1, round(seconds))}s",
                "--timeout",
                "30s",
                "--latency",
                "-s",
                str(script),
                url,
            ],
            capture_output=True,
            text=True,
            check=True,
        )
    out = done.stdout
    requests, secs = re.search(r"(\d+) requests in ([\d.]+)(s|m)", out).groups()[:2]  # type: ignore[union-attr]
    seconds_run = float(secs) * (60 if re.search(r"requests in [\d.]+m", out) else 1)
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    percentiles = dict(re.findall(r"^\s*(\d+)%\s+(\S+)\s*$", out, flags=re.M))
    return WrkResult(
        requests=int(requests),
        seconds=seconds_run,
        non_2xx=int(non_2xx.group(1)) if non_2xx else 0,
        socket_errors=sum(int(g) for g in errors.groups()) if errors else 0,
        # No completed request, no latency distribution: NaN rather than a made-up number.
        p50_ms=_ms(percentiles["50"]) if "50" in percentiles else float("nan"),
        p99_ms=_ms(percentiles["99"]) if "99" in percentiles else float("nan"),
    )
