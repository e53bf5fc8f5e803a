"""Anthropic Messages door -> Anthropic backend.

The body is forwarded with `model` replaced by the upstream model (to `/v1/messages`,
header `anthropic-version: 2023-06-01`); every other field is Anthropic's to judge.
Responses and streams pass through byte for byte. Usage: `input_tokens +
cache_read_input_tokens + cache_creation_input_tokens` in, `output_tokens` out, cache
reads as cached input; in streams from `message_start` updated by `message_delta`
(cumulative counts: later values replace earlier ones).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from extproc.errors import Dialect
from extproc.translate import limits
from extproc.translate.openai_anthropic import ANTHROPIC_VERSION, MESSAGES_PATH
from extproc.translate.provider_errors import map_provider_error, scrubbed_error_event
from extproc.translate.sse import SseDecoder, SseEvent, encode_event
from extproc.translate.types import (
    NO_OUTPUT_LIMIT,
    OutputLimit,
    StreamProgress,
    TranslatedResponse,
    UpstreamRequest,
)
from extproc.translate.usage import usage_from_anthropic
from extproc.translate.validation import compact_json, json_object, validate_anthropic_door

__all__ = ["AnthropicPassthrough", "AnthropicPassthroughStream"]


class AnthropicPassthroughStream(StreamProgress):
    """Forwards an Anthropic stream, re-framed event by event, while reading its usage and
    deltas; an `error` event's message is scrubbed like an error body's."""

    def __init__(self) -> None:
        self._decoder = SseDecoder()
        self._usage_fields: dict[str, Any] = {}
        StreamProgress.__init__(self)

    def feed(self, chunk: bytes) -> bytes:
        return self._read(self._decoder.feed(chunk))

    def flush(self) -> bytes:
        return self._read(self._decoder.flush())

    def _read(self, events: list[SseEvent]) -> bytes:
        return b"".join(self._event(event) for event in events)

    def _event(self, event: SseEvent) -> bytes:
        kind = event.event
        if kind == "content_block_delta":
            self._deltas += 1
            return encode_event(event.data, kind)
        if kind not in (None, "message_start", "message_delta", "error"):
            return encode_event(event.data, kind)
        try:
            data = json.loads(event.data)
        except ValueError:
            data = None
        if not isinstance(data, dict):
            if kind == "error":  # an error we cannot read: say only that it failed
                data = {"type": "error", "error": None}
            else:
                return encode_event(event.data, kind)
        if kind == "error" or data.get("type") == "error":
            return scrubbed_error_event(data.get("error"), Dialect.ANTHROPIC, kind)
        self._read_usage(data)
        return encode_event(event.data, kind)

    def _read_usage(self, data: dict[str, Any]) -> None:
        kind = data.get("type")
        if kind == "content_block_delta":
            self._deltas += 1
        elif kind == "message_start":
            message = data.get("message")
            usage = message.get("usage") if isinstance(message, dict) else None
            self._merge(usage, final=False)
        elif kind == "message_delta":
            self._merge(data.get("usage"), final=True)

    def _merge(self, usage: object, *, final: bool) -> None:
        if not isinstance(usage, dict):
            return
        self._usage_fields.update({k: v for k, v in usage.items() if v is not None})
        if final:
            self._usage = usage_from_anthropic(self._usage_fields)


class AnthropicPassthrough(limits.AnthropicDoorRules):
    """One request through the Anthropic door to Anthropic."""

    def request(
        self, body: dict[str, Any], *, upstream_model: str, api_version: str | None,
        output_limit: OutputLimit = NO_OUTPUT_LIMIT,
    ) -> UpstreamRequest:
        request = dict(validate_anthropic_door(body))
        request["model"] = upstream_model
        return UpstreamRequest(body=compact_json(request), path=MESSAGES_PATH,
                               headers=(("anthropic-version", ANTHROPIC_VERSION),))

    def response(self, status: int, body: bytes) -> TranslatedResponse:
        document = json_object(body)
        usage = usage_from_anthropic(document.get("usage")) if document is not None else None
        return TranslatedResponse(body=body, usage=usage)

    def error(self, status: int, body: bytes, headers: Mapping[str, str]) -> tuple[int, bytes]:
        return map_provider_error(Dialect.ANTHROPIC, status, body)

    def stream(self) -> AnthropicPassthroughStream:
        return AnthropicPassthroughStream()
