"""Cost of a request's metrics: `RequestProcessor._measure_and_log` per call, in-process.

A processor is driven through one complete streamed request (headers, body, SSE answer
with usage) and one denied request (401); then `_measure_and_log` is called N times on
each and timed with `time.perf_counter_ns`. The request logger is off (WARNING), so the
figure is the metrics' cost plus the disabled log call; the log line's own formatting is
the same before and after and is not measured.

Before/after in one go: run it once per checkout, the same interpreter and machine, e.g.

    PYTHONPATH=/path/to/old/checkout .venv/bin/python bench/metrics_path.py
    .venv/bin/python bench/metrics_path.py

No network, no Redis: the config has no budgets. Prints a small table.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import statistics
import time

import extproc
from extproc.auth import hash_key
from extproc.config import parse_config
from extproc.messages import Body, Headers, Phase
from extproc.phases import RequestProcessor
from extproc.runtime import Runtime
from extproc.secrets import Secret

PEPPER = "bench-pepper"
TENANT_KEY = "sk-bench-tenant"
CONFIG = f"""\
version: 1
auth: {{pepper: {{env: BENCH_PEPPER}}}}
credentials:
  cred: {{env: BENCH_PROVIDER_KEY}}
providers:
  prov:
    kind: openai
    base_url: "http://127.0.0.1:18080"
    region: eu-west-1
    zone: eu
    cluster: prov
    credentials: [cred]
models:
  gpt-4o-mini:
    price: {{input_per_mtok: 0.15, output_per_mtok: 0.60}}
    deployments: [{{provider: prov}}]
tenants:
  acme:
    keys: [{{id: acme-1, hash: "{hash_key(Secret(PEPPER), TENANT_KEY)}"}}]
    models: [gpt-4o-mini]
"""
ENVIRON = {"BENCH_PEPPER": PEPPER, "BENCH_PROVIDER_KEY": "sk-bench-provider"}
HEADERS = {":method": "POST", ":path": "/v1/chat/completions",
           "content-type": "application/json", "authorization": f"Bearer {TENANT_KEY}"}
STREAM = (b'data: {"id":"c1","choices":[{"delta":{"content":"hi there"}}]}\n\n'
          b'data: {"id":"c1","choices":[],"usage":{"prompt_tokens":9,"completion_tokens":21}}'
          b"\n\ndata: [DONE]\n\n")


async def streamed(runtime: Runtime) -> RequestProcessor:
    processor = RequestProcessor(runtime)
    await processor.handle(Headers(Phase.REQUEST_HEADERS, HEADERS, False))
    await processor.handle(Body(Phase.REQUEST_BODY, b'{"model":"gpt-4o-mini","stream":true,'
                                b'"messages":[{"role":"user","content":"hi"}]}', True))
    await processor.handle(Headers(Phase.RESPONSE_HEADERS,
                                   {":status": "200", "content-type": "text/event-stream"},
                                   False))
    await processor.handle(Body(Phase.RESPONSE_BODY, STREAM[:60], False))
    await processor.handle(Body(Phase.RESPONSE_BODY, STREAM[60:], True))
    return processor


async def denied(runtime: Runtime) -> RequestProcessor:
    processor = RequestProcessor(runtime)
    await processor.handle(Headers(Phase.REQUEST_HEADERS,
                                   {**HEADERS, "authorization": "Bearer sk-wrong"}, False))
    return processor


def per_call_ns(processor: RequestProcessor, calls: int, rounds: int) -> float:
    """Median over rounds of the mean ns per `_measure_and_log` call."""
    means = []
    for _ in range(rounds):
        start = time.perf_counter_ns()
        for _ in range(calls):
            processor._measure_and_log(False)
        means.append((time.perf_counter_ns() - start) / calls)
    return statistics.median(means)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    logging.getLogger("extproc.request").setLevel(logging.WARNING)
    runtime = Runtime.build(parse_config(CONFIG), environ=ENVIRON)
    rows = [("streamed 200 with usage", await streamed(runtime)),
            ("denied 401", await denied(runtime))]
    print(f"extproc from {extproc.__file__}")
    print(f"| request | _measure_and_log µs/call (median of {args.rounds} x {args.calls}) |")
    print("|---|---:|")
    for name, processor in rows:
        print(f"| {name} | {per_call_ns(processor, args.calls, args.rounds) / 1000:.2f} |")


if __name__ == "__main__":
    asyncio.run(main())
