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
from types import MappingProxyType
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


_LABELS: Final = {name: f"[{name.upper()}_" for name in DETECTORS}
"""The start of each detector's placeholders (`[EMAIL_`), built once."""


_Compiled = tuple[dict[str, Action], tuple[str, ...], bool]
_COMPILED: dict[int, tuple[Mapping[str, Action], _Compiled]] = {}
"""id(a policy's actions) -> (those actions, kept so the id stays theirs; compiled)."""
_COMPILED_MAX: Final = 256


def _compiled(actions: Mapping[str, Action]) -> _Compiled:
    """(the detectors that act, in `DETECTORS` order, and their actions; their names;
    whether any denies), once per policy: a policy's actions are the same on every
    request. Keyed by identity (hashing the actions would cost more than building them
    for a merged, per-request policy), and only for a policy's read-only mapping
    (`GuardrailPolicy.pii`, whose dict nothing else holds). The dict is shared by every
    `Redactor` of the policy: read only."""
    frozen = type(actions) is MappingProxyType  # a policy's: nothing can change it
    cached = _COMPILED.get(id(actions)) if frozen else None
    if cached is not None and cached[0] is actions:
        return cached[1]
    acting: dict[str, Action] = {name: actions[name] for name in DETECTORS
                                 if name in actions and actions[name] is not Action.ALLOW}
    compiled = acting, tuple(acting), Action.DENY in acting.values()
    if not frozen:
        return compiled  # a caller's mapping may change: never cached
    if len(_COMPILED) >= _COMPILED_MAX:
        _COMPILED.clear()  # merged per-request policies: never reused, never piling up
    _COMPILED[id(actions)] = actions, compiled
    return compiled


def _add(counter: Counter[str], counts: dict[str, int]) -> None:
    """`counter.update(counts)` without its generic Python-level path."""
    for name, count in counts.items():
        counter[name] = counter.get(name, 0) + count


class Redactor:
    """PII actions and placeholders for one request."""

    def __init__(self, actions: Mapping[str, Action]) -> None:
        self._actions, self._names, self._denies = _compiled(actions)
        self._placeholders: dict[tuple[str, str], str] = {}
        self._numbers: dict[str, int] = {}
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
            number = self._numbers.get(detector, 0) + 1
            self._numbers[detector] = number
            known = f"{_LABELS[detector]}{number}]"
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
        """`text` rebuilt with one join; the counts go into the counters once per call."""
        parts: list[str] = []
        append = parts.append
        counts: dict[str, int] = {}
        denied: dict[str, int] = {}
        check_deny = self._denies and not deny_as_redact
        actions, known, placeholder = self._actions, self._placeholders, self.placeholder
        position = 0
        for detector, start, end in found:
            if check_deny and actions[detector] is Action.DENY:
                denied[detector] = denied.get(detector, 0) + 1
                continue
            counts[detector] = counts.get(detector, 0) + 1
            value = text[start:end]
            append(text[position:start])
            append(known.get((detector, value)) or placeholder(detector, value))
            position = end
        if denied:
            _add(self.denied, denied)
        if not parts:
            return text
        _add(self.redacted, counts)
        append(text[position:])
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
