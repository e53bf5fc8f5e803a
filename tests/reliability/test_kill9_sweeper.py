"""Scenario 7: kill -9 of replicas mid-load, then the sweeper.

Three replicas, a slow provider (so holds are in flight), two replicas killed with SIGKILL
while clients keep sending. The survivor's sweeper returns the holds of the requests the
dead ones had in flight (hold_ttl_s 2). Then the ledger reconciles with the records:
every reservation is settled, released or expired (none still held), every settled one
has exactly one record charging the same request, and the tenant's `spent` is the sum of
the records' charges. Related: tests/e2e/test_budgets.py (one killed extproc, one hold).
"""

from __future__ import annotations

import collections
import json
from pathlib import Path
from typing import Any

import pytest
import redis

from extproc.cli import main as extproc_cli
from extproc.devstack import Stack
from tests.polling import wait_for
from tests.reliability.conftest import (
    Load,
    budget_document,
    figure,
    settled,
    start_replicas,
    tenant_month,
)

BUDGET = {"budgets": [{"scope": "tenant", "window": "month", "limit_usd": 100}]}


def reservations(redis_port: int, tenant: str = "acme") -> dict[str, str]:
    """request id -> state of every reservation record of `tenant`."""
    client = redis.Redis(port=redis_port, decode_responses=True)
    try:
        prefix = f"asc:{{t:{tenant}}}:res:"
        return {key.removeprefix(prefix): str(client.hget(key, "state"))
                for key in client.scan_iter(prefix + "*")}
    finally:
        client.close()


def audit_records(directory: Path) -> list[dict[str, Any]]:
    """The request records of every writer's JSONL files (checkpoints left out)."""
    found = []
    for path in sorted(directory.glob("audit-*.jsonl")):
        for line in path.read_text(encoding="utf-8").splitlines():
            entry = json.loads(line)
            if entry.get("type") == "record":
                found.append(entry)
    return found


def test_kill9_of_two_replicas_then_the_sweeper_reconciles_the_ledger(
        stack: Stack, capsys: pytest.CaptureFixture[str]) -> None:
    _, redis_port = stack.start_redis()
    base = budget_document(redis_port, hold_ttl_s=2, acme=BUDGET)

    def document(emulator_port: int) -> dict[str, Any]:
        doc = base(emulator_port)
        doc["audit"] = {"dir": "audit"}  # relative to the config: one writer per replica
        return doc

    fleet = start_replicas(stack, document, redis_port=redis_port,
                           emulator_args=("--latency-ms", "300"))

    with Load(fleet.base_url, clients=6) as load:
        assert wait_for(lambda: load.count(200) >= 30, timeout=60)
        assert wait_for(lambda: tenant_month(redis_port)[1] > 0)  # holds in flight
        fleet.extprocs[0].kill()
        fleet.extprocs[1].kill()
        served_before = load.count(200)
        assert wait_for(lambda: load.count(200) >= served_before + 30, timeout=60)

    assert settled(redis_port, timeout=30)
    spent, held = tenant_month(redis_port)
    states = reservations(redis_port)
    records = [r for r in fleet.records() if r.get("tenant") == "acme"]
    by_id: dict[str, list[dict[str, Any]]] = collections.defaultdict(list)
    for record in records:
        by_id[record["request_id"]].append(record)
    settled_ids = {rid for rid, state in states.items() if state == "settled"}
    expired_ids = {rid for rid, state in states.items() if state == "expired"}
    charged = {rid for rid, rs in by_id.items() if any(r["charged_micro_usd"] for r in rs)}
    counts = collections.Counter(states.values())
    figure("kill9_reservations_by_state", dict(sorted(counts.items())))
    figure("kill9_stuck_holds_micro_usd", held)
    figure("kill9_ledger_minus_records_micro_usd",
           spent - sum(r["charged_micro_usd"] or 0 for r in records))

    statuses = {r.status for r in load.results}
    assert statuses <= {200, 500}
    assert load.count(500) > 0  # the kills did cut requests
    assert held == 0
    assert "held" not in counts
    assert expired_ids  # the sweeper, not a settle, returned the dead replicas' holds
    assert all(len(rs) == 1 for rs in by_id.values())  # one record per request
    assert charged == settled_ids
    assert not expired_ids & set(by_id)  # a swept request died with its replica
    assert spent == sum(r["charged_micro_usd"] or 0 for r in records)
    assert spent > 0

    # The audit log tells the same story: the chains of all writers verify (the killed
    # ones are open: no final checkpoint), and its records reconcile with the ledger.
    audit_dir = fleet.config_path.parent / "audit"
    for process in fleet.extprocs[2:]:
        process.stop()  # the survivor closes its chain with a final checkpoint
    capsys.readouterr()
    verified = extproc_cli(["audit", "verify", str(audit_dir), "--config",
                            str(fleet.config_path), "--allow-open"])
    verdict = capsys.readouterr()
    audited = [r for r in audit_records(audit_dir) if r.get("tenant") == "acme"]
    audited_ids = collections.Counter(r["request_id"] for r in audited)
    settled_in_audit = {r["request_id"] for r in audited
                        if r["budget"] and r["budget"]["settled"] and r["charged_micro_usd"]}
    figure("kill9_audit_verify", verdict.out.strip().splitlines()[-1:] or verdict.err[-200:])
    figure("kill9_settled_without_audit_record", len(settled_ids - set(audited_ids)))
    assert verified == 0, verdict
    assert max(audited_ids.values()) == 1  # never two records for one request
    assert set(audited_ids) <= set(by_id)  # each audited request also logged its line
    assert settled_in_audit <= settled_ids
    assert sum(r["charged_micro_usd"] or 0 for r in audited
               if r["request_id"] in settled_in_audit) <= spent
