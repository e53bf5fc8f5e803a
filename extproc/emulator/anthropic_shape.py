"""Anthropic Messages shape for the provider emulator.

Why: the gateway translates OpenAI-door requests into Anthropic's Messages API and
forwards Anthropic-door requests as they are; both must meet an upstream that checks
the body the way Anthropic does (so translation bugs fail loudly) and answers in
Anthropic's format, JSON and SSE, deterministically.

``POST /v1/messages``: auth is ``x-api-key: <key>``; the ``anthropic-version`` header is
required.  Validation follows the real API: unknown top-level fields, a missing
``model`` / ``messages`` / ``max_tokens``, roles other than user/assistant, empty text
blocks, ``tool_use`` blocks without a ``tool_result`` in the next message (and the
reverse), bad ``system`` / ``tools`` / ``tool_choice`` / ``temperature`` all give 400
``{"type": "error", "error": {"type": "invalid_request_error", "message": ...}}``.

Reply: the configured reply text split into words.  ``max_tokens`` keeps that many
words (``stop_reason: "max_tokens"`` when words were cut); a word containing one of the
``stop_sequences`` ends the reply before it (``stop_reason: "stop_sequence"``, with
``stop_sequence`` set); else ``"end_turn"``.  The weather trick of the OpenAI shape
applies: with ``tools``, ``tool_choice`` not ``none`` and the last message a user turn
whose text contains "weather", the reply is one ``tool_use`` block calling
``get_weather`` (or the first tool) with input ``{"city": "Paris"}``,
``stop_reason: "tool_use"``, 4 output tokens.

Usage (deterministic): ``input_tokens = max(1, ceil(chars / 4))`` over the text of
``system``, string contents, ``text`` blocks and ``tool_result`` contents (string or
text blocks); ``output_tokens`` = words returned; cache counts are 0.

Streaming (``"stream": true``) sends named events: ``message_start`` (usage with the
input tokens and ``output_tokens: 1``), ``content_block_start``, ``ping``, one
``content_block_delta`` per word (``text_delta``; for a tool call, ``input_json_delta``
fragments), ``content_block_stop``, ``message_delta`` (stop reason, cumulative
``output_tokens``) and ``message_stop``.
"""

from __future__ import annotations

import json
import math
from typing import TYPE_CHECKING, Any, Final

from aiohttp import web

from extproc.emulator import api_surface
from extproc.emulator.openai_shape import WEATHER_ARGUMENTS, WEATHER_TOOL

if TYPE_CHECKING:
    from collections.abc import Mapping

    from extproc.emulator.app import CallContext, EmulatorState

__all__ = [
    "KNOWN_REQUEST_FIELDS",
    "ROUTES",
    "auth_error",
    "authenticate",
    "error_body",
    "input_tokens",
    "messages",
    "not_found",
]

KNOWN_REQUEST_FIELDS: Final = frozenset(
    {
        "model",
        "messages",
        "max_tokens",
        "system",
        "metadata",
        "stop_sequences",
        "stream",
        "temperature",
        "top_p",
        "top_k",
        "tools",
        "tool_choice",
        "thinking",
        "service_tier",
        "container",
        "mcp_servers",
    }
)
_BLOCK_TYPES: Final = frozenset(
    {"text", "image", "document", "tool_use", "tool_result", "thinking", "redacted_thinking"}
)
_TOOL_CHOICES: Final = frozenset({"auto", "any", "tool", "none"})
_ERROR_TYPES: Final = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    529: "overloaded_error",
}
_WEATHER_INPUT: Final = json.loads(WEATHER_ARGUMENTS)


class _Invalid(Exception):
    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


# --------------------------------------------------------------------------- errors


def _error(type_: str, message: str) -> dict[str, Any]:
    return {"type": "error", "error": {"type": type_, "message": message}}


def auth_error() -> dict[str, Any]:
    return _error("authentication_error", "invalid x-api-key")


def error_body(status: int, message: str | None) -> dict[str, Any]:
    type_ = _ERROR_TYPES.get(status, "api_error" if status >= 500 else "invalid_request_error")
    if message is None:
        message = {
            429: "Number of request tokens has exceeded your per-minute rate limit.",
            529: "Overloaded",
        }.get(status, "Internal server error" if status >= 500 else f"Emulated error ({status}).")
    return _error(type_, message)


def not_found(method: str, path: str) -> dict[str, Any]:
    return _error("not_found_error", "Not Found")


def _json(body: Mapping[str, Any], status: int = 200) -> web.Response:
    return web.Response(
        body=json.dumps(body, separators=(",", ":")).encode(),
        status=status,
        content_type="application/json",
    )


def authenticate(request: web.Request, state: EmulatorState) -> bool:
    """``x-api-key: <key>`` with ``<key>`` in the current key set."""
    key = request.headers.get("x-api-key", "").strip()
    return bool(key) and state.key_is_valid(key)


# --------------------------------------------------------------------------- validation


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _text_chars(content: object) -> int:
    if isinstance(content, str):
        return len(content)
    total = 0
    for block in content if isinstance(content, list) else []:
        if not isinstance(block, dict):
            continue
        if block.get("type") == "text" and isinstance(block.get("text"), str):
            total += len(block["text"])
        elif block.get("type") == "tool_result":
            total += _text_chars(block.get("content"))
    return total


def input_tokens(system: object, turns: list[dict[str, Any]]) -> int:
    """``max(1, ceil(chars / 4))`` over all prompt text (see module docstring)."""
    total = _text_chars(system) + sum(_text_chars(turn.get("content")) for turn in turns)
    return max(1, math.ceil(total / 4))


def _validate_block(where: str, block: object, role: str) -> None:
    if not isinstance(block, dict):
        raise _Invalid(f"{where}: Input should be a valid dictionary")
    kind = block.get("type")
    if kind not in _BLOCK_TYPES:
        raise _Invalid(f"{where}.type: Input tag does not match any of the expected tags")
    if kind == "text":
        if not isinstance(block.get("text"), str):
            raise _Invalid(f"{where}.text: Input should be a valid string")
        if not block["text"]:
            raise _Invalid("messages: text content blocks must be non-empty")
    elif kind == "image":
        source = block.get("source")
        ok = isinstance(source, dict) and (
            (
                source.get("type") == "base64"
                and isinstance(source.get("media_type"), str)
                and isinstance(source.get("data"), str)
            )
            or (source.get("type") == "url" and isinstance(source.get("url"), str))
        )
        if not ok:
            raise _Invalid(f"{where}.source: Input should be a valid image source")
    elif kind == "tool_use":
        if role != "assistant":
            raise _Invalid(f"{where}: tool_use blocks are only allowed in assistant messages")
        if not isinstance(block.get("id"), str) or not isinstance(block.get("name"), str):
            raise _Invalid(f"{where}: tool_use blocks need a string id and name")
        if not isinstance(block.get("input"), dict):
            raise _Invalid(f"{where}.input: Input should be a valid dictionary")
    elif kind == "tool_result":
        if role != "user":
            raise _Invalid(f"{where}: tool_result blocks are only allowed in user messages")
        if not isinstance(block.get("tool_use_id"), str):
            raise _Invalid(f"{where}.tool_use_id: Field required")
        content = block.get("content")
        if content is not None and not isinstance(content, str | list):
            raise _Invalid(f"{where}.content: Input should be a valid list")


def _ids(content: object, kind: str, key: str) -> list[str]:
    if not isinstance(content, list):
        return []
    return [b[key] for b in content if isinstance(b, dict) and b.get("type") == kind]


def _validate_messages(turns: object) -> list[dict[str, Any]]:
    if turns is None:
        raise _Invalid("messages: Field required")
    if not isinstance(turns, list):
        raise _Invalid("messages: Input should be a valid list")
    if not turns:
        raise _Invalid("messages: at least one message is required")
    for i, turn in enumerate(turns):
        where = f"messages.{i}"
        if not isinstance(turn, dict):
            raise _Invalid(f"{where}: Input should be a valid dictionary")
        role = turn.get("role")
        if role not in ("user", "assistant"):
            raise _Invalid(f"{where}.role: Input should be 'user' or 'assistant'")
        content = turn.get("content")
        if isinstance(content, str):
            if not content and i != len(turns) - 1:
                raise _Invalid(
                    f"{where}: all messages must have non-empty content except for the "
                    "optional final assistant message"
                )
            continue
        if not isinstance(content, list):
            raise _Invalid(f"{where}.content: Input should be a valid list")
        for j, block in enumerate(content):
            _validate_block(f"{where}.content.{j}", block, role)
    for i, turn in enumerate(turns):
        uses = _ids(turn["content"], "tool_use", "id")
        results = _ids(turn["content"], "tool_result", "tool_use_id")
        previous = turns[i - 1]["content"] if i else None
        expected = set(_ids(previous, "tool_use", "id"))
        for result in results:
            if result not in expected:
                raise _Invalid(
                    f"messages.{i}: unexpected `tool_use_id` found in `tool_result` blocks: "
                    f"{result}. Each `tool_result` block must have a corresponding "
                    "`tool_use` block in the previous message."
                )
        if uses:
            following = turns[i + 1]["content"] if i + 1 < len(turns) else None
            missing = [u for u in uses if u not in _ids(following, "tool_result", "tool_use_id")]
            if missing:
                raise _Invalid(
                    f"messages.{i + 1}: `tool_use` ids were found without `tool_result` "
                    f"blocks immediately after: {', '.join(missing)}. Each `tool_use` block "
                    "must have a corresponding `tool_result` block in the next message."
                )
    return turns


def _validate_system(system: object) -> None:
    if system is None or isinstance(system, str):
        return
    if isinstance(system, list) and all(
        isinstance(b, dict) and b.get("type") == "text" and isinstance(b.get("text"), str)
        for b in system
    ):
        return
    raise _Invalid("system: Input should be a valid string")


def _validate_tools(tools: object, tool_choice: object) -> list[str]:
    names: list[str] = []
    if tools is not None:
        if not isinstance(tools, list):
            raise _Invalid("tools: Input should be a valid list")
        for k, tool in enumerate(tools):
            if not isinstance(tool, dict) or not isinstance(tool.get("name"), str):
                raise _Invalid(f"tools.{k}.name: Field required")
            if tool.get("type") in (None, "custom") and not isinstance(
                tool.get("input_schema"), dict
            ):
                raise _Invalid(f"tools.{k}.input_schema: Field required")
            names.append(tool["name"])
    if tool_choice is not None:
        if not isinstance(tool_choice, dict) or tool_choice.get("type") not in _TOOL_CHOICES:
            raise _Invalid("tool_choice: Input tag does not match any of the expected tags")
        if tool_choice["type"] == "tool" and tool_choice.get("name") not in names:
            raise _Invalid("tool_choice.name: must name one of the tools")
    return names


def validate_count_request(body: object) -> tuple[str | None, list[dict[str, Any]]]:
    """(the 400 message or None, the turns) of a count_tokens body: a Messages body
    without ``max_tokens``."""
    if not isinstance(body, dict):
        return "The request body must be a JSON object.", []
    model = body.get("model")
    if not isinstance(model, str) or not model:
        return "model: Field required", []
    try:
        turns = _validate_messages(body.get("messages"))
        _validate_system(body.get("system"))
    except _Invalid as exc:
        return exc.message, []
    return None, turns


class _MessagesRequest:
    """The validated subset of a Messages request that shapes the reply."""

    def __init__(self, body: Mapping[str, Any]) -> None:
        for name in body:
            if name not in KNOWN_REQUEST_FIELDS:
                raise _Invalid(f"{name}: Extra inputs are not permitted")
        model = body.get("model")
        if model is None:
            raise _Invalid("model: Field required")
        if not isinstance(model, str) or not model:
            raise _Invalid("model: Input should be a valid string")
        max_tokens = body.get("max_tokens")
        if max_tokens is None:
            raise _Invalid("max_tokens: Field required")
        if not _is_int(max_tokens):
            raise _Invalid("max_tokens: Input should be a valid integer")
        if max_tokens < 1:
            raise _Invalid("max_tokens: Input should be greater than or equal to 1")
        turns = _validate_messages(body.get("messages"))
        _validate_system(body.get("system"))
        stream = body.get("stream")
        if stream is not None and not isinstance(stream, bool):
            raise _Invalid("stream: Input should be a valid boolean")
        temperature = body.get("temperature")
        if temperature is not None:
            if not _is_number(temperature):
                raise _Invalid("temperature: Input should be a valid number")
            if not 0 <= temperature <= 1:
                raise _Invalid("temperature: Input should be less than or equal to 1")
        top_p = body.get("top_p")
        if top_p is not None and not _is_number(top_p):
            raise _Invalid("top_p: Input should be a valid number")
        stops = body.get("stop_sequences")
        if stops is not None and (
            not isinstance(stops, list) or not all(isinstance(s, str) for s in stops)
        ):
            raise _Invalid("stop_sequences: Input should be a valid list of strings")
        metadata = body.get("metadata")
        if metadata is not None and (not isinstance(metadata, dict) or set(metadata) - {"user_id"}):
            raise _Invalid("metadata: Extra inputs are not permitted")
        names = _validate_tools(body.get("tools"), body.get("tool_choice"))
        self.model: str = model
        self.max_tokens: int = max_tokens
        self.stream: bool = bool(stream)
        self.stop_sequences: list[str] = stops or []
        self.input_tokens = input_tokens(body.get("system"), turns)
        self.tool_call = _weather_tool(names, body.get("tool_choice"), turns)


def _weather_tool(names: list[str], tool_choice: object, turns: list[dict[str, Any]]) -> str | None:
    if not names or (isinstance(tool_choice, dict) and tool_choice.get("type") == "none"):
        return None
    last = turns[-1]
    content = last.get("content")
    if isinstance(content, list):
        content = " ".join(
            b["text"] for b in content if isinstance(b, dict) and b.get("type") == "text"
        )
    if last.get("role") != "user" or "weather" not in str(content).lower():
        return None
    return WEATHER_TOOL if WEATHER_TOOL in names else names[0]


# --------------------------------------------------------------------------- handler


def _event(kind: str, payload: Mapping[str, Any]) -> bytes:
    data = json.dumps({"type": kind, **payload}, separators=(",", ":"))
    return f"event: {kind}\ndata: {data}\n\n".encode()


def _reply_words(reply: str, chat: _MessagesRequest) -> tuple[list[str], str, str | None]:
    words = reply.split()
    for i, word in enumerate(words):
        for stop in chat.stop_sequences:
            if stop and stop in word and i < chat.max_tokens:
                return words[:i], "stop_sequence", stop
    if len(words) > chat.max_tokens:
        return words[: chat.max_tokens], "max_tokens", None
    return words, "end_turn", None


async def messages(request: web.Request, ctx: CallContext) -> web.StreamResponse:
    """``POST /v1/messages``; auth and faults were already applied by the core."""
    if not request.headers.get("anthropic-version"):
        return _json(_error("invalid_request_error", "anthropic-version: header is required"), 400)
    raw = await request.read()
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return _json(_error("invalid_request_error", "There was an error parsing the body."), 400)
    if not isinstance(body, dict):
        return _json(_error("invalid_request_error", "Input should be a valid dictionary"), 400)
    try:
        chat = _MessagesRequest(body)
    except _Invalid as exc:
        return _json(_error("invalid_request_error", exc.message), 400)

    number = ctx.state.next_id()
    message_id = f"msg_emu_{number}"
    content: list[dict[str, Any]]
    if chat.tool_call is not None:
        words: list[str] = []
        stop_reason, stop_sequence = "tool_use", None
        output = math.ceil(len(WEATHER_ARGUMENTS) / 4)
        tool_block = {
            "type": "tool_use",
            "id": f"toolu_emu_{number}",
            "name": chat.tool_call,
            "input": _WEATHER_INPUT,
        }
        content = [tool_block]
    else:
        words, stop_reason, stop_sequence = _reply_words(ctx.config.reply, chat)
        output = len(words)
        content = [{"type": "text", "text": " ".join(words)}] if words else []
    usage = {
        "input_tokens": chat.input_tokens,
        "output_tokens": output,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": 0,
    }
    if not chat.stream:
        return _json(
            {
                "id": message_id,
                "type": "message",
                "role": "assistant",
                "model": chat.model,
                "content": content,
                "stop_reason": stop_reason,
                "stop_sequence": stop_sequence,
                "usage": usage,
            }
        )

    events = [
        _event(
            "message_start",
            {
                "message": {
                    "id": message_id,
                    "type": "message",
                    "role": "assistant",
                    "model": chat.model,
                    "content": [],
                    "stop_reason": None,
                    "stop_sequence": None,
                    "usage": {**usage, "output_tokens": 1},
                }
            },
        )
    ]
    if chat.tool_call is not None:
        half = len(WEATHER_ARGUMENTS) // 2
        events.append(
            _event(
                "content_block_start",
                {"index": 0, "content_block": {**content[0], "input": {}}},
            )
        )
        events.append(_event("ping", {}))
        for fragment in ("", WEATHER_ARGUMENTS[:half], WEATHER_ARGUMENTS[half:]):
            events.append(
                _event(
                    "content_block_delta",
                    {"index": 0, "delta": {"type": "input_json_delta", "partial_json": fragment}},
                )
            )
        events.append(_event("content_block_stop", {"index": 0}))
    else:
        events.append(
            _event(
                "content_block_start", {"index": 0, "content_block": {"type": "text", "text": ""}}
            )
        )
        events.append(_event("ping", {}))
        for i, word in enumerate(words):
            text = word if i == 0 else f" {word}"
            events.append(
                _event(
                    "content_block_delta",
                    {"index": 0, "delta": {"type": "text_delta", "text": text}},
                )
            )
        events.append(_event("content_block_stop", {"index": 0}))
    events.append(
        _event(
            "message_delta",
            {
                "delta": {"stop_reason": stop_reason, "stop_sequence": stop_sequence},
                "usage": {"output_tokens": output},
            },
        )
    )
    events.append(_event("message_stop", {}))

    resp = await ctx.open_stream()
    for event in events:
        if not await ctx.send_event(resp, event):
            break
    return resp


ROUTES: Final = (("POST", "/v1/messages", messages),
                 ("POST", "/v1/messages/count_tokens", api_surface.count_tokens))
