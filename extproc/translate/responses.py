"""POST /v1/responses (OpenAI Responses API): passthrough, or translation to Chat Completions.

Passthrough (`ResponsesPassthrough`: OpenAI at `/v1/responses`, Azure OpenAI at its v1
path `/openai/v1/responses` with the deployment as `model`): the body keeps the
Responses wire format with `model` replaced; answers and `response.*` streams pass
through byte for byte. Usage: `usage.input_tokens` (cached part in
`input_tokens_details.cached_tokens`) and `usage.output_tokens`, read from the answer or
from the stream's `response.completed` (or `.incomplete` / `.failed`) event.

Stored state (decision 0112): a response stored by the provider (`store: true`, the
Responses API's default) lives on the *gateway's* provider account, which every tenant
shares: any tenant that learns a response id could read or continue it through
`previous_response_id`. So unless the tenant has `responses_store: true`:

* `store` is forced to `false` (absent or false: sent as false; `true`: 400, param
  `store`);
* `previous_response_id` and `conversation` are refused with 400 naming the field: they
  read stored state; send the whole conversation in `input` instead.

Translation (`ResponsesToChat`: Anthropic, Gemini, Mistral, OpenAI-compatible): the request is
rewritten as a Chat Completions request and handed to the OpenAI door's translator for
the backend (`translator_for(Dialect.OPENAI, backend)`), whose answer (JSON or Chat SSE)
is rewritten as a Responses object or as `response.*` events. Translated:

* `input` (a string, or items: messages with `input_text` / `output_text` /
  `input_image` (URL) parts, `function_call`, `function_call_output`; `reasoning` items
  are dropped), `instructions` (a leading system message);
* `tools` of type `function`, `tool_choice` (`auto`, `none`, `required`, a function);
* `max_output_tokens` -> `max_tokens`; `temperature`, `top_p`, `parallel_tool_calls`,
  `user`, `metadata`, `stream`; `text.format` `json_schema` / `json_object` ->
  `response_format`.

Refused with 400 naming the field (nothing reaches the provider): built-in tools (any
`tools[i].type` other than `function`: `web_search`, `file_search`, `code_interpreter`,
`computer_use`, `image_generation`, `mcp`, ...), `background`, `previous_response_id`,
`conversation`, `prompt`, `include`, `reasoning`, `truncation: auto`, `store: true`,
file inputs and image `file_id`s, and any other input item type.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable, Mapping
from typing import Any, Final

from extproc.errors import Dialect
from extproc.translate import limits
from extproc.translate.base import translator_for
from extproc.translate.provider_errors import map_provider_error, scrubbed_stream_error
from extproc.translate.sse import SseDecoder, SseEvent, encode_event
from extproc.translate.types import (
    NO_OUTPUT_LIMIT,
    Backend,
    OutputLimit,
    SseStream,
    StreamProgress,
    StreamTranslator,
    TranslatedResponse,
    Translator,
    UpstreamRequest,
    Usage,
)
from extproc.translate.usage import usage_from_openai
from extproc.translate.validation import compact_json, invalid, json_object, unsupported

__all__ = [
    "AZURE_RESPONSES_PATH",
    "MAX_OUTPUT_TOKENS",
    "RESPONSES_PATH",
    "ChatToResponsesStream",
    "ResponsesPassthrough",
    "ResponsesPassthroughStream",
    "ResponsesToChat",
    "usage_from_responses",
]

RESPONSES_PATH: Final = "/v1/responses"
AZURE_RESPONSES_PATH: Final = "/openai/v1/responses"
MAX_OUTPUT_TOKENS: Final = "max_output_tokens"
_INPUT_IMAGE: Final = re.compile(rb'"type"\s*:\s*"input_image"')
_FINAL_EVENTS: Final = frozenset({"response.completed", "response.incomplete",
                                  "response.failed"})
_SERVER_TOOL_CALLS: Final = frozenset({
    "web_search_call", "file_search_call", "code_interpreter_call", "computer_call",
    "image_generation_call", "mcp_call", "local_shell_call"})
"""Output items of built-in tools, billed per call on top of tokens: unpriced usage."""
_STATEFUL: Final = ("previous_response_id", "conversation")
_UNTRANSLATABLE: Final = ("background", "previous_response_id", "conversation", "prompt",
                          "include", "reasoning")
_PASSED_TO_CHAT: Final = ("temperature", "top_p", "parallel_tool_calls", "user", "metadata",
                          "service_tier")
_KNOWN: Final = frozenset({
    "model", "input", "instructions", "tools", "tool_choice", MAX_OUTPUT_TOKENS, "stream",
    "store", "text", "truncation", *_UNTRANSLATABLE, *_PASSED_TO_CHAT})
_CHAT_ROLES: Final = {"user": "user", "system": "system", "developer": "system",
                      "assistant": "assistant"}


def usage_from_responses(usage: object, output: object = None) -> Usage | None:
    """`Usage` from a Responses `usage` object (and the response's `output` items)."""
    if not isinstance(usage, Mapping):
        return None
    unpriced: tuple[str, ...] = ()
    if isinstance(output, list) and any(isinstance(item, Mapping) and item.get("type")
                                        in _SERVER_TOOL_CALLS for item in output):
        unpriced = ("server_tool_calls",)
    base = usage_from_openai({"prompt_tokens": usage.get("input_tokens"),
                              "completion_tokens": usage.get("output_tokens"),
                              "prompt_tokens_details": usage.get("input_tokens_details")})
    if base is None:
        return None
    return Usage(input_tokens=base.input_tokens, output_tokens=base.output_tokens,
                 cached_input_tokens=base.cached_input_tokens, unpriced=unpriced)


def _enforce_store(request: dict[str, Any], store_allowed: bool) -> None:
    if store_allowed:
        return
    if request.get("store") is True:
        raise invalid("'store: true' is not allowed for your key: stored responses live on "
                      "the gateway's provider account, shared by every tenant.", "store")
    for name in _STATEFUL:
        if request.get(name) is not None:
            raise invalid(f"'{name}' is not allowed for your key: it reads responses stored "
                          "on the gateway's shared provider account. Send the whole "
                          "conversation in 'input' instead.", name)
    request["store"] = False


class _ResponsesDoorRules:
    """The budget's reading of a Responses request: `max_output_tokens`, one answer."""

    def output_limit(self, body: Mapping[str, Any], *, cap: int) -> int | None:
        return limits.requested_output_limit(body, (MAX_OUTPUT_TOKENS,), cap=cap)

    def choices(self, body: Mapping[str, Any]) -> int:
        return 1

    def input_estimate(self, raw: bytes) -> int:
        return limits.input_estimate(raw, _INPUT_IMAGE)


class ResponsesPassthroughStream(SseStream):
    """Forwards `response.*` events re-framed, reading usage from the final event; an
    `error` event's message is scrubbed like an error body's."""

    def __init__(self) -> None:
        SseStream.__init__(self)

    def _handle(self, events: list[SseEvent]) -> bytes:
        out = []
        for event in events:
            try:
                payload = json.loads(event.data)
            except ValueError:
                payload = None
            if not isinstance(payload, dict):
                out.append(encode_event(event.data, event.event))
                continue
            kind = payload.get("type")
            if kind in _FINAL_EVENTS and isinstance(payload.get("response"), dict):
                response = payload["response"]
                usage = usage_from_responses(response.get("usage"), response.get("output"))
                if usage is not None:
                    self._usage = usage
            elif isinstance(kind, str) and kind.endswith(".delta"):
                self._deltas += 1
            elif kind == "error":
                scrubbed = scrubbed_stream_error(payload)
                payload = {**payload, "message": scrubbed.get("message")}
                out.append(encode_event(compact_json(payload).decode(), event.event))
                continue
            out.append(encode_event(event.data, event.event))
        return b"".join(out)


class ResponsesPassthrough(_ResponsesDoorRules):
    """One Responses request to OpenAI or Azure OpenAI, in the Responses wire format."""

    def __init__(self, backend: Backend, *, store_allowed: bool = False) -> None:
        if backend not in (Backend.OPENAI, Backend.AZURE):
            raise ValueError("the Responses API is served by OpenAI and Azure OpenAI only")
        self.backend = backend
        self._store_allowed = store_allowed

    def request(
        self, body: dict[str, Any], *, upstream_model: str, api_version: str | None,
        output_limit: OutputLimit = NO_OUTPUT_LIMIT,
    ) -> UpstreamRequest:
        request = dict(body)
        _enforce_store(request, self._store_allowed)
        if output_limit.default is not None and MAX_OUTPUT_TOKENS not in request:
            request[MAX_OUTPUT_TOKENS] = output_limit.default
        request["model"] = upstream_model
        path = AZURE_RESPONSES_PATH if self.backend is Backend.AZURE else RESPONSES_PATH
        return UpstreamRequest(body=compact_json(request), path=path)

    def response(self, status: int, body: bytes) -> TranslatedResponse:
        document = json_object(body)
        if document is None:
            return TranslatedResponse(body=body, usage=None)
        return TranslatedResponse(body=body, usage=usage_from_responses(
            document.get("usage"), document.get("output")))

    def error(self, status: int, body: bytes, headers: Mapping[str, str]) -> tuple[int, bytes]:
        return map_provider_error(Dialect.OPENAI, status, body)

    def stream(self) -> ResponsesPassthroughStream:
        return ResponsesPassthroughStream()


# -- translation to Chat Completions ------------------------------------------------------

def _text_of(parts: object, where: str) -> str | list[dict[str, Any]]:
    """Responses content (a string or parts) as Chat content."""
    if isinstance(parts, str):
        return parts
    if not isinstance(parts, list):
        raise invalid(f"'{where}' must be a string or an array of content parts.", where)
    out: list[dict[str, Any]] = []
    for index, part in enumerate(parts):
        at = f"{where}[{index}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind in ("input_text", "output_text", "text") and isinstance(part.get("text"), str):
            out.append({"type": "text", "text": part["text"]})
        elif kind == "refusal" and isinstance(part.get("refusal"), str):
            out.append({"type": "text", "text": part["refusal"]})
        elif kind == "input_image" and isinstance(part.get("image_url"), str):
            image: dict[str, Any] = {"url": part["image_url"]}
            if part.get("detail") is not None:
                image["detail"] = part["detail"]
            out.append({"type": "image_url", "image_url": image})
        else:
            raise invalid(f"The content part type {str(kind)[:40]!r} at '{at}' cannot be "
                          "translated for this model (text and image URLs only).",
                          f"{at}.type")
    return out


def _plain(content: str | list[dict[str, Any]]) -> str | list[dict[str, Any]]:
    """Text-only parts joined into a string (what assistant and tool turns take)."""
    if isinstance(content, list) and all(p["type"] == "text" for p in content):
        return "".join(p["text"] for p in content)
    return content


def _messages(body: Mapping[str, Any]) -> list[dict[str, Any]]:
    messages: list[dict[str, Any]] = []
    instructions = body.get("instructions")
    if instructions is not None:
        if not isinstance(instructions, str):
            raise invalid("'instructions' must be a string.", "instructions")
        messages.append({"role": "system", "content": instructions})
    items = body.get("input")
    if isinstance(items, str):
        return [*messages, {"role": "user", "content": items}]
    if not isinstance(items, list) or not items:
        raise invalid("'input' must be a non-empty string or array.", "input")
    for index, item in enumerate(items):
        at = f"input[{index}]"
        if not isinstance(item, dict):
            raise invalid(f"'{at}' must be an object.", at)
        kind = item.get("type", "message")
        if kind == "message":
            role = _CHAT_ROLES.get(item.get("role"))  # type: ignore[arg-type]
            if role is None:
                raise invalid(f"'{at}.role' must be user, system, developer or assistant.",
                              f"{at}.role")
            content = _text_of(item.get("content"), f"{at}.content")
            messages.append({"role": role, "content": content if role == "user"
                             else _plain(content)})
        elif kind == "function_call":
            call = {"id": item.get("call_id"), "type": "function",
                    "function": {"name": item.get("name"), "arguments": item.get("arguments")}}
            last = messages[-1] if messages else None
            if last is not None and last["role"] == "assistant" and "tool_calls" in last:
                last["tool_calls"].append(call)
            else:
                messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind == "function_call_output":
            output = item.get("output")
            messages.append({"role": "tool", "tool_call_id": item.get("call_id"),
                             "content": output if isinstance(output, str)
                             else _plain(_text_of(output, f"{at}.output"))})
        elif kind == "reasoning":
            continue  # opaque reasoning state of another provider: nothing to translate
        else:
            raise invalid(f"The input item type {str(kind)[:40]!r} at '{at}' cannot be "
                          "translated for this model.", f"{at}.type")
    return messages


def _tools(body: Mapping[str, Any], backend: Backend) -> list[dict[str, Any]] | None:
    tools = body.get("tools")
    if tools is None:
        return None
    if not isinstance(tools, list):
        raise invalid("'tools' must be an array.", "tools")
    out = []
    for index, tool in enumerate(tools):
        kind = tool.get("type") if isinstance(tool, dict) else None
        if kind != "function" or not isinstance(tool, dict):
            raise invalid(f"The tool type {str(kind)[:40]!r} (tools[{index}]) is not "
                          f"supported by {backend.display_name}: built-in tools run only on "
                          "OpenAI and Azure OpenAI; use function tools.",
                          f"tools[{index}].type")
        function = {name: tool[name] for name in ("name", "description", "parameters",
                                                  "strict") if tool.get(name) is not None}
        out.append({"type": "function", "function": function})
    return out


def _tool_choice(choice: object) -> object:
    if choice is None or choice in ("auto", "none", "required"):
        return choice
    if isinstance(choice, dict) and choice.get("type") == "function":
        return {"type": "function", "function": {"name": choice.get("name")}}
    raise invalid("'tool_choice' must be auto, none, required or a function.", "tool_choice")


def _response_format(text: object) -> dict[str, Any] | None:
    if text is None:
        return None
    fmt = text.get("format") if isinstance(text, dict) else None
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    if fmt is None or kind == "text":
        return None
    if kind == "json_object":
        return {"type": "json_object"}
    if kind == "json_schema" and isinstance(fmt, dict):
        schema = {name: fmt[name] for name in ("name", "schema", "strict", "description")
                  if name in fmt}
        return {"type": "json_schema", "json_schema": schema}
    raise invalid("'text.format.type' must be text, json_object or json_schema.",
                  "text.format.type")


def _chat_request(body: Mapping[str, Any], backend: Backend) -> dict[str, Any]:
    for name in body:
        if name not in _KNOWN:
            raise invalid(f"The parameter '{name[:40]}' of the Responses API cannot be "
                          f"translated for {backend.display_name}.", name[:40])
    for name in _UNTRANSLATABLE:
        if body.get(name) not in (None, False, []):
            raise unsupported(name, backend)
    if body.get("store") is True:
        raise unsupported("store", backend)
    if body.get("truncation") not in (None, "disabled"):
        raise unsupported("truncation", backend)
    chat: dict[str, Any] = {"model": body.get("model"), "messages": _messages(body)}
    tools = _tools(body, backend)
    if tools is not None:
        chat["tools"] = tools
    choice = _tool_choice(body.get("tool_choice"))
    if choice is not None:
        chat["tool_choice"] = choice
    response_format = _response_format(body.get("text"))
    if response_format is not None:
        chat["response_format"] = response_format
    if body.get(MAX_OUTPUT_TOKENS) is not None:
        chat[limits.MAX_TOKENS] = body[MAX_OUTPUT_TOKENS]
    for name in _PASSED_TO_CHAT:
        if body.get(name) is not None:
            chat[name] = body[name]
    if body.get("stream") is True:
        chat["stream"] = True
        chat["stream_options"] = {"include_usage": True}
    return chat


def _usage_body(usage: Usage | None) -> dict[str, Any] | None:
    if usage is None:
        return None
    return {"input_tokens": usage.input_tokens,
            "input_tokens_details": {"cached_tokens": usage.cached_input_tokens},
            "output_tokens": usage.output_tokens,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": usage.input_tokens + usage.output_tokens}


class _Shell:
    """The fields of a Responses object that echo the request."""

    def __init__(self, body: Mapping[str, Any], clock: Callable[[], float]) -> None:
        self.model = str(body.get("model"))
        self.created_at = int(clock())
        self.echo = {
            "instructions": body.get("instructions"),
            "max_output_tokens": body.get(MAX_OUTPUT_TOKENS),
            "metadata": body.get("metadata") or {},
            "parallel_tool_calls": body.get("parallel_tool_calls", True),
            "previous_response_id": None,
            "store": False,
            "temperature": body.get("temperature"),
            "text": body.get("text") or {"format": {"type": "text"}},
            "tool_choice": body.get("tool_choice", "auto"),
            "tools": body.get("tools") or [],
            "top_p": body.get("top_p"),
            "truncation": "disabled",
            "user": body.get("user"),
        }

    def response(self, response_id: str, status: str, output: list[dict[str, Any]],
                 usage: Usage | None, finish_reason: str | None) -> dict[str, Any]:
        incomplete = status == "incomplete"
        return {"id": response_id, "object": "response", "created_at": self.created_at,
                "status": status, "error": None,
                "incomplete_details": {"reason": "max_output_tokens"} if incomplete else None,
                "model": self.model, "output": output, **self.echo,
                "reasoning": {"effort": None, "summary": None},
                "usage": _usage_body(usage)}


def _status(finish_reason: str | None) -> str:
    return "incomplete" if finish_reason == "length" else "completed"


def _output_items(message: Mapping[str, Any], suffix: str) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = []
    text = message.get("content")
    if isinstance(text, str) and text:
        items.append({"type": "message", "id": f"msg_{suffix}", "status": "completed",
                      "role": "assistant",
                      "content": [{"type": "output_text", "text": text, "annotations": []}]})
    for call in message.get("tool_calls") or ():
        function = call.get("function") or {}
        items.append({"type": "function_call", "id": f"fc_{call.get('id')}",
                      "call_id": call.get("id"), "name": function.get("name"),
                      "arguments": function.get("arguments") or "", "status": "completed"})
    return items


class ChatToResponsesStream(StreamProgress):
    """Chat Completions SSE (from the OpenAI door's translator for the backend) rewritten
    as `response.*` events, incrementally: `response.created` and `.in_progress` first,
    then per output item `output_item.added`, its deltas and its `.done` events, and
    `response.completed` (with usage) when the Chat stream ends with `[DONE]`."""

    def __init__(self, inner: StreamTranslator, shell: _Shell) -> None:
        StreamProgress.__init__(self)
        self._inner = inner
        self._shell = shell
        self._decoder = SseDecoder()
        self._sequence = 0
        self._id = "resp_asc"
        self._started = False
        self._finish: str | None = None
        self._items: list[dict[str, Any]] = []
        self._text_index: int | None = None
        self._calls: dict[int, int] = {}
        """Chat tool-call index -> output index."""

    @property
    def usage(self) -> Usage | None:
        return self._inner.usage

    @property
    def output_tokens_so_far(self) -> int:
        return self._inner.output_tokens_so_far

    @property
    def first_token_seen(self) -> bool:
        return self._inner.first_token_seen

    def feed(self, chunk: bytes) -> bytes:
        return self._handle(self._decoder.feed(self._inner.feed(chunk)))

    def flush(self) -> bytes:
        return self._handle(self._decoder.feed(self._inner.flush()) + self._decoder.flush())

    def _event(self, kind: str, **fields: Any) -> bytes:
        payload = {"type": kind, "sequence_number": self._sequence, **fields}
        self._sequence += 1
        return encode_event(compact_json(payload).decode(), kind)

    def _handle(self, events: list[SseEvent]) -> bytes:
        out: list[bytes] = []
        for event in events:
            if event.data == "[DONE]":
                out.extend(self._close())
                continue
            try:
                chunk = json.loads(event.data)
            except ValueError:
                continue
            if not isinstance(chunk, dict):
                continue
            if chunk.get("error") is not None:
                error = scrubbed_stream_error(chunk["error"])
                out.append(self._event("error", code=error.get("code"),
                                       message=error.get("message"), param=None))
                continue
            if not self._started:
                self._started = True
                self._id = f"resp_{chunk.get('id') or 'asc'}"
                empty = self._shell.response(self._id, "in_progress", [], None, None)
                out.append(self._event("response.created", response=empty))
                out.append(self._event("response.in_progress", response=empty))
            for choice in chunk.get("choices") or ():
                out.extend(self._choice(choice))
        return b"".join(out)

    def _choice(self, choice: Mapping[str, Any]) -> list[bytes]:
        out: list[bytes] = []
        delta = choice.get("delta") or {}
        text = delta.get("content")
        if isinstance(text, str) and text:
            if self._text_index is None:
                self._text_index = len(self._items)
                item: dict[str, Any] = {
                    "type": "message", "id": f"msg_{self._id}", "status": "in_progress",
                        "role": "assistant", "content": [], "_text": ""}
                self._items.append(item)
                out.append(self._event("response.output_item.added",
                                       output_index=self._text_index, item=_public(item)))
                out.append(self._event("response.content_part.added",
                                       item_id=item["id"], output_index=self._text_index,
                                       content_index=0, part=_text_part("")))
            item = self._items[self._text_index]
            item["_text"] += text
            out.append(self._event("response.output_text.delta", item_id=item["id"],
                                   output_index=self._text_index, content_index=0,
                                   delta=text))
        for call in delta.get("tool_calls") or ():
            index = call.get("index", 0)
            function = call.get("function") or {}
            if index not in self._calls:
                self._calls[index] = len(self._items)
                item = {"type": "function_call", "id": f"fc_{call.get('id')}",
                        "call_id": call.get("id"), "name": function.get("name"),
                        "arguments": "", "status": "in_progress"}
                self._items.append(item)
                out.append(self._event("response.output_item.added",
                                       output_index=self._calls[index], item=dict(item)))
            item = self._items[self._calls[index]]
            fragment = function.get("arguments")
            if isinstance(fragment, str) and fragment:
                item["arguments"] += fragment
                out.append(self._event("response.function_call_arguments.delta",
                                       item_id=item["id"], output_index=self._calls[index],
                                       delta=fragment))
        if choice.get("finish_reason") is not None:
            self._finish = choice["finish_reason"]
        return out

    def _close(self) -> list[bytes]:
        out: list[bytes] = []
        done: list[dict[str, Any]] = []
        for index, item in enumerate(self._items):
            item["status"] = "completed"
            if item["type"] == "message":
                text = item.pop("_text")
                item["content"] = [_text_part(text)]
                out.append(self._event("response.output_text.done", item_id=item["id"],
                                       output_index=index, content_index=0, text=text))
                out.append(self._event("response.content_part.done", item_id=item["id"],
                                       output_index=index, content_index=0,
                                       part=_text_part(text)))
            else:
                out.append(self._event("response.function_call_arguments.done",
                                       item_id=item["id"], output_index=index,
                                       arguments=item["arguments"]))
            out.append(self._event("response.output_item.done", output_index=index,
                                   item=item))
            done.append(item)
        status = _status(self._finish)
        final = self._shell.response(self._id, status, done, self.usage, self._finish)
        out.append(self._event(f"response.{status}", response=final))
        return out


def _text_part(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": []}


def _public(item: Mapping[str, Any]) -> dict[str, Any]:
    return {name: value for name, value in item.items() if not name.startswith("_")}


class ResponsesToChat(_ResponsesDoorRules):
    """One Responses request to a Chat Completions backend, through the OpenAI door's
    translator for that backend."""

    def __init__(self, backend: Backend, *, store_allowed: bool = False,
                 clock: Callable[[], float] = time.time) -> None:
        del store_allowed  # nothing is stored on a translated backend: store is refused
        self.backend = backend
        self._clock = clock
        self._inner: Translator = translator_for(Dialect.OPENAI, backend)
        self._shell: _Shell | None = None

    def request(
        self, body: dict[str, Any], *, upstream_model: str, api_version: str | None,
        output_limit: OutputLimit = NO_OUTPUT_LIMIT,
    ) -> UpstreamRequest:
        chat = _chat_request(body, self.backend)
        self._shell = _Shell(body, self._clock)
        return self._inner.request(chat, upstream_model=upstream_model,
                                   api_version=api_version,
                                   output_limit=output_limit)

    def response(self, status: int, body: bytes) -> TranslatedResponse:
        assert self._shell is not None
        chat = self._inner.response(status, body)
        try:
            document = json.loads(chat.body)
        except (ValueError, UnicodeDecodeError):
            return chat
        choices = document.get("choices") if isinstance(document, dict) else None
        if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
            return chat
        first = choices[0]
        suffix = str(document.get("id") or "asc")
        output = _output_items(first.get("message") or {}, suffix)
        finish = first.get("finish_reason")
        answer = self._shell.response(f"resp_{suffix}", _status(finish), output,
                                      chat.usage, finish)
        return TranslatedResponse(body=compact_json(answer), usage=chat.usage)

    def error(self, status: int, body: bytes, headers: Mapping[str, str]) -> tuple[int, bytes]:
        return self._inner.error(status, body, headers)

    def stream(self) -> ChatToResponsesStream:
        assert self._shell is not None
        return ChatToResponsesStream(self._inner.stream(), self._shell)
