"""Routing through a real Envoy 1.40, extproc and two emulators (one per zone), issue 9
items 1 and 4: a route's `filter_metadata.asc` reaches the service and is honoured (and
can only narrow), `x-asc-route-reason` only for debug tenants, and an EU tenant whose EU
deployments all fail gets 503 JSON while the US emulator receives nothing.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from extproc.auth import hash_key
from extproc.config import load_config
from extproc.devstack import Stack, free_port
from extproc.envoy_bootstrap import EnvoyPorts, render_bootstrap
from extproc.secrets import Secret
from tests.conftest import (
    ACME_KEY,
    CHAT,
    GLOBEX_KEY,
    PEPPER,
    PROVIDER_KEY_EU,
    PROVIDER_KEY_US,
    Emulator,
    chat_body,
    provider_fingerprint,
    write_config,
)
from tests.e2e.test_credentials import log_events

pytestmark = pytest.mark.e2e

PINNED_HOST = "pinned.mesh.internal"
"""A virtual host whose route a mesh operator pinned to emu-eu2."""
WIDENING_HOST = "widening.mesh.internal"
"""A virtual host whose route names a US provider: for an EU tenant it can only narrow."""


def routing_document(eu_port: int, us_port: int) -> dict[str, Any]:
    pepper = Secret(PEPPER)
    eu, us = f"http://127.0.0.1:{eu_port}", f"http://127.0.0.1:{us_port}"
    return {
        "version": 1,
        "auth": {"pepper": {"file": "pepper.txt"}},
        "deployment_health": {"failures": 2, "cooldown_s": 600},
        "credentials": {"emu-eu-1": {"env": "TEST_PROVIDER_KEY_EU"},
                        "emu-us-1": {"env": "TEST_PROVIDER_KEY_US"}},
        "providers": {
            "emu-us": {"kind": "openai", "base_url": us, "region": "us-east-1", "zone": "us",
                       "cluster": "emu_us", "credentials": ["emu-us-1"]},
            "emu-eu": {"kind": "openai", "base_url": eu, "region": "eu-west-1", "zone": "eu",
                       "cluster": "emu_eu", "credentials": ["emu-eu-1"]},
            "emu-eu2": {"kind": "openai", "base_url": eu, "region": "eu-central-1",
                        "zone": "eu", "cluster": "emu_eu2", "credentials": ["emu-eu-1"]},
        },
        "models": {"gpt-4o-mini": {
            "price": {"input_per_mtok": 0.15, "output_per_mtok": 0.6},
            "deployments": [{"provider": "emu-us", "model": "gpt-4o-mini-us"},
                            {"provider": "emu-eu", "model": "gpt-4o-mini-eu"},
                            {"provider": "emu-eu2", "model": "gpt-4o-mini-eu2"}],
        }},
        "tenants": {
            "acme": {"zone": "eu", "models": ["gpt-4o-mini"],
                     "keys": [{"id": "acme-main", "hash": hash_key(pepper, ACME_KEY)}]},
            "dbg": {"zone": "eu", "debug": True, "models": ["gpt-4o-mini"],
                    "keys": [{"id": "dbg-main", "hash": hash_key(pepper, GLOBEX_KEY)}]},
        },
    }


def pin_routes(bootstrap: dict[str, Any]) -> None:
    """What a mesh operator writes: virtual hosts whose route carries filter_metadata.asc."""
    hcm = bootstrap["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0][
        "typed_config"]
    hosts = hcm["route_config"]["virtual_hosts"]
    default = hosts[0]
    for name, host, metadata in (("pinned", PINNED_HOST, {"pin": "emu-eu2"}),
                                 ("widening", WIDENING_HOST, {"pin": "emu-us"})):
        pinned = json.loads(json.dumps(default))
        pinned.update(name=name, domains=[host])
        pinned["routes"][0]["metadata"] = {"filter_metadata": {"asc": metadata}}
        hosts.insert(0, pinned)


@dataclass
class RoutingGateway:
    eu: Emulator
    us: Emulator
    client: httpx.Client
    stack: Stack

    def chat(self, key: str = ACME_KEY, host: str | None = None) -> httpx.Response:
        headers = {"content-type": "application/json", "authorization": f"Bearer {key}"}
        if host is not None:
            headers["host"] = host
        return self.client.post(CHAT, json=chat_body(), headers=headers)

    def reasons(self, request_id: str) -> list[str]:
        """The request's `route_reason` from its log line (polled: the line follows the
        response)."""
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            found = [e["route_reason"] for e in log_events(self, "request finished")
                     if e.get("request_id") == request_id]
            if found:
                return found
            time.sleep(0.05)
        return []


def start_routing_gateway(
        stack: Stack, config_dir: Path,
        edit_document: Callable[[dict[str, Any]], None] | None = None) -> RoutingGateway:
    eu_process, eu_port = stack.start_emulator([PROVIDER_KEY_EU])
    us_process, us_port = stack.start_emulator([PROVIDER_KEY_US])
    document = routing_document(eu_port, us_port)
    if edit_document is not None:
        edit_document(document)
    config_path = write_config(config_dir, document)
    env = dict(stack.env, TEST_PROVIDER_KEY_EU=PROVIDER_KEY_EU,
               TEST_PROVIDER_KEY_US=PROVIDER_KEY_US)
    _, extproc_port, _ = stack.start_extproc(config_path, env=env)
    listen_port, admin_socket = free_port(), stack.admin_socket()
    bootstrap = render_bootstrap(load_config(config_path), EnvoyPorts(
        listen_port=listen_port, admin_socket=str(admin_socket), extproc_port=extproc_port))
    pin_routes(bootstrap)
    stack.start_envoy(yaml.safe_dump(bootstrap, sort_keys=False), listen_port=listen_port,
                      admin_socket=admin_socket)
    return RoutingGateway(eu=Emulator(eu_port, eu_process), us=Emulator(us_port, us_process),
                          client=httpx.Client(base_url=f"http://127.0.0.1:{listen_port}",
                                              timeout=15), stack=stack)


@pytest.fixture(scope="module")
def routing_gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RoutingGateway]:
    workdir = tmp_path_factory.mktemp("routing")
    with Stack(workdir) as stack:
        yield start_routing_gateway(stack, workdir / "config")


def served_models(emulator: Emulator) -> list[str]:
    return [json.loads(r["body"])["model"] for r in emulator.requests()]


def test_route_metadata_pin_reaches_the_service_and_is_honoured(
        routing_gateway: RoutingGateway) -> None:
    gw = routing_gateway
    gw.eu.clear()
    plain = gw.chat()
    assert (plain.status_code, plain.headers["x-asc-provider"]) == (200, "emu-eu")
    pinned = gw.chat(host=PINNED_HOST)
    assert (pinned.status_code, pinned.headers["x-asc-provider"],
            pinned.headers["x-asc-region"]) == (200, "emu-eu2", "eu-central-1")
    assert served_models(gw.eu) == ["gpt-4o-mini-eu", "gpt-4o-mini-eu2"]
    assert gw.reasons(pinned.headers["x-asc-request-id"]) == [
        "zone eu; route pin emu-eu2; first in order emu-eu2"]
    assert gw.reasons(plain.headers["x-asc-request-id"]) == [
        "zone eu; first in order emu-eu; fallbacks emu-eu2"]


def test_route_metadata_never_widens_the_tenants_zone(routing_gateway: RoutingGateway) -> None:
    gw = routing_gateway
    gw.eu.clear()
    gw.us.clear()
    response = gw.chat(host=WIDENING_HOST)
    assert response.status_code == 503
    assert response.headers["content-type"] == "application/json"
    assert response.json() == {"error": {
        "message": "No deployment of model 'gpt-4o-mini' in your residency zone is allowed "
                   "by the routing policy.",
        "type": "service_unavailable", "param": None, "code": "gateway_unavailable"}}
    assert gw.us.requests() == []
    assert gw.eu.requests() == []


def test_route_reason_header_only_for_debug_tenants(routing_gateway: RoutingGateway) -> None:
    gw = routing_gateway
    plain = gw.chat(ACME_KEY)
    debug = gw.chat(GLOBEX_KEY)
    pinned_debug = gw.chat(GLOBEX_KEY, host=PINNED_HOST)
    assert [r.status_code for r in (plain, debug, pinned_debug)] == [200, 200, 200]
    assert "x-asc-route-reason" not in plain.headers
    assert debug.headers["x-asc-route-reason"] == (
        "zone eu; first in order emu-eu; fallbacks emu-eu2")
    assert pinned_debug.headers["x-asc-route-reason"] == (
        "zone eu; route pin emu-eu2; first in order emu-eu2")


def test_eu_tenant_with_every_eu_deployment_down_gets_503_and_us_gets_nothing(
        stack: Stack) -> None:
    # Failover off (docs/routing.md, Failover, has it on): each provider 503 reaches the client.
    gw = start_routing_gateway(stack, stack.workdir / "config",
                               lambda document: document.update(failover={"max_attempts": 1}))
    gw.eu.queue_fault(status=503, count=4)
    statuses = [gw.chat().status_code for _ in range(4)]
    # Two failures open emu-eu, the next two open emu-eu2 (no retries here: each provider
    # 503 reaches the client as the gateway's 502 provider error).
    assert statuses == [502, 502, 502, 502]
    assert served_models(gw.eu) == ["gpt-4o-mini-eu", "gpt-4o-mini-eu",
                                    "gpt-4o-mini-eu2", "gpt-4o-mini-eu2"]
    down = gw.chat()
    assert down.status_code == 503
    assert down.json() == {"error": {
        "message": "Every deployment of model 'gpt-4o-mini' in your residency zone is "
                   "unavailable.",
        "type": "service_unavailable", "param": None, "code": "gateway_unavailable"}}
    assert len(gw.eu.requests()) == 4  # refused by the gateway: no provider was called
    assert gw.us.requests() == []
    debug = gw.chat(GLOBEX_KEY)
    assert debug.status_code == 503
    assert "emu-us" not in debug.text
    keys = {r["headers"].get("authorization") for r in gw.eu.requests()}
    assert keys == {f"Bearer {provider_fingerprint(PROVIDER_KEY_EU)}"}


def test_an_active_probe_opens_a_dead_deployment_before_any_client_hits_it(
        stack: Stack) -> None:
    def with_dead_first(document: dict[str, Any]) -> None:
        document["providers"]["emu-dead"] = {
            "kind": "openai", "base_url": f"http://127.0.0.1:{free_port()}",
            "region": "eu-north-1", "zone": "eu", "cluster": "emu_dead",
            "credentials": ["emu-eu-1"]}
        document["models"]["gpt-4o-mini"]["deployments"].insert(1, {
            "provider": "emu-dead", "model": "gpt-4o-mini-dead",
            "probe": {"path": "/health", "interval_s": 1, "timeout_ms": 500}})

    gw = start_routing_gateway(stack, stack.workdir / "config", with_dead_first)
    deadline = time.monotonic() + 15
    while len(log_events(gw, "deployment probe failed")) < 2:
        assert time.monotonic() < deadline, "the probe never failed twice"
        time.sleep(0.1)
    response = gw.chat()
    assert (response.status_code, response.headers["x-asc-provider"]) == (200, "emu-eu")
    assert gw.reasons(response.headers["x-asc-request-id"]) == [
        "zone eu; skipped emu-dead (breaker open); first in order emu-eu; fallbacks emu-eu2"]
    assert [e["deployment"] for e in log_events(gw, "deployment probe failed")][:2] == [
        "emu-dead/gpt-4o-mini-dead", "emu-dead/gpt-4o-mini-dead"]
