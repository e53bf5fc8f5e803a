"""`extproc audit query` finds the right records among 100,000 (the 1M figure is measured
by bench/audit_query.py: a 1M-record log takes about a minute to write, too long for `make
test`). The answers are compared with a brute-force scan of the generated records.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from bench.audit_query import write_synthetic_log
from extproc.audit.chain import load_public_keys
from extproc.audit.query import Query, parse_time, query
from extproc.audit.verify import verify_paths

COUNT = 100_000


@pytest.fixture(scope="module")
def log(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict[str, Any]]]:
    directory = tmp_path_factory.mktemp("audit-query")
    kept = write_synthetic_log(directory, COUNT, per_file=40_000)
    return directory, kept


def minute_of(ns: int) -> str:
    return datetime.fromtimestamp(ns / 1e9, UTC).strftime("%Y-%m-%dT%H:%MZ")


def test_tenant_at_a_minute_finds_exactly_the_requests_running_then(
        log: tuple[Path, list[dict[str, Any]]]) -> None:
    directory, kept = log
    rng = random.Random(3)
    for target in rng.sample(kept, 5):
        at = parse_time(minute_of(target["time_ns"]))
        expected = {r["request_id"] for r in kept if r["tenant"] == target["tenant"]
                    and r["time_ns"] < at.end_ns
                    and r["time_ns"] + int(r["latency_ms"] * 1_000_000) >= at.start_ns}
        found = list(query([directory], Query(tenant=target["tenant"], at=at)))
        assert {r["request_id"] for r in found} == expected
        assert target["request_id"] in expected
        assert all(r["tenant"] == target["tenant"] for r in found)


def test_other_filters_match_a_brute_force_scan(
        log: tuple[Path, list[dict[str, Any]]]) -> None:
    directory, kept = log
    target = kept[54_321]
    day = datetime.fromtimestamp(target["time_ns"] / 1e9, UTC).strftime("%Y-%m-%d")
    window = parse_time(day)
    by_credential = {r["request_id"] for r in kept if r["credential"] == target["credential"]
                     and window.start_ns <= r["time_ns"] < window.end_ns}
    found = query([directory], Query(credential=target["credential"], since=window,
                                     until=window, limit=100_000))
    assert {r["request_id"] for r in found} == by_credential
    by_model_region = {r["request_id"] for r in kept if r["model_asked"] == target[
        "model_asked"] and r["region"] == target["region"]
        and window.start_ns <= r["time_ns"] < window.end_ns}
    found = query([directory], Query(model=target["model_asked"], region=target["region"],
                                     since=window, until=window, limit=100_000))
    assert {r["request_id"] for r in found} == by_model_region
    [one] = query([directory], Query(request_id=target["request_id"]))
    assert one["time_ns"] == target["time_ns"]


def test_cli_answers_and_the_synthetic_log_verifies(
        log: tuple[Path, list[dict[str, Any]]]) -> None:
    directory, kept = log
    target = kept[77_777]
    result = subprocess.run(
        [sys.executable, "-m", "extproc", "audit", "query", str(directory), "--tenant",
         target["tenant"], "--at", minute_of(target["time_ns"])],
        capture_output=True, text=True, timeout=120, check=True)
    assert target["request_id"] in [json.loads(line)["request_id"]
                                    for line in result.stdout.splitlines()]
    report = verify_paths([directory], load_public_keys(directory / "audit.pub"))
    assert report.ok, [str(p) for p in report.problems[:3]]
    assert report.records == COUNT
