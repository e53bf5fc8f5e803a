"""Property: every StreamTranslator gives the same events however the upstream bytes split.

Upstream streams are generated (random text, including multi-byte UTF-8, random tool
argument fragments, LF or CRLF framing), fed whole and fed in random pieces (splits land
inside UTF-8 sequences, CRLF pairs and JSON); the decoded output events, the usage and the
delta counts must be identical. Output events are compared decoded, not as raw bytes.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from extproc.translate.anthropic_openai import OpenAIChunksToAnthropicEvents
from extproc.translate.anthropic_passthrough import AnthropicPassthroughStream
from extproc.translate.openai_anthropic import AnthropicEventsToOpenAIChunks
from extproc.translate.openai_passthrough import OpenAIPassthroughStream
from extproc.translate.sse import SseDecoder, SseEvent, encode_event
from extproc.translate.types import StreamTranslator

TEXTS = st.lists(st.text(min_size=1, max_size=8), max_size=6)
ARGS = st.lists(st.text(min_size=1, max_size=6), max_size=3)
NEWLINES = st.sampled_from(["\n", "\r\n"])


def frame(payload: object, nl: str, event: str | None = None) -> str:
    data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)
    head = f"event: {event}{nl}" if event else ""
    return f"{head}data: {data}{nl}{nl}"


def openai_upstream(texts: list[str], args: list[str], nl: str) -> bytes:
    def chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
        return {"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": "m",
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}

    parts = [frame({"id": "", "choices": [], "prompt_filter_results": []}, nl),
             frame(chunk({"role": "assistant", "content": ""}), nl)]
    parts += [frame(chunk({"content": t}), nl) for t in texts]
    if args:
        parts.append(frame(chunk({"tool_calls": [{"index": 0, "id": "call_1", "type": "function",
                                                  "function": {"name": "f", "arguments": ""}}]}),
                           nl))
        parts += [frame(chunk({"tool_calls": [{"index": 0, "function": {"arguments": a}}]}), nl)
                  for a in args]
    parts.append(frame(chunk({}, "tool_calls" if args else "stop"), nl))
    parts.append(frame({"id": "c1", "choices": [], "usage": {
        "prompt_tokens": 11, "completion_tokens": len(texts) + len(args),
        "prompt_tokens_details": {"cached_tokens": 3}}}, nl))
    parts.append(frame("[DONE]", nl))
    return "".join(parts).encode()


def anthropic_upstream(texts: list[str], args: list[str], nl: str) -> bytes:
    def ev(kind: str, **payload: Any) -> str:
        return frame({"type": kind, **payload}, nl, kind)

    parts = [ev("message_start", message={"id": "msg_1", "model": "m", "usage": {
        "input_tokens": 9, "output_tokens": 1, "cache_read_input_tokens": 2}}),
        ev("content_block_start", index=0, content_block={"type": "text", "text": ""}),
        ev("ping")]
    parts += [ev("content_block_delta", index=0, delta={"type": "text_delta", "text": t})
              for t in texts]
    parts.append(ev("content_block_stop", index=0))
    if args:
        parts.append(ev("content_block_start", index=1, content_block={
            "type": "tool_use", "id": "toolu_1", "name": "f", "input": {}}))
        parts += [ev("content_block_delta", index=1,
                     delta={"type": "input_json_delta", "partial_json": a}) for a in args]
        parts.append(ev("content_block_stop", index=1))
    parts.append(ev("message_delta", delta={"stop_reason": "tool_use" if args else "end_turn"},
                    usage={"output_tokens": len(texts) + len(args)}))
    parts.append(ev("message_stop"))
    return "".join(parts).encode()


def run(translator: StreamTranslator, pieces: list[bytes]) -> tuple[list[SseEvent], Any]:
    out = b"".join(translator.feed(piece) for piece in pieces) + translator.flush()
    decoder = SseDecoder()
    events = decoder.feed(out) + decoder.flush()
    return events, (translator.usage, translator.output_tokens_so_far,
                    translator.first_token_seen)


def split(raw: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({min(c, len(raw)) for c in cuts})
    bounds = [0, *points, len(raw)]
    return [raw[a:b] for a, b in itertools.pairwise(bounds)]


Factory = Callable[[], StreamTranslator]
OPENAI_SHAPED: list[Factory] = [
    lambda: OpenAIPassthroughStream(strip_usage_chunk=True),
    lambda: OpenAIPassthroughStream(strip_usage_chunk=False),
    OpenAIChunksToAnthropicEvents,
]
ANTHROPIC_SHAPED: list[Factory] = [
    lambda: AnthropicEventsToOpenAIChunks(include_usage=True, clock=lambda: 5),
    lambda: AnthropicEventsToOpenAIChunks(include_usage=False, clock=lambda: 5),
    AnthropicPassthroughStream,
]


def check(factories: list[Factory], raw: bytes, cuts: list[int]) -> list[list[SseEvent]]:
    results = []
    for factory in factories:
        whole = run(factory(), [raw])
        pieces = run(factory(), split(raw, cuts))
        bytewise = run(factory(), [raw[i:i + 1] for i in range(len(raw))]) if len(raw) < 1500 \
            else whole
        assert pieces == whole
        assert bytewise == whole
        results.append(whole[0])
    return results


@settings(max_examples=60, deadline=None)
@given(texts=TEXTS, args=ARGS, nl=NEWLINES, cuts=st.lists(st.integers(0, 4000), max_size=12))
def test_openai_shaped_streams_split_anywhere(texts: list[str], args: list[str], nl: str,
                                              cuts: list[int]) -> None:
    raw = openai_upstream(texts, args, nl)
    stripped, untouched, anthropic = check(OPENAI_SHAPED, raw, cuts)
    assert len(untouched) == len(stripped) + 1  # only the usage-only chunk is removed
    text = "".join(json.loads(e.data)["delta"].get("text", "") for e in anthropic
                   if e.event == "content_block_delta")
    assert text == "".join(texts)
    arguments = "".join(json.loads(e.data)["delta"].get("partial_json", "") for e in anthropic
                        if e.event == "content_block_delta")
    assert arguments == "".join(args)
    assert anthropic[-1].event == "message_stop"


@settings(max_examples=60, deadline=None)
@given(texts=TEXTS, args=ARGS, nl=NEWLINES, cuts=st.lists(st.integers(0, 4000), max_size=12))
def test_anthropic_shaped_streams_split_anywhere(texts: list[str], args: list[str], nl: str,
                                                 cuts: list[int]) -> None:
    raw = anthropic_upstream(texts, args, nl)
    with_usage, without_usage, _ = check(ANTHROPIC_SHAPED, raw, cuts)
    assert len(with_usage) == len(without_usage) + 1
    chunks = [json.loads(e.data) for e in without_usage[:-1]]
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
    assert text == "".join(texts)
    arguments = "".join(call["function"].get("arguments", "") for c in chunks
                        for call in c["choices"][0]["delta"].get("tool_calls", []))
    assert arguments == "".join(args)
    assert without_usage[-1].data == "[DONE]"


@settings(max_examples=50, deadline=None)
@given(data=st.text(), event=st.one_of(st.none(), st.from_regex(r"[a-z_]{1,12}", fullmatch=True)))
def test_encode_event_is_read_back_by_the_decoder(data: str, event: str | None) -> None:
    decoder = SseDecoder()
    framed = encode_event(data, event)
    expected = data.replace("\r\n", "\n").replace("\r", "\n")
    assert decoder.feed(framed) + decoder.flush() == [SseEvent(data=expected, event=event)]
