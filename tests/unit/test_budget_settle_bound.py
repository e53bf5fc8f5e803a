"""A settle's deadline when the ledger is a `RedisLedger`: its own deadlines (slot wait, I/O
deadline and ceiling) bound a batched settle, and the guard sets its safety-net timer only
when they might not end the settle first. No Redis: the script calls and the batched
connection are fakes that answer at once or never."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import Any

import pytest

from extproc.budgets.guard import BudgetGuard, Hold
from extproc.budgets.ledger import RedisLedger, Reservation
from extproc.budgets.policy import CounterGroup
from tests.unit.test_budget_guard import NOON


class _Script:
    """A registered script: the first (unbatched) call answers `settled` at once."""

    def __init__(self, text: str) -> None:
        self.script = text
        self.sha = "0" * 40

    async def __call__(self, keys: list[str], args: list[object]) -> list[int]:
        return [1]


class _Client:
    def register_script(self, text: str) -> _Script:
        return _Script(text)

    async def script_load(self, script: str) -> str:
        return "0" * 40


class _SilentRedis:
    """The ledger's batched connection to a Redis that never answers."""

    def __init__(self) -> None:
        self.batches = 0

    async def execute(self, commands: Sequence[bytes]) -> list[Any]:
        self.batches += 1
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    def close(self) -> None:
        return None


def _hold() -> Hold:
    group = CounterGroup("tenant daily budget", "usd", ("asc:{t:acme}:b:tenant:acme:d1",),
                         1_000_000, 500, NOON, 60)
    return Hold(reservation=Reservation("r1", "{t:acme}", (group,)), mode="redis")


def _ledger(resp: _SilentRedis, *, io_timeout_s: float, queue_timeout_s: float
            ) -> RedisLedger:
    return RedisLedger(_Client(), io_timeout_s=io_timeout_s, queue_timeout_s=queue_timeout_s,
                       resp=resp)  # type: ignore[arg-type]


async def test_a_ledger_bounds_its_batched_settles_once_its_scripts_are_loaded() -> None:
    ledger = _ledger(_SilentRedis(), io_timeout_s=0.25, queue_timeout_s=0.5)
    assert ledger.settle_bound_s is None  # the first call loads the scripts

    reservation = _hold().reservation
    assert reservation is not None
    assert (await ledger.settle(reservation, [400])).status == 1

    # Slot wait, then the I/O deadline up to its ceiling (max(1 s, 20 x 0.25 s)) and one
    # more window.
    assert ledger.settle_bound_s == 0.5 + 5.0 + 0.25


@pytest.mark.parametrize(("io_timeout_s", "queue_timeout_s", "settle_timeout_s", "error"), [
    # The ledger's deadline ends each try (the guard's timer would say "redis: timeout").
    (0.005, 0.01, 5.0, "redis: TimeoutError (attempt 3)"),
    # The safety net still ends a try the ledger would let run longer.
    (0.25, 0.5, 0.02, "redis: timeout (attempt 3)"),
], ids=["ledger-deadline", "guard-timer"])
async def test_a_silent_redis_ends_each_settle_try_at_the_first_deadline(
        caplog: pytest.LogCaptureFixture, io_timeout_s: float, queue_timeout_s: float,
        settle_timeout_s: float, error: str) -> None:
    silent = _SilentRedis()
    ledger = _ledger(silent, io_timeout_s=io_timeout_s, queue_timeout_s=queue_timeout_s)
    guard = BudgetGuard(ledger, timezone="UTC", now=lambda: NOON,
                        settle_timeout_s=settle_timeout_s)
    hold = _hold()
    assert await guard.settle(hold, cost_micro_usd=400, tokens=0, budget=None) == 1

    with caplog.at_level(logging.ERROR, logger="extproc.budgets"):
        assert await guard.settle(hold, cost_micro_usd=400, tokens=0, budget=None) == 0

    assert silent.batches == 3
    [failed] = [r for r in caplog.records if r.getMessage() == "budget settle failed"]
    assert failed.fields["error"] == error  # type: ignore[attr-defined]
