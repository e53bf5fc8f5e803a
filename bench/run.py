"""Benchmark the gateway against an Envoy-direct baseline, in one run, on loopback.

Starts (via `extproc.devstack.Stack`) redis, the provider emulator, extproc and two
Envoys: the *gateway* Envoy rendered from a bench gateway config (ext_proc in the path)
and a *direct* Envoy that routes straight to the same emulator and injects the provider
key itself (no ext_proc). For every concurrency level wrk POSTs a small OpenAI chat body
to both; the script reports requests/s, p50/p99, the gateway's overhead over direct and
the CPU time per request of every process (from /proc, which is stable on a noisy
machine, unlike wall time), then writes `bench/RESULTS.md`.

The gateway config has a second tenant with a (never reached) Redis budget and RPM/TPM
limits: the same gateway Envoy and extproc, driven with that tenant's key, is the
*gateway+budgets* target (one EVALSHA to reserve, one to settle per request; counted from
the bench redis' `INFO commandstats`). After the load runs the bench redis-server is
stopped and sequential requests check that the budgets tenant gets a fast 503
(`fail_closed`) while the tenant without budgets still gets 200.

    .venv/bin/python bench/run.py --duration 10
    .venv/bin/python bench/run.py --quick            # 2 s per level, smoke check
    .venv/bin/python bench/run.py --no-budgets       # direct vs gateway only

Only 127.0.0.1 is ever contacted; every load run is bounded by `--duration`.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import http.client
import json
import math
import os
import platform
import re
import resource
import secrets
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import yaml

REPO_ROOT: Final = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:  # `python bench/run.py` puts bench/ first, not the repo
    sys.path.insert(0, str(REPO_ROOT))

from extproc.auth import hash_key  # noqa: E402
from extproc.budgets.guard import BREAKER_COOLDOWN_S  # noqa: E402
from extproc.config import load_config  # noqa: E402
from extproc.devstack import (  # noqa: E402
    LOOPBACK,
    ManagedProcess,
    Stack,
    envoy_binary,
    free_port,
)
from extproc.envoy_bootstrap import EnvoyPorts, admin_address, render_bootstrap  # noqa: E402
from extproc.secrets import Secret  # noqa: E402

LUA_SCRIPT: Final = Path(__file__).resolve().with_name("post.lua")
CHAT_PATH: Final = "/v1/chat/completions"
MODEL: Final = "gpt-4o-mini"
BODY: Final = json.dumps(
    {"model": MODEL, "messages": [{"role": "user", "content": "Hello"}]},
    separators=(",", ":"),
)
PROVIDER_KEY_ENV: Final = "ASC_BENCH_PROVIDER_KEY"
PROVIDER_CLUSTER: Final = "bench_emulator"
CLK_TCK: Final = os.sysconf("SC_CLK_TCK")
RUN_MARKER: Final = "<!-- bench-run -->"
COMPONENTS: Final = ("extproc", "envoy", "emulator", "redis", "wrk")
DIRECT: Final = "direct"
GATEWAY: Final = "gateway"
BUDGETS: Final = "gateway+budgets"
TENANT: Final = "bench"
BUDGET_TENANT: Final = "bench-budgets"
"""Same gateway, second tenant: a budget and RPM/TPM limits it never reaches."""
BUDGET_LIMIT_USD: Final = 1_000_000
BUDGET_RPM: Final = 10_000_000  # the config's maximum
BUDGET_TPM: Final = 10_000_000_000  # the config's maximum
REDIS_TIMEOUT_MS: Final = 50
"""The product default for `redis.timeout_ms`; --redis-timeout-ms overrides it."""
ROUND_TRIP_COMMANDS: Final = ("evalsha", "eval", "script")
"""Budget round trips: EVALSHA, plus EVAL / SCRIPT LOAD when a script had to be reloaded."""
CONNECTION_COMMANDS: Final = frozenset({"hello", "client", "select", "ping", "auth",
                                        "readonly", "command"})
"""Sent by redis-py on a new connection: round trips too, but per connection, not request.
Every other command in `INFO commandstats` is counted there when a Lua script calls it."""
SYSTEM_REDIS_PORT: Final = 6379
FAIL_CLOSED_REQUESTS: Final = 200
TARGET_FAIL_CLOSED_P99_MS: Final = 100.0
NAGLE_P50_MS: Final = (35.0, 50.0)
"""A p50 near the 40 ms delayed-ACK timer hints at a missing TCP_NODELAY somewhere."""
UNATTRIBUTED_WARN_CORES: Final = 0.4
"""More machine CPU than this outside our processes means something else was running."""

# Targets from ../shared/DESIGN.md §9, echoed next to the measured numbers.
TARGET_RPS: Final = 2000.0
TARGET_P50_OVERHEAD_MS: Final = 1.0
TARGET_EXTPROC_CPU_US: Final = 400.0


# --------------------------------------------------------------------------- /proc CPU


def _proc_stat(pid: int) -> list[str] | None:
    """Fields of /proc/<pid>/stat after `comm` (index 0 is field 3, `state`)."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text(encoding="ascii", errors="replace")
    except OSError:
        return None
    return text[text.rindex(")") + 2:].split()


def process_cpu_seconds(pid: int) -> float:
    """utime + stime of one process (all its threads), in seconds; 0 if it is gone."""
    fields = _proc_stat(pid)
    if fields is None:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # fields 14 and 15 of stat


def _children(pid: int) -> list[int]:
    task_dir = Path(f"/proc/{pid}/task")
    found: list[int] = []
    try:
        tasks = list(task_dir.iterdir())
    except OSError:
        return found
    have_children_file = False
    for task in tasks:
        try:
            text = (task / "children").read_text(encoding="ascii")
        except OSError:
            continue
        have_children_file = True
        found.extend(int(p) for p in text.split())
    if have_children_file:
        return found
    # Kernel without CONFIG_PROC_CHILDREN: scan /proc for processes whose ppid is pid.
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            fields = _proc_stat(int(entry.name))
            if fields is not None and int(fields[1]) == pid:
                found.append(int(entry.name))
    return found


def process_tree(pid: int) -> list[int]:
    """pid and all its descendants (extproc's supervisor and its workers)."""
    tree, pending = [], [pid]
    while pending:
        current = pending.pop()
        tree.append(current)
        pending.extend(_children(current))
    return tree


def tree_cpu_seconds(pid: int) -> float:
    return sum(process_cpu_seconds(p) for p in process_tree(pid))


def machine_busy_seconds() -> float:
    """CPU seconds all cores spent not idle (user..steal from the `cpu` line of /proc/stat)."""
    fields = [int(v) for v in Path("/proc/stat").read_text(encoding="ascii").split("\n", 1)[0]
              .split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    busy = sum(fields[:8]) - idle  # guest time is already inside user
    return busy / CLK_TCK


def all_process_cpu() -> dict[int, tuple[str, float]]:
    """pid -> (command name, CPU seconds) for every process visible in /proc."""
    snapshot: dict[int, tuple[str, float]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            text = (entry / "stat").read_text(encoding="ascii", errors="replace")
        except OSError:
            continue
        name = text[text.index("(") + 1:text.rindex(")")]
        fields = text[text.rindex(")") + 2:].split()
        snapshot[int(entry.name)] = (name, (int(fields[11]) + int(fields[12])) / CLK_TCK)
    return snapshot


def children_rusage_seconds() -> float:
    """CPU of this script's reaped children: the delta around one wrk run is wrk's CPU."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


# --------------------------------------------------------------------------- wrk


@dataclass(frozen=True, slots=True)
class WrkResult:
    requests: int
    duration_s: float
    connect_errors: int
    read_errors: int
    write_errors: int
    status_errors: int
    timeouts: int
    p50_ms: float
    p90_ms: float
    p99_ms: float
    p999_ms: float
    mean_ms: float
    max_ms: float
    exit_code: int

    @property
    def rps(self) -> float:
        return self.requests / self.duration_s if self.duration_s > 0 else 0.0

    @property
    def error_count(self) -> int:
        return (self.connect_errors + self.read_errors + self.write_errors
                + self.status_errors + self.timeouts)

    def error_text(self) -> str:
        if self.error_count == 0 and self.exit_code == 0:
            return ""
        parts = [f"{name}={value}" for name, value in (
            ("non-2xx/3xx", self.status_errors), ("connect", self.connect_errors),
            ("read", self.read_errors), ("write", self.write_errors),
            ("timeout", self.timeouts)) if value]
        if self.exit_code:
            parts.append(f"wrk exit {self.exit_code}")
        return ", ".join(parts)


_RESULT_RE: Final = re.compile(r"^BENCH_RESULT (.*)$", re.MULTILINE)


def parse_wrk_output(stdout: str, exit_code: int) -> WrkResult:
    match = _RESULT_RE.search(stdout)
    if match is None:
        raise RuntimeError(f"wrk printed no BENCH_RESULT line (exit {exit_code}):\n{stdout}")
    values = {k: float(v) for k, v in (item.split("=", 1) for item in match.group(1).split())}
    non_2xx = re.search(r"Non-2xx or 3xx responses:\s*(\d+)", stdout)
    status_errors = int(values["status"])
    if non_2xx is not None:  # same counter as summary.errors.status; take the larger
        status_errors = max(status_errors, int(non_2xx.group(1)))
    return WrkResult(
        requests=int(values["requests"]),
        duration_s=values["duration_us"] / 1e6,
        connect_errors=int(values["connect"]),
        read_errors=int(values["read"]),
        write_errors=int(values["write"]),
        status_errors=status_errors,
        timeouts=int(values["timeout"]),
        p50_ms=values["p50_us"] / 1000,
        p90_ms=values["p90_us"] / 1000,
        p99_ms=values["p99_us"] / 1000,
        p999_ms=values["p999_us"] / 1000,
        mean_ms=values["mean_us"] / 1000,
        max_ms=values["max_us"] / 1000,
        exit_code=exit_code,
    )


def run_wrk(port: int, *, concurrency: int, threads: int, duration_s: int,
            key: str) -> tuple[WrkResult, float]:
    """One bounded wrk run against 127.0.0.1:port; returns the result and wrk's CPU seconds."""
    wrk = shutil.which("wrk")
    if wrk is None:
        raise FileNotFoundError("wrk not found: apt-get install -y wrk")
    command = [
        wrk, "-t", str(max(1, min(threads, concurrency))), "-c", str(concurrency),
        "-d", f"{duration_s}s", "--timeout", "5s", "--latency", "-s", str(LUA_SCRIPT),
        f"http://{LOOPBACK}:{port}{CHAT_PATH}",
    ]
    env = dict(os.environ, BENCH_KEY=key, BENCH_BODY=BODY, BENCH_PATH=CHAT_PATH)
    before = children_rusage_seconds()
    completed = subprocess.run(command, env=env, capture_output=True, text=True,
                               timeout=duration_s + 60, check=False)
    cpu = children_rusage_seconds() - before
    if completed.stderr.strip():
        print(completed.stderr.strip(), file=sys.stderr)
    return parse_wrk_output(completed.stdout, completed.returncode), cpu


# --------------------------------------------------------------------------- redis / metrics


def _read_reply_line(sock: socket.socket, buffer: bytearray) -> bytes:
    while b"\r\n" not in buffer:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("redis closed the connection")
        buffer += chunk
    line, _, rest = bytes(buffer).partition(b"\r\n")
    buffer[:] = rest
    return line


def redis_command_stats(port: int) -> dict[str, int]:
    """Commands served so far by the redis on 127.0.0.1:port: name -> calls + rejected.

    A minimal RESP client (`INFO commandstats`), so the bench needs no redis-cli.
    """
    with socket.create_connection((LOOPBACK, port), timeout=5) as sock:
        sock.sendall(b"*2\r\n$4\r\nINFO\r\n$12\r\ncommandstats\r\n")
        buffer = bytearray()
        header = _read_reply_line(sock, buffer)
        if not header.startswith(b"$"):
            raise RuntimeError(f"redis INFO: unexpected reply {header[:200]!r}")
        size = int(header[1:])
        while len(buffer) < size:
            chunk = sock.recv(65536)
            if not chunk:
                raise ConnectionError("redis closed the connection")
            buffer += chunk
    stats: dict[str, int] = {}
    for line in bytes(buffer[:size]).decode("utf-8", "replace").splitlines():
        name, sep, values = line.partition(":")
        if not sep or not name.startswith("cmdstat_"):
            continue
        fields = dict(item.split("=", 1) for item in values.split(",") if "=" in item)
        stats[name.removeprefix("cmdstat_")] = (int(fields.get("calls", 0))
                                                + int(fields.get("rejected_calls", 0)))
    return stats


def _counter_delta(before: Mapping[str, int], after: Mapping[str, int]) -> dict[str, int]:
    """Per command, calls between two snapshots; our own INFO calls are left out."""
    delta = {name: after[name] - before.get(name, 0) for name in after if name != "info"}
    return {name: calls for name, calls in delta.items() if calls}


_RESERVATIONS_RE: Final = re.compile(r"^asc_budget_reservations_total\{([^}]*)\}\s+(\S+)",
                                     re.MULTILINE)


def budget_reservations(metrics_port: int, tenant: str, result: str = "held") -> float | None:
    """`asc_budget_reservations_total{tenant, result}` from extproc's /metrics."""
    try:
        with urllib.request.urlopen(  # fixed http://127.0.0.1 URL
                f"http://{LOOPBACK}:{metrics_port}/metrics", timeout=5) as response:
            text = response.read().decode("utf-8", "replace")
    except OSError:
        return None
    total = 0.0
    for labels, value in _RESERVATIONS_RE.findall(text):
        if f'tenant="{tenant}"' in labels and f'result="{result}"' in labels:
            total += float(value)
    return total


def ledger_unavailable_reasons(log_path: Path) -> Counter[str]:
    """Reasons of extproc's "budget ledger unavailable" warnings so far (its JSON log)."""
    reasons: Counter[str] = Counter()
    try:
        lines = log_path.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return reasons
    for line in lines:
        if "budget ledger unavailable" not in line:
            continue
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if isinstance(event, dict):
            reasons[str(event.get("reason", "?"))] += 1
    return reasons


# --------------------------------------------------------------------------- stack


@dataclass(slots=True)
class BenchStack:
    stack: Stack
    tenant_key: str
    provider_key: str
    gateway_port: int
    direct_port: int
    extproc_processes: int = 1
    pids: dict[str, dict[str, int]] = field(default_factory=dict)
    """target -> component -> pid whose process tree is measured."""
    budget_key: str | None = None
    """Virtual key of the budgets tenant; None with --no-budgets."""
    redis: ManagedProcess | None = None
    redis_port: int = 0
    metrics_port: int = 0
    extproc_log: Path | None = None

    def port(self, target: str) -> int:
        return self.direct_port if target == DIRECT else self.gateway_port

    def key(self, target: str) -> str:
        if target == BUDGETS:
            if self.budget_key is None:
                raise RuntimeError("the budgets tenant is not configured (--no-budgets)")
            return self.budget_key
        return self.tenant_key

    def all_pids(self) -> set[int]:
        return {pid for components in self.pids.values() for pid in components.values()}

    def cpu_snapshot(self, target: str) -> dict[str, float]:
        return {name: tree_cpu_seconds(pid) for name, pid in self.pids[target].items()}


def write_gateway_config(workdir: Path, *, emulator_port: int, redis_port: int,
                         pepper: str, tenant_key: str, budget_key: str | None = None,
                         redis_timeout_ms: int = REDIS_TIMEOUT_MS) -> Path:
    if redis_port == SYSTEM_REDIS_PORT:
        raise RuntimeError("the bench must use its own redis-server, never port 6379")
    (workdir / "pepper.txt").write_text(pepper + "\n", encoding="utf-8")
    config: dict[str, Any] = {
        "version": 1,
        "auth": {"pepper": {"file": "pepper.txt"}},
        "limits": {"max_body_bytes": 1_048_576},
        "redis": {"url": f"redis://{LOOPBACK}:{redis_port}/0"},
        "credentials": {"bench-key-1": {"env": PROVIDER_KEY_ENV}},
        "providers": {
            "bench-openai": {
                "kind": "openai",
                "base_url": f"http://{LOOPBACK}:{emulator_port}",
                "region": "us-east-1",
                "zone": "us",
                "cluster": PROVIDER_CLUSTER,
                "credentials": ["bench-key-1"],
            },
        },
        "models": {
            MODEL: {
                "price": {"input_per_mtok": 0.15, "output_per_mtok": 0.60},
                "deployments": [{"provider": "bench-openai", "model": MODEL}],
            },
        },
        "tenants": {
            TENANT: {
                "zone": "us",
                "keys": [{"id": "bench-key",
                          "hash": hash_key(Secret(pepper), tenant_key)}],
                "models": [MODEL],
            },
        },
    }
    if budget_key is not None:
        config["redis"]["timeout_ms"] = redis_timeout_ms
        config["budgets"] = {"hold_ttl_s": 600}
        config["tenants"][BUDGET_TENANT] = {
            "zone": "us",
            "keys": [{"id": "bench-budgets-key",
                      "hash": hash_key(Secret(pepper), budget_key)}],
            "models": [MODEL],
            "budgets": [{"scope": "tenant", "window": "month",
                         "limit_usd": BUDGET_LIMIT_USD}],
            "rate_limits": {"rpm": BUDGET_RPM, "tpm": BUDGET_TPM},
            "on_redis_error": "fail_closed",
        }
    path = workdir / "asc-bench.yaml"
    path.write_text("# Generated by bench/run.py\n" + yaml.safe_dump(config, sort_keys=False),
                    encoding="utf-8")
    return path


def _find_access_log(bootstrap: Mapping[str, Any]) -> list[Any] | None:
    """The gateway HCM's access log, so both Envoys pay the same logging cost."""
    try:
        listener = bootstrap["static_resources"]["listeners"][0]
        hcm = listener["filter_chains"][0]["filters"][0]["typed_config"]
        access_log = hcm.get("access_log")
    except (KeyError, IndexError, TypeError):
        return None
    return access_log if isinstance(access_log, list) else None


def direct_bootstrap(*, listen_port: int, admin_socket: Path, emulator_port: int,
                     provider_key: str, access_log: list[Any] | None) -> dict[str, Any]:
    """Envoy straight to the emulator, provider key injected by Envoy, no ext_proc."""
    hcm: dict[str, Any] = {
        "@type": "type.googleapis.com/envoy.extensions.filters.network."
                 "http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": "direct",
        "codec_type": "AUTO",
        "use_remote_address": True,
        "route_config": {
            "name": "direct",
            "virtual_hosts": [{
                "name": "direct",
                "domains": ["*"],
                "routes": [{
                    "match": {"prefix": "/"},
                    "request_headers_to_add": [{
                        "header": {"key": "authorization", "value": f"Bearer {provider_key}"},
                        "append_action": "OVERWRITE_IF_EXISTS_OR_ADD",
                    }],
                    "route": {"cluster": PROVIDER_CLUSTER, "auto_host_rewrite": True,
                              "timeout": "300s"},
                }],
            }],
        },
        "http_filters": [{
            "name": "envoy.filters.http.router",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router",
            },
        }],
    }
    if access_log:
        hcm["access_log"] = access_log

    def address(port: int) -> dict[str, Any]:
        return {"socket_address": {"address": LOOPBACK, "port_value": port}}

    return {
        "admin": {"address": admin_address(str(admin_socket))},
        "static_resources": {
            "listeners": [{
                "name": "direct_ingress",
                "address": address(listen_port),
                "filter_chains": [{"filters": [{
                    "name": "envoy.filters.network.http_connection_manager",
                    "typed_config": hcm,
                }]}],
            }],
            "clusters": [{
                "name": PROVIDER_CLUSTER,
                "type": "STATIC",
                "connect_timeout": "5s",
                "load_assignment": {
                    "cluster_name": PROVIDER_CLUSTER,
                    "endpoints": [{"lb_endpoints": [{"endpoint": {
                        "address": address(emulator_port)}}]}],
                },
                "typed_extension_protocol_options": {
                    "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                        "@type": "type.googleapis.com/"
                                 "envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                        "explicit_http_config": {"http_protocol_options": {}},
                    },
                },
            }],
        },
    }


def _wait_for_workers(pid: int, workers: int, timeout: float = 20.0) -> None:
    """With --workers N the port opens with the first worker; wait for all N."""
    if workers <= 1:
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if len(process_tree(pid)) >= workers + 1:
            time.sleep(1.0)  # let the last ones bind and warm their imports
            return
        time.sleep(0.1)
    raise TimeoutError(f"extproc did not start {workers} workers within {timeout}s")


def start_bench_stack(stack: Stack, *, workers: int, budgets: bool = True,
                      redis_timeout_ms: int = REDIS_TIMEOUT_MS) -> BenchStack:
    emulator_port = free_port()  # first: the gateway config names it
    pepper = secrets.token_hex(32)
    tenant_key = "sk-asc-bench-" + secrets.token_hex(16)
    budget_key = "sk-asc-bench-budgets-" + secrets.token_hex(16) if budgets else None
    provider_key = "sk-emu-bench-" + secrets.token_hex(16)
    stack.env[PROVIDER_KEY_ENV] = provider_key

    redis, redis_port = stack.start_redis()  # a free loopback port, never the system 6379
    config_path = write_gateway_config(stack.workdir, emulator_port=emulator_port,
                                       redis_port=redis_port, pepper=pepper,
                                       tenant_key=tenant_key, budget_key=budget_key,
                                       redis_timeout_ms=redis_timeout_ms)
    config = load_config(config_path)
    emulator, _ = stack.start_emulator([provider_key], emulator_port)
    extproc, extproc_port, metrics_port = stack.start_extproc(config_path, workers=workers)
    _wait_for_workers(extproc.popen.pid, workers)

    gateway_port, gateway_admin = free_port(), stack.admin_socket("envoy-gateway")
    gateway_bootstrap = render_bootstrap(config, EnvoyPorts(
        listen_port=gateway_port, admin_socket=str(gateway_admin), extproc_port=extproc_port))
    envoy_gateway = stack.start_envoy(
        "# bench gateway Envoy\n" + yaml.safe_dump(gateway_bootstrap, sort_keys=False),
        listen_port=gateway_port, admin_socket=gateway_admin, name="envoy-gateway")

    direct_port, direct_admin = free_port(), stack.admin_socket("envoy-direct")
    direct = direct_bootstrap(listen_port=direct_port, admin_socket=direct_admin,
                              emulator_port=emulator_port, provider_key=provider_key,
                              access_log=_find_access_log(gateway_bootstrap))
    envoy_direct = stack.start_envoy(
        "# bench direct Envoy (no ext_proc)\n" + yaml.safe_dump(direct, sort_keys=False),
        listen_port=direct_port, admin_socket=direct_admin, name="envoy-direct")

    bench = BenchStack(stack, tenant_key, provider_key, gateway_port, direct_port,
                       len(process_tree(extproc.popen.pid)), budget_key=budget_key,
                       redis=redis, redis_port=redis_port, metrics_port=metrics_port,
                       extproc_log=extproc.log_path)
    shared = {"emulator": emulator.popen.pid, "redis": redis.popen.pid}
    bench.pids[GATEWAY] = {"extproc": extproc.popen.pid,
                           "envoy": envoy_gateway.popen.pid, **shared}
    if budgets:
        bench.pids[BUDGETS] = dict(bench.pids[GATEWAY])  # same processes, other tenant
    bench.pids[DIRECT] = {"extproc": extproc.popen.pid,
                          "envoy": envoy_direct.popen.pid, **shared}
    return bench


def smoke_check(port: int, key: str, label: str, *,
                require_header: str | None = None) -> None:
    """One request before any load: fail fast, with the reason, if the path is broken."""
    request = urllib.request.Request(  # fixed http://127.0.0.1 URL
        f"http://{LOOPBACK}:{port}{CHAT_PATH}", data=BODY.encode(), method="POST",
        headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310
            status, payload, headers = response.status, response.read(), response.headers
    except urllib.error.HTTPError as exc:
        status, payload, headers = exc.code, exc.read(), exc.headers
    if status != 200:
        raise RuntimeError(f"{label} smoke request: HTTP {status}: {payload[:500]!r}")
    if "choices" not in json.loads(payload):
        raise RuntimeError(f"{label} smoke request: unexpected body {payload[:500]!r}")
    if require_header and headers.get(require_header) is None:
        raise RuntimeError(f"{label} smoke request: no {require_header} header, so the "
                           f"request did not go through the budget ledger: {dict(headers)}")


# --------------------------------------------------------------------------- runs


@dataclass(frozen=True, slots=True)
class Run:
    target: str
    concurrency: int
    wrk: WrkResult
    cpu_s: Mapping[str, float]
    machine_cores_busy: float
    """Whole-machine non-idle cores over the run: ours + kernel softirq + anything else."""
    others: tuple[tuple[str, float], ...] = ()
    """Busiest processes outside the bench over the run: (name, cores)."""
    redis_calls: Mapping[str, int] = field(default_factory=dict)
    """Commands the bench redis served over the run (INFO commandstats delta)."""
    reservations: float | None = None
    """Budget reservations held by extproc over the run (its /metrics), budgets target."""
    unavailable: float | None = None
    """Reservations refused 503 because the ledger was unavailable (Redis up all along)."""

    @property
    def round_trips(self) -> int:
        return sum(self.redis_calls.get(name, 0) for name in ROUND_TRIP_COMMANDS)

    def round_trips_per_request(self) -> float | None:
        return self.round_trips / self.wrk.requests if self.wrk.requests > 0 else None

    def round_trips_per_reservation(self) -> float | None:
        return self.round_trips / self.reservations if self.reservations else None

    def cpu_us_per_request(self, component: str) -> float | None:
        if self.wrk.requests <= 0 or component not in self.cpu_s:
            return None
        return self.cpu_s[component] * 1e6 / self.wrk.requests

    def total_cpu_us(self) -> float | None:
        if self.wrk.requests <= 0:
            return None
        return sum(self.cpu_s.values()) * 1e6 / self.wrk.requests

    def cores_busy(self, component: str) -> float:
        return self.cpu_s.get(component, 0.0) / self.wrk.duration_s if self.wrk.duration_s else 0.0

    @property
    def unattributed_cores(self) -> float:
        """Machine CPU not charged to any bench process (kernel softirq, other programs)."""
        return self.machine_cores_busy - sum(self.cpu_s.values()) / max(self.wrk.duration_s, 1e-9)


SETTLE_PAUSE_S: Final = 0.3
"""Pause after a wrk run before reading redis' counters: settles run in extproc's finish(),
a moment after the client got its response."""


def measure(bench: BenchStack, target: str, *, concurrency: int, threads: int,
            duration_s: int, warmup_s: int) -> Run:
    port, key = bench.port(target), bench.key(target)
    if warmup_s > 0:
        run_wrk(port, concurrency=concurrency, threads=threads, duration_s=warmup_s,
                key=key)
        time.sleep(SETTLE_PAUSE_S)  # the warm-up's last settles stay out of the counters
    dead = [p.name for p in bench.stack.processes if not p.alive()]
    if dead:
        raise RuntimeError(f"process(es) exited during the benchmark: {', '.join(dead)}")
    ours = {p for pid in bench.all_pids() for p in process_tree(pid)} | {os.getpid()}
    redis_before = redis_command_stats(bench.redis_port)
    held_before = (budget_reservations(bench.metrics_port, BUDGET_TENANT)
                   if target == BUDGETS else None)
    unavailable_before = (budget_reservations(bench.metrics_port, BUDGET_TENANT, "unavailable")
                          if target == BUDGETS else None)
    others_before = all_process_cpu()
    before = bench.cpu_snapshot(target)
    machine_before, wall_start = machine_busy_seconds(), time.monotonic()
    result, wrk_cpu = run_wrk(port, concurrency=concurrency, threads=threads,
                              duration_s=duration_s, key=key)
    machine_after, wall_end = machine_busy_seconds(), time.monotonic()
    after = bench.cpu_snapshot(target)
    others_after = all_process_cpu()
    time.sleep(SETTLE_PAUSE_S)
    redis_calls = _counter_delta(redis_before, redis_command_stats(bench.redis_port))
    held = unavailable = None
    if held_before is not None:
        held_after = budget_reservations(bench.metrics_port, BUDGET_TENANT)
        held = None if held_after is None else held_after - held_before
    if unavailable_before is not None:
        after_count = budget_reservations(bench.metrics_port, BUDGET_TENANT, "unavailable")
        unavailable = None if after_count is None else after_count - unavailable_before
    wall = max(wall_end - wall_start, 1e-9)
    others = sorted(
        ((name, (cpu_after - others_before[pid][1]) / wall)
         for pid, (name, cpu_after) in others_after.items()
         if pid not in ours and pid in others_before and name != "wrk"),
        key=lambda item: -item[1])
    cpu = {name: after[name] - before[name] for name in before}
    if target == DIRECT:
        cpu.pop("extproc")  # idle during direct runs; not part of that path
    cpu["wrk"] = wrk_cpu
    return Run(target, concurrency, result, cpu, (machine_after - machine_before) / wall,
               tuple((name, cores) for name, cores in others[:3] if cores >= 0.01),
               redis_calls=redis_calls, reservations=held, unavailable=unavailable)


# --------------------------------------------------------------------------- Redis down


@dataclass(frozen=True, slots=True)
class Probe:
    """N sequential keep-alive requests of one tenant, each checked against what it expects."""

    label: str
    tenant: str
    redis: str
    """'up' or 'down' while the probe ran."""
    expected_status: int
    expected_code: str | None
    latencies_ms: tuple[float, ...]
    statuses: Mapping[int, int]
    codes: Mapping[str, int]
    failures: tuple[str, ...]
    """First few requests that did not get what was expected."""
    failure_count: int
    reconnects: int

    @property
    def ok(self) -> bool:
        return self.failure_count == 0 and len(self.latencies_ms) > 0

    def percentile(self, pct: float) -> float:
        ordered = sorted(self.latencies_ms)
        if not ordered:
            return math.nan
        return ordered[max(0, math.ceil(pct / 100 * len(ordered)) - 1)]  # nearest rank

    @property
    def max_ms(self) -> float:
        return max(self.latencies_ms, default=math.nan)


def _error_code(payload: bytes) -> str | None:
    try:
        body = json.loads(payload)
    except ValueError:
        return None
    error = body.get("error") if isinstance(body, dict) else None
    code = error.get("code") if isinstance(error, dict) else None
    return code if isinstance(code, str) else None


def probe(port: int, key: str, *, label: str, tenant: str, redis: str, requests: int,
          expected_status: int, expected_code: str | None) -> Probe:
    """`requests` sequential POSTs on one keep-alive connection to 127.0.0.1:port (bounded;
    a connection the server closed is reopened once per request)."""
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    body = BODY.encode()
    latencies: list[float] = []
    statuses: Counter[int] = Counter()
    codes: Counter[str] = Counter()
    failures: list[str] = []
    failure_count = reconnects = 0
    connection = http.client.HTTPConnection(LOOPBACK, port, timeout=10)
    try:
        for index in range(requests):
            started = time.perf_counter()
            for attempt in range(2):
                try:
                    connection.request("POST", CHAT_PATH, body=body, headers=headers)
                    response = connection.getresponse()
                    payload = response.read()
                    break
                except (http.client.HTTPException, OSError) as exc:
                    connection.close()
                    if attempt:
                        raise RuntimeError(f"{label}: request {index} failed twice: "
                                           f"{type(exc).__name__}: {exc}") from None
                    reconnects += 1
                    started = time.perf_counter()  # time the retried request only
            latencies.append((time.perf_counter() - started) * 1000)
            statuses[response.status] += 1
            code = _error_code(payload) if response.status != 200 else None
            if code:
                codes[code] += 1
            if response.status == 200:
                good = response.status == expected_status and b'"choices"' in payload
            else:
                good = response.status == expected_status and code == expected_code
            if not good:
                failure_count += 1
                if len(failures) < 3:
                    failures.append(f"#{index}: HTTP {response.status} {payload[:200]!r}")
    finally:
        connection.close()
    return Probe(label, tenant, redis, expected_status, expected_code, tuple(latencies),
                 dict(statuses), dict(codes), tuple(failures), failure_count, reconnects)


def redis_down_probes(bench: BenchStack, requests: int) -> list[Probe]:
    """Budgets tenant with Redis up (reference), then stop the bench redis-server and send
    the same requests for the budgets tenant (503 gateway_unavailable expected) and the
    tenant without budgets (200 expected: it never calls Redis)."""
    assert bench.redis is not None
    assert bench.budget_key is not None
    port = bench.gateway_port
    # A breaker opened by the load (Redis calls over timeout_ms) must not answer for Redis.
    time.sleep(BREAKER_COOLDOWN_S + 0.5)
    probes = [probe(port, bench.budget_key, label="budgets tenant, Redis up",
                    tenant=BUDGET_TENANT, redis="up", requests=requests,
                    expected_status=200, expected_code=None)]
    bench.redis.stop()
    if bench.redis.alive():
        raise RuntimeError("the bench redis-server did not stop")
    probes.append(probe(port, bench.budget_key, label="budgets tenant, Redis down",
                        tenant=BUDGET_TENANT, redis="down", requests=requests,
                        expected_status=503, expected_code="gateway_unavailable"))
    probes.append(probe(port, bench.tenant_key, label="no-budget tenant, Redis down",
                        tenant=TENANT, redis="down", requests=requests,
                        expected_status=200, expected_code=None))
    return probes


# --------------------------------------------------------------------------- report


def _read(path: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""


def machine_info() -> dict[str, str]:
    cpuinfo = _read("/proc/cpuinfo")
    model = re.search(r"^model name\s*:\s*(.+)$", cpuinfo, re.MULTILINE)
    meminfo = re.search(r"^MemTotal:\s*(\d+) kB", _read("/proc/meminfo"), re.MULTILINE)
    try:
        envoy = subprocess.run([envoy_binary(), "--version"], capture_output=True, text=True,
                               timeout=30, check=False).stdout
        envoy_match = re.search(r"version:\s*\S+/(\d+\.\d+\.\d+)/(\S+)/(\S+)", envoy)
        envoy_version = (" ".join(envoy_match.groups()) if envoy_match
                         else envoy.strip() or "unknown")
    except (OSError, subprocess.SubprocessError):
        envoy_version = "unknown"
    wrk_path = shutil.which("wrk")
    wrk_version = "missing"
    if wrk_path:
        out = subprocess.run([wrk_path, "-v"], capture_output=True, text=True, timeout=10,
                             check=False)
        wrk_version = (out.stdout or out.stderr).splitlines()[0].split(" Copyright")[0] if (
            out.stdout or out.stderr) else "unknown"
    return {
        "CPUs (nproc)": str(len(os.sched_getaffinity(0))),
        "CPU model": model.group(1).strip() if model else platform.processor() or "unknown",
        "memory": f"{int(meminfo.group(1)) / 1024 / 1024:.1f} GiB" if meminfo else "unknown",
        "kernel": f"{platform.system()} {platform.release()}",
        "Python": platform.python_version(),
        "Envoy": envoy_version,
        "wrk": wrk_version,
        "load average at start": " ".join(_read("/proc/loadavg").split()[:3]),
    }


def _fmt(value: float | None, digits: int = 2) -> str:
    return "n/a" if value is None else f"{value:,.{digits}f}"


@dataclass(frozen=True, slots=True)
class Level:
    concurrency: int
    direct: Run
    gateway: Run
    budgets: Run | None = None
    """The same gateway driven with the budgets tenant's key (None with --no-budgets)."""

    def runs(self) -> tuple[Run, ...]:
        return (self.direct, self.gateway) + ((self.budgets,) if self.budgets else ())

    def budgets_cpu_delta(self, component: str) -> float | None:
        """CPU µs/request of `component` with budgets minus without."""
        if self.budgets is None:
            return None
        on = self.budgets.cpu_us_per_request(component)
        off = self.gateway.cpu_us_per_request(component)
        return None if on is None or off is None else on - off

    @property
    def p50_delta(self) -> float:
        return self.gateway.wrk.p50_ms - self.direct.wrk.p50_ms

    @property
    def p99_delta(self) -> float:
        return self.gateway.wrk.p99_ms - self.direct.wrk.p99_ms

    @property
    def rps_ratio(self) -> float | None:
        direct = self.direct.wrk.rps
        return self.gateway.wrk.rps / direct if direct else None

    def errors(self) -> str:
        parts = [f"{run.target}: {run.wrk.error_text()}"
                 for run in self.runs() if run.wrk.error_text()]
        return "; ".join(parts)


def main_table(levels: Sequence[Level]) -> list[str]:
    with_budgets = any(lv.budgets for lv in levels)
    extra_head = (" gateway+budgets rps | gateway+budgets p50 ms | gateway+budgets p99 ms |"
                  if with_budgets else "")
    rows = [
        "| c | direct rps | direct p50 ms | direct p99 ms | gateway rps | gateway p50 ms "
        "| gateway p99 ms | Δp50 ms | Δp99 ms | rps gateway/direct | extproc CPU µs/req "
        f"|{extra_head} errors |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
        + ("---:|" * 3 if with_budgets else "") + "---|",
    ]
    for lv in levels:
        d, g = lv.direct.wrk, lv.gateway.wrk
        extra = ""
        if with_budgets:
            b = lv.budgets.wrk if lv.budgets else None
            extra = (f" {b.rps:,.0f} | {b.p50_ms:.2f} | {b.p99_ms:.2f} |" if b
                     else " — | — | — |")
        rows.append(
            f"| {lv.concurrency} | {d.rps:,.0f} | {d.p50_ms:.2f} | {d.p99_ms:.2f} "
            f"| {g.rps:,.0f} | {g.p50_ms:.2f} | {g.p99_ms:.2f} | {lv.p50_delta:+.2f} "
            f"| {lv.p99_delta:+.2f} | {_fmt(lv.rps_ratio)} "
            f"| {_fmt(lv.gateway.cpu_us_per_request('extproc'), 0)} "
            f"|{extra} {lv.errors() or 'none'} |")
    return rows


def budgets_table(levels: Sequence[Level]) -> list[str]:
    """Same gateway, budgets tenant vs the tenant without budgets."""
    rows = [
        "| c | rps off | rps on | rps on/off | p50 off ms | p50 on ms | Δp50 ms | p99 off ms "
        "| p99 on ms | Δp99 ms | extproc µs/req off | extproc µs/req on | Δ extproc µs/req "
        "| Δ envoy µs/req | redis µs/req on | Redis round trips/req | errors |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for lv in levels:
        if lv.budgets is None:
            continue
        off, on = lv.gateway, lv.budgets
        ratio = on.wrk.rps / off.wrk.rps if off.wrk.rps else None
        errors = "; ".join(f"{run.target}: {run.wrk.error_text()}"
                           for run in (off, on) if run.wrk.error_text())
        rows.append(
            f"| {lv.concurrency} | {off.wrk.rps:,.0f} | {on.wrk.rps:,.0f} | {_fmt(ratio)} "
            f"| {off.wrk.p50_ms:.2f} | {on.wrk.p50_ms:.2f} "
            f"| {on.wrk.p50_ms - off.wrk.p50_ms:+.2f} "
            f"| {off.wrk.p99_ms:.2f} | {on.wrk.p99_ms:.2f} "
            f"| {on.wrk.p99_ms - off.wrk.p99_ms:+.2f} "
            f"| {_fmt(off.cpu_us_per_request('extproc'), 0)} "
            f"| {_fmt(on.cpu_us_per_request('extproc'), 0)} "
            f"| {_signed(lv.budgets_cpu_delta('extproc'))} "
            f"| {_signed(lv.budgets_cpu_delta('envoy'))} "
            f"| {_fmt(on.cpu_us_per_request('redis'), 0)} "
            f"| {_fmt(on.round_trips_per_request(), 3)} | {errors or 'none'} |")
    return rows


def _signed(value: float | None, digits: int = 0) -> str:
    return "n/a" if value is None else f"{value:+,.{digits}f}"


def round_trip_table(levels: Sequence[Level], *, detail: bool = True) -> list[str]:
    rows = [
        "| c | target | requests | budget reservations | EVALSHA | EVAL | SCRIPT "
        "| round trips/request | round trips/reservation | connection setup "
        "| commands run by the Lua scripts per request |"
        + (" of which |" if detail else ""),
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---|---:|" + ("---|" if detail else ""),
    ]
    for lv in levels:
        for run in (lv.gateway, lv.budgets):
            if run is None:
                continue
            calls = run.redis_calls
            setup = ", ".join(f"{name} {n:,}" for name, n in sorted(calls.items())
                              if name in CONNECTION_COMMANDS) or "none"
            inner = {name: n for name, n in calls.items()
                     if name not in ROUND_TRIP_COMMANDS and name not in CONNECTION_COMMANDS}
            per_request = (sum(inner.values()) / run.wrk.requests if run.wrk.requests
                           else None)
            of_which = ", ".join(f"{name} {n:,}" for name, n in sorted(inner.items()))
            rows.append(
                f"| {lv.concurrency} | {run.target} | {run.wrk.requests:,} "
                f"| {_fmt(run.reservations, 0) if run.target == BUDGETS else '—'} "
                f"| {calls.get('evalsha', 0):,} | {calls.get('eval', 0):,} "
                f"| {calls.get('script', 0):,} "
                f"| {_fmt(run.round_trips_per_request(), 3)} "
                f"| {_fmt(run.round_trips_per_reservation(), 3)} | {setup} "
                f"| {_fmt(per_request, 1)} |" + (f" {of_which or 'none'} |" if detail else ""))
    return rows


def probe_table(probes: Sequence[Probe]) -> list[str]:
    rows = [
        "| requests | Redis | tenant | expected | got | p50 ms | p99 ms | max ms "
        "| reconnects | check |",
        "|---|---|---|---|---|---:|---:|---:|---:|---|",
    ]
    for pr in probes:
        expected = f"{pr.expected_status}" + (f" {pr.expected_code}" if pr.expected_code else "")
        got = ", ".join(f"{status} x{count}" for status, count in sorted(pr.statuses.items()))
        if pr.codes:
            got += " (" + ", ".join(f"{code} x{n}" for code, n in sorted(pr.codes.items())) + ")"
        check = "ok" if pr.ok else f"FAILED {pr.failure_count}: " + "; ".join(pr.failures)
        rows.append(
            f"| {len(pr.latencies_ms)} sequential, keep-alive | {pr.redis} | {pr.tenant} "
            f"| {expected} | {got} | {pr.percentile(50):.2f} | {pr.percentile(99):.2f} "
            f"| {pr.max_ms:.2f} | {pr.reconnects} | {check} |")
    return rows


def cpu_table(levels: Sequence[Level]) -> list[str]:
    header = " | ".join(COMPONENTS)
    rows = [
        f"| c | target | requests | {header} | total µs/req | extproc cores busy "
        "| machine cores busy | not attributed (cores) |",
        "|---:|---|---:|" + "---:|" * len(COMPONENTS) + "---:|---:|---:|---:|",
    ]
    for lv in levels:
        for run in lv.runs():
            cells = " | ".join(_fmt(run.cpu_us_per_request(c), 0) if c in run.cpu_s else "—"
                               for c in COMPONENTS)
            busy = _fmt(run.cores_busy("extproc")) if run.target != DIRECT else "—"
            rows.append(f"| {lv.concurrency} | {run.target} | {run.wrk.requests:,} | {cells} "
                        f"| {_fmt(run.total_cpu_us(), 0)} | {busy} "
                        f"| {run.machine_cores_busy:.2f} | {run.unattributed_cores:.2f} |")
    return rows


def dominance(levels: Sequence[Level], *, workers: int, ncpu: int) -> list[str]:
    """Plain statements derived only from the measured numbers above."""
    lines: list[str] = []
    for lv in levels:
        g = lv.gateway
        extproc_us = g.cpu_us_per_request("extproc")
        total_gw = g.total_cpu_us()
        total_direct = lv.direct.total_cpu_us()
        if extproc_us is None or total_gw is None or total_direct is None or extproc_us <= 0:
            lines.append(f"- c={lv.concurrency}: no requests completed; nothing to attribute.")
            continue
        per_core_cap = 1e6 / extproc_us
        extproc_cap = per_core_cap * min(workers, ncpu)
        machine_cap = ncpu * 1e6 / total_gw
        busy = g.cores_busy("extproc")
        shares = ", ".join(
            f"{name} {100 * (g.cpu_us_per_request(name) or 0) / total_gw:.0f}%"
            for name in COMPONENTS if name in g.cpu_s)
        envoy_extra = ((g.cpu_us_per_request("envoy") or 0)
                       - (lv.direct.cpu_us_per_request("envoy") or 0))
        machine = g.machine_cores_busy
        verdict: str
        if machine >= 0.85 * ncpu:
            top = max((n for n in COMPONENTS if n in g.cpu_s),
                      key=lambda n: g.cpu_s[n])
            verdict = (f"the {ncpu} cores are full ({machine:.2f} busy, "
                       f"{g.unattributed_cores:.2f} of it not charged to bench processes); "
                       f"the biggest consumer is {top}"
                       + (f", and extproc ({busy:.2f} cores for {workers} worker(s)) is also "
                          "near its one-event-loop-per-worker ceiling"
                          if busy >= 0.75 * workers else "")
                       + "; cutting CPU per request is what raises throughput")
        elif busy >= 0.75 * workers:
            verdict = (f"extproc is the bottleneck ({busy:.2f} cores busy for {workers} "
                       "worker(s), one event loop each) while the machine still has "
                       f"{ncpu - machine:.2f} cores idle")
        else:
            verdict = (f"no CPU is saturated (machine {machine:.2f} of {ncpu} cores, extproc "
                       f"{busy:.2f}): round-trip latency bounds this level")
        threads_note = (" (above 100%: gRPC's C-core threads run beside each worker's event "
                        "loop, so a worker can use more than one core)"
                        if g.wrk.rps > extproc_cap else "")
        lines.append(
            f"- c={lv.concurrency}: extproc {extproc_us:,.0f} µs CPU/request -> "
            f"{per_core_cap:,.0f} rps per core, i.e. {extproc_cap:,.0f} rps at one core per "
            f"worker ({workers}); gateway measured {g.wrk.rps:,.0f} rps "
            f"({100 * g.wrk.rps / extproc_cap:.0f}% of that){threads_note}. All processes: "
            f"{total_gw:,.0f} µs/request on the gateway path vs {total_direct:,.0f} direct "
            f"(+{total_gw - total_direct:,.0f} µs, of which extproc {extproc_us:,.0f} and "
            f"Envoy's ext_proc side {envoy_extra:+,.0f}); {ncpu}-core cap at that cost "
            f"{machine_cap:,.0f} rps. CPU split: {shares}. Verdict: {verdict}.")
        budget_line = _budgets_dominance(lv)
        if budget_line:
            lines.append(budget_line)
    if any(lv.budgets for lv in levels):
        lines.append("- Budgets: the two EVALSHAs are awaited inside the request, so they add "
                     "latency even on idle cores; their CPU (extproc's redis client, redis "
                     "itself) costs throughput once the cores are full.")
    return lines


def _budgets_dominance(lv: Level) -> str | None:
    on = lv.budgets
    if on is None:
        return None
    extproc_delta = lv.budgets_cpu_delta("extproc")
    total_on, total_off = on.total_cpu_us(), lv.gateway.total_cpu_us()
    off_extproc = lv.gateway.cpu_us_per_request("extproc")
    if extproc_delta is None or total_on is None or total_off is None or not off_extproc:
        return f"  - c={lv.concurrency} with budgets: no requests completed."
    redis_us = on.cpu_us_per_request("redis") or 0
    ratio = on.wrk.rps / lv.gateway.wrk.rps if lv.gateway.wrk.rps else 0.0
    return (f"  - c={lv.concurrency} with budgets: extproc {extproc_delta:+,.0f} µs/request "
            f"({100 * extproc_delta / off_extproc:+.0f}% over no budgets), redis "
            f"{redis_us:,.0f} µs/request, all processes {total_on - total_off:+,.0f} µs/request; "
            f"{_fmt(on.round_trips_per_request(), 2)} Redis round trips per request; "
            f"rps {100 * (ratio - 1):+.0f}%.")


def target_checks(levels: Sequence[Level], probes: Sequence[Probe] = ()) -> list[str]:
    if not levels:
        return []
    best = max(levels, key=lambda lv: lv.gateway.wrk.rps)
    lowest = min(levels, key=lambda lv: lv.concurrency)
    cpu = [lv.gateway.cpu_us_per_request("extproc") for lv in levels]
    cpu_values = [c for c in cpu if c is not None]

    def mark(ok: bool) -> str:
        return "met" if ok else "NOT met"

    lines = [
        f"- throughput >= {TARGET_RPS:,.0f} rps: best gateway {best.gateway.wrk.rps:,.0f} rps "
        f"at c={best.concurrency} — {mark(best.gateway.wrk.rps >= TARGET_RPS)}",
        f"- p50 overhead <= {TARGET_P50_OVERHEAD_MS} ms at c={lowest.concurrency}: "
        f"{lowest.p50_delta:+.2f} ms — {mark(lowest.p50_delta <= TARGET_P50_OVERHEAD_MS)}",
    ]
    if cpu_values:
        worst = max(cpu_values)
        lines.append(f"- extproc CPU <= {TARGET_EXTPROC_CPU_US:.0f} µs/request: "
                     f"{min(cpu_values):,.0f} to {worst:,.0f} µs — "
                     f"{mark(worst <= TARGET_EXTPROC_CPU_US)}")
    lines.append("- p99 overhead <= 5 ms at a fixed 500 rps: not measured here (wrk drives "
                 "closed-loop load, not a fixed rate).")
    down = [pr for pr in probes if pr.redis == "down" and pr.expected_status == 503]
    for pr in down:
        p99 = pr.percentile(99)
        lines.append(f"- Redis down, fail_closed: 503 within {TARGET_FAIL_CLOSED_P99_MS:.0f} ms "
                     f"p99: {p99:.2f} ms p99 over {len(pr.latencies_ms)} requests, all "
                     f"{'503 gateway_unavailable' if pr.ok else 'NOT as expected'} — "
                     f"{mark(pr.ok and p99 <= TARGET_FAIL_CLOSED_P99_MS)}")
    return lines


def anomalies(levels: Sequence[Level], ncpu: int, probes: Sequence[Probe] = (),
              ledger_errors: Mapping[str, int] | None = None) -> list[str]:
    notes: list[str] = []
    for lv in levels:
        if lv.budgets is not None and lv.budgets.unavailable:
            reasons = ", ".join(f"{reason} x{n:,}" for reason, n in sorted(
                (ledger_errors or {}).items(), key=lambda item: -item[1])) or "not logged"
            notes.append(
                f"- c={lv.concurrency} gateway+budgets: {lv.budgets.unavailable:,.0f} requests "
                "answered 503 gateway_unavailable while Redis was up (extproc's reasons over "
                f"all load runs: {reasons}). A Redis call that takes longer than "
                "redis.timeout_ms fails (the timeout also counts the time the reply waits for "
                "a busy event loop)"
                + (f"; 3 failures in a row opened the breaker, which then refused every "
                   f"budgeted request for {BREAKER_COOLDOWN_S:g} s"
                   if any("breaker" in reason for reason in (ledger_errors or {})) else "")
                + "; rps and CPU/request of this row include those cheap 503s "
                "(--redis-timeout-ms raises the timeout).")
    for pr in probes:
        if not pr.ok:
            notes.append(f"- {pr.label}: {pr.failure_count} of {len(pr.latencies_ms)} requests "
                         f"did not get HTTP {pr.expected_status}"
                         + (f" {pr.expected_code}" if pr.expected_code else "")
                         + f" (first: {'; '.join(pr.failures)}).")
    for lv in levels:
        if lv.budgets is not None:
            per_reservation = lv.budgets.round_trips_per_reservation()
            if per_reservation is not None and not 1.95 <= per_reservation <= 2.05:
                notes.append(f"- c={lv.concurrency} gateway+budgets: {per_reservation:.3f} Redis "
                             "round trips per reservation, expected 2 (one EVALSHA to reserve, "
                             "one to settle).")
            if lv.gateway.round_trips_per_request() and (
                    lv.gateway.round_trips_per_request() or 0) > 0.01:
                notes.append(f"- c={lv.concurrency} gateway: the tenant without budgets made "
                             f"{lv.gateway.round_trips:,} Redis round trips; expected none "
                             "beyond the sweeper's one per 5 s.")
        for run in lv.runs():
            text = run.wrk.error_text()
            if text:
                notes.append(f"- c={lv.concurrency} {run.target}: ERRORS ({text}) out of "
                             f"{run.wrk.requests:,} requests — numbers of this run are suspect.")
            if run.unattributed_cores > UNATTRIBUTED_WARN_CORES:
                seen = ", ".join(f"{name} {cores:.2f}" for name, cores in run.others)
                notes.append(f"- c={lv.concurrency} {run.target}: {run.unattributed_cores:.2f} "
                             "cores busy but not charged to any bench process (kernel "
                             "softirq/scheduling, short-lived or other programs; busiest "
                             f"other processes seen: {seen or 'none'}): treat as noise.")
            idle_machine = run.machine_cores_busy < 0.5 * ncpu
            if idle_machine and NAGLE_P50_MS[0] <= run.wrk.p50_ms <= NAGLE_P50_MS[1]:
                notes.append(f"- c={lv.concurrency} {run.target}: p50 {run.wrk.p50_ms:.1f} ms "
                             "on a mostly idle machine is near the 40 ms delayed-ACK timer: "
                             "check TCP_NODELAY (Nagle cap, ~358 rps at c=16).")
    return notes


COST_FLOOR: Final = (
    "Measured by the lead (2 cores, this same machine, c=16, 8 s, wrk): "
    "a trivial Python grpc.aio ext_proc that answers every message with an empty reply costs "
    "286 µs CPU/request with 1 message per request, 374 with 2, 448 with 3 and 539 with 4, "
    "i.e. ≈200 µs per gRPC stream + ≈85 µs per message. The gateway's own Python logic, "
    "measured in-process without gRPC, is ≈130 µs/request for the 4 phases + finish. The "
    "gateway uses 4 messages per request (request headers, request body, response headers, "
    "buffered response body for usage), so ≈539 µs/request of its extproc CPU is the "
    "grpc.aio floor before any gateway logic runs."
)
FLOOR_4_MESSAGES_US: Final = 539.0
GATEWAY_LOGIC_US: Final = 130.0


def cost_floor(levels: Sequence[Level]) -> list[str]:
    lines = [COST_FLOOR, ""]
    expected = FLOOR_4_MESSAGES_US + GATEWAY_LOGIC_US
    for lv in levels:
        measured = lv.gateway.cpu_us_per_request("extproc")
        if measured:
            lines.append(f"- c={lv.concurrency}: extproc measured {measured:,.0f} µs/request; "
                         f"floor + logic ≈ {expected:,.0f} µs is {100 * expected / measured:.0f}% "
                         f"of it ({measured - expected:+,.0f} µs unexplained by the two).")
    return lines


def render_run(*, levels: Sequence[Level], info: Mapping[str, str], command: str,
               started: dt.datetime, args: argparse.Namespace, ncpu: int,
               extproc_processes: int, complete: bool, probes: Sequence[Probe] = (),
               ledger_errors: Mapping[str, int] | None = None) -> str:
    with_budgets = any(lv.budgets for lv in levels)
    budget_sections: list[str] = []
    if with_budgets:
        budget_sections = [
            "### Budgets on vs off",
            "",
            f"Same Envoy and extproc; *off* = tenant `{TENANT}` (no budget, no Redis call), "
            f"*on* = tenant `{BUDGET_TENANT}` with a month budget of USD "
            f"{BUDGET_LIMIT_USD:,}, rpm {BUDGET_RPM:,} and tpm {BUDGET_TPM:,} (never reached), "
            f"`on_redis_error: fail_closed`, redis `timeout_ms: {args.redis_timeout_ms}`; the "
            "request has no `max_tokens`, so the gateway also writes the default into the "
            "body it forwards.",
            "",
            *budgets_table(levels),
            "",
            "### Redis round trips per request",
            "",
            "Calls the bench redis-server served over each measured run (`INFO commandstats` "
            "before/after: EVALSHA, plus EVAL/SCRIPT after a NOSCRIPT reload), divided by "
            "wrk's completed requests and by extproc's held reservations; expected 2.0 (the "
            "sweeper adds one EVALSHA per 5 s, requests wrk cut off at the end of the run add "
            "up to 2 x c). `INFO commandstats` also counts the commands each script runs "
            "inside Redis: listed apart, they are no network round trips.",
            "",
            *round_trip_table(levels),
            "",
        ]
    if probes:
        budget_sections += [
            "### Redis down: fail_closed latency",
            "",
            f"After the load runs: {FAIL_CLOSED_REQUESTS} sequential requests on one "
            "keep-alive connection (http.client) per row, first with Redis up, then right "
            f"after the bench redis-server was stopped (connection refused; the breaker opens "
            f"after 3 failures); latency is the client's wall time per request. The Redis-up "
            f"row starts {BREAKER_COOLDOWN_S + 0.5:g} s after the load, once any breaker the "
            "load opened has cooled down.",
            "",
            *probe_table(probes),
            "",
        ]
    out = [
        RUN_MARKER,
        f"## Run {started:%Y-%m-%d %H:%M:%S} UTC — workers={args.workers}, "
        f"{args.duration} s per level" + ("" if complete else " — INCOMPLETE (run failed)"),
        "",
        f"Command: `{command}`",
        "",
        "### Machine",
        "",
        "| | |",
        "|---|---|",
        *(f"| {k} | {v} |" for k, v in info.items()),
        "",
        f"All processes share these {ncpu} cores: each Envoy runs `--concurrency 2`, plus "
        f"wrk ({args.threads} threads), extproc ({args.workers} worker(s)), the aiohttp "
        "emulator and redis. Loopback only. Absolute rps is therefore a lower bound on what "
        "dedicated cores would give; ratios and CPU µs/request are the comparable numbers.",
        "",
        f"Setup: wrk `-t{args.threads} --latency --timeout 5s`, POST {CHAT_PATH} with a "
        f"{len(BODY)}-byte chat body and `Authorization: Bearer <tenant key>`; "
        f"{args.warmup} s unmeasured warm-up before every measured run. *direct* = Envoy "
        "routing to the emulator with the provider key added by the route "
        "(`request_headers_to_add`), no ext_proc, same access log; *gateway* = Envoy "
        "rendered from the gateway config with ext_proc (auth, route, key inject); "
        "*gateway+budgets* = the same Envoy and extproc with the key of a tenant that has a "
        "Redis budget and RPM/TPM limits (reserve + settle per request). "
        "Percentiles are wrk's exact values from its `done()` hook. extproc CPU sums "
        f"{extproc_processes} process(es) (supervisor + workers when `--workers` > 1).",
        "",
        "### Results",
        "",
        *main_table(levels),
        "",
        *budget_sections,
        "### CPU time per request (µs, utime+stime from /proc over the measured run)",
        "",
        "extproc includes all worker processes; redis/emulator are shared by both paths; "
        "wrk's CPU comes from getrusage of the reaped wrk process.",
        "",
        *cpu_table(levels),
        "",
        "### What dominates",
        "",
        *dominance(levels, workers=args.workers, ncpu=ncpu),
        "",
        "### Cost floor",
        "",
        *cost_floor(levels),
        "",
        "### Against the DESIGN §9 targets",
        "",
        *target_checks(levels, probes),
        "",
    ]
    notes = anomalies(levels, ncpu, probes, ledger_errors)
    out += ["### Anomalies", "", *(notes or ["- none: 0 errors, 0 non-2xx, no Nagle-like "
                                              "latencies, no competing load."]), ""]
    return "\n".join(out)


EXTRA_MARKER: Final = "<!-- bench-extra:"


def write_results(path: Path, run_text: str, keep: int) -> None:
    """Newest run on top; keep up to `keep` previous runs below it."""
    previous: list[str] = []
    extras = ""
    if path.exists():
        text = path.read_text(encoding="utf-8")
        # Sections other scripts (streaming.py, keys.py) keep at the end are theirs.
        cut = text.find(EXTRA_MARKER)
        if cut >= 0:
            text, extras = text[:cut], "\n" + text[cut:]
        chunks = text.split(RUN_MARKER)[1:]
        previous = [RUN_MARKER + chunk.rstrip() + "\n" for chunk in chunks][:keep]
    header = (
        "# Benchmark results\n\n"
        "Written by `bench/run.py` (`make bench`); newest run first. Regenerate rather than "
        "edit by hand.\n\n"
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(header + "\n".join([run_text, *previous]) + extras, encoding="utf-8")


# --------------------------------------------------------------------------- CLI


def _concurrency_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a comma-separated list of ints: {text}") from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError("concurrency levels must be >= 1")
    return values


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bench/run.py", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=int, default=10,
                        help="seconds of measured load per level and target (default 10)")
    parser.add_argument("--concurrency", type=_concurrency_list, default=[1, 16, 64],
                        help="comma-separated connection counts (default 1,16,64)")
    parser.add_argument("--workers", type=int, default=1, help="extproc workers (default 1)")
    parser.add_argument("--threads", type=int, default=2, help="wrk threads (default 2)")
    parser.add_argument("--warmup", type=int, default=1,
                        help="unmeasured seconds before each run (default 1; 0 = none)")
    parser.add_argument("--output", type=Path, default=Path("bench/RESULTS.md"),
                        help="results file (default bench/RESULTS.md)")
    parser.add_argument("--keep-history", type=int, default=4,
                        help="previous runs kept in the results file (default 4)")
    parser.add_argument("--quick", action="store_true",
                        help="smoke check: 2 s per level")
    parser.add_argument("--keep-workdir", action="store_true",
                        help="keep the temp dir with configs and process logs")
    parser.add_argument("--no-budgets", action="store_true",
                        help="skip the gateway+budgets target and the Redis-down check")
    parser.add_argument("--redis-timeout-ms", type=int, default=REDIS_TIMEOUT_MS,
                        help="redis.timeout_ms of the bench config (default "
                             f"{REDIS_TIMEOUT_MS}, the product default)")
    parser.add_argument("--fail-closed-requests", type=int, default=FAIL_CLOSED_REQUESTS,
                        help="sequential requests per Redis-down check "
                             f"(default {FAIL_CLOSED_REQUESTS}; 0 = skip the check)")
    return parser


def _display_command(argv: Sequence[str]) -> str:
    python = sys.executable
    with contextlib.suppress(ValueError):
        relative = os.path.relpath(python, Path.cwd())
        if not relative.startswith(".."):
            python = relative
    return shlex.join([python, "bench/run.py", *argv])


def print_summary(levels: Iterable[Level], probes: Sequence[Probe] = ()) -> None:
    levels = list(levels)
    print()
    for row in main_table(levels):
        print(row)
    if any(lv.budgets for lv in levels):
        print()
        for row in budgets_table(levels):
            print(row)
        print()
        for row in round_trip_table(levels, detail=False):
            print(row)
    if probes:
        print()
        for row in probe_table(probes):
            print(row)
    print(flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    raw_argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(raw_argv)
    if args.quick:
        args.duration = 2
    if (args.duration < 1 or args.workers < 1 or args.threads < 1 or args.warmup < 0
            or not 0 <= args.fail_closed_requests <= 10_000
            or not 1 <= args.redis_timeout_ms <= 10_000):
        print("bench: --duration, --workers and --threads must be >= 1, --warmup >= 0, "
              "--fail-closed-requests 0..10000, --redis-timeout-ms 1..10000", file=sys.stderr)
        return 2
    budgets = not args.no_budgets
    targets = (DIRECT, GATEWAY, BUDGETS) if budgets else (DIRECT, GATEWAY)
    started = dt.datetime.now(dt.UTC)
    command = _display_command(raw_argv)
    info = machine_info()
    ncpu = len(os.sched_getaffinity(0))
    workdir = Path(tempfile.mkdtemp(prefix="asc-bench-"))
    stack = Stack(workdir)
    levels: list[Level] = []
    probes: list[Probe] = []
    ledger_errors: Counter[str] = Counter()
    extproc_processes = 0
    ok = False
    try:
        print(f"bench: starting stack in {workdir} (workers={args.workers})", flush=True)
        bench = start_bench_stack(stack, workers=args.workers, budgets=budgets,
                                  redis_timeout_ms=args.redis_timeout_ms)
        extproc_processes = bench.extproc_processes
        smoke_check(bench.direct_port, bench.tenant_key, DIRECT)
        smoke_check(bench.gateway_port, bench.tenant_key, GATEWAY)
        if budgets:
            smoke_check(bench.gateway_port, bench.key(BUDGETS), BUDGETS,
                        require_header="x-asc-budget-remaining-usd")
        for concurrency in args.concurrency:
            runs: dict[str, Run] = {}
            for target in targets:
                print(f"bench: c={concurrency} {target} ({args.duration} s)...", flush=True)
                run = measure(bench, target, concurrency=concurrency, threads=args.threads,
                              duration_s=args.duration, warmup_s=args.warmup)
                w = run.wrk
                print(f"  {w.rps:,.0f} rps  p50 {w.p50_ms:.2f} ms  p99 {w.p99_ms:.2f} ms"
                      f"  requests {w.requests:,}"
                      + (f"  ERRORS: {w.error_text()}" if w.error_text() else ""), flush=True)
                if target == BUDGETS:
                    print(f"  Redis round trips/request {_fmt(run.round_trips_per_request(), 3)}"
                          f" (per reservation {_fmt(run.round_trips_per_reservation(), 3)})",
                          flush=True)
                runs[target] = run
            levels.append(Level(concurrency, runs[DIRECT], runs[GATEWAY], runs.get(BUDGETS)))
            if bench.extproc_log is not None:
                ledger_errors = ledger_unavailable_reasons(bench.extproc_log)
        if budgets and args.fail_closed_requests:
            print(f"bench: Redis-down check ({args.fail_closed_requests} sequential requests "
                  "per row)...", flush=True)
            probes = redis_down_probes(bench, args.fail_closed_requests)
            for pr in probes:
                print(f"  {pr.label}: {pr.statuses} p50 {pr.percentile(50):.2f} ms "
                      f"p99 {pr.percentile(99):.2f} ms max {pr.max_ms:.2f} ms"
                      + ("" if pr.ok else f"  FAILED: {'; '.join(pr.failures)}"), flush=True)
        ok = True
    except Exception as exc:
        print(f"bench: FAILED: {exc}", file=sys.stderr)
        print(f"bench: process logs kept in {workdir}", file=sys.stderr)
    finally:
        stack.stop()
    if levels:
        text = render_run(levels=levels, info=info, command=command, started=started,
                          args=args, ncpu=ncpu, extproc_processes=extproc_processes,
                          complete=ok, probes=probes, ledger_errors=ledger_errors)
        write_results(args.output, text, args.keep_history)
        print_summary(levels, probes)
        for line in anomalies(levels, ncpu, probes, ledger_errors):
            print(line)
        print(f"bench: results written to {args.output}")
    if ok and not args.keep_workdir:
        shutil.rmtree(workdir, ignore_errors=True)
    elif ok:
        print(f"bench: workdir kept: {workdir}")
    errors = any(lv.errors() for lv in levels) or any(not pr.ok for pr in probes)
    return 0 if ok and not errors else 1


if __name__ == "__main__":
    raise SystemExit(main())
