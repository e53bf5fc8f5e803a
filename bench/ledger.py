"""The budget ledger seen from outside: Redis round trips, reservations, Redis down.

`INFO commandstats` of the bench redis-server counts the EVALSHAs per request; extproc's
/metrics counts held reservations; after the load runs the bench redis-server is stopped
and sequential requests check that the budgets tenant gets a fast 503 (`fail_closed`)
while the tenant without budgets still gets 200.

Run on its own, it measures the ledger in this process instead: CPU per reserve + settle
pair against a redis-server of its own, the batched calls through redis-py's pipeline
(`redis-py`) and through the ledger's own RESP connections (`resp`, `resp_pool`), rounds
alternating in one run. `time.process_time()` over the round / pairs; never asserts a
timing; only 127.0.0.1 is contacted.

    .venv/bin/python bench/ledger.py                  # 16 concurrent requests, 5 rounds
    .venv/bin/python bench/ledger.py --pairs 4000 --rounds 7
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import math
import re
import socket
import statistics
import sys
import tempfile
import time
import urllib.request
import uuid
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Final
from zoneinfo import ZoneInfo

from stack import BODY, BUDGET_TENANT, CHAT_PATH, TENANT, BenchStack

from extproc.budgets.guard import BREAKER_COOLDOWN_S
from extproc.budgets.ledger import RedisLedger, Reservation, redis_client, resp_pool
from extproc.budgets.policy import (
    BudgetRule,
    RateLimits,
    Scope,
    TenantBudget,
    Window,
    hash_tag,
    plan_reservation,
)
from extproc.config import RedisSettings
from extproc.devstack import LOOPBACK, Stack

__all__ = ["BREAKER_COOLDOWN_S", "CONNECTION_COMMANDS", "FAIL_CLOSED_REQUESTS",
           "LEDGER_PATHS", "ROUND_TRIP_COMMANDS", "Probe", "budget_reservations",
           "counter_delta", "ledger_cpu_us_per_pair", "ledger_unavailable_reasons", "probe",
           "redis_command_stats", "redis_down_probes"]

ROUND_TRIP_COMMANDS: Final = ("evalsha", "eval", "script")
"""Budget round trips: EVALSHA, plus EVAL / SCRIPT LOAD when a script had to be reloaded."""
CONNECTION_COMMANDS: Final = frozenset({"hello", "client", "select", "ping", "auth",
                                        "readonly", "command"})
"""Sent by redis-py on a new connection: round trips too, but per connection, not request.
Every other command in `INFO commandstats` is counted there when a Lua script calls it."""
FAIL_CLOSED_REQUESTS: Final = 200
UTC_ZONE: Final = ZoneInfo("UTC")


def _read_reply_line(sock: socket.socket, buffer: bytearray) -> bytes:
    while b"\r\n" not in buffer:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("redis closed the connection")
        buffer += chunk
    line, _, rest = bytes(buffer).partition(b"\r\n")
    buffer[:] = rest
    return line


def redis_command_stats(port: int) -> dict[str, int]:
    """Commands served so far by the redis on 127.0.0.1:port: name -> calls + rejected.

    A minimal RESP client (`INFO commandstats`), so the bench needs no redis-cli.
    """
    with socket.create_connection((LOOPBACK, port), timeout=5) as sock:
        sock.sendall(b"*2\r\n$4\r\nINFO\r\n$12\r\ncommandstats\r\n")
        buffer = bytearray()
        header = _read_reply_line(sock, buffer)
        if not header.startswith(b"$"):
            raise RuntimeError(f"redis INFO: unexpected reply {header[:200]!r}")
        size = int(header[1:])
        while len(buffer) < size:
            chunk = sock.recv(65536)
            if not chunk:
                raise ConnectionError("redis closed the connection")
            buffer += chunk
    stats: dict[str, int] = {}
    for line in bytes(buffer[:size]).decode("utf-8", "replace").splitlines():
        name, sep, values = line.partition(":")
        if not sep or not name.startswith("cmdstat_"):
            continue
        fields = dict(item.split("=", 1) for item in values.split(",") if "=" in item)
        stats[name.removeprefix("cmdstat_")] = (int(fields.get("calls", 0))
                                                + int(fields.get("rejected_calls", 0)))
    return stats


def counter_delta(before: Mapping[str, int], after: Mapping[str, int]) -> dict[str, int]:
    """Per command, calls between two snapshots; our own INFO calls are left out."""
    delta = {name: after[name] - before.get(name, 0) for name in after if name != "info"}
    return {name: calls for name, calls in delta.items() if calls}


_RESERVATIONS_RE: Final = re.compile(r"^asc_budget_reservations_total\{([^}]*)\}\s+(\S+)",
                                     re.MULTILINE)


def budget_reservations(metrics_port: int, tenant: str, result: str = "held") -> float | None:
    """`asc_budget_reservations_total{tenant, result}` from extproc's /metrics."""
    try:
        with urllib.request.urlopen(  # fixed http://127.0.0.1 URL
                f"http://{LOOPBACK}:{metrics_port}/metrics", timeout=5) as response:
            text = response.read().decode("utf-8", "replace")
    except OSError:
        return None
    total = 0.0
    for labels, value in _RESERVATIONS_RE.findall(text):
        if f'tenant="{tenant}"' in labels and f'result="{result}"' in labels:
            total += float(value)
    return total


def ledger_unavailable_reasons(log_path: Path) -> Counter[str]:
    """Reasons of extproc's "budget ledger unavailable" warnings so far (its JSON log)."""
    reasons: Counter[str] = Counter()
    try:
        lines = log_path.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return reasons
    for line in lines:
        if "budget ledger unavailable" not in line:
            continue
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if isinstance(event, dict):
            reasons[str(event.get("reason", "?"))] += 1
    return reasons


@dataclass(frozen=True, slots=True)
class Probe:
    """N sequential keep-alive requests of one tenant, each checked against what it expects."""

    label: str
    tenant: str
    redis: str
    """'up' or 'down' while the probe ran."""
    expected_status: int
    expected_code: str | None
    latencies_ms: tuple[float, ...]
    statuses: Mapping[int, int]
    codes: Mapping[str, int]
    failures: tuple[str, ...]
    """First few requests that did not get what was expected."""
    failure_count: int
    reconnects: int

    @property
    def ok(self) -> bool:
        return self.failure_count == 0 and len(self.latencies_ms) > 0

    def percentile(self, pct: float) -> float:
        ordered = sorted(self.latencies_ms)
        if not ordered:
            return math.nan
        return ordered[max(0, math.ceil(pct / 100 * len(ordered)) - 1)]  # nearest rank

    @property
    def max_ms(self) -> float:
        return max(self.latencies_ms, default=math.nan)


def _error_code(payload: bytes) -> str | None:
    try:
        body = json.loads(payload)
    except ValueError:
        return None
    error = body.get("error") if isinstance(body, dict) else None
    code = error.get("code") if isinstance(error, dict) else None
    return code if isinstance(code, str) else None


def probe(port: int, key: str, *, label: str, tenant: str, redis: str, requests: int,
          expected_status: int, expected_code: str | None) -> Probe:
    """`requests` sequential POSTs on one keep-alive connection to 127.0.0.1:port (bounded;
    a connection the server closed is reopened once per request)."""
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    body = BODY.encode()
    latencies: list[float] = []
    statuses: Counter[int] = Counter()
    codes: Counter[str] = Counter()
    failures: list[str] = []
    failure_count = reconnects = 0
    connection = http.client.HTTPConnection(LOOPBACK, port, timeout=10)
    try:
        for index in range(requests):
            started = time.perf_counter()
            for attempt in range(2):
                try:
                    connection.request("POST", CHAT_PATH, body=body, headers=headers)
                    response = connection.getresponse()
                    payload = response.read()
                    break
                except (http.client.HTTPException, OSError) as exc:
                    connection.close()
                    if attempt:
                        raise RuntimeError(f"{label}: request {index} failed twice: "
                                           f"{type(exc).__name__}: {exc}") from None
                    reconnects += 1
                    started = time.perf_counter()  # time the retried request only
            latencies.append((time.perf_counter() - started) * 1000)
            statuses[response.status] += 1
            code = _error_code(payload) if response.status != 200 else None
            if code:
                codes[code] += 1
            if response.status == 200:
                good = response.status == expected_status and b'"choices"' in payload
            else:
                good = response.status == expected_status and code == expected_code
            if not good:
                failure_count += 1
                if len(failures) < 3:
                    failures.append(f"#{index}: HTTP {response.status} {payload[:200]!r}")
    finally:
        connection.close()
    return Probe(label, tenant, redis, expected_status, expected_code, tuple(latencies),
                 dict(statuses), dict(codes), tuple(failures), failure_count, reconnects)


def redis_down_probes(bench: BenchStack, requests: int) -> list[Probe]:
    """Budgets tenant with Redis up (reference), then stop the bench redis-server and send
    the same requests for the budgets tenant (503 gateway_unavailable expected) and the
    tenant without budgets (200 expected: it never calls Redis)."""
    assert bench.redis is not None
    assert bench.budget_key is not None
    port = bench.gateway_port
    # A breaker opened by the load (Redis calls over timeout_ms) must not answer for Redis.
    time.sleep(BREAKER_COOLDOWN_S + 0.5)
    probes = [probe(port, bench.budget_key, label="budgets tenant, Redis up",
                    tenant=BUDGET_TENANT, redis="up", requests=requests,
                    expected_status=200, expected_code=None)]
    bench.redis.stop()
    if bench.redis.alive():
        raise RuntimeError("the bench redis-server did not stop")
    probes.append(probe(port, bench.budget_key, label="budgets tenant, Redis down",
                        tenant=BUDGET_TENANT, redis="down", requests=requests,
                        expected_status=503, expected_code="gateway_unavailable"))
    probes.append(probe(port, bench.tenant_key, label="no-budget tenant, Redis down",
                        tenant=TENANT, redis="down", requests=requests,
                        expected_status=200, expected_code=None))
    return probes


LEDGER_PATHS: Final = ("redis-py", "resp")
"""How the ledger's batched calls reach Redis: `client.pipeline()`, or `resp_pool`."""


def _bench_reservation(budget: TenantBudget) -> Reservation:
    """A tenant monthly budget and an RPM limit: two groups, as a budgets tenant has."""
    groups = plan_reservation(budget, key_id="k1", model="m", cost_micro_usd=1_000,
                              estimated_tokens=100, now=datetime.now(UTC), zone=UTC_ZONE)
    return Reservation(request_id=uuid.uuid4().hex, tag=hash_tag(budget), groups=groups)


async def ledger_cpu_us_per_pair(url: str, path: str, *, pairs: int,
                                 concurrency: int) -> float:
    """This process's CPU µs per reserve + settle, `concurrency` requests at a time, each
    reserving then settling, `pairs` in all (after a warm-up of `concurrency` pairs)."""
    settings = RedisSettings(url=url)
    client = redis_client(settings)
    resp = resp_pool(settings) if path == "resp" else None
    ledger = RedisLedger(client, resp=resp, io_timeout_s=settings.timeout_ms / 1000)
    budget = TenantBudget(tenant=f"bench-{uuid.uuid4().hex[:8]}", org=None,
                          rules=(BudgetRule(Scope.TENANT, Window.MONTH, 10**15),),
                          rate_limits=RateLimits(rpm=10**9))

    async def requests(count: int) -> float:
        """CPU seconds of `count` pairs."""
        # Planned before: only the ledger's own work is measured.
        planned = iter([_bench_reservation(budget) for _ in range(count)])
        actual = [500, 500]

        async def one_stream() -> None:
            for reservation in planned:
                if not (await ledger.reserve(reservation)).held:
                    raise RuntimeError("bench reservation refused")
                await ledger.settle(reservation, actual)

        started = time.process_time()
        await asyncio.gather(*(one_stream() for _ in range(concurrency)))
        return time.process_time() - started

    try:
        await requests(concurrency)  # scripts loaded, connections open
        return await requests(pairs) / pairs * 1e6
    finally:
        ledger.close()
        await client.aclose()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="the ledger's CPU per reserve + settle")
    parser.add_argument("--pairs", type=int, default=3000, help="per round and path")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--concurrency", type=int, default=16)
    args = parser.parse_args(argv)
    figures: dict[str, list[float]] = {path: [] for path in LEDGER_PATHS}
    with Stack(Path(tempfile.mkdtemp(prefix="asc-ledger-bench-"))) as stack:
        _, port = stack.start_redis()
        url = f"redis://{LOOPBACK}:{port}/0"
        for round_index in range(args.rounds):
            order = LEDGER_PATHS if round_index % 2 == 0 else LEDGER_PATHS[::-1]
            for path in order:
                figures[path].append(asyncio.run(ledger_cpu_us_per_pair(
                    url, path, pairs=args.pairs, concurrency=args.concurrency)))
            print(f"round {round_index + 1}: " + "  ".join(
                f"{path} {figures[path][-1]:.1f} µs" for path in LEDGER_PATHS), flush=True)
    base, raw = (statistics.median(figures[path]) for path in LEDGER_PATHS)
    print(f"\nextproc CPU per reserve + settle, {args.concurrency} concurrent requests, "
          f"{args.pairs} pairs x {args.rounds} rounds (median):")
    print(f"  redis-py pipeline   {base:7.1f} µs")
    print(f"  resp (hiredis)      {raw:7.1f} µs   ({raw / base:.2f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
