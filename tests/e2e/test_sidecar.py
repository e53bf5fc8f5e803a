"""The sidecar shape end to end: a real Envoy rendered by `extproc envoy render --shape
sidecar`, the real service on its Unix socket (`extproc serve --listen unix:PATH`), the
emulator as the provider. A request flows; the gateway fails closed when the socket is
gone; SIGTERM drains in-flight requests without failing one."""

from __future__ import annotations

import json
import os
import signal
import stat
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import grpc
import httpx
from grpc_health.v1 import health_pb2, health_pb2_grpc

from extproc.cli import main as extproc_cli
from extproc.devstack import ManagedProcess, Stack, free_port
from extproc.emulator.app import key_fingerprint
from extproc.listen import worker_socket_paths
from tests.conftest import (
    ACME_KEY,
    CHAT,
    PROVIDER_KEY_EU,
    PROVIDER_KEY_US,
    Emulator,
    chat_body,
    envoy_admin,
    gateway_config,
    provider_env,
    write_config,
)
from tests.polling import wait_for

EMULATOR_REPLY = "Hello from the emulator."
_EXT_PROC_SERVICE = "envoy.service.ext_proc.v3.ExternalProcessor"


@dataclass
class Sidecar:
    """Envoy and the service as one pod would run them, sharing a socket directory."""

    stack: Stack
    emulator: Emulator
    service: ManagedProcess
    socket: Path
    """The service's `--listen unix:` path (with workers: NAME-0.sock, NAME-1.sock...)."""
    envoy: ManagedProcess
    listen_port: int
    admin_socket: Path

    def chat(self, timeout: float = 15) -> httpx.Response:
        return httpx.post(f"http://127.0.0.1:{self.listen_port}{CHAT}", json=chat_body(),
                          headers={"authorization": f"Bearer {ACME_KEY}"}, timeout=timeout)


def _health(path: str) -> int:
    with grpc.insecure_channel(f"unix:{path}") as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=_EXT_PROC_SERVICE), timeout=2)
    status: int = reply.status
    return status


def _serving(path: str) -> bool:
    try:
        status = _health(path)
    except grpc.RpcError:
        return False
    return bool(status == health_pb2.HealthCheckResponse.SERVING)


def _up(path: str, service: ManagedProcess) -> bool:
    """Serving on `path`, or dead (the caller then shows its log)."""
    return _serving(path) or not service.alive()


def start_sidecar(stack: Stack, *, workers: int = 1,
                  document: Callable[[int], dict[str, Any]] = gateway_config) -> Sidecar:
    emulator_process, emulator_port = stack.start_emulator([PROVIDER_KEY_EU, PROVIDER_KEY_US])
    config_path = write_config(stack.workdir / "config", document(emulator_port))
    # The pod's shared volume: a private, short directory (socket paths hold 107 bytes).
    admin_socket = stack.admin_socket()
    socket = admin_socket.parent / "extproc.sock"
    service = stack.spawn("extproc", [
        sys.executable, "-m", "extproc", "serve", "--config", str(config_path),
        "--listen", f"unix:{socket}", "--metrics-listen", f"127.0.0.1:{free_port()}",
        "--workers", str(workers), "--drain-seconds", "10",
    ], env=dict(stack.env, **provider_env()))
    for path in worker_socket_paths(str(socket), workers):
        assert wait_for(partial(_up, path, service), timeout=30)
        assert service.alive(), service.log_text()[-3000:]

    listen_port = free_port()
    bootstrap = stack.workdir / "envoy-sidecar.yaml"
    assert extproc_cli([
        "envoy", "render", "--shape", "sidecar", "--config", str(config_path),
        "--listen-address", "127.0.0.1", "--listen-port", str(listen_port),
        "--admin-socket", str(admin_socket), "--extproc-socket", str(socket),
        "--extproc-workers", str(workers), "--output", str(bootstrap),
    ]) == 0
    envoy = stack.start_envoy(bootstrap.read_text(encoding="utf-8"), listen_port=listen_port,
                              admin_socket=admin_socket)
    return Sidecar(stack=stack, emulator=Emulator(emulator_port, emulator_process),
                   service=service, socket=socket, envoy=envoy, listen_port=listen_port,
                   admin_socket=admin_socket)


def _assert_completed(response: httpx.Response) -> None:
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model"] == "gpt-4o-mini-eu"
    assert body["choices"][0]["message"] == {"role": "assistant", "content": EMULATOR_REPLY}
    assert response.headers["x-asc-provider"] == "emu-eu"
    assert response.headers["x-asc-credential"] == "emu-eu-1@1"


def _access_log_lines(sidecar: Sidecar) -> list[dict[str, object]]:
    return [json.loads(line) for line in sidecar.envoy.log_text().splitlines()
            if line.startswith("{")]


def test_a_request_flows_over_the_unix_socket(stack: Stack) -> None:
    sidecar = start_sidecar(stack)
    assert stat.S_IMODE(os.stat(sidecar.socket).st_mode) == 0o660
    assert _health(str(sidecar.socket)) == health_pb2.HealthCheckResponse.SERVING

    response = sidecar.chat()

    _assert_completed(response)
    [seen] = sidecar.emulator.requests()
    assert seen["path"] == CHAT
    assert seen["headers"]["authorization"] == "Bearer " + key_fingerprint(PROVIDER_KEY_EU)
    # Envoy's access line carries the gateway's request id: it joins the audit record.
    request_id = response.headers["x-asc-request-id"]
    assert wait_for(lambda: any(line.get("request_id") == request_id
                                for line in _access_log_lines(sidecar)))
    [line] = [line for line in _access_log_lines(sidecar) if line["request_id"] == request_id]
    assert (line["tenant"], line["provider"], line["region"], line["credential"],
            line["status"]) == ("acme", "emu-eu", "eu-west-1", "emu-eu-1@1", 200)
    # Envoy admin answers on its own socket only (mode 0600).
    assert stat.S_IMODE(os.stat(sidecar.admin_socket).st_mode) == 0o600
    assert envoy_admin(sidecar.admin_socket, "GET", "/ready").status_code == 200


def test_a_second_service_never_takes_over_a_live_socket(stack: Stack) -> None:
    sidecar = start_sidecar(stack)
    command = [str(word) for word in sidecar.service.popen.args]  # type: ignore[union-attr]
    # The same command on its own metrics port: only the socket is contested.
    command[command.index("--metrics-listen") + 1] = f"127.0.0.1:{free_port()}"
    second = stack.spawn("extproc-second", command, env=dict(stack.env, **provider_env()))

    assert second.popen.wait(30) == 2
    assert '"msg":"cannot start: listen address unusable"' in second.log_text()
    assert f"another process is serving on '{sidecar.socket}'" in second.log_text()
    # gRPC alone would have unlinked the first service's socket and bound its own.
    assert sidecar.service.alive()
    _assert_completed(sidecar.chat())


def test_fails_closed_when_the_socket_is_gone(stack: Stack) -> None:
    sidecar = start_sidecar(stack)
    _assert_completed(sidecar.chat())
    sidecar.emulator.clear()

    assert sidecar.service.stop() == 0
    assert not sidecar.socket.exists()
    response = sidecar.chat()

    assert response.status_code == 500
    assert response.headers["content-type"] == "application/json"
    assert response.json() == {"error": {
        "message": "The gateway could not process the request.",
        "type": "gateway_error",
        "param": None,
        "code": "internal_error",
    }}
    assert sidecar.emulator.requests() == []


def test_sigterm_drains_in_flight_requests(stack: Stack) -> None:
    sidecar = start_sidecar(stack)
    in_flight = 20
    sidecar.emulator.queue_fault(delay_ms=1500, count=in_flight)
    responses: list[httpx.Response] = []
    failures: list[BaseException] = []
    lock = threading.Lock()

    def call() -> None:
        try:
            response = sidecar.chat(timeout=30)
        except BaseException as exc:  # reported by the assertion below
            with lock:
                failures.append(exc)
            return
        with lock:
            responses.append(response)

    callers = [threading.Thread(target=call) for _ in range(in_flight)]
    for caller in callers:
        caller.start()
    # All 20 reached the provider: each holds an open ext_proc stream to the service.
    assert wait_for(lambda: len(sidecar.emulator.requests()) == in_flight, timeout=20)
    sidecar.service.popen.send_signal(signal.SIGTERM)
    for caller in callers:
        caller.join(30)

    assert failures == []
    assert [r.status_code for r in responses] == [200] * in_flight
    for response in responses:
        _assert_completed(response)
    assert sidecar.service.popen.wait(15) == 0
    assert '"msg":"draining"' in sidecar.service.log_text()
    assert not sidecar.socket.exists()
    # Drained and gone: the next request fails closed instead of reaching the provider.
    assert sidecar.chat().status_code == 500
    assert len(sidecar.emulator.requests()) == in_flight


def test_workers_get_one_socket_each_and_envoy_spreads_streams(stack: Stack) -> None:
    sidecar = start_sidecar(stack, workers=2)
    sockets = [Path(p) for p in worker_socket_paths(str(sidecar.socket), 2)]
    assert [p.name for p in sockets] == ["extproc-0.sock", "extproc-1.sock"]
    assert [stat.S_IMODE(os.stat(p).st_mode) for p in sockets] == [0o660, 0o660]
    assert not sidecar.socket.exists()

    def host_stats() -> dict[str, dict[str, str]]:
        text = envoy_admin(sidecar.admin_socket, "GET", "/clusters").text
        stats: dict[str, dict[str, str]] = {}
        for line in text.splitlines():
            parts = line.split("::")
            if parts[0] == "asc_extproc" and len(parts) == 4 and parts[1].startswith("/"):
                stats.setdefault(parts[1], {})[parts[2]] = parts[3]
        return stats

    # Envoy health-checks each socket (gRPC health) before sending it streams.
    assert wait_for(lambda: [s.get("health_flags") for s in host_stats().values()]
                    == ["healthy", "healthy"], timeout=20), host_stats()
    for _ in range(20):
        _assert_completed(sidecar.chat())

    stats = host_stats()
    assert sorted(stats) == [f"{p}" for p in sorted(str(p) for p in sockets)]
    assert all(int(s["rq_total"]) > 0 for s in stats.values()), stats
    serving = [json.loads(line)["listen"] for line in sidecar.service.log_text().splitlines()
               if '"msg":"extproc serving"' in line]
    assert sorted(serving) == [f"unix:{p}" for p in sockets]


def test_a_killed_service_leaves_a_stale_socket_that_its_successor_replaces(
        stack: Stack) -> None:
    sidecar = start_sidecar(stack)
    sidecar.service.kill()  # SIGKILL: no cleanup, the socket file stays
    assert stat.S_ISSOCK(sidecar.socket.lstat().st_mode)
    sidecar.emulator.clear()

    refused = sidecar.chat()
    assert refused.status_code == 500
    assert refused.json()["error"]["message"] == "The gateway could not process the request."
    assert sidecar.emulator.requests() == []

    command = [str(word) for word in sidecar.service.popen.args]  # type: ignore[union-attr]
    successor = stack.spawn("extproc-successor", command, env=dict(stack.env, **provider_env()))
    assert wait_for(partial(_up, str(sidecar.socket), successor), timeout=30)
    assert successor.alive(), successor.log_text()[-3000:]
    # Envoy reconnects to the new socket at the same path: no Envoy restart.
    _assert_completed(sidecar.chat())


def _two_eu_deployments(emulator_port: int) -> dict[str, Any]:
    """acme's model on two eu deployments with their own keys: a failed attempt on the
    first is retried on the second, re-keyed by the per-attempt ext_proc."""
    document = gateway_config(emulator_port)
    document["failover"] = {"max_attempts": 2}
    document["credentials"]["emu-eu2-1"] = {"env": "TEST_PROVIDER_KEY_US"}
    document["providers"]["emu-eu2"] = {
        "kind": "openai", "base_url": f"http://127.0.0.1:{emulator_port}",
        "region": "eu-west-2", "zone": "eu", "cluster": "emu_eu2", "credentials": ["emu-eu2-1"]}
    document["models"]["gpt-4o-mini"]["deployments"].append(
        {"provider": "emu-eu2", "model": "gpt-4o-mini-eu2"})
    return document


def test_the_per_attempt_ext_proc_also_goes_over_the_socket(stack: Stack) -> None:
    sidecar = start_sidecar(stack, document=_two_eu_deployments)
    sidecar.emulator.queue_fault(status=503, count=1)

    response = sidecar.chat()

    assert response.status_code == 200, response.text
    assert response.json()["model"] == "gpt-4o-mini-eu2"
    assert response.headers["x-asc-provider"] == "emu-eu2"
    first, second = sidecar.emulator.requests()
    # Each attempt carried its own deployment's key and model: the upstream ext_proc
    # stream of attempt 2 reached the service over the Unix socket.
    assert first["headers"]["authorization"] == "Bearer " + key_fingerprint(PROVIDER_KEY_EU)
    assert json.loads(first["body"])["model"] == "gpt-4o-mini-eu"
    assert second["headers"]["authorization"] == "Bearer " + key_fingerprint(PROVIDER_KEY_US)
    assert json.loads(second["body"])["model"] == "gpt-4o-mini-eu2"


def test_workers_take_a_canary_retry_whose_stream_reaches_another_worker(
        stack: Stack) -> None:
    """`--workers 3`: Envoy spreads streams over the three sockets (least request), so a
    canary's retry stream often reaches another worker than its request's; it is rebuilt
    there on the active key version (decision 0135). The bad canary never answers."""
    from tests.e2e.test_credentials import (
        CREDENTIAL,
        bearer,
        canary_key,
        keyring_document,
        prepare,
        seen_keys,
    )

    redis_port = stack.start_redis()[1]
    good, bad = canary_key("v1"), canary_key("v2-bad")
    document = keyring_document(redis_port, secrets={"rollback_after": 1000})
    ring = prepare(stack, document, redis_port)
    ring.keys.ok("add", CREDENTIAL, secret=good)
    ring.keys.ok("add", CREDENTIAL, secret=bad)
    ring.keys.ok("rotate", "canary", CREDENTIAL, "--version", "2", "--percent", "50")
    sidecar = start_sidecar(stack, workers=3, document=document)
    response = sidecar.emulator.client.put("/_emulator/keys", json={"keys": [good]})
    assert response.status_code == 204, response.text
    answers = [sidecar.chat() for _ in range(30)]
    assert [(r.status_code, r.headers.get("x-asc-credential")) for r in answers] == [
        (200, f"{CREDENTIAL}@1")] * 30
    assert not any("x-asc-attempt" in r.headers for r in answers)
    provider_saw = seen_keys(sidecar.emulator.requests())
    assert provider_saw.count(bearer(good)) == 30
    assert provider_saw.count(bearer(bad)) >= 1
    assert len(provider_saw) == 30 + provider_saw.count(bearer(bad))


def _fast_document(emulator_port: int) -> dict[str, Any]:
    """The fast path on, and the model served under its own name (a renamed model needs
    its body rewritten: full path)."""
    document = gateway_config(emulator_port)
    document["models"]["gpt-4o-mini"]["deployments"] = [{"provider": "emu-us"},
                                                        {"provider": "emu-eu"}]
    document["fast_path"] = {"enabled": True, "flush_interval_ms": 20}
    return document


def _door_requests(sidecar: Sidecar) -> dict[str, int]:
    """Completed checks per fast-door socket, from Envoy's cluster stats."""
    text = envoy_admin(sidecar.admin_socket, "GET", "/clusters").text
    found: dict[str, int] = {}
    for line in text.splitlines():
        name, _, rest = line.partition("::")
        if name == "asc_fast_door" and "::rq_total::" in rest:
            address, _, count = rest.partition("::rq_total::")
            found[address] = int(count)
    return found


def test_the_fast_door_serves_each_worker_on_its_own_socket(stack: Stack) -> None:
    sidecar = start_sidecar(stack, workers=2, document=_fast_document)
    doors = [path + ".door" for path in worker_socket_paths(str(sidecar.socket), 2)]
    for door in doors:
        assert stat.S_IMODE(os.stat(door).st_mode) == 0o660

    responses = [sidecar.chat() for _ in range(40)]

    assert {r.status_code for r in responses} == {200}
    assert {r.headers["x-asc-provider"] for r in responses} == {"emu-eu"}
    for seen in sidecar.emulator.requests():
        assert seen["headers"]["authorization"] == "Bearer " + key_fingerprint(PROVIDER_KEY_EU)
    # Every request was a check at a door; Envoy spread them over both workers' sockets.
    counts = _door_requests(sidecar)
    assert set(counts) == set(doors)
    assert sum(counts.values()) == 40
    assert all(count > 0 for count in counts.values())
