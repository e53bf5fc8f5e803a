"""The rendered Envoy bootstrap (`extproc.envoy_bootstrap`): the safety-critical settings."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml

from extproc.config import GatewayConfig, load_config, parse_config
from extproc.envoy_bootstrap import (
    BootstrapError,
    EnvoyPorts,
    check_typed,
    render_bootstrap,
    render_yaml,
)

REPO_ROOT = Path(__file__).resolve().parents[2]
DEMO_CONFIG = REPO_ROOT / "deploy" / "demo" / "asc.yaml"
HASH = "hmac-sha256:v1:" + "c" * 64


def providers_config(providers: str, *, max_body_bytes: int = 1024) -> GatewayConfig:
    """A minimal config around the given `providers:` block (one model on the first)."""
    first = providers.strip().split(":", 1)[0]
    return parse_config(f"""\
version: 1
auth: {{pepper: {{env: ASC_PEPPER}}}}
limits: {{max_body_bytes: {max_body_bytes}}}
providers:
{providers}
models:
  m:
    price: {{input_per_mtok: 1, output_per_mtok: 1}}
    deployments: [{{provider: {first}}}]
tenants:
  t:
    keys: [{{id: k, hash: "{HASH}"}}]
    models: [m]
""")


def hcm(bootstrap: dict[str, Any]) -> dict[str, Any]:
    [listener] = bootstrap["static_resources"]["listeners"]
    [chain] = listener["filter_chains"]
    [network_filter] = chain["filters"]
    assert network_filter["name"] == "envoy.filters.network.http_connection_manager"
    config: dict[str, Any] = network_filter["typed_config"]
    return config


def ext_proc(bootstrap: dict[str, Any]) -> dict[str, Any]:
    filters = hcm(bootstrap)["http_filters"]
    assert [f["name"] for f in filters] == ["asc.ext_proc", "envoy.filters.http.router"]
    config: dict[str, Any] = filters[0]["typed_config"]
    return config


def clusters(bootstrap: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["name"]: c for c in bootstrap["static_resources"]["clusters"]}


@pytest.fixture(scope="module")
def demo() -> dict[str, Any]:
    return render_bootstrap(load_config(DEMO_CONFIG), EnvoyPorts())


def test_ext_proc_fails_closed(demo: dict[str, Any]) -> None:
    config = ext_proc(demo)
    assert config["@type"] == (
        "type.googleapis.com/envoy.extensions.filters.http.ext_proc.v3.ExternalProcessor")
    assert config["failure_mode_allow"] is False
    assert config["grpc_service"] == {"envoy_grpc": {"cluster_name": "asc_extproc"}}
    assert config["message_timeout"] == "2s"
    assert config["allow_mode_override"] is True
    assert config["processing_mode"] == {
        "request_header_mode": "SEND",
        "response_header_mode": "SEND",
        "request_body_mode": "NONE",
        "response_body_mode": "NONE",
        "request_trailer_mode": "SEND",
        "response_trailer_mode": "SKIP",
    }
    assert config["mutation_rules"] == {"disallow_is_error": True, "allow_envoy": True}
    assert config["metadata_options"] == {"receiving_namespaces": {"untyped": ["asc"]}}


@pytest.mark.parametrize(("millis", "text"), [(2000, "2s"), (1500, "1.5s"), (250, "0.25s")])
def test_message_timeout_follows_ports(millis: int, text: str) -> None:
    bootstrap = render_bootstrap(load_config(DEMO_CONFIG), EnvoyPorts(message_timeout_ms=millis))
    assert ext_proc(bootstrap)["message_timeout"] == text


def test_routing_by_cluster_header(demo: dict[str, Any]) -> None:
    # Internal-only: Envoy removes a client's x-asc-cluster before any filter or route.
    assert hcm(demo)["route_config"]["internal_only_headers"] == ["x-asc-cluster"]
    [virtual_host] = hcm(demo)["route_config"]["virtual_hosts"]
    assert virtual_host["domains"] == ["*"]
    assert virtual_host["request_body_buffer_limit"] == 1_048_576 + 65_536
    [route] = virtual_host["routes"]
    assert route == {
        "match": {"prefix": "/"},
        "request_headers_to_remove": ["x-asc-cluster"],
        "route": {"cluster_header": "x-asc-cluster", "auto_host_rewrite": True,
                  "timeout": "300s"},
    }


def test_buffer_limit_follows_max_body_bytes() -> None:
    config = providers_config("""\
  p:
    kind: openai_compatible
    base_url: "http://10.0.0.1:8000"
    region: r
    zone: z
    cluster: p
""", max_body_bytes=1000)
    [virtual_host] = hcm(render_bootstrap(config, EnvoyPorts()))["route_config"]["virtual_hosts"]
    assert virtual_host["request_body_buffer_limit"] == 1000 + 65_536


@pytest.mark.parametrize("max_response_bytes", [65_536, 1_048_576, 8_388_608, 1_073_741_824])
def test_response_buffer_follows_max_response_bytes(max_response_bytes: int) -> None:
    config = parse_config(DEMO_CONFIG.read_text(encoding="utf-8").replace(
        "limits:", f"limits:\n  max_response_bytes: {max_response_bytes}", 1))
    assert config.limits.max_response_bytes == max_response_bytes
    bootstrap = render_bootstrap(config, EnvoyPorts())
    [listener] = bootstrap["static_resources"]["listeners"]
    assert listener["per_connection_buffer_limit_bytes"] == max_response_bytes
    # Provider connections keep Envoy's default buffer: BUFFERED_PARTIAL refuses an
    # oversized answer at any connection buffer (decision 0055).
    providers = [c for name, c in clusters(bootstrap).items() if name != "asc_extproc"]
    assert len(providers) == 2
    assert [c.get("per_connection_buffer_limit_bytes") for c in providers] == [None, None]


def test_admin_is_off_unless_given_a_unix_socket(demo: dict[str, Any]) -> None:
    # Envoy admin has no authentication: never on TCP, where any local process reaches it.
    assert "admin" not in demo
    bootstrap = render_bootstrap(load_config(DEMO_CONFIG),
                                 EnvoyPorts(admin_socket="/run/asc/envoy-admin.sock"))
    assert bootstrap["admin"] == {
        "address": {"pipe": {"path": "/run/asc/envoy-admin.sock", "mode": 0o600}}}
    assert "socket_address" not in render_yaml(load_config(DEMO_CONFIG), EnvoyPorts(
        admin_socket="/run/asc/envoy-admin.sock")).split("static_resources:")[0]


def test_listener_and_extproc_addresses() -> None:
    ports = EnvoyPorts(listen_address="0.0.0.0", listen_port=8443,
                       extproc_address="10.9.8.7", extproc_port=6000)
    bootstrap = render_bootstrap(load_config(DEMO_CONFIG), ports)
    [listener] = bootstrap["static_resources"]["listeners"]
    assert listener["address"] == {"socket_address": {"address": "0.0.0.0", "port_value": 8443}}
    extproc_cluster = clusters(bootstrap)["asc_extproc"]
    assert extproc_cluster["type"] == "STATIC"
    assert extproc_cluster["load_assignment"]["endpoints"] == [{"lb_endpoints": [{"endpoint": {
        "address": {"socket_address": {"address": "10.9.8.7", "port_value": 6000}}}}]}]
    options = extproc_cluster["typed_extension_protocol_options"][
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"]
    assert options["explicit_http_config"] == {"http2_protocol_options": {}}


def test_demo_provider_clusters(demo: dict[str, Any]) -> None:
    by_name = clusters(demo)
    assert list(by_name) == ["asc_extproc", "emu_us", "emu_eu"]
    for name in ("emu_us", "emu_eu"):
        cluster = by_name[name]
        assert cluster["type"] == "STATIC"
        assert cluster["load_assignment"] == {
            "cluster_name": name,
            "endpoints": [{"lb_endpoints": [{"endpoint": {
                "address": {"socket_address": {"address": "127.0.0.1", "port_value": 18080}},
                "hostname": "127.0.0.1:18080",  # non-default port: kept in Host
            }}]}],
        }
        assert "transport_socket" not in cluster


def test_https_hostname_provider_uses_dns_and_tls_with_sni() -> None:
    config = providers_config("""\
  openai:
    kind: openai_compatible
    base_url: "https://api.openai.com"
    region: us
    zone: us
    cluster: openai_api
  local:
    kind: openai_compatible
    base_url: "http://[::1]:9000/prefix"
    region: lab
    zone: lab
    cluster: local_v6
""")
    by_name = clusters(render_bootstrap(config, EnvoyPorts()))
    openai = by_name["openai_api"]
    assert openai["type"] == "STRICT_DNS"
    assert openai["dns_lookup_family"] == "V4_PREFERRED"
    assert openai["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"] == {
        "address": {"socket_address": {"address": "api.openai.com", "port_value": 443}},
        "hostname": "api.openai.com",
    }
    assert openai["transport_socket"] == {
        "name": "envoy.transport_sockets.tls",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3"
                     ".UpstreamTlsContext",
            "sni": "api.openai.com",
            "common_tls_context": {"validation_context": {
                "trusted_ca": {"filename": "/etc/ssl/certs/ca-certificates.crt"},
                "match_typed_subject_alt_names": [
                    {"san_type": "DNS", "matcher": {"exact": "api.openai.com"}},
                ],
            }},
        },
    }
    local = by_name["local_v6"]
    assert local["type"] == "STATIC"
    assert local["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"][
        "address"] == {"socket_address": {"address": "::1", "port_value": 9000}}
    assert "transport_socket" not in local


def test_https_with_explicit_port() -> None:
    config = providers_config("""\
  p:
    kind: openai_compatible
    base_url: "https://llm.internal:8443/openai"
    region: r
    zone: z
    cluster: p
""")
    cluster = clusters(render_bootstrap(config, EnvoyPorts()))["p"]
    assert cluster["type"] == "STRICT_DNS"
    assert cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"][
        "address"] == {"socket_address": {"address": "llm.internal", "port_value": 8443}}
    assert cluster["transport_socket"]["typed_config"]["sni"] == "llm.internal"


def test_providers_sharing_an_identical_cluster_are_merged() -> None:
    config = providers_config("""\
  a:
    kind: openai_compatible
    base_url: "http://10.0.0.1:8000"
    region: r1
    zone: z
    cluster: shared
  b:
    kind: openai_compatible
    base_url: "http://10.0.0.1:8000"
    region: r2
    zone: z
    cluster: shared
""")
    assert list(clusters(render_bootstrap(config, EnvoyPorts()))) == ["asc_extproc", "shared"]


def test_local_replies_are_openai_json(demo: dict[str, Any]) -> None:
    local_reply = hcm(demo)["local_reply_config"]
    own = [m["filter"] for m in local_reply["mappers"][:2]]
    assert own == [{"metadata_filter": {
        "matcher": {"filter": "asc", "path": [{"key": key}],
                    "value": {"present_match": True}},
        "match_if_key_not_found": False,
    }} for key in ("error", "answered")]
    assert local_reply["body_format"] == {"json_format": {"error": {
        "message": "%LOCAL_REPLY_BODY%", "type": "gateway_error", "param": None,
        "code": "%RESPONSE_CODE_DETAILS%"}}}
    # A 5xx of Envoy's gets a fixed message and code: its details stay in the access log
    # (decision 0141).
    fixed = {m["filter"]["status_code_filter"]["comparison"]["value"]["default_value"]:
             m["body_format_override"]["json_format"]["error"]
             for m in local_reply["mappers"][2:] if "status_code_filter" in m["filter"]}
    assert fixed == {status: {"message": message, "type": "gateway_error", "param": None,
                              "code": code} for status, message, code in (
        (500, "The gateway could not process the request.", "internal_error"),
        (502, "The provider connection failed.", "provider_error"),
        (503, "The gateway or the provider is unavailable.", "gateway_unavailable"),
        (504, "The gateway timed out.", "gateway_timeout"))}
    assert "%RESPONSE_CODE_DETAILS%" not in str(local_reply["mappers"])


def test_local_replies_on_the_messages_door_are_anthropic_json(demo: dict[str, Any]) -> None:
    """Decision 0131: the door from the service's metadata, else from the client's path."""
    mappers = hcm(demo)["local_reply_config"]["mappers"]
    door = mappers[7]["filter"]
    assert door == {"or_filter": {"filters": [
        {"metadata_filter": {"matcher": {
            "filter": "asc", "path": [{"key": "dialect"}],
            "value": {"string_match": {"exact": "anthropic"}}},
            "match_if_key_not_found": False}},
        {"and_filter": {"filters": [
            {"metadata_filter": {"matcher": {
                "filter": "asc", "path": [{"key": "dialect"}],
                "value": {"string_match": {"exact": "anthropic"}}},
                "match_if_key_not_found": True}},
            {"header_filter": {"header": {"name": ":path",
                                          "string_match": {"prefix": "/v1/messages"}}}},
        ]}},
    ]}}
    assert mappers[7]["body_format_override"] == {"json_format": {"type": "error", "error": {
        "type": "api_error", "message": "%LOCAL_REPLY_BODY%"}}}
    per_status = {m["filter"]["and_filter"]["filters"][1]["status_code_filter"]["comparison"][
        "value"]["default_value"]: m["body_format_override"]["json_format"]["error"]
        for m in mappers[2:7]}
    assert all(m["filter"]["and_filter"]["filters"][0] == door for m in mappers[2:7])
    assert per_status == {
        500: {"type": "api_error", "message": "The gateway could not process the request."},
        502: {"type": "api_error", "message": "The provider connection failed."},
        503: {"type": "overloaded_error",
              "message": "The gateway or the provider is unavailable."},
        504: {"type": "api_error", "message": "The gateway timed out."},
        413: {"type": "request_too_large", "message": "%LOCAL_REPLY_BODY%"},
    }


def test_render_yaml_round_trips(demo: dict[str, Any]) -> None:
    text = render_yaml(load_config(DEMO_CONFIG), EnvoyPorts())
    assert text.startswith(
        "# Rendered by `extproc envoy render` from the gateway config; do not edit by hand.\n")
    assert yaml.safe_load(text) == demo


@pytest.mark.parametrize(("path", "value", "complaint"), [
    (("static_resources", "listeners", 0, "enable_reuse_portx"), False,
     'no field named "enable_reuse_portx"'),
    (("static_resources", "listeners", 0, "filter_chains", 0, "filters", 0, "typed_config",
      "route_config", "internal_only_headerz"), ["x-asc-cluster"],
     'no field named "internal_only_headerz"'),
    (("static_resources", "listeners", 0, "filter_chains", 0, "filters", 0, "typed_config",
      "http_filters", 0, "typed_config", "processing_mode", "request_trailer_mode"), "SENDX",
     "Invalid enum value SENDX"),
])
def test_a_wrong_field_fails_at_render_time(demo: dict[str, Any], path: tuple[Any, ...],
                                            value: Any, complaint: str) -> None:
    bootstrap = copy.deepcopy(demo)
    node: Any = bootstrap
    for step in path[:-1]:
        node = node[step]
    node[path[-1]] = value
    with pytest.raises(BootstrapError, match="rendered Envoy bootstrap is invalid") as error:
        check_typed(bootstrap)
    assert complaint in str(error.value)
    check_typed(demo)  # the real render parses


def test_render_cli_admin_socket_or_none(tmp_path: Path) -> None:
    from extproc.cli import main

    without = tmp_path / "without.yaml"
    assert main(["envoy", "render", "--config", str(DEMO_CONFIG), "--output", str(without)]) == 0
    assert "admin" not in yaml.safe_load(without.read_text(encoding="utf-8"))
    with_socket = tmp_path / "with.yaml"
    assert main(["envoy", "render", "--config", str(DEMO_CONFIG), "--output", str(with_socket),
                 "--admin-socket", "/run/asc/admin.sock"]) == 0
    assert yaml.safe_load(with_socket.read_text(encoding="utf-8"))["admin"] == {
        "address": {"pipe": {"path": "/run/asc/admin.sock", "mode": 0o600}}}
