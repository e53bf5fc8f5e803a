"""Scenario 6: clients that leave at every phase - before the body, while the provider
works, mid-stream - eight at a time. After each phase: no hold left, exactly one record
per request (marked aborted), and the documented charge (phases._real_cost): nothing when
no body arrived, the full hold when the provider had the request but had not answered,
the prompt estimate plus the streamed tokens when a stream was cut.
Related: tests/e2e/test_budgets.py::test_client_abort_mid_stream_settles_what_was_streamed.
"""

from __future__ import annotations

import json
import socket
from collections.abc import Callable
from typing import Any

from extproc.devstack import Stack
from tests.conftest import ACME_KEY, CHAT, chat_body
from tests.polling import wait_for
from tests.reliability.conftest import (
    PRICE,
    Replicas,
    budget_document,
    figure,
    settled,
    start_replicas,
    tenant_month,
)

AT_ONCE = 8
BUDGET = {"budgets": [{"scope": "tenant", "window": "month", "limit_usd": 10}]}


def send_head(port: int, body: bytes, *, declared: int | None = None) -> socket.socket:
    """A raw HTTP/1.1 request whose head and `body` are sent; the caller closes it."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    head = (f"POST {CHAT} HTTP/1.1\r\nhost: 127.0.0.1:{port}\r\n"
            f"authorization: Bearer {ACME_KEY}\r\ncontent-type: application/json\r\n"
            f"content-length: {declared if declared is not None else len(body)}\r\n\r\n")
    sock.sendall(head.encode() + body)
    return sock


def read_until(sock: socket.socket, marker: bytes) -> bytes:
    seen = b""
    while marker not in seen:
        chunk = sock.recv(65536)
        assert chunk, f"closed before {marker!r}: {seen[-300:]!r}"
        seen += chunk
    return seen


def acme_records(fleet: Replicas) -> list[dict[str, Any]]:
    return [r for r in fleet.records() if r.get("tenant") == "acme"]


def abort_phase(fleet: Replicas, open_one: Callable[[], socket.socket],
                ready: Callable[[], bool]) -> list[dict[str, Any]]:
    """Opens AT_ONCE requests, waits until `ready()`, closes them all; returns the new
    records once every one of them is written."""
    before = {r["request_id"] for r in acme_records(fleet)}
    spent_before = tenant_month(fleet.redis_port)[0]
    sockets = [open_one() for _ in range(AT_ONCE)]
    assert wait_for(ready, timeout=20)
    for sock in sockets:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        sock.close()
    assert wait_for(lambda: len(acme_records(fleet)) >= len(before) + AT_ONCE)
    assert settled(fleet.redis_port)
    new = [r for r in acme_records(fleet) if r["request_id"] not in before]
    spent = tenant_month(fleet.redis_port)[0]
    assert len(new) == AT_ONCE  # exactly one record each, no more
    assert len({r["request_id"] for r in new}) == AT_ONCE
    assert all(r["aborted"] is True for r in new)
    assert spent - spent_before == sum(r["charged_micro_usd"] or 0 for r in new)
    return new


def test_client_aborts_at_every_phase_settle_once_with_the_right_charge(stack: Stack) -> None:
    _, redis_port = stack.start_redis()
    fleet = start_replicas(stack, budget_document(redis_port, acme=BUDGET),
                           redis_port=redis_port, emulator_args=("--chunk-delay-ms", "300"))
    port = fleet.listen_port
    body = json.dumps(chat_body(max_tokens=8)).encode()

    # 1. Before the body: the head and a part of the body, then gone once the service
    #    has the head (a client that leaves before that never reached the gateway).
    heads = fleet.phases_seen("request_headers")
    before_body = abort_phase(
        fleet, lambda: send_head(port, body[:10], declared=len(body)),
        lambda: fleet.phases_seen("request_headers") == heads + AT_ONCE)
    assert [r["charged_micro_usd"] for r in before_body] == [None] * AT_ONCE
    # 2. While the provider works: the emulator holds every answer 3 s.
    fleet.emulator.clear()
    fleet.emulator.queue_fault(delay_ms=3000, count=AT_ONCE)
    waiting = abort_phase(fleet, lambda: send_head(port, body),
                          lambda: len(fleet.emulator.requests()) == AT_ONCE)
    holds = {r["charged_micro_usd"] for r in waiting}
    # 3. Mid-stream: after the first event of a stream paced at 300 ms per chunk.
    stream_body = json.dumps(chat_body(max_tokens=8, stream=True)).encode()
    fleet.emulator.clear()
    mid_stream = abort_phase(
        fleet, lambda: _streaming(port, stream_body), lambda: True)

    every = [r["request_id"] for r in before_body + waiting + mid_stream]
    figure("client_abort_records_per_request",
           f"{len(every)} records / {len(set(every))} requests")
    figure("client_abort_stuck_holds_micro_usd", tenant_month(redis_port)[1])
    figure("client_abort_charges_micro_usd",
           f"0 / {sorted(holds)} / {sorted({r['charged_micro_usd'] for r in mid_stream})}")
    # The full hold: the prompt estimate and max_tokens=8 at the configured prices.
    estimate = waiting[0]["estimated_input_tokens"]
    assert holds == {estimate * PRICE["input_per_mtok"] + 8 * PRICE["output_per_mtok"]}
    assert all(r["upstream_status"] is None for r in waiting)
    for record in mid_stream:
        assert record["stream"] is True
        assert 0 <= record["streamed_tokens"] < 8
        assert record["charged_micro_usd"] == (
            record["estimated_input_tokens"] * PRICE["input_per_mtok"]
            + record["streamed_tokens"] * PRICE["output_per_mtok"])


def _streaming(port: int, body: bytes) -> socket.socket:
    sock = send_head(port, body)
    read_until(sock, b"data: ")
    return sock
