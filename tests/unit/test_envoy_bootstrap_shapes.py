"""The three rendered shapes (`extproc envoy render --shape front|sidecar|edge`): what each
adds to the settings every shape keeps. `envoy --mode validate` and a real Envoy run them
in tests/integration/test_render_shapes.py and tests/e2e/test_sidecar.py."""

from __future__ import annotations

from typing import Any

import pytest
import yaml

from extproc.cli import main as extproc_cli
from extproc.config import GatewayConfig, load_config, parse_config
from extproc.envoy_bootstrap import (
    SYSTEM_CA,
    EdgeLimits,
    EnvoyPorts,
    Shape,
    ShapeError,
    render_bootstrap,
)
from tests.unit.test_envoy_bootstrap import DEMO_CONFIG, HASH, clusters, ext_proc, hcm

SIDECAR_PORTS = EnvoyPorts(listen_address="0.0.0.0", admin_socket="/run/asc/envoy-admin.sock",
                           extproc_socket="/run/asc/extproc.sock")
_HTTP_OPTIONS = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"


def mixed_config() -> GatewayConfig:
    """Providers of every protocol case: known kinds over TLS, a self-hosted server over
    TLS and one over plain HTTP; each model has two deployments in one zone (failover)."""
    return parse_config(f"""\
version: 1
auth: {{pepper: {{env: ASC_PEPPER}}}}
credentials:
  c1: {{env: K}}
  c2: {{env: K}}
providers:
  oa: {{kind: openai, base_url: "https://api.openai.com", region: eu, zone: eu, cluster: oa,
        credentials: [c1]}}
  an: {{kind: anthropic, base_url: "https://api.anthropic.com", region: eu, zone: eu,
        cluster: an, credentials: [c2]}}
  self: {{kind: openai_compatible, base_url: "https://llm.internal.example", region: eu,
          zone: eu, cluster: self, credentials: []}}
  plain: {{kind: openai_compatible, base_url: "http://10.1.2.3:8000", region: dc1, zone: eu,
           cluster: plain, credentials: []}}
models:
  m:
    price: {{input_per_mtok: 1, output_per_mtok: 1}}
    deployments: [{{provider: oa}}, {{provider: an, model: claude}}]
  s:
    price: {{input_per_mtok: 1, output_per_mtok: 1}}
    deployments: [{{provider: self}}, {{provider: plain}}]
tenants:
  t:
    zone: eu
    keys: [{{id: k, hash: "{HASH}"}}]
    models: [m, s]
""")


def upstream_ext_procs(bootstrap: dict[str, Any]) -> list[dict[str, Any]]:
    found = []
    for cluster in bootstrap["static_resources"]["clusters"]:
        options = cluster["typed_extension_protocol_options"][_HTTP_OPTIONS]
        for http_filter in options.get("http_filters", []):
            if http_filter["name"] == "asc.ext_proc.upstream":
                found.append(http_filter["typed_config"])
    return found


def protocol(cluster: dict[str, Any]) -> dict[str, Any]:
    options = dict(cluster["typed_extension_protocol_options"][_HTTP_OPTIONS])
    options.pop("@type")
    options.pop("http_filters", None)
    return options


def tls_context(socket: dict[str, Any]) -> dict[str, Any]:
    context: dict[str, Any] = socket["typed_config"]["common_tls_context"]
    return context


def test_front_is_the_default_shape() -> None:
    config = mixed_config()
    assert render_bootstrap(config, EnvoyPorts()) == render_bootstrap(
        config, EnvoyPorts(), shape=Shape.FRONT)


def test_front_has_no_edge_settings() -> None:
    bootstrap = render_bootstrap(mixed_config(), EnvoyPorts())
    assert "overload_manager" not in bootstrap
    assert "request_headers_timeout" not in hcm(bootstrap)
    assert protocol(clusters(bootstrap)["oa"]) == {
        "explicit_http_config": {"http_protocol_options": {}}}
    assert "alpn_protocols" not in tls_context(clusters(bootstrap)["oa"]["transport_socket"])


def test_sidecar_reaches_the_service_over_its_unix_socket() -> None:
    bootstrap = render_bootstrap(mixed_config(), SIDECAR_PORTS, shape=Shape.SIDECAR)
    extproc_cluster = clusters(bootstrap)["asc_extproc"]
    assert extproc_cluster["type"] == "STATIC"
    assert extproc_cluster["load_assignment"]["endpoints"] == [{"lb_endpoints": [
        {"endpoint": {"address": {"pipe": {"path": "/run/asc/extproc.sock"}}}}]}]
    assert "health_checks" not in extproc_cluster
    # Both ext_proc filters (router level and per attempt) go to that cluster, fail closed.
    router_level = ext_proc(bootstrap)
    per_attempt = upstream_ext_procs(bootstrap)
    assert len(per_attempt) == 4  # one per failover cluster of the mixed config
    for config in [router_level, *per_attempt]:
        assert config["grpc_service"]["envoy_grpc"] == {"cluster_name": "asc_extproc"}
        assert config["failure_mode_allow"] is False
        assert config["message_timeout"] == "2s"
    assert router_level["mutation_rules"] == {"disallow_is_error": True, "allow_envoy": True}
    assert router_level["metadata_options"] == {"receiving_namespaces": {"untyped": ["asc"]}}


def test_sidecar_admin_on_a_unix_socket_and_listener_on_the_pod_port() -> None:
    bootstrap = render_bootstrap(mixed_config(), SIDECAR_PORTS, shape=Shape.SIDECAR)
    assert bootstrap["admin"] == {
        "address": {"pipe": {"path": "/run/asc/envoy-admin.sock", "mode": 0o600}}}
    [listener] = bootstrap["static_resources"]["listeners"]
    assert listener["address"] == {
        "socket_address": {"address": "0.0.0.0", "port_value": 10000}}
    assert "overload_manager" not in bootstrap


def test_sidecar_lists_one_socket_per_service_worker_and_health_checks_them() -> None:
    ports = EnvoyPorts(admin_socket="/run/asc/a.sock", extproc_socket="/run/asc/extproc.sock",
                       extproc_workers=3)
    extproc_cluster = clusters(render_bootstrap(mixed_config(), ports,
                                                shape=Shape.SIDECAR))["asc_extproc"]
    assert extproc_cluster["load_assignment"]["endpoints"] == [{"lb_endpoints": [
        {"endpoint": {"address": {"pipe": {"path": f"/run/asc/extproc-{index}.sock"}}}}
        for index in range(3)]}]
    assert extproc_cluster["lb_policy"] == "LEAST_REQUEST"
    assert extproc_cluster["health_checks"] == [{
        "timeout": "1s", "interval": "2s", "unhealthy_threshold": 1, "healthy_threshold": 1,
        "grpc_health_check": {"service_name": "envoy.service.ext_proc.v3.ExternalProcessor"},
    }]


@pytest.mark.parametrize("ports", [
    EnvoyPorts(admin_socket="/run/asc/a.sock"),
    EnvoyPorts(extproc_socket="/run/asc/extproc.sock"),
])
def test_sidecar_without_its_sockets_is_refused(ports: EnvoyPorts) -> None:
    with pytest.raises(ShapeError, match="sidecar shape needs"):
        render_bootstrap(mixed_config(), ports, shape=Shape.SIDECAR)


def test_a_unix_socket_works_in_any_shape() -> None:
    ports = EnvoyPorts(extproc_socket="/run/asc/extproc.sock")
    for shape in (Shape.FRONT, Shape.EDGE):
        extproc_cluster = clusters(render_bootstrap(mixed_config(), ports,
                                                    shape=shape))["asc_extproc"]
        [[endpoint]] = [e["lb_endpoints"] for e in extproc_cluster["load_assignment"]["endpoints"]]
        assert endpoint["endpoint"]["address"] == {"pipe": {"path": "/run/asc/extproc.sock"}}


def test_edge_overload_manager_caps_downstream_connections() -> None:
    bootstrap = render_bootstrap(mixed_config(), EnvoyPorts(), shape=Shape.EDGE,
                                 edge=EdgeLimits(max_downstream_connections=2500))
    assert bootstrap["overload_manager"] == {"resource_monitors": [{
        "name": "envoy.resource_monitors.global_downstream_max_connections",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.resource_monitors"
                     ".downstream_connections.v3.DownstreamConnectionsConfig",
            "max_active_downstream_connections": 2500,
        },
    }]}


def test_edge_connection_manager_timeouts_and_limits() -> None:
    manager = hcm(render_bootstrap(mixed_config(), EnvoyPorts(), shape=Shape.EDGE))
    assert manager["request_headers_timeout"] == "10s"
    assert manager["stream_idle_timeout"] == "300s"
    assert manager["common_http_protocol_options"] == {
        "idle_timeout": "900s", "headers_with_underscores_action": "REJECT_REQUEST"}
    assert manager["http2_protocol_options"] == {
        "max_concurrent_streams": 100, "initial_stream_window_size": 65536,
        "initial_connection_window_size": 1048576}
    assert (manager["normalize_path"], manager["merge_slashes"]) == (True, True)
    # Still the gateway's own settings.
    assert manager["use_remote_address"] is True
    assert manager["route_config"]["internal_only_headers"] == ["x-asc-cluster"]


_H2 = {"max_concurrent_streams": 100,
       "connection_keepalive": {"interval": "30s", "timeout": "5s"}}


def test_edge_http2_pools_where_the_provider_speaks_it() -> None:
    by_name = clusters(render_bootstrap(mixed_config(), EnvoyPorts(), shape=Shape.EDGE))
    for name in ("oa", "an", "asc_failover.m.oa", "asc_failover.m.an"):
        assert protocol(by_name[name]) == {"explicit_http_config": {"http2_protocol_options": _H2}}
    # A self-hosted server over TLS: ALPN decides, HTTP/1.1 when it offers no h2.
    assert protocol(by_name["self"]) == {"auto_config": {
        "http_protocol_options": {}, "http2_protocol_options": _H2}}
    assert tls_context(by_name["self"]["transport_socket"])["alpn_protocols"] == [
        "h2", "http/1.1"]
    # Plain HTTP, or a failover cluster that holds one: HTTP/1.1.
    for name in ("plain", "asc_failover.s.self", "asc_failover.s.plain"):
        assert protocol(by_name[name]) == {"explicit_http_config": {"http_protocol_options": {}}}
    assert "transport_socket" not in by_name["plain"]


def test_edge_tls_checks_sni_san_and_the_trusted_ca() -> None:
    ports = EnvoyPorts(trusted_ca="/etc/pki/tls/certs/ca-bundle.crt")
    by_name = clusters(render_bootstrap(mixed_config(), ports, shape=Shape.EDGE))
    socket = by_name["oa"]["transport_socket"]
    assert socket["typed_config"]["sni"] == "api.openai.com"
    assert tls_context(socket) == {
        "validation_context": {
            "trusted_ca": {"filename": "/etc/pki/tls/certs/ca-bundle.crt"},
            "match_typed_subject_alt_names": [
                {"san_type": "DNS", "matcher": {"exact": "api.openai.com"}}],
        },
        "alpn_protocols": ["h2"],
    }
    matches = {m["name"]: m for m in by_name["asc_failover.m.oa"]["transport_socket_matches"]}
    assert matches["an"]["transport_socket"]["typed_config"]["sni"] == "api.anthropic.com"
    assert tls_context(matches["an"]["transport_socket"])["alpn_protocols"] == ["h2"]


def test_trusted_ca_defaults_to_the_system_bundle() -> None:
    socket = clusters(render_bootstrap(mixed_config(), EnvoyPorts()))["oa"]["transport_socket"]
    assert tls_context(socket)["validation_context"]["trusted_ca"] == {"filename": SYSTEM_CA}
    assert SYSTEM_CA == "/etc/ssl/certs/ca-certificates.crt"


@pytest.mark.parametrize("shape", list(Shape))
def test_every_shape_keeps_the_access_log_with_the_asc_metadata(shape: Shape) -> None:
    bootstrap = render_bootstrap(load_config(DEMO_CONFIG), SIDECAR_PORTS, shape=shape)
    [log] = hcm(bootstrap)["access_log"]
    fields = log["typed_config"]["log_format"]["json_format"]
    for key in ("request_id", "tenant", "provider", "region", "credential"):
        assert fields[key] == f"%DYNAMIC_METADATA(asc:{key})%"
    assert hcm(bootstrap)["local_reply_config"]["body_format"]["json_format"]["error"][
        "type"] == "gateway_error"


def _render(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = extproc_cli(["envoy", "render", "--config", str(DEMO_CONFIG), *argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_cli_sidecar_defaults_and_the_regenerate_line(
        capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = _render(capsys, "--shape", "sidecar", "--listen-port", "8080")
    assert (code, err) == (0, "")
    first, second, _ = out.split("\n", 2)
    assert first == ("# Rendered by `extproc envoy render` from the gateway config; "
                     "do not edit by hand.")
    assert second == (f"# Regenerate: extproc envoy render --shape sidecar --config {DEMO_CONFIG}"
                      " --listen-port 8080")
    bootstrap = yaml.safe_load(out)
    assert bootstrap == render_bootstrap(load_config(DEMO_CONFIG), EnvoyPorts(
        listen_address="0.0.0.0", listen_port=8080, admin_socket="/run/asc/envoy-admin.sock",
        extproc_socket="/run/asc/extproc.sock"), shape=Shape.SIDECAR)


def test_cli_front_keeps_todays_defaults(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = _render(capsys)
    assert code == 0
    assert yaml.safe_load(out) == render_bootstrap(load_config(DEMO_CONFIG), EnvoyPorts())
    assert out.split("\n")[1] == (
        f"# Regenerate: extproc envoy render --shape front --config {DEMO_CONFIG}")


def test_cli_edge_options(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = _render(capsys, "--shape", "edge", "--max-downstream-connections", "50",
                           "--trusted-ca", "/etc/pki/ca.pem")
    assert code == 0
    assert yaml.safe_load(out) == render_bootstrap(
        load_config(DEMO_CONFIG), EnvoyPorts(listen_address="0.0.0.0",
                                             trusted_ca="/etc/pki/ca.pem"),
        shape=Shape.EDGE, edge=EdgeLimits(max_downstream_connections=50))


@pytest.mark.parametrize(("argv", "message"), [
    (("--shape", "edge", "--max-downstream-connections", "0"),
     "error: edge limits must be at least 1"),
    (("--shape", "sidecar", "--extproc-workers", "0"),
     "error: extproc_workers must be at least 1"),
])
def test_cli_refuses_impossible_limits(capsys: pytest.CaptureFixture[str],
                                       argv: tuple[str, ...], message: str) -> None:
    code, out, err = _render(capsys, *argv)
    assert (code, out) == (2, "")
    assert err == f"{message} (hint: `extproc envoy render --help` lists the options)\n"


def test_every_hosted_provider_kind_gets_http2_at_the_edge() -> None:
    """A new provider kind must be placed: its public API speaks h2 (explicit pools), or
    it is self-hosted and ALPN decides (`openai_compatible`)."""
    from extproc.config_schema import SUPPORTED_PROVIDER_KINDS
    from extproc.envoy_bootstrap import _H2_KINDS

    assert set(SUPPORTED_PROVIDER_KINDS) - {"openai_compatible"} == _H2_KINDS
