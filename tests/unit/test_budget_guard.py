"""BudgetGuard (`extproc.budgets.guard`) with the shared CircuitBreaker, against an
in-memory ledger.

The fake ledger implements the `BudgetLedger` protocol and records every call that
actually ran; the breaker and the guard get injected clocks, so nothing here waits
except the settle safety-net test (20 ms per try).
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from zoneinfo import ZoneInfo

import pytest

from extproc.breaker import CircuitBreaker, Permit
from extproc.budgets.guard import BudgetGuard, Hold
from extproc.budgets.ledger import (
    BudgetLedger,
    LedgerOverloaded,
    LedgerUnavailable,
    Reservation,
    ReserveResult,
    SettleResult,
)
from extproc.budgets.policy import (
    BudgetRule,
    CounterGroup,
    RateLimits,
    Scope,
    TenantBudget,
    Window,
    plan_reservation,
)
from extproc.errors import ErrorCode, GatewayError

NOON = datetime(2026, 11, 25, 12, 0, 0, tzinfo=UTC)
UNAVAILABLE = "The budget service is unavailable; the request was not sent."
BUSY = "The budget service is busy; the request was not sent."
PASS = Permit(probe=False)

Outcome = ReserveResult | Exception | Callable[[Reservation], ReserveResult]


class FakeLedger:
    """An in-memory BudgetLedger: answers from a script and records calls that ran."""

    def __init__(self) -> None:
        self.reserve_calls: list[Reservation] = []
        self.settle_calls: list[tuple[Reservation, list[int], bool]] = []
        self.sweep_calls: list[tuple[str, int]] = []
        self.outcome: Outcome = held_with_headroom
        self.settle_outcome: int | Exception = 1
        self.overrun: tuple[int, ...] = ()
        self.delay_s = 0.0
        self.gate: asyncio.Event | None = None

    def down(self) -> None:
        self.outcome = LedgerUnavailable("redis: ConnectionError")
        self.settle_outcome = LedgerUnavailable("redis: ConnectionError")

    def up(self) -> None:
        self.outcome = held_with_headroom
        self.settle_outcome = 1

    async def _wait(self) -> None:
        if self.gate is not None:
            await self.gate.wait()
        if self.delay_s:
            await asyncio.sleep(self.delay_s)

    async def reserve(self, reservation: Reservation) -> ReserveResult:
        self.reserve_calls.append(reservation)
        await self._wait()
        outcome = self.outcome
        if isinstance(outcome, Exception):
            raise outcome
        if isinstance(outcome, ReserveResult):
            return outcome
        return outcome(reservation)

    async def settle(self, reservation: Reservation, actual: Sequence[int], *,
                     released: bool = False) -> SettleResult:
        self.settle_calls.append((reservation, list(actual), released))
        if not released:
            await self._wait()
        if isinstance(self.settle_outcome, Exception):
            raise self.settle_outcome
        return SettleResult(self.settle_outcome, self.overrun)

    async def sweep(self, tag: str, limit: int = 100) -> int:
        self.sweep_calls.append((tag, limit))
        await self._wait()
        return 0


def held_with_headroom(reservation: Reservation) -> ReserveResult:
    return ReserveResult(held=True,
                         remaining=tuple(g.limit - g.amount for g in reservation.groups))


class Clock:
    def __init__(self, start: float = 1000.0) -> None:
        self.t = start

    def __call__(self) -> float:
        return self.t


class Now:
    def __init__(self, value: datetime = NOON) -> None:
        self.value = value

    def __call__(self) -> datetime:
        return self.value


def is_open(breaker: CircuitBreaker) -> bool:
    """Read through a call so that mypy does not narrow the property between asserts."""
    return breaker.is_open


def make_budget(tenant: str = "acme", *, fail_open: bool = False, ceiling: int = 0,
                rpm: int | None = 60, tpm: int | None = 10_000) -> TenantBudget:
    return TenantBudget(
        tenant=tenant, org=None,
        rules=(BudgetRule(Scope.TENANT, Window.MONTH, 5_000_000),
               BudgetRule(Scope.KEY, Window.DAY, 500_000, subject="k1"),
               BudgetRule(Scope.TENANT, Window.ROLLING, 2_000_000, period_s=3600)),
        rate_limits=RateLimits(rpm=rpm, tpm=tpm), fail_open=fail_open,
        fail_open_ceiling_micro_usd=ceiling)


@pytest.fixture
def ledger() -> FakeLedger:
    return FakeLedger()


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def now() -> Now:
    return Now()


@pytest.fixture
def breaker(clock: Clock) -> CircuitBreaker:
    return CircuitBreaker(threshold=3, cooldown_s=2.0, clock=clock)


@pytest.fixture
def guard(ledger: FakeLedger, breaker: CircuitBreaker, now: Now) -> BudgetGuard:
    return BudgetGuard(ledger, timezone="UTC", breaker=breaker, now=now)


async def reserve(guard: BudgetGuard, budget: TenantBudget | None = None, *,
                  request_id: str = "r1", cost: int = 123_456, tokens: int = 100) -> Hold:
    return await guard.reserve(request_id=request_id, budget=budget or make_budget(),
                               key_id="k1", model="gpt-4o", cost_micro_usd=cost,
                               estimated_tokens=tokens)


async def refused(guard: BudgetGuard, budget: TenantBudget | None = None, *,
                  cost: int = 123_456) -> GatewayError:
    with pytest.raises(GatewayError) as caught:
        await reserve(guard, budget, cost=cost)
    return caught.value


@pytest.mark.parametrize("method", ["reserve", "settle", "sweep"])
def test_fake_ledger_has_the_protocol_signatures(method: str) -> None:
    # The tests below are only as good as the fake: it must take and return what the
    # real ledger does (mypy does not check tests/).
    assert inspect.signature(getattr(FakeLedger, method)) == inspect.signature(
        getattr(BudgetLedger, method))


# --- held -----------------------------------------------------------------------------

async def test_reserve_holds_the_planned_groups_and_returns_redis_hold(
    guard: BudgetGuard, ledger: FakeLedger,
) -> None:
    ledger.outcome = ReserveResult(held=True,
                                   remaining=(4_876_544, 376_544, 1_876_544, 59, 9_900))
    hold = await reserve(guard)

    groups = plan_reservation(make_budget(), key_id="k1", model="gpt-4o",
                              cost_micro_usd=123_456, estimated_tokens=100, now=NOON,
                              zone=ZoneInfo("UTC"))
    expected = Reservation(request_id="r1", tag="{t:acme}", groups=groups)
    assert ledger.reserve_calls == [expected]
    assert [(g.unit, g.amount) for g in groups] == [
        ("usd", 123_456), ("usd", 123_456), ("usd", 123_456), ("requests", 1), ("tokens", 100)]
    assert hold.mode == "redis"
    assert hold.reservation == expected
    assert hold.local_amount == 0
    assert hold.remaining == tuple(zip(groups, (4_876_544, 376_544, 1_876_544, 59, 9_900),
                                       strict=True))
    assert hold.response_headers() == [
        ("x-asc-budget-remaining-usd", "0.376544"),  # the smallest of the three USD limits
        ("x-ratelimit-limit-requests", "60"),
        ("x-ratelimit-remaining-requests", "59"),
        ("x-ratelimit-limit-tokens", "10000"),
        ("x-ratelimit-remaining-tokens", "9900"),
    ]


def group(unit: str, limit: int = 1_000_000) -> CounterGroup:
    return CounterGroup(f"a {unit} limit", unit, ("k",), limit, 1, NOON, 60)


@pytest.mark.parametrize(
    ("remaining", "headers"),
    [
        ((), []),
        (((group("usd"), 0),), [("x-asc-budget-remaining-usd", "0.000000")]),
        (((group("usd"), 1),), [("x-asc-budget-remaining-usd", "0.000001")]),
        (((group("usd"), 5_000_000), (group("usd"), 12_345_678)),
         [("x-asc-budget-remaining-usd", "5.000000")]),
        (((group("usd"), 999_999_999_999),), [("x-asc-budget-remaining-usd",
                                               "999999.999999")]),
        (((group("requests", 2), 0),), [("x-ratelimit-limit-requests", "2"),
                                         ("x-ratelimit-remaining-requests", "0")]),
        (((group("tokens", 7), 3), (group("usd"), 10)),
         [("x-asc-budget-remaining-usd", "0.000010"), ("x-ratelimit-limit-tokens", "7"),
          ("x-ratelimit-remaining-tokens", "3")]),
    ],
)
def test_response_headers(remaining: tuple[tuple[CounterGroup, int], ...],
                          headers: list[tuple[str, str]]) -> None:
    hold = Hold(reservation=None, mode="redis", remaining=remaining)
    assert hold.response_headers() == headers


async def test_replayed_reserve_is_a_hold_with_nothing_remaining(
    guard: BudgetGuard, ledger: FakeLedger,
) -> None:
    ledger.outcome = ReserveResult(held=True, replay=True)
    hold = await reserve(guard)
    assert hold.mode == "redis"
    assert hold.reservation == ledger.reserve_calls[0]
    assert hold.remaining == ()
    assert hold.response_headers() == []


# --- denied ---------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("index", "at", "message", "retry_after"),
    [
        (0, NOON, "Request refused: it would exceed the tenant monthly budget"
                  " (limit USD 5.00).", 5 * 86400 + 12 * 3600),
        (1, datetime(2026, 11, 25, 18, 0, tzinfo=UTC),
         "Request refused: it would exceed the key 'k1' daily budget (limit USD 0.50).",
         6 * 3600),
        (2, datetime(2026, 11, 25, 12, 3, 20, tzinfo=UTC),
         "Request refused: it would exceed the tenant 3600s rolling budget"
         " (limit USD 2.00).", 100),
        (3, datetime(2026, 11, 25, 12, 0, 45, tzinfo=UTC),
         "Request refused: it would exceed the requests per minute (limit 60 requests).", 15),
        (4, datetime(2026, 11, 25, 12, 0, 59, 500_000, tzinfo=UTC),
         "Request refused: it would exceed the tokens per minute (limit 10000 tokens).", 1),
    ],
)
async def test_denial_is_429_with_the_limit_and_retry_after(
    guard: BudgetGuard, ledger: FakeLedger, now: Now, index: int, at: datetime,
    message: str, retry_after: int,
) -> None:
    now.value = at
    ledger.outcome = lambda r: ReserveResult(held=False, denied=r.groups[index])
    error = await refused(guard)
    assert error.status == 429
    assert error.code is ErrorCode.RATE_LIMITED
    assert error.message == message
    assert error.headers == (("retry-after", str(retry_after)),)
    assert len(ledger.reserve_calls) == 1


async def test_denial_retry_after_uses_the_configured_time_zone(ledger: FakeLedger) -> None:
    # 2026-10-31 23:30 UTC is 2026-11-01 00:30 in Paris: the key's day ends in 22.5 h.
    guard = BudgetGuard(ledger, timezone="Europe/Paris",
                        now=lambda: datetime(2026, 10, 31, 23, 30, tzinfo=UTC))
    ledger.outcome = lambda r: ReserveResult(held=False, denied=r.groups[1])
    error = await refused(guard)
    assert ledger.reserve_calls[0].groups[1].keys == (
        "asc:{t:acme}:b:tenant:acme:key:k1:d2026-11-01",)
    assert error.headers == (("retry-after", str(23 * 3600 + 1800)),)


async def test_denials_do_not_count_as_breaker_failures(
    guard: BudgetGuard, ledger: FakeLedger, breaker: CircuitBreaker,
) -> None:
    ledger.outcome = lambda r: ReserveResult(held=False, denied=r.groups[0])
    for _ in range(5):
        assert (await refused(guard)).status == 429
    assert len(ledger.reserve_calls) == 5
    assert not is_open(breaker)


# --- unavailable, breaker, timeout ------------------------------------------------------

async def test_ledger_unavailable_is_503_when_fail_closed(
    guard: BudgetGuard, ledger: FakeLedger, breaker: CircuitBreaker,
) -> None:
    ledger.down()
    error = await refused(guard)
    assert error.status == 503
    assert error.code is ErrorCode.UNAVAILABLE
    assert error.message == UNAVAILABLE
    assert error.headers == ()
    assert not is_open(breaker)  # one failure is not enough


async def test_breaker_opens_after_three_failures_then_probes_once_after_cooldown(
    guard: BudgetGuard, ledger: FakeLedger, breaker: CircuitBreaker, clock: Clock,
) -> None:
    ledger.down()
    for expected_calls in (1, 2, 3):
        assert (await refused(guard)).message == UNAVAILABLE
        assert len(ledger.reserve_calls) == expected_calls
    assert is_open(breaker)

    # Open: fails at once without reaching the ledger, same answer.
    assert (await refused(guard)).message == UNAVAILABLE
    clock.t += 1.999
    assert (await refused(guard)).message == UNAVAILABLE
    assert len(ledger.reserve_calls) == 3

    # Cool-down over: one probe reaches the ledger; it fails, so the breaker re-opens
    # from now and the next call is refused without a ledger call.
    clock.t += 0.001
    assert (await refused(guard)).message == UNAVAILABLE
    assert len(ledger.reserve_calls) == 4
    assert is_open(breaker)
    assert (await refused(guard)).message == UNAVAILABLE
    clock.t += 1.5
    assert (await refused(guard)).message == UNAVAILABLE
    assert len(ledger.reserve_calls) == 4

    # Next probe succeeds: closed again, every call reaches the ledger.
    clock.t += 0.5
    ledger.up()
    assert (await reserve(guard)).mode == "redis"
    assert not is_open(breaker)
    assert (await reserve(guard, request_id="r2")).mode == "redis"
    assert (await reserve(guard, request_id="r3")).mode == "redis"
    assert len(ledger.reserve_calls) == 7


async def test_half_open_lets_exactly_one_concurrent_probe_through(
    guard: BudgetGuard, ledger: FakeLedger, breaker: CircuitBreaker, clock: Clock,
) -> None:
    ledger.down()
    for _ in range(3):
        await refused(guard)
    clock.t += 2.0
    ledger.up()
    ledger.gate = asyncio.Event()
    probe = asyncio.create_task(reserve(guard, request_id="probe"))
    await asyncio.sleep(0)
    assert [r.request_id for r in ledger.reserve_calls[3:]] == ["probe"]

    for _ in range(3):  # while the probe is in flight, everything else fails fast
        assert (await refused(guard)).message == UNAVAILABLE
    assert len(ledger.reserve_calls) == 4

    ledger.gate.set()
    assert (await probe).mode == "redis"
    assert not is_open(breaker)
    assert (await reserve(guard, request_id="after")).mode == "redis"
    assert len(ledger.reserve_calls) == 5


async def test_redis_io_timeouts_are_503_and_breaker_failures(
    guard: BudgetGuard, ledger: FakeLedger, breaker: CircuitBreaker,
) -> None:
    ledger.outcome = LedgerUnavailable("redis: TimeoutError")  # a socket timeout
    for _ in range(3):
        error = await refused(guard)
        assert (error.status, error.message) == (503, UNAVAILABLE)
    assert len(ledger.reserve_calls) == 3
    assert is_open(breaker)
    assert (await refused(guard)).status == 503
    assert len(ledger.reserve_calls) == 3  # the 4th never reached the ledger


async def test_overloaded_is_503_busy_and_never_opens_the_breaker(
    guard: BudgetGuard, ledger: FakeLedger, breaker: CircuitBreaker,
) -> None:
    ledger.outcome = LedgerOverloaded("redis: no free connection within queue_timeout_ms")
    for _ in range(10):
        error = await refused(guard)
        assert (error.status, error.code, error.message) == (503, ErrorCode.UNAVAILABLE, BUSY)
        assert error.headers == (("retry-after", "1"),)
    assert len(ledger.reserve_calls) == 10
    assert not is_open(breaker)
    # Never sent, so there is nothing to release.
    await guard.drain()
    assert ledger.settle_calls == []
    ledger.up()
    assert (await reserve(guard)).mode == "redis"


async def test_overloaded_probe_gives_its_permit_back(
    guard: BudgetGuard, ledger: FakeLedger, breaker: CircuitBreaker, clock: Clock,
) -> None:
    ledger.down()
    for _ in range(3):
        await refused(guard)
    clock.t += 2.0
    ledger.outcome = LedgerOverloaded("redis: connection pool exhausted")
    assert (await refused(guard)).message == BUSY  # the probe: no verdict
    ledger.up()
    assert (await reserve(guard)).mode == "redis"  # the next caller may probe
    assert not is_open(breaker)


async def test_cancelled_reserves_are_not_breaker_failures_and_release_by_request_id(
    guard: BudgetGuard, ledger: FakeLedger, breaker: CircuitBreaker,
) -> None:
    ledger.gate = asyncio.Event()
    for n in range(5):  # more than the threshold: a client abort is never a Redis failure
        task = asyncio.create_task(reserve(guard, request_id=f"gone-{n}"))
        await asyncio.sleep(0)
        assert len(ledger.reserve_calls) == n + 1  # in flight, parked on the gate
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    await guard.drain()
    assert not is_open(breaker)
    assert [(r.request_id, actual, released) for r, actual, released in ledger.settle_calls] == [
        (f"gone-{n}", [0, 0, 0, 0, 0], True) for n in range(5)]


async def test_cancelled_probe_gives_its_permit_back(
    guard: BudgetGuard, ledger: FakeLedger, breaker: CircuitBreaker, clock: Clock,
) -> None:
    ledger.down()
    for _ in range(3):
        await refused(guard)
    clock.t += 2.0
    ledger.up()
    ledger.gate = asyncio.Event()
    probe = asyncio.create_task(reserve(guard, request_id="probe"))
    await asyncio.sleep(0)
    assert len(ledger.reserve_calls) == 4  # the probe is in flight
    assert (await refused(guard)).message == UNAVAILABLE  # the probe is out
    probe.cancel()
    with pytest.raises(asyncio.CancelledError):
        await probe
    ledger.gate = None
    assert (await reserve(guard, request_id="next")).mode == "redis"
    assert not is_open(breaker)


async def test_io_failure_releases_the_hold_in_case_the_script_ran(
    guard: BudgetGuard, ledger: FakeLedger,
) -> None:
    ledger.outcome = LedgerUnavailable("redis: TimeoutError")
    assert (await refused(guard)).status == 503
    await guard.drain()
    assert [(r.request_id, released) for r, _, released in ledger.settle_calls] == [
        ("r1", True)]


# --- fail open ------------------------------------------------------------------------

async def test_fail_open_admits_up_to_the_ceiling_and_resets_on_a_new_day(
    guard: BudgetGuard, ledger: FakeLedger, now: Now,
) -> None:
    ledger.down()
    budget = make_budget(fail_open=True, ceiling=25_000)
    now.value = datetime(2026, 11, 25, 23, 0, tzinfo=UTC)
    first = await reserve(guard, budget, cost=10_000)
    assert first == Hold(reservation=None, mode="fail_open", local_amount=10_000,
                         local_day="2026-11-25")
    assert first.response_headers() == []
    assert (await reserve(guard, budget, cost=10_000)).mode == "fail_open"
    error = await refused(guard, budget, cost=10_000)  # 30_000 > 25_000
    assert (error.status, error.message) == (503, UNAVAILABLE)
    hold = await reserve(guard, budget, cost=5_000)  # exactly the ceiling
    assert (hold.mode, hold.local_amount) == ("fail_open", 5_000)
    assert (await refused(guard, budget, cost=1)).status == 503

    # Another tenant has its own ceiling; a fail_closed tenant still gets 503.
    other = make_budget("globex", fail_open=True, ceiling=25_000)
    assert (await reserve(guard, other, cost=25_000)).mode == "fail_open"
    assert (await refused(guard, make_budget("closed"), cost=1)).status == 503

    now.value = datetime(2026, 11, 25, 23, 59, 59, tzinfo=UTC)
    assert (await refused(guard, budget, cost=1)).status == 503
    now.value = datetime(2026, 11, 26, 0, 0, 0, tzinfo=UTC)
    assert (await reserve(guard, budget, cost=25_000)).mode == "fail_open"
    assert (await refused(guard, budget, cost=1)).status == 503
    assert (await reserve(guard, other, cost=25_000)).mode == "fail_open"
    assert ledger.settle_calls == []


async def test_fail_open_settle_returns_the_unused_hold_locally(
    guard: BudgetGuard, ledger: FakeLedger,
) -> None:
    ledger.down()
    budget = make_budget(fail_open=True, ceiling=25_000)
    first = await reserve(guard, budget, cost=10_000)
    await reserve(guard, budget, cost=10_000)
    assert (await refused(guard, budget, cost=10_000)).status == 503

    assert await guard.settle(first, cost_micro_usd=1_000, tokens=5, budget=budget) == 1
    # spent is now 11_000: 14_000 more fit, 14_001 does not.
    assert (await refused(guard, budget, cost=14_001)).status == 503
    assert (await reserve(guard, budget, cost=14_000)).mode == "fail_open"
    assert ledger.settle_calls == []


# --- settle ---------------------------------------------------------------------------

async def test_settle_charges_actual_amounts_per_group(
    guard: BudgetGuard, ledger: FakeLedger,
) -> None:
    hold = await reserve(guard, cost=123_456, tokens=4196)
    assert hold.reservation is not None
    ledger.settle_outcome = 2  # late: the sweeper had returned the hold
    result = await guard.settle(hold, cost_micro_usd=777, tokens=321, budget=make_budget())
    assert result == 2
    assert ledger.settle_calls == [(hold.reservation, [777, 777, 777, 1, 321], False)]


async def test_settle_of_a_hold_without_reservation_is_a_no_op(
    guard: BudgetGuard, ledger: FakeLedger,
) -> None:
    hold = Hold(reservation=None, mode="none")
    assert await guard.settle(hold, cost_micro_usd=5, tokens=5, budget=None) == 0
    fail_open = Hold(reservation=None, mode="fail_open", local_amount=10)
    assert await guard.settle(fail_open, cost_micro_usd=5, tokens=5, budget=None) == 0
    assert ledger.settle_calls == []


async def test_settle_when_the_ledger_is_down_retries_and_returns_zero(
    guard: BudgetGuard, ledger: FakeLedger, breaker: CircuitBreaker,
) -> None:
    hold = await reserve(guard)
    ledger.down()
    assert await guard.settle(hold, cost_micro_usd=1, tokens=1, budget=None) == 0
    assert len(ledger.settle_calls) == 3  # idempotent, so retried
    # Settling is off the request path: it neither trips nor waits for the breaker.
    assert not is_open(breaker)
    for _ in range(3):
        breaker.failure(PASS)
    assert await guard.settle(hold, cost_micro_usd=1, tokens=1, budget=None) == 0
    assert len(ledger.settle_calls) == 6


async def test_settle_timeout_retries_and_returns_zero(
    ledger: FakeLedger, breaker: CircuitBreaker,
) -> None:
    guard = BudgetGuard(ledger, timezone="UTC", breaker=breaker, now=lambda: NOON,
                        settle_timeout_s=0.02)
    hold = await reserve(guard)
    ledger.delay_s = 5.0
    assert await guard.settle(hold, cost_micro_usd=1, tokens=1, budget=None) == 0
    assert len(ledger.settle_calls) == 3
    assert not is_open(breaker)


async def test_sweep_goes_through_the_breaker(
    guard: BudgetGuard, ledger: FakeLedger, breaker: CircuitBreaker,
) -> None:
    assert await guard.sweep("{t:acme}") == 0
    assert ledger.sweep_calls == [("{t:acme}", 100)]
    for _ in range(3):
        breaker.failure(PASS)
    with pytest.raises(LedgerUnavailable, match=r"^budget ledger breaker open$"):
        await guard.sweep("{t:acme}")
    assert len(ledger.sweep_calls) == 1
