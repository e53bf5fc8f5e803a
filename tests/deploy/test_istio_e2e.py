"""The EnvoyFilters on a running Envoy: a real Envoy with the Istio-shaped listener and
the patches applied, the real service on a Unix socket, the emulator as every provider.
Shows what the patches do, not just that Envoy accepts them: in the sidecar, ext_proc
runs for provider hosts only, the service's x-asc-cluster choice picks the provider's
mesh cluster, and a missing service fails closed; in the ingress gateway, every request
goes through the service."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from extproc.auth import hash_key
from extproc.devstack import Stack, free_port
from extproc.health_probe import check_health
from extproc.secrets import Secret
from tests.conftest import (
    ACME_KEY,
    CANARIES,
    CHAT,
    PEPPER,
    PROVIDER_KEY_EU,
    PROVIDER_KEY_US,
    Emulator,
    chat_body,
    provider_env,
    provider_fingerprint,
    write_config,
)
from tests.deploy.envoyfilter import ISTIO, apply_envoy_filter, documents, mesh_proxy
from tests.polling import wait_for

pytestmark = pytest.mark.e2e


def _config(emulator_port: int) -> dict[str, Any]:
    """The mesh asc.yaml shape: provider clusters named as the EnvoyFilter's routes."""
    base_url = f"http://127.0.0.1:{emulator_port}"
    return {
        "version": 1,
        "auth": {"pepper": {"file": "pepper.txt"}},
        "credentials": {"openai-1": {"env": "TEST_PROVIDER_KEY_US"},
                        "anthropic-1": {"env": "TEST_PROVIDER_KEY_EU"}},
        "providers": {
            "openai": {"kind": "openai", "base_url": base_url, "region": "us", "zone": "us",
                       "cluster": "openai", "credentials": ["openai-1"]},
            "anthropic": {"kind": "anthropic", "base_url": base_url, "region": "us",
                          "zone": "us", "cluster": "anthropic",
                          "credentials": ["anthropic-1"]},
        },
        "models": {
            "gpt-4o-mini": {"price": {"input_per_mtok": 0.15, "output_per_mtok": 0.6},
                            "deployments": [{"provider": "openai"}]},
            "claude-test": {"price": {"input_per_mtok": 0.8, "output_per_mtok": 4},
                            "deployments": [{"provider": "anthropic",
                                             "model": "claude-3-5-haiku-latest"}]},
        },
        "tenants": {"acme": {
            "keys": [{"id": "acme-main", "hash": hash_key(Secret(PEPPER), ACME_KEY)}],
            "models": ["gpt-4o-mini", "claude-test"]}},
    }


def _to_emulator(cluster: dict[str, Any], port: int) -> None:
    """A provider's mesh cluster, pointed at the emulator in plain HTTP (no TLS here)."""
    for key in ("transport_socket", "lb_policy", "typed_extension_protocol_options"):
        cluster.pop(key, None)
    cluster["type"] = "STATIC"
    cluster["load_assignment"] = {"cluster_name": cluster["name"], "endpoints": [{
        "lb_endpoints": [{"endpoint": {"address": {"socket_address": {
            "address": "127.0.0.1", "port_value": port}}}}]}]}


class Mesh:
    def __init__(self, stack: Stack, tmp_path: Path, context: str = "SIDECAR_OUTBOUND",
                 envoy_filter_path: Path = ISTIO / "sidecar" / "envoyfilter.yaml") -> None:
        emulator_process, emulator_port = stack.start_emulator(
            [PROVIDER_KEY_US, PROVIDER_KEY_EU])
        self.emulator = Emulator(emulator_port, emulator_process)
        config_path = write_config(tmp_path / "config", _config(emulator_port))
        self.socket = stack.workdir / "extproc.sock"
        self.extproc = stack.spawn("extproc", [
            sys.executable, "-m", "extproc", "serve", "--config", str(config_path),
            "--listen", f"unix:{self.socket}", "--metrics-listen", "", "--drain-seconds", "1",
        ], env=dict(stack.env, **provider_env()))
        assert wait_for(lambda: check_health(f"unix:{self.socket}").serving, timeout=30), (
            self.extproc.log_text())
        (envoy_filter,) = documents(envoy_filter_path)
        proxy = apply_envoy_filter(mesh_proxy(context), envoy_filter)
        self.listen_port = free_port()
        proxy.listener["address"]["socket_address"].update(
            address="127.0.0.1", port_value=self.listen_port)
        for cluster in proxy.clusters:
            if cluster["name"] == "asc_extproc":
                cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"][
                    "address"]["pipe"]["path"] = str(self.socket)
            else:
                _to_emulator(cluster, emulator_port)
        admin_socket = stack.admin_socket()
        proxy.bootstrap["admin"] = {"address": {"pipe": {"path": str(admin_socket)}}}
        self.envoy = stack.start_envoy(yaml.safe_dump(proxy.bootstrap, sort_keys=False),
                                       listen_port=self.listen_port, admin_socket=admin_socket)
        self.client = httpx.Client(base_url=f"http://127.0.0.1:{self.listen_port}", timeout=15)

    def chat(self, host: str, body: dict[str, Any], key: str | None = ACME_KEY) -> httpx.Response:
        headers = {"host": host, "content-type": "application/json"}
        if key is not None:
            headers["authorization"] = f"Bearer {key}"
        return self.client.post(CHAT, content=json.dumps(body).encode(), headers=headers)


def _health_cli(socket: Path, *command: str) -> subprocess.CompletedProcess[str]:
    """The probe of the pods and the image's HEALTHCHECK, as they run it (or the
    operator's `extproc health`)."""
    return subprocess.run([sys.executable, "-m", *(command or ("extproc.health_probe",)),
                           "--socket", str(socket)],
                          capture_output=True, text=True, timeout=30, check=False)


@pytest.fixture
def mesh(stack: Stack, tmp_path: Path) -> Mesh:
    return Mesh(stack, tmp_path)


def test_provider_host_goes_through_the_service(mesh: Mesh) -> None:
    for command in (("extproc.health_probe",), ("extproc", "health")):
        probe = _health_cli(mesh.socket, *command)
        assert (probe.returncode, probe.stdout) == (0, f"unix:{mesh.socket}: SERVING\n")
    mesh.emulator.clear()
    response = mesh.chat("api.openai.com", chat_body())
    assert response.status_code == 200, response.text
    assert response.headers["x-asc-provider"] == "openai"
    assert response.json()["object"] == "chat.completion"
    (seen,) = mesh.emulator.requests()
    assert seen["path"] == CHAT
    assert seen["headers"]["authorization"] == (
        f"Bearer {provider_fingerprint(PROVIDER_KEY_US)}")
    assert seen["headers"]["host"] == "api.openai.com"


def test_service_choice_picks_the_providers_mesh_cluster(mesh: Mesh) -> None:
    """The app called api.openai.com; the service chose Anthropic: the x-asc-cluster
    route sends the request to outbound|80||api.anthropic.com with Anthropic's key."""
    mesh.emulator.clear()
    response = mesh.chat("api.openai.com", chat_body("claude-test"))
    assert response.status_code == 200, response.text
    assert response.headers["x-asc-provider"] == "anthropic"
    assert response.json()["object"] == "chat.completion"
    (seen,) = mesh.emulator.requests()
    assert seen["path"] == "/v1/messages"
    assert seen["headers"]["x-api-key"] == provider_fingerprint(PROVIDER_KEY_EU)
    assert "authorization" not in seen["headers"]
    assert seen["headers"]["host"] == "api.anthropic.com"


def test_provider_host_without_key_is_refused_before_upstream(mesh: Mesh) -> None:
    mesh.emulator.clear()
    response = mesh.chat("api.openai.com", chat_body(), key=None)
    assert response.status_code == 401
    assert response.json()["error"]["type"] == "authentication_error"
    assert mesh.emulator.requests() == []


def test_other_hosts_bypass_the_service_and_fail_closed_only_for_providers(
        mesh: Mesh) -> None:
    """ext_proc is disabled on port 80 except on the provider hosts: another host's call
    passes untouched, also while the service is down; a provider host then gets 500."""
    mesh.emulator.clear()
    other = mesh.client.get("/healthz", headers={"host": "intranet.example"})
    assert "x-asc-request-id" not in other.headers
    (seen,) = mesh.emulator.requests()
    assert seen["path"] == "/healthz"
    assert seen["headers"]["host"] == "intranet.example"

    # A client's own x-asc-cluster picks nothing on another host (no provider route).
    mesh.emulator.clear()
    chosen = mesh.client.get("/healthz", headers={"host": "intranet.example",
                                                  "x-asc-cluster": "anthropic"})
    assert chosen.status_code == other.status_code
    (seen,) = mesh.emulator.requests()
    assert seen["headers"]["host"] == "intranet.example"

    assert _health_cli(mesh.socket).returncode == 0
    mesh.extproc.stop()
    probe = _health_cli(mesh.socket)
    assert (probe.returncode, probe.stdout, probe.stderr) == (
        1, "", f"unix:{mesh.socket}: no answer (UNAVAILABLE)\n")
    assert mesh.chat("api.openai.com", chat_body()).status_code == 500
    mesh.emulator.clear()
    again = mesh.client.get("/healthz", headers={"host": "intranet.example"})
    assert again.status_code == other.status_code
    assert [seen["path"] for seen in mesh.emulator.requests()] == ["/healthz"]
    log = mesh.envoy.log_text() + mesh.extproc.log_text()
    assert not [canary for canary in CANARIES if canary in log]


def test_ingress_gateway_runs_every_request_through_the_service(
        stack: Stack, tmp_path: Path) -> None:
    """The GATEWAY filter on a running Envoy: any host, the service's provider choice
    routed to that provider's mesh cluster, no key refused before any upstream."""
    gateway = Mesh(stack, tmp_path, "GATEWAY", ISTIO / "gateway" / "envoyfilter.yaml")
    gateway.emulator.clear()
    refused = gateway.chat("llm.example.com", chat_body(), key=None)
    assert refused.status_code == 401
    assert refused.json()["error"]["type"] == "authentication_error"
    assert gateway.emulator.requests() == []
    answered = gateway.chat("llm.example.com", chat_body("claude-test"))
    assert answered.status_code == 200, answered.text
    assert answered.headers["x-asc-provider"] == "anthropic"
    (seen,) = gateway.emulator.requests()
    assert (seen["path"], seen["headers"]["host"]) == ("/v1/messages", "api.anthropic.com")
    assert seen["headers"]["x-api-key"] == provider_fingerprint(PROVIDER_KEY_EU)
