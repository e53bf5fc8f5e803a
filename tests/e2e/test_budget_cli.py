"""Issue 8 item 14: `extproc budget show / set / reset` against a real redis-server.

Each command runs as its own process, as an operator runs them: `set --limit N` must
change the limit that an earlier `show` (another process, another hash seed) listed as
N, and every counter the CLI writes must expire like the gateway's own.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import redis

from extproc.auth import hash_key
from extproc.devstack import Stack
from extproc.secrets import Secret
from tests.conftest import PEPPER, gateway_config, write_config

KEYS = ("alpha", "bravo", "charlie", "delta", "echo", "foxtrot")


def cli_config(directory: Path, redis_port: int) -> Path:
    """acme with one daily budget per key (distinct limits), a tenant budget and RPM."""
    doc: dict[str, Any] = gateway_config(1)
    doc["redis"] = {"url": f"redis://127.0.0.1:{redis_port}/0"}
    acme = doc["tenants"]["acme"]
    acme["keys"] = [{"id": key, "hash": hash_key(Secret(PEPPER), f"sk-{key}")} for key in KEYS]
    acme["budgets"] = [{"scope": "tenant", "window": "month", "limit_usd": 100}] + [
        {"scope": "key", "key": key, "window": "day", "limit_usd": n + 1}
        for n, key in enumerate(KEYS)]
    acme["rate_limits"] = {"rpm": 50}
    return write_config(directory, doc)


def extproc(config: Path, *args: str, seed: int) -> list[str]:
    env = dict(os.environ, PYTHONHASHSEED=str(seed))
    done = subprocess.run([sys.executable, "-m", "extproc", "budget", *args, "acme",
                           "--config", str(config)], capture_output=True, text=True,
                          env=env, timeout=60, check=True)
    return done.stdout.splitlines()


def shown(config: Path, *, seed: int) -> list[tuple[str, str]]:
    """(limit name, spent) per row of `budget show`, in its numbering."""
    rows = []
    for line in extproc(config, "show", seed=seed)[1:]:
        number, rest = line.split(None, 1)
        assert number == str(len(rows) + 1)
        name, _, amounts = rest.partition("  ")
        rows.append((name.strip(), amounts.split()[0]))
    return rows


def test_set_and_reset_change_the_limit_show_numbered(stack: Stack) -> None:
    _, redis_port = stack.start_redis()
    config = cli_config(stack.workdir / "config", redis_port)

    listed = shown(config, seed=0)
    assert [name for name, _ in listed] == [
        "tenant monthly budget", *(f"key '{key}' daily budget" for key in KEYS),
        "requests per minute"]
    for number in range(1, len(listed)):  # the USD limits
        amount = f"{number}.250000"
        assert extproc(config, "set", "--limit", str(number), "--spent-usd", amount,
                       "--yes", seed=number) == [f"set: {listed[number - 1][0]}"]
        assert shown(config, seed=100 + number)[number - 1] == (listed[number - 1][0], amount)
    assert extproc(config, "set", "--limit", str(len(listed)), "--spent-usd", "7", "--yes",
                   seed=42) == ["set: requests per minute"]

    after = shown(config, seed=7)
    assert [spent for _, spent in after] == [
        *(f"{n}.250000" for n in range(1, len(listed))), "7"]
    assert extproc(config, "reset", "--limit", "3", "--yes", seed=9) == [
        "reset: key 'bravo' daily budget"]
    assert [spent for _, spent in shown(config, seed=11)] == [
        "1.250000", "2.250000", "0.000000", *(f"{n}.250000" for n in range(4, len(listed))),
        "7"]

    client = redis.Redis(port=redis_port, decode_responses=True)
    try:
        ttls = {key: client.ttl(key) for key in client.scan_iter("asc:*")}
    finally:
        client.close()
    assert len(ttls) == len(listed)  # one counter per limit, nothing else
    [rpm] = [key for key in ttls if ":rpm:" in key]
    assert 0 < ttls[rpm] <= 120
    assert all(ttl > 7 * 86400 for key, ttl in ttls.items() if key != rpm)


def test_limit_out_of_range_is_refused(stack: Stack) -> None:
    _, redis_port = stack.start_redis()
    config = cli_config(stack.workdir / "config", redis_port)
    done = subprocess.run([sys.executable, "-m", "extproc", "budget", "reset", "acme",
                           "--config", str(config), "--limit", "9", "--yes"],
                          capture_output=True, text=True, timeout=60, check=False)
    assert (done.returncode, done.stderr) == (
        1, "--limit must be from 1 to 8 (see `budget show`)\n")
