"""Guardrail cost per request: `screen_request()` on a 4 KB prompt with every detector on.

In-process (no gateway, no gRPC): the body is parsed (untimed) before each call, then
`screen_request(policy, request, model)` is timed with `time.perf_counter_ns`, one call
at a time. Cases:

* no guardrails       the tenant has none: the cost every request pays (the floor);
* caps only           model list, n, temperature, tools, response_format: no prompt walk;
* all detectors, clean  every PII detector on (redact), 4 KB of ordinary prose with
                      numbers, dates, times, a code block and a URL, nothing to redact;
* all detectors, PII  the same prompt with 12 values to redact (emails, phones, a card,
                      an IBAN, an SSN, IPs, a key);
* answer, 4 KB        a non-streamed 4 KB answer redacted with the request's placeholders;
* stream, 4 KB / 100 chunks  the same text streamed as 100 OpenAI chunks (per chunk).

Target (issue 12): <= 50 µs per request for the 4 KB prompt with every detector on,
measured here, never asserted in tests.

    .venv/bin/python bench/guardrails.py            # 20,000 calls per case
    .venv/bin/python bench/guardrails.py --quick    # 2,000
    .venv/bin/python bench/guardrails.py --baseline main   # before (main) and after

`--baseline REF` measures the `extproc` package of a git revision (exported with
`git archive` to a temporary directory) in the same run: the calls of each case are
split in rounds, and each round runs the baseline (a child process importing the
exported package) and then the working tree, so both see the same machine load. The
table gets a before and an after column.

Results: a table on stdout and a dated `## Guardrails ...` section at the end of
bench/RESULTS.md (see bench/common.py).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
BASELINE_ENV = "ASC_BENCH_BASELINE_ROOT"
"""Set for the child process of `--baseline`: the directory its `extproc` comes from."""
if str(REPO_ROOT) not in sys.path:  # `python bench/guardrails.py` puts bench/ first
    sys.path.insert(0, str(REPO_ROOT))
if os.environ.get(BASELINE_ENV):
    sys.path.insert(0, os.environ[BASELINE_ENV])

import common  # noqa: E402

from extproc.errors import Dialect  # noqa: E402
from extproc.guardrails import (  # noqa: E402
    DETECTORS,
    Action,
    GuardrailPolicy,
    ResponseRedaction,
    StreamRedactor,
    screen_request,
)

TARGET_US = 50.0
PROMPT_BYTES = 4096
_PROSE = (
    "Please review the quarterly report below and summarise it for the board. Revenue grew "
    "12% to 4.2 million EUR in Q3 2026, driven by the new subscription tier launched on "
    "2026-07-15 at 09:30. Churn fell from 3.1% to 2.4%. The support team closed 1,284 "
    "tickets; median response time was 2h 14m. See https://intranet.example/reports/q3 for "
    "the full tables. Risks: the task-based pricing pilot, v2.3.1 of the billing service, and "
    "hiring for 14 open roles. Action items: finalise the budget by 30.11., schedule the "
    "review at 14:00, and migrate the cluster (ratio 3:1).\n```python\ndef total(rows):\n"
    "    return sum(r['amount'] for r in rows if r['status'] == 'paid')\n```\n"
)
_PII = (
    " Contact jane.doe@example.com or ops@example.org, phone +44 20 7946 0958 or "
    "(212) 555-0100; card 4111 1111 1111 1111; IBAN DE89 3704 0044 0532 0130 00; SSN "
    "123-45-6789; hosts 192.0.2.10 and 2001:db8::7; key sk-proj-abcdefghijklmnopqrstuvwx12; "
    "cc jane.doe@example.com again."
)


def _text(extra: str = "") -> str:
    body = (_PROSE * (PROMPT_BYTES // len(_PROSE) + 1))
    return (body[:PROMPT_BYTES - len(extra)] + extra)[:PROMPT_BYTES]


def _body(text: str) -> bytes:
    return json.dumps({"model": "gpt-4o-mini", "messages": [
        {"role": "system", "content": "You are a concise assistant."},
        {"role": "user", "content": text}]}).encode()


# Read-only actions, as a compiled config's policy has them (cached by identity).
ALL_DETECTORS = GuardrailPolicy(pii=MappingProxyType({name: Action.REDACT for name in DETECTORS}),
                                responses=ResponseRedaction(enabled=True, stream_window=64))
CAPS_ONLY = GuardrailPolicy(models_deny=frozenset({"gpt-4o"}), max_n=1, temperature_max=1.0,
                            tools_allowed=False, response_formats=frozenset({"text"}))


@dataclass(frozen=True, slots=True)
class Row:
    case: str
    calls: int
    p50_us: float
    mean_us: float
    p99_us: float
    cpu_us: float
    """Process CPU time per call over batches of prepared inputs: steadier than wall time
    on a machine shared with other processes."""


@dataclass(slots=True)
class Samples:
    """One case's measurements, added up over rounds."""

    wall_us: list[float]
    cpu_ns: int = 0
    cpu_calls: int = 0

    def add(self, other: Samples) -> None:
        self.wall_us.extend(other.wall_us)
        self.cpu_ns += other.cpu_ns
        self.cpu_calls += other.cpu_calls

    def row(self, case: str) -> Row:
        return Row(case, len(self.wall_us), common.percentile(self.wall_us, 50),
                   statistics.fmean(self.wall_us), common.percentile(self.wall_us, 99),
                   self.cpu_ns / 1000 / max(1, self.cpu_calls))


def _time(calls: int, prepare: Callable[[], Any], run: Callable[[Any], object]) -> Samples:
    samples: list[float] = []
    for _ in range(min(200, calls)):  # warm-up
        run(prepare())
    gc.disable()
    try:
        for _ in range(calls):
            value = prepare()
            start = time.perf_counter_ns()
            run(value)
            samples.append((time.perf_counter_ns() - start) / 1000)
    finally:
        gc.enable()
    cpu_ns = 0
    batch = min(1_000, calls)
    batches = max(1, calls // batch)
    for _ in range(batches):
        values = [prepare() for _ in range(batch)]
        gc.disable()
        try:
            start = time.process_time_ns()
            for value in values:
                run(value)
            cpu_ns += time.process_time_ns() - start
        finally:
            gc.enable()
    return Samples(samples, cpu_ns, batches * batch)


def _stream_chunks(text: str, parts: int) -> list[bytes]:
    size = len(text) // parts + 1
    return [b"data: " + json.dumps({"id": "c", "choices": [{"index": 0, "delta": {
        "content": text[i:i + size]}, "finish_reason": None}]}).encode() + b"\n\n"
        for i in range(0, len(text), size)]


STREAM_CASE = "stream, 4 KB in 100 chunks (whole stream)"
CASES = ("no guardrails", "caps only", "all detectors, clean 4 KB prompt",
         "all detectors, 4 KB prompt with 12 values", "answer, 4 KB, all detectors",
         STREAM_CASE)


def _stream_calls(calls: int) -> int:
    return max(100, calls // 10)


def measure(calls: int) -> dict[str, Samples]:
    """Every case once, `calls` calls each (the stream case a tenth of them)."""
    clean, dirty = _body(_text()), _body(_text(_PII))
    measured: dict[str, Samples] = {}
    for case, policy, body in ((CASES[0], GuardrailPolicy(), clean),
                               (CASES[1], CAPS_ONLY, clean),
                               (CASES[2], ALL_DETECTORS, clean),
                               (CASES[3], ALL_DETECTORS, dirty)):
        measured[case] = _time(calls, lambda body=body: json.loads(body),
                               lambda request, policy=policy: screen_request(
                                   policy, request, "gpt-4o-mini"))
    screening = screen_request(ALL_DETECTORS, json.loads(dirty), "gpt-4o-mini")
    answer = json.dumps({"id": "x", "choices": [{"index": 0, "message": {
        "role": "assistant", "content": _text(_PII)}}]}).encode()
    measured[CASES[4]] = _time(calls, lambda: answer, screening.answer)
    chunks = _stream_chunks(_text(_PII), 100)

    def stream(redactor: StreamRedactor) -> None:
        for chunk in chunks:
            redactor.feed(chunk)
        redactor.flush()

    measured[STREAM_CASE] = _time(_stream_calls(calls),
                                  lambda: screening.stream(Dialect.OPENAI), stream)
    return measured


def run(calls: int) -> list[Row]:
    measured = measure(calls)
    return [measured[case].row(case) for case in CASES]


def export_baseline(ref: str, into: Path) -> str:
    """`ref`'s `extproc` package under `into`; its short commit id."""
    commit = subprocess.run(["git", "-C", str(REPO_ROOT), "rev-parse", "--short", ref],
                            capture_output=True, text=True, check=True).stdout.strip()
    archive = into / "extproc.tar"
    with archive.open("wb") as out:
        subprocess.run(["git", "-C", str(REPO_ROOT), "archive", "--format=tar", commit,
                        "extproc"], stdout=out, check=True)
    with tarfile.open(archive) as tar:
        tar.extractall(into, filter="data")
    return commit


def _baseline_round(root: Path, calls: int) -> dict[str, Samples]:
    """One round of every case in a child process importing `root`'s extproc."""
    env = {**os.environ, BASELINE_ENV: str(root)}
    out = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--worker",
                          "--calls", str(calls)], capture_output=True, text=True,
                         env=env, check=True).stdout
    return {case: Samples(**fields) for case, fields in json.loads(out).items()}


def compare(calls: int, root: Path, rounds: int) -> tuple[list[Row], list[Row]]:
    """(before, after) rows: `rounds` rounds, each the baseline then the working tree."""
    per_round = max(100, calls // rounds)
    before: dict[str, Samples] = {case: Samples([]) for case in CASES}
    after: dict[str, Samples] = {case: Samples([]) for case in CASES}
    for _ in range(rounds):
        for case, samples in _baseline_round(root, per_round).items():
            before[case].add(samples)
        for case, samples in measure(per_round).items():
            after[case].add(samples)
    return ([before[case].row(case) for case in CASES],
            [after[case].row(case) for case in CASES])


def result_table(rows: Sequence[Row]) -> list[str]:
    return common.table(
        ["case", "calls", "p50 µs", "mean µs", "p99 µs", "CPU µs/call"],
        [[r.case, f"{r.calls:,}", f"{r.p50_us:.1f}", f"{r.mean_us:.1f}", f"{r.p99_us:.1f}",
          f"{r.cpu_us:.1f}"] for r in rows])


def comparison_table(before: Sequence[Row], after: Sequence[Row], ref: str) -> list[str]:
    return common.table(
        ["case", "calls", f"p50 µs ({ref})", "p50 µs (now)", f"CPU µs/call ({ref})",
         "CPU µs/call (now)", "CPU change"],
        [[old.case, f"{new.calls:,}", f"{old.p50_us:.1f}", f"{new.p50_us:.1f}",
          f"{old.cpu_us:.1f}", f"{new.cpu_us:.1f}",
          f"{(new.cpu_us - old.cpu_us) / old.cpu_us * 100:+.0f} %" if old.cpu_us else "-"]
         for old, new in zip(before, after, strict=True)])


def render(command: str, machine: str, started: Any, rows: Sequence[Row],
           baseline: tuple[str, Sequence[Row], int] | None = None) -> str:
    load = " ".join(Path("/proc/loadavg").read_text(encoding="utf-8").split()[:3])
    target = next(r for r in rows if r.case.startswith("all detectors, clean"))
    dirty = next(r for r in rows if r.case.startswith("all detectors, 4 KB prompt with"))
    clean_verdict = "met" if target.cpu_us <= TARGET_US else "NOT met"
    dirty_verdict = "met" if dirty.cpu_us <= TARGET_US else "NOT met"
    return "\n".join([
        f"## Guardrails {started:%Y-%m-%d %H:%M:%S} UTC",
        "",
        f"Command: `{command}`",
        "",
        f"Machine: {machine}.",
        "",
        "In-process `screen_request()` (and the answer/stream redactors), one call at a time, "
        "`time.perf_counter_ns`, the request parsed untimed before each call; gc off while "
        "timing. Every detector on with action redact. *CPU µs/call*: process CPU time "
        "(`time.process_time_ns`) over batches of 1,000 calls on inputs prepared before "
        "the batch, divided by the calls: the figure least disturbed by other processes.",
        *(["", f"Before and after in this one run: the baseline is `extproc` of commit "
           f"{baseline[0]} (`git archive`, imported by a child process); the calls of each "
           f"case are split in {baseline[2]} rounds, each the baseline then this tree, so both "
           "ran under the same load."] if baseline else []),
        "",
        *(comparison_table(baseline[1], rows, baseline[0]) if baseline else result_table(rows)),
        "",
        f"- Target <= {TARGET_US:g} µs per request, 4 KB prompt, every detector on: "
        f"{target.cpu_us:.1f} µs CPU (p50 {target.p50_us:.1f} µs) on a prompt with nothing "
        f"to redact ({clean_verdict}), {dirty.cpu_us:.1f} µs CPU (p50 {dirty.p50_us:.1f} µs) "
        f"with 12 values redacted ({dirty_verdict}: each match costs its check, a "
        "placeholder and a copy of the text).",
        f"- Load average at the end: {load}; mean and p99 include other processes' time "
        "slices on the shared cores: CPU µs/call and p50 are the comparable figures.",
        "",
    ])


def main(argv: Sequence[str] | None = None) -> int:
    raw = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="bench/guardrails.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=20_000)
    parser.add_argument("--quick", action="store_true", help="2,000 calls per case")
    parser.add_argument("--baseline", metavar="REF",
                        help="also measure this git revision's extproc, in the same run")
    parser.add_argument("--rounds", type=int, default=4,
                        help="rounds that alternate baseline and working tree (--baseline)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--output", type=Path, default=common.RESULTS)
    args = parser.parse_args(raw)
    calls = 2_000 if args.quick else args.calls
    if not 100 <= calls <= 1_000_000 or not 1 <= args.rounds <= 100:
        print("bench: --calls 100..1000000, --rounds 1..100", file=sys.stderr)
        return 2
    if args.worker:  # a round of --baseline: samples as JSON on stdout
        json.dump({case: {"wall_us": samples.wall_us, "cpu_ns": samples.cpu_ns,
                          "cpu_calls": samples.cpu_calls}
                   for case, samples in measure(calls).items()}, sys.stdout)
        return 0
    started = common.utc_now()
    machine = common.machine_line()
    baseline: tuple[str, Sequence[Row], int] | None = None
    if args.baseline:
        with tempfile.TemporaryDirectory(prefix="guardrails-baseline-") as root:
            commit = export_baseline(args.baseline, Path(root))
            before, rows = compare(calls, Path(root), args.rounds)
        baseline = (commit, before, args.rounds)
    else:
        rows = run(calls)
    text = render(common.display_command("bench/guardrails.py", raw), machine, started, rows,
                  baseline)
    common.append_section("guardrails", text, path=args.output)
    if baseline:
        print("\n".join(comparison_table(baseline[1], rows, baseline[0])))
    else:
        print("\n".join(result_table(rows)))
    print("\n".join(line for line in text.splitlines() if line.startswith("- ")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
