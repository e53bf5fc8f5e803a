"""Request headers that reach the provider, decided in the request-body phase once the
provider is known; and whether a `forward_headers` extension header went along."""

from __future__ import annotations

import dataclasses

import pytest

from extproc.messages import Continue
from extproc.phases import RequestProcessor
from extproc.runtime import Runtime
from tests.unit.test_phases import (
    ENVIRON,
    PARSED,
    chat,
    request_body,
    request_headers,
    response_headers,
)


def _processor(*forward: str) -> RequestProcessor:
    provider = dataclasses.replace(PARSED.providers["prov-us"], forward_headers=forward)
    config = dataclasses.replace(PARSED, providers={**PARSED.providers, "prov-us": provider})
    return RequestProcessor(Runtime.build(config, environ=ENVIRON))


CLIENT = {
    "accept": "application/json",
    "user-agent": "OpenAI/Python 1.0",
    "x-emulator-status": "500",
    "anthropic-beta": "tools-2024",
    "x-trace-id": "t-1",
    "x-envoy-foo": "1",
    "x-forwarded-proto": "http",
    "x-request-id": "envoy-id",
    ":authority": "gw",
}


async def _body_reply(processor: RequestProcessor, headers: dict[str, str]) -> Continue:
    first = await processor.handle(request_headers(extra=headers))
    assert isinstance(first, Continue)
    assert first.remove_headers == ["authorization"]  # credentials go at once
    reply = await processor.handle(request_body(chat()))
    assert isinstance(reply, Continue)
    return reply


async def test_only_the_kind_allow_list_is_forwarded() -> None:
    processor = _processor()
    reply = await _body_reply(processor, CLIENT)
    assert reply.remove_headers == [
        "user-agent", "x-emulator-status", "anthropic-beta", "x-trace-id", "x-envoy-foo"]
    assert processor.forwarded_extension_headers is False


@pytest.mark.parametrize(("sent", "forwarded"), [(CLIENT, True),
                                                 ({"accept": "*/*"}, False)])
async def test_forward_headers_extend_the_list_and_are_reported(
    sent: dict[str, str], forwarded: bool
) -> None:
    processor = _processor("x-trace-id", "x-other")
    reply = await _body_reply(processor, sent)
    assert "x-trace-id" not in reply.remove_headers
    assert processor.forwarded_extension_headers is forwarded


async def test_headers_the_gateway_sets_are_never_removed() -> None:
    processor = _processor()
    # A client cannot make the gateway drop its own cluster or auth header.
    reply = await _body_reply(processor, {"content-length": "5", "x-custom": "1"})
    assert reply.remove_headers == ["x-custom"]
    assert ("content-length", str(len(reply.body or b""))) in reply.set_headers


@pytest.mark.parametrize(("sent", "evidence"), [(CLIENT, False), ({"accept": "*/*"}, True)])
async def test_a_forwarded_extension_header_is_no_key_evidence(
    monkeypatch: pytest.MonkeyPatch, sent: dict[str, str], evidence: bool
) -> None:
    processor = _processor("x-trace-id")
    reports: list[tuple[int, bool]] = []

    async def report(selected: object, status: int, *, key_evidence: bool,
                     retry_after: str | None = None) -> None:
        reports.append((status, key_evidence))

    monkeypatch.setattr(processor._runtime.keys, "report", report)
    await _body_reply(processor, sent)
    await processor.handle(response_headers("401"))
    assert reports == [(401, evidence)]
