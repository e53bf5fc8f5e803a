"""Regression tests for defects found while writing the unit tests (all fixed).

Each test states the behaviour the module's own docstring promises.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from extproc.auth import hash_key
from extproc.cli import main
from extproc.config import ConfigError, ConfigIssue, parse_config
from extproc.messages import Body, Continue, Headers, Phase
from extproc.phases import RequestProcessor
from extproc.runtime import Runtime
from extproc.secrets import Secret
from extproc.translate.sse import SseDecoder, SseEvent

HASH = "hmac-sha256:v1:" + "a" * 64


def config_text(*, tenant: str, deployments: str = "[{provider: p}]",
                version: str = "1", base_url: str = "http://10.0.0.1:8080") -> str:
    return f"""\
version: {version}
auth: {{pepper: {{env: ASC_PEPPER}}}}
providers:
  p: {{kind: openai_compatible, base_url: "{base_url}", region: r, zone: eu, cluster: c}}
models:
  m:
    price: {{input_per_mtok: 1, output_per_mtok: 2}}
    deployments: {deployments}
tenants:
  t:
{tenant}"""


# BUG 1 (config.py, _tenant): a pin naming a deployment whose provider is unknown, in a
# tenant that has a zone, crashes the validator with KeyError('ghost') at
# `providers[pin].zone` instead of reporting a ConfigIssue. `extproc check-config` then
# dies with a traceback instead of listing the problems.
def test_pin_to_deployment_with_unknown_provider_is_reported_not_a_crash() -> None:
    text = config_text(
        deployments="[{provider: ghost}, {provider: p}]",
        tenant=f"""\
    zone: eu
    keys: [{{id: k, hash: "{HASH}"}}]
    models: [m]
    routing: {{m: {{pin: ghost}}}}
""")
    with pytest.raises(ConfigError) as caught:
        parse_config(text)
    assert ("models.m.deployments[0].provider", "unknown provider 'ghost'") in [
        (i.path, i.message) for i in caught.value.issues]


# BUG 2 (config.py, _tenant): a non-string entry in `tenants.<id>.models` (a list or a
# mapping, e.g. `models: [[m]]`) crashes the validator with
# "TypeError: unhashable type: 'list'" at `model_name not in models`.
def test_non_string_tenant_model_is_reported_not_a_crash() -> None:
    text = config_text(tenant=f"""\
    keys: [{{id: k, hash: "{HASH}"}}]
    models: [[m]]
""")
    with pytest.raises(ConfigError) as caught:
        parse_config(text)
    assert [i.path for i in caught.value.issues] == ["tenants.t.models[0]"]


# BUG 3 (config.py + auth.py): two keys of one tenant may share an `id`; the config was
# accepted, but TenantDirectory.authenticate() confirms a match against the hash of the
# *first* key with that id, so the second key could never authenticate (silently 401).
# Fixed in the config: duplicate key ids are rejected, at the second key, with a hint.
def test_second_key_with_a_duplicate_id_is_rejected() -> None:
    pepper = Secret("pepper")
    text = config_text(tenant=f"""\
    keys:
      - {{id: k, hash: "{hash_key(pepper, 'key-one')}"}}
      - {{id: k, hash: "{hash_key(pepper, 'key-two')}"}}
    models: [m]
""")
    with pytest.raises(ConfigError) as caught:
        parse_config(text)
    assert caught.value.issues == [ConfigIssue(
        "tenants.t.keys[1].id", "duplicate key id 'k'",
        "key ids name a key in logs and budgets; make each unique per tenant", 13)]


# BUG 4 (translate/sse.py, feed): the pending-CR flag is cleared by any feed(), even an
# empty one, so "\r" + b"" + "\n" is read as two line ends (CR, then LF) instead of one
# CRLF. The module promises "any split, even inside ... a CRLF pair"; an empty chunk
# between the CR and the LF turns one event into two.
def test_empty_chunk_between_cr_and_lf() -> None:
    decoder = SseDecoder()
    events = decoder.feed(b"data: a\r")
    events += decoder.feed(b"")
    events += decoder.feed(b"\ndata: b\n\n")
    events += decoder.flush()
    assert events == [SseEvent(data="a\nb")]


# BUG 5 (config.py, _compile): `version: true` is accepted as version 1, because
# `True != 1` is False in Python. (Same for `version: 1.0`.)
@pytest.mark.parametrize("version", ["true", "1.0"])
def test_version_must_be_the_integer_one(version: str) -> None:
    text = config_text(version=version, tenant=f"""\
    keys: [{{id: k, hash: "{HASH}"}}]
    models: [m]
""")
    with pytest.raises(ConfigError) as caught:
        parse_config(text)
    assert [i.path for i in caught.value.issues] == ["version"]


# BUG 6 (config.py, _provider): an explicit port 0 in base_url is silently replaced by
# the scheme's default (`parts.port or 80`), so "http://10.0.0.1:0" routes to port 80.
def test_base_url_port_zero_is_rejected() -> None:
    text = config_text(base_url="http://10.0.0.1:0", tenant=f"""\
    keys: [{{id: k, hash: "{HASH}"}}]
    models: [m]
""")
    with pytest.raises(ConfigError) as caught:
        parse_config(text)
    assert [i.path for i in caught.value.issues] == ["providers.p.base_url"]


# BUG 7 (config.py vs envoy_bootstrap.py): two providers with the same `cluster` but
# different base URLs pass `extproc check-config` (exit 0), yet `extproc envoy render`
# on the same file dies with an uncaught ValueError traceback. config.py promises "the
# file is validated completely before anything uses it".
def test_check_config_rejects_a_cluster_shared_by_different_urls(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "asc.yaml"
    path.write_text(f"""\
version: 1
auth: {{pepper: {{env: ASC_PEPPER}}}}
providers:
  a: {{kind: openai_compatible, base_url: "http://10.0.0.1:8000", region: r, zone: z,
      cluster: shared}}
  b: {{kind: openai_compatible, base_url: "http://10.0.0.2:8000", region: r, zone: z,
      cluster: shared}}
models:
  m:
    price: {{input_per_mtok: 1, output_per_mtok: 2}}
    deployments: [{{provider: a}}, {{provider: b}}]
tenants:
  t:
    keys: [{{id: k, hash: "{HASH}"}}]
    models: [m]
""", encoding="utf-8")
    assert main(["check-config", str(path)]) == 1
    capsys.readouterr()


# BUG 8 (phases.py, _parse_chat_request): Python's json.loads accepts NaN / Infinity,
# which are not JSON. Such a body is accepted, and when the upstream model differs it is
# re-serialised with a bare `NaN` token and sent to the provider as invalid JSON.
# The gateway should answer 400 "The request body is not valid JSON.".
async def test_nan_in_request_body_is_invalid_json() -> None:
    pepper = Secret("pepper")
    text = config_text(
        deployments="[{provider: p, model: upstream-m}]",
        tenant=f"""\
    keys: [{{id: k, hash: "{hash_key(pepper, 'sk-tenant')}"}}]
    models: [m]
""")
    runtime = Runtime.build(parse_config(text), environ={"ASC_PEPPER": "pepper"})
    processor = RequestProcessor(runtime)
    accepted = await processor.handle(Headers(Phase.REQUEST_HEADERS, {
        ":method": "POST", ":path": "/v1/chat/completions",
        "authorization": "Bearer sk-tenant"}, False))
    assert isinstance(accepted, Continue)
    body = b'{"model":"m","messages":[{"role":"user","content":"x"}],"temperature":NaN}'
    reply = await processor.handle(Body(Phase.REQUEST_BODY, body, True))
    assert getattr(reply, "status", None) == 400
    if isinstance(reply, Continue) and reply.body is not None:  # what happens today
        json.loads(reply.body, parse_constant=lambda token: pytest.fail(
            f"forwarded non-JSON token {token}"))
