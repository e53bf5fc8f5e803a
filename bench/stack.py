"""The bench's processes on loopback: one emulator, one Redis, and every path to it.

Started through `extproc.devstack.Stack` (all stopped together, in reverse order):

- *direct*: an Envoy routing straight to the emulator, the provider key added by the route
  (`request_headers_to_add`), no ext_proc, the gateway's access log;
- *gateway*: Envoy rendered from the bench gateway config with ext_proc in the path; the
  same processes serve the same-dialect path (OpenAI door to an OpenAI backend), the
  translated path (OpenAI door to an Anthropic backend on the same emulator) and, with a
  second tenant's key, the budgets path (Redis reserve + settle per request);
- *gateway fast path*: a second extproc + Envoy from the same config with the fast path
  switched on, once the config has such a setting (`fastpath_document`), else skipped
  with the reason printed;
- the peers (bench/peers.py): LiteLLM proxy and Portkey gateway, same emulator.

Every target is a `Target`: where to send, what, and which process trees to charge.
"""

from __future__ import annotations

import json
import secrets
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import yaml

REPO_ROOT: Final = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:  # `python bench/run.py` puts bench/ first, not the repo
    sys.path.insert(0, str(REPO_ROOT))

from cpu import process_tree, tree_cpu_seconds  # noqa: E402

from extproc.auth import hash_key  # noqa: E402
from extproc.config import load_config  # noqa: E402
from extproc.config_schema import Document  # noqa: E402
from extproc.devstack import LOOPBACK, ManagedProcess, Stack, free_port  # noqa: E402
from extproc.envoy_bootstrap import EnvoyPorts, admin_address, render_bootstrap  # noqa: E402
from extproc.secrets import Secret  # noqa: E402

__all__ = [
    "BODY", "BUDGETS", "BUDGET_TENANT", "CHAT_PATH", "DIRECT", "FASTPATH", "FASTPATH_BUDGETS",
    "GATEWAY", "MODEL",
    "TENANT", "TRANSLATED", "BenchStack", "Target", "direct_bootstrap", "fastpath_document",
    "find_access_log", "gateway_document", "smoke_check", "start_bench_stack",
    "wait_for_workers",
]

CHAT_PATH: Final = "/v1/chat/completions"
MODEL: Final = "gpt-4o-mini"
TRANSLATED_MODEL: Final = "claude-bench"
"""An OpenAI-door model name served by the Anthropic-kind provider: the translated path."""
ANTHROPIC_MODEL: Final = "claude-sonnet-4-5"


def chat_body(model: str, **fields: Any) -> str:
    return json.dumps({"model": model, "messages": [{"role": "user", "content": "Hello"}],
                       **fields}, separators=(",", ":"))


BODY: Final = chat_body(MODEL)
PROVIDER_KEY_ENV: Final = "ASC_BENCH_PROVIDER_KEY"
PROVIDER_CLUSTER: Final = "bench_emulator"
ANTHROPIC_CLUSTER: Final = "bench_emulator_anthropic"
DIRECT: Final = "direct"
GATEWAY: Final = "gateway"
BUDGETS: Final = "gateway+budgets"
TRANSLATED: Final = "gateway-translated"
FASTPATH: Final = "gateway-fastpath"
FASTPATH_BUDGETS: Final = "gateway-fastpath+budgets"
TENANT: Final = "bench"
BUDGET_TENANT: Final = "bench-budgets"
"""Same gateway, second tenant: a budget and RPM/TPM limits it never reaches."""
BUDGET_LIMIT_USD: Final = 1_000_000
BUDGET_RPM: Final = 10_000_000  # the config's maximum
BUDGET_TPM: Final = 10_000_000_000  # the config's maximum
REDIS_TIMEOUT_MS: Final = 50
"""The product default for `redis.timeout_ms`; --redis-timeout-ms overrides it."""
SYSTEM_REDIS_PORT: Final = 6379
FASTPATH_SETTING: Final = "fast_path"
"""Top-level config section the fast path (issue 14 item 1) is expected to add."""


@dataclass(frozen=True, slots=True)
class Target:
    """One row of the bench: where the load goes, what it sends, whose CPU it costs."""

    name: str
    port: int
    key: str
    """Sent as `Authorization: Bearer <key>` (virtual key, master key or provider key)."""
    pids: Mapping[str, int]
    """component -> pid whose whole process tree is charged (extproc, envoy, peer, ...)."""
    body: str = BODY
    path: str = CHAT_PATH
    headers: Mapping[str, str] = field(default_factory=dict)
    """Extra request headers (Portkey's provider and custom host)."""
    note: str = ""
    """What this target is, for the report."""

    def cpu_snapshot(self) -> dict[str, float]:
        return {name: tree_cpu_seconds(pid) for name, pid in self.pids.items()}


@dataclass(slots=True)
class BenchStack:
    stack: Stack
    tenant_key: str
    provider_key: str
    gateway_port: int
    direct_port: int
    emulator_port: int
    extproc_processes: int = 1
    targets: dict[str, Target] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    """target -> why it is not measured in this run (printed and reported)."""
    budget_key: str | None = None
    """Virtual key of the budgets tenant; None with --no-budgets."""
    redis: ManagedProcess | None = None
    redis_port: int = 0
    metrics_port: int = 0
    extproc_log: Path | None = None

    def all_pids(self) -> set[int]:
        return {pid for target in self.targets.values() for pid in target.pids.values()}

    def add(self, target: Target) -> None:
        self.targets[target.name] = target

    def drop(self, name: str, reason: str) -> None:
        """A peer that started but does not answer: stop it, report it skipped."""
        target = self.targets.pop(name)
        peer = target.pids.get("peer")
        for process in [p for p in self.stack.processes if p.popen.pid == peer]:
            process.stop()
            self.stack.processes.remove(process)
        self.skip(name, reason)

    def skip(self, name: str, reason: str) -> None:
        self.skipped[name] = reason
        print(f"bench: {name} skipped: {reason}", flush=True)


def gateway_document(workdir: Path, *, emulator_port: int, redis_port: int,
                         pepper: str, tenant_key: str, budget_key: str | None = None,
                         redis_timeout_ms: int = REDIS_TIMEOUT_MS) -> dict[str, Any]:
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
            "bench-anthropic": {
                "kind": "anthropic",
                "base_url": f"http://{LOOPBACK}:{emulator_port}",
                "region": "us-east-1",
                "zone": "us",
                "cluster": ANTHROPIC_CLUSTER,
                "credentials": ["bench-key-1"],
            },
        },
        "models": {
            MODEL: {
                "price": {"input_per_mtok": 0.15, "output_per_mtok": 0.60},
                "deployments": [{"provider": "bench-openai", "model": MODEL}],
            },
            TRANSLATED_MODEL: {
                "price": {"input_per_mtok": 3, "output_per_mtok": 15},
                "deployments": [{"provider": "bench-anthropic", "model": ANTHROPIC_MODEL}],
            },
        },
        "tenants": {
            TENANT: {
                "zone": "us",
                "keys": [{"id": "bench-key",
                          "hash": hash_key(Secret(pepper), tenant_key)}],
                "models": [MODEL, TRANSLATED_MODEL],
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
    return config


def save_config(workdir: Path, document: Mapping[str, Any], name: str = "asc-bench") -> Path:
    path = workdir / f"{name}.yaml"
    path.write_text("# Generated by bench/run.py\n" + yaml.safe_dump(dict(document),
                                                                      sort_keys=False),
                    encoding="utf-8")
    return path



def find_access_log(bootstrap: Mapping[str, Any]) -> list[Any] | None:
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


def wait_for_workers(pid: int, workers: int, timeout: float = 20.0) -> None:
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



def fastpath_document(document: Mapping[str, Any]) -> tuple[dict[str, Any] | None, str]:
    """The gateway config with the fast path on, or (None, why not): an older config
    schema without the setting makes the run report the fast-path rows as skipped."""
    if FASTPATH_SETTING not in Document.model_fields:
        return None, (f"the gateway config has no `{FASTPATH_SETTING}` setting yet "
                      "(issue 14 item 1 not merged)")
    fast = dict(document)
    fast[FASTPATH_SETTING] = {"enabled": True}
    # As docs/fast-path.md recommends: the audit record carries what the per-request log
    # line says (the other gateway rows keep the product default, the line on).
    fast["logging"] = {"request_log": False}
    try:
        Document.model_validate(fast)
    except ValueError as exc:
        first = str(exc).splitlines()[0:3]
        return None, f"`{FASTPATH_SETTING}: {{enabled: true}}` is not valid: {' '.join(first)}"
    return fast, ""


def _envoy_yaml(bootstrap: dict[str, Any]) -> str:
    """The bootstrap as YAML Envoy reads back exactly: the product's own dumper where it
    has one (it quotes keys such as `n` that YAML 1.1 would read as booleans; the fast
    path's json_to_metadata rules have them), else plain safe_dump."""
    try:
        from extproc.envoy_bootstrap import bootstrap_yaml
    except ImportError:
        return yaml.safe_dump(bootstrap, sort_keys=False)
    return bootstrap_yaml(bootstrap)


@dataclass(frozen=True, slots=True)
class Gateway:
    extproc: ManagedProcess
    envoy: ManagedProcess
    port: int
    metrics_port: int
    access_log: list[Any] | None


def start_gateway(stack: Stack, document: Mapping[str, Any], *, workers: int,
                  name: str) -> Gateway:
    """extproc + its Envoy for one config document."""
    config_path = save_config(stack.workdir, document, name)
    config = load_config(config_path)
    extproc, extproc_port, metrics_port = stack.start_extproc(config_path, workers=workers,
                                                              name=f"extproc-{name}")
    wait_for_workers(extproc.popen.pid, workers)
    port, admin = free_port(), stack.admin_socket(f"envoy-{name}")
    bootstrap = render_bootstrap(config, EnvoyPorts(
        listen_port=port, admin_socket=str(admin), extproc_port=extproc_port))
    envoy = stack.start_envoy(f"# bench {name} Envoy\n" + _envoy_yaml(bootstrap),
                              listen_port=port, admin_socket=admin, name=f"envoy-{name}")
    return Gateway(extproc, envoy, port, metrics_port, find_access_log(bootstrap))


def start_bench_stack(stack: Stack, *, workers: int, budgets: bool = True,
                      redis_timeout_ms: int = REDIS_TIMEOUT_MS) -> BenchStack:
    emulator_port = free_port()  # first: the gateway config names it
    pepper = secrets.token_hex(32)
    tenant_key = "sk-asc-bench-" + secrets.token_hex(16)
    budget_key = "sk-asc-bench-budgets-" + secrets.token_hex(16) if budgets else None
    provider_key = "sk-emu-bench-" + secrets.token_hex(16)
    stack.env[PROVIDER_KEY_ENV] = provider_key

    redis, redis_port = stack.start_redis()  # a free loopback port, never the system 6379
    document = gateway_document(stack.workdir, emulator_port=emulator_port,
                                redis_port=redis_port, pepper=pepper, tenant_key=tenant_key,
                                budget_key=budget_key, redis_timeout_ms=redis_timeout_ms)
    emulator, _ = stack.start_emulator([provider_key], emulator_port)
    gateway = start_gateway(stack, document, workers=workers, name="gateway")

    direct_port, direct_admin = free_port(), stack.admin_socket("envoy-direct")
    direct = direct_bootstrap(listen_port=direct_port, admin_socket=direct_admin,
                              emulator_port=emulator_port, provider_key=provider_key,
                              access_log=gateway.access_log)
    envoy_direct = stack.start_envoy(
        "# bench direct Envoy (no ext_proc)\n" + yaml.safe_dump(direct, sort_keys=False),
        listen_port=direct_port, admin_socket=direct_admin, name="envoy-direct")

    bench = BenchStack(stack, tenant_key, provider_key, gateway.port, direct_port,
                       emulator_port, len(process_tree(gateway.extproc.popen.pid)),
                       budget_key=budget_key, redis=redis, redis_port=redis_port,
                       metrics_port=gateway.metrics_port, extproc_log=gateway.extproc.log_path)
    shared = {"emulator": emulator.popen.pid, "redis": redis.popen.pid}
    on_gateway = {"extproc": gateway.extproc.popen.pid, "envoy": gateway.envoy.popen.pid,
                  **shared}
    bench.add(Target(DIRECT, direct_port, tenant_key,
                     {"envoy": envoy_direct.popen.pid, **shared},
                     note="Envoy routing to the emulator, provider key added by the route, "
                          "no ext_proc"))
    bench.add(Target(GATEWAY, gateway.port, tenant_key, on_gateway,
                     note="same dialect: OpenAI door to the OpenAI-kind provider"))
    bench.add(Target(TRANSLATED, gateway.port, tenant_key, on_gateway,
                     body=chat_body(TRANSLATED_MODEL),
                     note="translated: OpenAI door to the Anthropic-kind provider"))
    if budget_key is not None:
        bench.add(Target(BUDGETS, gateway.port, budget_key, on_gateway,
                         note="same dialect, tenant with a Redis budget and RPM/TPM limits"))
    fast, why_not = fastpath_document(document)
    if fast is None:
        bench.skip(FASTPATH, why_not)
    else:
        started = len(stack.processes)
        try:
            fastpath = start_gateway(stack, fast, workers=workers, name="fastpath")
        except (OSError, RuntimeError, TimeoutError) as exc:
            while len(stack.processes) > started:  # the run goes on without this row
                stack.processes.pop().stop()
            lines = [line for line in str(exc).splitlines() if line.strip()]
            bench.skip(FASTPATH, "did not start: " + " ".join(lines[:2])[:400])
            return bench
        on_fastpath = {"extproc": fastpath.extproc.popen.pid,
                       "envoy": fastpath.envoy.popen.pid, **shared}
        bench.add(Target(FASTPATH, fastpath.port, tenant_key, on_fastpath,
                         note="same dialect on the fast path (the fast door, no ext_proc "
                              "message; `logging.request_log: false`)"))
        if budget_key is not None:
            bench.add(Target(FASTPATH_BUDGETS, fastpath.port, budget_key, on_fastpath,
                             body=chat_body(MODEL, max_tokens=16),
                             note="the fast path for the budget tenant (`max_tokens: 16`: "
                                  "without an output limit a budget request takes the "
                                  "full path)"))
    return bench


def smoke_check(target: Target, *, require_header: str | None = None) -> None:
    """One request before any load: fail fast, with the reason, if the path is broken."""
    request = urllib.request.Request(  # fixed http://127.0.0.1 URL
        f"http://{LOOPBACK}:{target.port}{target.path}", data=target.body.encode(),
        method="POST", headers={"Authorization": f"Bearer {target.key}",
                                "Content-Type": "application/json", **target.headers})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:  # noqa: S310
            status, payload, headers = response.status, response.read(), response.headers
    except urllib.error.HTTPError as exc:
        status, payload, headers = exc.code, exc.read(), exc.headers
    label = target.name
    if status != 200:
        raise RuntimeError(f"{label} smoke request: HTTP {status}: {payload[:500]!r}")
    if "choices" not in json.loads(payload):
        raise RuntimeError(f"{label} smoke request: unexpected body {payload[:500]!r}")
    if require_header and headers.get(require_header) is None:
        raise RuntimeError(f"{label} smoke request: no {require_header} header, so the "
                           f"request did not go through the budget ledger: {dict(headers)}")
