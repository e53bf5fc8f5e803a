"""OpenAI Chat Completions door -> Google Gemini (`generateContent`) backend, and the
Gemini wire rules the Anthropic door reuses (`anthropic_gemini`).

Request (`POST /v1beta/models/{model}:generateContent`, streamed:
`:streamGenerateContent?alt=sse`; the key goes in `x-goog-api-key`). The model travels in
the path, so the body has no `model`. An upstream model holding a `/` (`tunedModels/x`)
is used as the resource name as is; any other is `models/{model}`.

* `system` / `developer` messages (text only, any position) -> `systemInstruction.parts`.
* `user` content: string, `text` parts -> `text` parts; `image_url` parts with a base64
  `data:` URL -> `inlineData` (an http(s) image URL is refused: Gemini reads only its own
  file URIs).
* `assistant` -> role `model`: content -> `text` part, `tool_calls` -> `functionCall`
  parts (`arguments` JSON string -> `args` object).
* `tool` messages -> `functionResponse` parts (`name` from the assistant tool call the
  `tool_call_id` names; content that is a JSON object is the `response`, anything else
  `{"content": text}`) in a `user` turn. Consecutive turns of one role are merged.
* `max_completion_tokens`, `max_tokens` -> `generationConfig.maxOutputTokens` (the
  smaller if both; if neither, the limit the gateway imposes on budget tenants).
* `temperature`, `top_p` -> `temperature`, `topP`; `stop` -> `stopSequences`;
  `n` -> `candidateCount`; `seed`, `presence_penalty`, `frequency_penalty` -> `seed`,
  `presencePenalty`, `frequencyPenalty`; `response_format` `json_object` ->
  `responseMimeType: application/json` (`text`: nothing).
* `tools[].function` -> one `tools[].functionDeclarations` list (`strict` dropped; the
  JSON schema goes in `parameters` as sent: Gemini refuses keywords outside its schema
  subset with its own 400); `tool_choice` auto / none / required / function ->
  `toolConfig.functionCallingConfig.mode` AUTO / NONE / ANY / ANY with
  `allowedFunctionNames`.

Dropped without effect on the answer: `user`, `store`, `metadata`, `service_tier`,
`stream_options` (the client's `include_usage` decides its usage chunk),
`parallel_tool_calls: true`. Refused with 400 "The parameter '<name>' is not supported by
Gemini.", unless null or the neutral value: `parallel_tool_calls` (true), `logprobs`
(false), `top_logprobs`, `logit_bias` ({}), `response_format` other than text /
json_object, `audio`, `modalities` (["text"]), `prediction`, `reasoning_effort`,
`web_search_options`, `functions`, `function_call`, and any parameter Chat Completions
does not define. Other 400s: "Only 'text' and 'image_url' content parts are supported
by Gemini.", "Gemini accepts images only as base64 data: URLs.", "Only 'function' tools
are supported by Gemini.", "Messages with role 'function' are not supported by Gemini;
use 'tool' messages.", "'messages[i].tool_call_id' does not name a tool call of an
earlier assistant message." (Gemini matches results to calls by function name).

Response: each candidate -> a choice (`index`); `text` parts joined (parts marked
`thought` dropped), `functionCall` parts -> `tool_calls` (id: the call's `id` when Gemini
sends one, else `call_<n>`); `finishReason` STOP -> "stop" ("tool_calls" when the
candidate called a function), MAX_TOKENS -> "length", SAFETY, RECITATION, BLOCKLIST,
PROHIBITED_CONTENT, SPII, IMAGE_SAFETY, LANGUAGE -> "content_filter", others -> "stop".
A prompt Gemini blocked (`promptFeedback.blockReason`, no candidates) -> one empty
choice with "content_filter".

Usage (`usageMetadata`, decision 0116): input = `promptTokenCount` (it includes the
cached part) + `toolUsePromptTokenCount`; cached input = `cachedContentTokenCount`;
output = `candidatesTokenCount` + `thoughtsTokenCount` (Google bills thinking tokens at
the output rate, and the answer text alone would undercharge thinking models).

Stream (`alt=sse`: one `data:` event per `GenerateContentResponse`, no terminal event):
the first event of a candidate -> a role chunk; text -> content chunks; a function call
-> one tool-call chunk (index, id, type, name, whole arguments); `finishReason` -> the
finish chunk. At the end of the upstream stream, after a finish: the usage chunk (if the
client set `stream_options.include_usage`) and `data: [DONE]`. A stream that ends without
a `finishReason` reports no usage (the gateway then marks it cut short). An
`{"error": ...}` event -> `data: {"error": {...}}` (scrubbed) and the end of the stream.

Errors: Google's `{"error": {"code", "message", "status"}}` is read by the shared table
(`provider_errors`); Google answers an invalid API key with 400 `API_KEY_INVALID`, which
is mapped like a 401 (the gateway's credential, not the client's request: decision 0117).
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable, Mapping
from typing import Any, Final
from urllib.parse import quote

from extproc.errors import Dialect, ErrorCode
from extproc.translate import chat_request
from extproc.translate import limits as output_limits
from extproc.translate.provider_errors import (
    invalid_response,
    map_provider_error,
    provider_document,
    provider_message,
    scrub,
)
from extproc.translate.sse import encode_event
from extproc.translate.types import (
    NO_OUTPUT_LIMIT,
    Backend,
    JsonEventStream,
    OutputLimit,
    TranslatedResponse,
    UpstreamRequest,
    Usage,
)
from extproc.translate.usage import openai_usage_body
from extproc.translate.validation import (
    compact_json,
    invalid,
    optional_number,
    optional_positive_int,
    optional_stop,
    stream_options,
    validate_openai_door,
)

__all__ = [
    "API_VERSION",
    "DROPPED_FOR_GEMINI",
    "UNSUPPORTED_FOR_GEMINI",
    "GeminiChunksToOpenAIChunks",
    "OpenAIToGemini",
    "build_gemini_request",
    "chat_completion_from_gemini",
    "finish_reason_for",
    "gemini_answer",
    "gemini_error",
    "gemini_path",
    "gemini_upstream",
    "usage_from_gemini",
]

API_VERSION: Final = "v1beta"
_GEMINI: Final = Backend.GEMINI


_is: Final = chat_request.is_value
_never: Final = chat_request.never


def _plain_format(value: object) -> bool:
    return isinstance(value, dict) and value.get("type") in ("text", "json_object") \
        and set(value) == {"type"}


# Parameter -> "is this value one Gemini can honour?"; anything else sent is refused.
UNSUPPORTED_FOR_GEMINI: Final[dict[str, Callable[[object], bool]]] = {
    "parallel_tool_calls": _is(True),
    "logprobs": _is(False),
    "top_logprobs": _never,
    "logit_bias": _is({}),
    "response_format": _plain_format,
    "audio": _never,
    "modalities": _is(["text"]),
    "prediction": _never,
    "reasoning_effort": _never,
    "web_search_options": _never,
    "functions": _never,
    "function_call": _never,
}
DROPPED_FOR_GEMINI: Final = frozenset({
    "user", "store", "metadata", "service_tier", "stream_options", "parallel_tool_calls"})
_TRANSLATED: Final = frozenset({
    "model", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "stop",
    "n", "seed", "presence_penalty", "frequency_penalty", "response_format", "stream",
    "tools", "tool_choice",
})
_FINISH_REASONS: Final = {
    "STOP": "stop",
    "MAX_TOKENS": "length",
    "SAFETY": "content_filter",
    "RECITATION": "content_filter",
    "BLOCKLIST": "content_filter",
    "PROHIBITED_CONTENT": "content_filter",
    "SPII": "content_filter",
    "IMAGE_SAFETY": "content_filter",
    "LANGUAGE": "content_filter",
}
_DATA_URL: Final = re.compile(r"data:([a-z]+/[A-Za-z0-9.+\-]+);base64,([A-Za-z0-9+/=\s]+)")
_KEY_INVALID: Final = "API_KEY_INVALID"


def gemini_path(upstream_model: str, *, stream: bool) -> str:
    """The method path for a model: Envoy replaces the query string with `:path`
    (ENVOY_FACTS), so `alt=sse` is part of it."""
    resource = upstream_model if "/" in upstream_model else f"models/{upstream_model}"
    method = "streamGenerateContent?alt=sse" if stream else "generateContent"
    return f"/{API_VERSION}/{quote(resource, safe='/-._~')}:{method}"


def finish_reason_for(reason: object, *, called_tools: bool = False) -> str:
    """OpenAI `finish_reason` for a Gemini `finishReason` (unknown ones -> "stop")."""
    mapped = _FINISH_REASONS.get(reason, "stop") if isinstance(reason, str) else "stop"
    return "tool_calls" if mapped == "stop" and called_tools else mapped


# --------------------------------------------------------------------------- request


def _image_part(part: Mapping[str, Any], param: str) -> dict[str, Any]:
    match = _DATA_URL.fullmatch(chat_request.image_url(part, param))
    if match is None:
        raise invalid("Gemini accepts images only as base64 data: URLs.",
                      f"{param}.image_url.url")
    return {"inlineData": {"mimeType": match.group(1), "data": "".join(match.group(2).split())}}


def _text_part(text: str) -> dict[str, Any]:
    return {"text": text}


def _model_parts(message: Mapping[str, Any], param: str,
                 names: dict[str, str]) -> list[dict[str, Any]]:
    parts = [_text_part(text) for text in chat_request.assistant_texts(message.get("content"),
                                                                       param)]
    for call in chat_request.tool_calls(message.get("tool_calls"), f"{param}.tool_calls"):
        names[call.id] = call.name
        parts.append({"functionCall": {"name": call.name, "args": call.arguments}})
    return parts


def _function_response(message: Mapping[str, Any], param: str,
                       names: Mapping[str, str]) -> dict[str, Any]:
    name = names.get(chat_request.tool_call_id(message, param))
    if name is None:
        raise invalid(f"'{param}.tool_call_id' does not name a tool call of an earlier "
                      "assistant message.", f"{param}.tool_call_id")
    text = "".join(chat_request.message_texts(message.get("content"), f"{param}.content",
                                              role="tool"))
    try:
        value: object = json.loads(text)
    except ValueError:
        value = None
    response = value if isinstance(value, dict) else {"content": text}
    return {"functionResponse": {"name": name, "response": response}}


def _append(turns: list[dict[str, Any]], role: str, parts: list[dict[str, Any]]) -> None:
    if turns and turns[-1]["role"] == role:
        turns[-1]["parts"].extend(parts)
    else:
        turns.append({"role": role, "parts": parts})


def _convert_messages(messages: list[Any]) -> tuple[list[str], list[dict[str, Any]]]:
    system: list[str] = []
    turns: list[dict[str, Any]] = []
    names: dict[str, str] = {}
    for param, role, message in chat_request.messages_by_role(messages, _GEMINI):
        if role in ("system", "developer"):
            system.extend(t for t in chat_request.message_texts(
                message.get("content"), f"{param}.content", role=role) if t)
        elif role == "user":
            parts = chat_request.user_parts(message.get("content"), f"{param}.content",
                                            _GEMINI, text=_text_part, image=_image_part)
            if not parts:
                raise invalid(f"'{param}.content' must not be empty.", f"{param}.content")
            _append(turns, "user", parts)
        elif role == "assistant":
            parts = _model_parts(message, param, names)
            if parts:
                _append(turns, "model", parts)
        else:
            _append(turns, "user", [_function_response(message, param, names)])
    if not turns:
        raise chat_request.no_turns()
    return system, turns


def _convert_tools(tools: object) -> list[dict[str, Any]]:
    declarations = []
    for tool in chat_request.function_tools(tools, _GEMINI):
        declaration: dict[str, Any] = {"name": tool.name}
        if tool.description:
            declaration["description"] = tool.description
        schema = tool.parameters
        # Gemini refuses an OBJECT schema without properties; it means "no arguments".
        if schema is not None and (schema.get("type") != "object" or schema.get("properties")):
            declaration["parameters"] = schema
        declarations.append(declaration)
    return declarations


_MODES: Final = {"auto": "AUTO", "none": "NONE", "required": "ANY", "function": "ANY"}


def _convert_tool_choice(choice: object) -> dict[str, Any] | None:
    checked = chat_request.tool_choice(choice)
    if checked is None:
        return None
    mode, name = checked
    config: dict[str, Any] = {"mode": _MODES[mode]}
    if name is not None:
        config["allowedFunctionNames"] = [name]
    return {"functionCallingConfig": config}


def _check_parameters(body: Mapping[str, Any]) -> None:
    chat_request.check_parameters(body, _GEMINI, UNSUPPORTED_FOR_GEMINI,
                                  _TRANSLATED | DROPPED_FOR_GEMINI)


def _generation_config(body: Mapping[str, Any], default_limit: int | None) -> dict[str, Any]:
    config: dict[str, Any] = {}
    limit = chat_request.requested_output_limit(body)
    if limit is None:
        limit = default_limit
    if limit is not None:
        config["maxOutputTokens"] = limit
    for name, field in (("temperature", "temperature"), ("top_p", "topP"),
                        ("presence_penalty", "presencePenalty"),
                        ("frequency_penalty", "frequencyPenalty"), ("top_k", "topK")):
        value = optional_number(body, name)
        if value is not None:
            config[field] = value
    stop = optional_stop(body, "stop")
    if stop:
        config["stopSequences"] = stop
    n = optional_positive_int(body, "n")
    if n is not None and n > 1:
        config["candidateCount"] = n
    seed = body.get("seed")
    if seed is not None:
        if type(seed) is not int:
            raise invalid("'seed' must be an integer.", "seed")
        config["seed"] = seed
    response_format = body.get("response_format")
    if isinstance(response_format, dict) and response_format.get("type") == "json_object":
        config["responseMimeType"] = "application/json"
    return config


def build_gemini_request(body: Mapping[str, Any], default_limit: int | None = None, *,
                         check: bool = True) -> dict[str, Any]:
    """The `generateContent` body for a validated Chat Completions body.

    `check=False` skips the parameter check: the Anthropic door checked its own
    parameters before converting (and adds `top_k`, which Chat Completions lacks).
    """
    if check:
        _check_parameters(body)
    system, turns = _convert_messages(body["messages"])
    out: dict[str, Any] = {"contents": turns}
    if system:
        out["systemInstruction"] = {"parts": [{"text": text} for text in system]}
    if body.get("tools") is not None:
        declarations = _convert_tools(body["tools"])
        if declarations:
            out["tools"] = [{"functionDeclarations": declarations}]
            choice = _convert_tool_choice(body.get("tool_choice"))
            if choice is not None:
                out["toolConfig"] = choice
    config = _generation_config(body, default_limit)
    if config:
        out["generationConfig"] = config
    return out


# --------------------------------------------------------------------------- response


def _count(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        return 0
    return max(value, 0)


def usage_from_gemini(metadata: object) -> Usage | None:
    """`Usage` from a `usageMetadata` object; None when the prompt count is missing."""
    if not isinstance(metadata, Mapping) or not isinstance(metadata.get("promptTokenCount"),
                                                           int):
        return None
    prompt = _count(metadata.get("promptTokenCount"))
    tool_prompt = _count(metadata.get("toolUsePromptTokenCount"))
    cached = _count(metadata.get("cachedContentTokenCount"))
    output = (_count(metadata.get("candidatesTokenCount"))
              + _count(metadata.get("thoughtsTokenCount")))
    return Usage(input_tokens=prompt + tool_prompt, output_tokens=output,
                 cached_input_tokens=min(cached, prompt))


def _parts(candidate: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    content = candidate.get("content")
    parts = content.get("parts") if isinstance(content, dict) else None
    return [part for part in parts if isinstance(part, dict)] if isinstance(parts, list) else []


def _call_id(call: Mapping[str, Any], position: int) -> str:
    found = call.get("id")
    return found if isinstance(found, str) and found else f"call_{position}"


def _tool_call(call: Mapping[str, Any], position: int) -> dict[str, Any]:
    args = call.get("args")
    return {"id": _call_id(call, position), "type": "function",
            "function": {"name": str(call.get("name", "")),
                         "arguments": compact_json(args if isinstance(args, dict) else {})
                         .decode()}}


def _choice(candidate: Mapping[str, Any], position: int) -> dict[str, Any]:
    texts: list[str] = []
    calls: list[dict[str, Any]] = []
    for part in _parts(candidate):
        if isinstance(part.get("text"), str) and not part.get("thought"):
            texts.append(part["text"])
        elif isinstance(part.get("functionCall"), dict):
            calls.append(_tool_call(part["functionCall"], len(calls)))
    message: dict[str, Any] = {"role": "assistant", "content": "".join(texts) if texts else None}
    if calls:
        message["tool_calls"] = calls
    index = candidate.get("index")
    return {"index": index if isinstance(index, int) else position, "message": message,
            "logprobs": None,
            "finish_reason": finish_reason_for(candidate.get("finishReason"),
                                               called_tools=bool(calls))}


def chat_completion_from_gemini(response: Mapping[str, Any], *, model: str,
                                created: int) -> dict[str, Any]:
    """The Chat Completions body for a `generateContent` response body."""
    candidates = response.get("candidates")
    if candidates is None and isinstance(response.get("promptFeedback"), dict):
        choices = [{"index": 0, "message": {"role": "assistant", "content": None},
                    "logprobs": None, "finish_reason": "content_filter"}]
    elif isinstance(candidates, list):
        choices = [_choice(candidate, i) for i, candidate in enumerate(candidates)
                   if isinstance(candidate, dict)]
    else:
        raise invalid_response()
    version = response.get("modelVersion")
    out: dict[str, Any] = {
        "id": str(response.get("responseId") or "gemini-response"),
        "object": "chat.completion",
        "created": created,
        "model": version if isinstance(version, str) and version else model,
        "choices": choices,
    }
    usage = usage_from_gemini(response.get("usageMetadata"))
    if usage is not None:
        out["usage"] = openai_usage_body(usage)
    return out


def gemini_answer(body: bytes, *, model: str,
                  created: int) -> tuple[dict[str, Any], Usage | None]:
    """The Chat Completions body for a `generateContent` answer body, and the usage read
    from its `usageMetadata` (for either door)."""
    document = provider_document(body)
    completion = chat_completion_from_gemini(document, model=model, created=created)
    return completion, usage_from_gemini(document.get("usageMetadata"))


def gemini_upstream(out: Mapping[str, Any], upstream_model: str, *,
                    stream: bool) -> UpstreamRequest:
    """The `generateContent` request for a built body (either door)."""
    return UpstreamRequest(body=compact_json(out), path=gemini_path(upstream_model,
                                                                    stream=stream))


def key_verdict_status(status: int, body: bytes) -> int:
    """The status an answer means for the key: Google answers an invalid API key with 400
    `API_KEY_INVALID`, which is the gateway's credential failing (a 401), not the
    client's request."""
    if status == 400 and _KEY_INVALID.encode() in body[:16384]:
        return 401
    return status


def gemini_error(front: Dialect, status: int, body: bytes) -> tuple[int, bytes]:
    """A Gemini error in the client's dialect (an invalid key mapped like a 401)."""
    return map_provider_error(front, key_verdict_status(status, body), body)


# --------------------------------------------------------------------------- stream


class GeminiChunksToOpenAIChunks(JsonEventStream):
    """Gemini `streamGenerateContent?alt=sse` events in, OpenAI `chat.completion.chunk`
    SSE out. `usage` is reported only once a candidate finished: a stream cut short
    must not pass for a complete one."""

    def __init__(self, *, model: str, include_usage: bool,
                 clock: Callable[[], float] = time.time) -> None:
        self._model = model
        self._include_usage = include_usage
        self._clock = clock
        self._id = ""
        self._created = 0
        self._started: set[int] = set()
        self._calls: dict[int, int] = {}
        self._last_usage: Usage | None = None
        self._finished = False
        JsonEventStream.__init__(self)

    def flush(self) -> bytes:
        out = [JsonEventStream.flush(self)]
        if self._finished and not self._ended:
            self._usage = self._last_usage
            if self._include_usage and self._usage is not None:
                out.append(self._encode({"choices": [],
                                         "usage": openai_usage_body(self._usage)}))
            out.append(encode_event("[DONE]"))
            self._ended = True
        return b"".join(out)

    def _encode(self, fields: dict[str, Any]) -> bytes:
        return encode_event(compact_json({
            "id": self._id, "object": "chat.completion.chunk", "created": self._created,
            "model": self._model, **fields}).decode())

    def _chunk(self, index: int, delta: dict[str, Any], finish: str | None = None) -> bytes:
        return self._encode({"choices": [{"index": index, "delta": delta,
                                          "finish_reason": finish}]})

    def _event(self, data: dict[str, Any], out: list[bytes]) -> None:
        if data.get("error") is not None:
            error = data["error"]
            found = provider_message(data) if isinstance(error, dict | str) else None
            message = scrub(found) if found else ""
            out.append(encode_event(compact_json({"error": {
                "message": message or "The provider failed while streaming.",
                "type": "upstream_error", "param": None,
                "code": ErrorCode.PROVIDER_ERROR.value}}).decode()))
            self._ended = True
            return
        if not self._id:
            self._id = str(data.get("responseId") or "gemini-response")
            self._created = int(self._clock())
            version = data.get("modelVersion")
            if isinstance(version, str) and version:
                self._model = version
        usage = usage_from_gemini(data.get("usageMetadata"))
        if usage is not None:
            self._last_usage = usage
        candidates = data.get("candidates")
        if candidates is None and isinstance(data.get("promptFeedback"), dict) \
                and data["promptFeedback"].get("blockReason"):
            self._start(0, out)
            out.append(self._chunk(0, {}, "content_filter"))
            self._finished = True
            return
        for position, candidate in enumerate(candidates if isinstance(candidates, list) else []):
            if isinstance(candidate, dict):
                self._candidate(candidate, position, out)

    def _start(self, index: int, out: list[bytes]) -> None:
        if index not in self._started:
            self._started.add(index)
            out.append(self._chunk(index, {"role": "assistant", "content": ""}))

    def _candidate(self, candidate: Mapping[str, Any], position: int, out: list[bytes]) -> None:
        found = candidate.get("index")
        index = found if isinstance(found, int) else position
        self._start(index, out)
        for part in _parts(candidate):
            text = part.get("text")
            if isinstance(text, str) and text and not part.get("thought"):
                self._deltas += 1
                out.append(self._chunk(index, {"content": text}))
            elif isinstance(part.get("functionCall"), dict):
                position_in_candidate = self._calls.get(index, 0)
                self._calls[index] = position_in_candidate + 1
                self._deltas += 1
                call = _tool_call(part["functionCall"], position_in_candidate)
                out.append(self._chunk(index, {"tool_calls": [
                    {"index": position_in_candidate, **call}]}))
        reason = candidate.get("finishReason")
        if isinstance(reason, str) and reason:
            self._finished = True
            out.append(self._chunk(index, {}, finish_reason_for(
                reason, called_tools=self._calls.get(index, 0) > 0)))


# --------------------------------------------------------------------------- translator


class OpenAIToGemini(output_limits.OpenAIDoorRules):
    """One request through the OpenAI door to Gemini."""

    backend: Final = Backend.GEMINI

    def __init__(self, *, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._include_usage = False
        self._model = ""

    def request(
        self, body: dict[str, Any], *, upstream_model: str, api_version: str | None,
        output_limit: OutputLimit = NO_OUTPUT_LIMIT,
    ) -> UpstreamRequest:
        request = validate_openai_door(body)
        _, self._include_usage = stream_options(request)
        self._model = upstream_model
        return gemini_upstream(build_gemini_request(request, output_limit.default),
                               upstream_model, stream=request.get("stream") is True)

    def response(self, status: int, body: bytes) -> TranslatedResponse:
        completion, usage = gemini_answer(body, model=self._model, created=int(self._clock()))
        return TranslatedResponse(body=compact_json(completion), usage=usage)

    def error(self, status: int, body: bytes, headers: Mapping[str, str]) -> tuple[int, bytes]:
        return gemini_error(Dialect.OPENAI, status, body)

    def stream(self) -> GeminiChunksToOpenAIChunks:
        return GeminiChunksToOpenAIChunks(model=self._model, include_usage=self._include_usage,
                                          clock=self._clock)
