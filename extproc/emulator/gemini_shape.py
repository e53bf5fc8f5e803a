"""Google Gemini (Generative Language API) shape for the provider emulator.

Why: the gateway's Gemini translators must produce bodies Google accepts and read what
Google answers, end to end, without a Google account. Served with
``python -m extproc.emulator --shape gemini`` (it can share a process with any other
shape: its paths are its own).

Paths: ``POST /v1beta/models/{model}:generateContent`` and
``POST /v1beta/models/{model}:streamGenerateContent`` - with ``?alt=sse`` a
Server-Sent-Events stream (``data: {GenerateContentResponse}`` events separated by
CRLF CRLF, as Google sends them, no terminal event), without it one JSON array of the
same chunks, as Google does.

Key: ``x-goog-api-key`` (or the ``key`` query parameter). Like Google, a missing key is
403 ``PERMISSION_DENIED`` ("Method doesn't allow unregistered callers ..."), and a wrong
key is **400** ``INVALID_ARGUMENT`` with ``details[0].reason = "API_KEY_INVALID"``
("API key not valid. Please pass a valid API key."), not a 401. Messages never echo the
key.

Validation (400 ``INVALID_ARGUMENT``, Google's wording): the body is a JSON object with
only the fields of ``GenerateContentRequest`` (:data:`KNOWN_REQUEST_FIELDS`), so a
translator that sends ``model`` or ``max_tokens`` is caught; ``contents`` is a non-empty
array of ``{role: user|model, parts: [...]}``, each part holding one of ``text``,
``inlineData``, ``fileData``, ``functionCall``, ``functionResponse``;
``generationConfig`` holds only :data:`KNOWN_GENERATION_FIELDS`; ``maxOutputTokens`` is a
positive integer; ``candidateCount`` is 1..8; a function declaration whose parameters
are an OBJECT schema has non-empty ``properties``.

Reply: the configured reply text split into words, cut to ``maxOutputTokens`` words
(``finishReason: MAX_TOKENS``, else ``STOP``), once per candidate
(``candidateCount``). ``gemini-2.5*`` models think first, as Google's do by default:
:data:`THOUGHTS_TOKENS` (8) thinking tokens, which count within ``maxOutputTokens``
like Google's (a limit of 8 or less leaves no words and ends with ``MAX_TOKENS``).
Usage (deterministic):

* ``promptTokenCount = max(1, ceil(chars / 4))`` over the ``text`` of ``contents`` parts
  and of ``systemInstruction``; function calls, results and images count nothing;
* ``candidatesTokenCount`` = words returned, times the candidates;
* ``thoughtsTokenCount`` = the thinking tokens spent (``gemini-2.5*`` only; absent for
  others);
* ``totalTokenCount`` = the sum. No ``cachedContentTokenCount`` (nothing is cached).

Streamed: one event per word (each word after the first with a leading space, every
candidate in each event), the last one carrying ``finishReason`` and the complete
``usageMetadata``; earlier ones carry only ``promptTokenCount`` and ``totalTokenCount``.

Tools: when ``tools`` declare functions, ``toolConfig.functionCallingConfig.mode`` is not
``NONE`` and the last content is a ``user`` turn whose text contains "weather", the reply
is one ``functionCall`` part: ``get_weather`` (or the first allowed / declared name)
with ``args {"city": "Paris"}``, ``finishReason: STOP`` and ``candidatesTokenCount`` 4.
A ``functionResponse`` as the last turn gets the text reply.

Errors: ``{"error": {"code", "message", "status"}}`` with Google's status names.
"""

from __future__ import annotations

import json
import math
from typing import TYPE_CHECKING, Any, Final

from aiohttp import web

if TYPE_CHECKING:
    from collections.abc import Mapping

    from extproc.emulator.app import CallContext, EmulatorState

__all__ = [
    "KNOWN_GENERATION_FIELDS",
    "KNOWN_REQUEST_FIELDS",
    "PATH_PREFIX",
    "ROUTES",
    "THOUGHTS_TOKENS",
    "WEATHER_ARGS",
    "auth_error",
    "auth_failure",
    "authenticate",
    "error_body",
    "models_call",
    "not_found",
    "prompt_tokens",
    "stream_error_event",
]

PATH_PREFIX: Final = "/v1beta/"
THOUGHTS_TOKENS: Final = 8
WEATHER_ARGS: Final = {"city": "Paris"}
_WEATHER_TOOL: Final = "get_weather"
KNOWN_REQUEST_FIELDS: Final = frozenset({
    "contents", "tools", "toolConfig", "safetySettings", "systemInstruction",
    "generationConfig", "cachedContent",
})
KNOWN_GENERATION_FIELDS: Final = frozenset({
    "stopSequences", "responseMimeType", "responseSchema", "responseJsonSchema",
    "responseModalities", "candidateCount", "maxOutputTokens", "temperature", "topP", "topK",
    "seed", "presencePenalty", "frequencyPenalty", "responseLogprobs", "logprobs",
    "thinkingConfig",
})
_PART_KINDS: Final = ("text", "inlineData", "fileData", "functionCall", "functionResponse")
_STATUS_NAMES: Final = {
    400: "INVALID_ARGUMENT",
    401: "UNAUTHENTICATED",
    403: "PERMISSION_DENIED",
    404: "NOT_FOUND",
    409: "ABORTED",
    429: "RESOURCE_EXHAUSTED",
    499: "CANCELLED",
    500: "INTERNAL",
    501: "NOT_IMPLEMENTED",
    503: "UNAVAILABLE",
    504: "DEADLINE_EXCEEDED",
}
_DEFAULT_MESSAGES: Final = {
    401: "Request had invalid authentication credentials. Expected OAuth 2 access token, "
         "login cookie or other valid authentication credential.",
    403: "The caller does not have permission",
    429: "You exceeded your current quota, please check your plan and billing details.",
    500: "An internal error has occurred. Please retry or report in "
         "https://developers.generativeai.google/guide/troubleshooting",
    503: "The model is overloaded. Please try again later.",
}
_KEY_INVALID: Final = "API key not valid. Please pass a valid API key."
_KEY_MISSING: Final = ("Method doesn't allow unregistered callers (callers without "
                       "established identity). Please use API Key or other form of API "
                       "consumer identity to call this API.")


class _Invalid(Exception):
    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


# --------------------------------------------------------------------------- errors


def _error(status: int, message: str, details: list[dict[str, Any]] | None = None,
           ) -> dict[str, Any]:
    error: dict[str, Any] = {"code": status, "message": message,
                             "status": _STATUS_NAMES.get(status, "UNKNOWN")}
    if details:
        error["details"] = details
    return {"error": error}


def auth_error() -> dict[str, Any]:
    """The wrong-key body (400 API_KEY_INVALID, see `auth_failure`)."""
    return _error(400, _KEY_INVALID, [{
        "@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": "API_KEY_INVALID",
        "domain": "googleapis.com",
        "metadata": {"service": "generativelanguage.googleapis.com"}}])


def auth_failure(request: web.Request) -> tuple[int, dict[str, Any]]:
    """Google's answer to a request without a valid key: 403 without one, 400 with a
    wrong one."""
    if _presented_key(request) is None:
        return 403, _error(403, _KEY_MISSING, [{
            "@type": "type.googleapis.com/google.rpc.ErrorInfo",
            "reason": "CREDENTIALS_MISSING",
            "domain": "googleapis.com"}])
    return 400, auth_error()


def error_body(status: int, message: str | None) -> dict[str, Any]:
    """Gemini-shaped error for ``status``; ``message=None`` picks a realistic text."""
    return _error(status, message or _DEFAULT_MESSAGES.get(
        status, f"Emulated error (HTTP {status})."))


def not_found(method: str, path: str) -> dict[str, Any]:
    return _error(404, f"The requested URL {path} was not found on this server.")


def stream_error_event(message: str) -> bytes:
    """An in-stream error as Google sends one on an ``alt=sse`` stream."""
    return b"data: " + json.dumps(_error(500, message)).encode() + b"\r\n\r\n"


def _json(body: Mapping[str, Any] | list[Any], status: int = 200) -> web.Response:
    return web.Response(body=json.dumps(body, separators=(",", ":")).encode(), status=status,
                        content_type="application/json")


# --------------------------------------------------------------------------- auth


def _presented_key(request: web.Request) -> str | None:
    key = (request.headers.get("x-goog-api-key") or request.query.get("key") or "").strip()
    return key or None


def authenticate(request: web.Request, state: EmulatorState) -> bool:
    """``x-goog-api-key: <key>`` (or ``?key=<key>``) with ``<key>`` in the key set."""
    key = _presented_key(request)
    return key is not None and state.key_is_valid(key)


# --------------------------------------------------------------------------- validation


def _text_chars(parts: object) -> int:
    if not isinstance(parts, list):
        return 0
    return sum(len(part["text"]) for part in parts
               if isinstance(part, dict) and isinstance(part.get("text"), str))


def prompt_tokens(body: Mapping[str, Any]) -> int:
    """``max(1, ceil(chars / 4))`` over the text of contents and systemInstruction."""
    contents = body.get("contents")
    chars = sum(_text_chars(content.get("parts")) for content in contents
                if isinstance(content, dict)) if isinstance(contents, list) else 0
    system = body.get("systemInstruction")
    if isinstance(system, dict):
        chars += _text_chars(system.get("parts"))
    return max(1, math.ceil(chars / 4))


def _validate_contents(contents: object) -> list[dict[str, Any]]:
    if not isinstance(contents, list) or not contents:
        raise _Invalid("* GenerateContentRequest.contents: contents is not specified")
    for i, content in enumerate(contents):
        where = f"GenerateContentRequest.contents[{i}]"
        if not isinstance(content, dict):
            raise _Invalid(f"Invalid value at 'contents[{i}]', must be an object")
        if content.get("role", "user") not in ("user", "model"):
            raise _Invalid(f"* {where}.role: Please use a valid role: user, model.")
        parts = content.get("parts")
        if not isinstance(parts, list) or not parts:
            raise _Invalid(f"* {where}.parts: contents.parts must not be empty.")
        for j, part in enumerate(parts):
            if not isinstance(part, dict) or sum(kind in part for kind in _PART_KINDS) != 1:
                raise _Invalid(f"* {where}.parts[{j}].data: required oneof field 'data' "
                               "must have one initialized field")
    return contents


def _validate_generation(config: object) -> dict[str, Any]:
    if config is None:
        return {}
    if not isinstance(config, dict):
        raise _Invalid("Invalid value at 'generation_config', must be an object")
    for name in config:
        if name not in KNOWN_GENERATION_FIELDS:
            raise _Invalid(f"Invalid JSON payload received. Unknown name \"{name}\" at "
                           "'generation_config': Cannot find field.")
    limit = config.get("maxOutputTokens")
    if limit is not None and (type(limit) is not int or limit < 1):
        raise _Invalid("* GenerateContentRequest.generation_config.max_output_tokens: "
                       "must be a positive integer")
    count = config.get("candidateCount")
    if count is not None and (type(count) is not int or not 1 <= count <= 8):
        raise _Invalid("* GenerateContentRequest.generation_config.candidate_count: "
                       "must be between 1 and 8")
    return config


def _declared_names(tools: object) -> list[str]:
    if tools is None:
        return []
    if not isinstance(tools, list):
        raise _Invalid("Invalid value at 'tools', must be a list")
    names = []
    for i, tool in enumerate(tools):
        declarations = tool.get("functionDeclarations") if isinstance(tool, dict) else None
        for j, declaration in enumerate(declarations if isinstance(declarations, list) else []):
            name = declaration.get("name") if isinstance(declaration, dict) else None
            if not isinstance(name, str) or not name:
                raise _Invalid(f"* GenerateContentRequest.tools[{i}].function_declarations"
                               f"[{j}].name: Invalid function name.")
            schema = declaration.get("parameters")
            if isinstance(schema, dict) and str(schema.get("type", "")).lower() == "object" \
                    and not schema.get("properties"):
                raise _Invalid(f"* GenerateContentRequest.tools[{i}].function_declarations"
                               f"[{j}].parameters.properties: should be non-empty for "
                               "OBJECT type")
            names.append(name)
    return names


def _function_to_call(body: Mapping[str, Any], contents: list[dict[str, Any]]) -> str | None:
    names = _declared_names(body.get("tools"))
    config = body.get("toolConfig")
    calling = config.get("functionCallingConfig") if isinstance(config, dict) else None
    calling = calling if isinstance(calling, dict) else {}
    if not names or calling.get("mode") == "NONE":
        return None
    last = contents[-1]
    parts = last.get("parts", [])
    text = " ".join(part["text"] for part in parts
                    if isinstance(part, dict) and isinstance(part.get("text"), str))
    if last.get("role", "user") != "user" or "weather" not in text.lower():
        return None
    allowed = calling.get("allowedFunctionNames")
    if isinstance(allowed, list) and allowed and isinstance(allowed[0], str):
        return allowed[0]
    return _WEATHER_TOOL if _WEATHER_TOOL in names else names[0]


# --------------------------------------------------------------------------- handler


def _sse(payload: Mapping[str, Any]) -> bytes:
    return b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\r\n\r\n"


async def models_call(request: web.Request, ctx: CallContext) -> web.StreamResponse:
    """``POST /v1beta/models/{model}:generateContent|streamGenerateContent``."""
    model, _, method = request.match_info["target"].partition(":")
    if method not in ("generateContent", "streamGenerateContent") or not model:
        return _json(not_found(request.method, request.path), status=404)
    try:
        body = json.loads(await request.read())
    except (ValueError, UnicodeDecodeError):
        return _json(_error(400, "Invalid JSON payload received."), status=400)
    if not isinstance(body, dict):
        return _json(_error(400, "Invalid JSON payload received. Expected an object."), 400)
    try:
        for name in body:
            if name not in KNOWN_REQUEST_FIELDS:
                raise _Invalid(f"Invalid JSON payload received. Unknown name \"{name}\": "
                               "Cannot find field.")
        contents = _validate_contents(body.get("contents"))
        config = _validate_generation(body.get("generationConfig"))
        function = _function_to_call(body, contents)
    except _Invalid as exc:
        return _json(_error(400, exc.message), status=400)
    return await _reply(ctx, body, config, function, model=model,
                        stream=method == "streamGenerateContent",
                        sse=request.query.get("alt") == "sse")


async def _reply(ctx: CallContext, body: Mapping[str, Any], config: Mapping[str, Any],
                 function: str | None, *, model: str, stream: bool,
                 sse: bool) -> web.StreamResponse:
    candidates = config.get("candidateCount") or 1
    words = ctx.config.reply.split()
    finish = "STOP"
    limit = config.get("maxOutputTokens")
    thoughts = 0
    if model.startswith("gemini-2.5"):
        thoughts = THOUGHTS_TOKENS if limit is None else min(THOUGHTS_TOKENS, limit)
        limit = None if limit is None else limit - thoughts
    if function is not None:
        words = []
        output = math.ceil(len(json.dumps(WEATHER_ARGS, separators=(",", ":"))) / 4)
    else:
        if limit is not None and len(words) > limit:
            words, finish = words[:limit], "MAX_TOKENS"
        output = len(words)
    prompt = prompt_tokens(body)
    usage: dict[str, Any] = {"promptTokenCount": prompt,
                             "candidatesTokenCount": output * candidates}
    if model.startswith("gemini-2.5"):
        usage["thoughtsTokenCount"] = thoughts
    usage["totalTokenCount"] = sum(usage.values())
    usage["promptTokensDetails"] = [{"modality": "TEXT", "tokenCount": prompt}]
    response_id = f"emu-gemini-{ctx.state.next_id()}"

    def response(parts: list[dict[str, Any]], *, last: bool) -> dict[str, Any]:
        out_candidates = []
        for index in range(candidates):
            candidate: dict[str, Any] = {"content": {"parts": parts, "role": "model"},
                                         "index": index}
            if last:
                candidate["finishReason"] = finish
            out_candidates.append(candidate)
        return {"candidates": out_candidates,
                "usageMetadata": usage if last else {
                    "promptTokenCount": prompt, "totalTokenCount": prompt},
                "modelVersion": model, "responseId": response_id}

    if function is not None:
        chunks = [response([{"functionCall": {"name": function, "args": WEATHER_ARGS}}],
                           last=True)]
    elif not stream:
        chunks = [response([{"text": " ".join(words)}], last=True)]
    else:
        pieces = [word if i == 0 else f" {word}" for i, word in enumerate(words)] or [""]
        chunks = [response([{"text": piece}], last=i == len(pieces) - 1)
                  for i, piece in enumerate(pieces)]
    if not stream:
        return _json(chunks[0])
    if not sse:
        return _json(chunks)
    resp = await ctx.open_stream()
    for chunk in chunks:
        if not await ctx.send_event(resp, _sse(chunk)):
            break
    return resp


ROUTES: Final = (("POST", PATH_PREFIX + "models/{target}", models_call),)
