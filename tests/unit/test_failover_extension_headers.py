"""A request that may fail over and forwarded a client's extension header (a provider's
`forward_headers`) tells its attempts so: their 401/403 may then be the client's doing,
not the key's (`Flight.extension_headers`, as `forwarded_extension_headers`)."""

from __future__ import annotations

import json

from extproc.auth import hash_key
from extproc.config import parse_config
from extproc.failover import FLIGHTS
from extproc.messages import Body, Continue, Headers, Phase
from extproc.phases import RequestProcessor
from extproc.runtime import Runtime
from extproc.secrets import Secret

PEPPER = "unit-pepper"
KEY = "sk-unit-tenant-key"
CONFIG = f"""\
version: 1
auth: {{pepper: {{env: ASC_PEPPER}}}}
credentials:
  c-eu: {{env: K}}
  c-eu2: {{env: K}}
providers:
  eu:
    {{kind: openai, base_url: "http://10.0.0.2:8000", region: eu-1, zone: eu, cluster: eu,
     credentials: [c-eu], forward_headers: [x-client-trace]}}
  eu2:
    {{kind: anthropic, base_url: "https://api.example.eu", region: eu-2, zone: eu,
     cluster: eu2, credentials: [c-eu2]}}
models:
  m:
    price: {{input_per_mtok: 1, output_per_mtok: 1}}
    deployments: [{{provider: eu}}, {{provider: eu2, model: claude}}]
tenants:
  t:
    zone: eu
    keys: [{{id: k, hash: "{hash_key(Secret(PEPPER), KEY)}"}}]
    models: [m]
"""


async def _flight_extension_headers(client_headers: dict[str, str]) -> bool:
    runtime = Runtime.build(parse_config(CONFIG), environ={"ASC_PEPPER": PEPPER, "K": "sk-p"})
    processor = RequestProcessor(runtime)
    headers = {":method": "POST", ":path": "/v1/chat/completions",
               "content-type": "application/json", "authorization": f"Bearer {KEY}",
               **client_headers}
    assert isinstance(await processor.handle(
        Headers(Phase.REQUEST_HEADERS, headers, False)), Continue)
    body = json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}]})
    assert isinstance(await processor.handle(
        Body(Phase.REQUEST_BODY, body.encode(), True)), Continue)
    flight = FLIGHTS.get(processor.request_id)
    assert flight is not None  # the request may fail over to eu2
    try:
        return flight.extension_headers
    finally:
        await processor.finish()


async def test_a_forwarded_extension_header_reaches_the_flight() -> None:
    assert await _flight_extension_headers({"x-client-trace": "abc"}) is True


async def test_without_one_the_attempts_judge_the_key() -> None:
    assert await _flight_extension_headers({}) is False
