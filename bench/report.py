"""The bench report: Markdown tables for bench/RESULTS.md, the console summary, the PNG.

Every number here comes from the measured runs (bench/measure.py); the statements under
"What dominates" and "Against the targets" are derived from them, not written by hand.
Ratios are taken within one run on one machine: absolute rps on 2 shared cores is a lower
bound, the ratios to Envoy-direct and to each peer are the comparable figures.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import re
import shutil
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Final

from ledger import (
    BREAKER_COOLDOWN_S,
    CONNECTION_COMMANDS,
    FAIL_CLOSED_REQUESTS,
    ROUND_TRIP_COMMANDS,
    Probe,
)
from load import OPEN_LOOP_CONNECTIONS
from measure import Level, OpenRun, Run
from stack import (
    BODY,
    BUDGET_LIMIT_USD,
    BUDGET_RPM,
    BUDGET_TENANT,
    BUDGET_TPM,
    BUDGETS,
    CHAT_PATH,
    DIRECT,
    FASTPATH,
    FASTPATH_BUDGETS,
    GATEWAY,
    TENANT,
    TRANSLATED,
)

from extproc.devstack import envoy_binary

__all__ = ["anomalies", "is_peer", "machine_info", "main_table", "open_loop_table",
           "print_summary", "ratios_table", "render_run", "targets_table", "write_results"]

RUN_MARKER: Final = "<!-- bench-run -->"
COMPONENTS: Final = ("extproc", "envoy", "peer", "emulator", "redis", "wrk")
TARGET_FAIL_CLOSED_P99_MS: Final = 100.0
NAGLE_P50_MS: Final = (35.0, 50.0)
"""A p50 near the 40 ms delayed-ACK timer hints at a missing TCP_NODELAY somewhere."""
UNATTRIBUTED_WARN_CORES: Final = 0.4
"""More machine CPU than this outside our processes means something else was running."""

# Targets from ../shared/DESIGN.md §9 and issue 14, echoed next to the measured numbers.
TARGET_RPS: Final = 2000.0
TARGET_P50_OVERHEAD_MS: Final = 1.0
TARGET_EXTPROC_CPU_US: Final = 400.0
TARGET_OPEN_P99_MS: Final = 5.0
TARGET_VS_LITELLM: Final = 10.0
TARGET_VS_PORTKEY: Final = 1.5
GATEWAY_ROWS: Final = (GATEWAY, TRANSLATED, BUDGETS, FASTPATH, FASTPATH_BUDGETS)
LITELLM_PREFIX: Final = "litellm"
PEER_PREFIXES: Final = (LITELLM_PREFIX, "portkey")


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
        "node": _first_line(["node", "--version"]),
        "LiteLLM": _first_line([str(Path(__file__).resolve().parent / ".venv-litellm" / "bin"
                                    / "python"), "-c",
                                "import importlib.metadata as m; print(m.version('litellm'))"]),
        "Portkey gateway": _portkey_version(),
        "load average at start": " ".join(_read("/proc/loadavg").split()[:3]),
    }


def _first_line(command: list[str]) -> str:
    """First line a tool prints about its version, or `missing`."""
    if shutil.which(command[0]) is None and not Path(command[0]).exists():
        return "missing"
    try:
        out = subprocess.run(command, capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.SubprocessError):
        return "missing"
    lines = (out.stdout or out.stderr).strip().splitlines()
    return lines[0].strip() if lines and out.returncode == 0 else "missing"


def _portkey_version() -> str:
    package = (Path(__file__).resolve().parent / "node_modules" / "@portkey-ai" / "gateway"
               / "package.json")
    match = re.search(r'"version":\s*"([^"]+)"', _read(str(package)))
    return match.group(1) if match else "missing"


def _fmt(value: float | None, digits: int = 2) -> str:
    return "n/a" if value is None else f"{value:,.{digits}f}"


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


def _cells(values: Sequence[float | None], digits: int = 0) -> str:
    return " / ".join(_fmt(value, digits) for value in values)


def rounds_section(levels: Sequence[Level],
                   rounds: Mapping[tuple[int, str], Sequence[Run]]) -> list[str]:
    """Every round of every closed-loop target, with the host's pace during it."""
    if not any(len(runs) > 1 for runs in rounds.values()):
        return []
    rows = ["| c | target | reported | rps | extproc µs/req | envoy µs/req | peer µs/req "
            "| pace ms |", "|---:|---|---:|---|---|---|---|---|"]
    for lv in levels:
        for name, chosen in lv.by_target.items():
            runs = rounds.get((lv.concurrency, name), ())
            if not runs:
                continue
            rows.append(
                f"| {lv.concurrency} | {name} | round {runs.index(chosen) + 1} "
                f"| {_cells([r.wrk.rps for r in runs])} "
                f"| {_cells([r.cpu_us_per_request('extproc') for r in runs])} "
                f"| {_cells([r.cpu_us_per_request('envoy') for r in runs])} "
                f"| {_cells([r.cpu_us_per_request('peer') for r in runs])} "
                f"| {_cells([r.calibration_ms for r in runs], 2)} |")
    return [
        "### Rounds",
        "",
        "Every target ran once per round, each round in a rotated order; the tables above "
        "report the round with the median rps (the open loop: the median p99). *pace* is "
        "the host's speed during the run: the CPU milliseconds a fixed piece of Python work "
        "took (bench/cpu.py `calibration_ms`, sampled every 0.5 s, median), higher is "
        "slower. Every process's CPU per request moves with it.",
        "",
        *rows,
        "",
    ]


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
            busy = _fmt(run.cores_busy("extproc")) if "extproc" in run.cpu_s else "—"
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


def target_checks(levels: Sequence[Level], probes: Sequence[Probe] = (),
                  open_runs: Sequence[OpenRun] = ()) -> list[str]:
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
    for name in (FASTPATH, FASTPATH_BUDGETS):
        runs = [(lv, lv.by_target[name]) for lv in levels if name in lv.by_target]
        if not runs:
            continue
        fastest_level, fastest = max(runs, key=lambda item: item[1].wrk.rps)
        lines.append(f"- throughput >= {TARGET_RPS:,.0f} rps, {name}: {fastest.wrk.rps:,.0f} "
                     f"rps at c={fastest_level.concurrency} — "
                     f"{mark(fastest.wrk.rps >= TARGET_RPS)}")
        first_level, first = min(runs, key=lambda item: item[0].concurrency)
        delta = first.wrk.p50_ms - first_level.direct.wrk.p50_ms
        lines.append(f"- p50 overhead <= {TARGET_P50_OVERHEAD_MS} ms at "
                     f"c={first_level.concurrency}, {name}: {delta:+.2f} ms — "
                     f"{mark(delta <= TARGET_P50_OVERHEAD_MS)}")
    if cpu_values:
        worst = max(cpu_values)
        lines.append(f"- extproc CPU <= {TARGET_EXTPROC_CPU_US:.0f} µs/request: "
                     f"{min(cpu_values):,.0f} to {worst:,.0f} µs — "
                     f"{mark(worst <= TARGET_EXTPROC_CPU_US)}")
    by_name = {run.target: run for run in open_runs}
    for name in (GATEWAY, FASTPATH, FASTPATH_BUDGETS):
        run = by_name.get(name)
        if run is None:
            continue
        p99 = run.result.percentile(99)
        held = "" if run.result.rate_held else (
            f" (rate NOT held: {run.result.achieved_rps:,.0f} rps achieved)")
        lines.append(f"- p99 <= {TARGET_OPEN_P99_MS:g} ms at a fixed "
                     f"{run.result.target_rps:,.0f} rps, {name}: {p99:.2f} ms{held} — "
                     f"{mark(p99 <= TARGET_OPEN_P99_MS and run.result.rate_held)}")
    if not open_runs:
        lines.append("- p99 at a fixed 500 rps: not measured in this run (--open-loop 0).")
    for name, who in ((FASTPATH, "tenant without budgets"),
                      (FASTPATH_BUDGETS, "tenant with budgets")):
        fast_cpu = [value for lv in levels if name in lv.by_target
                    for value in [lv.by_target[name].cpu_us_per_request("extproc")]
                    if value is not None]
        if fast_cpu:
            lines.append(f"- extproc CPU <= {TARGET_EXTPROC_CPU_US:.0f} µs/request on the fast "
                         f"path: {min(fast_cpu):,.0f} to {max(fast_cpu):,.0f} µs ({who}) — "
                         f"{mark(max(fast_cpu) <= TARGET_EXTPROC_CPU_US)}")
    mine = [name for name in (GATEWAY, FASTPATH) if any(name in lv.by_target for lv in levels)]
    for peer, goal in ((LITELLM_PREFIX, TARGET_VS_LITELLM), ("portkey", TARGET_VS_PORTKEY)):
        for own in mine:
            ratios = [(lv.concurrency, name, ratio) for lv in levels
                      for name, ratio in _peer_ratios(lv, own, peer)]
            if not ratios:
                lines.append(f"- >= {goal:g}x {peer} in rps: {peer} not measured in this run.")
                break
            worst = min(ratios, key=lambda item: item[2])
            cells = ", ".join(f"c={c} {ratio:.2f}x {name}" for c, name, ratio in ratios)
            lines.append(f"- >= {goal:g}x {peer} in rps ({own}, against the peer's best "
                         f"variant at each level): {cells} — {mark(worst[2] >= goal)}")
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
               ledger_errors: Mapping[str, int] | None = None,
               open_runs: Sequence[OpenRun] = (), skipped: Mapping[str, str] | None = None,
               notes: Mapping[str, str] | None = None, chart: str | None = None,
               rounds: Mapping[tuple[int, str], Sequence[Run]] | None = None) -> str:
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
        f"{args.duration} s per level" + (f", median of {args.rounds} rounds"
                                          if args.rounds > 1 else "")
        + ("" if complete else " — INCOMPLETE (run failed)"),
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
        "### Targets",
        "",
        *(f"- *{name}*: {note}" for name, note in (notes or {}).items()),
        *(f"- *{name}*: SKIPPED — {reason}" for name, reason in (skipped or {}).items()),
        "",
        *([f"![bench chart]({chart})", ""] if chart else []),
        "### All targets, closed loop (wrk)",
        "",
        "CPU µs per request per process from /proc over the measured run; *peer* is the "
        "LiteLLM or Portkey process tree (all workers); the emulator is shared by all; "
        "total leaves out wrk. rps / direct and Δp50 are against the Envoy-direct row of "
        "the same level.",
        "",
        *targets_table(levels),
        "",
        "### Ratios to each peer (same run, same level)",
        "",
        "rps of each gateway row divided by the peer's rps (> 1: the gateway serves more), "
        "and the peer's total CPU per request divided by the gateway row's (> 1: the "
        "gateway is cheaper).",
        "",
        *ratios_table(levels),
        "",
        *([
            "### Open loop, fixed rate",
            "",
            f"{args.open_loop:,} requests/s asked (bench/load.py: request i starts at "
            f"start + i/rate on a free keep-alive connection, up to {OPEN_LOOP_CONNECTIONS}; "
            f"HTTP/1.1 over asyncio with httptools, the request's bytes built once), "
            f"{args.duration} s per target after {args.warmup} s "
            "warm-up. Latency is from each request's *scheduled* start to its last byte, so "
            "a server that falls behind shows its queue (no coordinated omission); "
            "percentiles are nearest-rank. *achieved* = responses / (last response - first "
            "start): a target below 95 % of the asked rate is marked `rate not held`. *client* "
            "is the open-loop client's own CPU per request: it runs in the bench process and "
            "shares the cores with the target.",
            "",
            *open_loop_table(open_runs),
            "",
        ] if open_runs else []),
        *rounds_section(levels, rounds or {}),
        "### Direct vs gateway (same-dialect path)",
        "",
        *main_table(levels),
        "",
        *budget_sections,
        "### CPU time per request (µs, utime+stime from /proc over the measured run)",
        "",
        "extproc includes all worker processes; redis/emulator are shared by all targets; "
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
        "### Against the DESIGN §9 and issue 14 targets",
        "",
        *target_checks(levels, probes, open_runs),
        "",
    ]
    notes = anomalies(levels, ncpu, probes, ledger_errors)
    out += ["### Anomalies", "", *(notes or ["- none: 0 errors, 0 non-2xx, no Nagle-like "
                                              "latencies, no competing load."]), ""]
    return "\n".join(out)


def write_results(path: Path, run_text: str) -> None:
    """Put the new run on top, under the file's title; everything below is kept as it is.

    Older runs, hand-written sections and the other scripts' `bench-extra` sections are
    history: a run never rewrites or drops them.
    """
    header = (
        "# Benchmark results\n\n"
        "Written by `bench/run.py` (`make bench`); newest run first. Regenerate rather than "
        "edit by hand.\n\n"
    )
    rest = ""
    if path.exists():
        text = path.read_text(encoding="utf-8")
        rest = text[len(header):] if text.startswith(header) else text
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(header + run_text.rstrip() + "\n\n" + rest, encoding="utf-8")


# --------------------------------------------------------------------------- peers


def is_peer(name: str) -> bool:
    """LiteLLM or Portkey (a target named after its peer)."""
    return name.startswith(PEER_PREFIXES)


def _peer_ratios(lv: Level, gateway: str, peer: str) -> list[tuple[str, float]]:
    """rps of `gateway` / rps of the best variant of `peer` (e.g. LiteLLM 1 or 2 workers)."""
    mine = lv.by_target.get(gateway)
    variants = [run for name, run in lv.by_target.items()
                if name.startswith(peer) and run.wrk.rps > 0]
    if mine is None or not variants:
        return []
    best = max(variants, key=lambda run: run.wrk.rps)
    return [(best.target, mine.wrk.rps / best.wrk.rps)]


def targets_table(levels: Sequence[Level]) -> list[str]:
    """Every target at every level: rps, latency, CPU per request per process, vs direct."""
    rows = [
        "| c | target | rps | p50 ms | p99 ms | Δp50 vs direct ms | rps / direct "
        "| extproc µs/req | envoy µs/req | peer µs/req | emulator µs/req "
        "| total µs/req (no wrk) | errors |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for lv in levels:
        direct = lv.by_target.get(DIRECT)
        for run in lv.runs():
            w = run.wrk
            ratio = w.rps / direct.wrk.rps if direct and direct.wrk.rps else None
            delta = w.p50_ms - direct.wrk.p50_ms if direct else None
            total = (sum(v for k, v in run.cpu_s.items() if k != "wrk") * 1e6 / w.requests
                     if w.requests else None)
            cells = " | ".join(_fmt(run.cpu_us_per_request(c), 0) if c in run.cpu_s else "—"
                               for c in ("extproc", "envoy", "peer", "emulator"))
            rows.append(f"| {lv.concurrency} | {run.target} | {w.rps:,.0f} | {w.p50_ms:.2f} "
                        f"| {w.p99_ms:.2f} | {_signed(delta, 2)} | {_fmt(ratio)} | {cells} "
                        f"| {_fmt(total, 0)} | {w.error_text() or 'none'} |")
    return rows


def ratios_table(levels: Sequence[Level]) -> list[str]:
    """rps of each gateway row over each peer, per level (>1: the gateway is faster)."""
    peers = sorted({name for lv in levels for name in lv.by_target if is_peer(name)})
    mine = [name for name in GATEWAY_ROWS if any(name in lv.by_target for lv in levels)]
    if not peers:
        return ["No peer was measured in this run."]
    rows = ["| c | gateway row | " + " | ".join(f"rps / {p}" for p in peers)
            + " | " + " | ".join(f"CPU/req {p} / gateway row" for p in peers) + " |",
            "|---:|---|" + "---:|" * (2 * len(peers))]
    for lv in levels:
        for name in mine:
            run = lv.by_target.get(name)
            if run is None:
                continue
            rps_cells, cpu_cells = [], []
            for peer in peers:
                other = lv.by_target.get(peer)
                rps_cells.append(_fmt(run.wrk.rps / other.wrk.rps)
                                 if other and other.wrk.rps else "n/a")
                mine_cpu, peer_cpu = _total_no_wrk(run), _total_no_wrk(other)
                cpu_cells.append(_fmt(peer_cpu / mine_cpu)
                                 if peer_cpu and mine_cpu else "n/a")
            rows.append(f"| {lv.concurrency} | {name} | " + " | ".join(rps_cells) + " | "
                        + " | ".join(cpu_cells) + " |")
    return rows


def _total_no_wrk(run: Run | None) -> float | None:
    if run is None or run.wrk.requests <= 0:
        return None
    return sum(v for k, v in run.cpu_s.items() if k != "wrk") * 1e6 / run.wrk.requests


def open_loop_table(open_runs: Sequence[OpenRun]) -> list[str]:
    direct = next((run for run in open_runs if run.target == DIRECT), None)
    rows = [
        "| target | asked rps | achieved rps | requests | p50 ms | p99 ms | p99.9 ms | max ms "
        "| Δp99 vs direct ms | extproc µs/req | peer µs/req | total µs/req "
        "| client µs/req | errors |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for run in open_runs:
        r = run.result
        delta = (r.percentile(99) - direct.result.percentile(99)) if direct else None
        errors = r.error_text() or "none"
        if not r.rate_held:
            errors += " (rate not held)"
        rows.append(
            f"| {run.target} | {r.target_rps:,.0f} | {r.achieved_rps:,.0f} | {r.requests:,} "
            f"| {r.percentile(50):.2f} | {r.percentile(99):.2f} | {r.percentile(99.9):.2f} "
            f"| {max(r.latencies_ms, default=float('nan')):.2f} | {_signed(delta, 2)} "
            f"| {_fmt(run.cpu_us_per_request('extproc'), 0) if 'extproc' in run.cpu_s else '—'} "
            f"| {_fmt(run.cpu_us_per_request('peer'), 0) if 'peer' in run.cpu_s else '—'} "
            f"| {_fmt(run.cpu_us_per_request(), 0)} "
            f"| {_fmt(run.client_cpu_s * 1e6 / r.requests if r.requests else None, 0)} "
            f"| {errors} |")
    return rows


def print_summary(levels: Sequence[Level], probes: Sequence[Probe] = (),
                  open_runs: Sequence[OpenRun] = ()) -> None:
    print()
    for row in targets_table(levels):
        print(row)
    print()
    for row in ratios_table(levels):
        print(row)
    if open_runs:
        print()
        for row in open_loop_table(open_runs):
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
