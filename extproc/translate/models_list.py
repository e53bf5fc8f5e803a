"""GET /v1/models and GET /v1/models/{id}: the models one tenant may use, from config.

Answered by the gateway itself (no provider is asked: a provider lists what the
gateway's account may use, not what a tenant may). Only the calling tenant's `models`
appear, sorted by name; an id the tenant may not use is the same 404 as one that does
not exist, so a tenant cannot probe other tenants' model names.

Two shapes on the same path (both SDKs call `GET /v1/models`), told apart by the
`anthropic-version` header, which the Anthropic SDK always sends and the OpenAI SDK
never does (decision 0111):

* OpenAI: `{"object": "list", "data": [{"id", "object": "model", "created": 0,
  "owned_by": "asc"}]}`; retrieve: one such object.
* Anthropic: `{"data": [{"type": "model", "id", "display_name", "created_at"}],
  "has_more": false, "first_id", "last_id"}`; retrieve: one such object. The whole list
  is one page (a tenant's list is short): `limit`, `after_id`, `before_id` are ignored.

`created` / `created_at` are the Unix epoch: config carries no release dates.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Final

from extproc.errors import Dialect, ErrorCode, GatewayError
from extproc.translate.validation import compact_json

__all__ = ["MODELS_OWNER", "model_body", "models_body"]

MODELS_OWNER: Final = "asc"
_EPOCH: Final = "1970-01-01T00:00:00Z"


def _entry(name: str, dialect: Dialect) -> dict[str, Any]:
    if dialect is Dialect.ANTHROPIC:
        return {"type": "model", "id": name, "display_name": name, "created_at": _EPOCH}
    return {"id": name, "object": "model", "created": 0, "owned_by": MODELS_OWNER}


def models_body(allowed: Iterable[str], dialect: Dialect) -> bytes:
    """The list answer for a tenant whose models are `allowed`."""
    names = sorted(allowed)
    data = [_entry(name, dialect) for name in names]
    if dialect is Dialect.ANTHROPIC:
        return compact_json({"data": data, "has_more": False,
                             "first_id": names[0] if names else None,
                             "last_id": names[-1] if names else None})
    return compact_json({"object": "list", "data": data})


def model_body(model_id: str, allowed: frozenset[str], dialect: Dialect) -> bytes:
    """The retrieve answer; 404 in the client's dialect when the tenant may not use it."""
    if model_id not in allowed:
        shown = model_id if len(model_id) <= 64 else model_id[:64] + "..."
        raise GatewayError(ErrorCode.MODEL_NOT_FOUND,
                           f"The model '{shown}' does not exist or you do not have access "
                           "to it.", param="model")
    return compact_json(_entry(model_id, dialect))
