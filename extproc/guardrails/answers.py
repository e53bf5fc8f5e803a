"""Response-side redaction: the provider's answer, cleaned with the request's placeholders.

Non-streamed answers are parsed and their generated text redacted (`redact_answer`).
Streams are redacted as they pass (`StreamRedactor`): the generated text of each choice
(OpenAI) or content block (Anthropic) is collected, and all but its last `window`
characters is released, redacted, in the event that brought it; the rest waits for the
next event, so a value split across chunks (`jo` + `hn@example.com`) is seen whole. The
held text goes out, redacted, in its own text event right before the next event that is
not text (finish, block stop, usage, `[DONE]`). A value longer than the window, or one
the window cut before it was complete, may pass partly: the window bounds both the hold
(latency) and the protection (docs/guardrails.md).

Both work on the client's dialect (after translation), in the gateway's own JSON: they
only ever run for policies that enable response redaction.
"""

from __future__ import annotations

import json
from typing import Any, Final

from extproc.errors import Dialect
from extproc.guardrails.redact import Redactor
from extproc.translate.sse import SseDecoder, SseEvent, encode_event

__all__ = ["StreamRedactor", "redact_answer"]

_ANSWER_FIELDS: Final = ("choices", "content")
"""Where a chat completion (OpenAI) or a message (Anthropic) keeps what was generated."""


def redact_answer(redactor: Redactor, body: bytes) -> bytes:
    """`body` with the generated text redacted (unchanged bytes when nothing matched or
    the body is not a JSON object)."""
    before = sum(redactor.redacted.values())
    try:
        answer = json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return body
    if not isinstance(answer, dict):
        return body
    for name in _ANSWER_FIELDS:
        if name in answer:
            answer[name] = redactor.scan_value(answer[name])
    if sum(redactor.redacted.values()) == before:
        return body
    return json.dumps(answer, ensure_ascii=False, separators=(",", ":")).encode()


class StreamRedactor:
    """Redacts an SSE stream in the client's dialect, holding back at most `window`
    characters of each choice's (or block's) text."""

    def __init__(self, redactor: Redactor, dialect: Dialect, window: int) -> None:
        self._redactor = redactor
        self._dialect = dialect
        self._window = window
        self._decoder = SseDecoder()
        self._held: dict[int, str] = {}
        self._templates: dict[int, dict[str, Any]] = {}
        """The last text event of each choice/block: the shape held text goes out in."""
        self.before = redactor.redacted.copy()
        """The redactor's counts when the stream began (the request's)."""

    def feed(self, chunk: bytes) -> bytes:
        return self._process(self._decoder.feed(chunk))

    def flush(self) -> bytes:
        out = self._process(self._decoder.flush())
        return out + self._release_all()

    def _process(self, events: list[SseEvent]) -> bytes:
        out: list[bytes] = []
        for event in events:
            out.append(self._event(event))
        return b"".join(out)

    def _event(self, event: SseEvent) -> bytes:
        try:
            payload = json.loads(event.data)
        except (ValueError, RecursionError):
            payload = None
        slot = self._text_slot(payload) if isinstance(payload, dict) else None
        if slot is None:
            return self._release_all() + encode_event(event.data, event.event)
        index, holder, key, final = slot
        text = self._held.get(index, "") + holder[key]
        self._templates[index] = payload
        if final:
            self._held.pop(index, None)
            holder[key] = self._redactor.text(text, deny_as_redact=True)
        else:
            released, self._held[index] = self._redactor.release(text, self._window)
            holder[key] = released
        return encode_event(_dumps(payload), event.event)

    def _text_slot(self, payload: dict[str, Any]) -> tuple[int, dict[str, Any], str, bool] | None:
        """(choice/block index, the object holding the text, its key, whether the event
        ends that choice) of a text event; None for any other event."""
        if self._dialect is Dialect.ANTHROPIC:
            delta = payload.get("delta")
            if (payload.get("type") == "content_block_delta" and isinstance(delta, dict)
                    and delta.get("type") == "text_delta" and isinstance(delta.get("text"), str)
                    and isinstance(payload.get("index"), int)):
                return payload["index"], delta, "text", False
            return None
        choices = payload.get("choices")
        if not isinstance(choices, list) or len(choices) != 1 or not isinstance(choices[0], dict):
            return None
        choice = choices[0]
        delta = choice.get("delta")
        if (not isinstance(delta, dict) or not isinstance(delta.get("content"), str)
                or not isinstance(choice.get("index"), int)):
            return None
        return choice["index"], delta, "content", choice.get("finish_reason") is not None

    def _release_all(self) -> bytes:
        """Every held text, redacted, each in a text event of its own."""
        out: list[bytes] = []
        for index, text in sorted(self._held.items()):
            if not text:
                continue
            payload = json.loads(json.dumps(self._templates[index]))
            if self._dialect is Dialect.ANTHROPIC:
                payload["delta"]["text"] = self._redactor.text(text, deny_as_redact=True)
                out.append(encode_event(_dumps(payload), "content_block_delta"))
            else:
                payload["choices"][0]["delta"] = {
                    "content": self._redactor.text(text, deny_as_redact=True)}
                payload["choices"][0]["finish_reason"] = None
                out.append(encode_event(_dumps(payload)))
        self._held.clear()
        return b"".join(out)


def _dumps(payload: Any) -> str:
    return json.dumps(payload, ensure_ascii=False, separators=(",", ":"))
