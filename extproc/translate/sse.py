"""Incremental Server-Sent Events decoder and encoder (sans-I/O).

`feed()` takes bytes exactly as they arrive (any split, even inside a UTF-8 sequence or a
CRLF pair) and returns the events completed so far; `flush()` returns a final event that
was not terminated by a blank line. Only `event` and `data` fields matter to the gateway;
comments, `id` and `retry` are ignored. `encode_event()` is the inverse used by the
translators: it frames one event so that `SseDecoder` reads back exactly that event.
"""

from __future__ import annotations

import codecs
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

__all__ = ["SseDecoder", "SseEvent", "encode_event", "json_objects"]


@dataclass(frozen=True, slots=True)
class SseEvent:
    data: str
    event: str | None = None


class SseDecoder:
    def __init__(self) -> None:
        self._text = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._buffer = ""
        self._data: list[str] = []
        self._event: str | None = None
        self._pending_cr = False

    def feed(self, chunk: bytes) -> list[SseEvent]:
        text = self._text.decode(chunk)
        if not text:
            return []
        if self._pending_cr:
            # A CR ended the previous chunk; an LF opening this one belongs to it.
            self._pending_cr = False
            if text.startswith("\n"):
                text = text[1:]
        if text.endswith("\r"):
            self._pending_cr = True
        self._buffer += text
        return self._drain()

    def flush(self) -> list[SseEvent]:
        self._buffer += self._text.decode(b"", final=True)
        events = self._drain()
        if self._buffer:
            self._line(self._buffer)
            self._buffer = ""
        if self._data:
            events.append(self._emit())
        return events

    def _drain(self) -> list[SseEvent]:
        events: list[SseEvent] = []
        lines = self._buffer.replace("\r\n", "\n").replace("\r", "\n").split("\n")
        self._buffer = lines.pop()
        for line in lines:
            if line:
                self._line(line)
            elif self._data or self._event is not None:
                events.append(self._emit())
        return events

    def _line(self, line: str) -> None:
        if line.startswith(":"):
            return
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "data":
            self._data.append(value)
        elif name == "event":
            self._event = value

    def _emit(self) -> SseEvent:
        event = SseEvent(data="\n".join(self._data), event=self._event)
        self._data = []
        self._event = None
        return event


def encode_event(data: str, event: str | None = None) -> bytes:
    """Frame one event: optional `event:` line, one `data:` line per line of `data`."""
    lines = data.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    head = f"event: {event}\n" if event is not None else ""
    return (head + "".join(f"data: {line}\n" for line in lines) + "\n").encode()


def json_objects(events: Iterable[SseEvent]) -> Iterator[dict[str, Any]]:
    """The events whose data is a JSON object, decoded; any other event is skipped (a
    keep-alive, a provider's stray line): the translators act on objects only."""
    for event in events:
        try:
            data = json.loads(event.data)
        except ValueError:
            continue
        if isinstance(data, dict):
            yield data
