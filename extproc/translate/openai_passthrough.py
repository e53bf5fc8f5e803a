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
* `openai`, `openai_compatible`, `azure`: the output limit goes in the field the upstream
  model takes (`translate.limits`): for o-series and gpt-5 models (or
  `output_limit_field: max_completion_tokens`) a client's `max_tokens` becomes
  `max_completion_tokens` (the smaller wins when both are sent); with an explicitly
  configured `max_tokens` the other way round; otherwise both pass as sent.
* all: a limit the gateway must impose (budget tenants whose request sets none) is
  written in that field (`max_tokens` for Mistral).
* `openai`, `openai_compatible`: otherwise passed through as they are.

Responses pass through unchanged (the bytes the provider sent); usage is read from
`usage.prompt_tokens`, `usage.completion_tokens`, `usage.prompt_tokens_details.cached_tokens`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any, Final
from urllib.parse import quote

from extproc.errors import Dialect
from extproc.translate import limits
from extproc.translate.provider_errors import map_provider_error, scrubbed_error_event
from extproc.translate.sse import SseEvent, encode_event
from extproc.translate.types import (
    NO_OUTPUT_LIMIT,
    Backend,
    OutputLimit,
    SseStream,
    TranslatedResponse,
    UpstreamRequest,
)
from extproc.translate.usage import usage_from_openai
from extproc.translate.validation import (
    compact_json,
    json_object,
    optional_positive_int,
    stream_options,
    unsupported,
    validate_openai_door,
)

__all__ = [
    "CHAT_COMPLETIONS_PATH",
    "DEFAULT_AZURE_API_VERSION",
    "MISTRAL_UNSUPPORTED",
    "OpenAIPassthrough",
    "OpenAIPassthroughStream",
    "azure_deployment_path",
    "azure_path",
    "count_openai_deltas",
    "place_model",
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


def azure_deployment_path(deployment: str, api_version: str | None, operation: str) -> str:
    """Azure OpenAI names the deployment in the path and the API version in the query."""
    version = api_version or DEFAULT_AZURE_API_VERSION
    return (f"/openai/deployments/{quote(deployment, safe='')}/{operation}"
            f"?api-version={quote(version, safe='')}")


def azure_path(deployment: str, api_version: str | None) -> str:
    return azure_deployment_path(deployment, api_version, "chat/completions")


def place_model(request: dict[str, Any], backend: Backend, upstream_model: str,
                api_version: str | None, *, path: str, azure_operation: str) -> str:
    """Put the upstream model where the backend reads it and return the request path:
    Azure's is the deployment in the path (the body's `model` removed), any other's is
    `model` in the body, sent to `path`."""
    if backend is Backend.AZURE:
        request.pop("model", None)
        return azure_deployment_path(upstream_model, api_version, azure_operation)
    request["model"] = upstream_model
    return path


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


class OpenAIPassthroughStream(SseStream):
    """Reads usage and deltas off an OpenAI-shaped stream while forwarding it.

    Complete events are re-framed (an event split over chunks leaves with its last
    part); the usage-only chunk is dropped when the client did not ask for it, and an
    in-stream `error` chunk is scrubbed like an error body (`scrubbed_stream_error`).
    """

    def __init__(self, *, strip_usage_chunk: bool) -> None:
        self._strip = strip_usage_chunk
        SseStream.__init__(self)

    def _handle(self, events: list[SseEvent]) -> bytes:
        kept: list[bytes] = []
        for event in events:
            chunk = self._read(event.data)
            if chunk is None:
                kept.append(encode_event(event.data, event.event))
            elif chunk.get("error") is not None:
                kept.append(scrubbed_error_event(chunk["error"], Dialect.OPENAI, event.event))
            elif not (self._strip and self._usage_only(chunk)):
                kept.append(encode_event(event.data, event.event))
        return b"".join(kept)

    def _read(self, data: str) -> dict[str, Any] | None:
        """Record usage and deltas; the chunk when it is a JSON object."""
        if data == "[DONE]":
            return None
        try:
            chunk = json.loads(data)
        except ValueError:
            return None
        if not isinstance(chunk, dict):
            return None
        usage = usage_from_openai(chunk.get("usage"), service_tier=chunk.get("service_tier"))
        if usage is not None:
            self._usage = usage
        self._deltas += count_openai_deltas(chunk)
        return chunk

    @staticmethod
    def _usage_only(chunk: Mapping[str, Any]) -> bool:
        return chunk.get("usage") is not None and chunk.get("choices") == []


def _merge_limits(request: dict[str, Any], field: str) -> None:
    """Both output-limit fields folded into `field` (the smaller wins)."""
    present = [optional_positive_int(request, name) for name in limits.OPENAI_LIMIT_FIELDS]
    bounds = [value for value in present if value is not None]
    for name in limits.OPENAI_LIMIT_FIELDS:
        request.pop(name, None)
    if bounds:
        request[field] = min(bounds)


def _write_limit(request: dict[str, Any], field: str, default: int | None) -> None:
    if default is not None and not any(name in request for name in limits.OPENAI_LIMIT_FIELDS):
        request[field] = default


class OpenAIPassthrough(limits.OpenAIDoorRules):
    """One request through the OpenAI door to an OpenAI-shaped backend."""

    def __init__(self, backend: Backend) -> None:
        if backend is Backend.ANTHROPIC:
            raise ValueError("OpenAIPassthrough serves OpenAI-shaped backends only")
        self.backend = backend
        self._client_wants_usage = False

    def request(
        self, body: dict[str, Any], *, upstream_model: str, api_version: str | None,
        output_limit: OutputLimit = NO_OUTPUT_LIMIT,
    ) -> UpstreamRequest:
        request = dict(validate_openai_door(body))
        stream = request.get("stream") is True
        options, self._client_wants_usage = stream_options(request)
        if self.backend is Backend.MISTRAL:
            self._to_mistral(request)
            _write_limit(request, limits.MAX_TOKENS, output_limit.default)
        else:
            field = output_limit.field or limits.family_output_field(upstream_model)
            if output_limit.field is not None or field == limits.MAX_COMPLETION_TOKENS:
                _merge_limits(request, field)
            _write_limit(request, field, output_limit.default)
        if self.backend is not Backend.MISTRAL and stream:
            request["stream_options"] = {**(options or {}), "include_usage": True}
        path = place_model(request, self.backend, upstream_model, api_version,
                           path=CHAT_COMPLETIONS_PATH, azure_operation="chat/completions")
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
        document = json_object(body)
        usage = usage_from_openai(document.get("usage"), service_tier=document.get(
            "service_tier")) if document is not None else None
        return TranslatedResponse(body=body, usage=usage)

    def error(self, status: int, body: bytes, headers: Mapping[str, str]) -> tuple[int, bytes]:
        return map_provider_error(Dialect.OPENAI, status, body)

    def stream(self) -> OpenAIPassthroughStream:
        strip = self.backend is not Backend.MISTRAL and not self._client_wants_usage
        return OpenAIPassthroughStream(strip_usage_chunk=strip)
