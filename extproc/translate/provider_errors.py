"""Provider error responses mapped to the client's dialect.

One table for every pair, applied in this order:

* 401, 403 -> 502 "The provider rejected the gateway's credential."
* 529 (Anthropic overloaded) -> 503 "The provider is overloaded; retry later."
* a body that is not a JSON object (HTML proxy pages, empty bodies, ...) -> 502
  "The provider failed with status N."
* 400, 422 (Mistral validation) -> 400 with the provider's message, else
  "The provider rejected the request."
* 404 -> 404 with the provider's message, else
  "The provider could not find the requested resource."
* 413 -> 413 with the provider's message, else "The request is too large for the provider."
* 429 -> 429 with the provider's message, else
  "The provider's rate limit was reached; retry later."
* anything else (5xx, other 4xx) -> 502 "The provider failed with status N."

The provider's message is looked up in the shapes providers use (`error.message` for
OpenAI, Azure and Anthropic; `message` for Mistral and vLLM; `error` as a string for
Ollama and TGI; Mistral's 422 `message.detail[].loc/msg`), then scrubbed: anything that
looks like a credential (`sk-...`-style keys, `Bearer ...`, masked keys with `***`,
opaque runs of 32+ letters/digits) becomes `[redacted]`, and so do the ids of the
gateway's provider account (`org-...`, `proj_...`, UUIDs) and its quota figures
("Limit 10000, Used 9990"); it is cut to 500 characters.
A 429 never shows the provider's text: it describes the limits of the shared account
(organization, limit, used), which are not the client's business.
The caller keeps a 429's `retry-after` with `retry_after_headers()`.

Provider text is hostile input: it is cut to a bound *before* any pattern runs, and
every pattern is linear (no unbounded run that is retried from every position).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any, Final

from extproc.errors import Dialect, ErrorCode, GatewayError, error_body
from extproc.translate.sse import encode_event
from extproc.translate.validation import compact_json, json_object

__all__ = [
    "STREAM_ERROR_FALLBACK",
    "invalid_response",
    "map_provider_error",
    "provider_document",
    "provider_message",
    "retry_after_headers",
    "scrub",
    "scrubbed_error_event",
    "scrubbed_stream_error",
]

_MAX_MESSAGE: Final = 500
_MAX_SCANNED: Final = 4 * _MAX_MESSAGE
"""Characters of provider text looked at at all: enough for any message worth showing."""
_REDACTED: Final = "[redacted]"
_SECRET_PATTERNS: Final = (
    re.compile(r"(?i)\bbearer\s+\S+"),
    re.compile(r"(?i)\b(?:sk|pk|rk|ak|key)[-_][A-Za-z0-9_\-]{6,}"),
    re.compile(r"(?i)\b(?:org|proj)[-_][A-Za-z0-9]{4,}"),
    re.compile(r"(?i)\b[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}\b"),
    re.compile(r"[A-Za-z0-9+/=_]{32,}"),
)
_TOKEN: Final = re.compile(r"\S+")
_ACCOUNT_FIGURE: Final = re.compile(
    r"(?i)\b(limit|used|requested|remaining)(\s*[:=]?\s*)[0-9](?:[0-9,._]*[0-9])?")
"""The shared account's quota figures ("Limit 10000, Used 9990, Requested 20")."""
_RETRY_AFTER: Final = re.compile(r"[0-9A-Za-z ,:.\-]{1,64}")

_CLIENT_ERRORS: Final[dict[int, tuple[ErrorCode, str]]] = {
    400: (ErrorCode.INVALID_REQUEST, "The provider rejected the request."),
    422: (ErrorCode.INVALID_REQUEST, "The provider rejected the request."),
    404: (ErrorCode.NOT_FOUND, "The provider could not find the requested resource."),
    413: (ErrorCode.PAYLOAD_TOO_LARGE, "The request is too large for the provider."),
    429: (ErrorCode.RATE_LIMITED, "The provider's rate limit was reached; retry later."),
}


def _masked(token: re.Match[str]) -> str:
    """A whitespace-delimited token holding `***` is a masked key (`sk-ab***yz`)."""
    word = token.group()
    return _REDACTED if "***" in word else word


def scrub(text: str) -> str:
    """Remove anything credential-like from provider text and bound its length.

    The text is cut first, so the work is bounded whatever the provider sent; a cut
    token is dropped whole, since it may be the head of a secret too short to match.
    """
    cut = len(text) > _MAX_SCANNED
    if cut:
        text = text[:_MAX_SCANNED]
        text = text[: max(text.rfind(" "), text.rfind("\n"), text.rfind("\t"), 0)]
    for pattern in _SECRET_PATTERNS:
        text = pattern.sub(_REDACTED, text)
    text = _TOKEN.sub(_masked, text)
    text = _ACCOUNT_FIGURE.sub(r"\1\2[redacted]", text)
    text = " ".join(text.split())
    if cut:
        text = f"{text} ..." if text else "..."
    if len(text) > _MAX_MESSAGE:
        text = text[: _MAX_MESSAGE - 3] + "..."
    return text


def _detail_message(detail: object) -> str | None:
    """Mistral/FastAPI validation details: "body.user: Extra inputs are not permitted"."""
    if not isinstance(detail, list):
        return None
    parts = []
    for item in detail:
        if not isinstance(item, dict) or not isinstance(item.get("msg"), str):
            continue
        loc = item.get("loc")
        where = ".".join(str(p) for p in loc) if isinstance(loc, list) else ""
        parts.append(f"{where}: {item['msg']}" if where else item["msg"])
    return "; ".join(parts) or None


def provider_message(document: Mapping[str, Any]) -> str | None:
    """The human-readable message of a provider error body, unscrubbed; None if absent."""
    error = document.get("error")
    if isinstance(error, dict):
        message = error.get("message")
        if isinstance(message, str) and message:
            return message
    if isinstance(error, str) and error:
        return error
    message = document.get("message")
    if isinstance(message, str) and message:
        return message
    if isinstance(message, dict):
        return _detail_message(message.get("detail"))
    return _detail_message(document.get("detail"))


def _json_object(body: bytes) -> dict[str, Any] | None:
    try:
        document = json.loads(body)
    except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
        return None
    return document if isinstance(document, dict) else None


def invalid_response() -> GatewayError:
    """The error for a provider answer a translator cannot read (a 502 to the client)."""
    return GatewayError(ErrorCode.PROVIDER_ERROR, "The provider sent an invalid response.")


def provider_document(body: bytes) -> dict[str, Any]:
    """A successful answer body that a translator rewrites: it must be a JSON object."""
    document = json_object(body)
    if document is None:
        raise invalid_response()
    return document


def map_provider_error(front: Dialect, status: int, body: bytes) -> tuple[int, bytes]:
    """The client status and error body for a provider's failed response."""
    error: GatewayError
    if status in (401, 403):
        error = GatewayError(ErrorCode.PROVIDER_ERROR,
                             "The provider rejected the gateway's credential.")
    elif status == 529:
        error = GatewayError(ErrorCode.UNAVAILABLE, "The provider is overloaded; retry later.")
    else:
        document = _json_object(body)
        client = _CLIENT_ERRORS.get(status)
        if document is None or client is None:
            error = GatewayError(ErrorCode.PROVIDER_ERROR,
                                 f"The provider failed with status {status}.")
        else:
            code, fallback = client
            found = provider_message(document) if status != 429 else None
            message = scrub(found) if found else ""
            error = GatewayError(code, message or fallback)
    return error.status, error_body(error, front)


STREAM_ERROR_FALLBACK: Final = "The provider failed while streaming."
_ERROR_WORD: Final = re.compile(r"[A-Za-z0-9_.\-]{1,64}")


def scrubbed_stream_error(error: object) -> dict[str, Any]:
    """An in-stream `error` object of a passthrough stream, as the client may see it: the
    message scrubbed like an error body's, `type`/`code` kept only when they are short
    words, anything else dropped."""
    found = provider_message({"error": error})
    out: dict[str, Any] = {"message": (scrub(found) if found else "") or STREAM_ERROR_FALLBACK}
    if isinstance(error, dict):
        for name in ("type", "code"):
            value = error.get(name)
            if isinstance(value, str) and _ERROR_WORD.fullmatch(value):
                out[name] = value
    return out


def scrubbed_error_event(error: object, dialect: Dialect, event: str | None) -> bytes:
    """The event a client gets for a provider's in-stream `error` object: OpenAI
    `data: {"error": {...}}`, Anthropic `{"type": "error", "error": {...}}`, the object
    as `scrubbed_stream_error` leaves it. (The fast path's Lua filter builds the same
    shape with the fixed message: decision 0138.)"""
    scrubbed = scrubbed_stream_error(error)
    document = {"type": "error", "error": scrubbed} if dialect is Dialect.ANTHROPIC \
        else {"error": scrubbed}
    return encode_event(compact_json(document).decode(), event)


def retry_after_headers(headers: Mapping[str, str]) -> tuple[tuple[str, str], ...]:
    """The provider's `retry-after` (seconds or HTTP date), to keep on a mapped 429/503."""
    for name, value in headers.items():
        if name.lower() == "retry-after":
            value = value.strip()
            if _RETRY_AFTER.fullmatch(value):
                return (("retry-after", value),)
    return ()
