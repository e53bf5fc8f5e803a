"""`RequestProcessor.finish()` and what it charges: it measures and logs every request,
also when settling the budget raises or is cancelled (issue 8 item 10), and charges usage
it cannot price at least the full hold (item 5).

Driven with plain messages through the processor of tests/unit/test_phases.py; the
budget guard is a stand-in whose settle fails (the ledger side is tested on real Redis
in tests/integration/test_ledger.py).
"""

from __future__ import annotations

import asyncio
import json
import logging
from datetime import UTC, datetime
from typing import Any

import pytest
from prometheus_client import REGISTRY

from extproc.budgets.guard import Hold
from extproc.budgets.ledger import Reservation
from extproc.budgets.policy import CounterGroup
from extproc.translate.types import Usage
from extproc.translate.usage import usage_from_anthropic
from tests.unit.test_phases import (
    RecordingGuard,
    budget_runtime,
    chat,
    fields_of,
    make_processor,
    request_body,
    request_headers,
    response_body,
    response_headers,
)

LABELS = {"tenant": "pinned", "provider": "prov-eu", "region": "eu-west-1",
          "model": "gpt-4o-mini", "status": "200"}


class FailingGuard(RecordingGuard):
    def __init__(self, error: BaseException) -> None:
        super().__init__()
        self.error = error
        self.started = asyncio.Event()

    async def settle(self, hold: Hold, *, cost_micro_usd: int, tokens: int,
                     budget: object) -> int:
        self.settled.append((cost_micro_usd, tokens))
        self.started.set()
        if isinstance(self.error, asyncio.CancelledError):
            await asyncio.Event().wait()  # parked until cancelled
        raise self.error


def requests_total() -> float:
    return REGISTRY.get_sample_value("asc_requests_total", LABELS) or 0.0


async def answered(guard: RecordingGuard) -> Any:
    processor = make_processor(budget_runtime(guard))
    await processor.handle(request_headers("pinned"))
    await processor.handle(request_body(chat()))
    await processor.handle(response_headers("200"))
    await processor.handle(response_body(json.dumps({"usage": {
        "prompt_tokens": 10, "completion_tokens": 5}}).encode(), end_of_stream=True))
    return processor


async def test_settle_that_raises_still_measures_and_logs(
    caplog: pytest.LogCaptureFixture,
) -> None:
    guard = FailingGuard(RuntimeError("boom"))
    processor = await answered(guard)
    before = requests_total()
    with caplog.at_level(logging.INFO, logger="extproc.request"):
        await processor.finish()  # does not raise
    assert guard.settled == [(5, 15)]
    assert requests_total() == before + 1
    messages = [r.getMessage() for r in caplog.records]
    assert messages == ["finish failed", "request finished"]
    fields = fields_of(caplog.records[-1])
    assert (fields["request_id"], fields["status"], fields["charged_micro_usd"]) == (
        processor.request_id, 200, 5)


async def test_settle_cancelled_still_measures_and_logs_then_propagates(
    caplog: pytest.LogCaptureFixture,
) -> None:
    guard = FailingGuard(asyncio.CancelledError())
    processor = await answered(guard)
    before = requests_total()
    with caplog.at_level(logging.INFO, logger="extproc.request"):
        finishing = asyncio.create_task(processor.finish())
        await guard.started.wait()
        finishing.cancel()
        with pytest.raises(asyncio.CancelledError):
            await finishing
    assert requests_total() == before + 1
    assert [r.getMessage() for r in caplog.records] == ["request finished"]
    await processor.finish()  # once only
    assert requests_total() == before + 1


# --- issue 8 item 5: usage the gateway cannot price is charged at least the hold ---------

HELD_USD = 50_000
HELD_TOKENS = 4_200


class HoldingGuard(RecordingGuard):
    """Holds a fixed worst case and records what is settled."""

    async def reserve(self, **request: Any) -> Hold:
        self.reserved.append(request)
        groups = (CounterGroup("tenant daily budget", "usd", ("k1",), 10_000_000, HELD_USD,
                               datetime(2026, 12, 1, tzinfo=UTC), 60),
                  CounterGroup("tokens per minute", "tokens", ("k2",), 100_000, HELD_TOKENS,
                               datetime(2026, 12, 1, tzinfo=UTC), 60))
        return Hold(reservation=Reservation(request["request_id"], "{t:pinned}", groups),
                    mode="redis")


@pytest.mark.parametrize(
    ("extra", "settled"),
    [
        ({}, (5, 15)),  # priced: 10 prompt + 5 completion tokens
        ({"usage": {"prompt_tokens": 10, "completion_tokens": 5,
                    "completion_tokens_details": {"audio_tokens": 3}}},
         (HELD_USD, HELD_TOKENS)),
        ({"usage": {"prompt_tokens": 10, "completion_tokens": 5,
                    "prompt_tokens_details": {"audio_tokens": 7}}},
         (HELD_USD, HELD_TOKENS)),
        ({"service_tier": "priority"}, (HELD_USD, HELD_TOKENS)),
        ({"service_tier": "flex"}, (HELD_USD, HELD_TOKENS)),
        ({"service_tier": "default"}, (5, 15)),
    ],
)
async def test_unpriced_openai_usage_is_charged_at_least_the_hold(
    extra: dict[str, Any], settled: tuple[int, int], caplog: pytest.LogCaptureFixture,
) -> None:
    guard = HoldingGuard()
    processor = make_processor(budget_runtime(guard))
    await processor.handle(request_headers("pinned"))
    await processor.handle(request_body(chat()))
    await processor.handle(response_headers("200"))
    document = {"usage": {"prompt_tokens": 10, "completion_tokens": 5}, **extra}
    await processor.handle(response_body(json.dumps(document).encode(), end_of_stream=True))
    with caplog.at_level(logging.WARNING, logger="extproc.request"):
        await processor.finish()
    assert guard.settled == [settled]
    warned = [r for r in caplog.records if r.getMessage() == "unpriced usage charged at the hold"]
    assert len(warned) == (0 if settled == (5, 15) else 1)


@pytest.mark.parametrize(
    ("usage", "unpriced"),
    [
        ({"input_tokens": 10, "output_tokens": 5}, ()),
        ({"input_tokens": 10, "output_tokens": 5,
          "server_tool_use": {"web_search_requests": 2}}, ("server_tool_use",)),
        ({"input_tokens": 10, "output_tokens": 5,
          "server_tool_use": {"web_search_requests": 0}}, ()),
        ({"input_tokens": 10, "output_tokens": 5, "service_tier": "priority"},
         ("service_tier:priority",)),
        ({"input_tokens": 10, "output_tokens": 5, "service_tier": "standard"}, ()),
    ],
)
def test_anthropic_server_tools_and_priority_tier_are_unpriced(
    usage: dict[str, Any], unpriced: tuple[str, ...],
) -> None:
    parsed = usage_from_anthropic(usage)
    assert parsed == Usage(10, 5, 0, unpriced)
