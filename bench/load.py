"""Load drivers: wrk for closed-loop levels, an asyncio client at a fixed rate (open loop).

Both contact only 127.0.0.1 and are bounded by their duration. Secrets (virtual or
provider keys) reach wrk through its environment, not argv, so `ps` does not show them.

Why not wrk2 or h2load for the fixed rate: wrk2 is not packaged in Debian, and h2load's
`--rps` paces each connection with its own timer, all started together, so N connections
send in bursts of N (measured: 13 ms p50 at 100 rps against an Envoy that answers in
0.3 ms). The client here schedules request i at start + i/rate, sends it on a free
keep-alive connection (or a new one), and times it from that schedule.
"""

from __future__ import annotations

import asyncio
import math
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import aiohttp
from cpu import children_rusage_seconds

__all__ = ["LOOPBACK", "OPEN_LOOP_CONNECTIONS", "OpenLoopResult", "WrkResult",
           "parse_wrk_output", "run_open_loop", "run_wrk"]

LOOPBACK: Final = "127.0.0.1"
LUA_SCRIPT: Final = Path(__file__).resolve().with_name("post.lua")


@dataclass(frozen=True, slots=True)
class WrkResult:
    requests: int
    duration_s: float
    connect_errors: int
    read_errors: int
    write_errors: int
    status_errors: int
    timeouts: int
    p50_ms: float
    p90_ms: float
    p99_ms: float
    p999_ms: float
    mean_ms: float
    max_ms: float
    exit_code: int

    @property
    def rps(self) -> float:
        return self.requests / self.duration_s if self.duration_s > 0 else 0.0

    @property
    def error_count(self) -> int:
        return (self.connect_errors + self.read_errors + self.write_errors
                + self.status_errors + self.timeouts)

    def error_text(self) -> str:
        if self.requests == 0:  # every connection timed out or was refused: no figures
            return "no request completed" + (f", wrk exit {self.exit_code}"
                                             if self.exit_code else "")
        if self.error_count == 0 and self.exit_code == 0:
            return ""
        parts = [f"{name}={value}" for name, value in (
            ("non-2xx/3xx", self.status_errors), ("connect", self.connect_errors),
            ("read", self.read_errors), ("write", self.write_errors),
            ("timeout", self.timeouts)) if value]
        if self.exit_code:
            parts.append(f"wrk exit {self.exit_code}")
        return ", ".join(parts)


_RESULT_RE: Final = re.compile(r"^BENCH_RESULT (.*)$", re.MULTILINE)


def parse_wrk_output(stdout: str, exit_code: int) -> WrkResult:
    match = _RESULT_RE.search(stdout)
    if match is None:
        raise RuntimeError(f"wrk printed no BENCH_RESULT line (exit {exit_code}):\n{stdout}")
    values = {k: float(v) for k, v in (item.split("=", 1) for item in match.group(1).split())}
    non_2xx = re.search(r"Non-2xx or 3xx responses:\s*(\d+)", stdout)
    status_errors = int(values["status"])
    if non_2xx is not None:  # same counter as summary.errors.status; take the larger
        status_errors = max(status_errors, int(non_2xx.group(1)))
    return WrkResult(
        requests=int(values["requests"]),
        duration_s=values["duration_us"] / 1e6,
        connect_errors=int(values["connect"]),
        read_errors=int(values["read"]),
        write_errors=int(values["write"]),
        status_errors=status_errors,
        timeouts=int(values["timeout"]),
        p50_ms=values["p50_us"] / 1000,
        p90_ms=values["p90_us"] / 1000,
        p99_ms=values["p99_us"] / 1000,
        p999_ms=values["p999_us"] / 1000,
        mean_ms=values["mean_us"] / 1000,
        max_ms=values["max_us"] / 1000,
        exit_code=exit_code,
    )


def run_wrk(port: int, *, concurrency: int, threads: int, duration_s: int, key: str,
            path: str, body: str, headers: Mapping[str, str] | None = None,
            ) -> tuple[WrkResult, float]:
    """One bounded wrk run against 127.0.0.1:port; returns the result and wrk's CPU seconds.

    `headers` are extra request headers (a peer's routing headers), passed to post.lua as
    `name: value` lines in BENCH_HEADERS.
    """
    wrk = shutil.which("wrk")
    if wrk is None:
        raise FileNotFoundError("wrk not found: apt-get install -y wrk")
    command = [
        wrk, "-t", str(max(1, min(threads, concurrency))), "-c", str(concurrency),
        "-d", f"{duration_s}s", "--timeout", "5s", "--latency", "-s", str(LUA_SCRIPT),
        f"http://{LOOPBACK}:{port}{path}",
    ]
    extra = "\n".join(f"{name}: {value}" for name, value in (headers or {}).items())
    env = dict(os.environ, BENCH_KEY=key, BENCH_BODY=body, BENCH_PATH=path,
               BENCH_HEADERS=extra)
    before = children_rusage_seconds()
    completed = subprocess.run(command, env=env, capture_output=True, text=True,
                               timeout=duration_s + 60, check=False)
    cpu = children_rusage_seconds() - before
    if completed.stderr.strip():
        print(completed.stderr.strip(), file=sys.stderr)
    return parse_wrk_output(completed.stdout, completed.returncode), cpu


# --------------------------------------------------------------------------- open loop

OPEN_LOOP_CONNECTIONS: Final = 256
"""Most connections the open-loop client keeps: a request that finds them all busy waits
for one, and that wait counts in its latency (measured from its scheduled start)."""
OPEN_LOOP_TIMEOUT_S: Final = 5.0


@dataclass(frozen=True, slots=True)
class OpenLoopResult:
    """A fixed-rate run: every request's time from its *scheduled* start to its last byte.

    Measuring from the schedule, not from when the client got round to sending, keeps a
    slow server's queueing in the numbers (no coordinated omission).
    """

    target_rps: float
    duration_s: float
    """From the first scheduled start to the last response."""
    latencies_ms: tuple[float, ...]
    non_2xx: int
    failed: int
    """Requests that got no response (connection error or the 5 s timeout)."""
    scheduled: int

    @property
    def requests(self) -> int:
        return len(self.latencies_ms)

    @property
    def achieved_rps(self) -> float:
        return self.requests / self.duration_s if self.duration_s > 0 else 0.0

    def percentile(self, pct: float) -> float:
        """Nearest rank, as bench/common.py and the probes define it."""
        ordered = sorted(self.latencies_ms)
        if not ordered:
            return math.nan
        return ordered[max(0, math.ceil(pct / 100 * len(ordered)) - 1)]

    @property
    def rate_held(self) -> bool:
        """Within 5 % of the asked rate: otherwise the server could not keep up."""
        return self.achieved_rps >= 0.95 * self.target_rps

    def error_text(self) -> str:
        return ", ".join(f"{name}={n}" for name, n in (("non-2xx", self.non_2xx),
                                                       ("failed (no response in 5 s)",
                                                        self.failed)) if n)


async def _open_loop(url: str, *, rate: int, duration_s: int, body: bytes,
                     headers: Mapping[str, str]) -> OpenLoopResult:
    loop = asyncio.get_running_loop()
    connector = aiohttp.TCPConnector(limit=OPEN_LOOP_CONNECTIONS)
    timeout = aiohttp.ClientTimeout(total=OPEN_LOOP_TIMEOUT_S)
    latencies: list[float] = []
    counts = {"non_2xx": 0, "failed": 0}
    last_end = 0.0

    async def one(session: aiohttp.ClientSession, scheduled: float) -> None:
        nonlocal last_end
        try:
            async with session.post(url, data=body, headers=dict(headers)) as response:
                await response.read()
                status = response.status
        except (aiohttp.ClientError, TimeoutError, OSError):
            counts["failed"] += 1
            return
        end = loop.time()
        last_end = max(last_end, end)
        latencies.append((end - scheduled) * 1000)
        if not 200 <= status < 300:
            counts["non_2xx"] += 1

    total = rate * duration_s
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        start = loop.time() + 0.05
        tasks = []
        for index in range(total):
            scheduled = start + index / rate
            delay = scheduled - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(session, scheduled)))
        await asyncio.gather(*tasks)
    return OpenLoopResult(float(rate), max(last_end - start, 1e-9), tuple(latencies),
                          counts["non_2xx"], counts["failed"], total)


def run_open_loop(port: int, *, rate: int, duration_s: int, key: str, path: str, body: str,
                  headers: Mapping[str, str] | None = None) -> OpenLoopResult:
    """`rate` requests/s for `duration_s` against 127.0.0.1:port, each started on its
    schedule whatever the others are doing (aiohttp, HTTP/1.1 keep-alive)."""
    sent = {"Content-Type": "application/json", **(headers or {})}
    if key:
        sent["Authorization"] = f"Bearer {key}"
    return asyncio.run(_open_loop(f"http://{LOOPBACK}:{port}{path}", rate=rate,
                                  duration_s=duration_s, body=body.encode(), headers=sent))
