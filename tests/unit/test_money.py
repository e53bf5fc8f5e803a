"""`extproc.money`: the one conversion between USD text and integer micro-USD."""

from __future__ import annotations

from decimal import Decimal

import pytest

from extproc.money import MoneyError, cost_micro_usd, format_usd, micro_from_usd, worst_case_cost


@pytest.mark.parametrize(("value", "micro"), [
    ("0.15", 150_000), (0.1, 100_000), (2, 2_000_000), ("0.000001", 1),
    (Decimal("12.5"), 12_500_000), (" 1 ", 1_000_000), ("0", 0),
])
def test_micro_from_usd_is_exact(value: str | float | Decimal, micro: int) -> None:
    assert micro_from_usd(value) == micro


@pytest.mark.parametrize(("value", "message"), [
    ("0.0000001", "more than 6 decimal places"), ("-1", "finite number >= 0"),
    ("NaN", "finite number >= 0"), ("inf", "finite number >= 0"),
    ("ten", "must be a number, got 'ten'"), (True, "got a boolean"),
])
def test_micro_from_usd_refuses(value: object, message: str) -> None:
    with pytest.raises(MoneyError, match=message):
        micro_from_usd(value)  # type: ignore[arg-type]


@pytest.mark.parametrize(("micro", "text"), [
    (0, "0.000000"), (1, "0.000001"), (150_000, "0.150000"), (12_345_678, "12.345678"),
    (-2_500_000, "-2.500000"),
])
def test_format_usd(micro: int, text: str) -> None:
    assert format_usd(micro) == text


def test_costs_round_up_to_the_next_micro_usd() -> None:
    assert cost_micro_usd(1, 150_000) == 1  # 0.15 micro-USD is charged as 1
    assert cost_micro_usd(1_000_000, 150_000) == 150_000
    assert cost_micro_usd(0, 150_000) == 0
    assert worst_case_cost(3, 7, 150_000, 600_000) == 5  # (450_000 + 4_200_000) / 1e6 -> 4.65
