"""Reserve and settle a request's budget, with the tenant's policy for a failing Redis.

* `fail_closed` (default): Redis down, timing out or erroring -> 503; the shared
  `CircuitBreaker` opens after consecutive Redis failures so later requests fail at once
  instead of each waiting for a timeout, and lets one probe through after a cool-down.
* `fail_open`: the request is admitted against a local, per-replica daily ceiling kept in
  memory (each of a replica's N worker processes keeps 1/N of it); past the ceiling it is
  refused like `fail_closed`.

Only real Redis failures are breaker failures. A call that waited too long for a free
connection (`LedgerOverloaded`: this process is busy, Redis is not) is shed with 503 and
gives its permit back; so does a call cancelled because the client left. A reserve that
may have reached Redis but whose answer was lost (cancelled, timed out) is released by
request id in the background, so its hold does not wait for the sweeper.

Every outcome is counted (`asc_budget_reservations_total`) and returned to the caller for
the request log.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Final, TypeVar
from zoneinfo import ZoneInfo

from prometheus_client import Counter

from extproc import metrics
from extproc.breaker import CircuitBreaker, Permit
from extproc.budgets.ledger import (
    BudgetLedger,
    LedgerOverloaded,
    LedgerUnavailable,
    RedisLedger,
    Reservation,
    ReserveResult,
    SettleResult,
)
from extproc.budgets.policy import CounterGroup, TenantBudget, hash_tag, plan_reservation
from extproc.errors import ErrorCode, GatewayError
from extproc.logs import log_event
from extproc.money import format_usd

__all__ = ["BREAKER_COOLDOWN_S", "BREAKER_THRESHOLD", "BudgetGuard", "Hold"]

log = logging.getLogger("extproc.budgets")
_T = TypeVar("_T")
BREAKER_THRESHOLD: Final = 3
"""Consecutive Redis failures that open the budget breaker."""
BREAKER_COOLDOWN_S: Final = 2.0
"""How long an open budget breaker answers at once before it lets one probe through."""
_SETTLE_TIMEOUT_S: Final = 5.0
"""Safety net per settle try; the ledger itself bounds its queue wait and Redis I/O."""
_SETTLE_BACKOFF_S: Final = (0.0, 0.1, 0.5)


@dataclass(frozen=True, slots=True)
class Hold:
    """What a request holds; settle it exactly once with what it really used."""

    reservation: Reservation | None
    mode: str
    """'redis', 'fail_open' (held in local memory) or 'none' (tenant has no budget)."""
    local_amount: int = 0
    local_day: str = ""
    remaining: tuple[tuple[CounterGroup, int], ...] = ()

    def response_headers(self) -> list[tuple[str, str]]:
        headers: list[tuple[str, str]] = []
        usd = [left for group, left in self.remaining if group.unit == "usd"]
        if usd:
            headers.append(("x-asc-budget-remaining-usd", format_usd(min(usd))))
        for group, left in self.remaining:
            if group.unit in ("requests", "tokens"):
                headers.append((f"x-ratelimit-limit-{group.unit}", str(group.limit)))
                headers.append((f"x-ratelimit-remaining-{group.unit}", str(left)))
        return headers


@dataclass
class _LocalCeiling:
    day: str = ""
    spent: dict[str, int] = field(default_factory=dict)


class BudgetGuard:
    def __init__(
        self,
        ledger: BudgetLedger,
        *,
        timezone: str,
        breaker: CircuitBreaker | None = None,
        now: Callable[[], datetime] = lambda: datetime.now(UTC),
        settle_timeout_s: float = _SETTLE_TIMEOUT_S,
    ) -> None:
        self._ledger = ledger
        self._zone = ZoneInfo(timezone)
        self._breaker = breaker or CircuitBreaker(threshold=BREAKER_THRESHOLD,
                                                   cooldown_s=BREAKER_COOLDOWN_S)
        self._settle_timeout_s = settle_timeout_s
        self._now = now
        self._local = _LocalCeiling()
        self.fail_open_share = 1
        """Processes of this replica that split each fail_open ceiling (set by server.py)."""
        self._background: set[asyncio.Task[None]] = set()

    @property
    def breaker(self) -> CircuitBreaker:
        return self._breaker

    def close(self) -> None:
        """Close the ledger's own connections (a reload replaced this guard)."""
        if isinstance(self._ledger, RedisLedger):
            self._ledger.close()

    async def reserve(self, *, request_id: str, budget: TenantBudget, key_id: str, model: str,
                      cost_micro_usd: int, estimated_tokens: int,
                      team: str | None = None, charge_on_expiry: bool = False) -> Hold:
        """Hold the worst case; raises GatewayError 429 (over a limit) or 503 (no ledger).
        `charge_on_expiry`: a hold never settled is charged in full when swept (fast path)."""
        now = self._now()
        groups = plan_reservation(budget, key_id=key_id, model=model,
                                  cost_micro_usd=cost_micro_usd,
                                  estimated_tokens=estimated_tokens, now=now, zone=self._zone,
                                  team=team)
        reservation = Reservation(request_id=request_id, tag=hash_tag(budget), groups=groups,
                                  charge_on_expiry=charge_on_expiry)
        permit = self._breaker.allow()
        if permit is None:
            return self._unavailable(budget, cost_micro_usd, now, "budget ledger breaker open")
        try:
            result = await self._ledger.reserve(reservation)
        except LedgerOverloaded as exc:
            self._breaker.release(permit)
            raise self._overloaded(budget, str(exc)) from None
        except LedgerUnavailable as exc:
            self._breaker.failure(permit)
            # The script may have run and only its answer been lost.
            self._release_later(reservation, budget.tenant)
            return self._unavailable(budget, cost_micro_usd, now, str(exc))
        except BaseException:
            # Cancelled (the client left) while the call was in flight: no verdict on
            # Redis, and the hold, if the script ran, goes back now rather than at expiry.
            self._breaker.release(permit)
            self._release_later(reservation, budget.tenant)
            raise
        self._breaker.success(permit)
        if not result.held:
            denied = result.denied
            assert denied is not None
            _reservations(budget.tenant, "denied").inc()
            raise GatewayError(
                ErrorCode.RATE_LIMITED,
                f"Request refused: it would exceed the {denied.name}"
                f" ({_describe_limit(denied)}).",
                headers=(("retry-after", str(denied.retry_after_s(now))),),
            )
        _reservations(budget.tenant, "replay" if result.replay else "held").inc()
        return Hold(reservation=reservation, mode="redis",
                    remaining=_remaining(groups, result))

    async def settle(self, hold: Hold, *, cost_micro_usd: int, tokens: int,
                     budget: TenantBudget | None) -> int:
        """Charge what the request really used; 0 when nothing was held or already settled."""
        if hold.mode == "fail_open" and budget is not None:
            if hold.local_day == self._local.day:  # a new day's ceiling starts from zero
                spent = self._local.spent
                spent[budget.tenant] = (spent.get(budget.tenant, 0) - hold.local_amount
                                        + cost_micro_usd)
            return 1
        if hold.reservation is None:
            return 0
        reservation = hold.reservation
        actual = [_actual(group, cost_micro_usd, tokens) for group in reservation.groups]
        # Settling runs after the client has its answer: it gets a few tries (it is
        # idempotent), and it neither waits for nor trips the request breaker.
        error = ""
        for attempt, pause in enumerate(_SETTLE_BACKOFF_S):
            if pause:
                await asyncio.sleep(pause)
            try:
                if self._settle_bounded():
                    result = await self._ledger.settle(reservation, actual)
                else:
                    async with asyncio.timeout(self._settle_timeout_s):
                        result = await self._ledger.settle(reservation, actual)
            except TimeoutError:
                error = f"redis: timeout (attempt {attempt + 1})"
            except LedgerUnavailable as exc:
                error = f"{exc} (attempt {attempt + 1})"
            else:
                _record_overrun(reservation, result, actual,
                                budget.tenant if budget else reservation.tag)
                return result.status
        # The hold stays until the sweeper returns it; the real cost is then lost.
        metrics.BUDGET_SETTLE_FAILURES.labels(hold.reservation.tag).inc()
        log_event(log, logging.ERROR, "budget settle failed",
                  request_id=hold.reservation.request_id, error=error)
        return 0

    def _settle_bounded(self) -> bool:
        """True when the ledger's own deadlines end a settle before `settle_timeout_s`
        would: the safety net's timer (a context and a timer handle per settle) could
        never fire, so it is not set."""
        ledger = self._ledger
        if not isinstance(ledger, RedisLedger):
            return False
        bound = ledger.settle_bound_s
        return bound is not None and bound < self._settle_timeout_s

    async def sweep(self, tag: str) -> int:
        permit = self._breaker.allow()
        if permit is None:
            raise LedgerUnavailable("budget ledger breaker open")
        return await self._with_verdict(permit, self._ledger.sweep(tag))

    async def release(self, reservation: Reservation) -> int:
        """Give a hold back by request id, whether or not the reserve reached Redis; a
        reserve that arrives afterwards finds the released record and holds nothing."""
        zeros = [0] * len(reservation.groups)
        return (await self._ledger.settle(reservation, zeros, released=True)).status

    async def drain(self) -> None:
        """Wait for background releases (tests, shutdown)."""
        while self._background:
            await asyncio.gather(*self._background, return_exceptions=True)

    def _release_later(self, reservation: Reservation, tenant: str) -> None:
        task = asyncio.get_running_loop().create_task(
            self._release_quietly(reservation, tenant))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _release_quietly(self, reservation: Reservation, tenant: str) -> None:
        try:
            async with asyncio.timeout(self._settle_timeout_s):
                released = await self.release(reservation)
        except (LedgerUnavailable, TimeoutError) as exc:
            # The sweeper returns the hold after hold_ttl_s.
            log_event(log, logging.WARNING, "budget release failed",
                      request_id=reservation.request_id, error=str(exc) or "timeout")
            return
        if released:
            _reservations(tenant, "released").inc()

    async def _with_verdict(self, permit: Permit, call: Coroutine[Any, Any, _T]) -> _T:
        try:
            result = await call
        except LedgerOverloaded:
            self._breaker.release(permit)
            raise
        except LedgerUnavailable:
            self._breaker.failure(permit)
            raise
        except BaseException:
            self._breaker.release(permit)  # cancelled: no verdict on Redis
            raise
        self._breaker.success(permit)
        return result

    def _overloaded(self, budget: TenantBudget, reason: str) -> GatewayError:
        log_event(log, logging.WARNING, "budget ledger overloaded", tenant=budget.tenant,
                  reason=reason)
        _reservations(budget.tenant, "overloaded").inc()
        return GatewayError(ErrorCode.UNAVAILABLE,
                            "The budget service is busy; the request was not sent.",
                            headers=(("retry-after", "1"),))

    def _unavailable(self, budget: TenantBudget, cost: int, now: datetime, reason: str) -> Hold:
        log_event(log, logging.WARNING, "budget ledger unavailable", tenant=budget.tenant,
                  reason=reason, policy="fail_open" if budget.fail_open else "fail_closed")
        if budget.fail_open:
            day = now.astimezone(self._zone).strftime("%Y-%m-%d")
            if self._local.day != day:
                self._local = _LocalCeiling(day=day)
            spent = self._local.spent.get(budget.tenant, 0)
            if spent + cost <= budget.fail_open_ceiling_micro_usd // self.fail_open_share:
                self._local.spent[budget.tenant] = spent + cost
                _reservations(budget.tenant, "fail_open").inc()
                return Hold(reservation=None, mode="fail_open", local_amount=cost,
                            local_day=day)
        _reservations(budget.tenant, "unavailable").inc()
        raise GatewayError(ErrorCode.UNAVAILABLE,
                           "The budget service is unavailable; the request was not sent.")


_RESERVATION_COUNTERS: dict[tuple[str, str], Counter] = {}


def _reservations(tenant: str, outcome: str) -> Counter:
    """The labelled child of `asc_budget_reservations_total`, looked up once per label
    pair: `labels()` validates, joins and locks on every call (as in
    `extproc.request_metrics`). Bounded by the tenants of the config."""
    counter = _RESERVATION_COUNTERS.get((tenant, outcome))
    if counter is None:
        counter = _RESERVATION_COUNTERS[tenant, outcome] = metrics.BUDGET_RESERVATIONS.labels(
            tenant, outcome)
    return counter


def _record_overrun(reservation: Reservation, result: SettleResult, actual: list[int],
                    tenant: str) -> None:
    """A settle that charged more than its hold and pushed a limit past its end: count it
    and say which request and how much (the ledger keeps `overrun` on the record and the
    counter). The next reserve is refused by the ledger itself, as spent > limit."""
    for group, over, charged in zip(reservation.groups, result.overrun, actual, strict=False):
        if over <= 0:
            continue
        metrics.BUDGET_OVERRUN.labels(tenant, group.unit).inc(over)
        log_event(log, logging.WARNING, "budget overrun", request_id=reservation.request_id,
                  tenant=tenant, limit=group.name, unit=group.unit, over=over,
                  held=group.amount, charged=charged)


def _actual(group: CounterGroup, cost: int, tokens: int) -> int:
    if group.unit == "usd":
        return cost
    if group.unit == "tokens":
        return tokens
    return group.amount  # a request counts against RPM whatever happened to it


def _remaining(groups: tuple[CounterGroup, ...],
               result: ReserveResult) -> tuple[tuple[CounterGroup, int], ...]:
    if result.replay:
        return ()
    return tuple(zip(groups, result.remaining, strict=True))


def _describe_limit(group: CounterGroup) -> str:
    if group.unit == "usd":
        usd = format_usd(group.limit).rstrip("0")
        whole, _, cents = usd.partition(".")
        return f"limit USD {whole}.{cents.ljust(2, '0')}"
    return f"limit {group.limit} {group.unit}"
