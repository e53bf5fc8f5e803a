"""Fixtures that start real processes (Envoy, extproc, emulator, redis-server) on free
loopback ports, plus factories for gateway configs. Every process is stopped after use.
"""

from __future__ import annotations

import json
import os
import secrets
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from extproc.auth import hash_key
from extproc.config import load_config
from extproc.devstack import ManagedProcess, Stack, free_port
from extproc.emulator.app import key_fingerprint
from extproc.envoy_bootstrap import EnvoyPorts, bootstrap_yaml, render_bootstrap
from extproc.secrets import Secret
from tests.polling import wait_for

PEPPER = "test-pepper-" + secrets.token_hex(8)
# Canary secrets: every one of them is grepped for in logs, metrics and error bodies.
ACME_KEY = "sk-canary-tenant-acme-" + secrets.token_hex(8)
ACME_KEY_2 = "sk-canary-tenant-acme2-" + secrets.token_hex(8)
GLOBEX_KEY = "sk-canary-tenant-globex-" + secrets.token_hex(8)
PROVIDER_KEY_EU = "sk-canary-provider-eu-" + secrets.token_hex(8)
PROVIDER_KEY_US = "sk-canary-provider-us-" + secrets.token_hex(8)
CANARIES = (PEPPER, ACME_KEY, ACME_KEY_2, GLOBEX_KEY, PROVIDER_KEY_EU, PROVIDER_KEY_US)
CHAT = "/v1/chat/completions"
FULL, FAST = "full", "fast"
PATHS = (FULL, FAST)
"""The two request paths every suite on the shared `gateway` runs on (issue 14)."""
PATH_VARIABLE = "ASC_TEST_PATH"
"""`fast` runs every private stack with the fast path on too (`make test-fast-path`)."""
FAST_FLUSH_INTERVAL_MS = 20
"""Envoy's access-log batch interval in the tests' fast configs: records come quickly."""


def gateway_config(emulator_port: int, *, extra_acme_keys: bool = False) -> dict[str, Any]:
    """A two-zone gateway config pointing at one emulator; plain data, ready to dump."""
    pepper = Secret(PEPPER)
    acme_keys = [{"id": "acme-main", "hash": hash_key(pepper, ACME_KEY)}]
    if extra_acme_keys:
        acme_keys.append({"id": "acme-second", "hash": hash_key(pepper, ACME_KEY_2)})
    base_url = f"http://127.0.0.1:{emulator_port}"
    return {
        "version": 1,
        "auth": {"pepper": {"file": "pepper.txt"}},
        "limits": {"max_body_bytes": 65536},
        "credentials": {
            "emu-eu-1": {"env": "TEST_PROVIDER_KEY_EU"},
            "emu-us-1": {"env": "TEST_PROVIDER_KEY_US"},
        },
        "providers": {
            "emu-eu": {"kind": "openai", "base_url": base_url, "region": "eu-west-1",
                       "zone": "eu", "cluster": "emu_eu", "credentials": ["emu-eu-1"]},
            "emu-us": {"kind": "openai", "base_url": base_url, "region": "us-east-1",
                       "zone": "us", "cluster": "emu_us", "credentials": ["emu-us-1"]},
        },
        "models": {
            "gpt-4o-mini": {
                "price": {"input_per_mtok": 0.15, "output_per_mtok": 0.6},
                "deployments": [{"provider": "emu-us", "model": "gpt-4o-mini"},
                                {"provider": "emu-eu", "model": "gpt-4o-mini-eu"}],
            },
            "gpt-4o": {
                "price": {"input_per_mtok": 2.5, "output_per_mtok": 10},
                "deployments": [{"provider": "emu-us"}],
            },
        },
        "tenants": {
            "acme": {"zone": "eu", "keys": acme_keys, "models": ["gpt-4o-mini"]},
            "globex": {"zone": "us",
                       "keys": [{"id": "globex-main", "hash": hash_key(pepper, GLOBEX_KEY)}],
                       "models": ["gpt-4o-mini", "gpt-4o"]},
        },
    }


def with_fast_path(document: dict[str, Any]) -> dict[str, Any]:
    """`document` with the fast path on for every tenant (docs/fast-path.md)."""
    return {**document, "fast_path": {"enabled": True,
                                      "flush_interval_ms": FAST_FLUSH_INTERVAL_MS}}


def fast_gateway_config(emulator_port: int) -> dict[str, Any]:
    return with_fast_path(gateway_config(emulator_port))


def write_config(directory: Path, document: dict[str, Any]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "pepper.txt").write_text(PEPPER + "\n", encoding="utf-8")
    path = directory / "asc.yaml"
    path.write_text(yaml.safe_dump(document, sort_keys=False), encoding="utf-8")
    return path


def provider_env() -> dict[str, str]:
    return {"TEST_PROVIDER_KEY_EU": PROVIDER_KEY_EU, "TEST_PROVIDER_KEY_US": PROVIDER_KEY_US}


@dataclass
class Emulator:
    port: int
    process: ManagedProcess
    client: httpx.Client = field(init=False)

    def __post_init__(self) -> None:
        self.client = httpx.Client(base_url=f"http://127.0.0.1:{self.port}", timeout=10)

    def requests(self) -> list[dict[str, Any]]:
        recorded: list[dict[str, Any]] = self.client.get("/_emulator/requests").json()["requests"]
        return recorded

    def clear(self) -> None:
        self.client.delete("/_emulator/requests")
        self.client.delete("/_emulator/faults")

    def queue_fault(self, **fault: Any) -> None:
        response = self.client.post("/_emulator/faults", json=fault)
        assert response.status_code in (200, 201, 204), response.text


@dataclass
class Gateway:
    """Envoy + extproc + emulator, as a client sees them."""

    stack: Stack
    config_path: Path
    emulator: Emulator
    extproc: ManagedProcess
    extproc_port: int
    metrics_port: int
    envoy: ManagedProcess
    listen_port: int
    admin_socket: Path
    """Envoy admin's Unix socket (mode 0600); Envoy has no TCP admin port."""
    path: str = FULL
    """`fast`: the config has `fast_path.enabled`, so a request that qualifies is decided
    by the fast door and settled and recorded from Envoy's access log; `full`: every
    request takes ext_proc."""
    client: httpx.Client = field(init=False)

    def __post_init__(self) -> None:
        self.client = httpx.Client(base_url=self.base_url, timeout=15)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.listen_port}"

    def chat(self, body: dict[str, Any] | bytes | None = None, *, key: str | None = ACME_KEY,
             headers: dict[str, str] | None = None) -> httpx.Response:
        all_headers = {"content-type": "application/json", **(headers or {})}
        if key is not None:
            all_headers["authorization"] = f"Bearer {key}"
        payload = body if isinstance(body, bytes) else json.dumps(
            body if body is not None else chat_body()).encode()
        return self.client.post(CHAT, content=payload, headers=all_headers)

    def metrics(self) -> str:
        return httpx.get(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5).text

    def admin(self, method: str, path: str) -> httpx.Response:
        """A call to Envoy's admin, over its Unix socket."""
        return envoy_admin(self.admin_socket, method, path)

    def access_log(self) -> list[dict[str, Any]]:
        """Envoy's access log lines so far (`reopen_logs` flushes what it buffered)."""
        self.admin("POST", "/reopen_logs")
        return json_lines(self.envoy)


def envoy_admin(socket_path: Path, method: str, path: str) -> httpx.Response:
    transport = httpx.HTTPTransport(uds=str(socket_path))
    with httpx.Client(transport=transport, base_url="http://envoy-admin", timeout=5) as client:
        return client.request(method, path)


def json_lines(process: ManagedProcess) -> list[dict[str, Any]]:
    """Access log lines (JSON objects) among a process's output (Envoy's stdout log)."""
    return [json.loads(line) for line in process.log_text().splitlines()
            if line.startswith("{")]


def only_json_line(process: ManagedProcess) -> dict[str, Any]:
    """The one access log line of a process that served one request (polled: Envoy
    writes it once the answer is done)."""
    assert wait_for(lambda: json_lines(process)), "no access log line"
    [line] = json_lines(process)
    return line


def chat_body(model: str = "gpt-4o-mini", **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": "Hello there"}], **extra}


def start_gateway(stack: Stack, config_dir: Path, *, workers: int = 1,
                  message_timeout_ms: int = 2000,
                  document: Callable[[int], dict[str, Any]] = gateway_config,
                  emulator_args: tuple[str, ...] = (),
                  edit_bootstrap: Callable[[dict[str, Any]], None] | None = None,
                  envoy_log_level: str = "warn", path: str | None = None) -> Gateway:
    """Emulator, extproc and Envoy on free ports; `edit_bootstrap` may change the rendered
    Envoy bootstrap in place before Envoy starts (to take one safeguard away in a test).
    `path`: FAST turns the fast path on in whatever `document` returns."""
    emulator_process, emulator_port = stack.start_emulator([PROVIDER_KEY_EU, PROVIDER_KEY_US],
                                                           extra_args=emulator_args)
    path = path or os.environ.get(PATH_VARIABLE, FULL)
    written = document(emulator_port)
    config_path = write_config(config_dir, with_fast_path(written) if path == FAST else written)
    env = dict(stack.env, **provider_env())
    extproc, extproc_port, metrics_port = stack.start_extproc(config_path, workers=workers,
                                                              env=env)
    listen_port, admin_socket = free_port(), stack.admin_socket()
    ports = EnvoyPorts(listen_port=listen_port, admin_socket=str(admin_socket),
                       extproc_port=extproc_port, message_timeout_ms=message_timeout_ms)
    bootstrap = render_bootstrap(load_config(config_path), ports)
    if edit_bootstrap is not None:
        edit_bootstrap(bootstrap)
    envoy = stack.start_envoy(bootstrap_yaml(bootstrap),
                              listen_port=listen_port, admin_socket=admin_socket,
                              log_level=envoy_log_level)
    return Gateway(stack=stack, config_path=config_path,
                   emulator=Emulator(emulator_port, emulator_process), extproc=extproc,
                   extproc_port=extproc_port, metrics_port=metrics_port, envoy=envoy,
                   listen_port=listen_port, admin_socket=admin_socket, path=path)


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """A test marked `both_paths` runs once per request path: its private stacks start
    with the fast path off, then on (`start_gateway` reads the path from PATH_VARIABLE,
    which `private_path` sets first). The private stacks of other tests have requests
    the fast path never takes (measured under `make test-fast-path`, decision 0136), so
    they run once."""
    if metafunc.definition.get_closest_marker("both_paths") is not None:
        if "private_path" not in metafunc.fixturenames:
            metafunc.fixturenames.insert(0, "private_path")
        metafunc.parametrize("private_path", PATHS, indirect=True)


@pytest.fixture
def private_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """The request path of a `both_paths` test's private stacks."""
    path: str = request.param
    monkeypatch.setenv(PATH_VARIABLE, path)
    return path


@pytest.fixture(scope="session", params=PATHS)
def gateway(request: pytest.FixtureRequest,
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    """One shared stack for tests that do not disturb it (no kills, no config edits), once
    per request path: every test on it runs on the full path and on the fast path."""
    path: str = request.param
    workdir = tmp_path_factory.mktemp(f"gateway-{path}")
    with Stack(workdir) as stack:
        yield start_gateway(stack, workdir / "config", path=path)


@pytest.fixture
def emulator_clean(gateway: Gateway) -> Emulator:
    gateway.emulator.clear()
    return gateway.emulator


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[Stack]:
    """A private stack for tests that kill, reload or reconfigure processes."""
    with Stack(tmp_path / "stack") as private:
        yield private


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    """A redis-server of our own on a free port; never a system Redis."""
    with Stack(tmp_path_factory.mktemp("redis")) as redis_stack:
        _, port = redis_stack.start_redis()
        yield port


def provider_fingerprint(key: str) -> str:
    return key_fingerprint(key)
