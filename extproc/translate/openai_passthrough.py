"""OpenAI Chat Completions door -> OpenAI-shaped backends (OpenAI, compatible, Mistral, Azure).

The body keeps the OpenAI wire format; only what a backend needs changes:

* all: `model` becomes the deployment's upstream model. Streams always ask for usage
  (`stream_options.include_usage: true`, other `stream_options` keys kept) so the
  gateway can bill them; the usage-only chunk (`"choices": []` with `usage`) is removed
  from what the client receives unless the client itself set `include_usage: true`.
* `azure`: `model` is removed from the body; the deployment goes in the path,
  `/openai/deployments/{upstream_model}/chat/completions?api-version={api_version}`
  (`api_version` defaults to `DEFAULT_AZURE_API_VERSION`).
* `mistral`: `max_completion_tokens` -> `max_tokens` (the smaller wins when both are
  sent), `seed` -> `random_seed`, `stream_options` dropped (Mistral puts usage in its
  last chunk by itself). These parameters are refused with 400
  "The parameter '<name>' is not supported by Mistral." (param = the name) when present
  with a non-null value: `MISTRAL_UNSUPPORTED`.
* `openai`, `openai_compatible`: passed through as they are.

Responses pass through unchanged (the bytes the provider sent); usage is read from
`usage.prompt_tokens`, `usage.completion_tokens`, `usage.prompt_tokens_details.cached_tokens`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any, Final
from urllib.parse import quote

from extproc.errors import Dialect
from extproc.translate.provider_errors import map_provider_error
from extproc.translate.sse import SseDecoder, SseEvent, encode_event
from extproc.translate.types import (
    Backend,
    StreamProgress,
    TranslatedResponse,
    UpstreamRequest,
)
from extproc.translate.usage import usage_from_openai
from extproc.translate.validation import (
    compact_json,
    invalid,
    optional_bool,
    optional_positive_int,
    unsupported,
    validate_openai_door,
)

__all__ = [
    "CHAT_COMPLETIONS_PATH",
    "DEFAULT_AZURE_API_VERSION",
    "MISTRAL_UNSUPPORTED",
    "OpenAIPassthrough",
    "OpenAIPassthroughStream",
    "azure_path",
    "count_openai_deltas",
]

CHAT_COMPLETIONS_PATH: Final = "/v1/chat/completions"
DEFAULT_AZURE_API_VERSION: Final = "2024-10-21"
MISTRAL_UNSUPPORTED: Final = (
    "user",
    "store",
    "service_tier",
    "metadata",
    "logit_bias",
    "parallel_tool_calls",
    "logprobs",
    "top_logprobs",
    "audio",
    "modalities",
    "reasoning_effort",
    "web_search_options",
    "functions",
    "function_call",
)


def azure_path(deployment: str, api_version: str | None) -> str:
    version = api_version or DEFAULT_AZURE_API_VERSION
    return (f"/openai/deployments/{quote(deployment, safe='')}/chat/completions"
            f"?api-version={quote(version, safe='')}")


def count_openai_deltas(chunk: Mapping[str, Any]) -> int:
    """Content deltas (text, refusal or tool-call fragments) in one OpenAI stream chunk."""
    choices = chunk.get("choices")
    if not isinstance(choices, list):
        return 0
    seen = 0
    for choice in choices:
        delta = choice.get("delta") if isinstance(choice, dict) else None
        if not isinstance(delta, dict):
            continue
        if delta.get("content") or delta.get("refusal") or delta.get("tool_calls"):
            seen += 1
    return seen


class OpenAIPassthroughStream(StreamProgress):
    """Reads usage and deltas off an OpenAI-shaped stream while forwarding it.

    When nothing has to be removed the provider's bytes are forwarded untouched, chunk
    by chunk; otherwise complete events are re-framed and the usage-only chunk dropped.
    """

    def __init__(self, *, strip_usage_chunk: bool) -> None:
        self._decoder = SseDecoder()
        self._strip = strip_usage_chunk
        StreamProgress.__init__(self)

    def feed(self, chunk: bytes) -> bytes:
        out = self._handle(self._decoder.feed(chunk))
        return out if self._strip else chunk

    def flush(self) -> bytes:
        return self._handle(self._decoder.flush())

    def _handle(self, events: list[SseEvent]) -> bytes:
        kept: list[bytes] = []
        for event in events:
            usage_only = self._read(event.data)
            if self._strip and not usage_only:
                kept.append(encode_event(event.data, event.event))
        return b"".join(kept)

    def _read(self, data: str) -> bool:
        """Record usage and deltas; True for a usage-only chunk."""
        if data == "[DONE]":
            return False
        try:
            chunk = json.loads(data)
        except ValueError:
            return False
        if not isinstance(chunk, dict):
            return False
        usage = usage_from_openai(chunk.get("usage"), service_tier=chunk.get("service_tier"))
        if usage is not None:
            self._usage = usage
        self._deltas += count_openai_deltas(chunk)
        return usage is not None and chunk.get("choices") == []


class OpenAIPassthrough:
    """One request through the OpenAI door to an OpenAI-shaped backend."""

    def __init__(self, backend: Backend) -> None:
        if backend is Backend.ANTHROPIC:
            raise ValueError("OpenAIPassthrough serves OpenAI-shaped backends only")
        self.backend = backend
        self._client_wants_usage = False

    def request(
        self, body: dict[str, Any], *, upstream_model: str, api_version: str | None
    ) -> UpstreamRequest:
        request = dict(validate_openai_door(body))
        stream = request.get("stream") is True
        options = request.get("stream_options")
        if options is not None and not isinstance(options, dict):
            raise invalid("'stream_options' must be an object.", "stream_options")
        include = optional_bool(options or {}, "include_usage", "stream_options.include_usage")
        self._client_wants_usage = include is True
        if self.backend is Backend.MISTRAL:
            self._to_mistral(request)
        elif stream:
            request["stream_options"] = {**(options or {}), "include_usage": True}
        if self.backend is Backend.AZURE:
            request.pop("model", None)
            path = azure_path(upstream_model, api_version)
        else:
            request["model"] = upstream_model
            path = CHAT_COMPLETIONS_PATH
        return UpstreamRequest(body=compact_json(request), path=path)

    def _to_mistral(self, request: dict[str, Any]) -> None:
        for name in MISTRAL_UNSUPPORTED:
            if request.get(name) is not None:
                raise unsupported(name, Backend.MISTRAL)
            request.pop(name, None)
        request.pop("stream_options", None)
        limits = [limit for limit in (optional_positive_int(request, "max_completion_tokens"),
                                      optional_positive_int(request, "max_tokens"))
                  if limit is not None]
        request.pop("max_completion_tokens", None)
        if limits:
            request["max_tokens"] = min(limits)
        if "seed" in request:
            seed = request.pop("seed")
            if seed is not None:
                request["random_seed"] = seed

    def response(self, status: int, body: bytes) -> TranslatedResponse:
        try:
            document = json.loads(body)
        except (ValueError, UnicodeDecodeError):
            return TranslatedResponse(body=body, usage=None)
        usage = usage_from_openai(document.get("usage"), service_tier=document.get(
            "service_tier")) if isinstance(document, dict) else None
        return TranslatedResponse(body=body, usage=usage)

    def error(self, status: int, body: bytes, headers: Mapping[str, str]) -> tuple[int, bytes]:
        return map_provider_error(Dialect.OPENAI, status, body)

    def stream(self) -> OpenAIPassthroughStream:
        strip = self.backend is not Backend.MISTRAL and not self._client_wants_usage
        return OpenAIPassthroughStream(strip_usage_chunk=strip)
