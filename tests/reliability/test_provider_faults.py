"""Scenario 5: provider faults - a reset, 5xx, 429 with retry-after, a slow first byte, a
slowloris upstream, a stream cut mid-way or ended early - on both front doors, plain and
streamed. Every one gets a clean answer in the client's dialect, is settled correctly
(nothing for a provider error, the usage for an answer, what was streamed for a cut
stream, the hold for an answer that never arrived whole) and leaves exactly one record.
Related: tests/e2e/test_failover.py (the same faults with a fallback deployment).
"""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

from extproc.devstack import Stack
from tests.conftest import ACME_KEY, CHAT
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

MESSAGES = "/v1/messages"
BUDGET = {"budgets": [{"scope": "tenant", "window": "month", "limit_usd": 100}]}
# The emulator's usage (3 prompt + 4 completion tokens): acme is served by an OpenAI-kind
# deployment from both doors.
USAGE_COST = 3 * PRICE["input_per_mtok"] + 4 * PRICE["output_per_mtok"]


@dataclass(frozen=True)
class Outcome:
    status: int
    headers: dict[str, str]
    text: str
    transport_error: str | None


def call(fleet: Replicas, path: str, stream: bool) -> Outcome:
    if path == CHAT:
        body: dict[str, Any] = {"model": "gpt-4o-mini", "max_tokens": 8, "stream": stream,
                                "messages": [{"role": "user", "content": "Hello there"}]}
        headers = {"authorization": f"Bearer {ACME_KEY}"}
    else:
        body = {"model": "gpt-4o-mini", "max_tokens": 8, "stream": stream,
                "messages": [{"role": "user", "content": "Hello there"}]}
        headers = {"x-api-key": ACME_KEY, "anthropic-version": "2023-06-01"}
    chunks: list[bytes] = []
    failure = None
    with httpx.Client(base_url=fleet.base_url, timeout=30) as client, client.stream(
            "POST", path, json=body, headers=headers) as response:
        try:
            chunks.extend(response.iter_bytes())
        except httpx.HTTPError as error:
            failure = type(error).__name__
    return Outcome(response.status_code, dict(response.headers), b"".join(chunks).decode(),
                   failure)


def dialect_error(path: str, outcome: Outcome) -> dict[str, Any]:
    """The error object of a JSON error answer, checked to be in the door's dialect."""
    answer = json.loads(outcome.text)
    if path == MESSAGES:
        assert answer["type"] == "error", outcome
        assert set(answer["error"]) == {"type", "message"}, outcome
        return dict(answer["error"])
    assert set(answer["error"]) == {"message", "type", "param", "code"}, outcome
    return dict(answer["error"])


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Replicas]:
    with Stack(tmp_path_factory.mktemp("provider-faults")) as stack:
        _, redis_port = stack.start_redis()
        base = budget_document(redis_port, acme=BUDGET)

        def document(emulator_port: int) -> dict[str, Any]:
            doc = base(emulator_port)
            doc["deployment_health"] = {"failures": 1000}  # every fault reaches the provider
            return doc

        yield start_replicas(stack, document, redis_port=redis_port, replicas=1)


FAULTS = {
    "reset": {"reset": True},
    "500": {"status": 500},
    "503-html": {"status": 503, "html": True},
    "429": {"status": 429, "retry_after": 7},
    "slow-first-byte": {"delay_ms": 1500},
    "stream-cut": {"reset_after_chunks": 2},
    "stream-ended-early": {"end_after_chunks": 2},
}
PROVIDER_FAILED = {"500": 500, "503-html": 503}
RESULTS: dict[str, str] = {}


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
@pytest.mark.parametrize("path", [CHAT, MESSAGES], ids=["openai", "anthropic"])
@pytest.mark.parametrize("fault", list(FAULTS))
def test_provider_fault_gets_a_clean_answer_one_record_and_the_right_charge(
        fleet: Replicas, fault: str, path: str, stream: bool) -> None:
    fleet.emulator.clear()
    before = {r["request_id"] for r in fleet.records()}
    spent_before = tenant_month(fleet.redis_port)[0]
    fleet.emulator.queue_fault(**FAULTS[fault])

    outcome = call(fleet, path, stream)

    assert wait_for(lambda: len(fleet.records()) == len(before) + 1)
    [record] = [r for r in fleet.records() if r["request_id"] not in before]
    assert settled(fleet.redis_port)
    charged = tenant_month(fleet.redis_port)[0] - spent_before
    door = "openai" if path == CHAT else "anthropic"
    RESULTS[f"{fault}/{door}/{'stream' if stream else 'plain'}"] = (
        f"{outcome.status}{' ' + outcome.transport_error if outcome.transport_error else ''}")
    assert charged == (record["charged_micro_usd"] or 0)
    assert len(fleet.emulator.requests()) == 1  # one attempt: no fallback in this zone

    if fault == "reset":
        # The provider sent nothing: Envoy's own 503, in the client's dialect, and a
        # record without an upstream status (decision 0140).
        assert outcome.status == 503
        error = dialect_error(path, outcome)
        assert error["message"] == "The gateway or the provider is unavailable."
        assert error["type"] == ("overloaded_error" if path == MESSAGES else "gateway_error")
        assert (record["upstream_status"], record["error"]) == (None, "provider_error")
        assert charged == 0
    elif fault in PROVIDER_FAILED:
        assert outcome.status == 502
        error = dialect_error(path, outcome)
        assert error["message"] == f"The provider failed with status {PROVIDER_FAILED[fault]}."
        assert error["type"] == ("api_error" if path == MESSAGES else "upstream_error")
        assert charged == 0
    elif fault == "429":
        assert outcome.status == 429
        assert outcome.headers["retry-after"] == "7"
        error = dialect_error(path, outcome)
        assert error["type"] == "rate_limit_error"
        assert charged == 0
    elif fault == "slow-first-byte" or not stream:
        # A slow provider is just slow; the stream faults do not apply to a plain answer.
        assert outcome.status == 200
        assert outcome.transport_error is None
        assert charged == USAGE_COST
    elif fault == "stream-ended-early":
        assert outcome.status == 200
        assert outcome.transport_error is None
        assert "The provider ended the stream before it was complete" in outcome.text
        assert record["stream_truncated"] is True
        assert charged == (record["estimated_input_tokens"] * PRICE["input_per_mtok"]
                           + record["streamed_tokens"] * PRICE["output_per_mtok"])
    else:  # stream-cut: never a silent complete 200
        if outcome.status == 200:  # the client's stream had started: Envoy resets it
            assert outcome.transport_error == "RemoteProtocolError"
        else:  # the reset beat the first chunk to the client: Envoy's 502, in dialect
            assert outcome.status == 502
            dialect_error(path, outcome)
        assert charged == (record["estimated_input_tokens"] * PRICE["input_per_mtok"]
                           + (record["streamed_tokens"] or 0) * PRICE["output_per_mtok"])


def test_provider_fault_figures(fleet: Replicas) -> None:
    figure("provider_faults_client_statuses", dict(sorted(RESULTS.items())))
    assert len(RESULTS) == len(FAULTS) * 4


# --- a slowloris provider -----------------------------------------------------------------

class Slowloris:
    """An upstream that answers 200 with a content-length of 100,000 and then sends one
    byte every 50 ms: it never goes idle, it never finishes."""

    def __init__(self) -> None:
        self._server = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._server.getsockname()[1]
        self._stop = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._server.accept()
            except OSError:
                return
            threading.Thread(target=self._drip, args=(conn,), daemon=True).start()

    def _drip(self, conn: socket.socket) -> None:
        with conn:
            try:
                conn.recv(65536)
                conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                             b"content-length: 100000\r\n\r\n{")
                while not self._stop.wait(0.05):
                    conn.sendall(b" ")
            except OSError:
                return

    def close(self) -> None:
        self._stop.set()
        self._server.close()


def test_slowloris_provider_is_cut_at_the_route_timeout_and_charged_the_hold(
        stack: Stack) -> None:
    _, redis_port = stack.start_redis()
    slowloris = Slowloris()
    base = budget_document(redis_port, acme=BUDGET)

    def document(emulator_port: int) -> dict[str, Any]:
        doc = base(emulator_port)
        doc["providers"]["emu-eu"]["base_url"] = f"http://127.0.0.1:{slowloris.port}"
        return doc

    outcomes: dict[str, Outcome] = {}
    try:
        fleet = start_replicas(stack, document, redis_port=redis_port, replicas=1,
                               route_timeout_s=2)
        for path in (CHAT, MESSAGES):
            outcomes[path] = call(fleet, path, stream=False)
        assert wait_for(lambda: len(fleet.records()) == 2)
        assert settled(redis_port)
    finally:
        slowloris.close()
    spent = tenant_month(redis_port)[0]
    records = fleet.records()
    figure("slowloris_answers", {("openai" if p == CHAT else "anthropic"): o.status
                                 for p, o in outcomes.items()})
    figure("slowloris_charged_micro_usd", spent)

    for path, outcome in outcomes.items():
        assert outcome.status == 504
        assert dialect_error(path, outcome)["message"] == "The gateway timed out."
    # The provider did work of unknown size: the whole hold is charged, once each.
    assert [r["charged_micro_usd"] for r in records] == [
        r["estimated_input_tokens"] * PRICE["input_per_mtok"] + 8 * PRICE["output_per_mtok"]
        for r in records]
    assert spent == sum(r["charged_micro_usd"] for r in records)
