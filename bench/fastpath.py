"""The fast path against today's path and Envoy-direct, in one run (issue 14).

Starts via `extproc.devstack.Stack` a redis-server, the provider emulator, extproc
(`--workers`), the gateway Envoy rendered from a config whose tenants differ only in
the path they take (fast or full) and in budgets (on or off), and a *direct* Envoy (no
ext_proc, key injected by Envoy: `bench/run.py`'s `direct_bootstrap`). Then, for each
target, closed-loop wrk at `--concurrency` (default 16) for `--duration` seconds:

* `direct`                   Envoy only (the ratio base);
* `full` / `full+budgets`    today's path: 4 ext_proc messages per request;
* `fast` / `fast+budgets`    the fast path: 1 message (docs/fast-path.md);

plain, and streamed (`stream: true` with `include_usage`; the emulator sends one SSE
chunk per word of its reply). Per run: rps, p50/p99, extproc CPU µs per request (utime +
stime of the extproc process tree from /proc over the run, divided by requests), Envoy CPU
µs per request, and ext_proc messages per request and per streamed chunk (the service's
`asc_extproc_phase_seconds_count` per phase). Never asserts a timing.

    .venv/bin/python bench/fastpath.py                 # 8 s per run
    .venv/bin/python bench/fastpath.py --quick         # 3 s per run
    .venv/bin/python bench/fastpath.py --workers 2     # extproc with 2 worker processes

Results: a table on stdout and a dated `## Fast path ...` section at the end of
bench/RESULTS.md (bench/common.py). Only 127.0.0.1 is contacted; every loop is bounded.
"""

from __future__ import annotations

import argparse
import json
import re
import secrets
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import yaml

REPO_ROOT: Final = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:  # `python bench/fastpath.py` puts bench/ first
    sys.path.insert(0, str(REPO_ROOT))

import common  # noqa: E402
import run as bench_run  # noqa: E402  (bench/run.py: wrk, direct Envoy, /proc CPU)

from extproc.auth import hash_key  # noqa: E402
from extproc.config import load_config  # noqa: E402
from extproc.devstack import LOOPBACK, Stack, free_port  # noqa: E402
from extproc.envoy_bootstrap import EnvoyPorts, bootstrap_yaml, render_bootstrap  # noqa: E402
from extproc.secrets import Secret  # noqa: E402

MODEL: Final = "gpt-4o-mini"
REPLY_WORDS: Final = 8
"""The emulator's reply: one streamed chunk per word (plus role, finish, usage, [DONE])."""
PLAIN_BODY: Final = json.dumps({"model": MODEL, "max_tokens": 16,
                                "messages": [{"role": "user", "content": "Hello"}]})
STREAM_BODY: Final = json.dumps({"model": MODEL, "max_tokens": 16, "stream": True,
                                 "stream_options": {"include_usage": True},
                                 "messages": [{"role": "user", "content": "Hello"}]})
TENANTS: Final = ("full", "full+budgets", "fast", "fast+budgets")
_PHASES_RE: Final = re.compile(r'^asc_extproc_phase_seconds_count\{phase="([a-z_]+)"\} (\S+)$',
                               re.MULTILINE)


@dataclass(frozen=True, slots=True)
class Result:
    target: str
    body: str
    rps: float
    p50_ms: float
    p99_ms: float
    errors: str
    extproc_us: float | None
    envoy_us: float
    messages_per_request: float | None
    messages_per_chunk: float | None


def _tenant_id(name: str) -> str:
    return name.replace("+", "-")


def write_config(workdir: Path, *, emulator_port: int, redis_port: int, pepper: str,
                 keys: dict[str, str], request_log: bool) -> Path:
    (workdir / "pepper.txt").write_text(pepper + "\n", encoding="utf-8")
    tenants: dict[str, Any] = {}
    for name, key in keys.items():
        tenant: dict[str, Any] = {
            "zone": "us", "models": [MODEL],
            "keys": [{"id": f"{_tenant_id(name)}-key", "hash": hash_key(Secret(pepper), key)}]}
        if name.endswith("+budgets"):
            tenant["budgets"] = [{"scope": "tenant", "window": "month",
                                  "limit_usd": bench_run.BUDGET_LIMIT_USD}]
        tenants[_tenant_id(name)] = tenant
    config = {
        "version": 1,
        "auth": {"pepper": {"file": "pepper.txt"}},
        "redis": {"url": f"redis://{LOOPBACK}:{redis_port}/0"},
        "budgets": {"hold_ttl_s": 600},
        "credentials": {"bench-key-1": {"env": bench_run.PROVIDER_KEY_ENV}},
        "providers": {"bench-openai": {
            "kind": "openai", "base_url": f"http://{LOOPBACK}:{emulator_port}",
            "region": "us-east-1", "zone": "us", "cluster": bench_run.PROVIDER_CLUSTER,
            "credentials": ["bench-key-1"]}},
        "models": {MODEL: {"price": {"input_per_mtok": 0.15, "output_per_mtok": 0.60},
                           "deployments": [{"provider": "bench-openai"}]}},
        "tenants": tenants,
        "fast_path": {"tenants": [_tenant_id(n) for n in keys if n.startswith("fast")]},
        "logging": {"request_log": request_log},
    }
    path = workdir / "asc-fastpath-bench.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    return path


def phase_counts(metrics_port: int) -> dict[str, float]:
    with urllib.request.urlopen(
            f"http://{LOOPBACK}:{metrics_port}/metrics", timeout=10) as response:
        text = response.read().decode()
    return {phase: float(value) for phase, value in _PHASES_RE.findall(text)}


def smoke(port: int, key: str, body: str, label: str) -> None:
    request = urllib.request.Request(  # fixed http://127.0.0.1 URL
        f"http://{LOOPBACK}:{port}/v1/chat/completions", data=body.encode(), method="POST",
        headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310
        if response.status != 200:
            raise RuntimeError(f"{label}: HTTP {response.status}")
        response.read()


def measure(*, port: int, key: str, body: str, target: str, pids: dict[str, int],
            metrics_port: int, concurrency: int, duration_s: int, warmup_s: int,
            chunks_per_stream: int) -> Result:
    if warmup_s:
        _wrk(port, key, body, concurrency, warmup_s)
        time.sleep(bench_run.SETTLE_PAUSE_S)
    phases_before = phase_counts(metrics_port)
    before = {name: bench_run.tree_cpu_seconds(pid) for name, pid in pids.items()}
    result = _wrk(port, key, body, concurrency, duration_s)
    after = {name: bench_run.tree_cpu_seconds(pid) for name, pid in pids.items()}
    time.sleep(bench_run.SETTLE_PAUSE_S)  # settles from the access log land in the window
    after["extproc"] = bench_run.tree_cpu_seconds(pids["extproc"])
    phases_after = phase_counts(metrics_port)
    requests = max(result.requests, 1)
    extproc_us = None
    messages = chunk_messages = None
    if target != "direct":
        extproc_us = (after["extproc"] - before["extproc"]) / requests * 1e6
        delta = {p: phases_after.get(p, 0.0) - phases_before.get(p, 0.0)
                 for p in phases_after}
        messages = sum(delta.values()) / requests
        if body == STREAM_BODY:
            chunk_messages = delta.get("response_body", 0.0) / requests / chunks_per_stream
    return Result(target=target, body="stream" if body == STREAM_BODY else "plain",
                  rps=result.rps, p50_ms=result.p50_ms, p99_ms=result.p99_ms,
                  errors=result.error_text(), extproc_us=extproc_us,
                  envoy_us=(after["envoy"] - before["envoy"]) / requests * 1e6,
                  messages_per_request=messages, messages_per_chunk=chunk_messages)


def _wrk(port: int, key: str, body: str, concurrency: int,
         duration_s: int) -> bench_run.WrkResult:
    original = bench_run.BODY
    bench_run.BODY = body  # run_wrk hands BODY to wrk through its environment
    try:
        return bench_run.run_wrk(port, concurrency=concurrency, threads=2,
                                 duration_s=duration_s, key=key)[0]
    finally:
        bench_run.BODY = original


def _fmt(value: float | None, digits: int = 0) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def render(results: list[Result], *, machine: str, command: str, workers: int,
           concurrency: int, streams: int | None) -> str:
    base = {r.body: r.rps for r in results if r.target == "direct"}
    rows = [[r.target, r.body, _fmt(r.rps), f"{r.rps / base[r.body]:.2f}" if base.get(r.body)
             else "-", _fmt(r.p50_ms, 2), _fmt(r.p99_ms, 2), _fmt(r.extproc_us),
             _fmt(r.envoy_us), _fmt(r.messages_per_request, 2),
             _fmt(r.messages_per_chunk, 2), r.errors or "0"] for r in results]
    lines = [
        f"## Fast path ({common.utc_now():%Y-%m-%d %H:%M} UTC)",
        "",
        f"Machine: {machine}. extproc workers: {workers} (Envoy streams per extproc "
        f"connection: {streams or 'no limit'}); closed loop c={concurrency}.",
        f"Command: `{command}`",
        "",
        *common.table(["target", "body", "rps", "vs direct", "p50 ms", "p99 ms",
                       "extproc CPU µs/req", "Envoy CPU µs/req", "ext_proc msgs/req",
                       "msgs/chunk", "errors"], rows,
                      ["l", "l", "r", "r", "r", "r", "r", "r", "r", "r", "l"]),
        "",
        "extproc CPU: utime+stime of the extproc process tree over the run (plus the "
        "settle pause, so fast-path settles from the access log are counted) / requests. "
        "msgs/req: all ext_proc messages the service answered / requests; msgs/chunk: "
        f"response-body messages / requests / {REPLY_WORDS + 3} chunks per stream.",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--duration", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--streams-per-connection", type=int, default=None,
                        help="Envoy's HTTP/2 max_concurrent_streams towards extproc "
                        "(default: 4 with --workers > 1, else no limit)")
    parser.add_argument("--request-log", action="store_true",
                        help="keep the per-request log line (logging.request_log)")
    parser.add_argument("--quick", action="store_true", help="3 s runs, 1 s warm-up")
    parser.add_argument("--no-write", action="store_true", help="do not touch RESULTS.md")
    args = parser.parse_args(argv)
    if args.quick:
        args.duration, args.warmup = 3, 1
    if args.streams_per_connection is None and args.workers > 1:
        args.streams_per_connection = 4
    keys = {name: f"sk-asc-bench-{_tenant_id(name)}-" + secrets.token_hex(12)
            for name in TENANTS}
    provider_key = "sk-emu-bench-" + secrets.token_hex(16)
    results: list[Result] = []
    with Stack(Path(tempfile.mkdtemp(prefix="asc-fastpath-bench-"))) as stack:
        stack.env[bench_run.PROVIDER_KEY_ENV] = provider_key
        _, redis_port = stack.start_redis()
        emulator_port = free_port()
        config_path = write_config(stack.workdir, emulator_port=emulator_port,
                                   redis_port=redis_port, pepper=secrets.token_hex(32),
                                   keys=keys, request_log=args.request_log)
        reply = " ".join(f"w{i}" for i in range(REPLY_WORDS))
        emulator, _ = stack.start_emulator([provider_key], emulator_port,
                                           extra_args=("--reply", reply))
        extproc, extproc_port, metrics_port = stack.start_extproc(config_path,
                                                                  workers=args.workers)
        bench_run._wait_for_workers(extproc.popen.pid, args.workers)
        gateway_port, gateway_admin = free_port(), stack.admin_socket("envoy-gateway")
        bootstrap = render_bootstrap(load_config(config_path), EnvoyPorts(
            listen_port=gateway_port, admin_socket=str(gateway_admin),
            extproc_port=extproc_port,
            extproc_streams_per_connection=args.streams_per_connection))
        gateway = stack.start_envoy(bootstrap_yaml(bootstrap), listen_port=gateway_port,
                                    admin_socket=gateway_admin, name="envoy-gateway")
        direct_port, direct_admin = free_port(), stack.admin_socket("envoy-direct")
        direct_config = bench_run.direct_bootstrap(
            listen_port=direct_port, admin_socket=direct_admin, emulator_port=emulator_port,
            provider_key=provider_key, access_log=bench_run._find_access_log(bootstrap))
        direct = stack.start_envoy(yaml.safe_dump(direct_config, sort_keys=False),
                                   listen_port=direct_port, admin_socket=direct_admin,
                                   name="envoy-direct")
        chunks = REPLY_WORDS + 3
        for body in (PLAIN_BODY, STREAM_BODY):
            smoke(direct_port, "unused", body, "direct")
            for name in TENANTS:
                smoke(gateway_port, keys[name], body, name)
            plan = [("direct", direct_port, "unused", direct.popen.pid)] + [
                (name, gateway_port, keys[name], gateway.popen.pid) for name in TENANTS]
            for target, port, key, envoy_pid in plan:
                result = measure(port=port, key=key, body=body, target=target,
                                 pids={"extproc": extproc.popen.pid, "envoy": envoy_pid,
                                       "emulator": emulator.popen.pid},
                                 metrics_port=metrics_port, concurrency=args.concurrency,
                                 duration_s=args.duration, warmup_s=args.warmup,
                                 chunks_per_stream=chunks)
                results.append(result)
                print(f"{target:14} {result.body:6} rps={result.rps:8.0f} "
                      f"extproc={_fmt(result.extproc_us):>6} µs/req "
                      f"msgs/req={_fmt(result.messages_per_request, 2)} "
                      f"msgs/chunk={_fmt(result.messages_per_chunk, 2)} "
                      f"errors={result.errors or 0}", flush=True)
    text = render(results, machine=common.machine_line(envoy=True),
                  command=common.display_command("bench/fastpath.py", sys.argv[1:]),
                  workers=args.workers, concurrency=args.concurrency,
                  streams=args.streams_per_connection)
    print(text)
    if not args.no_write:
        common.append_section("fastpath", text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
