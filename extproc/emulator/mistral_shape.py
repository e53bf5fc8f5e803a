"""Mistral chat completions shape for the provider emulator.

Why: Mistral speaks an OpenAI-like dialect with its own differences, and the gateway's
translators must produce bodies Mistral accepts.  Mistral's path is the same as
OpenAI's (``POST /v1/chat/completions``), so a process serves one or the other:
``python -m extproc.emulator --shape mistral``.

Differences from the OpenAI shape (whose validation, reply, usage and weather tool trick
this shape reuses):

* top-level fields outside :data:`KNOWN_REQUEST_FIELDS` are refused like Mistral does,
  with 422 ``{"object": "error", "message": {"detail": [{"type": "extra_forbidden",
  "loc": ["body", NAME], "msg": "Extra inputs are not permitted"}]}, "type":
  "invalid_request_error", ...}`` - notably ``stream_options``,
  ``max_completion_tokens``, ``user``, ``seed``, ``logit_bias``, ``parallel_tool_calls``,
  ``store``, ``metadata``, ``service_tier``;
* ``random_seed`` and ``safe_prompt`` are accepted; ``tool_choice`` may be ``"any"``;
* a stream carries usage in its last chunk (the one with the ``finish_reason``), with
  no separate usage chunk;
* other errors use ``{"object": "error", "message", "type", "param", "code"}``.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any, Final

from aiohttp import web

from extproc.emulator import api_surface
from extproc.emulator.openai_shape import (
    ChatRequest,
    InvalidRequest,
    authenticate,
    parse_body,
    send_reply,
)

if TYPE_CHECKING:
    from collections.abc import Mapping

    from extproc.emulator.app import CallContext

__all__ = [
    "KNOWN_REQUEST_FIELDS",
    "ROUTES",
    "auth_error",
    "authenticate",
    "chat_completions",
    "error_body",
    "not_found",
]

KNOWN_REQUEST_FIELDS: Final = frozenset(
    {
        "model",
        "messages",
        "temperature",
        "top_p",
        "max_tokens",
        "stream",
        "stop",
        "random_seed",
        "response_format",
        "tools",
        "tool_choice",
        "presence_penalty",
        "frequency_penalty",
        "n",
        "prediction",
        "safe_prompt",
    }
)


def _error(message: object, type_: str, code: str | None = None) -> dict[str, Any]:
    return {"object": "error", "message": message, "type": type_, "param": None, "code": code}


def auth_error() -> dict[str, Any]:
    return _error("Unauthorized", "invalid_request_error", "1000")


def error_body(status: int, message: str | None) -> dict[str, Any]:
    if status == 401:
        return auth_error() if message is None else _error(message, "invalid_request_error")
    if status == 429:
        return _error(message or "Requests rate limit exceeded", "rate_limited", "1300")
    if status >= 500:
        return _error(message or "Internal server error", "internal_server_error")
    return _error(message or f"Emulated error (HTTP {status}).", "invalid_request_error")


def not_found(method: str, path: str) -> dict[str, Any]:
    return {"detail": "Not Found"}


def _json(body: Mapping[str, Any], status: int = 200) -> web.Response:
    return web.Response(
        body=json.dumps(body, separators=(",", ":")).encode(),
        status=status,
        content_type="application/json",
    )


async def chat_completions(request: web.Request, ctx: CallContext) -> web.StreamResponse:
    """``POST /v1/chat/completions`` the Mistral way."""
    body = parse_body(await request.read())
    if isinstance(body, web.Response):
        return _json(_error("Invalid JSON body", "invalid_request_error"), 400)
    extra = [name for name in body if name not in KNOWN_REQUEST_FIELDS]
    if extra:
        detail = [
            {
                "type": "extra_forbidden",
                "loc": ["body", name],
                "msg": "Extra inputs are not permitted",
            }
            for name in extra
        ]
        return _json(_error({"detail": detail}, "invalid_request_error"), 422)
    choice = body.get("tool_choice")
    named = isinstance(choice, dict) and choice.get("type") == "function"
    if choice is not None and choice not in ("auto", "none", "any", "required") and not named:
        return _json(_error("Invalid tool_choice", "invalid_request_error"), 400)
    try:
        chat = ChatRequest(body, known_fields=KNOWN_REQUEST_FIELDS)
    except InvalidRequest as exc:
        return _json(_error(exc.message, "invalid_request_error"), 400)
    return await send_reply(
        ctx, chat, model=chat.model, id_prefix="cmpl-emu-", usage_in_last_chunk=True
    )


ROUTES: Final = (
    ("POST", "/v1/chat/completions", chat_completions),
    ("POST", "/v1/embeddings", api_surface.mistral_embeddings),
)
