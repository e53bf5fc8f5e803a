"""deploy/istio: the objects against Istio's CRD schemas, the Envoy config inside the
EnvoyFilters applied to an Istio-shaped bootstrap and judged by a real Envoy."""

from __future__ import annotations

import copy
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from extproc.config import load_config
from extproc.devstack import envoy_binary
from extproc.envoy_bootstrap import EXTPROC_CLUSTER, EnvoyPorts, check_typed, render_bootstrap
from tests.deploy.envoyfilter import (
    ISTIO,
    MeshProxy,
    apply_envoy_filter,
    documents,
    mesh_proxy,
    provider_hosts,
)
from tests.deploy.istio_schema import check

REPO = Path(__file__).resolve().parents[2]
SIDECAR_FILTER = ISTIO / "sidecar" / "envoyfilter.yaml"
GATEWAY_FILTER = ISTIO / "gateway" / "envoyfilter.yaml"
SOCKET = "/run/asc/extproc.sock"
PROVIDER_HOSTS = ["api.openai.com", "api.anthropic.com", "api.mistral.ai", "*.openai.azure.com"]


def _envoy_filter(path: Path) -> dict[str, Any]:
    (document,) = documents(path)
    return document


def _istio_documents() -> list[tuple[str, dict[str, Any]]]:
    return [(f"{path.relative_to(REPO)}#{index}", document)
            for path in sorted(ISTIO.rglob("*.yaml"))
            if path.name != "kustomization.yaml" and not path.name.endswith(".patch.yaml")
            for index, document in enumerate(documents(path))]


@pytest.mark.parametrize(("where", "document"), _istio_documents(),
                         ids=[where for where, _ in _istio_documents()])
def test_objects_match_istio_crd_schema(where: str, document: dict[str, Any]) -> None:
    assert check(document) == [], where


def test_schema_check_rejects_misspelt_fields() -> None:
    document = _envoy_filter(SIDECAR_FILTER)
    document["spec"]["configPatches"][1]["match"]["listener"]["portNumbr"] = 80
    document["spec"]["configPatches"][0]["patch"]["operation"] = "ADDD"
    assert check(document)[0].startswith("1 validation error for EnvoyFilter\n"
                                         "spec.configPatches.0.patch.operation")
    document["spec"]["configPatches"][0]["patch"]["operation"] = "ADD"
    assert check(document) == ["unknown field spec.configPatches[1].match.listener.portNumbr"]


def test_provider_hosts_originate_tls() -> None:
    hosts = provider_hosts()
    assert [host.host for host in hosts] == PROVIDER_HOSTS
    assert [(host.resolution, host.sni) for host in hosts] == [
        ("DNS", "api.openai.com"), ("DNS", "api.anthropic.com"), ("DNS", "api.mistral.ai"),
        ("NONE", None)]


def _ext_proc(path: Path) -> dict[str, Any]:
    (patch,) = [patch for patch in _envoy_filter(path)["spec"]["configPatches"]
                if patch["applyTo"] == "HTTP_FILTER"]
    value: dict[str, Any] = patch["patch"]["value"]
    return value


@pytest.mark.parametrize("path", [SIDECAR_FILTER, GATEWAY_FILTER], ids=["sidecar", "gateway"])
def test_ext_proc_settings_are_the_rendered_ones(path: Path) -> None:
    """The filter in the mesh is the one `extproc envoy render` writes and the e2e suite
    runs: fail closed, message_timeout, mode override, mutation rules, metadata."""
    config = load_config(REPO / "deploy" / "k8s" / "base" / "asc.yaml")
    rendered = render_bootstrap(config, EnvoyPorts())
    hcm = rendered["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
    (expected,) = [item for item in hcm["typed_config"]["http_filters"]
                   if item["name"] == "asc.ext_proc"]
    typed = _ext_proc(path)["typed_config"]
    assert typed == expected["typed_config"]
    assert typed["failure_mode_allow"] is False
    assert typed["message_timeout"] == "2s"
    assert typed["allow_mode_override"] is True
    assert typed["mutation_rules"]["disallow_is_error"] is True
    assert typed["metadata_options"] == {"receiving_namespaces": {"untyped": ["asc"]}}
    assert typed["grpc_service"] == {"envoy_grpc": {"cluster_name": EXTPROC_CLUSTER}}


@pytest.mark.parametrize("path", [SIDECAR_FILTER, GATEWAY_FILTER], ids=["sidecar", "gateway"])
def test_extproc_cluster_is_the_unix_socket(path: Path) -> None:
    (patch,) = [patch for patch in _envoy_filter(path)["spec"]["configPatches"]
                if patch["applyTo"] == "CLUSTER"]
    cluster = patch["patch"]["value"]
    assert cluster["name"] == EXTPROC_CLUSTER
    (endpoint,) = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"]
    assert endpoint["endpoint"]["address"] == {"pipe": {"path": SOCKET}}
    options = cluster["typed_extension_protocol_options"]
    assert options["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"][
        "explicit_http_config"] == {"http2_protocol_options": {}}


def _patched(context: str, path: Path) -> MeshProxy:
    proxy = apply_envoy_filter(mesh_proxy(context), _envoy_filter(path))
    check_typed(proxy.bootstrap)  # Envoy's own types: misspelt fields, bad enums
    return proxy


def _envoy_validate(bootstrap: dict[str, Any], tmp_path: Path) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "bootstrap.yaml"
    path.write_text(yaml.safe_dump(bootstrap, sort_keys=False), encoding="utf-8")
    return subprocess.run([envoy_binary(), "--mode", "validate", "-c", str(path),
                           "--log-level", "error"],
                          capture_output=True, text=True, timeout=60, check=False)


def test_sidecar_patches_land_where_istio_puts_them(tmp_path: Path) -> None:
    proxy = _patched("SIDECAR_OUTBOUND", SIDECAR_FILTER)
    # cluster, filter, one vhost each for 4 providers, 3 routes into each provider vhost
    assert proxy.applied == [1] * 18
    filters = [item["name"] for item in proxy.hcm["http_filters"]]
    assert filters == ["asc.ext_proc", "envoy.filters.http.router"]
    assert proxy.hcm["http_filters"][0]["disabled"] is True
    vhosts = {vhost["name"]: vhost for vhost in proxy.hcm["route_config"]["virtual_hosts"]}
    enabled = sorted(name for name, vhost in vhosts.items()
                     if "asc.ext_proc" in vhost.get("typed_per_filter_config", {}))
    assert enabled == sorted(f"{host}:80" for host in PROVIDER_HOSTS)
    assert [route["name"] for route in vhosts["api.openai.com:80"]["routes"]] == [
        "asc-mistral", "asc-anthropic", "asc-openai", "default"]
    assert [route["name"] for route in vhosts["allow_any"]["routes"]] == ["allow_any"]
    result = _envoy_validate(proxy.bootstrap, tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "OK" in result.stdout


def test_gateway_patches_land_where_istio_puts_them(tmp_path: Path) -> None:
    proxy = _patched("GATEWAY", GATEWAY_FILTER)
    assert proxy.applied == [1, 1, 1, 1, 1]
    assert [item["name"] for item in proxy.hcm["http_filters"]] == [
        "asc.ext_proc", "envoy.filters.http.router"]
    assert "disabled" not in proxy.hcm["http_filters"][0]
    result = _envoy_validate(proxy.bootstrap, tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr


def test_a_patch_that_matches_nothing_is_seen() -> None:
    """The landing check has teeth: a wrong port or filter name applies nowhere."""
    envoy_filter = _envoy_filter(SIDECAR_FILTER)
    wrong = copy.deepcopy(envoy_filter)
    wrong["spec"]["configPatches"][1]["match"]["listener"]["filterChain"]["filter"][
        "subFilter"]["name"] = "envoy.filters.http.routr"
    wrong["spec"]["configPatches"][2]["match"]["routeConfiguration"]["portNumber"] = 8080
    proxy = apply_envoy_filter(mesh_proxy("SIDECAR_OUTBOUND"), wrong)
    assert proxy.applied[1:3] == [0, 0]


def test_envoy_rejects_a_broken_fragment(tmp_path: Path) -> None:
    """And so does the validation: Envoy refuses an ext_proc without a gRPC service."""
    proxy = _patched("SIDECAR_OUTBOUND", SIDECAR_FILTER)
    del proxy.hcm["http_filters"][0]["typed_config"]["grpc_service"]
    result = _envoy_validate(proxy.bootstrap, tmp_path)
    assert result.returncode != 0
    assert "grpc_service" in result.stdout + result.stderr
