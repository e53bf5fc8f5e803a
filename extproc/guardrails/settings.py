"""What a tenant, a team or a route asks of its requests: the compiled guardrail policy.

One `GuardrailPolicy` per level, all optional fields; `effective(tenant, team, route)`
merges them into the one a request is checked against. The merge keeps the *strictest*
of each rule (the smaller cap, the narrower range or allow-list, the union of deny-lists,
the stronger PII action), so a team or a route can tighten its tenant's rules, never
loosen them: the same "an override only narrows" rule as route metadata (decision 0060,
and 0105 for guardrails).
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Final, TypeVar

from extproc.config_schema import GuardrailsSpec

__all__ = [
    "DETECTORS",
    "Action",
    "GuardrailPolicy",
    "ResponseRedaction",
    "effective",
    "policy_from_spec",
    "tighter",
]

DETECTORS: Final = ("secret", "email", "ipv6", "iban", "credit_card", "us_ssn", "ipv4",
                    "phone")
"""PII detectors, in the order overlapping matches are given to (the first wins)."""


class Action(enum.Enum):
    """What a PII detector's match does to a request; ordered by strictness."""

    ALLOW = "allow"
    REDACT = "redact"
    DENY = "deny"

    @property
    def strictness(self) -> int:
        return _STRICTNESS[self]


_STRICTNESS: Final = {Action.ALLOW: 0, Action.REDACT: 1, Action.DENY: 2}
_EMPTY: Final[Mapping[str, Action]] = MappingProxyType({})
_T = TypeVar("_T", int, float)


@dataclass(frozen=True, slots=True)
class ResponseRedaction:
    """Redaction of the provider's answer with the request's placeholders."""

    enabled: bool = False
    stream_window: int = 64
    """Characters of a streamed answer held back, so a match split over two chunks is
    still seen whole; a match longer than this may pass unredacted in a stream."""


@dataclass(frozen=True, slots=True)
class GuardrailPolicy:
    """One level's guardrails (None or empty: that level sets no such rule)."""

    models_allow: frozenset[str] | None = None
    models_deny: frozenset[str] = frozenset()
    max_tokens: int | None = None
    max_n: int | None = None
    temperature_min: float | None = None
    temperature_max: float | None = None
    tools_allowed: bool | None = None
    response_formats: frozenset[str] | None = None
    """Allowed `response_format.type` values; None: any."""
    max_prompt_bytes: int | None = None
    """UTF-8 bytes of the prompt's text (messages, system, tool results)."""
    max_prompt_tokens: int | None = None
    """Estimated tokens of the prompt's text (bytes / 3, the budget's estimate)."""
    pii: Mapping[str, Action] = field(default_factory=lambda: _EMPTY)
    """Detector name -> action; a detector not listed is `allow` (not run)."""
    responses: ResponseRedaction | None = None

    @property
    def active_pii(self) -> Mapping[str, Action]:
        """The detectors that do something (allow is not run at all)."""
        return {name: action for name, action in self.pii.items()
                if action is not Action.ALLOW}

    @property
    def redacts_responses(self) -> bool:
        return (self.responses is not None and self.responses.enabled
                and any(a is not Action.ALLOW for a in self.pii.values()))


def tighter(first: _T | None, second: _T | None) -> _T | None:
    """The smaller of two optional caps (None: no cap)."""
    if first is None:
        return second
    if second is None:
        return first
    return min(first, second)


def _looser_floor(first: float | None, second: float | None) -> float | None:
    """The larger of two optional lower bounds."""
    if first is None:
        return second
    if second is None:
        return first
    return max(first, second)


def _both(first: frozenset[str] | None, second: frozenset[str] | None) -> frozenset[str] | None:
    """Intersection of two optional allow-lists (None: everything)."""
    if first is None:
        return second
    if second is None:
        return first
    return first & second


def _merge(base: GuardrailPolicy, over: GuardrailPolicy) -> GuardrailPolicy:
    pii = dict(base.pii)
    for name, action in over.pii.items():
        if name not in pii or action.strictness > pii[name].strictness:
            pii[name] = action
    responses = base.responses
    if over.responses is not None:
        responses = over.responses if responses is None else ResponseRedaction(
            enabled=responses.enabled or over.responses.enabled,
            stream_window=max(responses.stream_window, over.responses.stream_window))
    tools: bool | None = base.tools_allowed
    if over.tools_allowed is not None:
        tools = over.tools_allowed if tools is None else tools and over.tools_allowed
    return GuardrailPolicy(
        models_allow=_both(base.models_allow, over.models_allow),
        models_deny=base.models_deny | over.models_deny,
        max_tokens=tighter(base.max_tokens, over.max_tokens),
        max_n=tighter(base.max_n, over.max_n),
        temperature_min=_looser_floor(base.temperature_min, over.temperature_min),
        temperature_max=tighter(base.temperature_max, over.temperature_max),
        tools_allowed=tools,
        response_formats=_both(base.response_formats, over.response_formats),
        max_prompt_bytes=tighter(base.max_prompt_bytes, over.max_prompt_bytes),
        max_prompt_tokens=tighter(base.max_prompt_tokens, over.max_prompt_tokens),
        pii=MappingProxyType(pii),
        responses=responses,
    )


_NONE: Final = GuardrailPolicy()


def effective(tenant: GuardrailPolicy | None, team: GuardrailPolicy | None = None,
              route: GuardrailPolicy | None = None) -> GuardrailPolicy:
    """The policy a request is checked against: the tenant's, tightened by its team's and
    its route's. Each level can only add restrictions (decision 0105)."""
    policy = tenant or _NONE
    for level in (team, route):
        if level is not None:
            policy = _merge(policy, level)
    return policy


def policy_from_spec(spec: GuardrailsSpec) -> GuardrailPolicy:
    """The compiled form of a validated `guardrails:` section (cross-section checks, such
    as model names, are `extproc.config`'s)."""
    models = spec.models
    temperature = spec.temperature
    prompt = spec.prompt
    pii = {name: Action(action) for name, action in (
        spec.pii.model_dump(exclude_none=True) if spec.pii is not None else {}).items()}
    responses = None
    if spec.responses is not None:
        responses = ResponseRedaction(enabled=spec.responses.redact,
                                      stream_window=spec.responses.stream_window)
    return GuardrailPolicy(
        models_allow=frozenset(models.allow) if models and models.allow is not None else None,
        models_deny=frozenset(models.deny or ()) if models else frozenset(),
        max_tokens=spec.max_tokens,
        max_n=spec.n,
        temperature_min=temperature.min if temperature else None,
        temperature_max=temperature.max if temperature else None,
        tools_allowed=spec.tools,
        response_formats=(frozenset(spec.response_format)
                          if spec.response_format is not None else None),
        max_prompt_bytes=prompt.max_bytes if prompt else None,
        max_prompt_tokens=prompt.max_tokens if prompt else None,
        pii=MappingProxyType(pii),
        responses=responses,
    )
