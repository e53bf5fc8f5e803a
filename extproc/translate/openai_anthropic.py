"""OpenAI Chat Completions door -> Anthropic Messages backend.

Request (`POST /v1/messages`, header `anthropic-version: 2023-06-01`):

* `model` -> the deployment's upstream model.
* `system` / `developer` messages (any position; text only) -> `system` (a string, or
  text blocks when there are several).
* `user` content: string, `text` parts, `image_url` parts -> string or `text` / `image`
  blocks (`https`/`http` URL -> `url` source, `data:` URL -> `base64` source).
* `assistant` content + `tool_calls` -> `text` blocks + `tool_use` blocks (`arguments`
  JSON string -> `input` object).
* `tool` messages -> `tool_result` blocks in a user message (consecutive results merged).
* `max_completion_tokens`, `max_tokens` -> `max_tokens` (the smaller if both; if
  neither, the limit the gateway imposes, else `DEFAULT_MAX_TOKENS` = 4096, since
  Anthropic requires one).
* `temperature` (must be within 0..1), `top_p` -> the same.
* `stop` (string or array) -> `stop_sequences`.
* `tools[].function` -> `tools[]` `{name, description, input_schema}` (`strict` dropped).
* `tool_choice` auto / none / required / function -> `{"type": auto / none / any / tool}`;
  `parallel_tool_calls: false` -> `tool_choice.disable_parallel_tool_use: true`.
* `user` -> `metadata.user_id`.
* `stream` -> `stream` (`stream_options.include_usage` decides the client's usage chunk).

Consecutive messages of one role are merged into one turn (Anthropic alternates roles).
Dropped without effect on the answer: `store`, `metadata`, `service_tier`,
`stream_options`. Refused with 400 "The parameter '<name>' is not supported by
Anthropic." (param = the name), unless sent as null or with the neutral value in
brackets: `n` (1), `logprobs` (false), `top_logprobs`, `logit_bias` ({}),
`presence_penalty` (0), `frequency_penalty` (0), `response_format` ({"type": "text"}),
`seed`, `audio`, `modalities` (["text"]), `prediction`, `reasoning_effort`,
`web_search_options`, `functions`, `function_call`, and any parameter the Chat
Completions API does not define. Other 400s: "'temperature' must be between 0 and 1 for
Anthropic.", "Only 'text' and 'image_url' content parts are supported by Anthropic.",
"Only 'function' tools are supported by Anthropic.", "Messages with role 'function' are
not supported by Anthropic; use 'tool' messages.".

Response: `text` blocks -> `message.content` (joined), `tool_use` -> `tool_calls`
(`input` -> `arguments` JSON string), thinking blocks dropped; `stop_reason`
end_turn / stop_sequence / pause_turn -> "stop", max_tokens -> "length",
tool_use -> "tool_calls", refusal -> "content_filter"; usage -> `prompt_tokens`
(input + cache read + cache creation), `completion_tokens`,
`prompt_tokens_details.cached_tokens` (cache read).

Stream: message_start -> role chunk; text_delta -> content chunk; tool_use start ->
tool-call chunk (index, id, type, name, empty arguments); input_json_delta -> argument
fragment; message_delta -> final chunk with finish_reason; message_stop -> usage chunk
(`"choices": []`, only if the client set `stream_options.include_usage`) and
`data: [DONE]`; an `error` event -> `data: {"error": {...}}` and the end of the stream.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Mapping
from typing import Any, Final

from extproc.errors import Dialect, ErrorCode
from extproc.translate import chat_request
from extproc.translate import limits as output_limits
from extproc.translate.provider_errors import (
    invalid_response,
    map_provider_error,
    provider_document,
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
)
from extproc.translate.usage import openai_usage_body, usage_from_anthropic
from extproc.translate.validation import (
    compact_json,
    invalid,
    optional_bool,
    optional_number,
    optional_stop,
    optional_string,
    stream_options,
    validate_openai_door,
)

__all__ = [
    "ANTHROPIC_VERSION",
    "DEFAULT_MAX_TOKENS",
    "DROPPED_FOR_ANTHROPIC",
    "MESSAGES_PATH",
    "UNSUPPORTED_FOR_ANTHROPIC",
    "AnthropicEventsToOpenAIChunks",
    "OpenAIToAnthropic",
    "build_anthropic_request",
    "chat_completion_from_message",
    "finish_reason_for",
]

MESSAGES_PATH: Final = "/v1/messages"
ANTHROPIC_VERSION: Final = "2023-06-01"
DEFAULT_MAX_TOKENS: Final = 4096
_ANTHROPIC: Final = Backend.ANTHROPIC


_is: Final = chat_request.is_value
_never: Final = chat_request.never


# Parameter -> "is this value a no-op?"; anything else sent is refused with 400.
UNSUPPORTED_FOR_ANTHROPIC: Final[dict[str, Callable[[object], bool]]] = {
    "n": _is(1),
    "logprobs": _is(False),
    "top_logprobs": _never,
    "logit_bias": _is({}),
    "presence_penalty": lambda v: _is(0)(v) or _is(0.0)(v),
    "frequency_penalty": lambda v: _is(0)(v) or _is(0.0)(v),
    "response_format": _is({"type": "text"}),
    "seed": _never,
    "audio": _never,
    "modalities": _is(["text"]),
    "prediction": _never,
    "reasoning_effort": _never,
    "web_search_options": _never,
    "functions": _never,
    "function_call": _never,
}
DROPPED_FOR_ANTHROPIC: Final = frozenset({"store", "metadata", "service_tier", "stream_options"})
_TRANSLATED: Final = frozenset({
    "model", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "stop",
    "stream", "tools", "tool_choice", "parallel_tool_calls", "user",
})
_FINISH_REASONS: Final = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "pause_turn": "stop",
    "max_tokens": "length",
    "model_context_window_exceeded": "length",
    "tool_use": "tool_calls",
    "refusal": "content_filter",
}
_DATA_URL: Final = re.compile(r"data:(image/(?:jpeg|png|gif|webp));base64,([A-Za-z0-9+/=\s]+)")


def finish_reason_for(stop_reason: object) -> str:
    """OpenAI `finish_reason` for an Anthropic `stop_reason` (unknown ones -> "stop")."""
    return _FINISH_REASONS.get(stop_reason, "stop") if isinstance(stop_reason, str) else "stop"


# --------------------------------------------------------------------------- request


def _image_block(part: Mapping[str, Any], param: str) -> dict[str, Any]:
    url = chat_request.image_url(part, param)
    if url.startswith("data:"):
        match = _DATA_URL.fullmatch(url)
        if match is None:
            raise invalid(
                f"'{param}.image_url.url' must be a base64 data URL of a JPEG, PNG, GIF or "
                "WebP image.", f"{param}.image_url.url")
        data = "".join(match.group(2).split())
        return {"type": "image",
                "source": {"type": "base64", "media_type": match.group(1), "data": data}}
    if url.startswith(("https://", "http://")):
        return {"type": "image", "source": {"type": "url", "url": url}}
    raise invalid(f"'{param}.image_url.url' must be an https URL or a data: URL.",
                  f"{param}.image_url.url")


def _text_block(text: str) -> dict[str, Any]:
    return {"type": "text", "text": text}


def _assistant_blocks(message: Mapping[str, Any], param: str) -> list[dict[str, Any]]:
    blocks = [_text_block(text)
              for text in chat_request.assistant_texts(message.get("content"), param)]
    blocks.extend({"type": "tool_use", "id": call.id, "name": call.name, "input": call.arguments}
                  for call in chat_request.tool_calls(message.get("tool_calls"),
                                                      f"{param}.tool_calls"))
    return blocks


def _append(turns: list[dict[str, Any]], role: str, blocks: list[dict[str, Any]]) -> None:
    if turns and turns[-1]["role"] == role:
        turns[-1]["content"].extend(blocks)
    else:
        turns.append({"role": role, "content": blocks})


def _convert_messages(messages: list[Any]) -> tuple[list[str], list[dict[str, Any]]]:
    system: list[str] = []
    turns: list[dict[str, Any]] = []
    for param, role, message in chat_request.messages_by_role(messages, _ANTHROPIC):
        content = message.get("content")
        if role in ("system", "developer"):
            system.extend(t for t in chat_request.message_texts(
                content, f"{param}.content", role=role) if t)
        elif role == "user":
            blocks = chat_request.user_parts(content, f"{param}.content", _ANTHROPIC,
                                             text=_text_block, image=_image_block)
            if not blocks:
                raise invalid(f"'{param}.content' must not be empty.", f"{param}.content")
            _append(turns, "user", blocks)
        elif role == "assistant":
            blocks = _assistant_blocks(message, param)
            if blocks:
                _append(turns, "assistant", blocks)
        else:
            call_id = chat_request.tool_call_id(message, param)
            text = "".join(chat_request.message_texts(content, f"{param}.content", role="tool"))
            _append(turns, "user",
                    [{"type": "tool_result", "tool_use_id": call_id, "content": text}])
    if not turns:
        raise chat_request.no_turns()
    for turn in turns:
        content = turn["content"]
        if len(content) == 1 and content[0]["type"] == "text":
            turn["content"] = content[0]["text"]
    return system, turns


def _convert_tools(tools: object) -> list[dict[str, Any]]:
    converted = []
    for tool in chat_request.function_tools(tools, _ANTHROPIC):
        entry: dict[str, Any] = {"name": tool.name}
        if tool.description:
            entry["description"] = tool.description
        entry["input_schema"] = (tool.parameters if tool.parameters is not None
                                 else {"type": "object", "properties": {}})
        converted.append(entry)
    return converted


_TOOL_CHOICE_TYPES: Final = {"auto": "auto", "required": "any", "function": "tool"}


def _convert_tool_choice(choice: object, parallel: bool | None) -> dict[str, Any] | None:
    checked = chat_request.tool_choice(choice)
    mode, name = checked if checked is not None else ("auto", None)
    if mode == "none":
        return {"type": "none"}
    converted: dict[str, Any] = {"type": _TOOL_CHOICE_TYPES[mode]}
    if name is not None:
        converted["name"] = name
    if parallel is False:
        converted["disable_parallel_tool_use"] = True
    elif checked is None:
        return None
    return converted


def _check_parameters(body: Mapping[str, Any]) -> None:
    chat_request.check_parameters(body, _ANTHROPIC, UNSUPPORTED_FOR_ANTHROPIC,
                                  _TRANSLATED | DROPPED_FOR_ANTHROPIC)


def build_anthropic_request(body: Mapping[str, Any], upstream_model: str,
                            default_limit: int | None = None) -> dict[str, Any]:
    """The Messages API body for a validated Chat Completions body."""
    _check_parameters(body)
    system, turns = _convert_messages(body["messages"])
    out: dict[str, Any] = {
        "model": upstream_model,
        "max_tokens": (chat_request.requested_output_limit(body) or default_limit
                       or DEFAULT_MAX_TOKENS),
    }
    if system:
        out["system"] = system[0] if len(system) == 1 else [
            {"type": "text", "text": text} for text in system]
    out["messages"] = turns
    parallel = optional_bool(body, "parallel_tool_calls")
    if body.get("tools") is not None:
        tools = _convert_tools(body["tools"])
        if tools:
            out["tools"] = tools
            choice = _convert_tool_choice(body.get("tool_choice"), parallel)
            if choice is not None:
                out["tool_choice"] = choice
    temperature = optional_number(body, "temperature")
    if temperature is not None:
        if not 0 <= temperature <= 1:
            raise invalid("'temperature' must be between 0 and 1 for Anthropic.", "temperature")
        out["temperature"] = temperature
    top_p = optional_number(body, "top_p")
    if top_p is not None:
        out["top_p"] = top_p
    stop = optional_stop(body, "stop")
    if stop:
        out["stop_sequences"] = stop
    user = optional_string(body, "user")
    if user:
        out["metadata"] = {"user_id": user}
    if body.get("stream") is True:
        out["stream"] = True
    return out


# --------------------------------------------------------------------------- response


def _tool_call(block: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "id": block.get("id", ""),
        "type": "function",
        "function": {"name": block.get("name", ""),
                     "arguments": compact_json(block.get("input", {})).decode()},
    }


def chat_completion_from_message(message: Mapping[str, Any], created: int) -> dict[str, Any]:
    """The Chat Completions body for an Anthropic Messages response body."""
    blocks = message.get("content")
    if not isinstance(blocks, list):
        raise invalid_response()
    texts: list[str] = []
    calls: list[dict[str, Any]] = []
    for block in blocks:
        if not isinstance(block, dict):
            continue
        if block.get("type") == "text" and isinstance(block.get("text"), str):
            texts.append(block["text"])
        elif block.get("type") == "tool_use":
            calls.append(_tool_call(block))
    reply: dict[str, Any] = {"role": "assistant", "content": "".join(texts) if texts else None}
    if calls:
        reply["tool_calls"] = calls
    out: dict[str, Any] = {
        "id": message.get("id", ""),
        "object": "chat.completion",
        "created": created,
        "model": message.get("model", ""),
        "choices": [{"index": 0, "message": reply, "logprobs": None,
                     "finish_reason": finish_reason_for(message.get("stop_reason"))}],
    }
    usage = usage_from_anthropic(message.get("usage"))
    if usage is not None:
        out["usage"] = openai_usage_body(usage)
    return out


# --------------------------------------------------------------------------- stream


class AnthropicEventsToOpenAIChunks(JsonEventStream):
    """Anthropic Messages SSE events in, OpenAI `chat.completion.chunk` SSE out."""

    def __init__(self, *, include_usage: bool, clock: Callable[[], float] = time.time) -> None:
        self._include_usage = include_usage
        self._clock = clock
        self._id = ""
        self._model = ""
        self._created = 0
        self._start_usage: dict[str, Any] = {}
        self._tools: dict[int, int] = {}
        JsonEventStream.__init__(self)

    def _chunk(self, delta: dict[str, Any], finish: str | None = None) -> bytes:
        return encode_event(compact_json({
            "id": self._id,
            "object": "chat.completion.chunk",
            "created": self._created,
            "model": self._model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
        }).decode())

    def _event(self, data: dict[str, Any], out: list[bytes]) -> None:
        kind = data.get("type")
        if kind == "message_start":
            message = data.get("message")
            message = message if isinstance(message, dict) else {}
            self._id = str(message.get("id", ""))
            self._model = str(message.get("model", ""))
            self._created = int(self._clock())
            usage = message.get("usage")
            self._start_usage = dict(usage) if isinstance(usage, dict) else {}
            out.append(self._chunk({"role": "assistant", "content": ""}))
        elif kind == "content_block_start":
            self._block_start(data, out)
        elif kind == "content_block_delta":
            self._block_delta(data, out)
        elif kind == "message_delta":
            self._message_delta(data, out)
        elif kind == "message_stop":
            if self._include_usage and self._usage is not None:
                out.append(encode_event(compact_json({
                    "id": self._id,
                    "object": "chat.completion.chunk",
                    "created": self._created,
                    "model": self._model,
                    "choices": [],
                    "usage": openai_usage_body(self._usage),
                }).decode()))
            out.append(encode_event("[DONE]"))
            self._ended = True
        elif kind == "error":
            error = data.get("error")
            found = error.get("message") if isinstance(error, dict) else None
            message = scrub(found) if isinstance(found, str) else ""
            out.append(encode_event(compact_json({"error": {
                "message": message or "The provider failed while streaming.",
                "type": "upstream_error",
                "param": None,
                "code": ErrorCode.PROVIDER_ERROR.value,
            }}).decode()))
            self._ended = True

    def _block_start(self, data: Mapping[str, Any], out: list[bytes]) -> None:
        block = data.get("content_block")
        index = data.get("index")
        if not isinstance(block, dict) or not isinstance(index, int):
            return
        if block.get("type") == "tool_use":
            position = len(self._tools)
            self._tools[index] = position
            self._deltas += 1
            out.append(self._chunk({"tool_calls": [{
                "index": position,
                "id": block.get("id", ""),
                "type": "function",
                "function": {"name": block.get("name", ""), "arguments": ""},
            }]}))
        elif block.get("type") == "text" and block.get("text"):
            self._deltas += 1
            out.append(self._chunk({"content": block["text"]}))

    def _block_delta(self, data: Mapping[str, Any], out: list[bytes]) -> None:
        delta = data.get("delta")
        if not isinstance(delta, dict):
            return
        if delta.get("type") == "text_delta":
            text = delta.get("text")
            if isinstance(text, str) and text:
                self._deltas += 1
                out.append(self._chunk({"content": text}))
        elif delta.get("type") == "input_json_delta":
            fragment = delta.get("partial_json")
            position = self._tools.get(data.get("index", -1))
            if isinstance(fragment, str) and fragment and position is not None:
                self._deltas += 1
                out.append(self._chunk({"tool_calls": [{
                    "index": position, "function": {"arguments": fragment}}]}))

    def _message_delta(self, data: Mapping[str, Any], out: list[bytes]) -> None:
        delta = data.get("delta")
        stop_reason = delta.get("stop_reason") if isinstance(delta, dict) else None
        usage = data.get("usage")
        if isinstance(usage, dict):
            merged = {**self._start_usage,
                      **{key: value for key, value in usage.items() if value is not None}}
            self._usage = usage_from_anthropic(merged)
        out.append(self._chunk({}, finish_reason_for(stop_reason)))


# --------------------------------------------------------------------------- translator


class OpenAIToAnthropic(output_limits.OpenAIDoorRules):
    """One request through the OpenAI door to Anthropic."""

    backend: Final = Backend.ANTHROPIC

    def __init__(self, *, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._include_usage = False

    def request(
        self, body: dict[str, Any], *, upstream_model: str, api_version: str | None,
        output_limit: OutputLimit = NO_OUTPUT_LIMIT,
    ) -> UpstreamRequest:
        request = validate_openai_door(body)
        _, self._include_usage = stream_options(request)
        out = build_anthropic_request(request, upstream_model, output_limit.default)
        return UpstreamRequest(body=compact_json(out), path=MESSAGES_PATH,
                               headers=(("anthropic-version", ANTHROPIC_VERSION),))

    def response(self, status: int, body: bytes) -> TranslatedResponse:
        message = provider_document(body)
        completion = chat_completion_from_message(message, int(self._clock()))
        return TranslatedResponse(body=compact_json(completion),
                                  usage=usage_from_anthropic(message.get("usage")))

    def error(self, status: int, body: bytes, headers: Mapping[str, str]) -> tuple[int, bytes]:
        return map_provider_error(Dialect.OPENAI, status, body)

    def stream(self) -> AnthropicEventsToOpenAIChunks:
        return AnthropicEventsToOpenAIChunks(include_usage=self._include_usage, clock=self._clock)
