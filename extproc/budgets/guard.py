"""Reserve and settle a request's budget, with the tenant's policy for a failing Redis.

* `fail_closed` (default): Redis down, slow or erroring -> 503 within the Redis timeout;
  a breaker opens after consecutive failures so later requests fail at once instead of
  each waiting for the timeout, and lets one probe through after a cool-down.
* `fail_open`: the request is admitted against a local, per-replica daily ceiling kept in
  memory (each of a replica's N worker processes keeps 1/N of it); past the ceiling it is
  refused like `fail_closed`.

Every outcome is counted (`asc_budget_reservations_total`) and returned to the caller for
the request log.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Final, TypeVar
from zoneinfo import ZoneInfo

from extproc import metrics
from extproc.budgets.ledger import BudgetLedger, LedgerUnavailable, Reservation, ReserveResult
from extproc.budgets.policy import CounterGroup, TenantBudget, hash_tag, plan_reservation
from extproc.errors import ErrorCode, GatewayError
from extproc.logs import log_event
from extproc.money import format_usd

__all__ = ["Breaker", "BudgetGuard", "Hold"]

log = logging.getLogger("extproc.budgets")
_T = TypeVar("_T")
_SETTLE_TIMEOUT_S: Final = 1.0
_SETTLE_BACKOFF_S: Final = (0.0, 0.1, 0.5)


@dataclass
class Breaker:
    """Opens after `threshold` consecutive failures; after `cooldown_s` lets one call try."""

    threshold: int = 3
    cooldown_s: float = 2.0
    clock: Callable[[], float] = time.monotonic
    _failures: int = 0
    _opened_at: float | None = None
    _probing: bool = False

    def allow(self) -> bool:
        if self._opened_at is None:
            return True
        if not self._probing and self.clock() - self._opened_at >= self.cooldown_s:
            self._probing = True
            return True
        return False

    def success(self) -> None:
        self._failures = 0
        self._opened_at = None
        self._probing = False

    def failure(self) -> None:
        self._failures += 1
        self._probing = False
        if self._failures >= self.threshold:
            self._opened_at = self.clock()

    @property
    def is_open(self) -> bool:
        return self._opened_at is not None


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
        timeout_s: float,
        breaker: Breaker | None = None,
        now: Callable[[], datetime] = lambda: datetime.now(UTC),
        settle_timeout_s: float = _SETTLE_TIMEOUT_S,
    ) -> None:
        self._ledger = ledger
        self._zone = ZoneInfo(timezone)
        self._timeout_s = timeout_s
        self._breaker = breaker or Breaker()
        self._settle_timeout_s = max(timeout_s, settle_timeout_s)
        self._now = now
        self._local = _LocalCeiling()
        self.fail_open_share = 1
        """Processes of this replica that split each fail_open ceiling (set by server.py)."""

    async def reserve(self, *, request_id: str, budget: TenantBudget, key_id: str, model: str,
                      cost_micro_usd: int, estimated_tokens: int) -> Hold:
        """Hold the worst case; raises GatewayError 429 (over a limit) or 503 (no ledger)."""
        now = self._now()
        groups = plan_reservation(budget, key_id=key_id, model=model,
                                  cost_micro_usd=cost_micro_usd,
                                  estimated_tokens=estimated_tokens, now=now, zone=self._zone)
        reservation = Reservation(request_id=request_id, tag=hash_tag(budget), groups=groups)
        try:
            result = await self._guarded(self._ledger.reserve(reservation))
        except LedgerUnavailable as exc:
            return self._unavailable(budget, cost_micro_usd, now, str(exc))
        if not result.held:
            denied = result.denied
            assert denied is not None
            metrics.BUDGET_RESERVATIONS.labels(budget.tenant, "denied").inc()
            raise GatewayError(
                ErrorCode.RATE_LIMITED,
                f"Request refused: it would exceed the {denied.name}"
                f" ({_describe_limit(denied)}).",
                headers=(("retry-after", str(denied.retry_after_s(now))),),
            )
        metrics.BUDGET_RESERVATIONS.labels(budget.tenant,
                                           "replay" if result.replay else "held").inc()
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
        actual = [_actual(group, cost_micro_usd, tokens) for group in hold.reservation.groups]
        # Settling runs after the client has its answer: it gets a longer timeout and a few
        # tries (it is idempotent), and it neither waits for nor trips the request breaker.
        error = ""
        for attempt, pause in enumerate(_SETTLE_BACKOFF_S):
            await asyncio.sleep(pause)
            try:
                async with asyncio.timeout(self._settle_timeout_s):
                    return await self._ledger.settle(hold.reservation, actual)
            except TimeoutError:
                error = f"redis: timeout (attempt {attempt + 1})"
            except LedgerUnavailable as exc:
                error = f"{exc} (attempt {attempt + 1})"
        # The hold stays until the sweeper returns it; the real cost is then lost.
        metrics.BUDGET_SETTLE_FAILURES.labels(hold.reservation.tag).inc()
        log_event(log, logging.ERROR, "budget settle failed",
                  request_id=hold.reservation.request_id, error=error)
        return 0

    async def sweep(self, tag: str) -> int:
        return await self._guarded(self._ledger.sweep(tag))

    async def _guarded(self, call: Coroutine[Any, Any, _T]) -> _T:
        if not self._breaker.allow():
            call.close()
            raise LedgerUnavailable("budget ledger breaker open")
        try:
            async with asyncio.timeout(self._timeout_s):
                result = await call
        except TimeoutError:
            self._breaker.failure()
            raise LedgerUnavailable("redis: timeout") from None
        except BaseException:
            # Also a cancelled call (client gone): a half-open probe must not stay taken.
            self._breaker.failure()
            raise
        self._breaker.success()
        return result

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
                metrics.BUDGET_RESERVATIONS.labels(budget.tenant, "fail_open").inc()
                return Hold(reservation=None, mode="fail_open", local_amount=cost,
                            local_day=day)
        metrics.BUDGET_RESERVATIONS.labels(budget.tenant, "unavailable").inc()
        raise GatewayError(ErrorCode.UNAVAILABLE,
                           "The budget service is unavailable; the request was not sent.")


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
