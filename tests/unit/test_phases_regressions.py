"""Regression tests for defects found in `extproc/phases.py` while updating its tests.

Pure: plain `Headers` / `Body` messages into one `RequestProcessor`, no sockets.
"""

from __future__ import annotations

import gzip
import json
from typing import Any

import pytest

from extproc.auth import hash_key
from extproc.config import parse_config
from extproc.messages import Body, Continue, Headers, Phase, Respond
from extproc.phases import RequestProcessor
from extproc.runtime import Runtime
from extproc.secrets import Secret
from extproc.translate.base import Usage

PEPPER = "pepper-phases-found-bugs"
TENANT_KEY = "sk-canary-tenant-bugs-XYZ"
ENVIRON = {"ASC_PEPPER": PEPPER, "KEY_OAI": "sk-canary-provider-bugs-XYZ"}
CAP = 1000

CONFIG = f"""\
version: 1
auth: {{pepper: {{env: ASC_PEPPER}}}}
credentials:
  cred-oai: {{env: KEY_OAI}}
providers:
  prov-oai:
    kind: openai
    base_url: "https://api.openai.example"
    region: us-east-1
    zone: us
    cluster: prov_oai
    credentials: [cred-oai]
  prov-vllm:
    kind: openai_compatible
    base_url: "http://vllm.internal:8000"
    region: us-east-1
    zone: us
    cluster: prov_vllm
models:
  gpt-4o-mini:
    price: {{input_per_mtok: 0.15, output_per_mtok: 0.60}}
    deployments: [{{provider: prov-oai}}]
  llama:
    price: {{input_per_mtok: 0.1, output_per_mtok: 0.1}}
    deployments: [{{provider: prov-vllm, model: meta-llama/Llama-3.1-8B-Instruct}}]
tenants:
  acme:
    keys: [{{id: acme-1, hash: "{hash_key(Secret(PEPPER), TENANT_KEY)}"}}]
    models: [gpt-4o-mini, llama]
    max_tokens: {CAP}
"""

PARSED = parse_config(CONFIG)


def make_processor() -> RequestProcessor:
    return RequestProcessor(Runtime.build(PARSED, environ=ENVIRON), clock=lambda: 100.0)


def forwarded(client: dict[str, str], *replies: Continue) -> dict[str, str]:
    """The request headers Envoy sends upstream once our replies' mutations are applied."""
    headers = dict(client)
    for reply in replies:
        for name in reply.remove_headers:
            headers.pop(name, None)
        for name, value in reply.set_headers:
            headers[name] = value
    return headers


# Bug 1 (extproc/phases.py, `_max_tokens`): the per-key output cap (`tenants.<id>.max_tokens`,
# also the budget hold's output bound) is checked on the FIRST of `max_tokens` /
# `max_completion_tokens` only. A request sending both - `max_tokens: 10` and
# `max_completion_tokens: 50000` - passes the check and the budget hold covers 10 output
# tokens, but `OpenAIPassthrough` forwards both fields untouched. A backend that honours
# `max_completion_tokens` over `max_tokens` (vLLM's OpenAI server takes
# `max_completion_tokens or max_tokens`; OpenAI deprecated `max_tokens`) generates up to 50000
# tokens: the key's cap is bypassed and the hold no longer bounds the cost. Every limit
# that reaches the provider must respect the cap (or the request must be refused).
@pytest.mark.parametrize("model", ["gpt-4o-mini", "llama"])
async def test_no_token_limit_field_reaching_the_provider_exceeds_the_key_cap(
    model: str,
) -> None:
    processor = make_processor()
    await processor.handle(Headers(Phase.REQUEST_HEADERS, {
        ":method": "POST", ":path": "/v1/chat/completions",
        "authorization": f"Bearer {TENANT_KEY}"}, False))
    reply = await processor.handle(Body(Phase.REQUEST_BODY, json.dumps({
        "model": model, "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 10, "max_completion_tokens": 50_000}).encode(), True))
    if isinstance(reply, Respond):
        assert reply.status == 400
        return
    assert reply.body is not None
    sent = json.loads(reply.body)
    limits = {name: sent[name] for name in ("max_tokens", "max_completion_tokens")
              if name in sent}
    assert all(value <= CAP for value in limits.values()), limits


# Bug 2 (extproc/phases.py, `on_request_headers` / `on_response_headers`): the client's
# `accept-encoding` reaches the provider unchanged, and nothing on the response side
# looks at `content-encoding`. The official SDKs send `Accept-Encoding: gzip, deflate`
# (httpx's default) and OpenAI/Anthropic compress their JSON answers when asked, so the
# buffered body the processor reads is gzip: `translator.response()` of a translating
# pair raises "The provider sent an invalid response." (a 502 for a request the
# provider served and billed), and a passthrough reads no usage (the response is not
# billed, `x-asc-cost-usd` is missing). Either the provider must not be asked to
# compress, or the processor must decode what it reads.
COMPLETION = json.dumps({
    "id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": "gpt-4o-mini",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hi!"},
                 "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15},
}).encode()


@pytest.mark.parametrize(("path", "payload"), [
    ("/v1/messages", {"model": "gpt-4o-mini", "max_tokens": 100,
                      "messages": [{"role": "user", "content": "hi"}]}),
    ("/v1/chat/completions", {"model": "gpt-4o-mini",
                              "messages": [{"role": "user", "content": "hi"}]}),
])
async def test_a_client_accepting_gzip_still_gets_a_translated_and_billed_response(
    path: str, payload: dict[str, Any],
) -> None:
    processor = make_processor()
    client = {":method": "POST", ":path": path, "content-type": "application/json",
              "x-api-key": TENANT_KEY, "accept-encoding": "gzip, deflate"}
    on_headers = await processor.handle(Headers(Phase.REQUEST_HEADERS, client, False))
    on_body = await processor.handle(
        Body(Phase.REQUEST_BODY, json.dumps(payload).encode(), True))
    assert isinstance(on_headers, Continue)
    assert isinstance(on_body, Continue)
    upstream = forwarded(client, on_headers, on_body)

    # The provider compresses exactly when the request it received accepts gzip.
    compressed = "gzip" in upstream.get("accept-encoding", "")
    headers = {":status": "200", "content-type": "application/json"}
    body = COMPLETION
    if compressed:
        headers["content-encoding"] = "gzip"
        body = gzip.compress(COMPLETION)
    assert isinstance(await processor.handle(
        Headers(Phase.RESPONSE_HEADERS, headers, False)), Continue)
    reply = await processor.handle(Body(Phase.RESPONSE_BODY, body, True))

    assert isinstance(reply, Continue), reply
    assert processor.usage == Usage(input_tokens=10, output_tokens=5)
    assert ("x-asc-cost-usd", "0.000005") in reply.set_headers


async def test_a_provider_answer_nested_past_the_parser_passes_like_any_unreadable_one(
) -> None:
    """Same-dialect answers pass through; one the parser cannot read (here: nested past
    its recursion limit) goes through unread, without usage, as invalid JSON does. It
    used to escape the translator as a RecursionError: a 500 internal error."""
    from tests.unit.test_phases import response_body, response_headers, routed

    processor = await routed()
    assert isinstance(await processor.handle(response_headers("200")), Continue)
    nested = b'{"a":' * 100_000 + b"1" + b"}" * 100_000
    reply = await processor.handle(response_body(nested, end_of_stream=True))
    assert isinstance(reply, Continue)
    assert reply.body is None  # the provider's bytes, unchanged
    assert (processor.error, processor.usage) == (None, None)
