"""`RequestProcessor.finish()` hands exactly one record to the audit writer, built by
`record_from`, valid against deploy/schema/audit-record.schema.json; a saturated writer
under policy block refuses new requests with 503.

Driven with plain messages through the processor of tests/unit/test_phases.py and a real
`AuditWriter` writing JSONL into tmp_path.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from extproc.audit.chain import Chain, HmacKey, SigningKey
from extproc.audit.sinks import JsonlAuditSink
from extproc.audit.writer import AuditWriter
from extproc.config import AuditSettings
from extproc.messages import Continue, Headers, Phase, Respond
from extproc.phases import RequestProcessor
from tests.unit.test_phases import (
    FakeClock,
    chat,
    fresh_runtime,
    request_body,
    request_headers,
    response_body,
    response_headers,
)

SCHEMA = json.loads((Path(__file__).resolve().parents[2] / "deploy" / "schema"
                     / "audit-record.schema.json").read_text(encoding="utf-8"))
ANSWER = (b'{"id":"x","object":"chat.completion","model":"m","choices":[{"index":0,'
          b'"message":{"role":"assistant","content":"hi"},"finish_reason":"stop"}],'
          b'"usage":{"prompt_tokens":3,"completion_tokens":4,"total_tokens":7}}')


def writer_in(directory: Path, **settings: Any) -> AuditWriter:
    signer = SigningKey.load_or_create(directory / "signing.key")
    chain = Chain(HmacKey("k1", b"\x02" * 32), signer)
    sink = JsonlAuditSink(directory, chain.writer, rotate_bytes=1 << 20, rotate_s=3600,
                          fsync="none")
    return AuditWriter(AuditSettings(dir=directory, fsync="none", **settings), chain, [sink])


def records(directory: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for path in sorted(directory.glob("audit-*.jsonl"))
            for line in path.read_text(encoding="utf-8").splitlines()
            if '"type":"record"' in line]


async def test_served_and_refused_requests_each_leave_exactly_one_valid_record(
        tmp_path: Path) -> None:
    writer = writer_in(tmp_path)
    writer.start()
    clock = FakeClock()
    served = RequestProcessor(fresh_runtime(), clock=clock, audit=writer)
    headers = request_headers("acme")
    headers.source_address = "10.1.2.3:4567"
    assert isinstance(await served.handle(headers), Continue)
    assert isinstance(await served.handle(request_body(chat())), Continue)
    clock.now += 0.25
    await served.handle(response_headers("200"))
    clock.now += 0.5
    await served.handle(response_body(ANSWER, end_of_stream=True))
    await served.finish()
    await served.finish()  # a second call changes nothing

    refused = RequestProcessor(fresh_runtime(), clock=clock, audit=writer)
    reply = await refused.handle(request_headers(None))
    assert isinstance(reply, Respond)
    await refused.finish()
    await writer.close()

    found = records(tmp_path)
    assert [r["request_id"] for r in found] == [served.request_id, refused.request_id]
    for record in found:
        jsonschema.validate(record, SCHEMA)
    ok, denied = found
    assert {k: ok[k] for k in ("tenant", "source_address", "model_asked", "status",
                               "tokens", "latency_ms", "ttft_ms", "aborted")} == {
        "tenant": "acme", "source_address": "10.1.2.3:4567", "model_asked": "gpt-4o-mini",
        "status": 200, "tokens": {"input": 3, "output": 4, "cached": 0},
        "latency_ms": 750.0, "ttft_ms": 750.0, "aborted": False}
    assert ok["route"]["provider"] == "prov-us"
    assert ok["attempts"] == [{"attempt": 1, "provider": "prov-us", "region": "us-east-1",
                               "cluster": "prov_us", "status": 200, "latency_ms": 250.0,
                               "left": None, "credential": ok["credential"]}]
    assert ok["config_version"] is None  # parsed from a string, not a file
    assert {k: denied[k] for k in ("tenant", "principal", "status", "error", "route")} == {
        "tenant": None, "principal": None, "status": 401, "error": "invalid_api_key",
        "route": None}


async def test_a_full_queue_under_policy_block_refuses_new_requests(tmp_path: Path) -> None:
    writer = writer_in(tmp_path, queue_size=1, on_failure="block")  # not started: no drain
    await writer.submit({"request_id": "0" * 32})
    assert writer.saturated
    processor = RequestProcessor(fresh_runtime(), audit=writer)
    reply = await processor.handle(request_headers("acme"))
    assert isinstance(reply, Respond)
    assert reply.status == 503
    assert json.loads(reply.body)["error"]["message"] == (
        "The gateway cannot record requests right now; retry later.")


@pytest.mark.parametrize("on_failure", ["buffer"])
async def test_buffer_policy_never_refuses_requests(tmp_path: Path, on_failure: str) -> None:
    writer = writer_in(tmp_path, queue_size=1, on_failure=on_failure)
    await writer.submit({"request_id": "0" * 32})
    assert not writer.saturated
    processor = RequestProcessor(fresh_runtime(), audit=writer)
    assert isinstance(await processor.handle(request_headers("acme")), Continue)


def test_headers_carry_the_source_address_field() -> None:
    assert Headers(Phase.REQUEST_HEADERS, {}, False).source_address is None
