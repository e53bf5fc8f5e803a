"""The fast path's pure logic: which requests take it, its one reply, usage and holds
carried through Envoy's metadata, access-log entries, and its Envoy rendering. The real
Envoy behaviour is in tests/e2e/test_fastpath*.py."""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime
from typing import Any

import pytest
import yaml
from envoy.data.accesslog.v3 import accesslog_pb2

from extproc.budgets.guard import Hold
from extproc.budgets.ledger import Reservation
from extproc.budgets.policy import CounterGroup
from extproc.config import parse_config
from extproc.envoy_bootstrap import EnvoyPorts, bootstrap_yaml, render_bootstrap
from extproc.errors import Dialect
from extproc.fastpath import (
    BodyFields,
    _hold_from_text,
    _hold_text,
    complete_from_log,
    usage_from_fields,
)
from extproc.messages import BodyMode, Continue, Headers, Phase, Respond
from extproc.phases import RequestProcessor
from extproc.runtime import Runtime
from extproc.translate.types import Usage
from extproc.usage_log import _CUT_FLAGS, entry_of
from tests.unit.test_phases import CONFIG, ENVIRON, PROVIDER_KEY_US, TENANT_KEYS

FAST_CONFIG = CONFIG + "fast_path: {tenants: [acme, euco]}\n"
PARSED = parse_config(FAST_CONFIG)


def processor() -> RequestProcessor:
    return RequestProcessor(Runtime.build(PARSED, environ=ENVIRON))


def headers(tenant: str = "acme", **fields: object) -> Headers:
    return Headers(Phase.REQUEST_HEADERS, {
        ":method": "POST", ":path": "/v1/chat/completions", "content-length": "300",
        "content-type": "application/json", "authorization": f"Bearer {TENANT_KEYS[tenant]}",
        "x-asc-cluster": "prov_eu", "x-api-key": "sk-client", "user-agent": "sdk/1",
    }, False, body_fields={"model": "gpt-4o-mini", **fields})


async def test_one_reply_routes_and_injects_the_key() -> None:
    proc = processor()

    reply = await proc.handle(headers(max_tokens=16.0))

    assert isinstance(reply, Continue)
    assert proc.fast_path is True
    assert reply.request_body_mode is None
    assert reply.clear_route_cache is True
    assert reply.set_headers == [("x-asc-cluster", "prov_us"),
                                 (":path", "/v1/chat/completions"),
                                 ("authorization", f"Bearer {PROVIDER_KEY_US}")]
    # The client's x-asc-cluster is overwritten (set), never removed in the same mutation.
    assert set(reply.remove_headers) == {"x-api-key", "user-agent"}
    assert reply.metadata is not None
    assert reply.metadata["fast"] is True
    assert reply.metadata["tenant"] == "acme"
    assert reply.metadata["credential"] == "cred-us@1"
    assert reply.response_headers == {"x-asc-request-id": proc.request_id,
                                      "x-asc-provider": "prov-us",
                                      "x-asc-region": "us-east-1",
                                      "x-asc-credential": "cred-us@1"}
    # The wire is the fast door's HTTP answer (tests/unit/test_fastdoor.py).


@pytest.mark.parametrize(("tenant", "fields", "why"), [
    ("pinned", {}, "tenant not allowed"),
    ("euco", {}, "the eu deployment renames the model"),
    ("acme", {"stream": True}, "an OpenAI stream without include_usage"),
    ("acme", {"service_tier": "priority"}, "a tier the config has no price for"),
    ("acme", {"stream": "yes"}, "stream of the wrong type"),
])
async def test_requests_that_need_the_body_keep_the_full_path(
        tenant: str, fields: dict[str, object], why: str) -> None:
    proc = processor()
    reply = await proc.handle(headers(tenant, **fields))

    assert isinstance(reply, Continue), why
    assert proc.fast_path is False, why
    assert reply.request_body_mode is BodyMode.BUFFERED, why


async def test_a_stream_with_include_usage_takes_the_fast_path() -> None:
    proc = processor()

    reply = await proc.handle(headers(stream=True, include_usage=True))

    assert isinstance(reply, Continue)
    assert proc.fast_path is True
    assert proc.streaming is True


async def test_limits_are_checked_as_on_the_full_path() -> None:
    reply = await processor().handle(headers(max_tokens=16.5))

    assert isinstance(reply, Respond)
    assert reply.status == 400
    assert b"'max_tokens' must be a positive integer." in reply.body


def test_body_fields_read_doubles_as_integers() -> None:
    fields = BodyFields.parse({"model": "m", "max_tokens": 50.0, "n": 2.0})

    assert fields is not None
    assert fields.as_request() == {"model": "m", "max_tokens": 50, "n": 2}
    assert BodyFields.parse({"max_tokens": 5.0}) is None  # no model: full path


def test_usage_from_fields_follows_each_dialect() -> None:
    assert usage_from_fields({"prompt_tokens": 10.0, "completion_tokens": 5.0,
                              "cached_tokens": 4.0}, Dialect.OPENAI) == Usage(10, 5, 4)
    assert usage_from_fields({"prompt_tokens": 10.0, "completion_tokens": 5.0,
                              "audio_tokens": 3.0}, Dialect.OPENAI) == Usage(
        10, 5, unpriced=("audio_tokens",))
    assert usage_from_fields({"input_tokens": 10.0, "output_tokens": 5.0,
                              "cache_read_input_tokens": 20.0,
                              "cache_creation_input_tokens": 30.0},
                             Dialect.ANTHROPIC) == Usage(60, 5, 20,
                                                        cache_write_input_tokens=30)
    assert usage_from_fields({"completion_tokens": 5.0}, Dialect.OPENAI) is None


def test_a_hold_survives_the_trip_through_metadata() -> None:
    group = CounterGroup(name="tenant month", unit="usd", keys=("asc:{t:a}:b:1", "k2"),
                         limit=10, amount=3, resets_at=datetime(2026, 12, 1, tzinfo=UTC),
                         ttl_s=99)
    hold = Hold(reservation=Reservation("r1", "{t:a}", (group,), charge_on_expiry=True),
                mode="redis")

    assert _hold_from_text(_hold_text(hold), "r1") == hold


def _entry(asc: dict[str, Any], usage: dict[str, float], status: int = 200,
           answered: bool = True) -> accesslog_pb2.HTTPAccessLogEntry:
    entry = accesslog_pb2.HTTPAccessLogEntry()
    common = entry.common_properties
    common.metadata.filter_metadata["asc"].update(asc)
    if usage:
        common.metadata.filter_metadata["asc.usage"].update(usage)
    if answered:
        common.time_to_first_upstream_rx_byte.nanos = 3_000_000
    common.duration.nanos = 5_000_000
    entry.response.response_code.value = status
    return entry


def test_entries_of_other_requests_are_ignored() -> None:
    assert entry_of(_entry({"request_id": "x"}, {})) is None
    assert entry_of(accesslog_pb2.HTTPAccessLogEntry()) is None
    entry = entry_of(_entry({"request_id": "x", "fast": True}, {"prompt_tokens": 1.0}))
    assert entry is not None
    assert entry.usage == {"prompt_tokens": 1.0}
    assert entry.first_byte_s == pytest.approx(0.003)


def test_the_packed_record_is_unpacked_and_never_overrides_envoys_own_keys() -> None:
    packed = json.dumps({"key_id": "acme-1", "estimated_input_tokens": 24, "stream": True,
                         "tenant": "globex", "bogus": "x", "team": {"nested": 1}})

    entry = entry_of(_entry({"request_id": "r1", "fast": True, "tenant": "acme",
                             "record": packed}, {}))
    broken = entry_of(_entry({"request_id": "r2", "fast": True, "record": "{not json"}, {}))

    assert entry is not None
    # Only the record's own keys, with plain values; the `tenant` Envoy logged wins.
    assert dict(entry.asc) == {"request_id": "r1", "fast": True, "tenant": "acme",
                               "key_id": "acme-1", "estimated_input_tokens": 24,
                               "stream": True}
    assert broken is not None
    assert dict(broken.asc) == {"request_id": "r2", "fast": True}


def test_a_mapped_error_keeps_the_providers_status_for_health_and_the_record() -> None:
    raw = _entry({"request_id": "x", "fast": True}, {}, status=502)
    raw.common_properties.metadata.filter_metadata["asc.answer"].update(
        {"provider_status": 401.0})
    mapped = entry_of(raw)
    plain = entry_of(_entry({"request_id": "x", "fast": True}, {}, status=429))
    assert mapped is not None
    assert plain is not None
    assert (mapped.status, mapped.provider_status, mapped.upstream_status) == (502, 401, 401)
    assert (plain.status, plain.provider_status, plain.upstream_status) == (429, None, 429)


def test_an_entry_keeps_the_usage_counts_and_the_scalar_metadata() -> None:
    entry = entry_of(_entry(
        {"request_id": "r1", "fast": True, "tenant": "acme", "team": "", "stream": False,
         "estimated_input_tokens": 0.0, "odd": [1.0]},
        {"prompt_tokens": 12.0, "cached_tokens": 0.0, "note": "n/a"}))

    assert entry is not None
    assert entry.asc == {"request_id": "r1", "fast": True, "tenant": "acme", "team": "",
                         "stream": False, "estimated_input_tokens": 0.0}
    assert entry.usage == {"prompt_tokens": 12.0, "cached_tokens": 0.0}


@pytest.mark.parametrize("flag", [None, "no_healthy_upstream", "response_from_cache_filter",
                                  *_CUT_FLAGS])
@pytest.mark.parametrize("answered", [True, False])
def test_an_answer_is_cut_only_by_the_flags_that_end_it(flag: str | None,
                                                        answered: bool) -> None:
    """Before the provider's first byte, only the client's leaving cuts the answer: a
    reset or a timeout then gave the client Envoy's own reply, whole (decision 0140)."""
    raw = _entry({"request_id": "x", "fast": True}, {}, status=503, answered=answered)
    if flag is not None:
        setattr(raw.common_properties.response_flags, flag, True)
    entry = entry_of(raw)
    assert entry is not None
    client_gone = flag in ("downstream_connection_termination", "downstream_remote_reset",
                           "downstream_protocol_error")
    assert entry.downstream_cut is (client_gone or (answered and flag in _CUT_FLAGS))


async def test_the_record_is_written_once_by_the_same_finish(
        caplog: pytest.LogCaptureFixture) -> None:
    proc = processor()
    reply = await proc.handle(headers(max_tokens=16.0))
    assert isinstance(reply, Continue)
    assert reply.metadata is not None
    with caplog.at_level(logging.INFO, logger="extproc.request"):
        await proc.finish()  # the ext_proc stream ends: no record from it
        entry = entry_of(_entry(dict(reply.metadata), {"prompt_tokens": 9.0,
                                                       "completion_tokens": 4.0}))
        assert entry is not None
        await complete_from_log(proc.runtime, entry)

    [record] = [r for r in caplog.records if r.getMessage() == "request finished"]
    fields = record.fields  # type: ignore[attr-defined]
    assert fields["request_id"] == proc.request_id
    assert fields["tenant"] == "acme"
    assert fields["credential"] == "cred-us@1"
    assert fields["prompt_tokens"] == 9
    assert fields["completion_tokens"] == 4
    assert fields["status"] == 200
    assert fields["aborted"] is False


def test_render_adds_the_fast_path_pieces_only_when_enabled() -> None:
    ports = EnvoyPorts(extproc_streams_per_connection=4)
    fast = render_bootstrap(PARSED, ports)
    plain = render_bootstrap(parse_config(CONFIG), EnvoyPorts())

    def hcm(bootstrap: dict[str, Any]) -> dict[str, Any]:
        listener = bootstrap["static_resources"]["listeners"][0]
        typed: dict[str, Any] = listener["filter_chains"][0]["filters"][0]["typed_config"]
        return typed

    assert [f["name"] for f in hcm(fast)["http_filters"]] == [
        "asc", "asc.fast_door", "asc.fast_metadata", "asc.ext_proc",
        "envoy.filters.http.lua", "asc.fast_answer_headers", "envoy.filters.http.router"]
    assert [f["name"] for f in hcm(plain)["http_filters"]] == [
        "asc.ext_proc", "envoy.filters.http.router"]
    filters = {f["name"]: f["typed_config"] for f in hcm(fast)["http_filters"]}
    door = filters["asc.fast_door"]
    assert door["failure_mode_allow"] is False
    assert door["status_on_error"] == {"code": 503}
    assert door["http_service"]["server_uri"]["cluster"] == "asc_fast_door"
    # The door's metadata headers become typed `asc` metadata and leave the request: on the
    # fast routes only (the filter itself has no rules).
    assert "request_rules" not in filters["asc.fast_metadata"]
    routes = hcm(fast)["route_config"]["virtual_hosts"][0]["routes"]
    rules = routes[0]["typed_per_filter_config"]["asc.fast_metadata"]["request_rules"]
    assert {"header": "x-asc-meta-fast", "remove": True, "on_header_present": {
        "metadata_namespace": "asc", "key": "fast", "type": "PROTOBUF_VALUE",
        "encode": "BASE64"}} in rules
    assert all(rule["remove"] for rule in rules)
    # One rule per key Envoy reads itself, and one for the packed rest (decision 0144).
    assert [rule["header"] for rule in rules] == [
        "x-asc-meta-request_id", "x-asc-meta-dialect", "x-asc-meta-tenant", "x-asc-meta-model",
        "x-asc-meta-provider", "x-asc-meta-region", "x-asc-meta-credential",
        "x-asc-meta-fast", "x-asc-meta-record"]
    # The provider's account headers leave a fast answer natively (decision 0143): the
    # filter has no mutations of its own, the fast routes carry them.
    assert filters["asc.fast_answer_headers"]["mutations"] == {}
    removals = routes[0]["typed_per_filter_config"]["asc.fast_answer_headers"]["mutations"][
        "response_mutations"]
    assert removals == [
        {"remove": "anthropic-organization-id"}, {"remove": "openai-organization"},
        {"remove": "openai-project"},
        {"remove_on_match": {"key_matcher": {"prefix": "x-ratelimit-"}}},
        {"remove_on_match": {"key_matcher": {"prefix": "anthropic-ratelimit-"}}}]
    # ext_proc is switched off on the fast routes only; the last route is the full path's.
    assert [r["typed_per_filter_config"]["asc.ext_proc"]["disabled"] for r in routes[:-1]] \
        == [True] * (len(routes) - 1)
    assert "typed_per_filter_config" not in routes[-1]
    assert routes[-1]["request_headers_to_remove"] == ["x-asc-cluster", "x-asc-path"]
    door_cluster = fast["static_resources"]["clusters"][1]
    assert door_cluster["name"] == "asc_fast_door"
    assert door_cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"][
        "address"] == {"socket_address": {"address": "127.0.0.1", "port_value": 50052}}
    [_, grpc_log] = hcm(fast)["access_log"]
    assert grpc_log["name"] == "envoy.access_loggers.http_grpc"
    assert grpc_log["filter"]["metadata_filter"]["matcher"]["path"] == [{"key": "fast"}]
    assert len(hcm(plain)["access_log"]) == 1
    extproc = fast["static_resources"]["clusters"][0]
    assert extproc["typed_extension_protocol_options"][
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"]["explicit_http_config"] == {
        "http2_protocol_options": {"max_concurrent_streams": 4}}


def test_rendered_yaml_keeps_the_selector_n_a_string() -> None:
    bootstrap = {"selectors": [{"key": "n"}, {"key": "y"}, {"key": "model"}]}
    text = bootstrap_yaml(bootstrap)

    assert "- key: 'n'" in text
    assert "- key: 'y'" in text
    assert yaml.safe_load(text) == bootstrap


def test_unknown_fast_path_tenant_is_a_config_error() -> None:
    from extproc.config import ConfigError

    with pytest.raises(ConfigError) as caught:
        parse_config(CONFIG + "fast_path: {tenants: [nobody]}\n")
    assert "fast_path.tenants[0] (line 69): unknown tenant 'nobody'" in str(caught.value)


async def test_a_tenant_with_guardrails_keeps_the_full_path() -> None:
    guarded = parse_config(CONFIG.replace(
        "    models: [gpt-4o-mini]\n  euco:",
        "    models: [gpt-4o-mini]\n    guardrails: {pii: {email: redact}}\n  euco:", 1)
        + "fast_path: {enabled: true}\n")
    assert guarded.tenants["acme"].guardrails is not None
    proc = RequestProcessor(Runtime.build(guarded, environ=ENVIRON))

    reply = await proc.handle(headers(max_tokens=16.0))

    assert isinstance(reply, Continue)
    assert proc.fast_path is False
    assert reply.request_body_mode is BodyMode.BUFFERED


async def test_only_chat_and_messages_take_the_fast_path() -> None:
    proc = processor()
    message = headers(max_tokens=16.0)
    message.headers[":path"] = "/v1/embeddings"
    message.body_fields = {"model": "gpt-4o-mini"}

    reply = await proc.handle(message)

    assert not (isinstance(reply, Continue) and reply.request_body_mode is None)
    assert proc.fast_path is False
