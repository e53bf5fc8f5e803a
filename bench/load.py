"""Load drivers: wrk for closed-loop levels, h2load at a fixed rate for open-loop latency.

Both contact only 127.0.0.1 and are bounded by their duration. Secrets (virtual or
provider keys) reach wrk through its environment, not argv, so `ps` does not show them;
h2load takes headers only on its command line, so the open-loop run gets them from a
`-H` list built here (visible in `ps` for its few seconds: bench keys are random per run
and die with the run's processes).
"""

from __future__ import annotations

import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from cpu import children_rusage_seconds

__all__ = ["LOOPBACK", "OpenLoopResult", "WrkResult", "parse_h2load_log", "parse_wrk_output",
           "run_open_loop", "run_wrk"]

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

OPEN_LOOP_CLIENTS: Final = 25
"""h2load connections for the fixed-rate run: 500 rps over 25 connections is 20 rps each,
so a connection stays free (the rate holds, no coordinated omission) while a request
takes under 50 ms. A slower server shows as an achieved rate below the target."""


@dataclass(frozen=True, slots=True)
class OpenLoopResult:
    """A fixed-rate run: per-request latencies from h2load's --log-file."""

    target_rps: float
    duration_s: float
    latencies_ms: tuple[float, ...]
    non_2xx: int
    failed: int
    """Requests h2load counted failed/errored/timed out (no status to log)."""
    exit_code: int

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
        parts = [f"{name}={n}" for name, n in (("non-2xx", self.non_2xx),
                                                ("failed", self.failed)) if n]
        if self.exit_code:
            parts.append(f"h2load exit {self.exit_code}")
        return ", ".join(parts)


_H2LOAD_REQUESTS_RE: Final = re.compile(
    r"requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, (\d+) failed, "
    r"(\d+) errored, (\d+) timeout")


def parse_h2load_log(text: str) -> tuple[list[float], int]:
    """(latencies in ms of requests that got a status, how many of them were not 2xx)."""
    latencies: list[float] = []
    non_2xx = 0
    for line in text.splitlines():
        fields = line.split("\t")
        if len(fields) < 3:
            continue
        status, duration_us = int(fields[1]), int(fields[2])
        if status <= 0:  # h2load logs -1 for a request that got no response
            continue
        latencies.append(duration_us / 1000)
        if not 200 <= status < 300:
            non_2xx += 1
    return latencies, non_2xx


def run_open_loop(port: int, *, rate: int, duration_s: int, key: str, path: str, body: str,
                  headers: Mapping[str, str] | None = None,
                  clients: int = OPEN_LOOP_CLIENTS) -> OpenLoopResult:
    """`rate` requests/s for `duration_s` against 127.0.0.1:port with h2load (HTTP/1.1,
    one request in flight per connection, each connection paced at rate/clients)."""
    h2load = shutil.which("h2load")
    if h2load is None:
        raise FileNotFoundError("h2load not found: apt-get install -y nghttp2-client")
    clients = max(1, min(clients, rate))
    per_client = max(1, round(rate / clients))
    with tempfile.TemporaryDirectory(prefix="asc-bench-h2load-") as tmp:
        body_file, log_file = Path(tmp) / "body.json", Path(tmp) / "requests.tsv"
        body_file.write_text(body, encoding="utf-8")
        command = [h2load, "--h1", "-c", str(clients), "-t", "1", "-D", str(duration_s),
                   "--rps", str(per_client), "-d", str(body_file),
                   "--log-file", str(log_file),
                   "-H", "content-type: application/json"]
        if key:
            command += ["-H", f"authorization: Bearer {key}"]
        for name, value in (headers or {}).items():
            command += ["-H", f"{name}: {value}"]
        command.append(f"http://{LOOPBACK}:{port}{path}")
        completed = subprocess.run(command, capture_output=True, text=True,
                                   timeout=duration_s + 60, check=False)
        latencies, non_2xx = parse_h2load_log(
            log_file.read_text(encoding="ascii", errors="replace") if log_file.exists() else "")
    counts = _H2LOAD_REQUESTS_RE.search(completed.stdout)
    failed = sum(int(v) for v in counts.groups()[4:7]) if counts else 0
    if counts is None and completed.returncode == 0:
        raise RuntimeError(f"h2load printed no request counts:\n{completed.stdout[-2000:]}")
    return OpenLoopResult(float(per_client * clients), float(duration_s), tuple(latencies),
                          non_2xx, failed, completed.returncode)
