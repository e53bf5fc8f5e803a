"""POST /v1/embeddings (OpenAI shape) -> OpenAI, Azure OpenAI, Mistral, OpenAI-compatible.

The body keeps the OpenAI wire format; only what a backend needs changes:

* all: `model` becomes the deployment's upstream model (Azure: removed from the body,
  the deployment goes in the path `/openai/deployments/{deployment}/embeddings`).
* `encoding_format` (`float` or `base64`) passes through untouched, and so does the
  answer: the gateway never decodes or re-encodes vectors.
* `mistral`: `dimensions` -> `output_dimension`; token arrays and `user` are refused
  with 400 (Mistral takes strings only).

Budget: an embedding produces no output tokens, so `choices()` is 0 and the hold is the
input estimate alone. The estimate reads the parsed `input`, not the body bytes: a
string counts its UTF-8 bytes / 3 (the gateway's conservative byte rule), a token array
counts exactly its tokens, a batch the sum of its items. The charge is the provider's
`usage.prompt_tokens` at the model's input price.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final

from extproc.budgets.policy import estimate_input_tokens
from extproc.errors import Dialect
from extproc.translate.openai_passthrough import (
    OpenAIPassthroughStream,
    azure_deployment_path,
    place_model,
)
from extproc.translate.provider_errors import map_provider_error
from extproc.translate.types import (
    NO_OUTPUT_LIMIT,
    Backend,
    OutputLimit,
    TranslatedResponse,
    UpstreamRequest,
    Usage,
)
from extproc.translate.validation import compact_json, invalid, json_object, unsupported

__all__ = [
    "EMBEDDINGS_PATH",
    "MAX_EMBEDDING_INPUTS",
    "EmbeddingsTranslator",
    "azure_embeddings_path",
    "embedding_input_tokens",
]

EMBEDDINGS_PATH: Final = "/v1/embeddings"
MAX_EMBEDDING_INPUTS: Final = 2048
"""OpenAI's own bound on the items of one batch."""
_ENCODINGS: Final = ("float", "base64")
_INPUT_HELP: Final = ("'input' must be a non-empty string, an array of strings, an array "
                      "of token ids, or an array of token-id arrays.")


def azure_embeddings_path(deployment: str, api_version: str | None) -> str:
    return azure_deployment_path(deployment, api_version, "embeddings")


def _is_token(value: object) -> bool:
    return type(value) is int and value >= 0


def embedding_input_tokens(value: object) -> tuple[int, bool]:
    """(tokens to hold, whether token ids were sent) for an `input`; 400 if malformed."""
    if isinstance(value, str):
        if not value:
            raise invalid(_INPUT_HELP, "input")
        return estimate_input_tokens(len(value.encode())), False
    if not isinstance(value, list) or not value:
        raise invalid(_INPUT_HELP, "input")
    if len(value) > MAX_EMBEDDING_INPUTS:
        raise invalid(f"'input' must not have more than {MAX_EMBEDDING_INPUTS} items.",
                      "input")
    if all(_is_token(item) for item in value):
        return len(value), True
    total, tokens = 0, False
    for item in value:
        if isinstance(item, str) and item:
            total += estimate_input_tokens(len(item.encode()))
        elif isinstance(item, list) and item and all(_is_token(t) for t in item):
            total += len(item)
            tokens = True
        else:
            raise invalid(_INPUT_HELP, "input")
    return total, tokens


class EmbeddingsTranslator:
    """One embeddings request to an OpenAI-shaped backend."""

    def __init__(self, backend: Backend) -> None:
        if backend is Backend.ANTHROPIC:
            raise ValueError("Anthropic serves no embeddings")
        self.backend = backend
        self._estimate = 0

    def output_limit(self, body: Mapping[str, Any], *, cap: int) -> int | None:
        return None

    def choices(self, body: Mapping[str, Any]) -> int:
        return 0  # no output tokens: the hold is the input estimate

    def input_estimate(self, raw: bytes) -> int:
        return self._estimate

    def request(
        self, body: dict[str, Any], *, upstream_model: str, api_version: str | None,
        output_limit: OutputLimit = NO_OUTPUT_LIMIT,
    ) -> UpstreamRequest:
        request = dict(body)
        self._estimate, token_ids = embedding_input_tokens(request.get("input"))
        encoding = request.get("encoding_format")
        if encoding is not None and encoding not in _ENCODINGS:
            raise invalid("'encoding_format' must be 'float' or 'base64'.", "encoding_format")
        dimensions = request.get("dimensions")
        if dimensions is not None and (type(dimensions) is not int or dimensions < 1):
            raise invalid("'dimensions' must be a positive integer.", "dimensions")
        if self.backend is Backend.MISTRAL:
            if token_ids:
                raise invalid("Token-id arrays in 'input' are not supported by Mistral.",
                              "input")
            if request.get("user") is not None:
                raise unsupported("user", Backend.MISTRAL)
            request.pop("user", None)
            if "dimensions" in request:
                request["output_dimension"] = request.pop("dimensions")
        path = place_model(request, self.backend, upstream_model, api_version,
                           path=EMBEDDINGS_PATH, azure_operation="embeddings")
        return UpstreamRequest(body=compact_json(request), path=path)

    def response(self, status: int, body: bytes) -> TranslatedResponse:
        document = json_object(body)
        usage = document.get("usage") if document is not None else None
        prompt = usage.get("prompt_tokens") if isinstance(usage, dict) else None
        if type(prompt) is not int or prompt < 0:
            return TranslatedResponse(body=body, usage=None)
        return TranslatedResponse(body=body, usage=Usage(input_tokens=prompt, output_tokens=0))

    def error(self, status: int, body: bytes, headers: Mapping[str, str]) -> tuple[int, bytes]:
        return map_provider_error(Dialect.OPENAI, status, body)

    def stream(self) -> OpenAIPassthroughStream:
        """Embeddings never stream; a provider that does is relayed as it is."""
        return OpenAIPassthroughStream(strip_usage_chunk=False)
