"""The API surface: which HTTP endpoints the gateway serves, and how each backend serves them.

Two explicit tables, read by `phases.py` and kept true in `docs/providers.md` by a test:

* `ENDPOINTS`: (method, path) -> `EndpointSpec` (the client dialect, the body field
  every request must carry, the model kind it takes, whether it is budgeted).
  `GET /v1/models/{id}` matches by prefix.
* `SUPPORT`: (endpoint, backend) -> `Support`: served (the provider's own API, passed
  through), translated (through another API of the provider), gateway (answered by
  the gateway itself), refused (a 400 in the client's dialect naming the endpoint and
  the model; the provider receives nothing).

A new backend is one more column: every endpoint needs a `SUPPORT` entry for it (a unit
test checks), and `translator_for_endpoint` a branch when it is served or translated.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final
from urllib.parse import unquote

from extproc.config import Model, Tenant
from extproc.errors import Dialect, ErrorCode, GatewayError
from extproc.translate.base import Backend, Translator, translator_for
from extproc.translate.count_tokens import (
    COUNT_TOKENS_PATH,
    CountTokensPassthrough,
    estimated_count,
)
from extproc.translate.embeddings import EMBEDDINGS_PATH, EmbeddingsTranslator
from extproc.translate.models_list import model_body, models_body
from extproc.translate.responses import RESPONSES_PATH, ResponsesPassthrough, ResponsesToChat

__all__ = [
    "ENDPOINTS",
    "MODELS_PATH",
    "SUPPORT",
    "Endpoint",
    "EndpointMatch",
    "EndpointSpec",
    "Support",
    "UnknownEndpoint",
    "check_model",
    "gateway_answer",
    "match_endpoint",
    "models_answer",
    "translator_for_endpoint",
]

MODELS_PATH: Final = "/v1/models"


class Endpoint(enum.Enum):
    """What the client called; the value is `RequestProcessor.endpoint` and the audit's."""

    CHAT = "chat"
    MESSAGES = "messages"
    EMBEDDINGS = "embeddings"
    RESPONSES = "responses"
    MODELS = "models"
    COUNT_TOKENS = "count_tokens"


class Support(enum.Enum):
    SERVED = "served"
    TRANSLATED = "translated"
    GATEWAY = "gateway"
    REFUSED = "refused"


@dataclass(frozen=True, slots=True)
class EndpointSpec:
    endpoint: Endpoint
    method: str
    path: str
    dialect: Dialect | None
    """None: chosen per request (`GET /v1/models`, see `match_endpoint`)."""
    body_field: str | None = None
    """The field every body must carry (`messages` must be a non-empty array); None: no body."""
    model_kind: str | None = "chat"
    """The `models.<name>.kind` the endpoint takes; None: no model."""
    budgeted: bool = True
    failover: bool = True

    @property
    def display(self) -> str:
        return f"{self.method} {self.path}"


_SPECS: Final = (
    EndpointSpec(Endpoint.CHAT, "POST", "/v1/chat/completions", Dialect.OPENAI, "messages"),
    EndpointSpec(Endpoint.MESSAGES, "POST", "/v1/messages", Dialect.ANTHROPIC, "messages"),
    EndpointSpec(Endpoint.EMBEDDINGS, "POST", EMBEDDINGS_PATH, Dialect.OPENAI, "input",
                 model_kind="embedding"),
    EndpointSpec(Endpoint.RESPONSES, "POST", RESPONSES_PATH, Dialect.OPENAI, "input"),
    EndpointSpec(Endpoint.COUNT_TOKENS, "POST", COUNT_TOKENS_PATH, Dialect.ANTHROPIC,
                 "messages", budgeted=False, failover=False),
    EndpointSpec(Endpoint.MODELS, "GET", MODELS_PATH, None, model_kind=None, budgeted=False,
                 failover=False),
)
ENDPOINTS: Final[Mapping[tuple[str, str], EndpointSpec]] = {
    (spec.method, spec.path): spec for spec in _SPECS}
_MODEL_PREFIX: Final = MODELS_PATH + "/"

_OPENAI_SHAPED: Final = (Backend.OPENAI, Backend.OPENAI_COMPATIBLE, Backend.MISTRAL,
                         Backend.AZURE)
SUPPORT: Final[Mapping[tuple[Endpoint, Backend], Support]] = {
    **{(Endpoint.CHAT, b): Support.SERVED for b in _OPENAI_SHAPED},
    (Endpoint.CHAT, Backend.ANTHROPIC): Support.TRANSLATED,
    (Endpoint.CHAT, Backend.GEMINI): Support.TRANSLATED,
    **{(Endpoint.MESSAGES, b): Support.TRANSLATED for b in _OPENAI_SHAPED},
    (Endpoint.MESSAGES, Backend.ANTHROPIC): Support.SERVED,
    (Endpoint.MESSAGES, Backend.GEMINI): Support.TRANSLATED,
    **{(Endpoint.EMBEDDINGS, b): Support.SERVED for b in _OPENAI_SHAPED},
    (Endpoint.EMBEDDINGS, Backend.ANTHROPIC): Support.REFUSED,
    # Gemini's embedContent is another API shape, not translated yet.
    (Endpoint.EMBEDDINGS, Backend.GEMINI): Support.REFUSED,
    (Endpoint.RESPONSES, Backend.OPENAI): Support.SERVED,
    (Endpoint.RESPONSES, Backend.AZURE): Support.SERVED,
    (Endpoint.RESPONSES, Backend.MISTRAL): Support.TRANSLATED,
    (Endpoint.RESPONSES, Backend.OPENAI_COMPATIBLE): Support.TRANSLATED,
    (Endpoint.RESPONSES, Backend.ANTHROPIC): Support.TRANSLATED,
    (Endpoint.RESPONSES, Backend.GEMINI): Support.TRANSLATED,
    (Endpoint.COUNT_TOKENS, Backend.ANTHROPIC): Support.SERVED,
    **{(Endpoint.COUNT_TOKENS, b): Support.GATEWAY for b in (*_OPENAI_SHAPED, Backend.GEMINI)},
    **{(Endpoint.MODELS, b): Support.GATEWAY for b in Backend},
}


@dataclass(frozen=True, slots=True)
class EndpointMatch:
    spec: EndpointSpec
    dialect: Dialect
    model_id: str | None = None
    """`GET /v1/models/{id}`: the id asked for."""


def _models_dialect(headers: Mapping[str, str]) -> Dialect:
    """Both SDKs call `GET /v1/models`; only the Anthropic SDK sends `anthropic-version`
    (always), so that header picks the Anthropic shape (decision 0111)."""
    return Dialect.ANTHROPIC if "anthropic-version" in headers else Dialect.OPENAI


def match_endpoint(method: str, path: str, headers: Mapping[str, str]) -> EndpointMatch:
    """The endpoint at `method path` (query string ignored); 404 when there is none.

    The 404 is in the dialect of the door at that path (a wrong method at the Anthropic
    door gets an Anthropic body)."""
    path = path.partition("?")[0]
    spec = ENDPOINTS.get((method, path))
    model_id = None
    if spec is None and method == "GET" and path.startswith(_MODEL_PREFIX):
        model_id = unquote(path[len(_MODEL_PREFIX):])
        if model_id:
            spec = ENDPOINTS[("GET", MODELS_PATH)]
    if spec is None:
        door = next((s.dialect for s in _SPECS if s.path == path), None)
        if path.startswith(MODELS_PATH):
            door = _models_dialect(headers)
        raise UnknownEndpoint(door or Dialect.OPENAI, f"Unknown endpoint: {method} {path[:200]}")
    dialect = spec.dialect if spec.dialect is not None else _models_dialect(headers)
    return EndpointMatch(spec=spec, dialect=dialect, model_id=model_id)


class UnknownEndpoint(GatewayError):
    """A 404 that knows the dialect to answer in."""

    def __init__(self, dialect: Dialect, message: str) -> None:
        super().__init__(ErrorCode.NOT_FOUND, message)
        self.dialect = dialect


def models_answer(match: EndpointMatch, allowed: frozenset[str]) -> bytes:
    """The `GET /v1/models[/{id}]` answer for a principal that may use `allowed` (its
    team's models, else its tenant's: `identity.allowed_models`), in the match's dialect."""
    if match.model_id is not None:
        return model_body(match.model_id, allowed, match.dialect)
    return models_body(allowed, match.dialect)


def check_model(spec: EndpointSpec, model: Model, backend: Backend) -> None:
    """400 when the model is of the wrong kind for the endpoint, or its backend refuses it
    (the provider then receives nothing)."""
    if spec.model_kind is not None and model.kind != spec.model_kind:
        hint = ("use POST /v1/embeddings" if model.kind == "embedding"
                else "it is not an embedding model")
        raise GatewayError(ErrorCode.INVALID_REQUEST,
                           f"The endpoint {spec.display} does not serve the {model.kind} "
                           f"model '{model.name}': {hint}.", param="model")
    if SUPPORT.get((spec.endpoint, backend), Support.REFUSED) is Support.REFUSED:
        raise GatewayError(ErrorCode.INVALID_REQUEST,
                           f"The endpoint {spec.display} is not available for the model "
                           f"'{model.name}': {backend.display_name} does not serve it.",
                           param="model")


def gateway_answer(spec: EndpointSpec, backend: Backend, raw: bytes) -> bytes | None:
    """The body the gateway answers itself for this (endpoint, backend), if it does."""
    if (spec.endpoint is Endpoint.COUNT_TOKENS
            and SUPPORT[(spec.endpoint, backend)] is Support.GATEWAY):
        return estimated_count(raw)
    return None


def translator_for_endpoint(spec: EndpointSpec, dialect: Dialect, backend: Backend, *,
                            tenant: Tenant) -> Translator:
    """A fresh translator for one request at `spec` served by `backend` (after
    `check_model`, so the pair is served or translated)."""
    endpoint = spec.endpoint
    if endpoint is Endpoint.EMBEDDINGS:
        return EmbeddingsTranslator(backend)
    if endpoint is Endpoint.RESPONSES:
        if SUPPORT[(endpoint, backend)] is Support.SERVED:
            return ResponsesPassthrough(backend, store_allowed=tenant.responses_store)
        return ResponsesToChat(backend, store_allowed=tenant.responses_store)
    if endpoint is Endpoint.COUNT_TOKENS:
        return CountTokensPassthrough()
    return translator_for(dialect, backend)
