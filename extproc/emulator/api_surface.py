"""Embeddings, the Responses API and token counting, for the provider emulator.

Why: the gateway serves these endpoints (see `extproc.endpoints`); tests and demos need
providers that validate them like the real ones and answer deterministically, so
budgets can be asserted to the micro-USD. The shape modules list these handlers in
their ``ROUTES``:

* ``POST /v1/embeddings`` (openai, mistral), ``POST /openai/deployments/{d}/embeddings``
  (azure): ``input`` a string, strings, token ids or token-id arrays (Mistral: strings
  only, 422 otherwise). ``prompt_tokens`` = per item ``max(1, ceil(chars / 4))`` for a
  string, its length for a token array, summed. Each vector has ``dimensions`` (Mistral
  ``output_dimension``) floats, default 8, derived from the item's position and text;
  ``encoding_format: base64`` gives the little-endian float32 bytes in base64.
* ``POST /v1/responses`` (openai), ``POST /openai/v1/responses`` (azure; ``model`` is
  the deployment): the reply text as one ``message`` output item, or the weather tool
  call (as in chat) as a ``function_call`` item. ``input_tokens`` = ``max(1, ceil(chars /
  4))`` over ``instructions`` and every input text; ``output_tokens`` = words (4 for the
  tool call); ``max_output_tokens`` cuts the words (status ``incomplete``). Streamed:
  ``response.created``, ``.in_progress``, ``output_item.added``, ``content_part.added``,
  one ``output_text.delta`` per word, the ``.done`` events, ``response.completed``.
  ``previous_response_id`` is a 404 ("Previous response ... not found"): the emulator
  stores nothing.
* ``POST /v1/messages/count_tokens`` (anthropic): ``{"input_tokens": N}`` with N counted
  as the Messages shape counts ``input_tokens``; no ``max_tokens``.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import struct
import time
from typing import TYPE_CHECKING, Any, Final

from aiohttp import web

if TYPE_CHECKING:
    from collections.abc import Mapping

    from extproc.emulator.app import CallContext

__all__ = [
    "DEFAULT_DIMENSIONS",
    "azure_embeddings",
    "azure_responses",
    "count_tokens",
    "embedding_vector",
    "mistral_embeddings",
    "openai_embeddings",
    "openai_responses",
]

DEFAULT_DIMENSIONS: Final = 8
_RESPONSES_FIELDS: Final = frozenset({
    "model", "input", "instructions", "tools", "tool_choice", "max_output_tokens", "stream",
    "store", "text", "truncation", "background", "previous_response_id", "conversation",
    "prompt", "include", "reasoning", "temperature", "top_p", "parallel_tool_calls", "user",
    "metadata", "service_tier", "stream_options", "max_tool_calls", "top_logprobs",
    "safety_identifier", "prompt_cache_key"})


def _json(body: Mapping[str, Any], status: int = 200) -> web.Response:
    return web.Response(body=json.dumps(body, separators=(",", ":")).encode(),
                        status=status, content_type="application/json")


def parse_body(raw: bytes) -> dict[str, Any] | web.Response:
    """The JSON object body, or OpenAI's 400 for one that is not.

    (The shape modules import this module for their ROUTES, so it imports none of them
    at import time.)"""
    from extproc.emulator.openai_shape import parse_body as openai_parse_body

    return openai_parse_body(raw)


def _openai_error(message: str, param: str | None, status: int = 400) -> web.Response:
    return _json({"error": {"message": message, "type": "invalid_request_error",
                            "param": param, "code": None}}, status)


def embedding_vector(index: int, text: str, dimensions: int) -> list[float]:
    """A deterministic vector for one input item."""
    seed = hashlib.sha256(f"{index}:{text}".encode()).digest()
    return [round((seed[i % len(seed)] - 128) / 128, 6) for i in range(dimensions)]


def _embedding_items(value: object, *, strings_only: bool) -> list[tuple[str, int]] | None:
    """(text used for the vector, tokens) per input item; None when malformed."""
    def tokens_of(item: object) -> tuple[str, int] | None:
        if isinstance(item, str) and item:
            return item, max(1, math.ceil(len(item) / 4))
        if (not strings_only and isinstance(item, list) and item
                and all(type(t) is int for t in item)):
            return ",".join(map(str, item)), len(item)
        return None

    if isinstance(value, str):
        single = tokens_of(value)
        return None if single is None else [single]
    if not isinstance(value, list) or not value:
        return None
    if not strings_only and all(type(t) is int for t in value):
        return [(",".join(map(str, value)), len(value))]
    items = [tokens_of(item) for item in value]
    return None if any(item is None for item in items) else items  # type: ignore[return-value]


async def _embeddings(request: web.Request, ctx: CallContext, *, model: str | None,
                      mistral: bool = False) -> web.Response:
    body = parse_body(await request.read())
    if isinstance(body, web.Response):
        return body
    model = model or body.get("model")
    if not isinstance(model, str) or not model:
        return _openai_error("you must provide a model parameter", "model")
    items = _embedding_items(body.get("input"), strings_only=mistral)
    if items is None:
        if mistral:
            return _json({"object": "error", "message": {"detail": [{
                "type": "string_type", "loc": ["body", "input"],
                "msg": "Input should be a valid string"}]},
                "type": "invalid_request_error", "param": None, "code": None}, 422)
        return _openai_error("'input' is invalid.", "input")
    dimensions = body.get("output_dimension" if mistral else "dimensions") or DEFAULT_DIMENSIONS
    if type(dimensions) is not int or not 1 <= dimensions <= 4096:
        return _openai_error("'dimensions' is invalid.", "dimensions")
    base64_wanted = body.get("encoding_format") == "base64"
    data = []
    for index, (text, _tokens) in enumerate(items):
        vector = embedding_vector(index, text, dimensions)
        encoded: Any = vector
        if base64_wanted:
            encoded = base64.b64encode(struct.pack(f"<{dimensions}f", *vector)).decode()
        data.append({"object": "embedding", "index": index, "embedding": encoded})
    prompt = sum(tokens for _text, tokens in items)
    usage: dict[str, int] = {"prompt_tokens": prompt, "total_tokens": prompt}
    answer: dict[str, Any] = {"object": "list", "data": data, "model": model, "usage": usage}
    if mistral:
        usage["completion_tokens"] = 0
        answer["id"] = f"embd-emu-{ctx.state.next_id()}"
    return _json(answer)


async def openai_embeddings(request: web.Request, ctx: CallContext) -> web.Response:
    """``POST /v1/embeddings`` (OpenAI)."""
    return await _embeddings(request, ctx, model=None)


async def mistral_embeddings(request: web.Request, ctx: CallContext) -> web.Response:
    """``POST /v1/embeddings`` (Mistral: strings only, ``output_dimension``)."""
    return await _embeddings(request, ctx, model=None, mistral=True)


async def azure_embeddings(request: web.Request, ctx: CallContext) -> web.Response:
    """``POST /openai/deployments/{deployment}/embeddings?api-version=...``."""
    if not request.query.get("api-version"):
        return _json({"error": {"code": "404", "message": "Resource not found"}}, 404)
    return await _embeddings(request, ctx, model=request.match_info["deployment"])


# -- Responses ---------------------------------------------------------------------------

def _input_chars(value: object) -> int:
    if isinstance(value, str):
        return len(value)
    if isinstance(value, list):
        return sum(_input_chars(item) for item in value)
    if isinstance(value, dict):
        if isinstance(value.get("text"), str):
            return len(value["text"])
        if "content" in value:
            return _input_chars(value["content"])
        if isinstance(value.get("output"), str):
            return len(value["output"])
    return 0


def _wants_weather(body: Mapping[str, Any]) -> bool:
    tools = body.get("tools") or []
    names = [t.get("name") for t in tools if isinstance(t, dict) and t.get("type") == "function"]
    if not names or body.get("tool_choice") == "none":
        return False
    items = body.get("input")
    last = items if isinstance(items, str) else (items[-1] if isinstance(items, list)
                                                 and items else None)
    if isinstance(last, dict) and last.get("type", "message") != "message":
        return False
    return "weather" in json.dumps(last).lower()


def _sse(kind: str, payload: dict[str, Any]) -> bytes:
    return f"event: {kind}\ndata: {json.dumps(payload, separators=(',', ':'))}\n\n".encode()


async def _responses(request: web.Request, ctx: CallContext, *,
                     model: str | None) -> web.StreamResponse:
    from extproc.emulator.openai_shape import WEATHER_ARGUMENTS, WEATHER_TOOL

    body = parse_body(await request.read())
    if isinstance(body, web.Response):
        return body
    for name in body:
        if name not in _RESPONSES_FIELDS:
            return _openai_error(f"Unknown parameter: '{name}'.", name)
    model = model or body.get("model")
    if not isinstance(model, str) or not model:
        return _openai_error("Missing required parameter: 'model'.", "model")
    if body.get("input") is None:
        return _openai_error("Missing required parameter: 'input'.", "input")
    previous = body.get("previous_response_id")
    if previous is not None:
        return _openai_error(f"Previous response with id '{str(previous)[:40]}' not found.",
                             "previous_response_id", 404)
    limit = body.get("max_output_tokens")
    if limit is not None and (type(limit) is not int or limit < 16):
        return _openai_error("Invalid 'max_output_tokens': integer below minimum value. "
                             "Expected a value >= 16.", "max_output_tokens")
    number = ctx.state.next_id()
    response_id = f"resp_emu{number}"
    words = ctx.config.reply.split()
    status = "completed"
    items: list[dict[str, Any]] = []
    if _wants_weather(body):
        tool = next(t.get("name") for t in body["tools"]
                    if isinstance(t, dict) and t.get("type") == "function")
        tool_name = WEATHER_TOOL if any(t.get("name") == WEATHER_TOOL for t in body["tools"]
                                        if isinstance(t, dict)) else tool
        items.append({"type": "function_call", "id": f"fc_emu{number}",
                      "call_id": f"call_emu_{number}", "name": tool_name,
                      "arguments": WEATHER_ARGUMENTS, "status": "completed"})
        output_tokens = math.ceil(len(WEATHER_ARGUMENTS) / 4)
    else:
        if limit is not None and len(words) > limit:
            words, status = words[:limit], "incomplete"
        text = " ".join(words)
        items.append({"type": "message", "id": f"msg_emu{number}", "status": "completed",
                      "role": "assistant",
                      "content": [{"type": "output_text", "text": text, "annotations": []}]})
        output_tokens = len(words)
    input_tokens = max(1, math.ceil((_input_chars(body.get("instructions"))
                                     + _input_chars(body.get("input"))) / 4))
    usage = {"input_tokens": input_tokens, "input_tokens_details": {"cached_tokens": 0},
             "output_tokens": output_tokens, "output_tokens_details": {"reasoning_tokens": 0},
             "total_tokens": input_tokens + output_tokens}

    def response(state: str, output: list[dict[str, Any]],
                 with_usage: bool) -> dict[str, Any]:
        return {"id": response_id, "object": "response", "created_at": int(time.time()),
                "status": state, "error": None,
                "incomplete_details": ({"reason": "max_output_tokens"}
                                       if state == "incomplete" else None),
                "model": model, "output": output, "store": body.get("store", True),
                "tools": body.get("tools") or [], "tool_choice": body.get("tool_choice", "auto"),
                "parallel_tool_calls": True, "text": {"format": {"type": "text"}},
                "usage": usage if with_usage else None}

    if body.get("stream") is not True:
        return _json(response(status, items, True))
    sequence = 0
    events: list[bytes] = []

    def emit(kind: str, **fields: Any) -> None:
        nonlocal sequence
        events.append(_sse(kind, {"type": kind, "sequence_number": sequence, **fields}))
        sequence += 1

    emit("response.created", response=response("in_progress", [], False))
    emit("response.in_progress", response=response("in_progress", [], False))
    for index, item in enumerate(items):
        if item["type"] == "message":
            emit("response.output_item.added", output_index=index,
                 item={**item, "status": "in_progress", "content": []})
            part = {"type": "output_text", "text": "", "annotations": []}
            emit("response.content_part.added", item_id=item["id"], output_index=index,
                 content_index=0, part=part)
            for position, word in enumerate(words):
                emit("response.output_text.delta", item_id=item["id"], output_index=index,
                     content_index=0, delta=word if position == 0 else f" {word}")
            text = item["content"][0]["text"]
            emit("response.output_text.done", item_id=item["id"], output_index=index,
                 content_index=0, text=text)
            emit("response.content_part.done", item_id=item["id"], output_index=index,
                 content_index=0, part={**part, "text": text})
        else:
            emit("response.output_item.added", output_index=index,
                 item={**item, "status": "in_progress", "arguments": ""})
            half = len(WEATHER_ARGUMENTS) // 2
            for fragment in (WEATHER_ARGUMENTS[:half], WEATHER_ARGUMENTS[half:]):
                emit("response.function_call_arguments.delta", item_id=item["id"],
                     output_index=index, delta=fragment)
            emit("response.function_call_arguments.done", item_id=item["id"],
                 output_index=index, arguments=WEATHER_ARGUMENTS)
        emit("response.output_item.done", output_index=index, item=item)
    emit(f"response.{status}", response=response(status, items, True))
    resp = await ctx.open_stream()
    for event in events:
        if not await ctx.send_event(resp, event):
            break
    return resp


async def openai_responses(request: web.Request, ctx: CallContext) -> web.StreamResponse:
    """``POST /v1/responses`` (OpenAI)."""
    return await _responses(request, ctx, model=None)


async def azure_responses(request: web.Request, ctx: CallContext) -> web.StreamResponse:
    """``POST /openai/v1/responses`` (Azure OpenAI v1 API; ``model`` names the deployment)."""
    return await _responses(request, ctx, model=None)


# -- count_tokens ------------------------------------------------------------------------

async def count_tokens(request: web.Request, ctx: CallContext) -> web.Response:
    """``POST /v1/messages/count_tokens`` (Anthropic)."""
    from extproc.emulator.anthropic_shape import input_tokens, validate_count_request

    try:
        body = json.loads(await request.read())
    except (ValueError, UnicodeDecodeError):
        body = None
    problem, turns = validate_count_request(body)
    if problem is not None:
        return _json({"type": "error", "error": {"type": "invalid_request_error",
                                                 "message": problem}}, 400)
    assert isinstance(body, dict)
    return _json({"input_tokens": input_tokens(body.get("system"), turns)})
