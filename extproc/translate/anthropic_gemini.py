"""Anthropic Messages door -> Google Gemini backend.

Built from the two halves that exist already (decision 0115): a Messages body becomes a
Chat Completions body (`anthropic_openai.build_openai_request`, same checks and 400s,
"... not supported by Gemini."), which becomes a `generateContent` body
(`gemini.build_gemini_request`); Gemini's answer becomes a Chat Completions body, which
becomes a Messages body (`anthropic_openai.message_from_chat_completion`). Streams chain
the two incremental translators the same way. Gemini-only mappings happen at the edges:

* `top_k` -> `generationConfig.topK` (Gemini has it; Chat Completions does not).
* `max_tokens` -> `generationConfig.maxOutputTokens`.
* `tool_use` ids: Gemini matches results to calls by function name, so a `tool_result`
  must name a `tool_use` of an earlier assistant turn: 400 "'messages[i].content[j].
  tool_use_id' does not name a tool_use block of an earlier assistant message."
* Images: `base64` sources only; a `url` source is refused with 400 "Gemini accepts
  images only as base64 sources." (param `messages[i].content[j].source`).
* `tool_choice.disable_parallel_tool_use: true` is refused (Gemini has no such switch).
* `metadata.user_id` is dropped.

These Anthropic-side checks run before the conversion, so every 400 names the client's
own fields and indices.
* usage comes from `usageMetadata` itself (`gemini.usage_from_gemini`), not from the
  intermediate body, so budgets see thinking and tool-prompt tokens.

Still refused: `thinking`, `container`, `mcp_servers`, server tools, and any parameter
the Messages API does not define.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Mapping
from typing import Any, Final

from extproc.errors import Dialect
from extproc.translate import limits
from extproc.translate.anthropic_openai import (
    OpenAIChunksToAnthropicEvents,
    build_openai_request,
    message_from_chat_completion,
)
from extproc.translate.gemini import (
    GeminiChunksToOpenAIChunks,
    build_gemini_request,
    gemini_answer,
    gemini_error,
    gemini_upstream,
)
from extproc.translate.types import (
    NO_OUTPUT_LIMIT,
    Backend,
    OutputLimit,
    TranslatedResponse,
    UpstreamRequest,
    Usage,
)
from extproc.translate.validation import (
    compact_json,
    invalid,
    optional_positive_int,
    unsupported,
    validate_anthropic_door,
)

__all__ = ["AnthropicToGemini", "GeminiChunksToAnthropicEvents"]

_GEMINI: Final = Backend.GEMINI
_MEDIA_TYPE: Final = re.compile(r"[a-z]+/[A-Za-z0-9.+\-]+")
_BASE64: Final = re.compile(r"[A-Za-z0-9+/=\s]+")


def _check_blocks(body: Mapping[str, Any]) -> None:
    """What Gemini needs of a Messages body beyond the OpenAI-shaped checks, named in the
    client's own fields: results that name an earlier call, base64 images."""
    calls: set[str] = set()
    messages = body.get("messages")
    for i, message in enumerate(messages if isinstance(messages, list) else []):
        content = message.get("content") if isinstance(message, dict) else None
        for j, block in enumerate(content if isinstance(content, list) else []):
            if not isinstance(block, dict):
                continue
            where = f"messages[{i}].content[{j}]"
            kind = block.get("type")
            if kind == "tool_use" and isinstance(block.get("id"), str):
                calls.add(block["id"])
            elif kind == "tool_result" and isinstance(block.get("tool_use_id"), str) \
                    and block["tool_use_id"] not in calls:
                raise invalid(f"'{where}.tool_use_id' does not name a tool_use block of an "
                              "earlier assistant message.", f"{where}.tool_use_id")
            elif kind == "image":
                source = block.get("source")
                if not (isinstance(source, dict) and source.get("type") == "base64"
                        and isinstance(source.get("media_type"), str)
                        and _MEDIA_TYPE.fullmatch(source["media_type"])
                        and isinstance(source.get("data"), str)
                        and _BASE64.fullmatch(source["data"])):
                    raise invalid("Gemini accepts images only as base64 sources.",
                                  f"{where}.source")
    choice = body.get("tool_choice")
    if isinstance(choice, dict) and choice.get("disable_parallel_tool_use") is True:
        raise unsupported("tool_choice.disable_parallel_tool_use", _GEMINI)


class GeminiChunksToAnthropicEvents:
    """Gemini SSE in, Anthropic Messages SSE out: Gemini -> Chat Completions chunks ->
    Anthropic events, both incremental. Usage and progress are the Gemini side's."""

    def __init__(self, *, model: str, clock: Callable[[], float] = time.time) -> None:
        self._gemini = GeminiChunksToOpenAIChunks(model=model, include_usage=True, clock=clock)
        self._anthropic = OpenAIChunksToAnthropicEvents()

    def feed(self, chunk: bytes) -> bytes:
        return self._anthropic.feed(self._gemini.feed(chunk))

    def flush(self) -> bytes:
        return self._anthropic.feed(self._gemini.flush()) + self._anthropic.flush()

    @property
    def usage(self) -> Usage | None:
        return self._gemini.usage

    @property
    def output_tokens_so_far(self) -> int:
        return self._gemini.output_tokens_so_far

    @property
    def first_token_seen(self) -> bool:
        return self._gemini.first_token_seen


class AnthropicToGemini(limits.AnthropicDoorRules):
    """One request through the Anthropic door to Gemini."""

    backend: Final = Backend.GEMINI

    def __init__(self, *, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._model = ""

    def request(
        self, body: dict[str, Any], *, upstream_model: str, api_version: str | None,
        output_limit: OutputLimit = NO_OUTPUT_LIMIT,
    ) -> UpstreamRequest:
        request = validate_anthropic_door(body)
        _check_blocks(request)
        top_k = optional_positive_int(request, "top_k")
        chat = build_openai_request({k: v for k, v in request.items() if k != "top_k"},
                                    _GEMINI, upstream_model, limit_field="max_tokens")
        if top_k is not None:
            chat["top_k"] = top_k
        self._model = upstream_model
        return gemini_upstream(build_gemini_request(chat, check=False), upstream_model,
                               stream=request.get("stream") is True)

    def response(self, status: int, body: bytes) -> TranslatedResponse:
        completion, usage = gemini_answer(body, model=self._model, created=int(self._clock()))
        return TranslatedResponse(body=compact_json(message_from_chat_completion(completion)),
                                  usage=usage)

    def error(self, status: int, body: bytes, headers: Mapping[str, str]) -> tuple[int, bytes]:
        return gemini_error(Dialect.ANTHROPIC, status, body)

    def stream(self) -> GeminiChunksToAnthropicEvents:
        return GeminiChunksToAnthropicEvents(model=self._model, clock=self._clock)

