"""Apply PII actions to text: count matches, replace them with stable placeholders.

A `Redactor` lives for one request. The same value gets the same placeholder everywhere
in that request - the prompt, the answer, every chunk of a stream - and different values
of one kind get `[EMAIL_1]`, `[EMAIL_2]`, ... in order of first sight, so a model can
still tell "the same address" from "another address". Placeholders never repeat the value
and are not derived from it (no hash a reader could test guesses against).

Bodies are walked as parsed JSON: only string values under the prompt's fields are read,
and never the values of keys that carry no free text (roles, ids, image data), so a
base64 image does not cost a scan and cannot produce matches.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from typing import Any, Final

from extproc.guardrails.pii import Found, find
from extproc.guardrails.settings import DETECTORS, Action

__all__ = ["PROMPT_FIELDS", "Redactor"]

PROMPT_FIELDS: Final = ("messages", "system", "prompt", "input", "instructions")
"""Top-level request fields whose strings are the prompt (chat, messages, completions,
embeddings and responses shapes)."""
_SKIPPED_KEYS: Final = frozenset({
    "role", "type", "id", "tool_call_id", "tool_use_id", "name", "model", "media_type",
    "image_url", "source", "input_audio", "file", "cache_control", "signature",
    "detail", "format", "mime_type", "url",
})
"""Keys whose values are identifiers, enums or binary payloads, never free text."""


class Redactor:
    """PII actions and placeholders for one request."""

    def __init__(self, actions: Mapping[str, Action]) -> None:
        self._actions = {name: actions[name] for name in DETECTORS
                         if name in actions and actions[name] is not Action.ALLOW}
        self._names = tuple(self._actions)
        self._placeholders: dict[tuple[str, str], str] = {}
        self._numbers: Counter[str] = Counter()
        self.redacted: Counter[str] = Counter()
        """Matches replaced, by detector."""
        self.denied: Counter[str] = Counter()
        """Matches of detectors whose action is deny, by detector."""
        self.prompt_bytes = 0
        """UTF-8 bytes of every string scanned by `scan_request`."""

    @property
    def active(self) -> bool:
        return bool(self._names)

    def placeholder(self, detector: str, value: str) -> str:
        key = (detector, value)
        known = self._placeholders.get(key)
        if known is None:
            self._numbers[detector] += 1
            known = f"[{detector.upper()}_{self._numbers[detector]}]"
            self._placeholders[key] = known
        return known

    def text(self, text: str, *, deny_as_redact: bool = False) -> str:
        """`text` with every redact match replaced; deny matches are counted in `denied`
        (and left in place: the request will not be sent), or replaced too when
        `deny_as_redact` (an answer cannot be refused, only cleaned)."""
        found = find(text, self._names)
        if not found:
            return text
        return self._replace(text, found, deny_as_redact=deny_as_redact)

    def release(self, text: str, window: int) -> tuple[str, str]:
        """(the part of streamed `text` that can go now, redacted; the part held back):
        at most `window` characters are held, and never a cut through a match."""
        cut = max(0, len(text) - window)
        if not self._names:
            return text[:cut], text[cut:]
        found = find(text, self._names)
        for match in found:
            if match.start < cut < match.end:
                cut = match.start
        done = [match for match in found if match.end <= cut]
        head = self._replace(text[:cut], done, deny_as_redact=True) if done else text[:cut]
        return head, text[cut:]

    def _replace(self, text: str, found: list[Found], *, deny_as_redact: bool) -> str:
        parts: list[str] = []
        position = 0
        for match in found:
            action = self._actions[match.detector]
            if action is Action.DENY and not deny_as_redact:
                self.denied[match.detector] += 1
                continue
            self.redacted[match.detector] += 1
            parts.append(text[position:match.start])
            parts.append(self.placeholder(match.detector, text[match.start:match.end]))
            position = match.end
        if not parts:
            return text
        parts.append(text[position:])
        return "".join(parts)

    def scan_request(self, request: dict[str, Any]) -> None:
        """Redact the prompt fields of a parsed request in place; count its bytes."""
        for name in PROMPT_FIELDS:
            if name in request:
                request[name] = self._walk(request[name], count=True)

    def scan_value(self, value: Any) -> Any:
        """A parsed JSON value (an answer's content) with its strings redacted; deny
        detectors redact too."""
        return self._walk(value, count=False)

    def _walk(self, value: Any, *, count: bool) -> Any:
        if isinstance(value, str):
            if count:
                self.prompt_bytes += len(value) if value.isascii() else len(value.encode())
            return self.text(value, deny_as_redact=not count) if self._names else value
        if isinstance(value, list):
            for index, item in enumerate(value):
                value[index] = self._walk(item, count=count)
        elif isinstance(value, dict):
            for key, item in value.items():
                if key not in _SKIPPED_KEYS:
                    value[key] = self._walk(item, count=count)
        return value
