"""Money: integer micro-USD inside the gateway, USD decimals at its edges.

The one place that converts between the two and prices tokens. Every amount the gateway
holds, charges, stores in Redis or reports is an `int` of micro-USD (1 USD = 1,000,000);
floats never carry money. Conversions from text are exact (`Decimal`) and refuse more
precision than a micro-USD; costs round *up*, so the gateway never under-charges.
"""

from __future__ import annotations

from decimal import Decimal, InvalidOperation
from typing import TYPE_CHECKING, Final

if TYPE_CHECKING:
    from extproc.config import Price
    from extproc.translate.types import Usage

__all__ = [
    "MICRO_PER_USD",
    "MoneyError",
    "cost_micro_usd",
    "format_usd",
    "micro_from_usd",
    "usage_cost",
    "worst_case_cost",
]

MICRO_PER_USD: Final = 1_000_000
_MICRO_DECIMAL: Final = Decimal(MICRO_PER_USD)


class MoneyError(ValueError):
    """A USD amount that is not a finite, non-negative number with at most 6 decimals."""

    def __init__(self, message: str, hint: str = "") -> None:
        super().__init__(message)
        self.hint = hint


def micro_from_usd(value: str | int | float | Decimal) -> int:
    """`"0.15"` -> 150000. Exact: refuses NaN, infinities, negatives and sub-micro digits.

    A float is converted through its shortest `repr` (0.1 -> "0.1"), which is what an
    operator wrote in YAML.
    """
    if isinstance(value, bool):
        raise MoneyError("must be a number, got a boolean")
    try:
        amount = value if isinstance(value, Decimal) else Decimal(str(value).strip())
    except InvalidOperation:
        raise MoneyError(f"must be a number, got {value!r}") from None
    if not amount.is_finite() or amount < 0:
        raise MoneyError("must be a finite number >= 0")
    micro = amount * _MICRO_DECIMAL
    if micro != micro.to_integral_value():
        raise MoneyError("has more than 6 decimal places", "amounts are kept in micro-USD")
    return int(micro)


def format_usd(micro: int) -> str:
    """150000 -> "0.150000": six decimals, the form every header and CLI line uses."""
    sign = "-" if micro < 0 else ""
    whole, fraction = divmod(abs(micro), MICRO_PER_USD)
    return f"{sign}{whole}.{fraction:06d}"


def cost_micro_usd(tokens: int, micro_per_mtok: int) -> int:
    """Cost of `tokens` at a per-million-token price, rounded up to the next micro-USD.

    (A price of 1 USD per million tokens is 1 micro-USD per token.)
    """
    return -(-tokens * micro_per_mtok // MICRO_PER_USD)


def usage_cost(price: Price, usage: Usage) -> int:
    """Prompt tokens read from the provider's cache at the cached price, those written to
    it at the cache-write price, the rest of the prompt and the output at theirs; each
    part rounded up to a micro-USD."""
    cached = min(usage.cached_input_tokens, usage.input_tokens)
    written = min(usage.cache_write_input_tokens, usage.input_tokens - cached)
    return (cost_micro_usd(usage.input_tokens - cached - written, price.input_micro_per_mtok)
            + cost_micro_usd(cached, price.cached_input_micro_per_mtok)
            + cost_micro_usd(written, price.cache_write_rate)
            + cost_micro_usd(usage.output_tokens, price.output_micro_per_mtok))


def worst_case_cost(input_tokens: int, max_output_tokens: int, input_micro_per_mtok: int,
                    output_micro_per_mtok: int) -> int:
    """What a request may cost at most: its input estimate plus every output token it may
    produce, rounded up once."""
    total = input_tokens * input_micro_per_mtok + max_output_tokens * output_micro_per_mtok
    return -(-total // MICRO_PER_USD)
