"""CPU time per process from /proc, for CPU µs per request over a measured window.

utime + stime of a process tree (all threads, all descendants: extproc's supervisor and
its workers, LiteLLM's uvicorn workers) is stable on a noisy shared machine, unlike wall
time; the whole machine's busy time tells how much CPU ran outside the bench.
"""

from __future__ import annotations

import os
import resource
import statistics
import threading
import time
from pathlib import Path
from types import TracebackType
from typing import Final

__all__ = ["CLK_TCK", "SpeedProbe", "all_process_cpu", "calibration_ms",
           "children_rusage_seconds", "machine_busy_seconds", "process_cpu_seconds",
           "process_tree", "tree_cpu_seconds"]

CLK_TCK: Final = os.sysconf("SC_CLK_TCK")

def _proc_stat(pid: int) -> list[str] | None:
    """Fields of /proc/<pid>/stat after `comm` (index 0 is field 3, `state`)."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text(encoding="ascii", errors="replace")
    except OSError:
        return None
    return text[text.rindex(")") + 2:].split()


def process_cpu_seconds(pid: int) -> float:
    """CPU seconds of one process (all its threads) and of its reaped children; 0 if gone."""
    fields = _proc_stat(pid)
    if fields is None:
        return 0.0
    # utime + stime (fields 14, 15) + cutime + cstime (16, 17): the children it has reaped,
    # so a worker that exits and is replaced (uvicorn's supervisor does that) keeps its
    # CPU in the tree instead of making the tree's total go down.
    return sum(int(v) for v in fields[11:15]) / CLK_TCK


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


_CALIBRATION_LOOPS: Final = 20_000
PROBE_INTERVAL_S: Final = 0.5


def calibration_ms() -> float:
    """CPU milliseconds (this thread's own) of a fixed piece of pure-Python work: about
    1 ms on the bench VMs at their fastest. The same work took 1.8x as long there from one
    minute to the next with nothing else running (2026-12-01, AMD EPYC VM): the host, not
    the bench, sets that pace, and every process's CPU per request moves with it."""
    started = time.thread_time()
    total = 0
    for i in range(_CALIBRATION_LOOPS):
        total += i * i % 7
    return (time.thread_time() - started) * 1000


class SpeedProbe:
    """The machine's pace over a measured run: `calibration_ms` every 0.5 s in a thread of
    this process (about 0.3 % of a core), median over the run. Only around closed-loop
    runs, where this process just waits for wrk (an open-loop client shares its GIL)."""

    def __init__(self, interval_s: float = PROBE_INTERVAL_S) -> None:
        self._interval_s = interval_s
        self.samples: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="speed-probe", daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self._interval_s):
            self.samples.append(calibration_ms())

    def __enter__(self) -> SpeedProbe:
        self._thread.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def median_ms(self) -> float | None:
        """The run's pace (None for a run shorter than one interval)."""
        return statistics.median(self.samples) if self.samples else None
