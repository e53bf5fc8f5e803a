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
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Final, cast

import httptools
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
    """Requests that got no response: a connection error, or none within 5 s of the
    scheduled start (also when they waited that long for a free connection)."""
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


class _Connection(asyncio.Protocol):
    """One kept-alive HTTP/1.1 connection of the open-loop client: one request at a time,
    its response read with httptools (no per-request objects beyond the parser's
    callbacks, so the client takes little of the cores it shares with the target)."""

    def __init__(self, client: _OpenLoopClient) -> None:
        self._client = client
        self._parser = httptools.HttpResponseParser(self)
        self.transport: asyncio.Transport | None = None
        self.scheduled: float | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._keep_alive = True

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def send(self, scheduled: float) -> None:
        assert self.transport is not None
        self.scheduled = scheduled
        # As a client's total timeout: from the request's scheduled start.
        self._timer = self._client.loop.call_at(scheduled + OPEN_LOOP_TIMEOUT_S,
                                                self._timed_out)
        self.transport.write(self._client.request)

    def data_received(self, data: bytes) -> None:
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError:
            self._fail()

    def on_message_complete(self) -> None:
        scheduled, self.scheduled = self.scheduled, None
        if self._timer is not None:
            self._timer.cancel()
        if scheduled is None:
            return
        self._keep_alive = self._parser.should_keep_alive()
        self._client.answered(self, scheduled, self._parser.get_status_code())

    def _timed_out(self) -> None:
        self._fail()

    def _fail(self) -> None:
        scheduled, self.scheduled = self.scheduled, None
        if self.transport is not None:
            self.transport.close()
        if scheduled is not None:
            self._client.failed(self)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._keep_alive = False
        self._fail()
        self._client.closed(self)

    @property
    def reusable(self) -> bool:
        return self._keep_alive and self.transport is not None and \
            not self.transport.is_closing()


class _OpenLoopClient:
    """Schedules request i at start + i/rate on an idle connection (a new one while fewer
    than OPEN_LOOP_CONNECTIONS are open, else the next that frees up)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, port: int, request: bytes) -> None:
        self.loop = loop
        self.port = port
        self.request = request
        self.latencies: list[float] = []
        self.non_2xx = 0
        self.failures = 0
        self.last_end = 0.0
        self._idle: list[_Connection] = []
        self._queued: deque[float] = deque()
        self._open = 0
        self._pending = 0
        self._done: asyncio.Future[None] | None = None
        """Set by `drain`: resolved when the last request is answered or failed."""
        self._connecting: set[asyncio.Task[None]] = set()

    def start(self, scheduled: float) -> None:
        self._pending += 1
        if self._expired(scheduled):
            self.failures += 1
            self._one_done()
            return
        while self._idle:
            connection = self._idle.pop()
            if connection.reusable:
                connection.send(scheduled)
                return
        if self._open < OPEN_LOOP_CONNECTIONS:
            self._open += 1
            task = self.loop.create_task(self._connect(scheduled))
            self._connecting.add(task)
            task.add_done_callback(self._connecting.discard)
        else:
            self._queued.append(scheduled)

    async def _connect(self, scheduled: float) -> None:
        try:
            _, connection = await self.loop.create_connection(
                lambda: _Connection(self), LOOPBACK, self.port)
        except OSError:
            self._open -= 1
            self.failures += 1
            self._one_done()
            return
        connection.send(scheduled)

    def answered(self, connection: _Connection, scheduled: float, status: int) -> None:
        end = self.loop.time()
        self.last_end = max(self.last_end, end)
        self.latencies.append((end - scheduled) * 1000)
        if not 200 <= status < 300:
            self.non_2xx += 1
        self._free(connection)
        self._one_done()

    def failed(self, connection: _Connection) -> None:
        self.failures += 1
        self._one_done()

    def closed(self, connection: _Connection) -> None:
        self._open -= 1
        if self._queued:  # a queued request gets a new connection in its place
            self._pending -= 1
            self.start(self._queued.popleft())

    def _free(self, connection: _Connection) -> None:
        if not connection.reusable:
            return  # connection_lost will count it closed
        while self._queued:
            scheduled = self._queued.popleft()
            if not self._expired(scheduled):
                connection.send(scheduled)
                return
            self.failures += 1  # waited for a connection past its timeout
            self._one_done()
        self._idle.append(connection)

    def _expired(self, scheduled: float) -> bool:
        return self.loop.time() - scheduled >= OPEN_LOOP_TIMEOUT_S

    def _one_done(self) -> None:
        self._pending -= 1
        if self._pending == 0 and self._done is not None and not self._done.done():
            self._done.set_result(None)

    async def drain(self) -> None:
        """Wait for every request started (each ends within OPEN_LOOP_TIMEOUT_S)."""
        if self._pending:
            self._done = self.loop.create_future()
            await self._done
        for connection in self._idle:
            if connection.transport is not None:
                connection.transport.close()


async def _open_loop(port: int, *, rate: int, duration_s: int,
                     request: bytes) -> OpenLoopResult:
    loop = asyncio.get_running_loop()
    client = _OpenLoopClient(loop, port, request)
    total = rate * duration_s
    start = loop.time() + 0.05
    for index in range(total):
        scheduled = start + index / rate
        delay = scheduled - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        client.start(scheduled)
    await client.drain()
    return OpenLoopResult(float(rate), max(client.last_end - start, 1e-9),
                          tuple(client.latencies), client.non_2xx, client.failures, total)


def run_open_loop(port: int, *, rate: int, duration_s: int, key: str, path: str, body: str,
                  headers: Mapping[str, str] | None = None) -> OpenLoopResult:
    """`rate` requests/s for `duration_s` against 127.0.0.1:port, each started on its
    schedule whatever the others are doing (HTTP/1.1 keep-alive, the request's bytes built
    once)."""
    sent = {"Host": f"{LOOPBACK}:{port}", "Content-Type": "application/json",
            **(headers or {})}
    if key:
        sent["Authorization"] = f"Bearer {key}"
    data = body.encode()
    sent["Content-Length"] = str(len(data))
    head = "".join(f"{name}: {value}\r\n" for name, value in sent.items())
    request = f"POST {path} HTTP/1.1\r\n{head}\r\n".encode() + data
    return asyncio.run(_open_loop(port, rate=rate, duration_s=duration_s, request=request))
