"""Issue 8 item 10: `RequestProcessor.finish()` measures and logs every request, also when
settling the budget raises or is cancelled.

Driven with plain messages through the processor of tests/unit/test_phases.py; the
budget guard is a stand-in whose settle fails (the ledger side is tested on real Redis
in tests/integration/test_ledger.py).
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

import pytest
from prometheus_client import REGISTRY

from extproc.budgets.guard import Hold
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
    assert messages == ["budget settle raised", "request finished"]
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
