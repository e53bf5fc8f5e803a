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

import json
import re
import time
from collections.abc import Callable, Mapping
from typing import Any, Final

from extproc.errors import Dialect, ErrorCode, GatewayError
from extproc.translate import limits as output_limits
from extproc.translate.provider_errors import map_provider_error, scrub
from extproc.translate.sse import SseDecoder, SseEvent, encode_event
from extproc.translate.types import (
    NO_OUTPUT_LIMIT,
    Backend,
    OutputLimit,
    StreamProgress,
    TranslatedResponse,
    UpstreamRequest,
)
from extproc.translate.usage import openai_usage_body, usage_from_anthropic
from extproc.translate.validation import (
    compact_json,
    invalid,
    optional_bool,
    optional_number,
    optional_positive_int,
    optional_stop,
    optional_string,
    unsupported,
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


def _is(expected: object) -> Callable[[object], bool]:
    return lambda value: type(value) is type(expected) and value == expected


def _never(value: object) -> bool:
    return False


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
_PARAM_NAME: Final = re.compile(r"[A-Za-z0-9_.\-]{1,64}")


def finish_reason_for(stop_reason: object) -> str:
    """OpenAI `finish_reason` for an Anthropic `stop_reason` (unknown ones -> "stop")."""
    return _FINISH_REASONS.get(stop_reason, "stop") if isinstance(stop_reason, str) else "stop"


# --------------------------------------------------------------------------- request


def _text_of(content: object, param: str, *, role: str) -> list[str]:
    """Texts of a string or an array of text parts (system/developer/tool messages)."""
    if isinstance(content, str):
        return [content]
    if isinstance(content, list):
        texts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" \
                    or not isinstance(part.get("text"), str):
                raise invalid(f"'{param}' of a {role} message must be text.", param)
            texts.append(part["text"])
        return texts
    raise invalid(f"'{param}' must be a string or an array of text parts.", param)


def _image_block(part: Mapping[str, Any], param: str) -> dict[str, Any]:
    image = part.get("image_url")
    url = image.get("url") if isinstance(image, dict) else image
    if not isinstance(url, str):
        raise invalid(f"'{param}.image_url.url' must be a string.", f"{param}.image_url.url")
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


def _user_blocks(content: object, param: str) -> list[dict[str, Any]]:
    if isinstance(content, str):
        return [{"type": "text", "text": content}] if content else []
    if not isinstance(content, list):
        raise invalid(f"'{param}' must be a string or an array of content parts.", param)
    blocks: list[dict[str, Any]] = []
    for j, part in enumerate(content):
        part_param = f"{param}[{j}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part, dict):
            text = part.get("text")
            if not isinstance(text, str):
                raise invalid(f"'{part_param}.text' must be a string.", f"{part_param}.text")
            if text:
                blocks.append({"type": "text", "text": text})
        elif kind == "image_url" and isinstance(part, dict):
            blocks.append(_image_block(part, part_param))
        else:
            raise invalid("Only 'text' and 'image_url' content parts are supported by "
                          "Anthropic.", f"{part_param}.type")
    return blocks


def _tool_use_blocks(tool_calls: object, param: str) -> list[dict[str, Any]]:
    if tool_calls is None:
        return []
    if not isinstance(tool_calls, list):
        raise invalid(f"'{param}' must be an array.", param)
    blocks = []
    for k, call in enumerate(tool_calls):
        call_param = f"{param}[{k}]"
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(call, dict) or not isinstance(function, dict):
            raise invalid(f"'{call_param}' must be a function tool call.", call_param)
        call_id = call.get("id")
        name = function.get("name")
        if not isinstance(call_id, str) or not call_id:
            raise invalid(f"'{call_param}.id' must be a non-empty string.", f"{call_param}.id")
        if not isinstance(name, str) or not name:
            raise invalid(f"'{call_param}.function.name' must be a non-empty string.",
                          f"{call_param}.function.name")
        arguments = function.get("arguments")
        where = f"{call_param}.function.arguments"
        if arguments is None or arguments == "":
            arguments_value: object = {}
        elif isinstance(arguments, str):
            try:
                arguments_value = json.loads(arguments)
            except ValueError:
                arguments_value = None
        else:
            arguments_value = None
        if not isinstance(arguments_value, dict):
            raise invalid(f"'{where}' must be a JSON object encoded as a string.", where)
        blocks.append({"type": "tool_use", "id": call_id, "name": name,
                       "input": arguments_value})
    return blocks


def _assistant_blocks(message: Mapping[str, Any], param: str) -> list[dict[str, Any]]:
    content = message.get("content")
    blocks: list[dict[str, Any]] = []
    if isinstance(content, str):
        if content:
            blocks.append({"type": "text", "text": content})
    elif isinstance(content, list):
        for j, part in enumerate(content):
            kind = part.get("type") if isinstance(part, dict) else None
            key = "text" if kind == "text" else "refusal" if kind == "refusal" else None
            text = part.get(key) if key is not None and isinstance(part, dict) else None
            if not isinstance(text, str):
                raise invalid(f"'{param}.content[{j}]' must be a text or refusal part.",
                              f"{param}.content[{j}]")
            if text:
                blocks.append({"type": "text", "text": text})
    elif content is not None:
        raise invalid(f"'{param}.content' must be a string or an array of text parts.",
                      f"{param}.content")
    blocks.extend(_tool_use_blocks(message.get("tool_calls"), f"{param}.tool_calls"))
    return blocks


def _append(turns: list[dict[str, Any]], role: str, blocks: list[dict[str, Any]]) -> None:
    if turns and turns[-1]["role"] == role:
        turns[-1]["content"].extend(blocks)
    else:
        turns.append({"role": role, "content": blocks})


def _convert_messages(messages: list[Any]) -> tuple[list[str], list[dict[str, Any]]]:
    system: list[str] = []
    turns: list[dict[str, Any]] = []
    for i, message in enumerate(messages):
        param = f"messages[{i}]"
        if not isinstance(message, dict):
            raise invalid(f"'{param}' must be an object.", param)
        role = message.get("role")
        content = message.get("content")
        if role in ("system", "developer"):
            system.extend(t for t in _text_of(content, f"{param}.content", role=str(role)) if t)
        elif role == "user":
            blocks = _user_blocks(content, f"{param}.content")
            if not blocks:
                raise invalid(f"'{param}.content' must not be empty.", f"{param}.content")
            _append(turns, "user", blocks)
        elif role == "assistant":
            blocks = _assistant_blocks(message, param)
            if blocks:
                _append(turns, "assistant", blocks)
        elif role == "tool":
            call_id = message.get("tool_call_id")
            if not isinstance(call_id, str) or not call_id:
                raise invalid(f"'{param}.tool_call_id' must be a non-empty string.",
                              f"{param}.tool_call_id")
            text = "".join(_text_of(content, f"{param}.content", role="tool"))
            _append(turns, "user",
                    [{"type": "tool_result", "tool_use_id": call_id, "content": text}])
        elif role == "function":
            raise invalid("Messages with role 'function' are not supported by Anthropic; "
                          "use 'tool' messages.", f"{param}.role")
        else:
            raise invalid(f"'{param}.role' must be one of 'system', 'developer', 'user', "
                          "'assistant', 'tool'.", f"{param}.role")
    if not turns:
        raise invalid("'messages' must contain at least one user or assistant message.",
                      "messages")
    for turn in turns:
        content = turn["content"]
        if len(content) == 1 and content[0]["type"] == "text":
            turn["content"] = content[0]["text"]
    return system, turns


def _convert_tools(tools: object) -> list[dict[str, Any]]:
    if not isinstance(tools, list):
        raise invalid("'tools' must be an array.", "tools")
    converted = []
    for k, tool in enumerate(tools):
        param = f"tools[{k}]"
        if not isinstance(tool, dict) or tool.get("type") != "function":
            raise invalid("Only 'function' tools are supported by Anthropic.", f"{param}.type")
        function = tool.get("function")
        if not isinstance(function, dict):
            raise invalid(f"'{param}.function' must be an object.", f"{param}.function")
        name = function.get("name")
        if not isinstance(name, str) or not name:
            raise invalid(f"'{param}.function.name' must be a non-empty string.",
                          f"{param}.function.name")
        entry: dict[str, Any] = {"name": name}
        description = optional_string(function, "description", f"{param}.function.description")
        if description:
            entry["description"] = description
        schema = function.get("parameters")
        if schema is None:
            schema = {"type": "object", "properties": {}}
        elif not isinstance(schema, dict):
            raise invalid(f"'{param}.function.parameters' must be an object.",
                          f"{param}.function.parameters")
        entry["input_schema"] = schema
        converted.append(entry)
    return converted


def _convert_tool_choice(choice: object, parallel: bool | None) -> dict[str, Any] | None:
    converted: dict[str, Any]
    if choice is None or choice == "auto":
        converted = {"type": "auto"}
    elif choice == "none":
        return {"type": "none"}
    elif choice == "required":
        converted = {"type": "any"}
    elif (isinstance(choice, dict) and choice.get("type") == "function"
          and isinstance(choice.get("function"), dict)
          and isinstance(choice["function"].get("name"), str)):
        converted = {"type": "tool", "name": choice["function"]["name"]}
    else:
        raise invalid("'tool_choice' must be 'auto', 'none', 'required' or a function choice.",
                      "tool_choice")
    if parallel is False:
        converted["disable_parallel_tool_use"] = True
    elif choice is None:
        return None
    return converted


def _check_parameters(body: Mapping[str, Any]) -> None:
    for name, value in body.items():
        if value is None or name in _TRANSLATED or name in DROPPED_FOR_ANTHROPIC:
            continue
        neutral = UNSUPPORTED_FOR_ANTHROPIC.get(name)
        if neutral is None and not _PARAM_NAME.fullmatch(name):
            raise invalid("The request has a parameter Anthropic does not support.")
        if neutral is None or not neutral(value):
            raise unsupported(name, _ANTHROPIC)


def build_anthropic_request(body: Mapping[str, Any], upstream_model: str,
                            default_limit: int | None = None) -> dict[str, Any]:
    """The Messages API body for a validated Chat Completions body."""
    _check_parameters(body)
    system, turns = _convert_messages(body["messages"])
    limits = [limit for limit in (optional_positive_int(body, "max_completion_tokens"),
                                  optional_positive_int(body, "max_tokens"))
              if limit is not None]
    out: dict[str, Any] = {
        "model": upstream_model,
        "max_tokens": min(limits) if limits else default_limit or DEFAULT_MAX_TOKENS,
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


def _invalid_response() -> GatewayError:
    return GatewayError(ErrorCode.PROVIDER_ERROR, "The provider sent an invalid response.")


def chat_completion_from_message(message: Mapping[str, Any], created: int) -> dict[str, Any]:
    """The Chat Completions body for an Anthropic Messages response body."""
    blocks = message.get("content")
    if not isinstance(blocks, list):
        raise _invalid_response()
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


class AnthropicEventsToOpenAIChunks(StreamProgress):
    """Anthropic Messages SSE events in, OpenAI `chat.completion.chunk` SSE out."""

    def __init__(self, *, include_usage: bool, clock: Callable[[], float] = time.time) -> None:
        self._decoder = SseDecoder()
        self._include_usage = include_usage
        self._clock = clock
        self._id = ""
        self._model = ""
        self._created = 0
        self._start_usage: dict[str, Any] = {}
        self._tools: dict[int, int] = {}
        StreamProgress.__init__(self)
        self._ended = False

    def feed(self, chunk: bytes) -> bytes:
        return self._handle(self._decoder.feed(chunk))

    def flush(self) -> bytes:
        return self._handle(self._decoder.flush())

    def _handle(self, events: list[SseEvent]) -> bytes:
        out: list[bytes] = []
        for event in events:
            if self._ended:
                break
            try:
                data = json.loads(event.data)
            except ValueError:
                continue
            if isinstance(data, dict):
                self._event(data, out)
        return b"".join(out)

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
        options = request.get("stream_options")
        if options is not None and not isinstance(options, dict):
            raise invalid("'stream_options' must be an object.", "stream_options")
        include = optional_bool(options or {}, "include_usage", "stream_options.include_usage")
        self._include_usage = include is True
        out = build_anthropic_request(request, upstream_model, output_limit.default)
        return UpstreamRequest(body=compact_json(out), path=MESSAGES_PATH,
                               headers=(("anthropic-version", ANTHROPIC_VERSION),))

    def response(self, status: int, body: bytes) -> TranslatedResponse:
        try:
            message = json.loads(body)
        except (ValueError, UnicodeDecodeError):
            raise _invalid_response() from None
        if not isinstance(message, dict):
            raise _invalid_response()
        completion = chat_completion_from_message(message, int(self._clock()))
        return TranslatedResponse(body=compact_json(completion),
                                  usage=usage_from_anthropic(message.get("usage")))

    def error(self, status: int, body: bytes, headers: Mapping[str, str]) -> tuple[int, bytes]:
        return map_provider_error(Dialect.OPENAI, status, body)

    def stream(self) -> AnthropicEventsToOpenAIChunks:
        return AnthropicEventsToOpenAIChunks(include_usage=self._include_usage, clock=self._clock)
