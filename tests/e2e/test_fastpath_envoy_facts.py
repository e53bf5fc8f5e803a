"""Facts the fast path stands on, each shown on the real Envoy 1.40 binary.

A tiny programmable service (`Rig`, in this process) plays ext_proc, ext_authz and the
gRPC access-log service and counts every message; the upstream is the emulator. Decision
records 0120-0123 cite these tests.

* json_to_metadata placed before ext_proc holds the request headers until the body is
  whole, so ext_proc's *first* message already carries `model`, `stream`, `max_tokens`
  and `stream_options.include_usage` (forwarded with `metadata_options`);
* a headers reply that injects the key, picks the cluster (clear_route_cache) and
  overrides the rest to NONE/SKIP makes a whole request cost **one** ext_proc message, plain
  and streamed (0 per chunk), and Envoy closes the stream itself (no need to wait);
* ext_authz with `with_request_body` costs one unary Check and can do the same routing
  and key injection;
* usage is read by Envoy (a Lua filter reading the answer's chunks as they pass, JSON or
  SSE) and reaches the service through the gRPC access-log stream with the service's own
  metadata;
* `x-asc-*` response headers can come from the service's dynamic metadata through
  `response_headers_to_add`, without a response-headers message.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass, field
from typing import Any

import grpc
import httpx
import pytest
from envoy.config.core.v3 import base_pb2
from envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2
from envoy.service.accesslog.v3 import als_pb2, als_pb2_grpc
from envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc
from google.protobuf import json_format  # type: ignore[import-untyped]
from google.rpc import code_pb2

from extproc.devstack import Stack, free_port
from extproc.envoy_bootstrap import fast_path_lua_usage_filter
from tests.conftest import PROVIDER_KEY_US, provider_fingerprint
from tests.polling import wait_for

_MODE = processing_mode_pb2.ProcessingMode
_BODY_FIELDS: tuple[tuple[tuple[str, ...], str], ...] = (
    (("model",), "model"),
    (("stream",), "stream"),
    (("max_tokens",), "max_tokens"),
    (("max_completion_tokens",), "max_completion_tokens"),
    (("n",), "n"),
    (("stream_options", "include_usage"), "include_usage"),
    (("service_tier",), "service_tier"),
)


def json_to_metadata_filter() -> dict[str, Any]:
    """The body fields into metadata `asc.request` before ext_proc: decision 0120's design,
    which the product rendered until the fast door replaced it (0124)."""
    return {
        "name": "envoy.filters.http.json_to_metadata",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.json_to_metadata.v3"
                     ".JsonToMetadata",
            "request_rules": {"rules": [
                {"selectors": [{"key": part} for part in path],
                 "on_present": {"metadata_namespace": "asc.request", "key": key}}
                for path, key in _BODY_FIELDS]},
        },
    }
_OVERWRITE = base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD


@dataclass
class StreamSeen:
    """One ext_proc stream as the rig saw it."""

    kinds: list[str] = field(default_factory=list)
    metadata: dict[str, Any] = field(default_factory=dict)
    ended: bool = False


@dataclass
class Rig(pb_grpc.ExternalProcessorServicer,  # type: ignore[misc]
          external_auth_pb2_grpc.AuthorizationServicer,  # type: ignore[misc]
          als_pb2_grpc.AccessLogServiceServicer):  # type: ignore[misc]
    """ext_proc + ext_authz + access-log service that records what Envoy sends."""

    streams: list[StreamSeen] = field(default_factory=list)
    end_after_reply: bool = False
    """End the RPC right after the one reply instead of waiting for Envoy's half-close."""
    checks: list[external_auth_pb2.CheckRequest] = field(default_factory=list)
    logs: list[dict[str, Any]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def Process(self, request_iterator: Iterator[pb.ProcessingRequest],
                context: grpc.ServicerContext) -> Iterator[pb.ProcessingResponse]:
        seen = StreamSeen()
        with self.lock:
            self.streams.append(seen)
        try:
            for request in request_iterator:
                kind = request.WhichOneof("request")
                seen.kinds.append(kind)
                if kind == "request_headers":
                    seen.metadata = json_format.MessageToDict(request.metadata_context)
                    yield _one_shot_reply(len(self.streams))
                    if self.end_after_reply:
                        return
                else:  # never expected on the fast path: answer it so nothing hangs
                    response = pb.ProcessingResponse()
                    getattr(response, kind).SetInParent()
                    yield response
        finally:
            seen.ended = True

    def Check(self, request: external_auth_pb2.CheckRequest,
              context: grpc.ServicerContext) -> external_auth_pb2.CheckResponse:
        with self.lock:
            self.checks.append(request)
        response = external_auth_pb2.CheckResponse()
        response.status.code = code_pb2.OK
        ok = response.ok_response
        for key, value in (("x-asc-cluster", "emu"),
                           ("authorization", f"Bearer {PROVIDER_KEY_US}")):
            option = ok.headers.add()
            option.header.key = key
            option.header.value = value
            option.append_action = _OVERWRITE
        ok.dynamic_metadata.update({"request_id": f"authz-{len(self.checks)}"})
        return response

    def StreamAccessLogs(self, request_iterator: Iterator[als_pb2.StreamAccessLogsMessage],
                         context: grpc.ServicerContext) -> als_pb2.StreamAccessLogsResponse:
        for message in request_iterator:
            for entry in message.http_logs.log_entry:
                with self.lock:
                    self.logs.append(json_format.MessageToDict(entry))
        return als_pb2.StreamAccessLogsResponse()


def _one_shot_reply(number: int) -> pb.ProcessingResponse:
    """Key, cluster, metadata and "nothing more for this request", in one headers reply."""
    response = pb.ProcessingResponse()
    common = response.request_headers.response
    for key, value in (("x-asc-cluster", "emu"),
                       ("authorization", f"Bearer {PROVIDER_KEY_US}")):
        option = common.header_mutation.set_headers.add()
        option.header.key = key
        option.header.raw_value = value.encode()
        option.append_action = _OVERWRITE
    common.clear_route_cache = True
    response.dynamic_metadata.fields["asc"].struct_value.update(
        {"request_id": f"fast-{number}", "fast": True})
    mode = response.mode_override
    mode.request_body_mode = _MODE.NONE
    mode.response_header_mode = _MODE.SKIP
    mode.response_body_mode = _MODE.NONE
    mode.response_trailer_mode = _MODE.SKIP
    return response


@dataclass
class Facts:
    rig: Rig
    envoy_port: int
    emulator_port: int
    client: httpx.Client

    def chat(self, **extra: Any) -> httpx.Response:
        body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Hi"}],
                **extra}
        return self.client.post("/v1/chat/completions", json=body,
                                headers={"authorization": "Bearer client-key"})

    def upstream_requests(self) -> list[dict[str, Any]]:
        recorded: list[dict[str, Any]] = httpx.get(
            f"http://127.0.0.1:{self.emulator_port}/_emulator/requests").json()["requests"]
        return recorded


def _bootstrap(rig_port: int, emulator_port: int, listen_port: int, admin: str, *,
               authz: bool) -> dict[str, Any]:
    rig = {"envoy_grpc": {"cluster_name": "rig"}}
    first: dict[str, Any]
    if authz:
        first = {"name": "envoy.filters.http.ext_authz", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.ext_authz.v3.ExtAuthz",
            "grpc_service": rig, "transport_api_version": "V3",
            "failure_mode_allow": False, "clear_route_cache": True,
            "with_request_body": {"max_request_bytes": 65536, "allow_partial_message": False},
        }}
    else:
        first = {"name": "asc.ext_proc", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.ext_proc.v3"
                     ".ExternalProcessor",
            "grpc_service": rig, "failure_mode_allow": False, "message_timeout": "2s",
            "allow_mode_override": True,
            "processing_mode": {"request_header_mode": "SEND", "response_header_mode": "SEND",
                                "request_body_mode": "NONE", "response_body_mode": "NONE",
                                "request_trailer_mode": "SKIP",
                                "response_trailer_mode": "SKIP"},
            "metadata_options": {"forwarding_namespaces": {"untyped": ["asc.request"]},
                                 "receiving_namespaces": {"untyped": ["asc"]}},
        }}
    hcm = {
        "@type": "type.googleapis.com/envoy.extensions.filters.network"
                 ".http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": "facts",
        "access_log": [{"name": "envoy.access_loggers.http_grpc", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.access_loggers.grpc.v3"
                     ".HttpGrpcAccessLogConfig",
            "common_config": {"log_name": "asc", "grpc_service": rig,
                              "transport_api_version": "V3",
                              "buffer_flush_interval": "0.05s"},
        }}],
        "route_config": {"virtual_hosts": [{
            "name": "all", "domains": ["*"],
            "routes": [{"match": {"prefix": "/"},
                        "route": {"cluster_header": "x-asc-cluster"},
                        "response_headers_to_add": [{
                            "header": {"key": "x-asc-request-id",
                                       "value": "%DYNAMIC_METADATA(asc:request_id)%"},
                            "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"}]}],
        }]},
        "http_filters": [
            json_to_metadata_filter(),
            first,
            fast_path_lua_usage_filter(),
            {"name": "envoy.filters.http.router", "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}},
        ],
    }
    h2 = {"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
        "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
        "explicit_http_config": {"http2_protocol_options": {}}}}

    def cluster(name: str, port: int, extra: dict[str, Any]) -> dict[str, Any]:
        return {"name": name, "type": "STATIC", "connect_timeout": "1s",
                "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": [
                    {"endpoint": {"address": {"socket_address": {
                        "address": "127.0.0.1", "port_value": port}}}}]}]},
                **extra}

    return {
        "admin": {"address": {"pipe": {"path": admin, "mode": 0o600}}},
        "static_resources": {
            "listeners": [{"name": "facts", "address": {"socket_address": {
                "address": "127.0.0.1", "port_value": listen_port}},
                "filter_chains": [{"filters": [{
                    "name": "envoy.filters.network.http_connection_manager",
                    "typed_config": hcm}]}]}],
            "clusters": [cluster("rig", rig_port, {"typed_extension_protocol_options": h2}),
                         cluster("emu", emulator_port, {})],
        },
    }


def _facts(stack: Stack, *, authz: bool) -> Iterator[Facts]:
    rig = Rig()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    pb_grpc.add_ExternalProcessorServicer_to_server(rig, server)
    external_auth_pb2_grpc.add_AuthorizationServicer_to_server(rig, server)
    als_pb2_grpc.add_AccessLogServiceServicer_to_server(rig, server)
    rig_port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        _, emulator_port = stack.start_emulator([PROVIDER_KEY_US])
        listen_port, admin = free_port(), stack.admin_socket()
        bootstrap = _bootstrap(rig_port, emulator_port, listen_port, str(admin), authz=authz)
        # JSON is YAML too, and keeps the selector "n" a string (yaml-cpp reads a bare n
        # as false).
        stack.start_envoy(json.dumps(bootstrap), listen_port=listen_port,
                          admin_socket=admin)
        with httpx.Client(base_url=f"http://127.0.0.1:{listen_port}", timeout=10) as client:
            yield Facts(rig, listen_port, emulator_port, client)
    finally:
        stack.stop()
        server.stop(0)


@pytest.fixture
def facts(stack: Stack) -> Iterator[Facts]:
    yield from _facts(stack, authz=False)


@pytest.fixture
def authz_facts(stack: Stack) -> Iterator[Facts]:
    yield from _facts(stack, authz=True)


def _usage_of(entry: dict[str, Any]) -> dict[str, Any]:
    found: dict[str, Any] = (entry["commonProperties"]["metadata"]["filterMetadata"]
                             .get("asc.usage", {}))
    return found


def test_one_ext_proc_message_per_plain_request(facts: Facts) -> None:
    response = facts.chat(max_tokens=50)

    assert response.status_code == 200
    assert response.json()["usage"]["prompt_tokens"] > 0
    assert response.headers["x-asc-request-id"] == "fast-1"
    # json_to_metadata ran before ext_proc's first message: the body's fields are there.
    [stream] = facts.rig.streams
    assert stream.kinds == ["request_headers"]
    assert stream.metadata == {"filterMetadata": {"asc.request": {
        "model": "gpt-4o-mini", "max_tokens": 50.0}}}
    # ... and Envoy itself ended the stream after that one reply.
    assert wait_for(lambda: stream.ended)
    [upstream] = facts.upstream_requests()
    assert upstream["headers"]["authorization"] == (
        f"Bearer {provider_fingerprint(PROVIDER_KEY_US)}")
    assert json.loads(upstream["body"])["max_tokens"] == 50  # the body went through as sent


def test_usage_of_a_json_answer_reaches_the_access_log_service(facts: Facts) -> None:
    response = facts.chat()

    usage = response.json()["usage"]
    assert wait_for(lambda: len(facts.rig.logs) == 1)
    [entry] = facts.rig.logs
    metadata = entry["commonProperties"]["metadata"]["filterMetadata"]
    assert metadata["asc"] == {"request_id": "fast-1", "fast": True}
    assert _usage_of(entry) == {"prompt_tokens": float(usage["prompt_tokens"]),
                                "completion_tokens": float(usage["completion_tokens"])}
    assert entry["response"]["responseCode"] == 200


def test_streamed_request_costs_one_message_and_sse_usage_is_read_by_envoy(
        facts: Facts) -> None:
    response = facts.chat(stream=True, stream_options={"include_usage": True})

    assert response.status_code == 200
    events = [line for line in response.text.splitlines() if line.startswith("data: {")]
    assert len(events) > 3  # several chunks, none of them seen by the service
    usage = json.loads(events[-1][len("data: "):])["usage"]
    [stream] = facts.rig.streams
    assert stream.kinds == ["request_headers"]
    assert stream.metadata == {"filterMetadata": {"asc.request": {
        "model": "gpt-4o-mini", "stream": True, "include_usage": True}}}
    assert wait_for(lambda: len(facts.rig.logs) == 1)
    assert _usage_of(facts.rig.logs[0]) == {
        "prompt_tokens": float(usage["prompt_tokens"]),
        "completion_tokens": float(usage["completion_tokens"])}


def test_access_logs_arrive_in_batches_on_one_stream_per_worker(facts: Facts) -> None:
    for _ in range(20):
        assert facts.chat().status_code == 200

    assert wait_for(lambda: len(facts.rig.logs) == 20)
    ids = sorted(int(e["commonProperties"]["metadata"]["filterMetadata"]["asc"]["request_id"]
                     .removeprefix("fast-")) for e in facts.rig.logs)
    assert ids == list(range(1, 21))
    assert len(facts.rig.streams) == 20
    assert all(s.kinds == ["request_headers"] for s in facts.rig.streams)


def test_ext_authz_with_body_is_one_unary_check(authz_facts: Facts) -> None:
    response = authz_facts.chat(max_tokens=7)

    assert response.status_code == 200
    [check] = authz_facts.rig.checks
    http = check.attributes.request.http
    assert json.loads(http.body)["max_tokens"] == 7  # the whole body, in the one Check
    # It routed (clear_route_cache) and injected the key like the ext_proc reply.
    [upstream] = authz_facts.upstream_requests()
    assert upstream["headers"]["authorization"] == (
        f"Bearer {provider_fingerprint(PROVIDER_KEY_US)}")
    # ext_authz's metadata lands in its own namespace, not `asc`: the route's header is empty.
    assert "x-asc-request-id" not in response.headers
    assert wait_for(lambda: len(authz_facts.rig.logs) == 1)
    metadata = authz_facts.rig.logs[0]["commonProperties"]["metadata"]["filterMetadata"]
    assert metadata["envoy.filters.http.ext_authz"]["request_id"] == "authz-1"


def test_the_service_may_end_the_stream_right_after_its_one_reply(facts: Facts) -> None:
    facts.rig.end_after_reply = True

    plain = facts.chat()
    streamed = facts.chat(stream=True, stream_options={"include_usage": True})

    assert plain.status_code == 200
    assert plain.json()["usage"]["completion_tokens"] > 0
    assert streamed.status_code == 200
    assert streamed.text.rstrip().endswith("data: [DONE]")
    assert [s.kinds for s in facts.rig.streams] == [["request_headers"]] * 2
    assert wait_for(lambda: len(facts.rig.logs) == 2)
    assert [e["response"]["responseCode"] for e in facts.rig.logs] == [200, 200]
