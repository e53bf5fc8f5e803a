"""Operating the service: fail-closed Envoy, hot reload, workers, drain, health, Envoy YAML."""

from __future__ import annotations

import json
import signal
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
import redis
import yaml
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from extproc.config import load_config
from extproc.devstack import ManagedProcess, Stack, envoy_binary, free_port
from extproc.envoy_bootstrap import EnvoyPorts, render_yaml
from tests.conftest import (
    ACME_KEY,
    ACME_KEY_2,
    CHAT,
    Gateway,
    chat_body,
    gateway_config,
    only_json_line,
    start_gateway,
    write_config,
)
from tests.e2e.test_budgets import month_counter
from tests.e2e.test_request_path import metric_value
from tests.polling import wait_for

REPO = Path(__file__).resolve().parents[2]


def _post(base_url: str, key: str = ACME_KEY, timeout: float = 15) -> httpx.Response:
    return httpx.post(f"{base_url}{CHAT}", json=chat_body(), timeout=timeout,
                      headers={"authorization": f"Bearer {key}"})


def _envoy_with_extproc_at(stack: Stack, emulator_port: int, extproc_port: int,
                           message_timeout_ms: int = 2000) -> tuple[str, ManagedProcess]:
    config_path = write_config(stack.workdir / "config", gateway_config(emulator_port))
    listen_port, admin_socket = free_port(), stack.admin_socket()
    ports = EnvoyPorts(listen_port=listen_port, admin_socket=str(admin_socket),
                       extproc_port=extproc_port, message_timeout_ms=message_timeout_ms)
    envoy = stack.start_envoy(render_yaml(load_config(config_path), ports),
                              listen_port=listen_port, admin_socket=admin_socket)
    return f"http://127.0.0.1:{listen_port}", envoy


def _details(envoy: ManagedProcess) -> str:
    """Envoy's response details of the one request its access log has (decision 0141:
    they are the operator's, never in the client's answer)."""
    return str(only_json_line(envoy)["details"])


def test_extproc_down_fails_closed_with_json(stack: Stack) -> None:
    _, emulator_port = stack.start_emulator(["provider-key"])
    base_url, envoy = _envoy_with_extproc_at(stack, emulator_port, free_port())

    response = _post(base_url)

    assert response.status_code == 500
    assert response.headers["content-type"] == "application/json"
    assert response.json() == {"error": {
        "message": "The gateway could not process the request.", "type": "gateway_error",
        "param": None, "code": "internal_error"}}
    assert _details(envoy).startswith("ext_proc_error_gRPC_error_14")
    recorded = httpx.get(f"http://127.0.0.1:{emulator_port}/_emulator/requests").json()
    assert recorded["requests"] == []


class _SilentProcessor(pb_grpc.ExternalProcessorServicer):  # type: ignore[misc]
    """An ext_proc that reads messages and never answers: the 'too slow' service."""

    def __init__(self) -> None:
        self.release = threading.Event()

    def Process(self, request_iterator: Iterator[Any], context: Any) -> Iterator[Any]:
        next(request_iterator, None)
        self.release.wait(10)
        return iter(())


@pytest.fixture
def silent_extproc() -> Iterator[int]:
    servicer = _SilentProcessor()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    pb_grpc.add_ExternalProcessorServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield port
    servicer.release.set()
    server.stop(0)


def test_slow_extproc_times_out_with_json_504(stack: Stack, silent_extproc: int) -> None:
    _, emulator_port = stack.start_emulator(["provider-key"])
    base_url, envoy = _envoy_with_extproc_at(stack, emulator_port, silent_extproc,
                                             message_timeout_ms=300)

    started = time.monotonic()
    response = _post(base_url)
    elapsed = time.monotonic() - started

    assert response.status_code == 504
    assert response.json() == {"error": {"message": "The gateway timed out.",
                                         "type": "gateway_error", "param": None,
                                         "code": "gateway_timeout"}}
    assert _details(envoy).startswith("ext_proc_error")
    assert elapsed < 5  # message_timeout is 0.3 s; the route timeout (300 s) must not apply
    recorded = httpx.get(f"http://127.0.0.1:{emulator_port}/_emulator/requests").json()
    assert recorded["requests"] == []


def _reloads(gateway: Gateway, result: str) -> float:
    return metric_value(gateway.metrics(), "asc_config_reloads_total", result=result)


def test_hot_reload_on_file_change_and_bad_config_keeps_the_old(stack: Stack) -> None:
    gateway = start_gateway(stack, stack.workdir / "config")
    assert gateway.chat(chat_body(), key=ACME_KEY_2).status_code == 401

    write_config(gateway.config_path.parent,
                 gateway_config(gateway.emulator.port, extra_acme_keys=True))
    assert wait_for(lambda: gateway.chat(chat_body(), key=ACME_KEY_2).status_code == 200)
    assert _reloads(gateway, "success") == 1

    gateway.config_path.write_text("version: 1\nproviders: [oops\n", encoding="utf-8")
    assert wait_for(lambda: _reloads(gateway, "failure") == 1)
    assert gateway.chat(chat_body(), key=ACME_KEY_2).status_code == 200
    assert gateway.chat(chat_body(), key=ACME_KEY).status_code == 200
    log = gateway.extproc.log_text()
    assert "config reload failed; keeping the previous config" in log


def _gateway_clients(redis_port: int) -> int:
    """Connections to this redis-server other than the one asking."""
    with redis.Redis(port=redis_port) as client:
        return len(client.client_list()) - 1


def _audit_stream_ids(redis_port: int) -> list[str]:
    """Request ids of the records in the audit stream (`asc:audit`) of this redis-server."""
    with redis.Redis(port=redis_port) as client:
        entries = [json.loads(fields[b"e"]) for _, fields in client.xrange("asc:audit")]
    return [e["request_id"] for e in entries if e["type"] == "record"]


def test_a_reload_to_another_redis_closes_the_old_connections(stack: Stack) -> None:
    _, old_port = stack.start_redis()
    _, new_port = stack.start_redis()

    def on(port: int) -> Any:
        def document(emulator_port: int) -> dict[str, Any]:
            doc = gateway_config(emulator_port)
            doc["redis"] = {"url": f"redis://127.0.0.1:{port}/0"}
            doc["tenants"]["acme"]["budgets"] = [
                {"scope": "tenant", "window": "month", "limit_usd": 100}]
            doc.setdefault("audit", {})["sinks"] = ["jsonl", "redis"]
            return doc
        return document

    gateway = start_gateway(stack, stack.workdir / "config", document=on(old_port))
    first = gateway.chat(chat_body())
    assert first.status_code == 200
    assert _gateway_clients(old_port) > 0
    assert wait_for(lambda: _audit_stream_ids(old_port) == [
        first.headers["x-asc-request-id"]])

    write_config(gateway.config_path.parent, on(new_port)(gateway.emulator.port))
    assert wait_for(lambda: _reloads(gateway, "success") == 1)
    spent_before = month_counter(old_port)
    second = gateway.chat(chat_body())
    assert second.status_code == 200
    assert month_counter(old_port) == spent_before
    # The new Redis holds the budget from now on: the same request, the same charge.
    assert wait_for(lambda: month_counter(new_port) == spent_before)
    # And the audit stream: the record of the request after the reload is there, not in
    # the old one (before, the redis sink kept the start-up client).
    assert wait_for(lambda: _audit_stream_ids(new_port) == [
        second.headers["x-asc-request-id"]])
    assert _audit_stream_ids(old_port) == [first.headers["x-asc-request-id"]]
    # The old client, its ledger connections and the key listener's: closed after the
    # drain period (2 s here); before, they stayed open for the life of the process.
    assert wait_for(lambda: _gateway_clients(old_port) == 0)
    assert gateway.chat(chat_body()).status_code == 200


def test_sighup_reloads(stack: Stack) -> None:
    gateway = start_gateway(stack, stack.workdir / "config")
    gateway.extproc.popen.send_signal(signal.SIGHUP)
    assert wait_for(lambda: _reloads(gateway, "success") == 1)
    assert '"reason":"SIGHUP"' in gateway.extproc.log_text()
    assert gateway.chat(chat_body()).status_code == 200


def test_graceful_drain_finishes_in_flight_requests(stack: Stack) -> None:
    gateway = start_gateway(stack, stack.workdir / "config")
    result: dict[str, httpx.Response] = {}

    def slow_call() -> None:
        result["response"] = gateway.chat(chat_body())

    gateway.emulator.queue_fault(delay_ms=1000)  # client x-emulator-* headers are stripped

    caller = threading.Thread(target=slow_call)
    caller.start()
    assert wait_for(lambda: len(gateway.emulator.requests()) == 1, timeout=5)
    gateway.extproc.popen.send_signal(signal.SIGTERM)
    caller.join(15)

    assert result["response"].status_code == 200
    assert gateway.extproc.popen.wait(10) == 0
    assert '"msg":"draining"' in gateway.extproc.log_text()


def test_workers_share_the_port_and_metrics_are_merged(stack: Stack) -> None:
    gateway = start_gateway(stack, stack.workdir / "config", workers=2)
    statuses = [gateway.chat(chat_body()).status_code for _ in range(20)]
    assert statuses == [200] * 20
    labels = {"tenant": "acme", "provider": "emu-eu", "status": "200"}
    assert wait_for(
        lambda: metric_value(gateway.metrics(), "asc_requests_total", **labels) == 20)

    def serving() -> set[int]:
        return {json.loads(line)["pid"] for line in gateway.extproc.log_text().splitlines()
                if '"msg":"extproc serving"' in line}

    # The gateway is up once one worker serves; the other may log a moment later.
    assert wait_for(lambda: len(serving()) == 2)


def test_grpc_health_reports_serving(gateway: Gateway) -> None:
    with grpc.insecure_channel(f"127.0.0.1:{gateway.extproc_port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for service in ("", "envoy.service.ext_proc.v3.ExternalProcessor"):
            reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING


def _envoy_yaml_files() -> list[Path]:
    found = []
    for root in (REPO / "envoy", REPO / "deploy"):
        for path in sorted([*root.rglob("*.yaml"), *root.rglob("*.yml")]):
            # Manifests under deploy/ hold several documents; a bootstrap is one.
            documents = list(yaml.safe_load_all(path.read_text(encoding="utf-8")))
            if len(documents) == 1 and isinstance(documents[0], dict) and (
                    "static_resources" in documents[0]):
                found.append(path)
    return found


def test_every_envoy_yaml_in_the_repo_is_found() -> None:
    # envoy/*.yaml equal their render: tests/integration/test_render_shapes.py.
    assert {REPO / "envoy" / name for name in (
        "envoy.yaml", "envoy-sidecar.yaml", "envoy-edge.yaml")} <= set(_envoy_yaml_files())


@pytest.mark.parametrize("path", _envoy_yaml_files(), ids=lambda p: str(p.relative_to(REPO)))
def test_envoy_yaml_validates(path: Path, tmp_path: Path) -> None:
    import subprocess

    completed = subprocess.run(
        [envoy_binary(), "--mode", "validate", "-c", str(path), "--base-id", str(free_port())],
        capture_output=True, text=True, timeout=60, cwd=tmp_path, check=False)
    assert completed.returncode == 0, completed.stdout + completed.stderr
    assert f"configuration '{path}' OK" in completed.stdout + completed.stderr


@pytest.mark.parametrize("path", _envoy_yaml_files(), ids=lambda p: str(p.relative_to(REPO)))
def test_no_envoy_yaml_in_the_repo_has_tcp_admin(path: Path) -> None:
    document = yaml.safe_load(path.read_text(encoding="utf-8"))
    admin = document.get("admin")
    assert admin is None or set(admin["address"]) == {"pipe"}
    assert admin is None or admin["address"]["pipe"]["mode"] == 0o600

