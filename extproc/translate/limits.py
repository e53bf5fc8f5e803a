"""The wire rules a budget depends on, per dialect: which body fields bound the output,
which field a model family takes upstream, how many choices a request asks for, and how
many prompt tokens to hold for a body.

The translators apply them (each knows its door and its backend); `phases.py` only asks.

* Output limit, client side: OpenAI door `max_tokens` and `max_completion_tokens` (each
  present one must be a positive integer within the cap; the larger bounds the hold,
  since providers differ in which one wins); Anthropic door `max_tokens`.
* Output limit, upstream: `models.<name>.output_limit_field` when configured, else by
  family of the upstream model: o-series (`o1`, `o3-mini`, `o4-mini`, ...) and `gpt-5*`
  take `max_completion_tokens` and reject `max_tokens`; everything else `max_tokens`.
* Prompt estimate: body bytes / 3 (see `budgets.policy.estimate_input_tokens`) plus
  `IMAGE_TOKEN_ESTIMATE` per image part (`image_url` parts at the OpenAI door, `image`
  blocks at the Anthropic door): an image costs far more tokens than its URL has bytes.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

from extproc.budgets.policy import estimate_input_tokens
from extproc.errors import ErrorCode, GatewayError

__all__ = [
    "ANTHROPIC_IMAGE_PART",
    "IMAGE_TOKEN_ESTIMATE",
    "MAX_COMPLETION_TOKENS",
    "MAX_TOKENS",
    "OPENAI_IMAGE_PART",
    "OPENAI_LIMIT_FIELDS",
    "AnthropicDoorRules",
    "OpenAIDoorRules",
    "OutputLimit",
    "family_output_field",
    "input_estimate",
    "requested_choices",
    "requested_output_limit",
]

MAX_TOKENS: Final = "max_tokens"
MAX_COMPLETION_TOKENS: Final = "max_completion_tokens"
OPENAI_LIMIT_FIELDS: Final = (MAX_TOKENS, MAX_COMPLETION_TOKENS)
IMAGE_TOKEN_ESTIMATE: Final = 1_600
"""Tokens held per image part (a high-detail 1024x1024 image is ~765 OpenAI tokens,
~1,600 Anthropic tokens)."""
OPENAI_IMAGE_PART: Final = re.compile(rb'"type"\s*:\s*"image_url"')
ANTHROPIC_IMAGE_PART: Final = re.compile(rb'"type"\s*:\s*"image"')
_REASONING_FAMILY: Final = re.compile(r"(?i)^(?:o[1-9]|gpt-5)")
_MAX_CHOICES: Final = 128
"""OpenAI's own bound on `n`."""


@dataclass(frozen=True, slots=True)
class OutputLimit:
    """How the upstream body must bound output tokens.

    `field`: the configured upstream field (`models.<name>.output_limit_field`), None for
    the family rule. `default`: written into the upstream body when the client set no
    limit (budget tenants: the provider must not produce more than the hold covers).
    """

    field: str | None = None
    default: int | None = None


def family_output_field(upstream_model: str) -> str:
    """The output-limit field the upstream model's family accepts."""
    return MAX_COMPLETION_TOKENS if _REASONING_FAMILY.match(upstream_model) else MAX_TOKENS


def requested_output_limit(body: Mapping[str, Any], fields: tuple[str, ...], *,
                           cap: int) -> int | None:
    """The output-token bound the client asked for (None if it set none); 400 if a field
    is not a positive integer or is above `cap` (the tenant's `max_tokens`)."""
    bounds = []
    for name in fields:
        if name not in body:
            continue
        value = body[name]
        if type(value) is not int or value < 1:
            raise GatewayError(ErrorCode.INVALID_REQUEST,
                               f"'{name}' must be a positive integer.", param=name)
        if value > cap:
            raise GatewayError(ErrorCode.INVALID_REQUEST,
                               f"'{name}' must not exceed {cap} for your key.", param=name)
        bounds.append(value)
    return max(bounds, default=None)


def requested_choices(body: Mapping[str, Any]) -> int:
    """OpenAI door `n`: how many choices the provider produces (and bills)."""
    value = body.get("n")
    if value is None:
        return 1
    if type(value) is not int or not 1 <= value <= _MAX_CHOICES:
        raise GatewayError(ErrorCode.INVALID_REQUEST,
                           f"'n' must be an integer from 1 to {_MAX_CHOICES}.", param="n")
    return value


def input_estimate(raw: bytes, image_part: re.Pattern[bytes]) -> int:
    """Prompt tokens to hold for the client's body bytes."""
    return (estimate_input_tokens(len(raw))
            + IMAGE_TOKEN_ESTIMATE * len(image_part.findall(raw)))


class OpenAIDoorRules:
    """The budget's reading of an OpenAI-door request, whatever the backend: mixed into
    the translators of that door."""

    def output_limit(self, body: Mapping[str, Any], *, cap: int) -> int | None:
        return requested_output_limit(body, OPENAI_LIMIT_FIELDS, cap=cap)

    def choices(self, body: Mapping[str, Any]) -> int:
        return requested_choices(body)

    def input_estimate(self, raw: bytes) -> int:
        return input_estimate(raw, OPENAI_IMAGE_PART)


class AnthropicDoorRules:
    """The budget's reading of an Anthropic-door request (one choice, `max_tokens`)."""

    def output_limit(self, body: Mapping[str, Any], *, cap: int) -> int | None:
        return requested_output_limit(body, (MAX_TOKENS,), cap=cap)

    def choices(self, body: Mapping[str, Any]) -> int:
        return 1

    def input_estimate(self, raw: bytes) -> int:
        return input_estimate(raw, ANTHROPIC_IMAGE_PART)
