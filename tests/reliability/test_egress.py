"""Scenario 11: no request makes Envoy connect anywhere outside the configured providers.

A trap port listens on loopback; requests name it every way a client could try to steer
a proxy (Host / :authority, an absolute URI, CONNECT, forwarding and Envoy routing
headers, the routing header itself, URLs in the body and in image parts, an h2c request).
The figure is the number of connections the trap saw: 0. The Envoy admin's cluster
listing names only the configured provider endpoints and the service.
"""

from __future__ import annotations

import json
import socket
import threading

from extproc.devstack import Stack
from tests.conftest import ACME_KEY, CHAT, chat_body, envoy_admin
from tests.e2e.test_envoy_hardening import h2c_request
from tests.polling import wait_for
from tests.reliability.conftest import Replicas, budget_document, figure, start_replicas


class Trap:
    """A loopback listener that counts every connection made to it."""

    def __init__(self) -> None:
        self._server = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._server.getsockname()[1]
        self.connections = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._server.accept()
            except OSError:
                return
            self.connections += 1
            conn.close()

    def close(self) -> None:
        self._server.close()


def raw(port: int, request: bytes) -> bytes:
    """One raw HTTP/1.1 exchange; Envoy closes (Connection: close) after its answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(request)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    return data


def attempts(fleet: Replicas, trap: int) -> list[int]:
    """Every steering attempt; returns the status each got."""
    where = f"127.0.0.1:{trap}"
    url = f"http://{where}"
    auth = {"authorization": f"Bearer {ACME_KEY}"}
    statuses = []
    header_sets = [
        {"host": where}, {"x-forwarded-host": where}, {"x-forwarded-proto": "https"},
        {"x-envoy-original-dst-host": where}, {"x-asc-cluster": "asc_extproc"},
        {"x-envoy-upstream-alt-stat-name": where}, {"x-host": where},
        {"x-envoy-internal": "true", "x-asc-cluster": "emu_us"},
        {"upgrade": "websocket", "connection": "upgrade"},
        {"x-original-url": url}, {"forwarded": f"host={where}"},
    ]
    for extra in header_sets:
        statuses.append(fleet.client.post(CHAT, json=chat_body(),
                                          headers={**auth, **extra}).status_code)
    bodies = [
        chat_body(base_url=url), chat_body(model=url), chat_body(model=f"{where}/gpt-4o-mini"),
        chat_body(api_base=url, user=url),
        {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": f"{url}/cat.png"}}]}]},
    ]
    for body in bodies:
        statuses.append(fleet.client.post(CHAT, json=body, headers=auth).status_code)
    payload = json.dumps(chat_body()).encode()
    heads = [
        f"POST {url}{CHAT} HTTP/1.1\r\nhost: {where}\r\n",
        f"POST //{where}{CHAT} HTTP/1.1\r\nhost: 127.0.0.1\r\n",
        f"CONNECT {where} HTTP/1.1\r\nhost: {where}\r\n",
    ]
    for head in heads:
        answer = raw(fleet.listen_port, (
            f"{head}authorization: Bearer {ACME_KEY}\r\ncontent-type: application/json\r\n"
            f"content-length: {len(payload)}\r\nconnection: close\r\n\r\n").encode() + payload)
        statuses.append(int(answer.split(b" ", 2)[1]) if answer else 0)
    reply = h2c_request(fleet.listen_port, [
        (":method", "POST"), (":scheme", "http"), (":authority", where), (":path", CHAT),
        ("content-type", "application/json"), ("authorization", f"Bearer {ACME_KEY}")],
        data=payload)
    statuses.append(reply.status or 0)
    return statuses


def test_no_request_makes_envoy_connect_outside_the_provider_list(stack: Stack) -> None:
    _, redis_port = stack.start_redis()
    fleet = start_replicas(stack, budget_document(redis_port), redis_port=redis_port,
                           replicas=1)
    trap = Trap()
    socket.create_connection(("127.0.0.1", trap.port)).close()  # the trap does count
    assert wait_for(lambda: trap.connections == 1)
    trap.connections = 0
    try:
        statuses = attempts(fleet, trap.port)
        # Every 200 was served by the configured emulator (so were two provider 400s:
        # the emulator refuses the unknown fields base_url and api_base).
        assert wait_for(lambda: len(fleet.emulator.requests()) >= statuses.count(200))
    finally:
        trap.close()
    recorded = fleet.emulator.requests()
    clusters = _cluster_hosts(fleet)
    figure("egress_trap_connections", trap.connections)
    figure("egress_attempts", f"{len(statuses)} ({statuses.count(200)} served by the"
           f" configured provider)")

    assert trap.connections == 0
    # 0: Envoy closed the CONNECT attempt without an answer.
    assert set(statuses) <= {0, 200, 400, 403, 404}
    assert {(r["path"], r["headers"]["host"]) for r in recorded} == {
        (CHAT, f"127.0.0.1:{fleet.emulator.port}")}
    assert clusters == {f"127.0.0.1:{fleet.emulator.port}", *(
        f"127.0.0.1:{p}" for p in fleet.extproc_ports)}


def _cluster_hosts(fleet: Replicas) -> set[str]:
    """host:port of every endpoint of every Envoy cluster."""
    text = envoy_admin(fleet.stack.admin_socket(), "GET", "/clusters").text
    return {line.split("::")[1] for line in text.splitlines()
            if line.count("::") >= 3 and line.split("::")[2] == "cx_total"}
