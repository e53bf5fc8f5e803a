"""One measured load run per target: latency from the load driver, CPU from /proc.

Closed loop (`measure`): wrk at one concurrency. Open loop (`measure_open_loop`): a client
at a fixed rate. Both charge each target's process trees (utime+stime before/after) and
note how busy the whole machine was, so a run on a shared machine says how noisy it was.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Final

from cpu import SpeedProbe, all_process_cpu, machine_busy_seconds, process_tree
from ledger import (
    ROUND_TRIP_COMMANDS,
    budget_reservations,
    counter_delta,
    redis_command_stats,
)
from load import OpenLoopResult, WrkResult, run_open_loop, run_wrk
from stack import BUDGET_TENANT, BUDGETS, DIRECT, GATEWAY, BenchStack, Target

__all__ = ["Level", "OpenRun", "Run", "measure", "measure_open_loop", "median_open_run",
           "median_run", "rotated", "wait_until_quiet"]


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
    calibration_ms: float | None = None
    """The machine's pace over the run (`cpu.SpeedProbe`): higher is slower."""

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


QUIET_CORES: Final = 0.3
"""Busy cores below which the machine counts as quiet before a measured run."""
QUIET_WINDOW_S: Final = 0.5
QUIET_MAX_S: Final = 60.0


def wait_until_quiet(*, max_s: float = QUIET_MAX_S) -> float:
    """Poll the whole machine's busy cores over short windows until they drop below
    `QUIET_CORES`, for at most `max_s`; returns the last window's busy cores. A peer that
    was driven past its capacity (LiteLLM at c=64 or 500 rps) goes on working through its
    backlog after its run; with the rounds' rotated order the next target would be
    measured on top of that."""
    deadline = time.monotonic() + max_s
    while True:
        busy_before, started = machine_busy_seconds(), time.monotonic()
        time.sleep(QUIET_WINDOW_S)  # the window the busy cores are measured over
        cores = (machine_busy_seconds() - busy_before) / (time.monotonic() - started)
        if cores < QUIET_CORES or time.monotonic() >= deadline:
            return cores


SETTLE_PAUSE_S: Final = 0.3
"""Pause after a wrk run before reading redis' counters: settles run in extproc's finish(),
a moment after the client got its response."""


def measure(bench: BenchStack, target: str, *, concurrency: int, threads: int,
            duration_s: int, warmup_s: int) -> Run:
    spec = bench.targets[target]
    wait_until_quiet()
    if warmup_s > 0:
        run_wrk(spec.port, concurrency=concurrency, threads=threads, duration_s=warmup_s,
                key=spec.key, path=spec.path, body=spec.body, headers=spec.headers)
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
    before = spec.cpu_snapshot()
    machine_before, wall_start = machine_busy_seconds(), time.monotonic()
    with SpeedProbe() as probe:
        result, wrk_cpu = run_wrk(spec.port, concurrency=concurrency, threads=threads,
                                  duration_s=duration_s, key=spec.key, path=spec.path,
                                  body=spec.body, headers=spec.headers)
    machine_after, wall_end = machine_busy_seconds(), time.monotonic()
    after = spec.cpu_snapshot()
    others_after = all_process_cpu()
    time.sleep(SETTLE_PAUSE_S)
    redis_calls = counter_delta(redis_before, redis_command_stats(bench.redis_port))
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
    cpu["wrk"] = wrk_cpu
    return Run(target, concurrency, result, cpu, (machine_after - machine_before) / wall,
               tuple((name, cores) for name, cores in others[:3] if cores >= 0.01),
               redis_calls=redis_calls, reservations=held, unavailable=unavailable,
               calibration_ms=probe.median_ms())


@dataclass(frozen=True, slots=True)
class Level:
    """Every target's closed-loop run at one concurrency."""

    concurrency: int
    by_target: Mapping[str, Run]

    @property
    def direct(self) -> Run:
        return self.by_target[DIRECT]

    @property
    def gateway(self) -> Run:
        return self.by_target[GATEWAY]

    @property
    def budgets(self) -> Run | None:
        """The same gateway driven with the budgets tenant's key (None with --no-budgets)."""
        return self.by_target.get(BUDGETS)

    def runs(self) -> tuple[Run, ...]:
        return tuple(self.by_target.values())

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


OPEN_LOOP_RATE: Final = 500


@dataclass(frozen=True, slots=True)
class OpenRun:
    """A fixed-rate run of one target and the CPU its processes used meanwhile."""

    target: str
    result: OpenLoopResult
    cpu_s: Mapping[str, float]
    """Per component of the target, as for closed-loop runs (no client in it)."""
    client_cpu_s: float = 0.0
    """The open-loop client's own CPU (this process): it shares the cores with the rest."""

    def cpu_us_per_request(self, component: str | None = None) -> float | None:
        if self.result.requests <= 0:
            return None
        seconds = (sum(self.cpu_s.values()) if component is None
                   else self.cpu_s.get(component))
        return None if seconds is None else seconds * 1e6 / self.result.requests


def measure_open_loop(bench: BenchStack, target: str, *, rate: int, duration_s: int,
                      warmup_s: int) -> OpenRun:
    spec: Target = bench.targets[target]
    wait_until_quiet()
    if warmup_s > 0:
        run_open_loop(spec.port, rate=rate, duration_s=warmup_s, key=spec.key,
                      path=spec.path, body=spec.body, headers=spec.headers)
    before = spec.cpu_snapshot()
    client_before = _own_cpu_seconds()
    result = run_open_loop(spec.port, rate=rate, duration_s=duration_s, key=spec.key,
                           path=spec.path, body=spec.body, headers=spec.headers)
    client = _own_cpu_seconds() - client_before
    after = spec.cpu_snapshot()
    return OpenRun(target, result, {name: after[name] - before[name] for name in before},
                   client)


def _own_cpu_seconds() -> float:
    """This process' CPU: the open-loop client runs in it."""
    times = os.times()
    return times.user + times.system


def rotated(names: Sequence[str], round_index: int) -> list[str]:
    """The targets in round `round_index`'s order: each round starts one target later, so
    a slow or fast minute of the host (see `cpu.calibration_ms`) falls on every target in
    turn rather than always on the same neighbours."""
    if not names:
        return []
    shift = round_index % len(names)
    return [*names[shift:], *names[:shift]]


def median_run(runs: Sequence[Run]) -> Run:
    """The round with the median rps (the lower middle one of an even count): a whole run,
    so its latency, CPU and Redis counts stay those of one measurement."""
    ordered = sorted(runs, key=lambda run: run.wrk.rps)
    return ordered[(len(ordered) - 1) // 2]


def median_open_run(runs: Sequence[OpenRun]) -> OpenRun:
    """The open-loop round with the median p99 (the lower middle one of an even count)."""
    ordered = sorted(runs, key=lambda run: run.result.percentile(99))
    return ordered[(len(ordered) - 1) // 2]
