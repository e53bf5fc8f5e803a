"""Google answers an invalid API key with 400 `API_KEY_INVALID`: only the body says the
key failed, so the key's verdict for a Gemini 400 waits for the body."""

from __future__ import annotations

import json
from typing import Any

import pytest

from extproc.auth import hash_key
from extproc.config import parse_config
from extproc.credentials.selection import Selected
from extproc.messages import Continue, Respond
from extproc.phases import RequestProcessor
from extproc.runtime import Runtime
from extproc.secrets import Secret
from tests.unit.test_phases import (
    ENVIRON,
    PEPPER,
    TENANT_KEYS,
    FakeClock,
    chat,
    provider_answers,
    request_body,
    request_headers,
)

CONFIG = f"""
version: 1
auth: {{pepper: {{env: ASC_PEPPER}}}}
credentials:
  cred-g: {{env: KEY_US}}
providers:
  google:
    kind: gemini
    base_url: "https://generativelanguage.googleapis.com"
    region: europe-west4
    zone: eu
    cluster: google
    credentials: [cred-g]
models:
  gemini-flash:
    price: {{input_per_mtok: 0.3, output_per_mtok: 2.5}}
    deployments: [{{provider: google, model: gemini-2.0-flash}}]
tenants:
  acme:
    keys: [{{id: acme-1, hash: "{hash_key(Secret(PEPPER), TENANT_KEYS['acme'])}"}}]
    models: [gemini-flash]
"""
KEY_INVALID = json.dumps({"error": {"code": 400, "message": "API key not valid.",
                                    "status": "INVALID_ARGUMENT", "details": [{
    "@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": "API_KEY_INVALID"}]}}
).encode()
BAD_REQUEST = json.dumps({"error": {"code": 400, "message": "Invalid JSON payload.",
                                    "status": "INVALID_ARGUMENT"}}).encode()


async def _reports(body: bytes, monkeypatch: pytest.MonkeyPatch) -> tuple[list[int], Any]:
    runtime = Runtime.build(parse_config(CONFIG), environ=ENVIRON)
    seen: list[int] = []
    report = runtime.keys.report

    async def spy(selected: Selected, status: int, **kwargs: Any) -> None:
        seen.append(status)
        await report(selected, status, **kwargs)

    monkeypatch.setattr(runtime.keys, "report", spy)
    processor = RequestProcessor(runtime, clock=FakeClock())
    assert isinstance(await processor.handle(request_headers("acme")), Continue)
    assert isinstance(await processor.handle(request_body(chat("gemini-flash"))), Continue)
    reply = await provider_answers(processor, "400", body)
    return seen, reply


async def test_an_invalid_key_answer_counts_as_the_keys_401(
        monkeypatch: pytest.MonkeyPatch) -> None:
    seen, reply = await _reports(KEY_INVALID, monkeypatch)
    assert seen == [401]
    assert isinstance(reply, Respond)
    assert reply.status == 502


async def test_a_plain_400_counts_as_a_400(monkeypatch: pytest.MonkeyPatch) -> None:
    seen, reply = await _reports(BAD_REQUEST, monkeypatch)
    assert seen == [400]
    assert isinstance(reply, Respond)
    assert reply.status == 400
