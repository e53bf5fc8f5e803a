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
from extproc.translate.openai_anthropic import ANTHROPIC_VERSION, MESSAGES_PATH
from extproc.translate.provider_errors import map_provider_error
from extproc.translate.sse import SseDecoder, SseEvent
from extproc.translate.types import StreamProgress, TranslatedResponse, UpstreamRequest
from extproc.translate.usage import usage_from_anthropic
from extproc.translate.validation import compact_json, validate_anthropic_door

__all__ = ["AnthropicPassthrough", "AnthropicPassthroughStream"]


class AnthropicPassthroughStream(StreamProgress):
    """Forwards an Anthropic stream untouched while reading its usage and deltas."""

    def __init__(self) -> None:
        self._decoder = SseDecoder()
        self._usage_fields: dict[str, Any] = {}
        StreamProgress.__init__(self)

    def feed(self, chunk: bytes) -> bytes:
        self._read(self._decoder.feed(chunk))
        return chunk

    def flush(self) -> bytes:
        self._read(self._decoder.flush())
        return b""

    def _read(self, events: list[SseEvent]) -> None:
        for event in events:
            kind = event.event
            if kind == "content_block_delta":
                self._deltas += 1
                continue
            if kind not in (None, "message_start", "message_delta"):
                continue
            try:
                data = json.loads(event.data)
            except ValueError:
                continue
            if not isinstance(data, dict):
                continue
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


class AnthropicPassthrough:
    """One request through the Anthropic door to Anthropic."""

    def request(
        self, body: dict[str, Any], *, upstream_model: str, api_version: str | None
    ) -> UpstreamRequest:
        request = dict(validate_anthropic_door(body))
        request["model"] = upstream_model
        return UpstreamRequest(body=compact_json(request), path=MESSAGES_PATH,
                               headers=(("anthropic-version", ANTHROPIC_VERSION),))

    def response(self, status: int, body: bytes) -> TranslatedResponse:
        try:
            document = json.loads(body)
        except (ValueError, UnicodeDecodeError):
            return TranslatedResponse(body=body, usage=None)
        usage = usage_from_anthropic(document.get("usage")) if isinstance(document, dict) else None
        return TranslatedResponse(body=body, usage=usage)

    def error(self, status: int, body: bytes, headers: Mapping[str, str]) -> tuple[int, bytes]:
        return map_provider_error(Dialect.ANTHROPIC, status, body)

    def stream(self) -> AnthropicPassthroughStream:
        return AnthropicPassthroughStream()
