"""Render the Envoy bootstrap that fronts the gateway, from `asc.yaml`.

One source of truth: provider clusters come from the providers in the config, so the
Envoy side can never route to a host the gateway config does not name. The settings
the gateway relies on are fixed here and asserted by tests against a real Envoy:

* `failure_mode_allow: false` - a broken or slow ext_proc fails closed;
* `message_timeout` explicit; `allow_mode_override: true` (the body is asked for late);
* `mutation_rules.disallow_is_error: true` - a dropped header mutation is an error;
* `metadata_options.receiving_namespaces.untyped: [asc]` - else Envoy drops our metadata;
* `cluster_header: x-asc-cluster` routing, re-evaluated because we clear the route cache;
* a request buffer limit, so an oversized body is answered 413 instead of hanging, and a
  response buffer limit (`limits.max_response_bytes`): the service reads non-streamed
  answers BUFFERED_PARTIAL and answers a larger one 502 instead of a stall;
* Envoy's own error replies rendered as OpenAI-shaped JSON;
* `x-asc-cluster` internal-only, request trailers sent to the service (a client cannot
  pick a cluster, see docs/decisions/0050-route-decided-by-the-service-only.md);
* the admin interface on a Unix socket with mode 0600, or none at all: admin has no
  authentication and can raise the log level until provider keys are printed.

Three shapes (`Shape`, `extproc envoy render --shape`), all with the settings above and the
same JSON access log (the `asc` metadata joins Envoy's line to the audit record):

* `front` - a local front proxy, ext_proc over TCP (what `make run` starts);
* `sidecar` - beside the service in one pod: both ext_proc filters reach it over a Unix
  socket (a STATIC cluster of `pipe` endpoints, one per service worker), admin on a Unix
  socket (docs/decisions/0090-sidecar-ext-proc-over-a-unix-socket.md);
* `edge` - facing clients and the internet: TLS to providers with SNI and CA checks,
  HTTP/2 pools where the provider speaks it, an overload manager capping downstream
  connections, header and idle timeouts (docs/decisions/0092-edge-shape.md).
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Final

import yaml
from envoy.config.bootstrap.v3 import bootstrap_pb2
from envoy.extensions.access_loggers.grpc.v3 import als_pb2  # noqa: F401 - @type
from envoy.extensions.access_loggers.stream.v3 import stream_pb2  # noqa: F401 - @type
from envoy.extensions.filters.http.ext_authz.v3 import ext_authz_pb2  # noqa: F401 - @type
from envoy.extensions.filters.http.ext_proc.v3 import ext_proc_pb2  # noqa: F401 - @type
from envoy.extensions.filters.http.header_mutation.v3 import (  # noqa: F401 - @type
    header_mutation_pb2,
)
from envoy.extensions.filters.http.header_to_metadata.v3 import (  # noqa: F401 - @type
    header_to_metadata_pb2,
)
from envoy.extensions.filters.http.lua.v3 import lua_pb2  # noqa: F401 - @type
from envoy.extensions.filters.http.router.v3 import router_pb2  # noqa: F401 - @type
from envoy.extensions.filters.http.upstream_codec.v3 import (  # noqa: F401 - @type
    upstream_codec_pb2,
)
from envoy.extensions.filters.network.http_connection_manager.v3 import (  # noqa: F401 - @type
    http_connection_manager_pb2,
)
from envoy.extensions.resource_monitors.downstream_connections.v3 import (  # noqa: F401 - @type
    downstream_connections_pb2,
)
from envoy.extensions.retry.priority.previous_priorities.v3 import (  # noqa: F401 - @type
    previous_priorities_config_pb2,
)
from envoy.extensions.transport_sockets.tls.v3 import tls_pb2  # noqa: F401 - @type
from envoy.extensions.upstreams.http.v3 import http_protocol_options_pb2  # noqa: F401 - @type
from google.protobuf import json_format  # type: ignore[import-untyped]

from extproc.attempt_build import AUTH_HEADER
from extproc.config import FailoverSettings, GatewayConfig, Provider
from extproc.envoy import (
    METADATA_NAMESPACE,
    RESPONSE_CODE_DETAILS_ATTRIBUTE,
    ROUTE_METADATA_ATTRIBUTE,
    SOURCE_ADDRESS_ATTRIBUTE,
    STAGE_HEADER,
    STAGE_UPSTREAM,
)
from extproc.envoy_identity import IdentityEnvoy, apply_identity
from extproc.errors import Dialect, ErrorCode, GatewayError, error_body
from extproc.failover import Chain, failover_chains, has_failover_cluster
from extproc.fastpath import (
    ANSWER_NAMESPACE,
    DOOR_DIALECT_HEADER,
    DOOR_ERROR_PATH,
    DOOR_HEALTH_PATH,
    DOOR_PATH_HEADER,
    DOOR_STATUS_HEADER,
    FAST_BACKEND_PATHS,
    FAST_METADATA,
    META_PREFIX,
    ROUTE_METADATA_HEADER,
    MetaKind,
)
from extproc.listen import worker_socket_paths
from extproc.phases import CLUSTER_HEADER
from extproc.translate.base import MESSAGES_PATH, Backend
from extproc.translate.headers import ACCOUNT_HEADERS, ACCOUNT_PREFIXES
from extproc.translate.provider_errors import STREAM_ERROR_FALLBACK
from extproc.usage_log import RETRY_AFTER

__all__ = [
    "ADMIN_SOCKET_MODE",
    "SYSTEM_CA",
    "BootstrapError",
    "EdgeLimits",
    "EnvoyPorts",
    "Shape",
    "ShapeError",
    "admin_address",
    "bootstrap_yaml",
    "check_typed",
    "fast_path_lua_usage_filter",
    "render_bootstrap",
    "render_yaml",
]

EXTPROC_CLUSTER: Final = "asc_extproc"
GATEWAY_TIMEOUT_CODE: Final = "gateway_timeout"
"""The `code` of Envoy's own 504 (the service never answers 504 itself: no ErrorCode)."""
ADMIN_SOCKET_MODE: Final = 0o600
_HCM: Final = (
    "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3"
    ".HttpConnectionManager"
)
_EXT_PROC: Final = "type.googleapis.com/envoy.extensions.filters.http.ext_proc.v3.ExternalProcessor"
_ROUTER: Final = "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
_HTTP_OPTIONS: Final = "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
_TLS: Final = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext"
_STDOUT_LOG: Final = "type.googleapis.com/envoy.extensions.access_loggers.stream.v3.StdoutAccessLog"
_BUFFER_SLACK: Final = 64 * 1024
"""Envoy buffers a little more than the body limit, so the service sees an oversized body."""
_UPSTREAM_CODEC: Final = (
    "type.googleapis.com/envoy.extensions.filters.http.upstream_codec.v3.UpstreamCodec")


def _upstream_codec_filter() -> dict[str, Any]:
    """The codec every upstream filter chain ends with (Envoy requires it last)."""
    return {"name": "envoy.filters.http.upstream_codec",
            "typed_config": {"@type": _UPSTREAM_CODEC}}


_PREVIOUS_PRIORITIES: Final = (
    "type.googleapis.com/envoy.extensions.retry.priority.previous_priorities.v3"
    ".PreviousPrioritiesConfig")
_SOCKET_MATCH_KEY: Final = "asc_provider"
SYSTEM_CA: Final = "/etc/ssl/certs/ca-certificates.crt"
"""Debian/Ubuntu's CA bundle (also Alpine's, via ca-certificates)."""
_DOWNSTREAM_CONNECTIONS: Final = (
    "type.googleapis.com/envoy.extensions.resource_monitors.downstream_connections.v3"
    ".DownstreamConnectionsConfig")
_HEALTH_SERVICE: Final = "envoy.service.ext_proc.v3.ExternalProcessor"
_H2_KINDS: Final = frozenset({"openai", "anthropic", "azure", "mistral", "gemini"})
"""Provider kinds whose public endpoints speak HTTP/2 over TLS; a self-hosted
`openai_compatible` server over TLS gets ALPN (`auto_config`) instead."""


class Shape(StrEnum):
    """Where the rendered Envoy runs (module docstring)."""

    FRONT = "front"
    SIDECAR = "sidecar"
    EDGE = "edge"


@dataclass(frozen=True, slots=True)
class EnvoyPorts:
    listen_address: str = "127.0.0.1"
    listen_port: int = 10000
    admin_socket: str | None = None
    """Path of Envoy's admin Unix socket (mode 0600); None renders no admin at all."""
    extproc_address: str = "127.0.0.1"
    extproc_port: int = 50051
    message_timeout_ms: int = 2000
    route_timeout_s: int = 300
    extproc_streams_per_connection: int | None = None
    """HTTP/2 `max_concurrent_streams` towards extproc. Envoy opens one connection per
    worker thread to a cluster without a limit, so `serve --workers N` (SO_REUSEPORT
    shares connections, not streams) gets at most as many connections as Envoy has
    threads; a small limit makes Envoy open more, which the kernel spreads (bench:
    bench/fastpath.py --workers 2)."""
    extproc_socket: str | None = None
    """The service's Unix socket (`extproc serve --listen unix:PATH`); when set, ext_proc
    goes over it instead of `extproc_address:extproc_port`."""
    fast_door_port: int | None = None
    """The service's fast door on `extproc_address` when the config enables the fast path
    (`extproc serve --fast-door`); default `extproc_port + 1`, as the service's own default.
    On `extproc_socket` it is `<socket>.door`."""
    extproc_workers: int = 1
    """The service's `--workers` on `extproc_socket`: one socket per worker (Unix sockets
    have no SO_REUSEPORT), all listed, so Envoy spreads streams across them."""
    trusted_ca: str = SYSTEM_CA
    """CA bundle that provider certificates must chain to."""


@dataclass(frozen=True, slots=True)
class EdgeLimits:
    """What the edge shape bounds, so a flood of idle or slow clients cannot take Envoy
    down (Envoy's edge best practices)."""

    max_downstream_connections: int = 10000
    request_headers_timeout_s: int = 10
    """A client must send its headers within this (slowloris)."""
    stream_idle_timeout_s: int = 300
    """A stream with no bytes either way for this long is reset; an LLM answer that
    streams keeps it alive, a first token may take long, so not shorter."""
    connection_idle_timeout_s: int = 900
    max_concurrent_streams: int = 100


def _socket(address: str, port: int) -> dict[str, Any]:
    return {"socket_address": {"address": address, "port_value": port}}


def _access_log() -> list[dict[str, Any]]:
    fields = {
        "time": "%START_TIME%",
        "request_id": f"%DYNAMIC_METADATA({METADATA_NAMESPACE}:request_id)%",
        "envoy_request_id": "%REQ(X-REQUEST-ID)%",
        "tenant": f"%DYNAMIC_METADATA({METADATA_NAMESPACE}:tenant)%",
        "provider": f"%DYNAMIC_METADATA({METADATA_NAMESPACE}:provider)%",
        "region": f"%DYNAMIC_METADATA({METADATA_NAMESPACE}:region)%",
        "model": f"%DYNAMIC_METADATA({METADATA_NAMESPACE}:model)%",
        "credential": f"%DYNAMIC_METADATA({METADATA_NAMESPACE}:credential)%",
        "method": "%REQ(:METHOD)%",
        "path": "%REQ(X-ENVOY-ORIGINAL-PATH?:PATH)%",
        "status": "%RESPONSE_CODE%",
        "details": "%RESPONSE_CODE_DETAILS%",
        "flags": "%RESPONSE_FLAGS%",
        "upstream_cluster": "%UPSTREAM_CLUSTER%",
        "duration_ms": "%DURATION%",
        "upstream_ms": "%RESP(X-ENVOY-UPSTREAM-SERVICE-TIME)%",
        # The peer Envoy accepted the connection from: the audit's source_address (0081).
        "client_address": "%DOWNSTREAM_REMOTE_ADDRESS%",
    }
    return [{
        "name": "envoy.access_loggers.stdout",
        "typed_config": {"@type": _STDOUT_LOG, "log_format": {"json_format": fields}},
    }]


def _local_reply_config() -> dict[str, Any]:
    """Envoy's own errors (fail-closed ext_proc, 413, no upstream, a timeout, a reset) as
    JSON in the client's dialect: Anthropic-shaped for the Messages door, OpenAI-shaped
    otherwise.

    Replies the gateway itself sends are already JSON; they carry `asc.error` metadata and
    are passed through unchanged by the first mappers. The door is known from the service's
    `asc.dialect` metadata once it answered a phase (the service may have rewritten
    `:path` for the provider by then), else from the client's `:path`
    (docs/decisions/0131-envoy-errors-in-the-door-dialect.md).
    """
    return {
        "mappers": [*(_own_reply_mapper(key) for key in _OWN_REPLY_KEYS), *(
            {"filter": {"and_filter": {"filters": [
                _anthropic_door_filter(), _status_filter(status)]}},
             "body_format_override": _anthropic_error_format(message, kind)}
            for status, message, kind in _ENVOY_ERRORS_ANTHROPIC
        ), {
            "filter": _anthropic_door_filter(),
            "body_format_override": _anthropic_error_format("%LOCAL_REPLY_BODY%", "api_error"),
        }, *(
            {"filter": _status_filter(status),
             "body_format_override": _openai_error_format(message, code)}
            for status, message, code in _ENVOY_ERROR_MESSAGES
        )],
        "body_format": _openai_error_format("%LOCAL_REPLY_BODY%"),
    }


_OWN_REPLY_KEYS: Final = ("error", "answered")
"""Metadata keys of the gateway's own replies: `error` on errors, `answered` on the 200s
it answers itself (model lists, estimated token counts; `extproc.endpoints`)."""


def _own_reply_mapper(key: str, *, namespace: str = METADATA_NAMESPACE) -> dict[str, Any]:
    """Passes a reply of the gateway (it carries `asc.<key>`) through unchanged."""
    return {
        "filter": {"metadata_filter": {
            "matcher": {"filter": namespace, "path": [{"key": key}],
                        "value": {"present_match": True}},
            # The default (true) would match every reply that lacks the key.
            "match_if_key_not_found": False,
        }},
        "body_format_override": {
            "text_format_source": {"inline_string": "%LOCAL_REPLY_BODY%"},
            "content_type": "application/json",
        },
    }


def _status_filter(status: int) -> dict[str, Any]:
    return {"status_code_filter": {"comparison": {
        "op": "EQ", "value": {"default_value": status, "runtime_key": "asc.unused"}}}}


def _dialect_filter(*, if_missing: bool) -> dict[str, Any]:
    return {"metadata_filter": {
        "matcher": {"filter": METADATA_NAMESPACE, "path": [{"key": "dialect"}],
                    "value": {"string_match": {"exact": "anthropic"}}},
        "match_if_key_not_found": if_missing,
    }}


def _anthropic_door_filter() -> dict[str, Any]:
    """Matches a reply to a request that came in through the Anthropic Messages door (a
    new object each time: a shared one would render as a YAML anchor)."""
    return {"or_filter": {"filters": [
        _dialect_filter(if_missing=False),
        # No dialect metadata: the service never answered, so `:path` is the client's.
        {"and_filter": {"filters": [
            _dialect_filter(if_missing=True),
            {"header_filter": {"header": {
                "name": ":path",
                "string_match": {"prefix": MESSAGES_PATH}}}},
        ]}},
    ]}}


def _anthropic_error_format(message: str, kind: str) -> dict[str, Any]:
    return {"json_format": {"type": "error", "error": {"type": kind, "message": message}}}


def _openai_error_format(message: str,
                         code: str = "%RESPONSE_CODE_DETAILS%") -> dict[str, Any]:
    return {"json_format": {"error": {
        "message": message,
        "type": "gateway_error",
        "param": None,
        "code": code,
    }}}


_ENVOY_ERROR_MESSAGES: Final = (
    # Envoy's own bodies are empty or terse for these; say what happened instead. Its
    # response details for a 5xx describe the gateway's insides (the ext_proc gRPC
    # status, a reset reason, the TLS library's verify error), so the client gets a fixed
    # code; the details stay in the access log's `details` (decision 0141). A 4xx keeps
    # them as its code: they name what was wrong with the request (a JWT's fault).
    (500, "The gateway could not process the request.", ErrorCode.INTERNAL.value),
    (502, "The provider connection failed.", ErrorCode.PROVIDER_ERROR.value),
    (503, "The gateway or the provider is unavailable.", ErrorCode.UNAVAILABLE.value),
    (504, "The gateway timed out.", GATEWAY_TIMEOUT_CODE),
)
_ENVOY_ERRORS_ANTHROPIC: Final = (
    # The same messages with Anthropic's error types (extproc/errors.py uses the same).
    (500, "The gateway could not process the request.", "api_error"),
    (502, "The provider connection failed.", "api_error"),
    (503, "The gateway or the provider is unavailable.", "overloaded_error"),
    (504, "The gateway timed out.", "api_error"),
    (413, "%LOCAL_REPLY_BODY%", "request_too_large"),
)


def _ext_proc_config(ports: EnvoyPorts, grpc_service: dict[str, Any], *,
                     request_trailer_mode: str) -> dict[str, Any]:
    """What both ext_proc filters (router level and per attempt) share: fail closed, an
    explicit message timeout, mode overrides, and headers and bodies only on request."""
    return {
        "@type": _EXT_PROC,
        "grpc_service": grpc_service,
        "failure_mode_allow": False,
        "message_timeout": f"{ports.message_timeout_ms / 1000:g}s",
        "allow_mode_override": True,
        "processing_mode": {
            "request_header_mode": "SEND",
            "response_header_mode": "SEND",
            "request_body_mode": "NONE",
            "response_body_mode": "NONE",
            "request_trailer_mode": request_trailer_mode,
            "response_trailer_mode": "SKIP",
        },
    }


def _ext_proc_filter(ports: EnvoyPorts) -> dict[str, Any]:
    return {
        "name": "asc.ext_proc",
        "typed_config": {
            **_ext_proc_config(ports, {"envoy_grpc": {"cluster_name": EXTPROC_CLUSTER}},
                               request_trailer_mode="SEND"),
            # allow_envoy: the body reply removes client-sent x-envoy-* headers (0040).
            "mutation_rules": {"disallow_is_error": True, "allow_envoy": True},
            "metadata_options": {
                "receiving_namespaces": {"untyped": [METADATA_NAMESPACE]},
            },
            # A route's filter_metadata.asc (a mesh operator's pin) reaches the service
            # with the request headers (docs/decisions/0060-route-metadata-to-the-service.md).
            # source.address: the client's peer address for the audit record (0081).
            "request_attributes": [ROUTE_METADATA_ATTRIBUTE, SOURCE_ADDRESS_ATTRIBUTE],
            # Tells the provider's answer from Envoy's own reply after routing (0140).
            "response_attributes": [RESPONSE_CODE_DETAILS_ATTRIBUTE],
        },
    }


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _host_header(provider: Provider) -> str:
    default_port = 443 if provider.scheme == "https" else 80
    host = f"[{provider.host}]" if ":" in provider.host else provider.host
    return host if provider.port == default_port else f"{host}:{provider.port}"


def _upstream_protocol(providers: list[Provider], shape: Shape) -> str:
    """`http1`, `http2` or `auto` (ALPN) for a cluster of these providers: HTTP/2 pools
    only at the edge, only over TLS, explicit where every provider's kind speaks it."""
    if shape is not Shape.EDGE or any(p.scheme != "https" for p in providers):
        return "http1"
    return "http2" if all(p.kind in _H2_KINDS for p in providers) else "auto"


def _protocol_options(protocol: str, limits: EdgeLimits) -> dict[str, Any]:
    h2 = {
        "max_concurrent_streams": limits.max_concurrent_streams,
        # A provider connection that went silent (NAT, LB) is noticed and replaced.
        "connection_keepalive": {"interval": "30s", "timeout": "5s"},
    }
    if protocol == "http2":
        return {"explicit_http_config": {"http2_protocol_options": h2}}
    if protocol == "auto":
        return {"auto_config": {"http_protocol_options": {}, "http2_protocol_options": h2}}
    return {"explicit_http_config": {"http_protocol_options": {}}}


_ALPN: Final = {"http2": ["h2"], "auto": ["h2", "http/1.1"]}


def _provider_cluster(provider: Provider, ports: EnvoyPorts, shape: Shape,
                      limits: EdgeLimits) -> dict[str, Any]:
    protocol = _upstream_protocol([provider], shape)
    cluster: dict[str, Any] = {
        "name": provider.cluster,
        "type": "STATIC" if _is_ip(provider.host) else "STRICT_DNS",
        "connect_timeout": "5s",
        # Envoy's default connection buffer: with BUFFERED_PARTIAL any size works (0055).
        "dns_lookup_family": "V4_PREFERRED",
        "load_assignment": {
            "cluster_name": provider.cluster,
            "endpoints": [{"lb_endpoints": [{"endpoint": {
                "address": _socket(provider.host, provider.port),
                # auto_host_rewrite sends this as Host: it must carry a non-default port.
                "hostname": _host_header(provider),
            }}]}],
        },
        "typed_extension_protocol_options": {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": _HTTP_OPTIONS,
                **_protocol_options(protocol, limits),
            },
        },
    }
    if provider.scheme == "https":
        cluster["transport_socket"] = _tls_socket(provider, ports, protocol)
    return cluster


def _tls_socket(provider: Provider, ports: EnvoyPorts, protocol: str) -> dict[str, Any]:
    context: dict[str, Any] = {"validation_context": {
        "trusted_ca": {"filename": ports.trusted_ca},
        "match_typed_subject_alt_names": [
            {"san_type": "DNS", "matcher": {"exact": provider.host}},
        ],
    }}
    if protocol in _ALPN:
        context["alpn_protocols"] = _ALPN[protocol]
    return {
        "name": "envoy.transport_sockets.tls",
        "typed_config": {"@type": _TLS, "sni": provider.host, "common_tls_context": context},
    }


def _upstream_ext_proc(ports: EnvoyPorts) -> dict[str, Any]:
    """The per-attempt ext_proc: puts each attempt's deployment's key, path and body on it.

    Envoy keeps attempt 1's header mutations on attempt 2 but resets the body
    (ENVOY_FACTS.md), so the service overwrites every provider header and re-sends body
    and content-length on each attempt that changes deployment.
    """
    return {
        "name": "asc.ext_proc.upstream",
        "typed_config": {
            **_ext_proc_config(ports, {
                "envoy_grpc": {"cluster_name": EXTPROC_CLUSTER},
                "initial_metadata": [{"key": STAGE_HEADER, "value": STAGE_UPSTREAM}],
            }, request_trailer_mode="SKIP"),
            "request_attributes": ["upstream.address"],
            "mutation_rules": {"disallow_is_error": True},
            "metadata_options": {
                "forwarding_namespaces": {"untyped": [METADATA_NAMESPACE]},
            },
        },
    }


def _failover_cluster(config: GatewayConfig, name: str, chain: Chain,
                      ports: EnvoyPorts, shape: Shape, limits: EdgeLimits) -> dict[str, Any]:
    """Priority 0 is one deployment of the model, priorities 1.. other deployments of the
    same zone, in config order or in one fallback order (`failover_chains`): a retry
    moves one level down (previous_priorities) and never reaches another zone, because
    no other zone's endpoint is in the cluster."""
    settings = config.failover
    any_dns = any(not _is_ip(p.host) for _, p in chain)
    protocol = _upstream_protocol([p for _, p in chain], shape)
    endpoints = []
    socket_matches = []
    for priority, (_, provider) in enumerate(chain):
        endpoint: dict[str, Any] = {"endpoint": {
            "address": _socket(provider.host, provider.port),
            "hostname": _host_header(provider),
        }}
        if provider.scheme == "https":
            endpoint["metadata"] = {"filter_metadata": {
                "envoy.transport_socket_match": {_SOCKET_MATCH_KEY: provider.name}}}
            socket_matches.append({"name": provider.name,
                                   "match": {_SOCKET_MATCH_KEY: provider.name},
                                   "transport_socket": _tls_socket(provider, ports, protocol)})
        endpoints.append({"priority": priority, "lb_endpoints": [endpoint]})
    cluster: dict[str, Any] = {
        "name": name,
        "type": "STRICT_DNS" if any_dns else "STATIC",
        "connect_timeout": "5s",
        # Envoy's default connection buffer, like the provider clusters (0055).
        "dns_lookup_family": "V4_PREFERRED",
        "load_assignment": {"cluster_name": name, "endpoints": endpoints},
        "outlier_detection": _outlier_detection(settings),
        "circuit_breakers": {"thresholds": [{
            "priority": "DEFAULT",
            "retry_budget": {
                "budget_percent": {"value": float(settings.retry_budget_percent)},
                "min_retry_concurrency": settings.min_retry_concurrency,
            },
        }]},
        "typed_extension_protocol_options": {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": _HTTP_OPTIONS,
                **_protocol_options(protocol, limits),
                "http_filters": [
                    _upstream_ext_proc(ports),
                    _upstream_codec_filter(),
                ],
            },
        },
    }
    if socket_matches:
        cluster["transport_socket_matches"] = socket_matches
    return cluster


def _outlier_detection(settings: FailoverSettings) -> dict[str, Any]:
    """Eject a deployment after consecutive 5xx/resets; with one host per priority level,
    an ejected level sends its traffic to the next (max_ejection_percent 100)."""
    return {
        "consecutive_5xx": settings.outlier_consecutive_errors,
        "consecutive_gateway_failure": settings.outlier_consecutive_errors,
        "interval": "1s",
        "base_ejection_time": f"{settings.outlier_ejection_s}s",
        "max_ejection_percent": 100,
        "enforcing_consecutive_5xx": 100,
        "enforcing_consecutive_gateway_failure": 100,
        "enforcing_success_rate": 0,
    }


def _retry_policy(settings: FailoverSettings) -> dict[str, Any]:
    """Envoy retries a 5xx, 429, 529, 401/403 (a canary key version; the retry carries
    the active one), a reset, a refused connection and a silent attempt, each on the next
    priority level (the next deployment of the zone). How many retries a request gets is
    the service's per-request `x-envoy-max-retries` (docs/routing.md, Failover)."""
    return {
        "retry_on": "5xx,reset,connect-failure,retriable-status-codes",
        "retriable_status_codes": [429, 529, 401, 403],
        # The service sets x-envoy-max-retries on every request it routes (the zone's
        # other deployments, bounded by failover.max_attempts); without it, no retry.
        "num_retries": 0,
        "per_try_idle_timeout": f"{settings.first_byte_timeout_ms / 1000:g}s",
        # The next attempt goes to another deployment: waiting helps nobody.
        "retry_back_off": {"base_interval": "0.005s", "max_interval": "0.02s"},
        "retry_priority": {
            "name": "envoy.retry_priorities.previous_priorities",
            "typed_config": {"@type": _PREVIOUS_PRIORITIES, "update_frequency": 1},
        },
    }


def _extproc_http2(ports: EnvoyPorts) -> dict[str, Any]:
    if ports.extproc_streams_per_connection is None:
        return {}
    return {"max_concurrent_streams": ports.extproc_streams_per_connection}


def _extproc_cluster(ports: EnvoyPorts) -> dict[str, Any]:
    """The service, over TCP or over its Unix socket(s).

    Both ext_proc filters use `envoy_grpc` to this cluster: a STATIC cluster accepts
    `pipe` endpoints, so a sidecar needs no other gRPC client (decision 0090). With one
    socket per worker, Envoy health-checks each (gRPC health) so a worker that died and
    waits for its restart gets no streams meanwhile.
    """
    if ports.extproc_socket is None:
        addresses = [_socket(ports.extproc_address, ports.extproc_port)]
    else:
        addresses = [{"pipe": {"path": path}}
                     for path in worker_socket_paths(ports.extproc_socket, ports.extproc_workers)]
    cluster: dict[str, Any] = {
        "name": EXTPROC_CLUSTER,
        "type": "STATIC",
        "connect_timeout": "1s",
        "load_assignment": {
            "cluster_name": EXTPROC_CLUSTER,
            "endpoints": [{"lb_endpoints": [
                {"endpoint": {"address": address}} for address in addresses]}],
        },
        "typed_extension_protocol_options": {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": _HTTP_OPTIONS,
                "explicit_http_config": {"http2_protocol_options": _extproc_http2(ports)},
            },
        },
    }
    if len(addresses) > 1:
        cluster["lb_policy"] = "LEAST_REQUEST"
        cluster["health_checks"] = [{
            "timeout": "1s",
            "interval": "2s",
            "unhealthy_threshold": 1,
            "healthy_threshold": 1,
            "grpc_health_check": {"service_name": _HEALTH_SERVICE},
        }]
    return cluster


def _edge_http_options(limits: EdgeLimits) -> dict[str, Any]:
    """HCM settings of the edge shape: bounded header wait, idle streams and connections,
    HTTP/2 stream limits, and the paths normalised before anything matches on them."""
    return {
        "request_headers_timeout": f"{limits.request_headers_timeout_s}s",
        "stream_idle_timeout": f"{limits.stream_idle_timeout_s}s",
        "common_http_protocol_options": {
            "idle_timeout": f"{limits.connection_idle_timeout_s}s",
            "headers_with_underscores_action": "REJECT_REQUEST",
        },
        "http2_protocol_options": {
            "max_concurrent_streams": limits.max_concurrent_streams,
            "initial_stream_window_size": 65536,
            "initial_connection_window_size": 1048576,
        },
        "normalize_path": True,
        "merge_slashes": True,
    }


def _overload_manager(limits: EdgeLimits) -> dict[str, Any]:
    """Envoy refuses connections above the limit (and stops warning that none is set)."""
    return {"resource_monitors": [{
        "name": "envoy.resource_monitors.global_downstream_max_connections",
        "typed_config": {
            "@type": _DOWNSTREAM_CONNECTIONS,
            "max_active_downstream_connections": limits.max_downstream_connections,
        },
    }]}


class ShapeError(ValueError):
    """A shape rendered without what it needs (e.g. a sidecar without its sockets)."""


def _check_shape(shape: Shape, ports: EnvoyPorts, edge: EdgeLimits) -> None:
    if shape is Shape.SIDECAR and (ports.extproc_socket is None or ports.admin_socket is None):
        raise ShapeError("the sidecar shape needs the service's Unix socket (extproc_socket)"
                         " and an admin socket (admin_socket)")
    if ports.extproc_workers < 1:
        raise ShapeError("extproc_workers must be at least 1")
    if shape is Shape.EDGE and min(edge.max_downstream_connections, edge.max_concurrent_streams,
                                   edge.request_headers_timeout_s, edge.stream_idle_timeout_s,
                                   edge.connection_idle_timeout_s) < 1:
        raise ShapeError("edge limits must be at least 1")


def render_bootstrap(config: GatewayConfig, ports: EnvoyPorts, *, shape: Shape = Shape.FRONT,
                     edge: EdgeLimits = EdgeLimits(),
                     identity: IdentityEnvoy | None = None) -> dict[str, Any]:
    """The Envoy bootstrap of `shape` as plain data, ready for `yaml.safe_dump`; `edge`
    applies to the edge shape only; `identity` adds the pieces of the jwt and mesh identity
    sources (extproc/envoy_identity.py)."""
    _check_shape(shape, ports, edge)
    # config validation guarantees that providers sharing a cluster share its upstream.
    clusters = {p.cluster: _provider_cluster(p, ports, shape, edge)
                for p in config.providers.values()}
    extproc_cluster = _extproc_cluster(ports)
    route_action: dict[str, Any] = {
        "cluster_header": CLUSTER_HEADER,
        "auto_host_rewrite": True,
        "timeout": f"{ports.route_timeout_s}s",
    }
    failover_clusters: list[dict[str, Any]] = []
    if config.failover.max_attempts > 1:
        failover_clusters = [
            _failover_cluster(config, name, chain, ports, shape, edge)
            for model in config.models.values()
            for deployment in model.deployments
            if has_failover_cluster(config, model, deployment)
            for name, chain in failover_chains(config, model, deployment)
        ]
    if failover_clusters:
        route_action["retry_policy"] = _retry_policy(config.failover)
    route = {
        "match": {"prefix": "/"},
        "request_headers_to_remove": [CLUSTER_HEADER],
        "route": route_action,
    }
    hcm = {
        "@type": _HCM,
        "stat_prefix": "asc",
        "codec_type": "AUTO",
        "use_remote_address": True,
        "access_log": _access_log(),
        "local_reply_config": _local_reply_config(),
        "route_config": {
            "name": "asc",
            "internal_only_headers": [CLUSTER_HEADER],
            "virtual_hosts": [{
                "name": "asc",
                "domains": ["*"],
                "include_request_attempt_count": True,
                "request_body_buffer_limit": config.limits.max_body_bytes + _BUFFER_SLACK,
                "routes": [route],
            }],
        },
        "http_filters": [
            _ext_proc_filter(ports),
            {"name": "envoy.filters.http.router", "typed_config": {"@type": _ROUTER}},
        ],
    }
    door_clusters: list[dict[str, Any]] = []
    if config.fast_path.rendered:
        _with_fast_path(config, ports, hcm, door_clusters)
    if shape is Shape.EDGE:
        hcm.update(_edge_http_options(edge))
    bootstrap: dict[str, Any] = {}
    if ports.admin_socket is not None:
        bootstrap["admin"] = {"address": admin_address(ports.admin_socket)}
    if shape is Shape.EDGE:
        bootstrap["overload_manager"] = _overload_manager(edge)
    bootstrap["static_resources"] = {
        "listeners": [{
            "name": "asc_ingress",
            "address": _socket(ports.listen_address, ports.listen_port),
            # Fail to start on a busy port instead of sharing it with another process.
            "enable_reuse_port": False,
            # The response buffer: a non-streamed answer (BUFFERED_PARTIAL) reaches the
            # service whole up to this size, and its first part above it (answered 502,
            # docs/decisions/0055-oversized-answer-buffered-partial.md).
            "per_connection_buffer_limit_bytes": config.limits.max_response_bytes,
            "filter_chains": [{"filters": [{
                "name": "envoy.filters.network.http_connection_manager",
                "typed_config": hcm,
            }]}],
        }],
        "clusters": [extproc_cluster, *door_clusters, *clusters.values(),
                     *failover_clusters],
    }
    if identity is not None:
        apply_identity(bootstrap, identity)
    check_typed(bootstrap)
    return bootstrap


class BootstrapError(ValueError):
    """The rendered bootstrap does not parse as Envoy's own config types: a bug here."""


def check_typed(bootstrap: dict[str, Any]) -> None:
    """Parse the bootstrap into Envoy's protobuf types (xds-protos, already on the hot
    path), so a misspelt field, a wrong enum value or an unknown `@type` fails at render
    time instead of when Envoy starts. Range and required-field rules (PGV) are Envoy's
    own: tests run `envoy --mode validate` on every rendered file. Decision 0054 says why
    this replaced envoy-data-plane.
    """
    try:
        json_format.ParseDict(bootstrap, bootstrap_pb2.Bootstrap())
    except json_format.ParseError as exc:
        raise BootstrapError(f"rendered Envoy bootstrap is invalid: {exc}") from None


def admin_address(path: str) -> dict[str, Any]:
    """A Unix socket only its owner may open: TCP admin has no authentication, and any
    local process could turn on debug logging (which prints provider keys) or quit Envoy."""
    return {"pipe": {"path": path, "mode": ADMIN_SOCKET_MODE}}


def render_yaml(config: GatewayConfig, ports: EnvoyPorts, *, shape: Shape = Shape.FRONT,
                edge: EdgeLimits = EdgeLimits(), command: str | None = None,
                identity: IdentityEnvoy | None = None) -> str:
    """The bootstrap as YAML; `command`, the render command line that produced it, goes
    in a comment at the top so a committed file says how to regenerate it."""
    header = (
        "# Rendered by `extproc envoy render` from the gateway config; do not edit by hand.\n"
    )
    if command is not None:
        header += f"# Regenerate: {command}\n"
    bootstrap = render_bootstrap(config, ports, shape=shape, edge=edge, identity=identity)
    return header + bootstrap_yaml(bootstrap)


class _EnvoyYamlDumper(yaml.SafeDumper):
    """Quotes the strings Envoy's YAML reader (YAML 1.1 style) takes for booleans: PyYAML
    writes `n` and `y` bare, and Envoy then reads json_to_metadata's selector `n` as
    false (measured)."""


def _quoted_str(dumper: yaml.SafeDumper, value: str) -> yaml.Node:
    style = "'" if value.lower() in ("y", "n") else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_EnvoyYamlDumper.add_representer(str, _quoted_str)


def bootstrap_yaml(bootstrap: dict[str, Any]) -> str:
    """A rendered bootstrap as YAML Envoy reads back exactly."""
    return yaml.dump(bootstrap, Dumper=_EnvoyYamlDumper, sort_keys=False)


# -- the fast path (docs/decisions/0120-0123) -------------------------------------------

FAST_USAGE_NAMESPACE: Final = "asc.usage"
"""Where Envoy's Lua filter puts the provider's token counts (JSON and SSE answers); the
access-log service reads them from there."""
_LUA: Final = "type.googleapis.com/envoy.extensions.filters.http.lua.v3.Lua"
_HTTP_GRPC_LOG: Final = (
    "type.googleapis.com/envoy.extensions.access_loggers.grpc.v3.HttpGrpcAccessLogConfig")
USAGE_FIELDS: Final = (
    "prompt_tokens", "completion_tokens", "cached_tokens", "audio_tokens",
    "input_tokens", "output_tokens", "cache_read_input_tokens",
    "cache_creation_input_tokens", "web_search_requests",
)
"""Usage counts the Lua filter copies out of fast-path answers, under their providers' own
names (OpenAI and Anthropic shapes); `extproc.fastpath` turns them into a `Usage`."""


_LUA_FAST_ANSWER: Final = """
-- The fast path's answer, in Envoy (docs/decisions/0122, 0124): on a request the fast
-- door let through (metadata asc.fast), read the usage of the answer (JSON or SSE) chunk
-- by chunk as it passes: nothing is held back, nothing goes to ext_proc, any size works.
-- (The provider's account headers are gone already: asc.fast_answer_headers, decision
-- 0143.) A count split across two chunks is found in the overlap kept from the previous
-- one; the last value of a name wins (Anthropic's final message_delta carries the
-- cumulative output_tokens). A JSON string cannot hold an unescaped quote, so a name in
-- quotes followed by a colon and digits is a key of the answer, never text the model
-- wrote. Every other request returns at once.
local NAMES = {%(names)s}
local MARKS = {%(marks)s}
local FALLBACK = {openai = %(fallback_openai)s, anthropic = %(fallback_anthropic)s}
-- An in-stream error (decision 0138). Its first mark past `seen` (the overlap already
-- looked at): an "error" key, or an `event: error` line, where the event starts.
local function error_mark(text, seen)
  local first = nil
  for skip, pattern in ipairs({'"error"%%s*:', '\\nevent: ?error%%f[^%%w_]'}) do
    local s, e = string.find(text, pattern)
    while s ~= nil and e <= seen do
      s, e = string.find(text, pattern, e + 1)
    end
    if s ~= nil and (first == nil or s + skip - 1 < first) then first = s + skip - 1 end
  end
  if first == nil and seen == 0 and string.find(text, '^event: ?error%%f[^%%w_]') then
    first = 1
  end
  return first
end
-- The event the client gets instead (a chunk cannot wait for the door here: a chunk
-- object dies when the script yields, measured): the provider's `type` and `code` when
-- they are short words, and a fixed message (the provider's may name the account).
local function error_event(event, dialect)
  local name = string.match(event, '^event: ?([%%w_]+)')
  local fields = '"message":"%(stream_message)s"'
  local _, open = string.find(event, '"error"%%s*:%%s*{')
  if open ~= nil then
    for _, key in ipairs({"type", "code"}) do
      local value = string.match(event, '"' .. key .. '"%%s*:%%s*"([%%w_%%.%%-]+)"', open)
      if value ~= nil and #value <= 64 then
        fields = fields .. ',"' .. key .. '":"' .. value .. '"'
      end
    end
  end
  local data = dialect == "anthropic" and '{"type":"error","error":{' .. fields .. '}}'
    or '{"error":{' .. fields .. '}}'
  return (name ~= nil and "event: " .. name .. "\\n" or "") .. "data: " .. data .. "\\n\\n"
end
function envoy_on_response(handle)
  local metadata = handle:streamInfo():dynamicMetadata()
  local asc = metadata:get("asc")
  if asc == nil or asc["fast"] ~= true then
    return
  end
  local headers = handle:headers()
  local dialect = asc["dialect"] == "anthropic" and "anthropic" or "openai"
  local status = tonumber(headers:get(":status")) or 0
  if status >= 400 and headers:get("x-envoy-upstream-service-time") ~= nil then
    -- The provider's error: mapped and scrubbed by the door as on the full path (it may
    -- name the shared account, or quote part of the key). Bounded by Envoy's buffer.
    -- Envoy's own replies (no answer, a reset, a timeout) carry no upstream service time:
    -- they keep the local_reply_config text (decision 0136).
    local body = handle:body(true)
    local sent = body:getBytes(0, body:length())
    local reply, mapped = handle:httpCall("%(door)s", {
      [":method"] = "POST", [":path"] = "%(error_path)s", [":authority"] = "asc-fast-door",
      ["%(status_header)s"] = tostring(status), ["%(dialect_header)s"] = dialect,
      ["content-type"] = "application/json"}, sent, %(timeout_ms)d)
    local code, text = "502", FALLBACK[dialect]
    if reply ~= nil and reply[":status"] == "200" and reply["%(status_header)s"] ~= nil then
      code, text = reply["%(status_header)s"], mapped
    end
    local answer = handle:headers()
    answer:replace(":status", code)
    answer:replace("content-type", "application/json")
    answer:replace("content-length", tostring(#text))
    handle:body(true):setBytes(text)
    handle:streamInfo():dynamicMetadata():set("%(answer_ns)s", "provider_status", status)
    return
  end
  local found = {}
  local tail = ""
  local skipping = false
  -- A line the chunk's end cut (an event split by the network): kept back until the
  -- chunk that ends it, so an error mark in it is seen with its event's start. A client
  -- cannot read half a line; an unended last line is dropped, as an SSE client drops it.
  local held = ""
  -- Only a provider's event stream has in-stream errors (an Envoy local reply is JSON
  -- with a content-length).
  local events = string.find(headers:get("content-type") or "", "text/event-stream", 1, true)
  for chunk in handle:bodyChunks() do
    local bytes = chunk:getBytes(0, chunk:length())
    local changed = false
    if skipping then
      -- The rest of an error event already replaced: never the client's.
      local stop = string.find(bytes, "\\n\\n", 1, true)
      skipping = stop == nil
      bytes = skipping and "" or string.sub(bytes, stop + 2)
      changed = true
    end
    if held ~= "" then
      bytes, held, changed = held .. bytes, "", true
    end
    local text = tail .. bytes
    -- Every name ends in one of MARKS: a chunk without any (most of a stream) is not
    -- scanned (the overlap kept from the previous chunk still catches a split name).
    -- No name starts more than its own length before the first mark, so each is looked
    -- for as a plain string from there (a pattern over the whole text cost Envoy 3 times
    -- as many instructions, decision 0143).
    local first = nil
    for _, mark in ipairs(MARKS) do
      local at = string.find(text, mark, 1, true)
      if at ~= nil and (first == nil or at < first) then first = at end
    end
    if first ~= nil then
      local from = math.max(1, first - %(name_reach)d)
      for name, quoted in pairs(NAMES) do
        local _, e = string.find(text, quoted, from, true)
        while e ~= nil do
          local value = string.match(text, '^%%s*:%%s*(%%d+)', e + 1)
          if value ~= nil then found[name] = value end
          _, e = string.find(text, quoted, e + 1, true)
        end
      end
    end
    -- In-stream errors: each from its event's start to its end, replaced (error_event);
    -- an event that goes on in the next chunks is dropped up to its end.
    -- (A plain search first: most chunks hold no "error" at all.)
    local at = events and string.find(text, "error", 1, true) and error_mark(text, #tail)
    if at then
      local pieces, next = {}, #tail + 1
      while at ~= nil do
        local start = 1
        local blank = string.find(text, "\\n\\n", 1, true)
        while blank ~= nil and blank + 1 < at do
          start = blank + 2
          blank = string.find(text, "\\n\\n", start, true)
        end
        local stop = string.find(text, "\\n\\n", at, true)
        local scrubbed = error_event(string.sub(text, start, stop and stop + 1 or #text),
                                     dialect)
        if start <= #tail then  -- the event began in a chunk already passed on
          local head = string.sub(text, start, #tail)
          scrubbed = string.sub(scrubbed, 1, #head) == head
            and string.sub(scrubbed, #head + 1) or "\\n\\n" .. scrubbed
        else
          pieces[#pieces + 1] = string.sub(text, next, start - 1)
        end
        pieces[#pieces + 1] = scrubbed
        if stop == nil then
          skipping, next = true, #text + 1
          break
        end
        next = stop + 2
        at = error_mark(text, stop + 1)
      end
      pieces[#pieces + 1] = string.sub(text, next)
      bytes, changed = table.concat(pieces), true
    end
    if events and string.byte(bytes, -1) ~= 10 then  -- ends inside a line
      local cut = string.find(bytes, "\\n[^\\n]*$")
      local keep = cut and #bytes - cut or #bytes
      if keep > 0 and keep <= %(hold_max)d then
        held, bytes, changed = string.sub(bytes, -keep), string.sub(bytes, 1, -keep - 1), true
      end
    end
    if changed then
      chunk:setBytes(bytes)
      text = tail .. bytes
    end
    tail = string.sub(text, -160)
  end
  -- Objects taken before the chunks yielded are out of scope now (measured): ask again.
  local after = handle:streamInfo():dynamicMetadata()
  for name, value in pairs(found) do
    after:set("%(usage_ns)s", name, tonumber(value))
  end
end
"""

def _usage_marks() -> list[str]:
    """What every usage name ends with, closing quote included (`_tokens"`): the Lua
    filter scans a chunk for names only when one of these is in it."""
    return sorted({"_" + name.rsplit("_", 1)[1] + '"' for name in USAGE_FIELDS})


_HELD_LINE_MAX_BYTES: Final = 65_536
"""The longest cut line of a fast-path event stream the Lua filter keeps back until its
end (a longer one passes as it comes, as before decision 0142)."""
_DOOR_UNREACHABLE: Final = "The provider failed."
"""A fast answer's provider error when the door could not map it (Envoy's Lua filter)."""


def fast_path_lua_usage_filter(timeout_ms: int = 2000) -> dict[str, Any]:
    """The Lua filter that finishes a fast-path answer in Envoy (see `_LUA_FAST_ANSWER`);
    `timeout_ms` bounds its call to the door for a provider error."""
    fallback = {dialect: error_body(GatewayError(ErrorCode.PROVIDER_ERROR, _DOOR_UNREACHABLE),
                                    dialect).decode() for dialect in Dialect}
    source = _LUA_FAST_ANSWER % {
        "names": ", ".join(f"{name} = '\"{name}\"'" for name in USAGE_FIELDS),
        "marks": ", ".join(f"'{mark}'" for mark in _usage_marks()),
        "name_reach": max(len(name) for name in USAGE_FIELDS) + 2,
        "usage_ns": FAST_USAGE_NAMESPACE,
        "fallback_openai": f"[==[{fallback[Dialect.OPENAI]}]==]",
        "fallback_anthropic": f"[==[{fallback[Dialect.ANTHROPIC]}]==]",
        "stream_message": STREAM_ERROR_FALLBACK,
        "hold_max": _HELD_LINE_MAX_BYTES,
        "door": FAST_DOOR_CLUSTER, "error_path": DOOR_ERROR_PATH,
        "status_header": DOOR_STATUS_HEADER, "dialect_header": DOOR_DIALECT_HEADER,
        "answer_ns": ANSWER_NAMESPACE, "timeout_ms": timeout_ms,
    }
    return {
        "name": "envoy.filters.http.lua",
        "typed_config": {"@type": _LUA, "default_source_code": {"inline_string": source}},
    }


def _fast_path_access_log(config: GatewayConfig) -> dict[str, Any]:
    """Finished fast-path requests, in batches, to the service (extproc/usage_log.py)."""
    return {
        "name": "envoy.access_loggers.http_grpc",
        "filter": {"metadata_filter": {
            "matcher": {"filter": METADATA_NAMESPACE, "path": [{"key": "fast"}],
                        "value": {"bool_match": True}},
            "match_if_key_not_found": False,
        }},
        "typed_config": {
            "@type": _HTTP_GRPC_LOG,
            "additional_response_headers_to_log": [RETRY_AFTER],
            "common_config": {
                "log_name": "asc_fast_path",
                "grpc_service": {"envoy_grpc": {"cluster_name": EXTPROC_CLUSTER}},
                "transport_api_version": "V3",
                "buffer_flush_interval": f"{config.fast_path.flush_interval_ms / 1000:g}s",
            },
        },
    }


_EXT_AUTHZ: Final = "type.googleapis.com/envoy.extensions.filters.http.ext_authz.v3.ExtAuthz"
_HEADER_MUTATION: Final = (
    "type.googleapis.com/envoy.extensions.filters.http.header_mutation.v3.HeaderMutation")
ORIGINAL_PATH_HEADER: Final = "x-envoy-original-path"
_HEADER_MUTATION_PER_ROUTE: Final = (
    "type.googleapis.com/envoy.extensions.filters.http.header_mutation.v3.HeaderMutationPerRoute")
_HEADER_TO_METADATA: Final = (
    "type.googleapis.com/envoy.extensions.filters.http.header_to_metadata.v3.Config")
_EXT_PROC_PER_ROUTE: Final = (
    "type.googleapis.com/envoy.extensions.filters.http.ext_proc.v3.ExtProcPerRoute")
FAST_DOOR_CLUSTER: Final = "asc_fast_door"
FAST_DOOR_FILTER: Final = "asc.fast_door"
_AUTHZ_NAMESPACE: Final = "envoy.filters.http.ext_authz"
_ANSWER_HEADERS: Final = ("x-asc-request-id", "x-asc-provider", "x-asc-region",
                          "x-asc-credential", "x-asc-budget-remaining-usd",
                          "x-asc-route-reason")
"""The `x-asc-*` answer headers the fast door knows when it decides (`_tag_headers`)."""
_META_TYPES: Final = {MetaKind.STRING: "STRING", MetaKind.NUMBER: "NUMBER",
                      MetaKind.BOOL: "PROTOBUF_VALUE"}


def fast_door_socket(extproc_socket: str) -> str:
    """The fast door's Unix socket beside the service's (`extproc serve` uses the same)."""
    return extproc_socket + ".door"


def _exact(*names: str) -> list[dict[str, str]]:
    return [{"exact": name} for name in names]


def fast_door_filter(config: GatewayConfig, ports: EnvoyPorts) -> dict[str, Any]:
    """Envoy's ext_authz over HTTP/1.1 to the service's fast door (extproc.fastdoor):
    the request line, every client header and the whole body go there; its answer sets
    the key, the cluster and the `asc` metadata headers, removes what it names
    (`x-envoy-auth-headers-to-remove`), or refuses. Fails closed (503)."""
    auth_headers = sorted({AUTH_HEADER[backend][0] for backend in FAST_BACKEND_PATHS})
    return {
        "name": FAST_DOOR_FILTER,
        "typed_config": {
            "@type": _EXT_AUTHZ,
            "failure_mode_allow": False,
            "status_on_error": {"code": 503},
            # The route is chosen again with the headers the door set (x-asc-path).
            "clear_route_cache": True,
            # The door sees at most this much of the body and never decides a cut one
            # (the full path answers its 413). allow_partial_message: with `false` the
            # filter caps the stream's buffer at this size, and full-path answers over
            # 1 MiB were 502 (measured, decision 0136).
            "with_request_body": {
                "max_request_bytes": config.limits.max_body_bytes + _BUFFER_SLACK,
                "allow_partial_message": True,
            },
            "allowed_headers": {"patterns": [{"safe_regex": {"regex": ".*"}}]},
            "http_service": {
                "server_uri": {
                    "uri": "http://asc-fast-door",
                    "cluster": FAST_DOOR_CLUSTER,
                    "timeout": f"{ports.message_timeout_ms / 1000:g}s",
                },
                "authorization_response": {
                    "allowed_upstream_headers": {"patterns": [
                        *_exact(CLUSTER_HEADER, DOOR_PATH_HEADER, "anthropic-version",
                                *auth_headers),
                        {"prefix": META_PREFIX}]},
                    "allowed_client_headers": {"patterns": [
                        *_exact("content-type", "retry-after", *_ANSWER_HEADERS),
                        {"prefix": "x-ratelimit-"}]},
                    "allowed_client_headers_on_success": {"patterns": [
                        *_exact(*_ANSWER_HEADERS), {"prefix": "x-ratelimit-"}]},
                    # A refusal's `error` marks it as the gateway's own answer for the
                    # local-reply mappers (`_local_reply_config`).
                    "dynamic_metadata_from_headers": {"patterns": _exact(
                        META_PREFIX + "error")},
                },
            },
        },
    }


FAST_METADATA_FILTER: Final = "asc.fast_metadata"


def fast_metadata_filter() -> dict[str, Any]:
    """Envoy's header_to_metadata filter, with no rules of its own: they are the fast
    routes' (`fast_metadata_rules`), so only a request the door routed there has its
    `x-asc-meta-*` headers turned into metadata. On any other route (the door switched off
    by an operator, say) a client's forged ones are not taken."""
    return {"name": FAST_METADATA_FILTER,
            "typed_config": {"@type": _HEADER_TO_METADATA}}


def fast_metadata_rules() -> dict[str, Any]:
    """Moves the door's `x-asc-meta-*` request headers into `asc` dynamic metadata (typed:
    bools arrive as base64 protobuf Values) and off the request."""
    rules = []
    for key, kind in FAST_METADATA.items():
        target: dict[str, Any] = {"metadata_namespace": METADATA_NAMESPACE, "key": key,
                                  "type": _META_TYPES[kind]}
        if kind is MetaKind.BOOL:
            target["encode"] = "BASE64"
        rules.append({"header": META_PREFIX + key, "on_header_present": target,
                      "remove": True})
    return {"@type": _HEADER_TO_METADATA, "request_rules": rules}


def _fast_door_cluster(ports: EnvoyPorts) -> dict[str, Any]:
    """The fast door over TCP or its Unix socket(s), HTTP/1.1 with kept-alive connections
    (Envoy opens one per concurrent check, so worker processes share them)."""
    if ports.extproc_socket is None:
        addresses = [_socket(ports.extproc_address,
                             ports.fast_door_port or ports.extproc_port + 1)]
    else:
        addresses = [{"pipe": {"path": fast_door_socket(path)}} for path in
                     worker_socket_paths(ports.extproc_socket, ports.extproc_workers)]
    cluster: dict[str, Any] = {
        "name": FAST_DOOR_CLUSTER,
        "type": "STATIC",
        "connect_timeout": "1s",
        "load_assignment": {
            "cluster_name": FAST_DOOR_CLUSTER,
            "endpoints": [{"lb_endpoints": [
                {"endpoint": {"address": address}} for address in addresses]}],
        },
    }
    if len(addresses) > 1:
        cluster["lb_policy"] = "LEAST_REQUEST"
        cluster["health_checks"] = [{
            "timeout": "1s", "interval": "2s", "unhealthy_threshold": 1,
            "healthy_threshold": 1, "http_health_check": {"path": DOOR_HEALTH_PATH},
        }]
    return cluster


def _fast_routes(config: GatewayConfig, route_action: dict[str, Any]) -> list[dict[str, Any]]:
    """One route per (cluster, provider path) a fast request can take: it matches the
    door's `x-asc-path` and `x-asc-cluster`, rewrites `:path`, and switches ext_proc off
    (its per-route config is read after the door cleared the route cache: measured)."""
    targets = dict.fromkeys(
        (provider.cluster, provider.path_prefix + FAST_BACKEND_PATHS[Backend(provider.kind)])
        for provider in config.providers.values()
        if Backend(provider.kind) in FAST_BACKEND_PATHS)
    action = {key: value for key, value in route_action.items() if key != "cluster_header"}
    return [{
        "match": {"prefix": "/", "headers": [
            {"name": DOOR_PATH_HEADER, "string_match": {"exact": path}},
            {"name": CLUSTER_HEADER, "string_match": {"exact": cluster}}]},
        "request_headers_to_remove": [CLUSTER_HEADER, DOOR_PATH_HEADER],
        "route": {**action, "cluster": cluster,
                  "regex_rewrite": {"pattern": {"regex": "^.*$"}, "substitution": path}},
        "typed_per_filter_config": {
            "asc.ext_proc": {"@type": _EXT_PROC_PER_ROUTE, "disabled": True},
            FAST_METADATA_FILTER: fast_metadata_rules(),
            FAST_ANSWER_HEADERS_FILTER: _fast_answer_header_removals(),
        },
    } for cluster, path in targets]


FAST_ANSWER_HEADERS_FILTER: Final = "asc.fast_answer_headers"


def fast_answer_headers_filter() -> dict[str, Any]:
    """Envoy's header_mutation filter, with no mutations of its own: they are the fast
    routes' (`_fast_answer_header_removals`). Placed after the fast answer's Lua filter,
    so the provider's response reaches it first (decision 0143)."""
    return {"name": FAST_ANSWER_HEADERS_FILTER,
            "typed_config": {"@type": _HEADER_MUTATION, "mutations": {}}}


def _fast_answer_header_removals() -> dict[str, Any]:
    """A fast answer's provider account headers (`translate.headers.ACCOUNT_HEADERS` and
    the `ACCOUNT_PREFIXES` families) removed before the client gets it, as ext_proc removes
    them on the full path. The gateway's own `x-ratelimit-*` budget headers are put on
    later, by the fast door's ext_authz filter (earlier in the chain, so later on the
    response)."""
    removals: list[dict[str, Any]] = [{"remove": name} for name in sorted(ACCOUNT_HEADERS)]
    removals += [{"remove_on_match": {"key_matcher": {"prefix": prefix}}}
                 for prefix in ACCOUNT_PREFIXES]
    return {"@type": _HEADER_MUTATION_PER_ROUTE,
            "mutations": {"response_mutations": removals}}


_LUA_ROUTE_METADATA: Final = """
-- Before the fast door (decision 0136): a route that carries `asc` metadata (a pin,
-- identity sources, a guardrail profile) is marked for the door, which cannot read route
-- metadata and sends the request on to ext_proc. This filter is named `asc`, so its
-- handle:metadata() is the route's `filter_metadata.asc` (measured).
function envoy_on_request(handle)
  for _ in pairs(handle:metadata()) do
    handle:headers():replace("%(header)s", "1")
    return
  end
end
"""


def fast_route_metadata_filter() -> dict[str, Any]:
    """The Lua filter that tells the door a route has `asc` metadata (see above)."""
    return {
        "name": METADATA_NAMESPACE,
        "typed_config": {"@type": _LUA, "default_source_code": {
            "inline_string": _LUA_ROUTE_METADATA % {"header": ROUTE_METADATA_HEADER}}},
    }


def _fast_upstream_filters() -> list[dict[str, Any]]:
    """The router's upstream filters with the fast path: Envoy adds `x-envoy-original-path`
    (the client's path) when a fast route rewrites `:path`, after the route's own header
    removals (measured); an upstream filter runs after that and takes it off, so the
    provider's request carries what the full path's does. Provider clusters with filters
    of their own (failover) keep theirs; fast requests never go there."""
    return [
        {"name": "asc.fast_upstream_headers", "typed_config": {
            "@type": _HEADER_MUTATION,
            "mutations": {"request_mutations": [{"remove": ORIGINAL_PATH_HEADER}]}}},
        _upstream_codec_filter(),
    ]


def _with_fast_path(config: GatewayConfig, ports: EnvoyPorts, hcm: dict[str, Any],
                    clusters: list[dict[str, Any]]) -> None:
    """Add the fast path's Envoy pieces around the router-level ext_proc (in place)."""
    filters: list[dict[str, Any]] = hcm["http_filters"]
    ext_proc_filter = next(f for f in filters if f["name"] == "asc.ext_proc")
    at = filters.index(ext_proc_filter)
    hcm["http_filters"] = [*filters[:at], fast_route_metadata_filter(),
                           fast_door_filter(config, ports),
                           fast_metadata_filter(), ext_proc_filter,
                           fast_path_lua_usage_filter(ports.message_timeout_ms),
                           fast_answer_headers_filter(),
                           *filters[at + 1:]]
    hcm["access_log"] = [*hcm["access_log"], _fast_path_access_log(config)]
    router = next(f for f in hcm["http_filters"] if f["name"] == "envoy.filters.http.router")
    router["typed_config"]["upstream_http_filters"] = _fast_upstream_filters()
    host = hcm["route_config"]["virtual_hosts"][0]
    default = host["routes"][-1]
    default["request_headers_to_remove"] = [*default["request_headers_to_remove"],
                                            DOOR_PATH_HEADER]
    host["routes"] = [*_fast_routes(config, default["route"]), *host["routes"]]
    hcm["local_reply_config"]["mappers"].insert(0, _own_reply_mapper(
        META_PREFIX + "error", namespace=_AUTHZ_NAMESPACE))
    clusters.append(_fast_door_cluster(ports))
