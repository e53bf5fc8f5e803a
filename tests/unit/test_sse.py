"""The incremental Server-Sent Events decoder (`extproc.translate.sse`)."""

from __future__ import annotations

import itertools

from hypothesis import given, settings
from hypothesis import strategies as st

from extproc.translate.sse import SseDecoder, SseEvent


def decode_all(*chunks: bytes) -> list[SseEvent]:
    decoder = SseDecoder()
    events: list[SseEvent] = []
    for chunk in chunks:
        events.extend(decoder.feed(chunk))
    events.extend(decoder.flush())
    return events


def test_openai_style_stream() -> None:
    stream = (
        b'data: {"id":"1","choices":[{"delta":{"content":"Hel"}}]}\n\n'
        b'data: {"id":"1","choices":[{"delta":{"content":"lo"}}]}\n\n'
        b"data: [DONE]\n\n"
    )
    decoder = SseDecoder()
    assert decoder.feed(stream) == [
        SseEvent(data='{"id":"1","choices":[{"delta":{"content":"Hel"}}]}'),
        SseEvent(data='{"id":"1","choices":[{"delta":{"content":"lo"}}]}'),
        SseEvent(data="[DONE]"),
    ]
    assert decoder.flush() == []


def test_events_are_returned_as_soon_as_complete() -> None:
    decoder = SseDecoder()
    assert decoder.feed(b"data: one\n") == []
    assert decoder.feed(b"\n") == [SseEvent(data="one")]
    assert decoder.feed(b"data: two") == []
    assert decoder.feed(b"\n\ndata: three\n\n") == [SseEvent(data="two"), SseEvent(data="three")]


def test_crlf_line_endings() -> None:
    assert decode_all(b"event: a\r\ndata: 1\r\n\r\ndata: 2\r\n\r\n") == [
        SseEvent(data="1", event="a"), SseEvent(data="2")]


def test_cr_line_endings() -> None:
    assert decode_all(b"event: a\rdata: 1\r\rdata: 2\r\r") == [
        SseEvent(data="1", event="a"), SseEvent(data="2")]


def test_mixed_line_endings() -> None:
    assert decode_all(b"data: 1\r\n\ndata: 2\r\rdata: 3\n\r\n") == [
        SseEvent(data="1"), SseEvent(data="2"), SseEvent(data="3")]


def test_crlf_split_between_chunks_is_one_line_end() -> None:
    decoder = SseDecoder()
    assert decoder.feed(b"data: a\r") == []
    assert decoder.feed(b"\ndata: b\r") == []
    assert decoder.feed(b"\n\r") == [SseEvent(data="a\nb")]
    assert decoder.feed(b"\n") == []
    assert decoder.flush() == []


def test_cr_then_cr_across_chunks_is_two_line_ends() -> None:
    decoder = SseDecoder()
    assert decoder.feed(b"data: a\r") == []
    assert decoder.feed(b"\r") == [SseEvent(data="a")]


def test_multi_line_data() -> None:
    assert decode_all(b"data: first\ndata: second\ndata:\ndata:  fourth\n\n") == [
        SseEvent(data="first\nsecond\n\n fourth")]


def test_field_without_space_and_without_colon() -> None:
    assert decode_all(b"data:x\n\ndata\n\n") == [SseEvent(data="x"), SseEvent(data="")]


def test_comments_and_ignored_fields() -> None:
    stream = (
        b": keep-alive\n\n"
        b":comment\n"
        b"id: 7\n"
        b"retry: 1000\n"
        b"unknown: z\n"
        b"data: payload\n\n"
    )
    assert decode_all(stream) == [SseEvent(data="payload")]


def test_event_field() -> None:
    stream = (
        b"event: message_start\ndata: {\"type\":\"message_start\"}\n\n"
        b"event: ping\ndata: {}\n\n"
        b"data: no event name\n\n"
    )
    assert decode_all(stream) == [
        SseEvent(data='{"type":"message_start"}', event="message_start"),
        SseEvent(data="{}", event="ping"),
        SseEvent(data="no event name"),
    ]


def test_event_without_data_is_emitted_with_empty_data() -> None:
    assert decode_all(b"event: ping\n\n") == [SseEvent(data="", event="ping")]


def test_blank_lines_alone_emit_nothing() -> None:
    assert decode_all(b"\n\n\r\n\r\r") == []


def test_utf8_split_across_chunks() -> None:
    text = "data: caf\u00e9 \u2603 \U0001f600\n\n".encode()
    for cut in range(1, len(text)):
        assert decode_all(text[:cut], text[cut:]) == [
            SseEvent(data="caf\u00e9 \u2603 \U0001f600")], cut


def test_utf8_fed_byte_by_byte() -> None:
    text = "event: \u00fcber\ndata: \u65e5\u672c\n\n".encode()
    assert decode_all(*(text[i:i + 1] for i in range(len(text)))) == [
        SseEvent(data="\u65e5\u672c", event="\u00fcber")]


def test_invalid_utf8_is_replaced() -> None:
    assert decode_all(b"data: a\xffb\n\n") == [SseEvent(data="a\ufffdb")]


def test_flush_emits_an_unterminated_event() -> None:
    decoder = SseDecoder()
    assert decoder.feed(b'data: {"usage":1}') == []
    assert decoder.flush() == [SseEvent(data='{"usage":1}')]


def test_flush_emits_event_whose_last_line_ended() -> None:
    decoder = SseDecoder()
    assert decoder.feed(b"event: end\ndata: x\n") == []
    assert decoder.flush() == [SseEvent(data="x", event="end")]


def test_flush_with_truncated_utf8() -> None:
    decoder = SseDecoder()
    assert decoder.feed(b"data: \xe2\x98") == []
    assert decoder.flush() == [SseEvent(data="\ufffd")]


def test_flush_of_nothing() -> None:
    decoder = SseDecoder()
    assert decoder.flush() == []
    assert decoder.feed(b": only a comment") == []
    assert decoder.flush() == []


# -- property: chunking never changes the events ----------------------------------------

_TEXT = st.text(
    alphabet=st.characters(codec="utf-8", exclude_characters="\r\n"),
    max_size=12,
)
_LINE = st.one_of(
    st.builds(lambda v: f"data: {v}", _TEXT),
    st.builds(lambda v: f"data:{v}", _TEXT),
    st.builds(lambda v: f"event: {v}", _TEXT),
    st.builds(lambda v: f": {v}", _TEXT),
    st.builds(lambda v: f"id: {v}", _TEXT),
    st.just(""),
)
_EOL = st.sampled_from(["\n", "\r\n", "\r"])


@st.composite
def sse_streams(draw: st.DrawFn) -> bytes:
    lines = draw(st.lists(st.tuples(_LINE, _EOL), max_size=12))
    text = "".join(line + eol for line, eol in lines)
    if draw(st.booleans()):
        text += draw(_LINE)  # an unterminated last line, for flush()
    return text.encode()


@st.composite
def streams_and_cuts(draw: st.DrawFn) -> tuple[bytes, list[bytes]]:
    stream = draw(sse_streams())
    if not stream:
        return stream, []
    cuts = draw(st.sets(st.integers(min_value=1, max_value=max(len(stream) - 1, 1)),
                        max_size=len(stream)))
    bounds = [0, *sorted(c for c in cuts if c < len(stream)), len(stream)]
    return stream, [stream[a:b] for a, b in itertools.pairwise(bounds)]


@settings(max_examples=300, deadline=None, database=None)
@given(streams_and_cuts())
def test_any_split_yields_the_events_of_the_unsplit_stream(
    case: tuple[bytes, list[bytes]],
) -> None:
    stream, chunks = case
    assert b"".join(chunks) == stream
    assert all(chunks)
    assert decode_all(*chunks) == decode_all(stream)


@settings(max_examples=100, deadline=None, database=None)
@given(sse_streams())
def test_byte_by_byte_equals_whole(stream: bytes) -> None:
    assert decode_all(*(stream[i:i + 1] for i in range(len(stream)))) == decode_all(stream)
