"""The e2e suites' one way to check audit records: exactly one per request, right fields.

A gateway started by tests/conftest.py runs extproc in its stack's work directory, so its
audit log is `<workdir>/audit/audit-*.jsonl` (the default `audit.dir`). Records are
written off the request path: the helpers poll (tests/polling.py) until the record is on
disk, then assert there is exactly one.

Expected fields are given as keyword arguments; a nested field is spelled with `__`
(`route__provider="emu-eu"`, `tokens__input=3`, `budget__settled=True`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Protocol

from extproc.devstack import Stack
from tests.conftest import CANARIES, Gateway
from tests.polling import wait_for


class HasStack(Protocol):
    """A gateway of tests/conftest.py, or any other harness whose extproc runs in
    `stack.workdir` (e.g. the failover suite's stack)."""

    @property
    def stack(self) -> Stack: ...

__all__ = ["access_log_line", "assert_one_record", "audit_dir", "records", "records_for"]


def audit_dir(gateway: HasStack) -> Path:
    return gateway.stack.workdir / "audit"


def records(directory: Path) -> list[dict[str, Any]]:
    """Every record (not checkpoint) in `directory`'s JSONL files, in file order."""
    found: list[dict[str, Any]] = []
    for path in sorted(directory.glob("audit-*.jsonl")):
        text = path.read_text(encoding="utf-8")
        # A batch still being written may end in a partial line: read on the next poll.
        for line in text[:text.rfind("\n") + 1].splitlines():
            if '"type":"record"' in line:
                found.append(json.loads(line))
    return found


def records_for(gateway: HasStack, request_id: str) -> list[dict[str, Any]]:
    return [r for r in records(audit_dir(gateway)) if r.get("request_id") == request_id]


def _field(record: dict[str, Any], name: str) -> Any:
    value: Any = record
    for part in name.split("__"):
        assert isinstance(value, dict), f"{name}: {part} is inside {value!r}"
        value = value[part]
    return value


def assert_one_record(gateway: HasStack, request_id: str, **expected: Any) -> dict[str, Any]:
    """The request's one audit record, with each `expected` field equal; no secret in it."""
    directory = audit_dir(gateway)
    assert wait_for(lambda: records_for(gateway, request_id), timeout=10), (
        f"no audit record for request {request_id} in {directory}")
    found = records_for(gateway, request_id)
    assert len(found) == 1, f"{len(found)} audit records for request {request_id}"
    record = found[0]
    actual = {name: _field(record, name) for name in expected}
    differing = {name: (actual[name], expected[name]) for name in expected
                 if actual[name] != expected[name]}
    assert not differing, f"audit record fields (actual, expected): {differing}"
    text = json.dumps(record)
    assert not [canary for canary in CANARIES if canary in text]
    return record


def access_log_line(gateway: Gateway, request_id: str) -> dict[str, Any]:
    """The Envoy access log line of one request (the gateway's request id)."""
    found: list[dict[str, Any]] = []

    def seen() -> bool:
        found[:] = [line for line in gateway.access_log() if request_id in line.values()]
        return bool(found)

    assert wait_for(seen, timeout=10), f"no Envoy access log line for {request_id}"
    return found[0]
