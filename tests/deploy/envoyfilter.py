"""An Envoy bootstrap shaped like the config Istio gives a proxy, and the EnvoyFilter
patches of deploy/istio applied to it where Istio applies them.

No Istio control plane runs here (none installs from the registries), so the check is:
build what istiod would send for the ServiceEntries of deploy/istio/providers (an HTTP
listener whose route configuration has one virtual host per provider host, and one
TLS-originating cluster per host as its DestinationRule says), apply the EnvoyFilter's
patches with Istio's semantics for the operations we use, and let a real Envoy judge the
result (`envoy --mode validate`, or a running Envoy in the e2e test). An operation or
match this module does not know raises, so a new kind of patch cannot pass unchecked.
Names follow istiod's: listener `0.0.0.0_80`, route configuration `80` (sidecar) or
`http.8080` (gateway), virtual host `host:port`, cluster `outbound|80||host`.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import yaml

__all__ = [
    "ISTIO",
    "MeshProxy",
    "apply_envoy_filter",
    "documents",
    "mesh_proxy",
    "provider_hosts",
]

REPO: Final = Path(__file__).resolve().parents[2]
ISTIO: Final = REPO / "deploy" / "istio"
_HCM: Final = "envoy.filters.network.http_connection_manager"
_HCM_TYPE: Final = ("type.googleapis.com/envoy.extensions.filters.network."
                    "http_connection_manager.v3.HttpConnectionManager")
_ROUTER_TYPE: Final = "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
_TLS_TYPE: Final = ("type.googleapis.com/envoy.extensions.transport_sockets.tls.v3"
                    ".UpstreamTlsContext")
_HTTP_OPTIONS: Final = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"


def documents(path: Path) -> list[dict[str, Any]]:
    """The YAML documents of a manifest file (comment-only documents skipped)."""
    return [doc for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")) if doc]


@dataclass(frozen=True, slots=True)
class ProviderHost:
    host: str
    resolution: str
    """ServiceEntry resolution: DNS or NONE."""
    sni: str | None


def provider_hosts() -> list[ProviderHost]:
    """The provider hosts of deploy/istio/providers, with their DestinationRule's TLS."""
    docs = documents(ISTIO / "providers" / "provider-egress.yaml")
    rules = {doc["spec"]["host"]: doc["spec"] for doc in docs
             if doc["kind"] == "DestinationRule"}
    hosts = []
    for doc in docs:
        if doc["kind"] != "ServiceEntry":
            continue
        (host,) = doc["spec"]["hosts"]
        (port_tls,) = [setting["tls"] for setting in
                       rules[host]["trafficPolicy"]["portLevelSettings"]
                       if setting["port"]["number"] == 80]
        assert port_tls["mode"] == "SIMPLE", host
        hosts.append(ProviderHost(host, doc["spec"]["resolution"], port_tls.get("sni")))
    return hosts


@dataclass
class MeshProxy:
    """The bootstrap of one Istio proxy, and which istiod names map to which ports."""

    context: str
    """SIDECAR_OUTBOUND or GATEWAY: the EnvoyFilter match context this proxy has."""
    bootstrap: dict[str, Any]
    listener_port: int
    route_port: int
    """The port RouteConfigurationMatch.portNumber names (service or gateway server port)."""
    applied: list[int] = field(default_factory=list)

    @property
    def listener(self) -> dict[str, Any]:
        listener: dict[str, Any] = self.bootstrap["static_resources"]["listeners"][0]
        return listener

    @property
    def hcm(self) -> dict[str, Any]:
        hcm: dict[str, Any] = self.listener["filter_chains"][0]["filters"][0]["typed_config"]
        return hcm

    @property
    def clusters(self) -> list[dict[str, Any]]:
        clusters: list[dict[str, Any]] = self.bootstrap["static_resources"]["clusters"]
        return clusters

    def cluster(self, name: str) -> dict[str, Any]:
        (found,) = [cluster for cluster in self.clusters if cluster["name"] == name]
        return found


def _provider_cluster(provider: ProviderHost) -> dict[str, Any]:
    """What istiod makes of a ServiceEntry port 80 (targetPort 443) plus a DestinationRule
    with tls SIMPLE: TLS to :443, SNI fixed or (no `sni`) the request's Host."""
    name = f"outbound|80||{provider.host}"
    tls: dict[str, Any] = {
        "@type": _TLS_TYPE,
        "common_tls_context": {"validation_context": {
            "trusted_ca": {"filename": "/etc/ssl/certs/ca-certificates.crt"}}},
    }
    cluster: dict[str, Any] = {
        "name": name,
        "connect_timeout": "10s",
        "transport_socket": {"name": "envoy.transport_sockets.tls", "typed_config": tls},
    }
    if provider.resolution == "DNS":
        tls["sni"] = provider.sni
        tls["common_tls_context"]["validation_context"]["match_typed_subject_alt_names"] = [
            {"san_type": "DNS", "matcher": {"exact": provider.sni}}]
        cluster.update(type="STRICT_DNS", load_assignment={
            "cluster_name": name,
            "endpoints": [{"lb_endpoints": [{"endpoint": {"address": {"socket_address": {
                "address": provider.host, "port_value": 443}}}}]}],
        })
    else:
        cluster.update(type="ORIGINAL_DST", lb_policy="CLUSTER_PROVIDED")
        cluster["typed_extension_protocol_options"] = {_HTTP_OPTIONS: {
            "@type": f"type.googleapis.com/{_HTTP_OPTIONS}",
            "upstream_http_protocol_options": {"auto_sni": True, "auto_san_validation": True},
            "explicit_http_config": {"http_protocol_options": {}},
        }}
    return cluster


def mesh_proxy(context: str, hosts: Iterable[ProviderHost] | None = None) -> MeshProxy:
    """A sidecar (SIDECAR_OUTBOUND, port 80) or ingress gateway (GATEWAY, listener 8080
    for server port 80) bootstrap before any EnvoyFilter."""
    providers = list(provider_hosts() if hosts is None else hosts)
    if context == "SIDECAR_OUTBOUND":
        listener_port, route_port, route_name = 80, 80, "80"
        virtual_hosts = [{
            "name": f"{provider.host}:80",
            "domains": [provider.host, f"{provider.host}:80"],
            "routes": [{"name": "default", "match": {"prefix": "/"}, "route": {
                "cluster": f"outbound|80||{provider.host}", "timeout": "0s"}}],
        } for provider in providers]
        # Any other host on port 80 (outboundTrafficPolicy ALLOW_ANY).
        virtual_hosts.append({"name": "allow_any", "domains": ["*"], "routes": [{
            "name": "allow_any", "match": {"prefix": "/"},
            "route": {"cluster": "PassthroughCluster", "timeout": "0s"}}]})
    elif context == "GATEWAY":
        # deploy/istio/gateway/gateway.yaml: one server on port 80, any host, its
        # VirtualService sending /v1 to the first provider host by default.
        listener_port, route_port, route_name = 8080, 80, "http.8080"
        virtual_hosts = [{"name": "*:80", "domains": ["*"], "routes": [{
            "name": "asc-default", "match": {"prefix": "/v1/"},
            "route": {"cluster": f"outbound|80||{providers[0].host}", "timeout": "300s"}}]}]
    else:
        raise ValueError(f"unknown proxy context {context!r}")
    passthrough = {"name": "PassthroughCluster", "type": "ORIGINAL_DST",
                   "lb_policy": "CLUSTER_PROVIDED", "connect_timeout": "10s"}
    bootstrap = {"static_resources": {
        "listeners": [{
            "name": f"0.0.0.0_{listener_port}",
            "address": {"socket_address": {"address": "0.0.0.0", "port_value": listener_port}},
            "filter_chains": [{"filters": [{"name": _HCM, "typed_config": {
                "@type": _HCM_TYPE,
                "stat_prefix": f"outbound_0.0.0.0_{listener_port}",
                "route_config": {"name": route_name, "virtual_hosts": virtual_hosts},
                "http_filters": [{"name": "envoy.filters.http.router",
                                  "typed_config": {"@type": _ROUTER_TYPE}}],
            }}]}],
        }],
        "clusters": [*(_provider_cluster(provider) for provider in providers), passthrough],
    }}
    return MeshProxy(context, bootstrap, listener_port, route_port)


def _merge(into: dict[str, Any], value: dict[str, Any]) -> None:
    """Protobuf merge, as Istio's MERGE does: messages and maps merge, lists append,
    scalars replace."""
    for key, item in value.items():
        if isinstance(item, dict) and isinstance(into.get(key), dict):
            _merge(into[key], item)
        elif isinstance(item, list) and isinstance(into.get(key), list):
            into[key].extend(copy.deepcopy(item))
        else:
            into[key] = copy.deepcopy(item)


def _known(match: dict[str, Any], allowed: set[str], what: str) -> None:
    unknown = set(match) - allowed
    if unknown:
        raise NotImplementedError(f"{what}: match fields {sorted(unknown)} are not modelled")


def _vhosts(proxy: MeshProxy, match: dict[str, Any]) -> list[dict[str, Any]]:
    route_match = match.get("routeConfiguration", {})
    _known(route_match, {"portNumber", "vhost"}, "routeConfiguration")
    if route_match.get("portNumber") != proxy.route_port:
        return []
    vhosts: list[dict[str, Any]] = proxy.hcm["route_config"]["virtual_hosts"]
    name = route_match.get("vhost", {}).get("name")
    return [vhost for vhost in vhosts if name is None or vhost["name"] == name]


def _apply(proxy: MeshProxy, patch: dict[str, Any]) -> int:
    """Apply one configPatch; the number of places it changed."""
    match, operation = patch.get("match", {}), patch["patch"]["operation"]
    value = patch["patch"]["value"]
    _known(match, {"context", "listener", "routeConfiguration"}, patch["applyTo"])
    if match.get("context") != proxy.context:
        return 0
    kind = (patch["applyTo"], operation)
    if kind == ("CLUSTER", "ADD"):
        proxy.clusters.append(copy.deepcopy(value))
        return 1
    if kind == ("HTTP_FILTER", "INSERT_BEFORE"):
        listener_match = match["listener"]
        _known(listener_match, {"portNumber", "filterChain"}, "listener")
        chain_filter = listener_match["filterChain"]["filter"]
        if listener_match["portNumber"] != proxy.listener_port or chain_filter["name"] != _HCM:
            return 0
        filters: list[dict[str, Any]] = proxy.hcm["http_filters"]
        names = [item["name"] for item in filters]
        if chain_filter["subFilter"]["name"] not in names:
            return 0
        filters.insert(names.index(chain_filter["subFilter"]["name"]), copy.deepcopy(value))
        return 1
    if kind == ("VIRTUAL_HOST", "MERGE"):
        vhosts = _vhosts(proxy, match)
        for vhost in vhosts:
            _merge(vhost, value)
        return len(vhosts)
    if kind == ("HTTP_ROUTE", "INSERT_FIRST"):
        vhosts = _vhosts(proxy, match)
        for vhost in vhosts:
            vhost["routes"].insert(0, copy.deepcopy(value))
        return len(vhosts)
    raise NotImplementedError(f"patch {kind} is not modelled")


def apply_envoy_filter(proxy: MeshProxy, envoy_filter: dict[str, Any]) -> MeshProxy:
    """Apply every configPatch in order; `proxy.applied` counts the places per patch."""
    assert envoy_filter["kind"] == "EnvoyFilter"
    proxy.applied = [_apply(proxy, patch) for patch in envoy_filter["spec"]["configPatches"]]
    return proxy
