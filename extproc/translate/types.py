"""The plain values every translator takes and returns, and the two translator protocols.

Kept apart from `base.py` (which holds the selection table and imports every pair module)
so the pair modules can import these without an import cycle. Import them from
`extproc.translate.base`, which re-exports everything here.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final, Protocol

from extproc.translate.limits import OutputLimit
from extproc.translate.sse import SseDecoder, SseEvent, json_objects

__all__ = [
    "NO_OUTPUT_LIMIT",
    "Backend",
    "JsonEventStream",
    "OutputLimit",
    "SseStream",
    "StreamProgress",
    "StreamTranslator",
    "TranslatedResponse",
    "Translator",
    "UpstreamRequest",
    "Usage",
]


NO_OUTPUT_LIMIT: Final = OutputLimit()


class Backend(enum.Enum):
    """The provider wire format a deployment speaks; values are config provider kinds."""

    OPENAI = "openai"
    OPENAI_COMPATIBLE = "openai_compatible"
    MISTRAL = "mistral"
    AZURE = "azure"
    ANTHROPIC = "anthropic"
    GEMINI = "gemini"

    @classmethod
    def of(cls, kind: str) -> Backend:
        """`Backend(kind)` as one dict lookup: a config provider's kind, read per request."""
        backend = _BY_KIND.get(kind)
        return backend if backend is not None else cls(kind)

    @property
    def display_name(self) -> str:
        """The name used in client-facing messages ("... is not supported by Mistral.")."""
        return _DISPLAY_NAMES[self]


_BY_KIND: Final[dict[str, Backend]] = {backend.value: backend for backend in Backend}
_DISPLAY_NAMES = {
    Backend.OPENAI: "OpenAI",
    Backend.OPENAI_COMPATIBLE: "the OpenAI-compatible backend",
    Backend.MISTRAL: "Mistral",
    Backend.AZURE: "Azure OpenAI",
    Backend.ANTHROPIC: "Anthropic",
    Backend.GEMINI: "Gemini",
}


@dataclass(frozen=True, slots=True)
class Usage:
    """Tokens a provider billed for one request.

    `input_tokens` counts the whole prompt, cached parts included (OpenAI's
    `prompt_tokens`; Anthropic's `input_tokens + cache_read_input_tokens +
    cache_creation_input_tokens`); `cached_input_tokens` is the part of it read from the
    provider's prompt cache, priced at the cached-input rate; `cache_write_input_tokens`
    the part written to it (Anthropic `cache_creation_input_tokens`), priced at the
    cache-write rate.
    `unpriced` names billed usage the gateway has no price for (server tools, audio,
    a premium service tier): budgets charge such a request at least its full hold.
    """

    input_tokens: int
    output_tokens: int
    cached_input_tokens: int = 0
    unpriced: tuple[str, ...] = ()
    cache_write_input_tokens: int = 0


@dataclass(frozen=True, slots=True)
class UpstreamRequest:
    """The request to send to the provider.

    `path` is the provider API path (with query string, if any) *without* the provider's
    base-URL prefix; `headers` are the provider-specific headers the body needs (e.g.
    `anthropic-version`), never credentials: the caller adds the prefix and the auth header.
    """

    body: bytes
    path: str
    headers: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True, slots=True)
class TranslatedResponse:
    """A successful non-streamed response in the client's dialect, with its usage."""

    body: bytes
    usage: Usage | None


class StreamProgress:
    """What every stream translator reports besides its bytes (see `StreamTranslator`):
    the usage from the final event, and how many content deltas passed so far."""

    def __init__(self) -> None:
        self._usage: Usage | None = None
        self._deltas = 0

    @property
    def usage(self) -> Usage | None:
        return self._usage

    @property
    def output_tokens_so_far(self) -> int:
        return self._deltas

    @property
    def first_token_seen(self) -> bool:
        return self._deltas > 0


class SseStream(StreamProgress):
    """A stream translator reading the provider's SSE: `feed` and `flush` decode the
    bytes into complete events and `_handle` turns those into the client's bytes."""

    def __init__(self) -> None:
        self._decoder = SseDecoder()
        StreamProgress.__init__(self)

    def feed(self, chunk: bytes) -> bytes:
        return self._handle(self._decoder.feed(chunk))

    def flush(self) -> bytes:
        return self._handle(self._decoder.flush())

    def _handle(self, events: list[SseEvent]) -> bytes:
        raise NotImplementedError


class JsonEventStream(SseStream):
    """An `SseStream` whose provider events are JSON objects, each given to `_event`
    until `_ended` (an error event, or the answer's end): later events are ignored."""

    def __init__(self) -> None:
        self._ended = False
        SseStream.__init__(self)

    def _handle(self, events: list[SseEvent]) -> bytes:
        out: list[bytes] = []
        for data in json_objects(events):
            if self._ended:
                break
            self._event(data, out)
        return b"".join(out)

    def _event(self, data: dict[str, Any], out: list[bytes]) -> None:
        raise NotImplementedError


class StreamTranslator(Protocol):
    """Sans-I/O translation of one SSE response stream, chunk by chunk.

    `feed()` takes the provider's bytes exactly as they arrive (any split) and returns the
    client-dialect SSE bytes ready to send (b"" while an event is incomplete); `flush()`
    is called once at the end of the upstream stream.
    """

    def feed(self, chunk: bytes) -> bytes: ...

    def flush(self) -> bytes: ...

    @property
    def usage(self) -> Usage | None:
        """Usage from the stream's final usage event; None until it arrived."""
        ...

    @property
    def output_tokens_so_far(self) -> int:
        """Content deltas seen so far: the output estimate when a stream is cut short."""
        ...

    @property
    def first_token_seen(self) -> bool:
        """True once the first content (text or tool-call) delta arrived."""
        ...


class Translator(Protocol):
    """One request's translation between a client dialect and a provider.

    A translator is created per request (`base.translator_for`): `request()` is called
    first and remembers what the response side needs (e.g. whether the client asked for
    streamed usage).
    """

    def output_limit(self, body: Mapping[str, Any], *, cap: int) -> int | None:
        """The output-token bound the client asked for in its dialect; None if it set none.

        Raises `GatewayError(ErrorCode.INVALID_REQUEST, ...)` for an invalid or too large
        value (see `translate.limits`).
        """
        ...

    def choices(self, body: Mapping[str, Any]) -> int:
        """How many choices the request makes the provider produce (OpenAI's `n`)."""
        ...

    def input_estimate(self, raw: bytes) -> int:
        """Prompt tokens to hold for the client's raw body (images counted apart)."""
        ...

    def request(
        self, body: dict[str, Any], *, upstream_model: str, api_version: str | None,
        output_limit: OutputLimit = NO_OUTPUT_LIMIT,
    ) -> UpstreamRequest:
        """Validate the client body and build the provider request, its output bound in
        the field the upstream model takes (`output_limit`, see `translate.limits`).

        Raises `GatewayError(ErrorCode.INVALID_REQUEST, ...)` for bad or unsupported input.
        """
        ...

    def response(self, status: int, body: bytes) -> TranslatedResponse:
        """Translate a successful (2xx) JSON response body."""
        ...

    def error(self, status: int, body: bytes, headers: Mapping[str, str]) -> tuple[int, bytes]:
        """Map a provider error (any body) to the client's status and error body."""
        ...

    def stream(self) -> StreamTranslator:
        """A fresh translator for a `text/event-stream` response."""
        ...
