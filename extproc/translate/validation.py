"""Request checks shared by every translator, and the one way to say "not supported".

Every failure is a `GatewayError(ErrorCode.INVALID_REQUEST, message, param=...)`; the
caller renders it in the client's dialect with `extproc.errors.error_body`. Messages are
fixed text plus parameter names: client values are never echoed.

Door checks (before any pair-specific work):

* both doors: the body is a JSON object; `model` is a non-empty string; `messages` is a
  non-empty array; `stream`, when present, is a boolean.
* Anthropic door: `max_tokens` is a positive integer (the Messages API requires it).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any, Final

from extproc.errors import ErrorCode, GatewayError
from extproc.translate.types import Backend

__all__ = [
    "compact_json",
    "invalid",
    "json_object",
    "optional_bool",
    "optional_number",
    "optional_positive_int",
    "optional_stop",
    "optional_string",
    "stream_options",
    "unsupported",
    "validate_anthropic_door",
    "validate_openai_door",
]

_SEPARATORS: Final = (",", ":")


def compact_json(value: object) -> bytes:
    """The JSON bytes the gateway sends: compact, UTF-8, non-ASCII kept as is."""
    return json.dumps(value, separators=_SEPARATORS, ensure_ascii=False).encode()


def json_object(body: bytes) -> dict[str, Any] | None:
    """A provider's answer body as a JSON object; None when it is not one."""
    try:
        document = json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError):  # nested past the parser
        return None
    return document if isinstance(document, dict) else None


def invalid(message: str, param: str | None = None) -> GatewayError:
    return GatewayError(ErrorCode.INVALID_REQUEST, message, param=param)


def unsupported(param: str, backend: Backend) -> GatewayError:
    """The 400 for a parameter (or a value of it) the target provider cannot honour."""
    return invalid(f"The parameter '{param}' is not supported by {backend.display_name}.", param)


def optional_bool(body: Mapping[str, Any], name: str, param: str | None = None) -> bool | None:
    value = body.get(name)
    if value is None or isinstance(value, bool):
        return value
    where = param or name
    raise invalid(f"'{where}' must be a boolean.", where)


def optional_number(
    body: Mapping[str, Any], name: str, param: str | None = None
) -> int | float | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        where = param or name
        raise invalid(f"'{where}' must be a number.", where)
    return value


def optional_positive_int(
    body: Mapping[str, Any], name: str, param: str | None = None
) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        where = param or name
        raise invalid(f"'{where}' must be a positive integer.", where)
    return value


def optional_string(body: Mapping[str, Any], name: str, param: str | None = None) -> str | None:
    value = body.get(name)
    if value is None or isinstance(value, str):
        return value
    where = param or name
    raise invalid(f"'{where}' must be a string.", where)


def optional_stop(body: Mapping[str, Any], name: str) -> list[str] | None:
    """`stop`/`stop_sequences`: a string or an array of strings (null means none)."""
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(item, str) for item in value):
        return list(value)
    raise invalid(f"'{name}' must be a string or an array of strings.", name)


def _common_door(body: object) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise invalid("The request body must be a JSON object.")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise invalid("'model' must be a non-empty string.", "model")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise invalid("'messages' must be a non-empty array.", "messages")
    optional_bool(body, "stream")
    return body


def stream_options(body: Mapping[str, Any]) -> tuple[dict[str, Any] | None, bool]:
    """A Chat Completions body's `stream_options` (checked to be an object) and whether
    the client asked for the usage chunk (`include_usage: true`)."""
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise invalid("'stream_options' must be an object.", "stream_options")
    include = optional_bool(options or {}, "include_usage", "stream_options.include_usage")
    return options, include is True


def validate_openai_door(body: object) -> dict[str, Any]:
    """Checks every Chat Completions request passes, whatever the backend."""
    return _common_door(body)


def validate_anthropic_door(body: object) -> dict[str, Any]:
    """Checks every Messages request passes, whatever the backend."""
    request = _common_door(body)
    if optional_positive_int(request, "max_tokens") is None:
        raise invalid("'max_tokens' must be a positive integer.", "max_tokens")
    return request
