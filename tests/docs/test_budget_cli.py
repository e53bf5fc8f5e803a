"""Issue 16 item 2: `extproc budget show / set / reset` against a real redis-server.

Each command runs as its own process, as an operator runs it (a new hash seed each time):
`--limit N` / `--limit NAME` must change the row an earlier `show` listed, a refused
command must write nothing, and every counter the CLI writes expires like the gateway's.
(Moved here from tests/e2e/test_budget_cli.py, which covered issue 8 item 14.)
"""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import redis
import yaml

from extproc.auth import hash_key
from extproc.secrets import Secret
from tests.conftest import PEPPER, gateway_config, write_config

KEYS = ("alpha", "bravo")
_SEED = itertools.count(1)


def cli_config(directory: Path, redis_port: int) -> Path:
    """acme in org acme-corp: an org budget, a tenant budget, one daily budget per key, a
    rolling model budget, RPM and TPM. globex: RPM only."""
    doc: dict[str, Any] = gateway_config(1)
    doc["redis"] = {"url": f"redis://127.0.0.1:{redis_port}/0"}
    doc["orgs"] = {"acme-corp": {"budgets": [{"window": "month", "limit_usd": 5000}]}}
    acme = doc["tenants"]["acme"]
    acme["org"] = "acme-corp"
    acme["keys"] = [{"id": key, "hash": hash_key(Secret(PEPPER), f"sk-{key}")} for key in KEYS]
    acme["budgets"] = [
        {"scope": "tenant", "window": "month", "limit_usd": 100},
        *({"scope": "key", "key": key, "window": "day", "limit_usd": n + 1}
          for n, key in enumerate(KEYS)),
        {"scope": "model", "model": "gpt-4o-mini", "window": "rolling", "period_s": 3600,
         "limit_usd": 5}]
    acme["rate_limits"] = {"rpm": 50, "tpm": 20000}
    doc["tenants"]["globex"]["rate_limits"] = {"rpm": 10}
    return write_config(directory, doc)


@pytest.fixture
def setup(redis_server: int, tmp_path: Path) -> Iterator[tuple[Path, redis.Redis]]:
    client = redis.Redis(port=redis_server, decode_responses=True)
    client.flushdb()
    try:
        yield cli_config(tmp_path / "config", redis_server), client
    finally:
        client.flushdb()
        client.close()


def budget(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONHASHSEED=str(next(_SEED)))
    return subprocess.run([sys.executable, "-m", "extproc", "budget", *args,
                           "--config", str(config)], capture_output=True, text=True,
                          env=env, timeout=60, check=False)


def ok(config: Path, *args: str) -> list[str]:
    done = budget(config, *args)
    assert (done.returncode, done.stderr) == (0, ""), done
    return done.stdout.splitlines()


def spent(config: Path) -> dict[str, str]:
    """name -> spent, from `budget show acme`."""
    lines = ok(config, "show", "acme")[2:]
    return {line.split()[2]: line.split()[6] for line in lines}


HEADER = ("# limits in config order: org budgets, the tenant's budgets as written, then rpm, "
          "tpm; `set` / `reset --limit` take the # or the name")


def test_show_numbers_names_scopes_and_aligns_columns(setup: tuple[Path, redis.Redis]) -> None:
    config, _ = setup
    assert ok(config, "show", "acme") == [
        HEADER,
        "tenant  #  name                             scope             limit         spent"
        "          held        remaining",
        "acme    1  org:month                        org     5000.000000 USD  0.000000 USD"
        "  0.000000 USD  5000.000000 USD",
        "acme    2  tenant:month                     tenant   100.000000 USD  0.000000 USD"
        "  0.000000 USD   100.000000 USD",
        "acme    3  key:alpha:day                    key        1.000000 USD  0.000000 USD"
        "  0.000000 USD     1.000000 USD",
        "acme    4  key:bravo:day                    key        2.000000 USD  0.000000 USD"
        "  0.000000 USD     2.000000 USD",
        "acme    5  model:gpt-4o-mini:rolling-3600s  model      5.000000 USD  0.000000 USD"
        "  0.000000 USD     5.000000 USD",
        "acme    6  rpm                              rpm         50 requests    0 requests"
        "    0 requests      50 requests",
        "acme    7  tpm                              tpm        20000 tokens      0 tokens"
        "      0 tokens     20000 tokens",
    ]


def test_set_without_limit_sets_every_usd_budget_and_nothing_else(
        setup: tuple[Path, redis.Redis]) -> None:
    """The issue's defect: this wrote the USD limits, then crashed with ValueError on the
    rpm row (int("0.5")) and exited 1 after a partial write."""
    config, client = setup
    assert ok(config, "set", "acme", "--spent-usd", "0.5", "--yes") == [
        "set: 1 org:month: spent 0.500000 USD",
        "set: 2 tenant:month: spent 0.500000 USD",
        "set: 3 key:alpha:day: spent 0.500000 USD",
        "set: 4 key:bravo:day: spent 0.500000 USD",
        "set: 5 model:gpt-4o-mini:rolling-3600s: spent 0.500000 USD"]
    assert spent(config) == {
        "org:month": "0.500000", "tenant:month": "0.500000", "key:alpha:day": "0.500000",
        "key:bravo:day": "0.500000", "model:gpt-4o-mini:rolling-3600s": "0.500000",
        "rpm": "0", "tpm": "0"}
    assert not [key for key in client.scan_iter("asc:*") if ":rl:" in key]


def test_rate_limits_take_counts_and_limits_take_names(setup: tuple[Path, redis.Redis]) -> None:
    """RPM/TPM counters are per UTC minute: a run that crosses a minute is done again
    (once at most), since its counters then name two different minutes."""
    config, client = setup
    for _ in range(2):
        client.flushdb()
        minute = now_minute()
        assert ok(config, "set", "acme", "--requests", "7", "--tokens", "900", "--yes") == [
            "set: 6 rpm: spent 7 requests", "set: 7 tpm: spent 900 tokens"]
        assert ok(config, "set", "acme", "--limit", "key:bravo:day", "--spent-usd", "1.25",
                  "--yes") == ["set: 4 key:bravo:day: spent 1.250000 USD"]
        assert ok(config, "set", "acme", "--limit", "3", "--spent-usd", "0.75",
                  "--yes") == ["set: 3 key:alpha:day: spent 0.750000 USD"]
        assert ok(config, "reset", "acme", "--limit", "rpm", "--yes") == [
            "reset: 6 rpm: spent 0 requests"]
        shown = spent(config)
        ttls = {key: client.ttl(key) for key in client.scan_iter("asc:*")}
        if now_minute() == minute:
            break
    assert shown == {
        "org:month": "0.000000", "tenant:month": "0.000000", "key:alpha:day": "0.750000",
        "key:bravo:day": "1.250000", "model:gpt-4o-mini:rolling-3600s": "0.000000",
        "rpm": "0", "tpm": "900"}
    day = datetime.now(UTC).strftime("d%Y-%m-%d")
    assert sorted(key.split(":")[-2] if ":rl:" in key else key.split(":")[-1]
                  for key in ttls) == sorted(["rpm", "tpm", day, day])
    assert all(0 < ttl <= 120 for key, ttl in ttls.items() if ":rl:" in key)
    assert all(ttl > 7 * 86400 for key, ttl in ttls.items() if ":rl:" not in key)


def now_minute() -> int:
    return int(time.time()) // 60


def test_reset_without_limit_resets_every_kind(setup: tuple[Path, redis.Redis]) -> None:
    config, _ = setup
    ok(config, "set", "acme", "--spent-usd", "0.5", "--requests", "3", "--tokens", "4",
       "--yes")
    assert len(ok(config, "reset", "acme", "--yes")) == 7
    assert set(spent(config).values()) == {"0.000000", "0"}


def test_spent_above_a_limit_is_written_with_a_warning(
        setup: tuple[Path, redis.Redis]) -> None:
    config, _ = setup
    done = budget(config, "set", "acme", "--limit", "key:alpha:day", "--spent-usd", "3",
                  "--yes")
    assert (done.returncode, done.stdout, done.stderr) == (
        0, "set: 3 key:alpha:day: spent 3.000000 USD\n",
        "warning: key:alpha:day: spent 3.000000 USD is above its limit 1.000000 USD; "
        "requests it covers are refused until the window resets\n")
    assert spent(config)["key:alpha:day"] == "3.000000"


@pytest.mark.parametrize(("args", "stderr"), [
    (("--limit", "rpm", "--spent-usd", "1"),
     "error: limit 6 (rpm) counts requests (hint: set it with --requests only)"),
    (("--limit", "2", "--requests", "1"),
     "error: limit 2 (tenant:month) counts usd (hint: set it with --spent-usd only)"),
    (("--limit", "9", "--spent-usd", "1"),
     "error: --limit '9' is not a limit of this tenant (hint: use a # or name from "
     "`extproc budget show`: 1=org:month, 2=tenant:month, 3=key:alpha:day, "
     "4=key:bravo:day, 5=model:gpt-4o-mini:rolling-3600s, 6=rpm, 7=tpm)"),
    (("--spent-usd", "0.1234567"),
     "error: --spent-usd has more than 6 decimal places (hint: a USD amount such as 12.5)"),
    (("--tokens", "-1"), "error: --tokens must be >= 0 (hint: a whole number)"),
    ((), "error: nothing to set (hint: give --spent-usd (budgets), --requests (rpm) or "
         "--tokens (tpm))"),
])
def test_refused_set_writes_nothing(setup: tuple[Path, redis.Redis], args: tuple[str, ...],
                                    stderr: str) -> None:
    config, client = setup
    done = budget(config, "set", "acme", *args, "--yes")
    assert (done.returncode, done.stdout, done.stderr) == (2, "", stderr + "\n")
    assert list(client.scan_iter("*")) == []


def test_globex_has_no_usd_budget_so_spent_usd_is_refused(
        setup: tuple[Path, redis.Redis]) -> None:
    config, client = setup
    done = budget(config, "set", "globex", "--spent-usd", "1", "--requests", "2", "--yes")
    assert (done.returncode, done.stderr) == (
        2, "error: this tenant has no limit counted in usd (hint: see `extproc budget show`)\n")
    assert list(client.scan_iter("*")) == []


def test_without_yes_nothing_is_written(setup: tuple[Path, redis.Redis]) -> None:
    config, client = setup
    done = budget(config, "reset", "acme")
    assert (done.returncode, done.stderr) == (
        2, "error: refusing to change live budgets without --yes (hint: check the limits "
           "with `extproc budget show` first)\n")
    assert list(client.scan_iter("*")) == []


def test_show_all_lists_every_tenant_with_limits(setup: tuple[Path, redis.Redis]) -> None:
    config, _ = setup
    for _ in range(2):  # the rpm counter is per UTC minute: again if one ended between
        minute = now_minute()
        ok(config, "set", "globex", "--requests", "4", "--yes")
        rows = [[*line.split()[:3], line.split()[6]]
                for line in ok(config, "show", "--all")[2:]]
        if now_minute() == minute:
            break
    assert rows == [["acme", "1", "org:month", "0.000000"],
                    ["acme", "2", "tenant:month", "0.000000"],
                    ["acme", "3", "key:alpha:day", "0.000000"],
                    ["acme", "4", "key:bravo:day", "0.000000"],
                    ["acme", "5", "model:gpt-4o-mini:rolling-3600s", "0.000000"],
                    ["acme", "6", "rpm", "0"], ["acme", "7", "tpm", "0"],
                    ["globex", "1", "rpm", "4"]]


def test_set_is_one_transaction_on_a_redis_cluster(tmp_path: Path) -> None:
    """MULTI/EXEC on a cluster needs every key in one slot: a tenant's counters share its
    hash tag, so `set` without --limit works there too."""
    from extproc.devstack import Stack

    with Stack(tmp_path / "stack") as stack:
        ports = stack.start_redis_cluster(3)
        config = cli_config(tmp_path / "config", ports[0])
        document = yaml.safe_load(config.read_text(encoding="utf-8"))
        document["redis"]["cluster"] = True
        config.write_text(yaml.safe_dump(document), encoding="utf-8")
        for _ in range(2):  # tpm is per UTC minute: again if one ended in between
            minute = now_minute()
            assert len(ok(config, "set", "acme", "--spent-usd", "0.5", "--tokens", "3",
                          "--yes")) == 6
            values = spent(config)
            if now_minute() == minute:
                break
        assert {name: values[name] for name in ("org:month", "key:bravo:day", "tpm")} == {
            "org:month": "0.500000", "key:bravo:day": "0.500000", "tpm": "3"}


def test_redis_down_is_one_error_line(tmp_path: Path) -> None:
    from extproc.devstack import free_port

    config = cli_config(tmp_path / "config", free_port())  # nothing listens there
    done = budget(config, "show", "acme")
    assert (done.returncode, done.stdout, done.stderr) == (
        2, "", "error: redis: ConnectionError (hint: is Redis (redis.url) reachable? a set or "
               "reset is one transaction: `extproc budget show` tells whether it was "
               "applied)\n")
