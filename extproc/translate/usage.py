"""Reading token usage out of provider payloads, and writing it in each dialect.

OpenAI-shaped usage (OpenAI, Azure, Mistral, vLLM, Ollama, TGI):
`{"prompt_tokens", "completion_tokens", "prompt_tokens_details": {"cached_tokens"}}`,
where `prompt_tokens` already includes the cached tokens.

Anthropic usage: `{"input_tokens", "output_tokens", "cache_read_input_tokens",
"cache_creation_input_tokens"}`, where `input_tokens` excludes both cache counts; the
gateway's `Usage.input_tokens` is the sum of the three.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from extproc.translate.types import Usage

__all__ = [
    "anthropic_usage_body",
    "openai_usage_body",
    "usage_from_anthropic",
    "usage_from_openai",
]


def _count(value: object) -> int | None:
    if isinstance(value, bool) or not isinstance(value, int):
        return None
    return max(value, 0)


_STANDARD_TIERS = frozenset({None, "default", "auto", "standard"})
"""Service tiers billed at the configured prices; any other (priority, flex, scale, ...)
is billed differently and counts as unpriced."""


def _positive(mapping: object, name: str) -> bool:
    return isinstance(mapping, Mapping) and bool(_count(mapping.get(name)))


def _unpriced_openai(usage: Mapping[str, Any], service_tier: object) -> tuple[str, ...]:
    unpriced = []
    if (_positive(usage.get("prompt_tokens_details"), "audio_tokens")
            or _positive(usage.get("completion_tokens_details"), "audio_tokens")):
        unpriced.append("audio_tokens")
    if service_tier not in _STANDARD_TIERS:
        unpriced.append(f"service_tier:{str(service_tier)[:20]}")
    return tuple(unpriced)


def _unpriced_anthropic(usage: Mapping[str, Any]) -> tuple[str, ...]:
    unpriced = []
    tools = usage.get("server_tool_use")
    if isinstance(tools, Mapping) and any(_count(v) for v in tools.values()):
        unpriced.append("server_tool_use")
    tier = usage.get("service_tier")
    if tier not in _STANDARD_TIERS and tier != "batch":
        unpriced.append(f"service_tier:{str(tier)[:20]}")
    return tuple(unpriced)


def usage_from_openai(usage: object, *, service_tier: object = None) -> Usage | None:
    """`Usage` from an OpenAI `usage` object (and the response's `service_tier`); None
    when the counts are missing."""
    if not isinstance(usage, Mapping):
        return None
    prompt = _count(usage.get("prompt_tokens"))
    completion = _count(usage.get("completion_tokens"))
    if prompt is None or completion is None:
        return None
    details = usage.get("prompt_tokens_details")
    cached = _count(details.get("cached_tokens")) if isinstance(details, Mapping) else None
    return Usage(input_tokens=prompt, output_tokens=completion,
                 cached_input_tokens=min(cached or 0, prompt),
                 unpriced=_unpriced_openai(usage, service_tier))


def usage_from_anthropic(usage: object) -> Usage | None:
    """`Usage` from a complete Anthropic `usage` object; None when the counts are missing."""
    if not isinstance(usage, Mapping):
        return None
    uncached = _count(usage.get("input_tokens"))
    output = _count(usage.get("output_tokens"))
    if uncached is None or output is None:
        return None
    read = _count(usage.get("cache_read_input_tokens")) or 0
    created = _count(usage.get("cache_creation_input_tokens")) or 0
    return Usage(input_tokens=uncached + read + created, output_tokens=output,
                 cached_input_tokens=read, unpriced=_unpriced_anthropic(usage),
                 cache_write_input_tokens=created)


def openai_usage_body(usage: Usage) -> dict[str, Any]:
    """`usage` as OpenAI clients read it."""
    return {
        "prompt_tokens": usage.input_tokens,
        "completion_tokens": usage.output_tokens,
        "total_tokens": usage.input_tokens + usage.output_tokens,
        "prompt_tokens_details": {"cached_tokens": usage.cached_input_tokens},
    }


def anthropic_usage_body(usage: Usage) -> dict[str, Any]:
    """`usage` as Anthropic clients read it (`input_tokens` without the cached part)."""
    return {
        "input_tokens": usage.input_tokens - usage.cached_input_tokens,
        "output_tokens": usage.output_tokens,
        "cache_read_input_tokens": usage.cached_input_tokens,
        "cache_creation_input_tokens": 0,
    }
