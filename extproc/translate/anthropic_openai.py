"""Anthropic Messages door -> OpenAI-shaped backends (OpenAI, compatible, Mistral, Azure).

Request (`/v1/chat/completions`; Azure: the deployment path, `model` left out):

* `model` -> the deployment's upstream model.
* `system` (string or text blocks, joined with a blank line) -> a leading `system` message.
* `user` content: string, `text`, `image` (base64 source -> `data:` URL, url source ->
  the URL) -> string or `text` / `image_url` parts.
* `user` `tool_result` blocks (string or text content) -> `tool` messages
  (`tool_call_id`), placed before the rest of that user turn.
* `assistant` `text` + `tool_use` blocks -> `content` + `tool_calls` (`input` ->
  `arguments` JSON string); thinking blocks are dropped.
* `max_tokens` -> `max_completion_tokens` (OpenAI, Azure) or `max_tokens` (Mistral,
  compatible); `models.<name>.output_limit_field` overrides it (not for Mistral).
* `temperature`, `top_p` -> the same; `stop_sequences` -> `stop`.
* `tools[]` `{name, description, input_schema}` -> `tools[].function`
  `{name, description, parameters}`.
* `tool_choice` auto / any / tool / none -> "auto" / "required" ("any" for Mistral) /
  a function choice / "none"; `disable_parallel_tool_use: true` ->
  `parallel_tool_calls: false`.
* `metadata.user_id` -> `user` (dropped for Mistral, which refuses `user`).
* `stream` -> `stream` + `stream_options.include_usage: true` (not for Mistral: it
  always sends usage in its last chunk).

Dropped without effect on the answer: `service_tier`, `cache_control` on blocks,
`is_error` on tool results. Refused with 400 "The parameter '<name>' is not supported
by <provider>." (param = the name): `top_k`, `thinking`, `container`, `mcp_servers`,
any parameter the Messages API does not define, and for Mistral
`tool_choice.disable_parallel_tool_use`. Other 400s: "Only 'text', 'image' and
'tool_result' content blocks are supported by <provider>.", "Only client tools (name,
description, input_schema) are supported by <provider>.".

Response: `message.content` -> a `text` block, `tool_calls` -> `tool_use` blocks;
`finish_reason` stop -> "end_turn", length -> "max_tokens", tool_calls / function_call
-> "tool_use", content_filter -> "refusal"; usage -> `input_tokens` (prompt minus
cached), `output_tokens`, `cache_read_input_tokens` (cached).

Stream: the first chunk with choices or usage -> `message_start` (input tokens when the
chunk already carries usage, else 0); text -> `content_block_start` (text) +
`content_block_delta` (text_delta); a new tool call -> `content_block_stop` of the open
block + `content_block_start` (tool_use with id and name) and its argument fragments as
`input_json_delta`; `data: [DONE]` (or the end of a stream that had a finish_reason) ->
`content_block_stop`, `message_delta` (stop_reason, usage incl. input tokens) and
`message_stop`; a `data: {"error": ...}` chunk -> an `error` event.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any, Final

from extproc.errors import Dialect
from extproc.translate import limits
from extproc.translate.openai_passthrough import (
    CHAT_COMPLETIONS_PATH,
    azure_path,
    count_openai_deltas,
)
from extproc.translate.provider_errors import (
    invalid_response,
    map_provider_error,
    provider_document,
    provider_message,
    scrub,
)
from extproc.translate.sse import SseEvent, encode_event
from extproc.translate.types import (
    NO_OUTPUT_LIMIT,
    Backend,
    OutputLimit,
    SseStream,
    TranslatedResponse,
    UpstreamRequest,
    Usage,
)
from extproc.translate.usage import anthropic_usage_body, usage_from_openai
from extproc.translate.validation import (
    compact_json,
    invalid,
    optional_bool,
    optional_number,
    optional_stop,
    optional_string,
    unsupported,
    validate_anthropic_door,
)

__all__ = [
    "DROPPED_FOR_OPENAI",
    "UNSUPPORTED_FOR_OPENAI",
    "AnthropicToOpenAI",
    "OpenAIChunksToAnthropicEvents",
    "build_openai_request",
    "message_from_chat_completion",
    "stop_reason_for",
]

UNSUPPORTED_FOR_OPENAI: Final = ("top_k", "thinking", "container", "mcp_servers")
DROPPED_FOR_OPENAI: Final = frozenset({"service_tier"})
_TRANSLATED: Final = frozenset({
    "model", "messages", "max_tokens", "system", "metadata", "stop_sequences", "stream",
    "temperature", "top_p", "tools", "tool_choice",
})
_STOP_REASONS: Final = {
    "stop": "end_turn",
    "length": "max_tokens",
    "tool_calls": "tool_use",
    "function_call": "tool_use",
    "content_filter": "refusal",
}
_PARAM_NAME: Final = re.compile(r"[A-Za-z0-9_.\-]{1,64}")
_MAX_TOKENS_FIELD: Final = {
    Backend.OPENAI: "max_completion_tokens",
    Backend.AZURE: "max_completion_tokens",
    Backend.MISTRAL: "max_tokens",
    Backend.OPENAI_COMPATIBLE: "max_tokens",
    Backend.GEMINI: "max_tokens",  # read back into maxOutputTokens (anthropic_gemini)
}


def stop_reason_for(finish_reason: object) -> str:
    """Anthropic `stop_reason` for an OpenAI `finish_reason` (unknown ones -> "end_turn")."""
    if isinstance(finish_reason, str):
        return _STOP_REASONS.get(finish_reason, "end_turn")
    return "end_turn"


# --------------------------------------------------------------------------- request


def _system_text(system: object) -> str:
    if isinstance(system, str):
        return system
    if isinstance(system, list):
        texts = []
        for block in system:
            if not isinstance(block, dict) or block.get("type") != "text" \
                    or not isinstance(block.get("text"), str):
                break
            texts.append(block["text"])
        else:
            return "\n\n".join(texts)
    raise invalid("'system' must be a string or an array of text blocks.", "system")


def _image_url(block: Mapping[str, Any], param: str) -> dict[str, Any]:
    source = block.get("source")
    if isinstance(source, dict):
        if source.get("type") == "base64" and isinstance(source.get("media_type"), str) \
                and isinstance(source.get("data"), str):
            url = f"data:{source['media_type']};base64,{source['data']}"
            return {"type": "image_url", "image_url": {"url": url}}
        if source.get("type") == "url" and isinstance(source.get("url"), str):
            return {"type": "image_url", "image_url": {"url": source["url"]}}
    raise invalid(f"'{param}.source' must be a base64 or url image source.", f"{param}.source")


def _tool_result_text(block: Mapping[str, Any], param: str, backend: Backend) -> str:
    content = block.get("content")
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for k, item in enumerate(content):
            if not isinstance(item, dict) or item.get("type") != "text" \
                    or not isinstance(item.get("text"), str):
                raise invalid(f"Only text tool results are supported by {backend.display_name}.",
                              f"{param}.content[{k}]")
            texts.append(item["text"])
        return "".join(texts)
    raise invalid(f"'{param}.content' must be a string or an array of text blocks.",
                  f"{param}.content")


def _blocks(content: object, param: str) -> list[Any]:
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    if isinstance(content, list):
        return content
    raise invalid(f"'{param}' must be a string or an array of content blocks.", param)


def _user_messages(content: object, param: str, backend: Backend) -> list[dict[str, Any]]:
    if isinstance(content, str):
        return [{"role": "user", "content": content}]
    tools: list[dict[str, Any]] = []
    parts: list[dict[str, Any]] = []
    for j, block in enumerate(_blocks(content, param)):
        block_param = f"{param}[{j}]"
        kind = block.get("type") if isinstance(block, dict) else None
        if kind == "text" and isinstance(block, dict) and isinstance(block.get("text"), str):
            parts.append({"type": "text", "text": block["text"]})
        elif kind == "image" and isinstance(block, dict):
            parts.append(_image_url(block, block_param))
        elif kind == "tool_result" and isinstance(block, dict):
            call_id = block.get("tool_use_id")
            if not isinstance(call_id, str) or not call_id:
                raise invalid(f"'{block_param}.tool_use_id' must be a non-empty string.",
                              f"{block_param}.tool_use_id")
            tools.append({"role": "tool", "tool_call_id": call_id,
                          "content": _tool_result_text(block, block_param, backend)})
        else:
            raise invalid("Only 'text', 'image' and 'tool_result' content blocks are supported "
                          f"by {backend.display_name}.", f"{block_param}.type")
    messages = tools
    if len(parts) == 1 and parts[0]["type"] == "text":
        messages.append({"role": "user", "content": parts[0]["text"]})
    elif parts:
        messages.append({"role": "user", "content": parts})
    return messages


def _assistant_message(content: object, param: str, backend: Backend) -> dict[str, Any]:
    if isinstance(content, str):
        return {"role": "assistant", "content": content}
    texts: list[str] = []
    calls: list[dict[str, Any]] = []
    for j, block in enumerate(_blocks(content, param)):
        block_param = f"{param}[{j}]"
        kind = block.get("type") if isinstance(block, dict) else None
        if kind == "text" and isinstance(block, dict) and isinstance(block.get("text"), str):
            texts.append(block["text"])
        elif kind == "tool_use" and isinstance(block, dict):
            call_id, name = block.get("id"), block.get("name")
            if not isinstance(call_id, str) or not isinstance(name, str):
                raise invalid(f"'{block_param}' must have a string 'id' and 'name'.", block_param)
            tool_input = block.get("input", {})
            if not isinstance(tool_input, dict):
                raise invalid(f"'{block_param}.input' must be an object.", f"{block_param}.input")
            calls.append({"id": call_id, "type": "function",
                          "function": {"name": name,
                                       "arguments": compact_json(tool_input).decode()}})
        elif kind in ("thinking", "redacted_thinking"):
            continue
        else:
            raise invalid("Only 'text', 'image' and 'tool_result' content blocks are supported "
                          f"by {backend.display_name}.", f"{block_param}.type")
    message: dict[str, Any] = {"role": "assistant", "content": "".join(texts) if texts else None}
    if calls:
        message["tool_calls"] = calls
    elif message["content"] is None:
        message["content"] = ""
    return message


def _convert_messages(body: Mapping[str, Any], backend: Backend) -> list[dict[str, Any]]:
    messages: list[dict[str, Any]] = []
    if body.get("system") is not None:
        system = _system_text(body["system"])
        if system:
            messages.append({"role": "system", "content": system})
    for i, message in enumerate(body["messages"]):
        param = f"messages[{i}]"
        if not isinstance(message, dict):
            raise invalid(f"'{param}' must be an object.", param)
        role = message.get("role")
        if role == "user":
            messages.extend(_user_messages(message.get("content"), f"{param}.content", backend))
        elif role == "assistant":
            messages.append(_assistant_message(message.get("content"), f"{param}.content",
                                               backend))
        else:
            raise invalid(f"'{param}.role' must be 'user' or 'assistant'.", f"{param}.role")
    return messages


def _convert_tools(tools: object, backend: Backend) -> list[dict[str, Any]]:
    if not isinstance(tools, list):
        raise invalid("'tools' must be an array.", "tools")
    converted = []
    for k, tool in enumerate(tools):
        param = f"tools[{k}]"
        if not isinstance(tool, dict) or tool.get("type") not in (None, "custom"):
            raise invalid("Only client tools (name, description, input_schema) are supported "
                          f"by {backend.display_name}.", f"{param}.type")
        name = tool.get("name")
        if not isinstance(name, str) or not name:
            raise invalid(f"'{param}.name' must be a non-empty string.", f"{param}.name")
        schema = tool.get("input_schema")
        if not isinstance(schema, dict):
            raise invalid(f"'{param}.input_schema' must be an object.", f"{param}.input_schema")
        function: dict[str, Any] = {"name": name}
        description = optional_string(tool, "description", f"{param}.description")
        if description:
            function["description"] = description
        function["parameters"] = schema
        converted.append({"type": "function", "function": function})
    return converted


def _convert_tool_choice(choice: object, backend: Backend) -> tuple[object, bool | None]:
    """(`tool_choice`, `parallel_tool_calls`) for an Anthropic `tool_choice`."""
    if choice is None:
        return None, None
    if not isinstance(choice, dict):
        raise invalid("'tool_choice' must be an object.", "tool_choice")
    kind = choice.get("type")
    converted: object
    if kind == "auto":
        converted = "auto"
    elif kind == "any":
        converted = "any" if backend is Backend.MISTRAL else "required"
    elif kind == "none":
        converted = "none"
    elif kind == "tool" and isinstance(choice.get("name"), str):
        converted = {"type": "function", "function": {"name": choice["name"]}}
    else:
        raise invalid("'tool_choice.type' must be 'auto', 'any', 'tool' or 'none'.",
                      "tool_choice.type")
    disable = optional_bool(choice, "disable_parallel_tool_use",
                            "tool_choice.disable_parallel_tool_use")
    if disable and backend is Backend.MISTRAL:
        raise unsupported("tool_choice.disable_parallel_tool_use", backend)
    return converted, (False if disable else None)


def _check_parameters(body: Mapping[str, Any], backend: Backend) -> None:
    for name, value in body.items():
        if value is None or name in _TRANSLATED or name in DROPPED_FOR_OPENAI:
            continue
        if name not in UNSUPPORTED_FOR_OPENAI and not _PARAM_NAME.fullmatch(name):
            raise invalid(f"The request has a parameter {backend.display_name} does not "
                          "support.")
        raise unsupported(name, backend)


def build_openai_request(body: Mapping[str, Any], backend: Backend,
                         upstream_model: str, limit_field: str | None = None) -> dict[str, Any]:
    """The Chat Completions body for a validated Messages body; `limit_field` is the
    configured output-limit field (None: the backend's)."""
    _check_parameters(body, backend)
    out: dict[str, Any] = {}
    if backend is not Backend.AZURE:
        out["model"] = upstream_model
    out["messages"] = _convert_messages(body, backend)
    field = _MAX_TOKENS_FIELD[backend]
    if limit_field is not None and backend is not Backend.MISTRAL:
        field = limit_field
    out[field] = body["max_tokens"]
    if body.get("tools") is not None:
        tools = _convert_tools(body["tools"], backend)
        if tools:
            out["tools"] = tools
            choice, parallel = _convert_tool_choice(body.get("tool_choice"), backend)
            if choice is not None:
                out["tool_choice"] = choice
            if parallel is not None:
                out["parallel_tool_calls"] = parallel
    for name in ("temperature", "top_p"):
        value = optional_number(body, name)
        if value is not None:
            out[name] = value
    stop = optional_stop(body, "stop_sequences")
    if stop:
        out["stop"] = stop
    metadata = body.get("metadata")
    if metadata is not None and not isinstance(metadata, dict):
        raise invalid("'metadata' must be an object.", "metadata")
    user = optional_string(metadata or {}, "user_id", "metadata.user_id")
    if user and backend is not Backend.MISTRAL:
        out["user"] = user
    if body.get("stream") is True:
        out["stream"] = True
        if backend is not Backend.MISTRAL:
            out["stream_options"] = {"include_usage": True}
    return out


# --------------------------------------------------------------------------- response


def _tool_input(arguments: object) -> dict[str, Any]:
    if isinstance(arguments, str):
        try:
            value = json.loads(arguments) if arguments else {}
        except ValueError:
            return {}
        return value if isinstance(value, dict) else {}
    return {}


def message_from_chat_completion(completion: Mapping[str, Any]) -> dict[str, Any]:
    """The Messages API body for a Chat Completions response body."""
    choices = completion.get("choices")
    if not isinstance(choices, list):
        raise invalid_response()
    choice = choices[0] if choices and isinstance(choices[0], dict) else {}
    message = choice.get("message")
    message = message if isinstance(message, dict) else {}
    content: list[dict[str, Any]] = []
    text = message.get("content")
    if isinstance(text, str) and text:
        content.append({"type": "text", "text": text})
    refusal = message.get("refusal")
    if isinstance(refusal, str) and refusal and not text:
        content.append({"type": "text", "text": refusal})
    calls = message.get("tool_calls")
    for call in calls if isinstance(calls, list) else []:
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(call, dict) or not isinstance(function, dict):
            continue
        content.append({"type": "tool_use", "id": call.get("id", ""),
                        "name": function.get("name", ""),
                        "input": _tool_input(function.get("arguments"))})
    usage = usage_from_openai(completion.get("usage")) or Usage(0, 0)
    return {
        "id": completion.get("id", ""),
        "type": "message",
        "role": "assistant",
        "model": completion.get("model", ""),
        "content": content,
        "stop_reason": stop_reason_for(choice.get("finish_reason")),
        "stop_sequence": None,
        "usage": anthropic_usage_body(usage),
    }


# --------------------------------------------------------------------------- stream


def _event(kind: str, payload: dict[str, Any]) -> bytes:
    return encode_event(compact_json({"type": kind, **payload}).decode(), kind)


class OpenAIChunksToAnthropicEvents(SseStream):
    """OpenAI `chat.completion.chunk` SSE in, Anthropic Messages SSE events out."""

    def __init__(self) -> None:
        self._started = False
        self._ended = False
        self._open: int | None = None
        self._open_is_text = False
        self._next_index = 0
        self._tools: dict[int, int] = {}
        self._finish: object = None
        self._finished = False
        SseStream.__init__(self)

    def flush(self) -> bytes:
        out = [SseStream.flush(self)]
        if self._finished and not self._ended:
            self._end(out)
        return b"".join(out)

    def _handle(self, events: list[SseEvent]) -> bytes:
        out: list[bytes] = []
        for event in events:
            if self._ended:
                break
            if event.data == "[DONE]":
                self._end(out)
                continue
            try:
                chunk = json.loads(event.data)
            except ValueError:
                continue
            if isinstance(chunk, dict):
                self._chunk(chunk, out)
        return b"".join(out)

    def _start(self, chunk: Mapping[str, Any], out: list[bytes]) -> None:
        self._started = True
        usage = usage_from_openai(chunk.get("usage"))
        start_usage = anthropic_usage_body(usage) if usage else {"input_tokens": 0}
        start_usage["output_tokens"] = 0
        out.append(_event("message_start", {"message": {
            "id": chunk.get("id") or "msg_gateway",
            "type": "message",
            "role": "assistant",
            "model": chunk.get("model") or "",
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": start_usage,
        }}))

    def _close_block(self, out: list[bytes]) -> None:
        if self._open is not None:
            out.append(_event("content_block_stop", {"index": self._open}))
            self._open = None

    def _chunk(self, chunk: dict[str, Any], out: list[bytes]) -> None:
        if chunk.get("error") is not None:
            error = chunk["error"]
            found = provider_message(chunk) if isinstance(error, dict | str) else None
            message = scrub(found) if found else ""
            out.append(_event("error", {"error": {
                "type": "api_error", "message": message or "The provider failed while streaming.",
            }}))
            self._ended = True
            return
        usage = usage_from_openai(chunk.get("usage"), service_tier=chunk.get("service_tier"))
        if usage is not None:
            self._usage = usage
        choices = chunk.get("choices")
        choices = choices if isinstance(choices, list) else []
        if not self._started and (choices or usage is not None):
            self._start(chunk, out)
        self._deltas += count_openai_deltas(chunk)
        for choice in choices[:1]:
            if not isinstance(choice, dict):
                continue
            delta = choice.get("delta")
            if isinstance(delta, dict):
                self._delta(delta, out)
            if choice.get("finish_reason") is not None:
                self._finish = choice["finish_reason"]
                self._finished = True

    def _delta(self, delta: Mapping[str, Any], out: list[bytes]) -> None:
        text = delta.get("content") or delta.get("refusal")
        if isinstance(text, str) and text:
            if self._open is None or not self._open_is_text:
                self._close_block(out)
                self._open, self._open_is_text = self._next_index, True
                self._next_index += 1
                out.append(_event("content_block_start", {
                    "index": self._open, "content_block": {"type": "text", "text": ""}}))
            out.append(_event("content_block_delta", {
                "index": self._open, "delta": {"type": "text_delta", "text": text}}))
        calls = delta.get("tool_calls")
        for call in calls if isinstance(calls, list) else []:
            if isinstance(call, dict):
                self._tool_delta(call, out)

    def _tool_delta(self, call: Mapping[str, Any], out: list[bytes]) -> None:
        position = call.get("index", 0)
        position = position if isinstance(position, int) else 0
        function = call.get("function")
        function = function if isinstance(function, dict) else {}
        index = self._tools.get(position)
        if index is None:
            self._close_block(out)
            index = self._next_index
            self._next_index += 1
            self._tools[position] = index
            self._open, self._open_is_text = index, False
            out.append(_event("content_block_start", {"index": index, "content_block": {
                "type": "tool_use",
                "id": call.get("id") or f"toolu_gateway_{position}",
                "name": function.get("name") or "",
                "input": {},
            }}))
        arguments = function.get("arguments")
        if isinstance(arguments, str) and arguments:
            out.append(_event("content_block_delta", {
                "index": index, "delta": {"type": "input_json_delta", "partial_json": arguments}}))

    def _end(self, out: list[bytes]) -> None:
        if not self._started:
            self._start({}, out)
        self._close_block(out)
        if self._usage is not None:
            usage: dict[str, Any] = anthropic_usage_body(self._usage)
        else:
            usage = {"output_tokens": self._deltas}
        out.append(_event("message_delta", {
            "delta": {"stop_reason": stop_reason_for(self._finish), "stop_sequence": None},
            "usage": usage,
        }))
        out.append(_event("message_stop", {}))
        self._ended = True


# --------------------------------------------------------------------------- translator


class AnthropicToOpenAI(limits.AnthropicDoorRules):
    """One request through the Anthropic door to an OpenAI-shaped backend."""

    def __init__(self, backend: Backend) -> None:
        if backend is Backend.ANTHROPIC:
            raise ValueError("AnthropicToOpenAI serves OpenAI-shaped backends only")
        self.backend = backend

    def request(
        self, body: dict[str, Any], *, upstream_model: str, api_version: str | None,
        output_limit: OutputLimit = NO_OUTPUT_LIMIT,
    ) -> UpstreamRequest:
        request = validate_anthropic_door(body)
        out = build_openai_request(request, self.backend, upstream_model, output_limit.field)
        path = (azure_path(upstream_model, api_version) if self.backend is Backend.AZURE
                else CHAT_COMPLETIONS_PATH)
        return UpstreamRequest(body=compact_json(out), path=path)

    def response(self, status: int, body: bytes) -> TranslatedResponse:
        completion = provider_document(body)
        return TranslatedResponse(body=compact_json(message_from_chat_completion(completion)),
                                  usage=usage_from_openai(completion.get("usage"),
                                                          service_tier=completion.get(
                                                              "service_tier")))

    def error(self, status: int, body: bytes, headers: Mapping[str, str]) -> tuple[int, bytes]:
        return map_provider_error(Dialect.ANTHROPIC, status, body)

    def stream(self) -> OpenAIChunksToAnthropicEvents:
        return OpenAIChunksToAnthropicEvents()
