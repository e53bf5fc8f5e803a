"""An attempt rebuilt where its request's `Flight` is not (decision 0135): the forwarded
metadata round trip and the `x-asc-attempt` header. The Envoy behaviour itself is proven
in tests/reliability/test_rotation_drill.py (one Envoy over three processes)."""

from __future__ import annotations

from extproc.attempt_build import (
    ATTEMPT_HEADER,
    attempt_header,
    attempt_metadata,
    credential_named,
    note_remote_attempt,
    read_attempt_header,
    remote_attempt,
)
from extproc.config import GatewayConfig
from extproc.endpoints import ENDPOINTS
from extproc.errors import Dialect
from extproc.failover import Attempt, Flight, PreparedAttempt, zone_deployments
from extproc.translate.limits import OutputLimit
from tests.unit.test_failover import _config

CHAT = ENDPOINTS[("POST", "/v1/chat/completions")]
MESSAGES = ENDPOINTS[("POST", "/v1/messages")]
REQUEST_ID = "0123abcd" + "e" * 24


async def _never(*_: object) -> PreparedAttempt:
    raise AssertionError("not called")


def _context(meta: dict[str, str | int | float | bool], **extra: str) -> dict[str, str]:
    """What `extproc.envoy.attempt_context` hands the upstream processor (strings only)."""
    base: dict[str, str | int | float | bool] = {
        "request_id": REQUEST_ID, "tenant": "t", "key_id": "k", **meta}
    return {f"asc.{k}": v for k, v in {**base, **extra}.items() if isinstance(v, str)}


def test_metadata_round_trip_rebuilds_the_chain_endpoint_dialect_and_limit() -> None:
    config = _config()
    model = config.models["m"]
    chain = zone_deployments(config, model, model.deployments[1])
    meta = attempt_metadata(MESSAGES, model, chain, OutputLimit(field=None, default=512),
                            extension_headers=True)
    assert meta == {"attempt_endpoint": "POST /v1/messages", "attempt_model": "m",
                    "attempt_chain": "eu,eu2", "attempt_limit_default": "512",
                    "attempt_extension_headers": "1"}
    remote = remote_attempt(config, _context(meta, dialect="anthropic"))
    assert remote is not None
    assert remote.spec is MESSAGES
    assert remote.dialect is Dialect.ANTHROPIC
    assert remote.tenant is config.tenants["t"]
    assert [(d.provider, p.name) for d, p in remote.deployments] == [
        ("eu", "eu"), ("eu2", "eu2")]
    assert remote.output_limit == OutputLimit(field=None, default=512)
    assert remote.extension_headers is True
    source = remote.source(b'{"model": "m", "messages": []}', ["authorization"])
    assert source.request == {"model": "m", "messages": []}
    assert source.request_id == REQUEST_ID
    assert tuple(source.client_headers) == ("authorization",)


def test_metadata_without_a_default_limit_is_openai_and_no_extension_headers() -> None:
    config = _config()
    model = config.models["s"]
    chain = zone_deployments(config, model, model.deployments[0])
    meta = attempt_metadata(CHAT, model, chain, OutputLimit(), extension_headers=False)
    assert meta == {"attempt_endpoint": "POST /v1/chat/completions", "attempt_model": "s",
                    "attempt_chain": "solo"}
    remote = remote_attempt(config, _context(meta))
    assert remote is not None
    assert remote.dialect is Dialect.OPENAI
    assert remote.output_limit == OutputLimit(field=None, default=None)
    assert remote.extension_headers is False


def test_missing_or_stale_metadata_is_refused_not_guessed() -> None:
    config = _config()
    model = config.models["m"]
    chain = zone_deployments(config, model, model.deployments[1])
    meta = attempt_metadata(CHAT, model, chain, OutputLimit(), extension_headers=False)
    assert remote_attempt(config, {}) is None
    assert remote_attempt(config, _context(meta, tenant="gone")) is None
    assert remote_attempt(config, _context(meta, attempt_chain="eu,removed")) is None
    assert remote_attempt(config, _context(meta, attempt_model="other")) is None
    assert remote_attempt(config, _context(meta, attempt_endpoint="POST /v1/nope")) is None
    assert remote_attempt(config, _context(meta, request_id="xyz")) is None
    assert remote_attempt(config, _context(meta, request_id="zzzzzzzzzz")) is None
    assert remote_attempt(config, _context(meta, dialect="klingon")) is None


def test_attempt_header_round_trip() -> None:
    attempt = Attempt(number=2, provider="eu", region="eu-1", started=0.0,
                      latency_ms=12.5, credential="c-eu@3")
    name, value = attempt_header(attempt)
    assert (name, value) == (ATTEMPT_HEADER, "2;eu;c-eu@3;12.5")
    answered = read_attempt_header({ATTEMPT_HEADER: value})
    assert answered is not None
    assert (answered.number, answered.provider, answered.credential,
            answered.latency_ms) == (2, "eu", "c-eu@3", 12.5)
    keyless = Attempt(number=3, provider="eu2", region="eu-2", started=0.0)
    assert attempt_header(keyless)[1] == "3;eu2;;"
    assert read_attempt_header({ATTEMPT_HEADER: "3;eu2;;"}) is not None
    for bad in ("", "x;eu;c;1", "2;;c;1", "2;eu;c", "2;eu;c;fast"):
        assert read_attempt_header({ATTEMPT_HEADER: bad}) is None
    assert read_attempt_header({}) is None


def test_credential_named_holds_no_secret() -> None:
    credential = credential_named("ring-eu@2")
    assert credential is not None
    assert (credential.id, credential.version, credential.label) == ("ring-eu", 2, "ring-eu@2")
    assert credential.secret.reveal() == ""
    assert credential_named(None) is None
    assert credential_named("no-version") is None
    assert credential_named("@2") is None


def _flight(config: GatewayConfig) -> Flight:
    model = config.models["m"]
    return Flight(request_id=REQUEST_ID,
                  deployments=zone_deployments(config, model, model.deployments[1]),
                  prepare=_never, first_byte_timeout_s=10.0)


def test_an_answer_from_elsewhere_is_recorded_with_earlier_attempts_retried() -> None:
    config = _config()
    flight = _flight(config)
    first_elsewhere = note_remote_attempt(
        flight, config, {ATTEMPT_HEADER: "2;eu2;c-eu2@1;40.0"}, 200)
    assert first_elsewhere is True
    assert flight.answered is not None
    assert flight.answered.provider == "eu2"
    assert flight.records() == [
        {"attempt": 1, "provider": "eu", "region": "eu-1", "status": None,
         "latency_ms": None, "left": "retried", "credential": None},
        {"attempt": 2, "provider": "eu2", "region": "eu-2", "status": 200,
         "latency_ms": 40.0, "left": None, "credential": "c-eu2@1"},
    ]


def test_an_attempt_this_process_made_is_not_recorded_twice() -> None:
    config = _config()
    flight = _flight(config)
    first = flight.start(config.providers["eu"], 1)
    flight.end(first, 401)
    assert note_remote_attempt(flight, config, {ATTEMPT_HEADER: "2;eu2;c-eu2@1;4.0"},
                               200) is False  # attempt 1's outcome is known here
    assert note_remote_attempt(flight, config, {ATTEMPT_HEADER: "2;eu2;c-eu2@1;4.0"},
                               200) is False
    assert [a.number for a in flight.attempts] == [1, 2]
    assert note_remote_attempt(flight, config, {}, 200) is False
    # A provider outside the request's chain is not taken for its answer.
    other = _flight(config)
    assert note_remote_attempt(other, config, {ATTEMPT_HEADER: "2;us;c-us@1;1.0"},
                               200) is False
    assert other.attempts == []
