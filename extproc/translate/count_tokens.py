"""POST /v1/messages/count_tokens (Anthropic door).

* Anthropic backends answer it: the body goes to `/v1/messages/count_tokens` with
  `model` replaced by the upstream model and the provider key injected, like a message.
* Every other backend has no such endpoint: the gateway answers `{"input_tokens": N}`
  itself, N being the estimate budgets hold for the same body (`limits.input_estimate`:
  UTF-8 body bytes / 3, rounded up, plus 1,600 per image block). It over-counts on
  purpose (a budget estimate must not fall short) and is not the backend's tokenizer.

Never budgeted: counting tokens costs nothing at Anthropic, and no hold is taken.
"""

from __future__ import annotations

from typing import Any, Final

from extproc.translate import limits
from extproc.translate.anthropic_passthrough import AnthropicPassthrough
from extproc.translate.openai_anthropic import ANTHROPIC_VERSION
from extproc.translate.types import (
    NO_OUTPUT_LIMIT,
    OutputLimit,
    TranslatedResponse,
    UpstreamRequest,
)
from extproc.translate.validation import compact_json

__all__ = ["COUNT_TOKENS_PATH", "CountTokensPassthrough", "estimated_count"]

COUNT_TOKENS_PATH: Final = "/v1/messages/count_tokens"


def estimated_count(raw: bytes) -> bytes:
    """The gateway's own answer for a backend without a token counter."""
    return compact_json({"input_tokens": limits.input_estimate(
        raw, limits.ANTHROPIC_IMAGE_PART)})


class CountTokensPassthrough(AnthropicPassthrough):
    """count_tokens to an Anthropic backend: forwarded, answered as Anthropic answers."""

    def output_limit(self, body: Any, *, cap: int) -> int | None:
        return None  # count_tokens takes no max_tokens

    def request(
        self, body: dict[str, Any], *, upstream_model: str, api_version: str | None,
        output_limit: OutputLimit = NO_OUTPUT_LIMIT,
    ) -> UpstreamRequest:
        request = dict(body)  # `model` and `messages` were checked with the body; no max_tokens
        request["model"] = upstream_model
        return UpstreamRequest(body=compact_json(request), path=COUNT_TOKENS_PATH,
                               headers=(("anthropic-version", ANTHROPIC_VERSION),))

    def response(self, status: int, body: bytes) -> TranslatedResponse:
        return TranslatedResponse(body=body, usage=None)  # a count, not billed usage
