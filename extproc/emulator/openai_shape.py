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

Tool calls: when the request has ``tools``, ``tool_choice`` is not ``"none"`` and the
*last* message is a user message whose text contains the word "weather"
(case-insensitive), the reply is one deterministic tool call instead of text:
``get_weather`` (or the first tool when none has that name) with arguments
``{"city":"Paris"}``, ``finish_reason: "tool_calls"``, ``content: null`` and
``completion_tokens = ceil(len(arguments) / 4)`` = 4.  Streamed, it is one chunk with
the call's index, id, type, name and empty arguments, then the arguments in two
fragments.  A tool result as the last message gets the normal text reply.

Reasoning models (``o1``, ``o3-mini``, ``o4-mini``, ... and ``gpt-5*``; for Azure the
deployment name) refuse ``max_tokens`` as OpenAI does: 400 "Unsupported parameter:
'max_tokens' is not supported with this model. Use 'max_completion_tokens' instead."
(param ``max_tokens``, code ``unsupported_parameter``).

Errors follow OpenAI's ``{"error": {"message", "type", "param", "code"}}`` shape.
Messages never contain the presented API key (real OpenAI echoes a masked key;
we deliberately do not, because tests grep responses for canary secrets).

The core (:mod:`extproc.emulator.app`) registers the functions below in its
shape table; this module imports the core only for type checking.
"""

from __future__ import annotations

import json
import math
import re
import time
from typing import TYPE_CHECKING, Any, Final

from aiohttp import web

from extproc.emulator import api_surface

if TYPE_CHECKING:
    from collections.abc import Mapping

    from extproc.emulator.app import CallContext, EmulatorState

__all__ = [
    "EMULATED_ORGANIZATION",
    "KNOWN_REQUEST_FIELDS",
    "ROUTES",
    "WEATHER_ARGUMENTS",
    "WEATHER_TOOL",
    "ChatRequest",
    "InvalidRequest",
    "auth_error",
    "authenticate",
    "chat_completions",
    "error_body",
    "not_found",
    "parse_body",
    "prompt_tokens",
    "send_reply",
    "weather_tool_call",
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
EMULATED_ORGANIZATION: Final = "org-emulat0r5hared4cc0unt"
"""The account id the emulator names in 429 texts and `openai-organization` headers."""
_REASONING_MODEL: Final = re.compile(r"(?i)^(?:o[1-9]|gpt-5)")
_ROLES: Final = ("system", "developer", "user", "assistant", "tool", "function")
WEATHER_TOOL: Final = "get_weather"
WEATHER_ARGUMENTS: Final = '{"city":"Paris"}'
_WEATHER_WORD: Final = "weather"
_INVALID_REQUEST: Final = "invalid_request_error"
_BAD_JSON: Final = (
    "We could not parse the JSON body of your request. (HINT: This likely means you "
    "aren't using your HTTP library correctly. The OpenAI API expects a JSON payload, "
    "but what was sent was not valid JSON.)"
)


class InvalidRequest(Exception):
    """A 400 validation failure, carrying OpenAI's ``message`` and ``param``."""

    def __init__(self, message: str, param: str | None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code


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
            message or ("Rate limit reached for gpt-4o-mini in organization "
                        f"{EMULATED_ORGANIZATION} on requests per min (RPM): Limit 3, Used 3, "
                        "Requested 1. Please try again in 1s."),
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


def _bad_type(param: str, expected: str, value: object) -> InvalidRequest:
    return InvalidRequest(
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
        raise InvalidRequest(
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
            raise InvalidRequest(f"Missing required parameter: '{part_param}.type'.", part_param)
        if part_type == "text" and not isinstance(part.get("text"), str):
            raise _bad_type(f"{part_param}.text", "a string", part.get("text"))


def _validate_message(i: int, message: object) -> None:
    param = f"messages[{i}]"
    if not isinstance(message, dict):
        raise _bad_type(param, "an object", message)
    role = message.get("role")
    if role is None:
        raise InvalidRequest(f"Missing required parameter: '{param}.role'.", f"{param}.role")
    if not isinstance(role, str):
        raise _bad_type(f"{param}.role", "a string", role)
    if role not in _ROLES:
        supported = ", ".join(f"'{r}'" for r in _ROLES)
        raise InvalidRequest(
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
            raise InvalidRequest(
                f"Missing required parameter: '{param}.content'.", f"{param}.content"
            )
    raise _bad_type(f"{param}.content", "one of a string or array of objects", content)


def _positive_int(body: Mapping[str, Any], name: str) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise _bad_type(name, "an integer", value)
    if value < 1:
        raise InvalidRequest(
            f"Invalid '{name}': integer below minimum value. Expected a value >= 1, "
            f"but got {value} instead.",
            name,
        )
    return value


class ChatRequest:
    """The validated subset of a request that shapes the reply."""

    __slots__ = ("include_usage", "max_words", "messages", "model", "stream", "tool_call")

    def __init__(
        self,
        body: Mapping[str, Any],
        known_fields: frozenset[str] = KNOWN_REQUEST_FIELDS,
        default_model: str | None = None,
    ) -> None:
        for name in body:
            if name not in known_fields:
                raise InvalidRequest(f"Unrecognized request argument supplied: {name}", None)
        model = body.get("model")
        if model is None and default_model is not None:
            model = default_model
        if model is None:
            raise InvalidRequest("you must provide a model parameter", "model")
        if not isinstance(model, str) or not model:
            raise _bad_type("model", "a non-empty string", model)
        if _REASONING_MODEL.match(model) and body.get("max_tokens") is not None:
            raise InvalidRequest(
                "Unsupported parameter: 'max_tokens' is not supported with this model. "
                "Use 'max_completion_tokens' instead.", "max_tokens", "unsupported_parameter")
        messages = body.get("messages")
        if messages is None:
            raise InvalidRequest("Missing required parameter: 'messages'.", "messages")
        if not isinstance(messages, list):
            raise _bad_type("messages", "an array", messages)
        if not messages:
            raise InvalidRequest(
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
                raise InvalidRequest(
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
        self.tool_call: str | None = weather_tool_call(body, messages)


def _tool_names(tools: object) -> list[str]:
    names = []
    for tool in tools if isinstance(tools, list) else []:
        function = tool.get("function") if isinstance(tool, dict) else None
        name = function.get("name") if isinstance(function, dict) else None
        if isinstance(name, str) and name:
            names.append(name)
    return names


def weather_tool_call(body: Mapping[str, Any], messages: list[dict[str, Any]]) -> str | None:
    """The tool to call for the deterministic weather trick, or None for a text reply."""
    names = _tool_names(body.get("tools"))
    if not names or body.get("tool_choice") == "none" or not messages:
        return None
    last = messages[-1]
    content = last.get("content")
    if isinstance(content, list):
        content = " ".join(
            part["text"]
            for part in content
            if isinstance(part, dict) and isinstance(part.get("text"), str)
        )
    if last.get("role") != "user" or not isinstance(content, str):
        return None
    if _WEATHER_WORD not in content.lower():
        return None
    return WEATHER_TOOL if WEATHER_TOOL in names else names[0]


# --------------------------------------------------------------------------- handler


def _sse(payload: Mapping[str, Any] | str) -> bytes:
    data = payload if isinstance(payload, str) else json.dumps(payload, separators=(",", ":"))
    return f"data: {data}\n\n".encode()


def parse_body(raw: bytes) -> dict[str, Any] | web.Response:
    """The JSON object body, or the OpenAI-shaped 400 for a body that is not one."""
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return _json(_error(_BAD_JSON, _INVALID_REQUEST), status=400)
    if not isinstance(body, dict):
        return _json(_error("The request body must be a JSON object.", _INVALID_REQUEST), 400)
    return body


async def chat_completions(request: web.Request, ctx: CallContext) -> web.StreamResponse:
    """``POST /v1/chat/completions``; auth and faults were already applied by the core."""
    body = parse_body(await request.read())
    if isinstance(body, web.Response):
        return body
    try:
        chat = ChatRequest(body)
    except InvalidRequest as exc:
        return _json(_error(exc.message, _INVALID_REQUEST, exc.param, exc.code), status=400)
    return await send_reply(ctx, chat, model=chat.model)


async def send_reply(
    ctx: CallContext,
    chat: ChatRequest,
    *,
    model: str,
    id_prefix: str = "chatcmpl-emu-",
    usage_in_last_chunk: bool = False,
    prompt_filter_chunk: bool = False,
) -> web.StreamResponse:
    """Answer a validated request, as JSON or as an SSE stream.

    ``usage_in_last_chunk`` puts usage on the finish chunk (Mistral) instead of a
    separate ``choices: []`` chunk; ``prompt_filter_chunk`` opens the stream with
    Azure's content-filter chunk (``choices: []``, empty id and model).
    """
    words = ctx.config.reply.split()
    finish_reason = "stop"
    tool_call: dict[str, Any] | None = None
    if chat.tool_call is not None:
        words = []
        finish_reason = "tool_calls"
        completion = math.ceil(len(WEATHER_ARGUMENTS) / 4)
    else:
        if chat.max_words is not None and len(words) > chat.max_words:
            words = words[: chat.max_words]
            finish_reason = "length"
        completion = len(words)
    prompt = prompt_tokens(chat.messages)
    usage = {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }
    number = ctx.state.next_id()
    completion_id = f"{id_prefix}{number}"
    if chat.tool_call is not None:
        tool_call = {
            "id": f"call_emu_{number}",
            "type": "function",
            "function": {"name": chat.tool_call, "arguments": WEATHER_ARGUMENTS},
        }
    created = int(time.time())

    if not chat.stream:
        message: dict[str, Any] = {"role": "assistant", "content": " ".join(words)}
        if tool_call is not None:
            message = {"role": "assistant", "content": None, "tool_calls": [tool_call]}
        return _json(
            {
                "id": completion_id,
                "object": "chat.completion",
                "created": created,
                "model": model,
                "choices": [{"index": 0, "message": message, "finish_reason": finish_reason}],
                "usage": usage,
            }
        )

    def chunk(delta: dict[str, Any], finish: str | None, **extra: Any) -> bytes:
        return _sse(
            {
                "id": completion_id,
                "object": "chat.completion.chunk",
                "created": created,
                "model": model,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
                **extra,
            }
        )

    events = []
    if prompt_filter_chunk:
        events.append(
            _sse(
                {
                    "choices": [],
                    "created": 0,
                    "id": "",
                    "model": "",
                    "object": "",
                    "prompt_filter_results": [{"prompt_index": 0, "content_filter_results": {}}],
                }
            )
        )
    events.append(chunk({"role": "assistant", "content": ""}, None))
    events.extend(chunk({"content": w if i == 0 else f" {w}"}, None) for i, w in enumerate(words))
    if tool_call is not None:
        half = len(WEATHER_ARGUMENTS) // 2
        start = {**tool_call, "function": {"name": chat.tool_call, "arguments": ""}}
        events.append(chunk({"tool_calls": [{"index": 0, **start}]}, None))
        for fragment in (WEATHER_ARGUMENTS[:half], WEATHER_ARGUMENTS[half:]):
            events.append(
                chunk({"tool_calls": [{"index": 0, "function": {"arguments": fragment}}]}, None)
            )
    if usage_in_last_chunk:
        events.append(chunk({}, finish_reason, usage=usage))
    else:
        events.append(chunk({}, finish_reason))
        if chat.include_usage:
            events.append(
                _sse(
                    {
                        "id": completion_id,
                        "object": "chat.completion.chunk",
                        "created": created,
                        "model": model,
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


ROUTES: Final = (
    ("POST", "/v1/chat/completions", chat_completions),
    ("POST", "/v1/embeddings", api_surface.openai_embeddings),
    ("POST", "/v1/responses", api_surface.openai_responses),
)
