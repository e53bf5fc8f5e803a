"""Regression tests for budget defects found while writing the policy and guard tests.

Each test has a comment explaining the defect and its consequence; all are fixed.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Sequence
from datetime import UTC, datetime
from zoneinfo import ZoneInfo

import pytest

from extproc.breaker import CircuitBreaker
from extproc.budgets.guard import BudgetGuard, Hold
from extproc.budgets.ledger import LedgerUnavailable, Reservation, ReserveResult, SettleResult
from extproc.budgets.policy import (
    BudgetRule,
    RateLimits,
    Scope,
    TenantBudget,
    Window,
    plan_reservation,
)
from extproc.config import ConfigError, parse_config
from extproc.errors import GatewayError

HASH_A = "hmac-sha256:v1:" + "a" * 64
CONFIG = """\
version: 1
auth:
  pepper: {env: ASC_PEPPER}
redis: {url: "redis://127.0.0.1:6379"}
credentials:
  cred-us: {env: ASC_KEY_US}
providers:
  prov-us:
    kind: openai
    base_url: "http://127.0.0.1:18080"
    region: us-east-1
    zone: us
    cluster: prov_us
    credentials: [cred-us]
models:
  gpt-4o-mini:
    price: {input_per_mtok: 0.15, output_per_mtok: 0.60}
    deployments: [{provider: prov-us}]
tenants:
  acme:
    keys: [{id: KEY_ID, hash: "HASH"}]
    models: [gpt-4o-mini]
    budgets: [{scope: key, key: KEY_ID, window: day, limit_usd: 1}]
""".replace("HASH", HASH_A)


class Ledger:
    """Minimal in-memory BudgetLedger: down, or holding with a gate to await."""

    def __init__(self) -> None:
        self.calls = 0
        self.down = True
        self.gate: asyncio.Event | None = None

    async def reserve(self, reservation: Reservation) -> ReserveResult:
        self.calls += 1
        if self.gate is not None:
            await self.gate.wait()
        if self.down:
            raise LedgerUnavailable("redis: ConnectionError")
        return ReserveResult(held=True, remaining=tuple(0 for _ in reservation.groups))

    async def settle(self, reservation: Reservation, actual: Sequence[int], *,
                     released: bool = False) -> SettleResult:
        raise LedgerUnavailable("redis: ConnectionError")

    async def sweep(self, tag: str, limit: int = 100) -> int:
        return 0


def budget(*, fail_open: bool = False, ceiling: int = 0) -> TenantBudget:
    return TenantBudget(tenant="acme", org=None,
                        rules=(BudgetRule(Scope.TENANT, Window.DAY, 10_000_000),),
                        rate_limits=RateLimits(), fail_open=fail_open,
                        fail_open_ceiling_micro_usd=ceiling)


# Bug 1 (extproc/config.py, `_budget_settings`): a `budgets.timezone` that names a
# directory of the tz database ("Europe", "America", "Asia", ...) makes
# `ZoneInfo()` raise IsADirectoryError, an OSError that `_budget_settings` does not
# catch (it catches ZoneInfoNotFoundError and ValueError only). So `parse_config` /
# `load_config` crash with a traceback instead of raising ConfigError: `extproc
# check-config` prints a traceback, startup fails uncleanly, and
# `ConfigReloader.reload` (which only catches ConfigError / SecretUnavailable) lets the
# exception escape, killing the file-watch task so later config edits are never loaded.
@pytest.mark.parametrize("zone", ["Europe", "America"])
def test_timezone_naming_a_tz_directory_is_a_config_issue(zone: str) -> None:
    text = CONFIG.replace("KEY_ID", "acme-1").replace(
        "tenants:", f"budgets: {{timezone: {zone}}}\ntenants:")
    with pytest.raises(ConfigError) as caught:
        parse_config(text)
    assert [(i.path, i.message) for i in caught.value.issues] == [
        ("budgets.timezone", f"unknown time zone {zone!r}")]


# Bug 2 (extproc/budgets/guard.py, `Breaker` / `BudgetGuard._guarded`): when the breaker
# is half-open, `allow()` sets `_probing = True` for the probe, and only `success()` or
# `failure()` clear it. If the probe ends any other way - the request task is cancelled
# (client abort or Envoy's message timeout cancels the stream handler, see server.py), or
# the ledger raises something other than LedgerUnavailable/TimeoutError - neither runs:
# `_probing` stays True and `_opened_at` stays set, so `allow()` returns False forever.
# Every later reserve, settle and sweep fails at once ("breaker open") until the process
# restarts, even though Redis is healthy: fail_closed tenants get 503 indefinitely.
async def test_cancelled_half_open_probe_does_not_leave_the_breaker_open_forever() -> None:
    now = [1000.0]
    breaker = CircuitBreaker(threshold=3, cooldown_s=2.0, clock=lambda: now[0])
    ledger = Ledger()
    guard = BudgetGuard(ledger, timezone="UTC", breaker=breaker)
    for _ in range(3):
        with pytest.raises(GatewayError):
            await guard.reserve(request_id="x", budget=budget(), key_id="k", model="m",
                                cost_micro_usd=1, estimated_tokens=1)
    assert breaker.is_open

    now[0] += 2.0
    ledger.down = False
    ledger.gate = asyncio.Event()
    probe = asyncio.create_task(guard.reserve(request_id="probe", budget=budget(),
                                              key_id="k", model="m", cost_micro_usd=1,
                                              estimated_tokens=1))
    await asyncio.sleep(0)
    assert ledger.calls == 4  # the probe is in flight
    probe.cancel()  # the client went away
    with pytest.raises(asyncio.CancelledError):
        await probe

    # Redis is fine and an hour has passed: a new probe must be allowed through.
    ledger.gate = None
    now[0] += 3600.0
    hold = await guard.reserve(request_id="later", budget=budget(), key_id="k", model="m",
                               cost_micro_usd=1, estimated_tokens=1)
    assert hold.mode == "redis"
    assert ledger.calls == 5


# Bug 3 (extproc/budgets/guard.py, `BudgetGuard.settle` for mode 'fail_open'): the
# local ceiling is reset when the first fail-open reserve of a new day arrives, but a
# hold taken the day before is settled against whatever day is current:
# `spent = spent - hold.local_amount + cost`. Settling yesterday's 10_000 hold at a
# real cost of 1_000 after the reset removes 9_000 that today's tally never contained,
# so today's ceiling is exceeded by yesterday's unused hold. Below, with a 25_000
# ceiling, today admits B (10_000) + C (10_000) + D (10_000) = 30_000 plus A's real
# 1_000 charged today: 31_000 > 25_000 while Redis is down.
async def test_fail_open_settle_after_the_daily_reset_keeps_the_new_day_under_ceiling(
) -> None:
    today = [datetime(2026, 11, 25, 23, 59, tzinfo=UTC)]
    guard = BudgetGuard(Ledger(), timezone="UTC", now=lambda: today[0])
    tenant = budget(fail_open=True, ceiling=25_000)

    holds: dict[str, Hold] = {}

    async def reserve(request_id: str) -> str:
        hold = await guard.reserve(request_id=request_id, budget=tenant, key_id="k",
                                   model="m", cost_micro_usd=10_000, estimated_tokens=1)
        holds[request_id] = hold
        return hold.mode

    assert await reserve("A") == "fail_open"  # yesterday
    today[0] = datetime(2026, 11, 26, 0, 1, tzinfo=UTC)
    assert await reserve("B") == "fail_open"  # today: the local tally resets
    await guard.settle(holds["A"], cost_micro_usd=1_000, tokens=1, budget=tenant)
    assert await reserve("C") == "fail_open"  # today: B 10_000 + A 1_000 + C 10_000
    with pytest.raises(GatewayError) as caught:
        await reserve("D")  # would make 31_000 > 25_000
    assert caught.value.status == 503


# Bug 4 (extproc/config.py key ids and model names vs extproc/budgets/lua/*.lua): the
# config accepts any non-empty string as a key id (and any YAML key as a model name;
# neither is checked with `_NAME_RE` like tenant and org names), and a key- or
# model-scoped budget puts it verbatim into a counter key. reserve.lua stores the holds
# as ONE space-separated "key amount key amount" string, which settle.lua and sweep.lua
# split with '(%S+) (%S+)'. A key id such as "alice laptop" therefore breaks the record:
# checked against a real redis-server, reserve succeeds, but every settle of that
# request fails with a Lua error (LedgerUnavailable -> the real cost is never charged
# and each failure counts toward the breaker), and sweep.lua errors on the record for
# as long as it sits in the holds index, so the hold is not returned and no other
# abandoned hold of the same hash tag is swept either (the server's sweeper also
# `break`s on LedgerUnavailable, skipping every tag sorted after it). Either the config
# must reject such ids/names, or counter keys must not contain whitespace.
@pytest.mark.parametrize("key_id", ["alice laptop", "ci\tbot"])
def test_key_ids_the_config_accepts_give_counter_keys_the_lua_record_can_hold(
    key_id: str,
) -> None:
    text = CONFIG.replace("KEY_ID", f'"{key_id}"')
    try:
        config = parse_config(text)
    except ConfigError:
        return  # rejected by the config: fixed that way
    tenant_budget = config.tenants["acme"].budget
    assert tenant_budget is not None
    groups = plan_reservation(tenant_budget, key_id=key_id, model="gpt-4o-mini",
                              cost_micro_usd=1, estimated_tokens=1,
                              now=datetime(2026, 11, 25, tzinfo=UTC), zone=ZoneInfo("UTC"))
    keys = [key for group in groups for key in group.keys]
    assert keys
    assert [key for key in keys if re.search(r"\s", key)] == []
