"""The Envoy container's preStop hook of overlays/standalone, run as written against a
real Envoy started with the container's own drain arguments: before the hook an HTTP/1.1
connection stays open; after it, answers carry `connection: close`, so clients leave the
terminating pod while its in-flight requests finish."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from extproc.devstack import Stack, envoy_binary, free_port, wait_for_admin, wait_for_port
from tests.deploy.kustomize import K8S, kustomize

pytestmark = pytest.mark.e2e

ADMIN_SOCKET = "/run/asc/envoy-admin.sock"


def _envoy_container() -> dict[str, Any]:
    (deployment,) = [doc for doc in kustomize(K8S / "overlays" / "standalone")
                     if doc["kind"] == "Deployment"]
    (envoy,) = [container for container in deployment["spec"]["template"]["spec"][
        "containers"] if container["name"] == "envoy"]
    found: dict[str, Any] = envoy
    return found


def test_prestop_hook_drains_envoy(stack: Stack, tmp_path: Path) -> None:
    envoy = _envoy_container()
    args = envoy["args"]
    drain_args = args[args.index("--drain-time-s"):args.index("--drain-strategy") + 2]
    assert drain_args == ["--drain-time-s", "20", "--drain-strategy", "immediate"]
    command = envoy["lifecycle"]["preStop"]["exec"]["command"]
    assert command[:2] == ["python", "-c"]
    hook = command[2]
    assert ADMIN_SOCKET in hook
    assert "time.sleep(15)" in hook

    port, admin = free_port(), stack.admin_socket("drain")
    bootstrap = {
        "admin": {"address": {"pipe": {"path": str(admin), "mode": 0o600}}},
        "static_resources": {"listeners": [{
            "name": "plain",
            "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}},
            "filter_chains": [{"filters": [{
                "name": "envoy.filters.network.http_connection_manager",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.network."
                             "http_connection_manager.v3.HttpConnectionManager",
                    "stat_prefix": "plain",
                    "route_config": {"virtual_hosts": [{
                        "name": "all", "domains": ["*"], "routes": [{
                            "match": {"prefix": "/"},
                            "direct_response": {"status": 200,
                                                "body": {"inline_string": "ok"}}}]}]},
                    "http_filters": [{"name": "envoy.filters.http.router", "typed_config": {
                        "@type": "type.googleapis.com/envoy.extensions.filters.http.router"
                                 ".v3.Router"}}],
                }}]}],
        }]},
    }
    path = tmp_path / "envoy.yaml"
    path.write_text(yaml.safe_dump(bootstrap), encoding="utf-8")
    process = stack.spawn("envoy-drain", [envoy_binary(), "-c", str(path), *drain_args,
                                          "--base-id", str(port), "--concurrency", "1",
                                          "--log-level", "warn"])
    wait_for_admin(admin, process=process)
    wait_for_port(port, process=process)

    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as client:
        before = client.get("/")
        assert (before.status_code, before.text) == (200, "ok")
        assert "connection" not in before.headers

        # The hook as the kubelet runs it, on this Envoy's socket and without the wait.
        hook_here = hook.replace(ADMIN_SOCKET, str(admin)).replace("time.sleep(15)", "")
        subprocess.run([sys.executable, "-c", hook_here], check=True, timeout=30)

        after = client.get("/")
        assert (after.status_code, after.text) == (200, "ok")
        assert after.headers["connection"] == "close"
