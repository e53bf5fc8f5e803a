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

Results: a table on stdout and a dated `## Guardrails ...` section at the end of
bench/RESULTS.md (see bench/common.py).
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:  # `python bench/guardrails.py` puts bench/ first
    sys.path.insert(0, str(REPO_ROOT))

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


ALL_DETECTORS = GuardrailPolicy(pii={name: Action.REDACT for name in DETECTORS},
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


def _time(case: str, calls: int, prepare: Callable[[], Any],
          run: Callable[[Any], object]) -> Row:
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
    for _ in range(max(1, calls // batch)):
        values = [prepare() for _ in range(batch)]
        gc.disable()
        try:
            start = time.process_time_ns()
            for value in values:
                run(value)
            cpu_ns += time.process_time_ns() - start
        finally:
            gc.enable()
    cpu_us = cpu_ns / 1000 / (max(1, calls // batch) * batch)
    return Row(case, calls, common.percentile(samples, 50), statistics.fmean(samples),
               common.percentile(samples, 99), cpu_us)


def _stream_chunks(text: str, parts: int) -> list[bytes]:
    size = len(text) // parts + 1
    return [b"data: " + json.dumps({"id": "c", "choices": [{"index": 0, "delta": {
        "content": text[i:i + size]}, "finish_reason": None}]}).encode() + b"\n\n"
        for i in range(0, len(text), size)]


def run(calls: int) -> list[Row]:
    clean, dirty = _body(_text()), _body(_text(_PII))
    rows = []
    for case, policy, body in (("no guardrails", GuardrailPolicy(), clean),
                               ("caps only", CAPS_ONLY, clean),
                               ("all detectors, clean 4 KB prompt", ALL_DETECTORS, clean),
                               ("all detectors, 4 KB prompt with 12 values", ALL_DETECTORS,
                                dirty)):
        rows.append(_time(case, calls, lambda body=body: json.loads(body),
                          lambda request, policy=policy: screen_request(
                              policy, request, "gpt-4o-mini")))
    screening = screen_request(ALL_DETECTORS, json.loads(dirty), "gpt-4o-mini")
    answer = json.dumps({"id": "x", "choices": [{"index": 0, "message": {
        "role": "assistant", "content": _text(_PII)}}]}).encode()
    rows.append(_time("answer, 4 KB, all detectors", calls, lambda: answer,
                      screening.answer))
    chunks = _stream_chunks(_text(_PII), 100)

    def stream(redactor: StreamRedactor) -> None:
        for chunk in chunks:
            redactor.feed(chunk)
        redactor.flush()

    streamed = _time("stream, 4 KB in 100 chunks (whole stream)", max(100, calls // 10),
                     lambda: screening.stream(Dialect.OPENAI), stream)
    rows.append(streamed)
    return rows


def result_table(rows: Sequence[Row]) -> list[str]:
    return common.table(
        ["case", "calls", "p50 µs", "mean µs", "p99 µs", "CPU µs/call"],
        [[r.case, f"{r.calls:,}", f"{r.p50_us:.1f}", f"{r.mean_us:.1f}", f"{r.p99_us:.1f}",
          f"{r.cpu_us:.1f}"] for r in rows])


def render(command: str, machine: str, started: Any, rows: Sequence[Row]) -> str:
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
        "",
        *result_table(rows),
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
    parser.add_argument("--output", type=Path, default=common.RESULTS)
    args = parser.parse_args(raw)
    calls = 2_000 if args.quick else args.calls
    if not 100 <= calls <= 1_000_000:
        print("bench: --calls 100..1000000", file=sys.stderr)
        return 2
    started = common.utc_now()
    machine = common.machine_line()
    rows = run(calls)
    text = render(common.display_command("bench/guardrails.py", raw), machine, started, rows)
    common.append_section("guardrails", text, path=args.output)
    print("\n".join(result_table(rows)))
    print("\n".join(line for line in text.splitlines() if line.startswith("- ")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
