"""Helpers shared by `bench/streaming.py` and `bench/keys.py`: percentiles, the machine
line, the command line as run, and appending a dated section to `bench/RESULTS.md`.

How the sections live next to `bench/run.py`'s runs: run.py puts each new run on top,
under the file's title, and keeps everything below it as it was (older runs, hand-written
notes, these sections). These scripts never touch that part: their sections sit at the
*end* of the file, each opened by its own marker `<!-- bench-extra:<kind> -->`. Writing
one replaces nothing but older sections of the same kind beyond `keep` (newest first
within a kind); the text before the first `bench-extra` marker is written back byte for
byte.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import math
import os
import platform
import re
import shlex
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Final

REPO_ROOT: Final = Path(__file__).resolve().parent.parent
RESULTS: Final = REPO_ROOT / "bench" / "RESULTS.md"
EXTRA_MARKER_RE: Final = re.compile(r"^<!-- bench-extra:([a-z0-9_-]+) -->$", re.MULTILINE)


def percentile(values: Sequence[float], pct: float) -> float:
    """Nearest-rank percentile (the same definition bench/run.py's probes use)."""
    ordered = sorted(values)
    if not ordered:
        return math.nan
    return ordered[max(0, math.ceil(pct / 100 * len(ordered)) - 1)]


def _read(path: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""


def envoy_version() -> str:
    from extproc.devstack import envoy_binary

    try:
        out = subprocess.run([envoy_binary(), "--version"], capture_output=True, text=True,
                             timeout=30, check=False).stdout
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    match = re.search(r"version:\s*\S+/(\d+\.\d+\.\d+)/", out)
    return match.group(1) if match else "unknown"


def machine_line(*, envoy: bool = False, extra: Sequence[str] = ()) -> str:
    """One line: CPUs, model, memory, kernel, Python (, Envoy), load average now."""
    model = re.search(r"^model name\s*:\s*(.+)$", _read("/proc/cpuinfo"), re.MULTILINE)
    mem = re.search(r"^MemTotal:\s*(\d+) kB", _read("/proc/meminfo"), re.MULTILINE)
    parts = [
        f"{len(os.sched_getaffinity(0))} CPUs "
        f"({model.group(1).strip() if model else platform.processor() or 'unknown'})",
        f"{int(mem.group(1)) / 1024 / 1024:.1f} GiB" if mem else "memory unknown",
        f"{platform.system()} {platform.release()}",
        f"Python {platform.python_version()}",
    ]
    if envoy:
        parts.append(f"Envoy {envoy_version()}")
    parts.extend(extra)
    parts.append("load average " + " ".join(_read("/proc/loadavg").split()[:3]))
    return ", ".join(parts)


def display_command(script: str, argv: Sequence[str]) -> str:
    python = sys.executable
    with contextlib.suppress(ValueError):
        relative = os.path.relpath(python, Path.cwd())
        if not relative.startswith(".."):
            python = relative
    return shlex.join([python, script, *argv])


def utc_now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _split_extras(text: str) -> tuple[str, list[tuple[str, str]]]:
    """(text before the first bench-extra marker, [(kind, section incl. marker), ...])."""
    matches = list(EXTRA_MARKER_RE.finditer(text))
    if not matches:
        return text, []
    head = text[:matches[0].start()]
    sections = []
    for index, match in enumerate(matches):
        end = matches[index + 1].start() if index + 1 < len(matches) else len(text)
        sections.append((match.group(1), text[match.start():end].rstrip() + "\n"))
    return head, sections


def append_section(kind: str, body: str, *, path: Path = RESULTS, keep: int = 3) -> None:
    """Write `body` (markdown starting with a `## ...` heading) as the newest section of
    `kind` at the end of `path`, keeping at most `keep` sections of that kind."""
    if not re.fullmatch(r"[a-z0-9_-]+", kind) or keep < 1:
        raise ValueError("kind must be [a-z0-9_-]+ and keep >= 1")
    text = (path.read_text(encoding="utf-8") if path.exists()
            else "# Benchmark results\n\n")
    head, sections = _split_extras(text)
    new = f"<!-- bench-extra:{kind} -->\n" + body.strip() + "\n"
    kinds: list[str] = []
    for k, _ in sections:
        if k not in kinds:
            kinds.append(k)
    if kind not in kinds:
        kinds.append(kind)
    ordered: list[str] = []
    for k in kinds:
        own = [s for sk, s in sections if sk == k]
        ordered.extend([new, *own][:keep] if k == kind else own)
    head = head.rstrip("\n") + "\n\n"
    path.write_text(head + "\n".join(ordered), encoding="utf-8")


def table(header: Sequence[str], rows: Sequence[Sequence[str]],
          align: Sequence[str] | None = None) -> list[str]:
    """A markdown table; `align` per column is 'l' or 'r' (default: first l, rest r)."""
    align = align or ["l", *["r"] * (len(header) - 1)]
    return [
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---" if a == "l" else "---:" for a in align) + "|",
        *("| " + " | ".join(row) + " |" for row in rows),
    ]
