"""Failover bench: what failover costs when nothing fails, how long a failover takes, and
how long a deployment takes to get traffic back once it recovers. One run, loopback.

Three emulators (own keys): `eu-a` and `eu-b` serve model `m-zone` (zone eu, so requests
to it go to a failover cluster with the per-attempt ext_proc), `solo` serves `m-solo`
(alone in its zone: plain cluster, no per-attempt stream: the path as it was before
failover). The same extproc and Envoy serve both, in interleaved rounds.

* extproc CPU per request (from /proc: utime + stime of the extproc process / requests),
  `m-solo` vs `m-zone`, no faults;
* latency (p50, p90) of `m-zone` with the primary healthy, answering 503 (fails fast),
  and stalling (times out after `failover.first_byte_timeout_ms`);
* recovery: after the primary answered 503 long enough for its deployment breaker to open
  (and outlier detection to eject it), the time from clearing the fault until a request
  is served by the primary again.

    .venv/bin/python bench/failover.py            # writes a section into bench/RESULTS.md
    .venv/bin/python bench/failover.py --no-write
"""

from __future__ import annotations

import argparse
import os
import secrets
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Final

import httpx
import yaml

REPO_ROOT: Final = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from bench.common import append_section, machine_line, percentile, table  # noqa: E402
from extproc.auth import hash_key  # noqa: E402
from extproc.config import load_config  # noqa: E402
from extproc.devstack import Stack, free_port  # noqa: E402
from extproc.envoy_bootstrap import EnvoyPorts, render_bootstrap  # noqa: E402
from extproc.secrets import Secret  # noqa: E402

FIRST_BYTE_TIMEOUT_MS: Final = 1000
OUTLIER_EJECTION_S: Final = 5
HEALTH_COOLDOWN_S: Final = 10
"""deployment_health.cooldown_s (the default): how long an open deployment breaker
keeps the routing policy off the primary before its half-open probe."""
OUTLIER_ERRORS: Final = 5


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _cpu_tree(pid: int) -> float:
    """The process and its children (extproc workers run as children of a supervisor)."""
    total = _cpu_seconds(pid)
    for task in Path(f"/proc/{pid}/task").iterdir():
        children = task / "children"
        if children.exists():
            for child in children.read_text().split():
                total += _cpu_tree(int(child))
    return total


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--requests", type=int, default=400, help="per CPU round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--latency-requests", type=int, default=30)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args(argv)

    pepper, tenant_key = "bench-pepper-" + secrets.token_hex(8), "sk-bench-" + secrets.token_hex(8)
    keys = {name: f"sk-bench-{name}-" + secrets.token_hex(8) for name in ("eu-a", "eu-b", "solo")}
    with tempfile.TemporaryDirectory() as tmp, Stack(Path(tmp)) as stack:
        ports = {}
        for name, key in keys.items():
            _, ports[name] = stack.start_emulator([key])
        config_dir = Path(tmp) / "config"
        config_dir.mkdir()
        (config_dir / "pepper.txt").write_text(pepper + "\n")
        document: dict[str, Any] = {
            "version": 1,
            "auth": {"pepper": {"file": "pepper.txt"}},
            # The routing policy's deployment breaker opens after as many failures as
            # outlier detection ejects after (docs/routing.md, Health).
            "deployment_health": {"failures": OUTLIER_ERRORS, "cooldown_s": HEALTH_COOLDOWN_S},
            "failover": {"max_attempts": 2, "first_byte_timeout_ms": FIRST_BYTE_TIMEOUT_MS,
                         "outlier_consecutive_errors": OUTLIER_ERRORS,
                         "outlier_ejection_s": OUTLIER_EJECTION_S},
            "credentials": {f"{n}-1": {"env": f"BENCH_KEY_{n.replace('-', '_').upper()}"}
                            for n in keys},
            "providers": {n: {"kind": "openai", "base_url": f"http://127.0.0.1:{ports[n]}",
                              "region": n, "zone": "solo" if n == "solo" else "eu",
                              "cluster": n.replace("-", "_"), "credentials": [f"{n}-1"]}
                          for n in keys},
            "models": {
                "m-zone": {"price": {"input_per_mtok": 1, "output_per_mtok": 1},
                           "deployments": [{"provider": "eu-a"}, {"provider": "eu-b"}]},
                "m-solo": {"price": {"input_per_mtok": 1, "output_per_mtok": 1},
                           "deployments": [{"provider": "solo"}]},
            },
            "tenants": {"t": {"keys": [{"id": "t", "hash": hash_key(Secret(pepper), tenant_key)}],
                              "models": ["m-zone", "m-solo"]}},
        }
        config_path = config_dir / "asc.yaml"
        config_path.write_text(yaml.safe_dump(document))
        env = dict(stack.env, **{f"BENCH_KEY_{n.replace('-', '_').upper()}": k
                                 for n, k in keys.items()})
        extproc, extproc_port, _ = stack.start_extproc(config_path, env=env)
        listen_port, admin_socket = free_port(), stack.admin_socket()
        bootstrap = render_bootstrap(load_config(config_path), EnvoyPorts(
            listen_port=listen_port, admin_socket=str(admin_socket), extproc_port=extproc_port))
        stack.start_envoy(yaml.safe_dump(bootstrap), listen_port=listen_port,
                          admin_socket=admin_socket)
        base = f"http://127.0.0.1:{listen_port}"
        headers = {"authorization": f"Bearer {tenant_key}"}

        def post(client: httpx.Client, model: str) -> httpx.Response:
            return client.post("/v1/chat/completions", headers=headers, json={
                "model": model, "messages": [{"role": "user", "content": "Hi"}]})

        def load(model: str, count: int, threads: int = 4) -> float:
            """CPU seconds of extproc for `count` requests (4 keep-alive clients)."""
            errors: list[int] = []

            def run(n: int) -> None:
                with httpx.Client(base_url=base, timeout=30) as client:
                    for _ in range(n):
                        status = post(client, model).status_code
                        if status != 200:
                            errors.append(status)

            before = _cpu_tree(extproc.popen.pid)
            workers = [threading.Thread(target=run, args=(count // threads,))
                       for _ in range(threads)]
            for worker in workers:
                worker.start()
            for worker in workers:
                worker.join()
            if errors:
                raise SystemExit(f"bench: {len(errors)} errors on {model}: {errors[:5]}")
            return _cpu_tree(extproc.popen.pid) - before

        load("m-solo", 100)
        load("m-zone", 100)  # warm-up
        cpu: dict[str, list[float]] = {"m-solo": [], "m-zone": []}
        for _ in range(args.rounds):
            for model in ("m-solo", "m-zone"):
                cpu[model].append(load(model, args.requests) / args.requests * 1e6)

        primary = httpx.Client(base_url=f"http://127.0.0.1:{ports['eu-a']}", timeout=10)

        def latencies(fault: dict[str, Any] | None) -> tuple[list[float], set[str]]:
            primary.delete("/_emulator/faults")
            if fault is not None:
                primary.post("/_emulator/faults", json={**fault, "count": 100_000})
            times, served = [], set()
            with httpx.Client(base_url=base, timeout=30) as client:
                for _ in range(args.latency_requests):
                    started = time.perf_counter()
                    response = post(client, "m-zone")
                    times.append((time.perf_counter() - started) * 1000)
                    served.add(f"{response.status_code} {response.headers.get('x-asc-provider')}")
            return times, served

        def recovery() -> float:
            """Seconds from clearing the primary's fault until it serves again."""
            primary.delete("/_emulator/faults")
            cleared = time.perf_counter()
            with httpx.Client(base_url=base, timeout=30) as client:
                while post(client, "m-zone").headers.get("x-asc-provider") != "eu-a":
                    if time.perf_counter() - cleared > 10 * OUTLIER_EJECTION_S:
                        return float("nan")
                    time.sleep(0.05)
            return time.perf_counter() - cleared

        healthy, healthy_served = latencies(None)
        fast, fast_served = latencies({"status": 503})
        fast_recovery = recovery()
        stall, stall_served = latencies({"delay_ms": 10 * FIRST_BYTE_TIMEOUT_MS})
        stall_recovery = recovery()
        primary.close()

    solo, zone = (sum(cpu[m]) / len(cpu[m]) for m in ("m-solo", "m-zone"))
    lines = [
        f"## Failover ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())})",
        "",
        machine_line(envoy=True),
        "",
        f"`bench/failover.py`: {args.rounds} interleaved rounds of {args.requests} requests "
        f"(4 keep-alive clients); failover.max_attempts 2, first_byte_timeout_ms "
        f"{FIRST_BYTE_TIMEOUT_MS}, outlier {OUTLIER_ERRORS} errors / {OUTLIER_EJECTION_S} s.",
        "",
        *table(["path (no faults)", "extproc CPU µs/request (rounds)", "mean"], [
            ["plain cluster (m-solo, as before failover)",
             ", ".join(f"{v:.0f}" for v in cpu["m-solo"]), f"{solo:.0f}"],
            ["failover cluster (m-zone, per-attempt ext_proc)",
             ", ".join(f"{v:.0f}" for v in cpu["m-zone"]), f"{zone:.0f}"],
        ]),
        "",
        f"CPU growth on a failover-capable route: **{(zone / solo - 1) * 100:+.0f} %**.",
        "",
        *table(["m-zone, primary", "before ejection: p50 ms (requests)",
                "after ejection: p50 ms", "served by"], [
            [name, f"{percentile(t[:OUTLIER_ERRORS], 50):.1f} ({OUTLIER_ERRORS})",
             f"{percentile(t[OUTLIER_ERRORS:], 50):.1f}", ", ".join(sorted(s))]
            for name, t, s in (("healthy", healthy, healthy_served),
                               ("503 (fails fast)", fast, fast_served),
                               ("stalls (times out)", stall, stall_served))
        ]),
        "",
        "Before ejection every request makes a failed attempt first; after "
        f"{OUTLIER_ERRORS} consecutive errors the routing policy's deployment breaker "
        "opens (and outlier detection ejects the primary): requests go straight to the "
        "fallback.",
        "",
        f"Recovery (primary serves again after its fault is cleared): after 503s "
        f"{fast_recovery:.1f} s, after stalls {stall_recovery:.1f} s (the breaker's "
        f"cool-down, deployment_health.cooldown_s {HEALTH_COOLDOWN_S} s, then its "
        f"half-open probe; outlier_ejection_s is {OUTLIER_EJECTION_S} s).",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    if not args.no_write:
        append_section("failover", text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
