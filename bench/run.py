"""`make bench`: the gateway, Envoy-direct and the peers, in one run, on loopback.

Starts (bench/stack.py) redis, the provider emulator, extproc and two Envoys: the
*gateway* Envoy rendered from a bench gateway config (ext_proc in the path) and a
*direct* Envoy that routes straight to the same emulator and injects the provider key
itself (no ext_proc); then the peers (bench/peers.py): LiteLLM proxy with 1 and 2
workers and Portkey's gateway, forwarding to the same emulator. The gateway is measured
on its same-dialect path, its translated path (OpenAI door to an Anthropic backend) and
with a budgets tenant (one EVALSHA to reserve, one to settle; counted from the bench
redis' `INFO commandstats`), and on the fast path (a second gateway rendered with
`fast_path` on: the fast door, no ext_proc message), with and without budgets.

For every concurrency level wrk POSTs a small OpenAI chat body to every target
(bench/load.py); then a fixed-rate client drives each target at 500 requests/s (open loop)
for p50/p99/p99.9. CPU per request comes from /proc per process tree (bench/cpu.py),
which is stable on a noisy machine, unlike wall time. After the load runs the bench
redis-server is stopped and sequential requests check that the budgets tenant gets a
fast 503 (`fail_closed`) while the tenant without budgets still gets 200
(bench/ledger.py). The report (bench/report.py) goes on top of `bench/RESULTS.md`, with
a PNG chart in bench/results/.

Each target is measured `--rounds` times (default 3), round after round, each round in
a rotated order, and the round with the median rps is reported (the median p99 for the
open loop): this VM's pace drifts by up to 1.8x within a minute (bench/cpu.py), which
made single back-to-back runs of the same code differ by 20 to 40 %.

    .venv/bin/python bench/run.py --duration 10
    .venv/bin/python bench/run.py --quick            # 2 s per level, smoke check
    .venv/bin/python bench/run.py --no-peers         # direct and gateway rows only
    .venv/bin/python bench/run.py --no-budgets       # no budgets row, no Redis-down check

Only 127.0.0.1 is ever contacted; every load run is bounded by `--duration`.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import os
import shlex
import shutil
import sys
import tempfile
from collections import Counter, defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Final

BENCH_DIR: Final = Path(__file__).resolve().parent
for _path in (BENCH_DIR.parent, BENCH_DIR):  # the repo (extproc) and bench/'s own modules
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

import load as bench_load  # noqa: E402
import stack as bench_stack  # noqa: E402
from chart import write_chart  # noqa: E402
from cpu import tree_cpu_seconds  # noqa: E402
from ledger import (  # noqa: E402
    FAIL_CLOSED_REQUESTS,
    Probe,
    ledger_unavailable_reasons,
    redis_down_probes,
)
from load import WrkResult  # noqa: E402
from measure import (  # noqa: E402
    OPEN_LOOP_RATE,
    SETTLE_PAUSE_S,
    Level,
    OpenRun,
    Run,
    measure,
    measure_open_loop,
    median_open_run,
    median_run,
    rotated,
)
from peers import start_litellm, start_portkey  # noqa: E402
from report import (  # noqa: E402
    anomalies,
    is_peer,
    machine_info,
    print_summary,
    render_run,
    write_results,
)
from stack import (  # noqa: E402
    BUDGETS,
    DIRECT,
    FASTPATH_BUDGETS,
    GATEWAY,
    REDIS_TIMEOUT_MS,
    direct_bootstrap,
    find_access_log,
    smoke_check,
    start_bench_stack,
)

from extproc.devstack import Stack  # noqa: E402

__all__ = ["BODY", "BUDGET_LIMIT_USD", "PROVIDER_CLUSTER", "PROVIDER_KEY_ENV", "SETTLE_PAUSE_S",
           "WrkResult", "build_parser", "direct_bootstrap", "find_access_log", "main",
           "run_wrk", "tree_cpu_seconds"]

CHART_DIR: Final = BENCH_DIR / "results"

# --------------------------------------------------------------------------- for other scripts
# The names other bench scripts (streaming.py before the split, fastpath.py) took from
# `import run as bench_run`, kept so they run unchanged: the constants, and `run_wrk` with
# its former signature, which POSTs this module's BODY (a caller may swap it).

BODY = bench_stack.BODY
BUDGET_LIMIT_USD: Final = bench_stack.BUDGET_LIMIT_USD
PROVIDER_CLUSTER: Final = bench_stack.PROVIDER_CLUSTER
PROVIDER_KEY_ENV: Final = bench_stack.PROVIDER_KEY_ENV
_find_access_log = find_access_log
_wait_for_workers = bench_stack.wait_for_workers


def run_wrk(port: int, *, concurrency: int, threads: int, duration_s: int,
            key: str) -> tuple[WrkResult, float]:
    """wrk POSTing `BODY` to the chat path: bench/load.py's `run_wrk` for one body."""
    return bench_load.run_wrk(port, concurrency=concurrency, threads=threads,
                              duration_s=duration_s, key=key, path=bench_stack.CHAT_PATH,
                              body=BODY)


def _concurrency_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a comma-separated list of ints: {text}") from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError("concurrency levels must be >= 1")
    return values


def _workers_list(text: str) -> list[int]:
    values = _concurrency_list(text) if text.strip() else []
    if any(v > 8 for v in values):
        raise argparse.ArgumentTypeError("LiteLLM workers: 1..8")
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
    parser.add_argument("--open-loop", type=int, default=OPEN_LOOP_RATE,
                        help=f"fixed rate of the open-loop run in requests/s (default "
                             f"{OPEN_LOOP_RATE}; 0 = skip it)")
    parser.add_argument("--litellm-workers", type=_workers_list, default=[1, 2],
                        help="LiteLLM proxy worker counts, one target each (default 1,2)")
    parser.add_argument("--no-peers", action="store_true",
                        help="leave out LiteLLM and Portkey")
    parser.add_argument("--output", type=Path, default=BENCH_DIR / "RESULTS.md",
                        help="results file (default bench/RESULTS.md)")
    parser.add_argument("--rounds", type=int, default=3,
                        help="measured runs per target, in rotated order; the median is "
                             "reported (default 3; --quick: 1)")
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


def _valid(args: argparse.Namespace) -> bool:
    return (args.duration >= 1 and args.workers >= 1 and args.threads >= 1
            and args.warmup >= 0 and 1 <= args.rounds <= 20
            and 0 <= args.fail_closed_requests <= 10_000
            and 1 <= args.redis_timeout_ms <= 10_000 and 0 <= args.open_loop <= 20_000)


def main(argv: Sequence[str] | None = None) -> int:
    raw_argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(raw_argv)
    if args.quick:
        args.duration = 2
        args.rounds = 1
    if not _valid(args):
        print("bench: --duration, --workers and --threads must be >= 1, --warmup >= 0, "
              "--rounds 1..20, "
              "--fail-closed-requests 0..10000, --redis-timeout-ms 1..10000, "
              "--open-loop 0..20000", file=sys.stderr)
        return 2
    budgets = not args.no_budgets
    started = dt.datetime.now(dt.UTC)
    command = _display_command(raw_argv)
    info = machine_info()
    ncpu = len(os.sched_getaffinity(0))
    workdir = Path(tempfile.mkdtemp(prefix="asc-bench-"))
    stack = Stack(workdir)
    levels: list[Level] = []
    rounds: dict[tuple[int, str], list[Run]] = defaultdict(list)
    open_runs: list[OpenRun] = []
    probes: list[Probe] = []
    ledger_errors: Counter[str] = Counter()
    extproc_processes = 0
    skipped: dict[str, str] = {}
    notes: dict[str, str] = {}
    ok = False
    try:
        print(f"bench: starting stack in {workdir} (workers={args.workers})", flush=True)
        bench = start_bench_stack(stack, workers=args.workers, budgets=budgets,
                                  redis_timeout_ms=args.redis_timeout_ms)
        if not args.no_peers:
            for workers in args.litellm_workers:
                print(f"bench: starting LiteLLM proxy ({workers} worker(s))...", flush=True)
                start_litellm(bench, workers=workers)
            print("bench: starting Portkey gateway...", flush=True)
            start_portkey(bench)
        extproc_processes = bench.extproc_processes
        for name, target in list(bench.targets.items()):
            try:
                smoke_check(target, require_header="x-asc-budget-remaining-usd"
                            if name in (BUDGETS, FASTPATH_BUDGETS) else None)
            except (OSError, RuntimeError, ValueError) as exc:
                if name in (DIRECT, GATEWAY, BUDGETS):
                    raise
                bench.drop(name, f"smoke request failed: {exc}")
        skipped, notes = bench.skipped, {n: t.note for n, t in bench.targets.items()}
        names = list(bench.targets)
        for round_index in range(args.rounds):
            for concurrency in args.concurrency:
                for target in rotated(names, round_index):
                    print(f"bench: round {round_index + 1}/{args.rounds} c={concurrency} "
                          f"{target} ({args.duration} s)...", flush=True)
                    run = measure(bench, target, concurrency=concurrency,
                                  threads=args.threads, duration_s=args.duration,
                                  warmup_s=args.warmup)
                    w = run.wrk
                    print(f"  {w.rps:,.0f} rps  p50 {w.p50_ms:.2f} ms  p99 {w.p99_ms:.2f} ms"
                          f"  requests {w.requests:,}  pace {_pace(run.calibration_ms)}"
                          + (f"  ERRORS: {w.error_text()}" if w.error_text() else ""),
                          flush=True)
                    rounds[concurrency, target].append(run)
        levels = [Level(concurrency, {name: median_run(rounds[concurrency, name])
                                      for name in names})
                  for concurrency in args.concurrency]
        if bench.extproc_log is not None:
            ledger_errors = ledger_unavailable_reasons(bench.extproc_log)
        if args.open_loop:
            open_rounds: dict[str, list[OpenRun]] = defaultdict(list)
            for round_index in range(args.rounds):
                for target in rotated(names, round_index):
                    print(f"bench: round {round_index + 1}/{args.rounds} open loop "
                          f"{args.open_loop} rps {target} ({args.duration} s)...", flush=True)
                    open_run = measure_open_loop(bench, target, rate=args.open_loop,
                                                 duration_s=args.duration,
                                                 warmup_s=args.warmup)
                    r = open_run.result
                    print(f"  {r.achieved_rps:,.0f} rps  p50 {r.percentile(50):.2f} ms  p99 "
                          f"{r.percentile(99):.2f} ms  p99.9 {r.percentile(99.9):.2f} ms"
                          + (f"  ERRORS: {r.error_text()}" if r.error_text() else ""),
                          flush=True)
                    open_rounds[target].append(open_run)
            open_runs = [median_open_run(open_rounds[name]) for name in names]
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
        info["load average at end"] = " ".join(
            Path("/proc/loadavg").read_text(encoding="ascii").split()[:3])
        title = (f"make bench {started:%Y-%m-%d %H:%M} UTC, {ncpu} cores, load average "
                 f"{info['load average at start']}")
        chart_path = write_chart(CHART_DIR / f"bench-{started:%Y%m%d-%H%M%S}.png", levels,
                                 open_runs, title)
        chart = (os.path.relpath(chart_path, args.output.resolve().parent)
                 if chart_path else None)
        text = render_run(levels=levels, info=info, command=command, started=started,
                          args=args, ncpu=ncpu, extproc_processes=extproc_processes,
                          complete=ok, probes=probes, ledger_errors=ledger_errors,
                          rounds=rounds,
                          open_runs=open_runs, skipped=skipped, notes=notes, chart=chart)
        write_results(args.output, text)
        print_summary(levels, probes, open_runs)
        for line in anomalies(levels, ncpu, probes, ledger_errors):
            print(line)
        print(f"bench: results written to {args.output}"
              + (f", chart {chart_path}" if chart_path else ""))
    if ok and not args.keep_workdir:
        shutil.rmtree(workdir, ignore_errors=True)
    elif ok:
        print(f"bench: workdir kept: {workdir}")
    # A peer that times out under load is a finding for the report, not a failed bench:
    # only errors on Envoy-direct and the gateway rows fail the run.
    errors = (any(run.wrk.error_text() for lv in levels for run in lv.runs()
                  if not is_peer(run.target))
              or any(not pr.ok for pr in probes)
              or any(run.result.error_text() for run in open_runs if not is_peer(run.target)))
    return 0 if ok and not errors else 1


def _pace(calibration_ms: float | None) -> str:
    return "n/a" if calibration_ms is None else f"{calibration_ms:.2f} ms"


if __name__ == "__main__":
    raise SystemExit(main())
