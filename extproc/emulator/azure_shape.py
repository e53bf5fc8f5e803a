"""Azure OpenAI chat completions shape for the provider emulator.

Why: Azure OpenAI serves the OpenAI wire format under a per-deployment path with an
``api-version`` query parameter and an ``api-key`` header; the gateway must build that
request (and keep the key in the header, never the URL) for any Azure deployment.

``POST /openai/deployments/{deployment}/chat/completions?api-version=YYYY-MM-DD[-preview]``:

* auth: ``api-key: <key>`` (401 ``{"error": {"code": "401", "message": "Access denied
  due to invalid subscription key or wrong API endpoint. ..."}}``);
* a missing or malformed ``api-version`` is a 404 ``{"error": {"code": "404",
  "message": "Resource not found"}}``, as on Azure;
* the body is validated like the OpenAI shape's, except that ``model`` is optional
  (ignored: the deployment decides), and the reply's ``model`` is the deployment name;
* streams open with Azure's content-filter chunk (``"choices": []``, empty ``id`` and
  ``model``, ``prompt_filter_results``); usage arrives in a separate ``choices: []``
  chunk when ``stream_options.include_usage`` is true, like OpenAI.
"""

from __future__ import annotations

import json
import re
from typing import TYPE_CHECKING, Any, Final

from aiohttp import web

from extproc.emulator import api_surface
from extproc.emulator.openai_shape import (
    ChatRequest,
    InvalidRequest,
    parse_body,
    send_reply,
)
from extproc.emulator.openai_shape import error_body as openai_error_body

if TYPE_CHECKING:
    from collections.abc import Mapping

    from extproc.emulator.app import CallContext, EmulatorState

__all__ = [
    "ROUTES",
    "auth_error",
    "authenticate",
    "chat_completions",
    "error_body",
    "not_found",
]

_API_VERSION: Final = re.compile(r"\d{4}-\d{2}-\d{2}(-preview)?")
_ACCESS_DENIED: Final = (
    "Access denied due to invalid subscription key or wrong API endpoint. Make sure to "
    "provide a valid key for an active subscription and use a correct regional API "
    "endpoint for your resource."
)


def auth_error() -> dict[str, Any]:
    return {"error": {"code": "401", "message": _ACCESS_DENIED}}


def error_body(status: int, message: str | None) -> dict[str, Any]:
    if status == 401:
        return auth_error() if message is None else {"error": {"code": "401", "message": message}}
    body = openai_error_body(status, message)
    if status == 429 and message is None:
        body["error"]["message"] = (
            "Requests to the ChatCompletions_Create Operation under Azure OpenAI API have "
            "exceeded call rate limit. Please retry after 1 second."
        )
    body["error"]["code"] = str(status) if body["error"]["code"] is None else body["error"]["code"]
    return body


def not_found(method: str, path: str) -> dict[str, Any]:
    return {"error": {"code": "404", "message": "Resource not found"}}


def _json(body: Mapping[str, Any], status: int = 200) -> web.Response:
    return web.Response(
        body=json.dumps(body, separators=(",", ":")).encode(),
        status=status,
        content_type="application/json",
    )


def authenticate(request: web.Request, state: EmulatorState) -> bool:
    """``api-key: <key>`` with ``<key>`` in the current key set."""
    key = request.headers.get("api-key", "").strip()
    return bool(key) and state.key_is_valid(key)


async def chat_completions(request: web.Request, ctx: CallContext) -> web.StreamResponse:
    """``POST /openai/deployments/{deployment}/chat/completions``."""
    version = request.query.get("api-version", "")
    if not _API_VERSION.fullmatch(version):
        return _json(not_found(request.method, request.path), 404)
    deployment = request.match_info["deployment"]
    body = parse_body(await request.read())
    if isinstance(body, web.Response):
        return body
    try:
        chat = ChatRequest(body, default_model=deployment)
    except InvalidRequest as exc:
        return _json(
            {
                "error": {
                    "message": exc.message,
                    "type": "invalid_request_error",
                    "param": exc.param,
                    "code": None,
                }
            },
            400,
        )
    return await send_reply(ctx, chat, model=deployment, prompt_filter_chunk=True)


ROUTES: Final = (
    ("POST", "/openai/deployments/{deployment}/chat/completions", chat_completions),
    ("POST", "/openai/deployments/{deployment}/embeddings", api_surface.azure_embeddings),
    ("POST", "/openai/v1/responses", api_surface.azure_responses),
)
