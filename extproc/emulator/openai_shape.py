"""OpenAI Chat Completions shape for the provider emulator.

Why: the gateway's OpenAI path must be exercised end to end (auth, validation,
streaming, usage accounting) without a real account, so this module imitates
``POST /v1/chat/completions`` closely enough for the official SDKs, and
deterministically enough for exact assertions in tests and budget checks.

Reply: the configured reply text (default ``"Hello from the emulator."``) split
on whitespace into words.  ``max_completion_tokens`` / ``max_tokens`` (positive
ints; the smaller wins if both are sent) keep only that many words; the
``finish_reason`` is ``"length"`` when words were actually cut, else ``"stop"``.

Usage (deterministic, so token budgets can be asserted exactly):

* ``prompt_tokens = max(1, ceil(total_chars / 4))`` where ``total_chars`` is the
  sum of ``len()`` of every message's text: string ``content``, plus ``text`` of
  content parts whose ``type`` is ``"text"``.  Roles, names, images and tool
  calls count nothing.
* ``completion_tokens`` = number of words returned.
* ``total_tokens = prompt_tokens + completion_tokens``.

Streaming (``"stream": true``) sends Server-Sent Events: a role chunk
(``delta: {"role": "assistant", "content": ""}``), one chunk per word (every word
after the first carries a leading space, so the concatenation equals the
non-streamed text), a chunk with an empty delta and the ``finish_reason``, a
usage chunk with ``"choices": []`` only when ``stream_options.include_usage`` is
true, and finally ``data: [DONE]``.

Errors follow OpenAI's ``{"error": {"message", "type", "param", "code"}}`` shape.
Messages never contain the presented API key (real OpenAI echoes a masked key;
we deliberately do not, because tests grep responses for canary secrets).

The core (:mod:`extproc.emulator.app`) registers the functions below in its
shape table; this module imports the core only for type checking.
"""

from __future__ import annotations

import json
import math
import time
from typing import TYPE_CHECKING, Any, Final

from aiohttp import web

if TYPE_CHECKING:
    from collections.abc import Mapping

    from extproc.emulator.app import CallContext, EmulatorState

__all__ = [
    "KNOWN_REQUEST_FIELDS",
    "ROUTES",
    "auth_error",
    "authenticate",
    "chat_completions",
    "error_body",
    "not_found",
    "prompt_tokens",
]

# Top-level Chat Completions request fields the real API accepts.  Anything else
# is rejected the way OpenAI does ("Unrecognized request argument supplied").
KNOWN_REQUEST_FIELDS: Final = frozenset(
    {
        "model",
        "messages",
        "max_tokens",
        "max_completion_tokens",
        "temperature",
        "top_p",
        "n",
        "stream",
        "stream_options",
        "stop",
        "presence_penalty",
        "frequency_penalty",
        "logit_bias",
        "logprobs",
        "top_logprobs",
        "user",
        "seed",
        "tools",
        "tool_choice",
        "parallel_tool_calls",
        "response_format",
        "service_tier",
        "store",
        "metadata",
        "modalities",
        "reasoning_effort",
        "prediction",
        "audio",
    }
)
_ROLES: Final = ("system", "developer", "user", "assistant", "tool", "function")
_INVALID_REQUEST: Final = "invalid_request_error"
_BAD_JSON: Final = (
    "We could not parse the JSON body of your request. (HINT: This likely means you "
    "aren't using your HTTP library correctly. The OpenAI API expects a JSON payload, "
    "but what was sent was not valid JSON.)"
)


class _Invalid(Exception):
    """A 400 validation failure, carrying OpenAI's ``message`` and ``param``."""

    def __init__(self, message: str, param: str | None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


# --------------------------------------------------------------------------- errors


def _error(
    message: str, type_: str, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def auth_error() -> dict[str, Any]:
    """The 401 body; fixed text so no part of the presented key can leak."""
    return _error("Incorrect API key provided.", _INVALID_REQUEST, None, "invalid_api_key")


def error_body(status: int, message: str | None) -> dict[str, Any]:
    """OpenAI-shaped error for ``status``; ``message=None`` picks a realistic text."""
    if status == 401:
        return auth_error() if message is None else _error(message, _INVALID_REQUEST)
    if status == 429:
        return _error(
            message or "Rate limit reached for requests. Please try again in 1s.",
            "requests",
            None,
            "rate_limit_exceeded",
        )
    if status >= 500:
        return _error(
            message or "The server had an error while processing your request. Sorry about that!",
            "server_error",
        )
    return _error(message or f"Emulated error (HTTP {status}).", _INVALID_REQUEST)


def not_found(method: str, path: str) -> dict[str, Any]:
    return _error(f"Invalid URL ({method} {path})", _INVALID_REQUEST)


def _json(body: Mapping[str, Any], status: int = 200) -> web.Response:
    return web.Response(
        body=json.dumps(body, separators=(",", ":")).encode(),
        status=status,
        content_type="application/json",
    )


# --------------------------------------------------------------------------- auth


def authenticate(request: web.Request, state: EmulatorState) -> bool:
    """``Authorization: Bearer <key>`` with ``<key>`` in the current key set."""
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    token = token.strip()
    return scheme.lower() == "bearer" and bool(token) and state.key_is_valid(token)


# --------------------------------------------------------------------------- validation


def _type_name(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object"


def _bad_type(param: str, expected: str, value: object) -> _Invalid:
    return _Invalid(
        f"Invalid type for '{param}': expected {expected}, but got {_type_name(value)} instead.",
        param,
    )


def _text_chars(content: object) -> int:
    if isinstance(content, str):
        return len(content)
    if isinstance(content, list):
        return sum(
            len(part["text"])
            for part in content
            if isinstance(part, dict)
            and part.get("type") == "text"
            and isinstance(part.get("text"), str)
        )
    return 0


def prompt_tokens(messages: list[dict[str, Any]]) -> int:
    """``max(1, ceil(total_chars / 4))`` over all message text (see module docstring)."""
    total = sum(_text_chars(message.get("content")) for message in messages)
    return max(1, math.ceil(total / 4))


def _validate_content_parts(param: str, parts: list[Any]) -> None:
    if not parts:
        raise _Invalid(
            f"Invalid '{param}': empty array. Expected an array with minimum length 1, "
            "but got an empty array instead.",
            param,
        )
    for j, part in enumerate(parts):
        part_param = f"{param}[{j}]"
        if not isinstance(part, dict):
            raise _bad_type(part_param, "an object", part)
        part_type = part.get("type")
        if not isinstance(part_type, str):
            raise _Invalid(f"Missing required parameter: '{part_param}.type'.", part_param)
        if part_type == "text" and not isinstance(part.get("text"), str):
            raise _bad_type(f"{part_param}.text", "a string", part.get("text"))


def _validate_message(i: int, message: object) -> None:
    param = f"messages[{i}]"
    if not isinstance(message, dict):
        raise _bad_type(param, "an object", message)
    role = message.get("role")
    if role is None:
        raise _Invalid(f"Missing required parameter: '{param}.role'.", f"{param}.role")
    if not isinstance(role, str):
        raise _bad_type(f"{param}.role", "a string", role)
    if role not in _ROLES:
        supported = ", ".join(f"'{r}'" for r in _ROLES)
        raise _Invalid(
            f"Invalid value for '{param}.role'. Supported values are: {supported}.",
            f"{param}.role",
        )
    content = message.get("content")
    if isinstance(content, str):
        return
    if isinstance(content, list):
        _validate_content_parts(f"{param}.content", content)
        return
    if content is None:
        # Only an assistant turn that carries tool/function calls may omit content.
        if role == "assistant" and (message.get("tool_calls") or message.get("function_call")):
            return
        if "content" not in message:
            raise _Invalid(f"Missing required parameter: '{param}.content'.", f"{param}.content")
    raise _bad_type(f"{param}.content", "one of a string or array of objects", content)


def _positive_int(body: Mapping[str, Any], name: str) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise _bad_type(name, "an integer", value)
    if value < 1:
        raise _Invalid(
            f"Invalid '{name}': integer below minimum value. Expected a value >= 1, "
            f"but got {value} instead.",
            name,
        )
    return value


class _ChatRequest:
    """The validated subset of a request that shapes the reply."""

    __slots__ = ("include_usage", "max_words", "messages", "model", "stream")

    def __init__(self, body: Mapping[str, Any]) -> None:
        for name in body:
            if name not in KNOWN_REQUEST_FIELDS:
                raise _Invalid(f"Unrecognized request argument supplied: {name}", None)
        model = body.get("model")
        if model is None:
            raise _Invalid("you must provide a model parameter", "model")
        if not isinstance(model, str) or not model:
            raise _bad_type("model", "a non-empty string", model)
        messages = body.get("messages")
        if messages is None:
            raise _Invalid("Missing required parameter: 'messages'.", "messages")
        if not isinstance(messages, list):
            raise _bad_type("messages", "an array", messages)
        if not messages:
            raise _Invalid(
                "Invalid 'messages': empty array. Expected an array with minimum length 1, "
                "but got an empty array instead.",
                "messages",
            )
        for i, message in enumerate(messages):
            _validate_message(i, message)
        limits = [
            limit
            for limit in (
                _positive_int(body, "max_completion_tokens"),
                _positive_int(body, "max_tokens"),
            )
            if limit is not None
        ]
        stream = body.get("stream")
        if stream is not None and not isinstance(stream, bool):
            raise _bad_type("stream", "a boolean", stream)
        stream_options = body.get("stream_options")
        include_usage = False
        if stream_options is not None:
            if not isinstance(stream_options, dict):
                raise _bad_type("stream_options", "an object", stream_options)
            if not stream:
                raise _Invalid(
                    "The 'stream_options' parameter is only allowed when 'stream' is enabled.",
                    "stream_options",
                )
            flag = stream_options.get("include_usage")
            if flag is not None and not isinstance(flag, bool):
                raise _bad_type("stream_options.include_usage", "a boolean", flag)
            include_usage = bool(flag)
        self.model: str = model
        self.messages: list[dict[str, Any]] = messages
        self.max_words: int | None = min(limits) if limits else None
        self.stream: bool = bool(stream)
        self.include_usage: bool = include_usage


# --------------------------------------------------------------------------- handler


def _sse(payload: Mapping[str, Any] | str) -> bytes:
    data = payload if isinstance(payload, str) else json.dumps(payload, separators=(",", ":"))
    return f"data: {data}\n\n".encode()


async def chat_completions(request: web.Request, ctx: CallContext) -> web.StreamResponse:
    """``POST /v1/chat/completions``; auth and faults were already applied by the core."""
    raw = await request.read()
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return _json(_error(_BAD_JSON, _INVALID_REQUEST), status=400)
    if not isinstance(body, dict):
        return _json(_error("The request body must be a JSON object.", _INVALID_REQUEST), 400)
    try:
        chat = _ChatRequest(body)
    except _Invalid as exc:
        return _json(_error(exc.message, _INVALID_REQUEST, exc.param), status=400)

    words = ctx.config.reply.split()
    finish_reason = "stop"
    if chat.max_words is not None and len(words) > chat.max_words:
        words = words[: chat.max_words]
        finish_reason = "length"
    prompt = prompt_tokens(chat.messages)
    usage = {
        "prompt_tokens": prompt,
        "completion_tokens": len(words),
        "total_tokens": prompt + len(words),
    }
    completion_id = f"chatcmpl-emu-{ctx.state.next_id()}"
    created = int(time.time())

    if not chat.stream:
        return _json(
            {
                "id": completion_id,
                "object": "chat.completion",
                "created": created,
                "model": chat.model,
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": " ".join(words)},
                        "finish_reason": finish_reason,
                    }
                ],
                "usage": usage,
            }
        )

    def chunk(delta: dict[str, str], finish: str | None) -> bytes:
        return _sse(
            {
                "id": completion_id,
                "object": "chat.completion.chunk",
                "created": created,
                "model": chat.model,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
            }
        )

    events = [chunk({"role": "assistant", "content": ""}, None)]
    events.extend(chunk({"content": w if i == 0 else f" {w}"}, None) for i, w in enumerate(words))
    events.append(chunk({}, finish_reason))
    if chat.include_usage:
        events.append(
            _sse(
                {
                    "id": completion_id,
                    "object": "chat.completion.chunk",
                    "created": created,
                    "model": chat.model,
                    "choices": [],
                    "usage": usage,
                }
            )
        )
    events.append(_sse("[DONE]"))

    resp = await ctx.open_stream()
    for event in events:
        if not await ctx.send_event(resp, event):
            break
    return resp


ROUTES: Final = (("POST", "/v1/chat/completions", chat_completions),)
