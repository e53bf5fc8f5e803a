"""Translator selection: which (client dialect, provider) pair handles a request.

* OpenAI door (`/v1/chat/completions`) -> openai, openai_compatible, mistral, azure:
  `openai_passthrough.OpenAIPassthrough`
* OpenAI door -> anthropic: `openai_anthropic.OpenAIToAnthropic`
* Anthropic door (`/v1/messages`) -> openai, openai_compatible, mistral, azure:
  `anthropic_openai.AnthropicToOpenAI`
* Anthropic door -> anthropic: `anthropic_passthrough.AnthropicPassthrough`
* OpenAI door -> gemini: `gemini.OpenAIToGemini`
* Anthropic door -> gemini: `anthropic_gemini.AnthropicToGemini`

`translator_for()` returns a new translator per request. Use it in this order:

    translator = translator_for(dialect, backend)
    upstream = translator.request(body, upstream_model=..., api_version=...)  # may raise 400
    # 2xx JSON:            translator.response(status, body) -> TranslatedResponse
    # text/event-stream:   stream = translator.stream(); stream.feed(chunk) ... stream.flush()
    # 4xx/5xx:             translator.error(status, body, headers) -> (status, body)
    #                      plus retry_after_headers(headers) on the reply

Every client error is `GatewayError(ErrorCode.INVALID_REQUEST, ...)`; render it with
`extproc.errors.error_body(error, dialect)`. A 2xx body that is not the JSON the provider
promised raises `GatewayError(ErrorCode.PROVIDER_ERROR, "The provider sent an invalid
response.")` from `response()` of the translating pairs (passthroughs forward it).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Final

from extproc.errors import Dialect
from extproc.translate.anthropic_gemini import AnthropicToGemini
from extproc.translate.anthropic_openai import AnthropicToOpenAI
from extproc.translate.anthropic_passthrough import AnthropicPassthrough
from extproc.translate.gemini import OpenAIToGemini
from extproc.translate.openai_anthropic import (
    ANTHROPIC_VERSION,
    DEFAULT_MAX_TOKENS,
    MESSAGES_PATH,
    OpenAIToAnthropic,
)
from extproc.translate.openai_passthrough import (
    CHAT_COMPLETIONS_PATH,
    DEFAULT_AZURE_API_VERSION,
    OpenAIPassthrough,
)
from extproc.translate.provider_errors import map_provider_error, retry_after_headers
from extproc.translate.types import (
    Backend,
    StreamTranslator,
    TranslatedResponse,
    Translator,
    UpstreamRequest,
    Usage,
)

__all__ = [
    "ANTHROPIC_VERSION",
    "CHAT_COMPLETIONS_PATH",
    "DEFAULT_AZURE_API_VERSION",
    "DEFAULT_MAX_TOKENS",
    "MESSAGES_PATH",
    "TRANSLATORS",
    "Backend",
    "StreamTranslator",
    "TranslatedResponse",
    "Translator",
    "UpstreamRequest",
    "Usage",
    "front_door_for",
    "map_provider_error",
    "retry_after_headers",
    "translator_for",
]

_OPENAI_SHAPED: Final = (
    Backend.OPENAI, Backend.OPENAI_COMPATIBLE, Backend.MISTRAL, Backend.AZURE)

# The selection table: one factory per (client dialect, backend) pair.
TRANSLATORS: Final[dict[tuple[Dialect, Backend], Callable[[], Translator]]] = {
    **{(Dialect.OPENAI, backend): functools.partial(OpenAIPassthrough, backend)
       for backend in _OPENAI_SHAPED},
    (Dialect.OPENAI, Backend.ANTHROPIC): OpenAIToAnthropic,
    **{(Dialect.ANTHROPIC, backend): functools.partial(AnthropicToOpenAI, backend)
       for backend in _OPENAI_SHAPED},
    (Dialect.ANTHROPIC, Backend.ANTHROPIC): AnthropicPassthrough,
    (Dialect.OPENAI, Backend.GEMINI): OpenAIToGemini,
    (Dialect.ANTHROPIC, Backend.GEMINI): AnthropicToGemini,
}

_FRONT_DOORS: Final = {
    CHAT_COMPLETIONS_PATH: Dialect.OPENAI,
    MESSAGES_PATH: Dialect.ANTHROPIC,
}


def translator_for(front: Dialect, backend: Backend) -> Translator:
    """A fresh translator for one request arriving at `front` and served by `backend`."""
    return TRANSLATORS[(front, backend)]()


def front_door_for(path: str) -> Dialect | None:
    """The dialect of the front door at `path` (query string ignored); None if unknown."""
    return _FRONT_DOORS.get(path.partition("?")[0])
