"""Reading a Chat Completions request for a backend that does not speak it.

The OpenAI door -> Anthropic and OpenAI door -> Gemini translators check the same
request the same way before each builds its own wire shape: the same parameter table
walk, message roles, text parts, tool calls, function tools and `tool_choice` values,
with the same 400 messages (the backend's display name filled in). Keeping those checks
here means a fix to one door's reading of a request is a fix to both.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Final

from extproc.errors import GatewayError
from extproc.translate.types import Backend
from extproc.translate.validation import (
    invalid,
    optional_positive_int,
    optional_string,
    unsupported,
)

__all__ = [
    "FunctionTool",
    "ToolCall",
    "assistant_texts",
    "check_parameters",
    "function_tools",
    "image_url",
    "is_value",
    "message_texts",
    "messages_by_role",
    "never",
    "no_turns",
    "requested_output_limit",
    "tool_call_id",
    "tool_calls",
    "tool_choice",
    "user_parts",
]

_PARAM_NAME: Final = re.compile(r"[A-Za-z0-9_.\-]{1,64}")


def is_value(expected: object) -> Callable[[object], bool]:
    """A neutral-value test: the same type and value (so `1` is not `True`)."""
    return lambda value: type(value) is type(expected) and value == expected


def never(value: object) -> bool:
    """A neutral-value test for a parameter no value of which the backend honours."""
    return False


def check_parameters(body: Mapping[str, Any], backend: Backend,
                     honoured: Mapping[str, Callable[[object], bool]],
                     passed: frozenset[str]) -> None:
    """Refuse any parameter the backend cannot honour: one in `honoured` whose value is
    not neutral, or one neither translated nor dropped (`passed`). A name that does not
    look like a parameter is refused without being echoed."""
    for name, value in body.items():
        if value is None:
            continue
        neutral = honoured.get(name)
        if neutral is not None:
            if not neutral(value):
                raise unsupported(name, backend)
            continue
        if name in passed:
            continue
        if not _PARAM_NAME.fullmatch(name):
            raise invalid(f"The request has a parameter {backend.display_name} does not "
                          "support.")
        raise unsupported(name, backend)


def requested_output_limit(body: Mapping[str, Any]) -> int | None:
    """The smaller of `max_completion_tokens` and `max_tokens`, None if neither is sent."""
    limits = [limit for limit in (optional_positive_int(body, "max_completion_tokens"),
                                  optional_positive_int(body, "max_tokens"))
              if limit is not None]
    return min(limits) if limits else None


def messages_by_role(messages: list[Any],
                     backend: Backend) -> Iterator[tuple[str, str, dict[str, Any]]]:
    """(param, role, message) for each message with a role the translators convert;
    a non-object message, a `function` message or an unknown role is refused."""
    for i, message in enumerate(messages):
        param = f"messages[{i}]"
        if not isinstance(message, dict):
            raise invalid(f"'{param}' must be an object.", param)
        role = message.get("role")
        if role in ("system", "developer", "user", "assistant", "tool"):
            yield param, str(role), message
        elif role == "function":
            raise invalid(f"Messages with role 'function' are not supported by "
                          f"{backend.display_name}; use 'tool' messages.", f"{param}.role")
        else:
            raise invalid(f"'{param}.role' must be one of 'system', 'developer', 'user', "
                          "'assistant', 'tool'.", f"{param}.role")


def no_turns() -> GatewayError:
    """The 400 for messages that hold only system/developer text."""
    return invalid("'messages' must contain at least one user or assistant message.",
                   "messages")


def message_texts(content: object, param: str, *, role: str) -> list[str]:
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


def image_url(part: Mapping[str, Any], param: str) -> str:
    """The URL of an `image_url` part (the object form or a bare string)."""
    image = part.get("image_url")
    url = image.get("url") if isinstance(image, dict) else image
    if not isinstance(url, str):
        raise invalid(f"'{param}.image_url.url' must be a string.", f"{param}.image_url.url")
    return url


def user_parts(content: object, param: str, backend: Backend, *,
               text: Callable[[str], dict[str, Any]],
               image: Callable[[Mapping[str, Any], str], dict[str, Any]],
               ) -> list[dict[str, Any]]:
    """A user message's content as the backend's parts: `text(t)` for each non-empty
    text, `image(part, param)` for each `image_url` part; other part types refused."""
    if isinstance(content, str):
        return [text(content)] if content else []
    if not isinstance(content, list):
        raise invalid(f"'{param}' must be a string or an array of content parts.", param)
    parts: list[dict[str, Any]] = []
    for j, part in enumerate(content):
        part_param = f"{param}[{j}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part, dict):
            found = part.get("text")
            if not isinstance(found, str):
                raise invalid(f"'{part_param}.text' must be a string.", f"{part_param}.text")
            if found:
                parts.append(text(found))
        elif kind == "image_url" and isinstance(part, dict):
            parts.append(image(part, part_param))
        else:
            raise invalid("Only 'text' and 'image_url' content parts are supported by "
                          f"{backend.display_name}.", f"{part_param}.type")
    return parts


def assistant_texts(content: object, param: str) -> list[str]:
    """The non-empty texts of an assistant message's content (`text` and `refusal`
    parts); `param` names the message."""
    texts: list[str] = []
    if isinstance(content, str):
        if content:
            texts.append(content)
    elif isinstance(content, list):
        for j, part in enumerate(content):
            kind = part.get("type") if isinstance(part, dict) else None
            key = "text" if kind == "text" else "refusal" if kind == "refusal" else None
            found = part.get(key) if key is not None and isinstance(part, dict) else None
            if not isinstance(found, str):
                raise invalid(f"'{param}.content[{j}]' must be a text or refusal part.",
                              f"{param}.content[{j}]")
            if found:
                texts.append(found)
    elif content is not None:
        raise invalid(f"'{param}.content' must be a string or an array of text parts.",
                      f"{param}.content")
    return texts


@dataclass(frozen=True, slots=True)
class ToolCall:
    """One checked assistant tool call: `arguments` is the decoded JSON object."""

    id: str
    name: str
    arguments: dict[str, Any]


def tool_calls(found: object, param: str) -> list[ToolCall]:
    """An assistant message's `tool_calls` (absent: none), each checked."""
    if found is None:
        return []
    if not isinstance(found, list):
        raise invalid(f"'{param}' must be an array.", param)
    calls = []
    for k, call in enumerate(found):
        call_param = f"{param}[{k}]"
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(call, dict) or not isinstance(function, dict):
            raise invalid(f"'{call_param}' must be a function tool call.", call_param)
        call_id, name = call.get("id"), function.get("name")
        if not isinstance(call_id, str) or not call_id:
            raise invalid(f"'{call_param}.id' must be a non-empty string.", f"{call_param}.id")
        if not isinstance(name, str) or not name:
            raise invalid(f"'{call_param}.function.name' must be a non-empty string.",
                          f"{call_param}.function.name")
        arguments = function.get("arguments")
        where = f"{call_param}.function.arguments"
        args: object = None
        if arguments is None or arguments == "":
            args = {}
        elif isinstance(arguments, str):
            try:
                args = json.loads(arguments)
            except ValueError:
                args = None
        if not isinstance(args, dict):
            raise invalid(f"'{where}' must be a JSON object encoded as a string.", where)
        calls.append(ToolCall(id=call_id, name=name, arguments=args))
    return calls


def tool_call_id(message: Mapping[str, Any], param: str) -> str:
    """A `tool` message's `tool_call_id` (required, non-empty)."""
    call_id = message.get("tool_call_id")
    if not isinstance(call_id, str) or not call_id:
        raise invalid(f"'{param}.tool_call_id' must be a non-empty string.",
                      f"{param}.tool_call_id")
    return call_id


@dataclass(frozen=True, slots=True)
class FunctionTool:
    """One checked `tools[]` entry; `parameters` is None when the client sent none."""

    name: str
    description: str | None
    parameters: dict[str, Any] | None


def function_tools(tools: object, backend: Backend) -> list[FunctionTool]:
    """The `tools` array, each a `function` tool (other types refused)."""
    if not isinstance(tools, list):
        raise invalid("'tools' must be an array.", "tools")
    checked = []
    for k, tool in enumerate(tools):
        param = f"tools[{k}]"
        if not isinstance(tool, dict) or tool.get("type") != "function":
            raise invalid(f"Only 'function' tools are supported by {backend.display_name}.",
                          f"{param}.type")
        function = tool.get("function")
        if not isinstance(function, dict):
            raise invalid(f"'{param}.function' must be an object.", f"{param}.function")
        name = function.get("name")
        if not isinstance(name, str) or not name:
            raise invalid(f"'{param}.function.name' must be a non-empty string.",
                          f"{param}.function.name")
        description = optional_string(function, "description", f"{param}.function.description")
        schema = function.get("parameters")
        if schema is not None and not isinstance(schema, dict):
            raise invalid(f"'{param}.function.parameters' must be an object.",
                          f"{param}.function.parameters")
        checked.append(FunctionTool(name=name, description=description, parameters=schema))
    return checked


def tool_choice(choice: object) -> tuple[str, str | None] | None:
    """`tool_choice` as (mode, function name): ("auto" | "none" | "required", None) or
    ("function", name); None when absent."""
    if choice is None:
        return None
    if choice in ("auto", "none", "required"):
        return str(choice), None
    if (isinstance(choice, dict) and choice.get("type") == "function"
            and isinstance(choice.get("function"), dict)
            and isinstance(choice["function"].get("name"), str)):
        return "function", choice["function"]["name"]
    raise invalid("'tool_choice' must be 'auto', 'none', 'required' or a function choice.",
                  "tool_choice")
