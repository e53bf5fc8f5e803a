"""Streaming through the gateway vs Envoy-direct, and in-process translation cost.

Part 1, on loopback (one run): starts via `extproc.devstack.Stack` the provider emulator
(`--chunk-delay-ms`, a reply of `--words` words), extproc, the gateway Envoy rendered
from a config with an OpenAI and an Anthropic provider on that one emulator, and a
*direct* Envoy that routes straight to the emulator and adds the provider key itself
(the same `direct_bootstrap` bench/run.py uses; no ext_proc). Then `--requests`
sequential streaming requests (c=1, one keep-alive http.client connection per target,
in `--rounds` interleaved blocks) to each target:

* `direct`            OpenAI shape, Envoy only;
* `gateway openai`    OpenAI door -> OpenAI backend (passthrough);
* `gateway anthropic` OpenAI door -> Anthropic backend (translated).

Per stream: TTFT = request sent -> first bytes containing `data:`; first content = ->
first event carrying a non-empty `delta.content`; total = -> end of the body. Chunks/s
= client-seen SSE events per second of stream time. Every stream is checked (content,
usage, `[DONE]`). CPU per stream of extproc / Envoy / emulator comes from /proc.

Part 2, in-process, no sockets: the translators the gateway runs per request, timed with
`time.perf_counter_ns` over many iterations: request (JSON parse + translate + encode),
non-streamed response, and the SSE stream translation (`feed()` per event + `flush()`)
of the same reply, OpenAI->Anthropic vs OpenAI passthrough.

    .venv/bin/python bench/streaming.py              # 300 streams per target
    .venv/bin/python bench/streaming.py --quick      # 60 streams, fewer iterations

Results: a table on stdout and a dated `## Streaming ...` section at the end of
bench/RESULTS.md (see bench/common.py for how it coexists with bench/run.py's runs).
Only 127.0.0.1 is contacted; every loop is bounded.
"""

from __future__ import annotations

import argparse
import gc
import http.client
import json
import re
import secrets
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import yaml

REPO_ROOT: Final = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:  # `python bench/streaming.py` puts bench/ first
    sys.path.insert(0, str(REPO_ROOT))

import common  # noqa: E402
import cpu as bench_cpu  # noqa: E402  (bench/cpu.py: /proc CPU)
import stack as bench_stack  # noqa: E402  (bench/stack.py: the direct Envoy)

from extproc.auth import hash_key  # noqa: E402
from extproc.config import load_config  # noqa: E402
from extproc.devstack import LOOPBACK, Stack, free_port  # noqa: E402
from extproc.envoy_bootstrap import EnvoyPorts, render_bootstrap  # noqa: E402
from extproc.errors import Dialect  # noqa: E402
from extproc.secrets import Secret  # noqa: E402
from extproc.translate.base import Backend, translator_for  # noqa: E402

CHAT_PATH: Final = "/v1/chat/completions"
OPENAI_MODEL: Final = "gpt-4o-mini"
ANTHROPIC_MODEL: Final = "claude-bench"
ANTHROPIC_UPSTREAM: Final = "claude-3-5-haiku-latest"
OPENAI_KEY_ENV: Final = "ASC_BENCH_OPENAI_KEY"
ANTHROPIC_KEY_ENV: Final = "ASC_BENCH_ANTHROPIC_KEY"
TENANT: Final = "bench"
SYSTEM_PROMPT: Final = "You are a concise assistant."
USER_PROMPT: Final = "Say something."
DIRECT: Final = "direct"
GW_OPENAI: Final = "gateway openai"
GW_ANTHROPIC: Final = "gateway anthropic"
GW_FAST: Final = "gateway openai, fast path"
TARGETS: Final = (DIRECT, GW_OPENAI, GW_ANTHROPIC, GW_FAST)
FAST_TENANT: Final = "bench-fast"
"""A second tenant that may use the fast path (docs/fast-path.md); its streams always ask
for usage (`include_usage`), without which an OpenAI stream takes the full path."""
TARGET_TTFT_OVERHEAD_MS: Final = 1.0
WORDS: Final = ("lorem", "ipsum", "dolor", "sit", "amet", "consectetur", "adipiscing", "elit",
                "sed", "do", "eiusmod", "tempor", "incididunt", "ut", "labore", "et", "dolore",
                "magna", "aliqua", "enim", "ad", "minim", "veniam", "quis", "nostrud",
                "exercitation", "ullamco", "laboris", "nisi")
_CONTENT_RE: Final = re.compile(rb'"content":\s*"[^"]')


def reply_text(words: int) -> str:
    return " ".join(WORDS[i % len(WORDS)] for i in range(words))


def chat_body(model: str, *, include_usage: bool, stream: bool = True) -> bytes:
    body: dict[str, Any] = {
        "model": model,
        "messages": [{"role": "system", "content": SYSTEM_PROMPT},
                     {"role": "user", "content": USER_PROMPT}],
        "stream": stream,
    }
    if stream and include_usage:
        body["stream_options"] = {"include_usage": True}
    return json.dumps(body, separators=(",", ":")).encode()


# --------------------------------------------------------------------------- stack


@dataclass(slots=True)
class StreamStack:
    stack: Stack
    tenant_key: str
    fast_key: str
    gateway_port: int
    direct_port: int
    pids: dict[str, int]
    """component -> pid: extproc, envoy-gateway, envoy-direct, emulator."""

    def port(self, target: str) -> int:
        return self.direct_port if target == DIRECT else self.gateway_port

    def key(self, target: str) -> str:
        return self.fast_key if target == GW_FAST else self.tenant_key

    def cpu(self) -> dict[str, float]:
        return {name: bench_cpu.tree_cpu_seconds(pid) for name, pid in self.pids.items()}


def write_config(workdir: Path, *, emulator_port: int, pepper: str, tenant_key: str,
                 fast_key: str) -> Path:
    (workdir / "pepper.txt").write_text(pepper + "\n", encoding="utf-8")
    base = f"http://{LOOPBACK}:{emulator_port}"
    common_fields = {"base_url": base, "region": "us-east-1", "zone": "us"}
    config: dict[str, Any] = {
        "version": 1,
        "auth": {"pepper": {"file": "pepper.txt"}},
        "limits": {"max_body_bytes": 1_048_576},
        "credentials": {"bench-openai-1": {"env": OPENAI_KEY_ENV},
                        "bench-anthropic-1": {"env": ANTHROPIC_KEY_ENV}},
        "providers": {
            "bench-openai": {"kind": "openai", **common_fields, "cluster": "bench_openai",
                             "credentials": ["bench-openai-1"]},
            "bench-anthropic": {"kind": "anthropic", **common_fields,
                                "cluster": "bench_anthropic",
                                "credentials": ["bench-anthropic-1"]},
        },
        "models": {
            OPENAI_MODEL: {"price": {"input_per_mtok": 0.15, "output_per_mtok": 0.60},
                           "deployments": [{"provider": "bench-openai", "model": OPENAI_MODEL}]},
            ANTHROPIC_MODEL: {"price": {"input_per_mtok": 0.80, "output_per_mtok": 4.00},
                              "deployments": [{"provider": "bench-anthropic",
                                               "model": ANTHROPIC_UPSTREAM}]},
        },
        "tenants": {
            TENANT: {"zone": "us",
                     "keys": [{"id": "bench-key", "hash": hash_key(Secret(pepper), tenant_key)}],
                     "models": [OPENAI_MODEL, ANTHROPIC_MODEL]},
            FAST_TENANT: {"zone": "us",
                          "keys": [{"id": "bench-fast-key",
                                    "hash": hash_key(Secret(pepper), fast_key)}],
                          "models": [OPENAI_MODEL]},
        },
        "fast_path": {"tenants": [FAST_TENANT]},
    }
    path = workdir / "asc-bench-streaming.yaml"
    path.write_text("# Generated by bench/streaming.py\n"
                    + yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    return path


def start_stack(stack: Stack, *, chunk_delay_ms: int, words: int) -> StreamStack:
    emulator_port = free_port()
    pepper = secrets.token_hex(32)
    tenant_key = "sk-asc-bench-" + secrets.token_hex(16)
    fast_key = "sk-asc-bench-fast-" + secrets.token_hex(16)
    openai_key = "sk-emu-bench-openai-" + secrets.token_hex(16)
    anthropic_key = "sk-emu-bench-anthropic-" + secrets.token_hex(16)
    stack.env[OPENAI_KEY_ENV] = openai_key
    stack.env[ANTHROPIC_KEY_ENV] = anthropic_key
    config_path = write_config(stack.workdir, emulator_port=emulator_port, pepper=pepper,
                               tenant_key=tenant_key, fast_key=fast_key)
    config = load_config(config_path)
    emulator, _ = stack.start_emulator(
        [openai_key, anthropic_key], emulator_port,
        extra_args=("--chunk-delay-ms", str(chunk_delay_ms), "--reply", reply_text(words)))
    extproc, extproc_port, _ = stack.start_extproc(config_path)

    gateway_port, gateway_admin = free_port(), stack.admin_socket("envoy-gateway")
    gateway_bootstrap = render_bootstrap(config, EnvoyPorts(
        listen_port=gateway_port, admin_socket=str(gateway_admin), extproc_port=extproc_port))
    envoy_gateway = stack.start_envoy(
        "# bench/streaming.py gateway Envoy\n"
        + yaml.safe_dump(gateway_bootstrap, sort_keys=False),
        listen_port=gateway_port, admin_socket=gateway_admin, name="envoy-gateway")

    direct_port, direct_admin = free_port(), stack.admin_socket("envoy-direct")
    direct = bench_stack.direct_bootstrap(
        listen_port=direct_port, admin_socket=direct_admin, emulator_port=emulator_port,
        provider_key=openai_key, access_log=bench_stack.find_access_log(gateway_bootstrap))
    envoy_direct = stack.start_envoy(
        "# bench/streaming.py direct Envoy (no ext_proc)\n"
        + yaml.safe_dump(direct, sort_keys=False),
        listen_port=direct_port, admin_socket=direct_admin, name="envoy-direct")
    return StreamStack(stack, tenant_key, fast_key, gateway_port, direct_port, {
        "extproc": extproc.popen.pid, "envoy-gateway": envoy_gateway.popen.pid,
        "envoy-direct": envoy_direct.popen.pid, "emulator": emulator.popen.pid})


# --------------------------------------------------------------------------- client


@dataclass(frozen=True, slots=True)
class Sample:
    ttft_ms: float
    """Request sent -> first received bytes containing `data:`."""
    content_ms: float
    """Request sent -> first event with a non-empty `delta.content`."""
    total_ms: float
    events: int
    reads: int
    error: str = ""


def check_stream(body: bytes, reply: str, *, words: int, include_usage: bool) -> str:
    """'' if `body` is a complete OpenAI chat.completion.chunk stream of `reply`."""
    text: list[str] = []
    done = False
    usage: dict[str, Any] | None = None
    for block in body.split(b"\n\n"):
        for line in block.split(b"\n"):
            if not line.startswith(b"data:"):
                continue
            data = line[5:].strip()
            if data == b"[DONE]":
                done = True
                continue
            chunk = json.loads(data)
            if "error" in chunk:
                return f"error event: {data[:200]!r}"
            for choice in chunk.get("choices") or ():
                text.append((choice.get("delta") or {}).get("content") or "")
            if chunk.get("usage"):
                usage = chunk["usage"]
    if not done:
        return "no [DONE]"
    if "".join(text) != reply:
        return f"content mismatch: {''.join(text)[:80]!r}"
    if include_usage and (usage is None or usage.get("completion_tokens") != words):
        return f"usage missing or wrong: {usage}"
    return ""


class Client:
    """Sequential streaming POSTs on one keep-alive connection (reopened if closed)."""

    def __init__(self, port: int, key: str) -> None:
        self._port = port
        self._headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json",
                         "Accept": "text/event-stream"}
        self._conn = http.client.HTTPConnection(LOOPBACK, port, timeout=30)
        self.reconnects = 0

    def close(self) -> None:
        self._conn.close()

    def stream(self, body: bytes) -> tuple[Sample, bytes]:
        for attempt in range(2):
            try:
                return self._stream_once(body)
            except (http.client.HTTPException, OSError) as exc:
                self._conn.close()
                if attempt:
                    return Sample(0, 0, 0, 0, 0, f"{type(exc).__name__}: {exc}"), b""
                self.reconnects += 1
        raise AssertionError("unreachable")

    def _stream_once(self, body: bytes) -> tuple[Sample, bytes]:
        received = bytearray()
        first = content = None
        reads = 0
        started = time.perf_counter_ns()
        self._conn.request("POST", CHAT_PATH, body=body, headers=self._headers)
        response = self._conn.getresponse()
        if response.status != 200:
            payload = response.read()
            return Sample(0, 0, 0, 0, 0, f"HTTP {response.status}: {payload[:200]!r}"), payload
        for _ in range(100_000):  # bounded: far more reads than any stream here needs
            chunk = response.read1(65536)
            now = time.perf_counter_ns()
            if not chunk:
                break
            reads += 1
            received += chunk
            if first is None and b"data:" in received:
                first = now
            if content is None and _CONTENT_RE.search(received):
                content = now
        ended = time.perf_counter_ns()
        if response.will_close:
            self._conn.close()
        events = sum(1 for line in bytes(received).split(b"\n") if line.startswith(b"data:"))
        if first is None or content is None:
            return Sample(0, 0, 0, events, reads, "no data/content event"), bytes(received)
        return Sample((first - started) / 1e6, (content - started) / 1e6,
                      (ended - started) / 1e6, events, reads), bytes(received)


@dataclass(slots=True)
class TargetResult:
    target: str
    samples: list[Sample] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    cpu_s: dict[str, float] = field(default_factory=dict)
    reconnects: int = 0

    @property
    def ok(self) -> list[Sample]:
        return [s for s in self.samples if not s.error]

    def pct(self, name: str, p: float) -> float:
        return common.percentile([getattr(s, name) for s in self.ok], p)

    def mean(self, name: str) -> float:
        values = [getattr(s, name) for s in self.ok]
        return statistics.fmean(values) if values else float("nan")

    @property
    def chunks_per_s(self) -> float:
        total = sum(s.total_ms for s in self.ok)
        return sum(s.events for s in self.ok) * 1000 / total if total else float("nan")

    def cpu_us_per_stream(self, component: str) -> float | None:
        n = len(self.samples)
        return self.cpu_s[component] * 1e6 / n if n and component in self.cpu_s else None


def components(target: str) -> tuple[str, ...]:
    return (("envoy-direct", "emulator") if target == DIRECT
            else ("extproc", "envoy-gateway", "emulator"))


def run_streams(bench: StreamStack, *, requests: int, rounds: int, warmup: int, words: int,
                include_usage: bool) -> dict[str, TargetResult]:
    reply = reply_text(words)
    bodies = {DIRECT: chat_body(OPENAI_MODEL, include_usage=include_usage),
              GW_OPENAI: chat_body(OPENAI_MODEL, include_usage=include_usage),
              GW_ANTHROPIC: chat_body(ANTHROPIC_MODEL, include_usage=include_usage),
              GW_FAST: chat_body(OPENAI_MODEL, include_usage=True)}
    usage = {target: include_usage or target == GW_FAST for target in TARGETS}
    clients = {t: Client(bench.port(t), bench.key(t)) for t in TARGETS}
    results = {t: TargetResult(t) for t in TARGETS}
    try:
        for target in TARGETS:  # smoke + warm-up: fail fast, with the reason
            for index in range(max(1, warmup)):
                sample, raw = clients[target].stream(bodies[target])
                problem = sample.error or check_stream(raw, reply, words=words,
                                                       include_usage=usage[target])
                if problem:
                    raise RuntimeError(f"{target} warm-up stream {index}: {problem}")
        per_round = [requests // rounds + (1 if r < requests % rounds else 0)
                     for r in range(rounds)]
        for round_index, count in enumerate(per_round):
            for target in TARGETS:
                print(f"  round {round_index + 1}/{rounds}: {target} x{count}", flush=True)
                result, client = results[target], clients[target]
                before = bench.cpu()
                for _ in range(count):
                    sample, raw = client.stream(bodies[target])
                    problem = sample.error or check_stream(raw, reply, words=words,
                                                           include_usage=usage[target])
                    if problem:
                        sample = Sample(0, 0, 0, sample.events, sample.reads, problem)
                        if len(result.errors) < 3:
                            result.errors.append(problem)
                    result.samples.append(sample)
                after = bench.cpu()
                for name in components(target):
                    result.cpu_s[name] = result.cpu_s.get(name, 0.0) + after[name] - before[name]
        for target, client in clients.items():
            results[target].reconnects = client.reconnects
    finally:
        for client in clients.values():
            client.close()
    return results


# --------------------------------------------------------------------------- in-process


def openai_stream_events(words: Sequence[str], *, include_usage: bool) -> list[bytes]:
    """What the emulator's OpenAI shape sends (one bytes object per write)."""
    def sse(payload: Any) -> bytes:
        data = payload if isinstance(payload, str) else json.dumps(payload, separators=(",", ":"))
        return f"data: {data}\n\n".encode()

    def chunk(delta: dict[str, Any], finish: str | None, **extra: Any) -> bytes:
        return sse({"id": "chatcmpl-emu-1", "object": "chat.completion.chunk",
                    "created": 1_795_600_000, "model": OPENAI_MODEL,
                    "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
                    **extra})

    usage = {"prompt_tokens": 13, "completion_tokens": len(words),
             "total_tokens": 13 + len(words)}
    events = [chunk({"role": "assistant", "content": ""}, None)]
    events += [chunk({"content": w if i == 0 else f" {w}"}, None) for i, w in enumerate(words)]
    events.append(chunk({}, "stop"))
    if include_usage:
        events.append(sse({"id": "chatcmpl-emu-1", "object": "chat.completion.chunk",
                           "created": 1_795_600_000, "model": OPENAI_MODEL, "choices": [],
                           "usage": usage}))
    events.append(sse("[DONE]"))
    return events


def anthropic_stream_events(words: Sequence[str]) -> list[bytes]:
    """What the emulator's Anthropic shape sends (one bytes object per write)."""
    def event(kind: str, payload: dict[str, Any]) -> bytes:
        data = json.dumps({"type": kind, **payload}, separators=(",", ":"))
        return f"event: {kind}\ndata: {data}\n\n".encode()

    usage = {"input_tokens": 13, "output_tokens": 1, "cache_creation_input_tokens": 0,
             "cache_read_input_tokens": 0}
    events = [event("message_start", {"message": {
        "id": "msg_emu_1", "type": "message", "role": "assistant", "model": ANTHROPIC_UPSTREAM,
        "content": [], "stop_reason": None, "stop_sequence": None, "usage": usage}}),
        event("content_block_start", {"index": 0, "content_block": {"type": "text", "text": ""}}),
        event("ping", {})]
    events += [event("content_block_delta", {"index": 0, "delta": {
        "type": "text_delta", "text": w if i == 0 else f" {w}"}}) for i, w in enumerate(words)]
    events += [event("content_block_stop", {"index": 0}),
               event("message_delta", {"delta": {"stop_reason": "end_turn",
                                                 "stop_sequence": None},
                                       "usage": {"output_tokens": len(words)}}),
               event("message_stop", {})]
    return events


def openai_json_response(text: str, words: int) -> bytes:
    return json.dumps({
        "id": "chatcmpl-emu-1", "object": "chat.completion", "created": 1_795_600_000,
        "model": OPENAI_MODEL, "choices": [{"index": 0, "message": {
            "role": "assistant", "content": text}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 13, "completion_tokens": words,
                  "total_tokens": 13 + words}}, separators=(",", ":")).encode()


def anthropic_json_response(text: str, words: int) -> bytes:
    return json.dumps({
        "id": "msg_emu_1", "type": "message", "role": "assistant", "model": ANTHROPIC_UPSTREAM,
        "content": [{"type": "text", "text": text}], "stop_reason": "end_turn",
        "stop_sequence": None, "usage": {"input_tokens": 13, "output_tokens": words,
                                         "cache_creation_input_tokens": 0,
                                         "cache_read_input_tokens": 0}},
        separators=(",", ":")).encode()


@dataclass(frozen=True, slots=True)
class Timing:
    pair: str
    operation: str
    iterations: int
    p50_us: float
    p99_us: float
    mean_us: float
    chunks: int = 0
    """Upstream SSE events fed per iteration (stream rows)."""


def time_it(fn: Callable[[], object], iterations: int) -> tuple[float, float, float]:
    """p50, p99, mean in µs of `fn()` over `iterations` calls, after a warm-up."""
    for _ in range(max(50, iterations // 10)):
        fn()
    gc.collect()
    samples = [0] * iterations
    clock = time.perf_counter_ns
    for index in range(iterations):
        started = clock()
        fn()
        samples[index] = clock() - started
    us = [s / 1000 for s in samples]
    return common.percentile(us, 50), common.percentile(us, 99), statistics.fmean(us)


def micro_benchmarks(*, words: int, iterations: int) -> list[Timing]:
    text = reply_text(words)
    word_list = text.split()
    upstream = {Backend.OPENAI: OPENAI_MODEL, Backend.ANTHROPIC: ANTHROPIC_UPSTREAM}
    names = {Backend.OPENAI: "OpenAI -> OpenAI (passthrough)",
             Backend.ANTHROPIC: "OpenAI -> Anthropic (translated)"}
    json_reply = {Backend.OPENAI: openai_json_response(text, words),
                  Backend.ANTHROPIC: anthropic_json_response(text, words)}
    out: list[Timing] = []
    stream_iterations = max(100, iterations // 10)

    for backend in (Backend.OPENAI, Backend.ANTHROPIC):
        model = OPENAI_MODEL if backend is Backend.OPENAI else ANTHROPIC_MODEL

        def prepared(body: bytes, backend: Backend = backend) -> Any:
            translator = translator_for(Dialect.OPENAI, backend)
            translator.request(json.loads(body), upstream_model=upstream[backend],
                               api_version=None)
            return translator

        for include_usage in (True, False):
            body = chat_body(model, include_usage=include_usage)
            events = (openai_stream_events(word_list, include_usage=True)
                      if backend is Backend.OPENAI else anthropic_stream_events(word_list))
            # Correctness first: the translated stream must be the reply, or timing is moot.
            stream = prepared(body).stream()
            translated = b"".join(stream.feed(e) for e in events) + stream.flush()
            problem = check_stream(translated, text, words=words, include_usage=include_usage)
            if problem:
                raise RuntimeError(f"{names[backend]} stream translation: {problem}")

            def translate_stream(body: bytes = body, events: list[bytes] = events) -> None:
                stream = prepared(body).stream()
                for event in events:
                    stream.feed(event)
                stream.flush()

            usage_label = "include_usage" if include_usage else "no include_usage"
            if include_usage:
                def request_only(body: bytes = body, backend: Backend = backend) -> None:
                    translator_for(Dialect.OPENAI, backend).request(
                        json.loads(body), upstream_model=upstream[backend], api_version=None)

                p50, p99, mean = time_it(request_only, iterations)
                out.append(Timing(names[backend], "request: parse + translate + encode",
                                  iterations, p50, p99, mean))
                plain = prepared(chat_body(model, include_usage=False, stream=False))
                reply_body = json_reply[backend]
                p50, p99, mean = time_it(lambda t=plain, b=reply_body: t.response(200, b),
                                         iterations)
                out.append(Timing(names[backend], "response, non-streamed JSON", iterations,
                                  p50, p99, mean))
            # request() is part of every streamed request; time it inside the stream row so
            # the row is "what extproc's Python spends translating one streamed request".
            p50, p99, mean = time_it(translate_stream, stream_iterations)
            out.append(Timing(names[backend], f"streamed request total ({usage_label}): "
                              f"request + {len(events)} feed() + flush()",
                              stream_iterations, p50, p99, mean, chunks=len(events)))
    return out


# --------------------------------------------------------------------------- report


def _f(value: float | None, digits: int = 2) -> str:
    return "n/a" if value is None or value != value else f"{value:,.{digits}f}"


def stream_table(results: dict[str, TargetResult]) -> list[str]:
    header = ["target", "streams ok", "errors", "TTFT p50 ms", "TTFT p99 ms",
              "first content p50 ms", "first content p99 ms", "total p50 ms", "total p99 ms",
              "events/stream", "reads/stream", "chunks/s", "extproc CPU µs/stream",
              "Envoy CPU µs/stream", "emulator CPU µs/stream"]
    rows = []
    for r in results.values():
        envoy = r.cpu_us_per_stream("envoy-direct" if r.target == DIRECT else "envoy-gateway")
        rows.append([r.target, f"{len(r.ok):,}", f"{len(r.samples) - len(r.ok)}",
                     _f(r.pct("ttft_ms", 50)), _f(r.pct("ttft_ms", 99)),
                     _f(r.pct("content_ms", 50)), _f(r.pct("content_ms", 99)),
                     _f(r.pct("total_ms", 50)), _f(r.pct("total_ms", 99)),
                     _f(r.mean("events"), 1), _f(r.mean("reads"), 1), _f(r.chunks_per_s, 0),
                     _f(r.cpu_us_per_stream("extproc"), 0) if r.target != DIRECT else "—",
                     _f(envoy, 0), _f(r.cpu_us_per_stream("emulator"), 0)])
    return common.table(header, rows)


def overhead_table(results: dict[str, TargetResult]) -> list[str]:
    direct = results[DIRECT]
    rows = []
    for target in (GW_OPENAI, GW_ANTHROPIC, GW_FAST):
        r = results[target]
        d50 = r.pct("ttft_ms", 50) - direct.pct("ttft_ms", 50)
        ok = "met" if d50 <= TARGET_TTFT_OVERHEAD_MS else "NOT met"
        events = r.mean("events")
        extproc_per_chunk = (r.cpu_us_per_stream("extproc") or 0) / events if events else None
        d99 = r.pct("ttft_ms", 99) - direct.pct("ttft_ms", 99)
        rows.append([target, f"{d50:+.2f}", f"{d99:+.2f}",
                     f"{r.pct('content_ms', 50) - direct.pct('content_ms', 50):+.2f}",
                     f"{r.pct('total_ms', 50) - direct.pct('total_ms', 50):+.2f}",
                     _f(r.chunks_per_s / direct.chunks_per_s if direct.chunks_per_s else None),
                     _f(extproc_per_chunk, 0),
                     f"{ok} (≤ {TARGET_TTFT_OVERHEAD_MS:g} ms)"])
    return common.table(["gateway target", "ΔTTFT p50 ms", "ΔTTFT p99 ms",
                         "Δfirst content p50 ms", "Δtotal p50 ms", "chunks/s vs direct",
                         "extproc CPU µs per client event", "TTFT target"], rows)


def micro_table(timings: Sequence[Timing]) -> list[str]:
    rows = []
    by_op: dict[str, dict[str, Timing]] = {}
    for t in timings:
        key = re.sub(r" \d+ feed", " N feed", t.operation)
        by_op.setdefault(key, {})[t.pair] = t
    for t in timings:
        key = re.sub(r" \d+ feed", " N feed", t.operation)
        peers = by_op[key]
        base = next((v for k, v in peers.items() if "passthrough" in k), None)
        delta = (f"{t.p50_us - base.p50_us:+,.1f}" if base is not None and base is not t
                 else "—")
        per_chunk = _f(t.p50_us / t.chunks, 2) if t.chunks else "—"
        rows.append([t.pair, t.operation, f"{t.iterations:,}", _f(t.p50_us, 1),
                     _f(t.p99_us, 1), _f(t.mean_us, 1), per_chunk, delta])
    return common.table(["pair", "operation", "iterations", "p50 µs", "p99 µs", "mean µs",
                         "p50 µs per upstream event", "Δp50 vs passthrough µs"], rows,
                        align=["l", "l", "r", "r", "r", "r", "r", "r"])


def render(*, args: argparse.Namespace, command: str, machine: str, started: Any,
           results: dict[str, TargetResult] | None, timings: Sequence[Timing],
           failure: str | None) -> str:
    lines = [
        f"## Streaming {started:%Y-%m-%d %H:%M:%S} UTC — {args.requests} streams per target, "
        f"chunk delay {args.chunk_delay_ms} ms, {args.words} words"
        + (" — INCOMPLETE (run failed)" if failure else ""),
        "",
        f"Command: `{command}`",
        "",
        f"Machine: {machine}.",
        "",
    ]
    if failure:
        lines += [f"Failure: {failure}", ""]
    if results is not None:
        lines += [
            "### Through the gateway vs Envoy-direct (loopback, c=1, sequential)",
            "",
            f"One emulator (`--chunk-delay-ms {args.chunk_delay_ms}`, a {args.words}-word reply:"
            " OpenAI shape = role chunk, one chunk per word, finish chunk"
            + (", usage chunk" if args.include_usage else "")
            + ", `[DONE]`; Anthropic shape = message_start, content_block_start, ping, one "
            "delta per word, content_block_stop, message_delta, message_stop, each write "
            "after the first delayed by the chunk delay). "
            f"*direct* = Envoy routing to the emulator (provider key added by the route, no "
            f"ext_proc); *gateway openai* = OpenAI door -> OpenAI backend (passthrough); "
            f"*gateway anthropic* = OpenAI door -> Anthropic backend (translated, "
            f"`{ANTHROPIC_MODEL}` -> `{ANTHROPIC_UPSTREAM}`). Client: http.client, one "
            f"keep-alive connection per target, `stream: true`"
            + (", `stream_options.include_usage: true`" if args.include_usage else "")
            + f", {args.rounds} interleaved rounds, {args.warmup} unmeasured warm-up streams "
            "per target; every stream checked (content = reply, usage, `[DONE]`). TTFT = "
            "request sent -> first bytes with `data:` (the role chunk: the first event the "
            "emulator writes, no delay before it); first content = -> first event with a "
            "non-empty `delta.content` (1 chunk delay later for the OpenAI shape, 3 for the "
            "Anthropic shape: content_block_start and ping come first); chunks/s = "
            "client-seen events / stream time. CPU from /proc (utime+stime) over the "
            "measured streams, 10 ms resolution.",
            "",
            *stream_table(results),
            "",
            *overhead_table(results),
            "",
        ]
        notes = [f"- {r.target}: {len(r.samples) - len(r.ok)} failed streams "
                 f"(first: {'; '.join(r.errors)})" for r in results.values() if r.errors]
        notes += [f"- {r.target}: {r.reconnects} reconnects" for r in results.values()
                  if r.reconnects]
        if notes:
            lines += ["Anomalies:", "", *notes, ""]
    if timings:
        lines += [
            "### Translation cost in-process (no sockets)",
            "",
            "What extproc's Python spends translating one request, timed with "
            "`time.perf_counter_ns` per iteration (gc on, after a warm-up): `translator_for` "
            "+ `request()` on the parsed client body (the JSON parse included, as the gateway "
            "parses once either way); `response()` on an emulator-shaped JSON reply; and a "
            "whole streamed request: `request()` + `stream()` + one `feed()` per upstream "
            f"event of the {args.words}-word emulator stream + `flush()`. Passthrough with "
            "`include_usage` forwards the provider's bytes (it only reads usage); without it "
            "the gateway asked for usage upstream and re-frames events to drop the usage "
            "chunk. gRPC and Envoy costs are not in these numbers (see the CPU columns "
            "above).",
            "",
            *micro_table(timings),
            "",
        ]
    return "\n".join(lines)


# --------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bench/streaming.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=300,
                        help="measured streams per target (default 300)")
    parser.add_argument("--rounds", type=int, default=3,
                        help="interleaved blocks the streams are split into (default 3)")
    parser.add_argument("--warmup", type=int, default=20,
                        help="unmeasured streams per target first (default 20)")
    parser.add_argument("--chunk-delay-ms", type=int, default=2,
                        help="emulator delay between streamed events (default 2)")
    parser.add_argument("--words", type=int, default=32,
                        help="words in the emulator's reply = content chunks (default 32)")
    parser.add_argument("--iterations", type=int, default=20_000,
                        help="in-process iterations per request/response row; stream rows "
                             "use a tenth (default 20000)")
    parser.add_argument("--no-include-usage", dest="include_usage", action="store_false",
                        help="clients do not set stream_options.include_usage")
    parser.add_argument("--quick", action="store_true",
                        help="smoke check: 60 streams per target, 5 warm-up, 4000 iterations")
    parser.add_argument("--no-stack", action="store_true",
                        help="in-process micro-benchmark only")
    parser.add_argument("--output", type=Path, default=common.RESULTS,
                        help="results file (default bench/RESULTS.md)")
    parser.add_argument("--keep-history", type=int, default=3,
                        help="streaming sections kept in the results file (default 3)")
    parser.add_argument("--keep-workdir", action="store_true")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    raw_argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(raw_argv)
    if args.quick:
        args.requests, args.warmup, args.iterations = 60, 5, 4_000
    if not (1 <= args.requests <= 10_000 and 1 <= args.rounds <= args.requests
            and 0 <= args.warmup <= 1000 and 0 <= args.chunk_delay_ms <= 1000
            and 1 <= args.words <= 2000 and 100 <= args.iterations <= 1_000_000):
        print("bench: --requests 1..10000, --rounds 1..requests, --warmup 0..1000, "
              "--chunk-delay-ms 0..1000, --words 1..2000, --iterations 100..1000000",
              file=sys.stderr)
        return 2
    started = common.utc_now()
    command = common.display_command("bench/streaming.py", raw_argv)
    machine = common.machine_line(envoy=not args.no_stack)
    results: dict[str, TargetResult] | None = None
    failure: str | None = None
    workdir = Path(tempfile.mkdtemp(prefix="asc-bench-streaming-"))
    if not args.no_stack:
        stack = Stack(workdir)
        try:
            print(f"bench: starting stack in {workdir}", flush=True)
            bench = start_stack(stack, chunk_delay_ms=args.chunk_delay_ms, words=args.words)
            print(f"bench: {args.requests} streams per target, {args.rounds} rounds", flush=True)
            results = run_streams(bench, requests=args.requests, rounds=args.rounds,
                                  warmup=args.warmup, words=args.words,
                                  include_usage=args.include_usage)
        except Exception as exc:
            failure = f"{type(exc).__name__}: {exc}"
            print(f"bench: FAILED: {failure}\nbench: process logs kept in {workdir}",
                  file=sys.stderr)
        finally:
            stack.stop()
    print("bench: in-process translation micro-benchmark...", flush=True)
    timings = micro_benchmarks(words=args.words, iterations=args.iterations)
    text = render(args=args, command=command, machine=machine, started=started,
                  results=results, timings=timings, failure=failure)
    common.append_section("streaming", text, path=args.output, keep=args.keep_history)
    print()
    if results is not None:
        print("\n".join(stream_table(results)), "", "\n".join(overhead_table(results)), "",
              sep="\n")
    print("\n".join(micro_table(timings)))
    print(f"\nbench: results appended to {args.output}")
    if failure is None and not args.keep_workdir:
        shutil.rmtree(workdir, ignore_errors=True)
    elif failure is None:
        print(f"bench: workdir kept: {workdir}")
    errors = results is not None and any(r.errors for r in results.values())
    return 1 if failure or errors else 0


if __name__ == "__main__":
    raise SystemExit(main())
