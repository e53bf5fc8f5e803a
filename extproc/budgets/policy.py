"""Budget and rate-limit policy: which counters a request touches, and by how much.

Pure and clock-injected: given a tenant's rules, the request (key, model, worst-case
cost, token estimate) and "now", `plan_reservation` returns the counters the ledger must
check and hold in one atomic step. Windows:

* `day` / `month`: calendar windows in the configured time zone;
* `rolling`: the last `period_s` seconds, kept as `ROLLING_BUCKETS` buckets; the check sums
  every bucket that overlaps the window, so it is conservative (never under-counts);
* `rpm` / `tpm`: fixed calendar minutes (UTC).

Money is integer micro-USD throughout.
"""

from __future__ import annotations

import enum
import functools
import math
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Final
from zoneinfo import ZoneInfo

__all__ = [
    "ROLLING_BUCKETS",
    "BudgetRule",
    "CounterGroup",
    "RateLimits",
    "Scope",
    "TenantBudget",
    "Window",
    "estimate_input_tokens",
    "hash_tag",
    "plan_reservation",
    "tenant_limits",
]

ROLLING_BUCKETS: Final = 12
BYTES_PER_TOKEN_ESTIMATE: Final = 3
"""Prompt tokens are estimated as body bytes / 3, rounded up: above real tokenizers for
English and code (about 4 bytes per token), so the hold is on the safe side."""


class Scope(enum.Enum):
    ORG = "org"
    TENANT = "tenant"
    KEY = "key"
    MODEL = "model"
    TEAM = "team"
    """A team or app inside the tenant (docs/tenancy.md); subject is the team id."""


class Window(enum.Enum):
    DAY = "day"
    MONTH = "month"
    ROLLING = "rolling"


_SUBJECT_PREFIX: Final = {Scope.KEY: "key", Scope.MODEL: "model", Scope.TEAM: "team"}
"""A rule's subject as its description and counter keys name it."""


@dataclass(frozen=True, slots=True)
class BudgetRule:
    scope: Scope
    window: Window
    limit_micro_usd: int
    subject: str | None = None
    """The key id (scope key), model name (scope model) or team id (scope team); None
    otherwise."""
    period_s: int | None = None
    """Length of a rolling window."""

    def describe(self) -> str:
        scope = self.scope
        what = ("organisation" if scope is Scope.ORG else "tenant" if scope is Scope.TENANT
                else f"{_SUBJECT_PREFIX[scope]} '{self.subject}'")
        window = self.window
        when = ("daily" if window is Window.DAY else "monthly" if window is Window.MONTH
                else f"{self.period_s}s rolling")
        return f"{what} {when} budget"


@dataclass(frozen=True, slots=True)
class RateLimits:
    rpm: int | None = None
    tpm: int | None = None


@dataclass(frozen=True, slots=True)
class TenantBudget:
    tenant: str
    org: str | None
    rules: tuple[BudgetRule, ...]
    rate_limits: RateLimits
    fail_open: bool = False
    fail_open_ceiling_micro_usd: int = 0


@dataclass(frozen=True, slots=True)
class CounterGroup:
    """One limit: its counter keys (current bucket first), limit, and this request's amount.

    The ledger checks `sum(spent + held over keys) + amount <= limit` and holds `amount`
    on the first key only.
    """

    name: str
    unit: str
    keys: tuple[str, ...]
    limit: int
    amount: int
    resets_at: datetime
    ttl_s: int
    scope: str = ""
    """A budget rule's scope (`org`, `tenant`, `key`, `model`); "" for rate limits."""
    window: str = ""
    """A budget rule's window (`day`, `month`, `rolling`); "" for rate limits."""

    def retry_after_s(self, now: datetime) -> int:
        return max(1, math.ceil((self.resets_at - now).total_seconds()))




def hash_tag(budget: TenantBudget) -> str:
    """All keys of a request share one Redis Cluster slot: the org's, else the tenant's."""
    return f"{{o:{budget.org}}}" if budget.org else f"{{t:{budget.tenant}}}"


def estimate_input_tokens(body_bytes: int) -> int:
    return max(1, -(-body_bytes // BYTES_PER_TOKEN_ESTIMATE))


def _subject_key(rule: BudgetRule, budget: TenantBudget) -> str:
    if rule.scope is Scope.ORG:
        return f"org:{budget.org}"
    if rule.scope is Scope.TENANT:
        return f"tenant:{budget.tenant}"
    return f"tenant:{budget.tenant}:{_SUBJECT_PREFIX[rule.scope]}:{rule.subject}"


def _calendar(window: Window, local: datetime) -> tuple[str, datetime]:
    if window is Window.DAY:
        start = local.replace(hour=0, minute=0, second=0, microsecond=0)
        return start.strftime("d%Y-%m-%d"), start + timedelta(days=1)
    start = local.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    year, month = (start.year + 1, 1) if start.month == 12 else (start.year, start.month + 1)
    return start.strftime("m%Y-%m"), start.replace(year=year, month=month)


@functools.lru_cache(maxsize=64)
def _calendar_at(window: Window, zone: ZoneInfo, second: int) -> tuple[str, datetime]:
    """`_calendar` at a whole second (the windows change only at midnight): every request
    of that second shares one computation."""
    return _calendar(window, datetime.fromtimestamp(second, tz=UTC).astimezone(zone))


_RULE_TEXTS: dict[tuple[int, int], tuple[BudgetRule, TenantBudget, str, str, str, str]] = {}
_RULE_TEXTS_MAX: Final = 4096


def _rule_texts(rule: BudgetRule, budget: TenantBudget, tag: str) -> tuple[str, str, str, str]:
    """(description, counter key prefix, scope, window) of a tenant's rule: the same for
    every request under one config, so made once per rule object (entries keep their
    objects, so an id is never taken for another's; a reload's new objects get new ones)."""
    entry = _RULE_TEXTS.get((id(rule), id(budget)))
    if entry is None or entry[0] is not rule or entry[1] is not budget:
        if len(_RULE_TEXTS) >= _RULE_TEXTS_MAX:
            _RULE_TEXTS.clear()
        entry = _RULE_TEXTS[id(rule), id(budget)] = (
            rule, budget, rule.describe(), f"asc:{tag}:b:{_subject_key(rule, budget)}",
            rule.scope.value, rule.window.value)
    return entry[2], entry[3], entry[4], entry[5]


def _rule_group(rule: BudgetRule, budget: TenantBudget, tag: str, cost: int, now: datetime,
                zone: ZoneInfo) -> CounterGroup:
    name, base, scope, window = _rule_texts(rule, budget, tag)
    if rule.window is Window.ROLLING:
        period = rule.period_s or 3600
        bucket_s = max(1, -(-period // ROLLING_BUCKETS))
        current = int(now.timestamp()) // bucket_s
        count = -(-period // bucket_s) + 1  # every bucket overlapping [now - period, now]
        keys = tuple(f"{base}:r{period}:{current - i}" for i in range(count))
        resets = datetime.fromtimestamp((current + 1) * bucket_s, tz=UTC)
        return CounterGroup(name, "usd", keys, rule.limit_micro_usd, cost, resets,
                            ttl_s=period + 2 * bucket_s, scope=scope, window=window)
    window_id, resets = _calendar_at(rule.window, zone, int(now.timestamp()))
    ttl = int((resets - now).total_seconds()) + 7 * 86400  # kept a week for `budget show`
    return CounterGroup(name, "usd", (f"{base}:{window_id}",), rule.limit_micro_usd, cost,
                        resets, ttl_s=ttl, scope=scope, window=window)


def tenant_limits(budget: TenantBudget, *, now: datetime,
                  zone: ZoneInfo) -> tuple[CounterGroup, ...]:
    """Every limit of a tenant in the current windows, whatever key or model it names, in
    config order (rules, then RPM, then TPM): the one numbering `budget show`, `set` and
    `reset` share. Amounts are 0."""
    tag = hash_tag(budget)
    groups = [_rule_group(rule, budget, tag, 0, now, zone) for rule in budget.rules]
    groups.extend(_rate_groups(budget, tag, 0, 0, now))
    return tuple(groups)


def _rate_groups(budget: TenantBudget, tag: str, requests: int, tokens: int,
                 now: datetime) -> list[CounterGroup]:
    minute = int(now.timestamp()) // 60
    resets = datetime.fromtimestamp((minute + 1) * 60, tz=UTC)
    base = f"asc:{tag}:rl:tenant:{budget.tenant}"
    groups = []
    if budget.rate_limits.rpm is not None:
        groups.append(CounterGroup("requests per minute", "requests", (f"{base}:rpm:{minute}",),
                                   budget.rate_limits.rpm, requests, resets, ttl_s=120))
    if budget.rate_limits.tpm is not None:
        groups.append(CounterGroup("tokens per minute", "tokens", (f"{base}:tpm:{minute}",),
                                   budget.rate_limits.tpm, tokens, resets, ttl_s=120))
    return groups


_PlanKey = tuple[str, str, str, str | None, ZoneInfo, int, bool]
_PLANS: dict[_PlanKey, tuple[TenantBudget, tuple[CounterGroup, ...]]] = {}
_PLANS_MAX: Final = 4096


def plan_reservation(
    budget: TenantBudget,
    *,
    key_id: str,
    model: str,
    cost_micro_usd: int,
    estimated_tokens: int,
    now: datetime,
    zone: ZoneInfo,
    team: str | None = None,
) -> tuple[CounterGroup, ...]:
    """Every counter this request must fit into, in a stable order. A principal without
    a team touches no team limit; one with a team touches only its own team's.

    Everything but the amounts depends on `now` only through its whole second (windows,
    keys, resets) and, for a calendar window's TTL, on whether it is exactly that second:
    the groups of one (budget, key, model, team) are planned once per second and only
    the amounts (micro-USD, tokens) are the request's. Entries keep their budget object,
    so a reload's new one plans again."""
    if now.tzinfo is None:  # naive: as planned without the cache (calendar rules refuse it)
        return _plan(budget, key_id, model, cost_micro_usd, estimated_tokens, now, zone, team)
    stamp = now.timestamp()
    key = (budget.tenant, key_id, model, team, zone, int(stamp), stamp.is_integer())
    entry = _PLANS.get(key)
    if entry is None or entry[0] is not budget:
        if len(_PLANS) >= _PLANS_MAX:
            _PLANS.clear()
        entry = _PLANS[key] = (budget, _plan(budget, key_id, model, 0, 0, now, zone, team))
    return tuple([
        CounterGroup(g.name, g.unit, g.keys, g.limit,
                     cost_micro_usd if g.unit == "usd"
                     else estimated_tokens if g.unit == "tokens" else g.amount,
                     g.resets_at, g.ttl_s, g.scope, g.window)
        for g in entry[1]])


def _plan(budget: TenantBudget, key_id: str, model: str, cost_micro_usd: int,
          estimated_tokens: int, now: datetime, zone: ZoneInfo,
          team: str | None) -> tuple[CounterGroup, ...]:
    tag = hash_tag(budget)
    groups: list[CounterGroup] = []
    for rule in budget.rules:
        if rule.scope is Scope.KEY and rule.subject != key_id:
            continue
        if rule.scope is Scope.MODEL and rule.subject != model:
            continue
        if rule.scope is Scope.TEAM and rule.subject != team:
            continue
        groups.append(_rule_group(rule, budget, tag, cost_micro_usd, now, zone))
    groups.extend(_rate_groups(budget, tag, 1, estimated_tokens, now))
    return tuple(groups)
