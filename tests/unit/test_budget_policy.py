"""Budget policy (`extproc.budgets.policy`) and the budget sections of the config.

Pure: every plan is made with an explicit `now`, so window keys, reset times and
retry-after values are asserted exactly, including at day, month, year and DST edges.
"""

from __future__ import annotations

import re
import textwrap
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest

from extproc.budgets.policy import (
    ROLLING_BUCKETS,
    BudgetRule,
    CounterGroup,
    RateLimits,
    Scope,
    TenantBudget,
    Window,
    estimate_input_tokens,
    hash_tag,
    plan_reservation,
)
from extproc.config import BudgetSettings, ConfigError, parse_config
from extproc.money import worst_case_cost

UTC_ZONE = ZoneInfo("UTC")
PARIS = ZoneInfo("Europe/Paris")
NOON = datetime(2026, 11, 25, 12, 0, 0, tzinfo=UTC)  # timestamp 1795608000, 5985360 * 300
WEEK_S = 7 * 86400

TENANT_DAY = BudgetRule(Scope.TENANT, Window.DAY, 1_000_000)
TENANT_MONTH = BudgetRule(Scope.TENANT, Window.MONTH, 5_000_000)
TENANT_HOUR = BudgetRule(Scope.TENANT, Window.ROLLING, 100_000, period_s=3600)


def make_budget(*rules: BudgetRule, org: str | None = None, rpm: int | None = None,
                tpm: int | None = None) -> TenantBudget:
    return TenantBudget(tenant="acme", org=org, rules=rules,
                        rate_limits=RateLimits(rpm=rpm, tpm=tpm))


def plan(budget: TenantBudget, now: datetime, *, zone: ZoneInfo = UTC_ZONE,
         key_id: str = "k1", model: str = "gpt-4o", cost: int = 1234,
         tokens: int = 100) -> tuple[CounterGroup, ...]:
    return plan_reservation(budget, key_id=key_id, model=model, cost_micro_usd=cost,
                            estimated_tokens=tokens, now=now, zone=zone)


def only_group(rule: BudgetRule, now: datetime, zone: ZoneInfo = UTC_ZONE) -> CounterGroup:
    groups = plan(make_budget(rule), now, zone=zone)
    assert len(groups) == 1
    return groups[0]


def utc(year: int, month: int, day: int, hour: int = 0, minute: int = 0, second: int = 0,
        microsecond: int = 0) -> datetime:
    return datetime(year, month, day, hour, minute, second, microsecond, tzinfo=UTC)


# --- calendar windows -------------------------------------------------------------------

DAY_KEY = "asc:{t:acme}:b:tenant:acme:"


@pytest.mark.parametrize(
    ("now", "window_id", "resets_at", "retry_after"),
    [
        (utc(2026, 11, 25, 23, 59, 59), "d2026-11-25", utc(2026, 11, 26), 1),
        (utc(2026, 11, 26, 0, 0, 0), "d2026-11-26", utc(2026, 11, 27), 86400),
        (utc(2026, 12, 31, 23, 59, 59), "d2026-12-31", utc(2027, 1, 1), 1),
        (utc(2028, 2, 28, 23, 59, 59), "d2028-02-28", utc(2028, 2, 29), 1),
        (utc(2028, 2, 29, 12, 0, 0), "d2028-02-29", utc(2028, 3, 1), 43200),
        (utc(2028, 2, 29, 23, 59, 59), "d2028-02-29", utc(2028, 3, 1), 1),
    ],
)
def test_day_window_utc(now: datetime, window_id: str, resets_at: datetime,
                        retry_after: int) -> None:
    group = only_group(TENANT_DAY, now)
    assert group.keys == (DAY_KEY + window_id,)
    assert group.resets_at == resets_at
    assert group.retry_after_s(now) == retry_after
    assert group.ttl_s == retry_after + WEEK_S
    assert (group.name, group.unit, group.limit, group.amount) == (
        "tenant daily budget", "usd", 1_000_000, 1234)


@pytest.mark.parametrize(
    ("now", "window_id", "resets_at", "retry_after"),
    [
        (utc(2026, 11, 30, 23, 59, 59), "m2026-11", utc(2026, 12, 1), 1),
        (utc(2026, 12, 1, 0, 0, 0), "m2026-12", utc(2027, 1, 1), 31 * 86400),
        # December -> January: the year changes.
        (utc(2026, 12, 31, 23, 59, 59), "m2026-12", utc(2027, 1, 1), 1),
        (utc(2027, 1, 1, 0, 0, 0), "m2027-01", utc(2027, 2, 1), 31 * 86400),
        # February: 28 days in 2027, 29 in the leap year 2028.
        (utc(2027, 2, 1, 0, 0, 0), "m2027-02", utc(2027, 3, 1), 28 * 86400),
        (utc(2028, 2, 1, 0, 0, 0), "m2028-02", utc(2028, 3, 1), 29 * 86400),
        (utc(2028, 2, 29, 12, 0, 0), "m2028-02", utc(2028, 3, 1), 43200),
        (utc(2028, 2, 29, 23, 59, 59), "m2028-02", utc(2028, 3, 1), 1),
        (utc(2028, 3, 1, 0, 0, 0), "m2028-03", utc(2028, 4, 1), 31 * 86400),
    ],
)
def test_month_window_utc(now: datetime, window_id: str, resets_at: datetime,
                          retry_after: int) -> None:
    group = only_group(TENANT_MONTH, now)
    assert group.keys == (DAY_KEY + window_id,)
    assert group.resets_at == resets_at
    assert group.retry_after_s(now) == retry_after
    assert group.ttl_s == retry_after + WEEK_S
    assert group.name == "tenant monthly budget"


@pytest.mark.parametrize(
    ("now", "window_id", "resets_at", "retry_after"),
    [
        # 2026-03-29: clocks go from 02:00 CET to 03:00 CEST; that day lasts 23 hours.
        (utc(2026, 3, 28, 22, 59, 59), "d2026-03-28", utc(2026, 3, 28, 23), 1),
        (utc(2026, 3, 28, 23, 0, 0), "d2026-03-29", utc(2026, 3, 29, 22), 23 * 3600),
        (utc(2026, 3, 29, 10, 0, 0), "d2026-03-29", utc(2026, 3, 29, 22), 12 * 3600),
        (utc(2026, 3, 29, 22, 0, 0), "d2026-03-30", utc(2026, 3, 30, 22), 24 * 3600),
        # 2026-10-25: clocks go from 03:00 CEST back to 02:00 CET; that day lasts 25 hours.
        (utc(2026, 10, 24, 22, 0, 0), "d2026-10-25", utc(2026, 10, 25, 23), 25 * 3600),
        # 2026-10-31 23:30 UTC is already 2026-11-01 00:30 in Paris (CET, UTC+1).
        (utc(2026, 10, 31, 23, 30, 0), "d2026-11-01", utc(2026, 11, 1, 23), 84600),
        (utc(2026, 10, 31, 22, 59, 59), "d2026-10-31", utc(2026, 10, 31, 23), 1),
    ],
)
def test_day_window_paris(now: datetime, window_id: str, resets_at: datetime,
                          retry_after: int) -> None:
    group = only_group(TENANT_DAY, now, PARIS)
    assert group.keys == (DAY_KEY + window_id,)
    assert group.resets_at == resets_at
    # The reset is local midnight, whatever the offset of that day.
    local = group.resets_at.astimezone(PARIS)
    assert (local.hour, local.minute, local.second) == (0, 0, 0)
    assert group.retry_after_s(now) == retry_after
    assert group.ttl_s == retry_after + WEEK_S


@pytest.mark.parametrize(
    ("now", "window_id", "resets_at", "retry_after"),
    [
        # April starts at 00:00 CEST = 22:00 UTC on March 31.
        (utc(2026, 3, 31, 21, 59, 59), "m2026-03", utc(2026, 3, 31, 22), 1),
        (utc(2026, 3, 31, 22, 0, 0), "m2026-04", utc(2026, 4, 30, 22), 30 * 86400),
        # November (in Paris) already, though still October in UTC; December starts
        # at 00:00 CET = 23:00 UTC on November 30.
        (utc(2026, 10, 31, 23, 30, 0), "m2026-11", utc(2026, 11, 30, 23), 30 * 86400 - 1800),
        (utc(2026, 10, 31, 22, 59, 59), "m2026-10", utc(2026, 10, 31, 23), 1),
        # December -> January in Paris: 2027 starts at 23:00 UTC on 2026-12-31.
        (utc(2026, 12, 31, 22, 59, 59), "m2026-12", utc(2026, 12, 31, 23), 1),
        (utc(2026, 12, 31, 23, 0, 0), "m2027-01", utc(2027, 1, 31, 23), 31 * 86400),
    ],
)
def test_month_window_paris(now: datetime, window_id: str, resets_at: datetime,
                            retry_after: int) -> None:
    group = only_group(TENANT_MONTH, now, PARIS)
    assert group.keys == (DAY_KEY + window_id,)
    assert group.resets_at == resets_at
    assert group.retry_after_s(now) == retry_after
    assert group.ttl_s == retry_after + WEEK_S


def test_same_instant_is_a_different_day_and_month_in_utc_and_paris() -> None:
    now = utc(2026, 10, 31, 23, 30)
    budget = make_budget(TENANT_DAY, TENANT_MONTH)
    in_utc = plan(budget, now)
    in_paris = plan(budget, now, zone=PARIS)
    assert [g.keys[0] for g in in_utc] == [DAY_KEY + "d2026-10-31", DAY_KEY + "m2026-10"]
    assert [g.keys[0] for g in in_paris] == [DAY_KEY + "d2026-11-01", DAY_KEY + "m2026-11"]
    assert [g.retry_after_s(now) for g in in_utc] == [1800, 1800]
    assert [g.retry_after_s(now) for g in in_paris] == [84600, 30 * 86400 - 1800]


@pytest.mark.parametrize(
    ("now", "expected"),
    [
        (utc(2026, 11, 25, 23, 59, 58), 2),
        (utc(2026, 11, 25, 23, 59, 58, 500_000), 2),  # 1.5 s rounds up
        (utc(2026, 11, 25, 23, 59, 59, 250_000), 1),  # 0.75 s rounds up
        (utc(2026, 11, 26, 0, 0, 0), 1),  # at the reset: never 0
        (utc(2026, 11, 26, 0, 0, 5), 1),  # past it: never negative
        (utc(2026, 11, 25, 0, 0, 0), 86400),
    ],
)
def test_retry_after_is_whole_seconds_rounded_up_and_at_least_one(
    now: datetime, expected: int,
) -> None:
    group = CounterGroup("tenant daily budget", "usd", ("k",), 1, 1, utc(2026, 11, 26), 60)
    assert group.retry_after_s(now) == expected


# --- rolling windows --------------------------------------------------------------------

ROLLING_BASE = "asc:{t:acme}:b:tenant:acme:r3600:"


def test_rolling_hour_has_thirteen_five_minute_buckets_current_first() -> None:
    now = utc(2026, 11, 25, 12, 4, 30)  # timestamp 1795608270, bucket 5985360
    group = only_group(TENANT_HOUR, now)
    assert ROLLING_BUCKETS == 12
    assert group.keys == tuple(f"{ROLLING_BASE}{5985360 - i}" for i in range(13))
    assert group.resets_at == utc(2026, 11, 25, 12, 5, 0)  # end of the current bucket
    assert group.retry_after_s(now) == 30
    assert group.ttl_s == 3600 + 2 * 300
    assert (group.name, group.unit, group.limit, group.amount) == (
        "tenant 3600s rolling budget", "usd", 100_000, 1234)


def spend_key(at: datetime) -> str:
    """The counter a spend made at `at` landed on: the current bucket of its own plan."""
    return only_group(TENANT_HOUR, at).keys[0]


def test_rolling_hour_sums_a_spend_from_59_minutes_ago_but_not_75() -> None:
    summed = only_group(TENANT_HOUR, NOON).keys
    assert summed[0] == ROLLING_BASE + "5985360"
    assert summed[-1] == ROLLING_BASE + "5985348"
    assert spend_key(NOON - timedelta(minutes=59)) == ROLLING_BASE + "5985348"
    assert spend_key(NOON - timedelta(minutes=59)) in summed
    assert spend_key(NOON - timedelta(minutes=75)) == ROLLING_BASE + "5985345"
    assert spend_key(NOON - timedelta(minutes=75)) not in summed
    assert spend_key(NOON - timedelta(seconds=1)) in summed
    assert spend_key(NOON) in summed


def test_rolling_window_is_conservative_by_at_most_one_bucket() -> None:
    now = utc(2026, 11, 25, 12, 4, 30)
    summed = only_group(TENANT_HOUR, now).keys
    # 64.5 minutes ago shares a bucket with 59.5 minutes ago: still counted.
    assert spend_key(utc(2026, 11, 25, 11, 0, 0)) in summed
    assert spend_key(utc(2026, 11, 25, 10, 59, 59)) not in summed


@pytest.mark.parametrize(
    ("period", "bucket_s", "count"),
    [(60, 5, 13), (61, 6, 12), (100, 9, 13), (3600, 300, 13), (86400, 7200, 13),
     (90 * 86400, 648_000, 13)],
)
@pytest.mark.parametrize("offset_s", [0, 1, 4, 299, 3599, 86399])
def test_rolling_buckets_cover_the_whole_period(period: int, bucket_s: int, count: int,
                                                offset_s: int) -> None:
    rule = BudgetRule(Scope.TENANT, Window.ROLLING, 1, period_s=period)
    now = NOON + timedelta(seconds=offset_s)
    group = only_group(rule, now)
    current = int(now.timestamp()) // bucket_s
    base = f"asc:{{t:acme}}:b:tenant:acme:r{period}:"
    assert group.keys == tuple(f"{base}{current - i}" for i in range(count))
    oldest_start = (current - count + 1) * bucket_s
    slack = now.timestamp() - period - oldest_start
    assert slack >= 0  # nothing in the window is missed
    # Conservative by less than one bucket when buckets divide the period, else by less
    # than two (the last bucket sticks out past the period).
    assert slack < (bucket_s if period % bucket_s == 0 else 2 * bucket_s)
    assert group.resets_at == datetime.fromtimestamp((current + 1) * bucket_s, tz=UTC)
    assert group.ttl_s == period + 2 * bucket_s


# --- rate limits ------------------------------------------------------------------------

def test_rpm_and_tpm_use_the_current_utc_minute() -> None:
    now = utc(2026, 11, 25, 12, 4, 30)  # minute 29926804
    groups = plan(make_budget(rpm=60, tpm=10_000), now, zone=PARIS, tokens=4196)
    resets = utc(2026, 11, 25, 12, 5)
    base = "asc:{t:acme}:rl:tenant:acme:"
    assert groups == (
        CounterGroup("requests per minute", "requests", (f"{base}rpm:29926804",), 60, 1,
                     resets, ttl_s=120),
        CounterGroup("tokens per minute", "tokens", (f"{base}tpm:29926804",), 10_000, 4196,
                     resets, ttl_s=120),
    )
    assert [g.retry_after_s(now) for g in groups] == [30, 30]


def test_rate_limit_minute_boundary() -> None:
    last = plan(make_budget(rpm=1), utc(2026, 11, 25, 12, 3, 59))
    first = plan(make_budget(rpm=1), utc(2026, 11, 25, 12, 4, 0))
    assert last[0].keys == ("asc:{t:acme}:rl:tenant:acme:rpm:29926803",)
    assert first[0].keys == ("asc:{t:acme}:rl:tenant:acme:rpm:29926804",)
    assert last[0].retry_after_s(utc(2026, 11, 25, 12, 3, 59)) == 1
    assert first[0].retry_after_s(utc(2026, 11, 25, 12, 4, 0)) == 60


def test_only_tpm_and_no_limits() -> None:
    only_tpm = plan(make_budget(tpm=5), NOON, tokens=7)
    assert [(g.name, g.amount, g.limit) for g in only_tpm] == [("tokens per minute", 7, 5)]
    assert plan(make_budget(), NOON) == ()


# --- scopes -----------------------------------------------------------------------------

SCOPED_RULES = (
    TENANT_MONTH,
    BudgetRule(Scope.KEY, Window.DAY, 200_000, subject="k1"),
    BudgetRule(Scope.KEY, Window.DAY, 300_000, subject="k2"),
    BudgetRule(Scope.MODEL, Window.DAY, 400_000, subject="gpt-4o"),
    BudgetRule(Scope.MODEL, Window.ROLLING, 500_000, subject="gpt-4o-mini", period_s=3600),
)


@pytest.mark.parametrize(
    ("key_id", "model", "names"),
    [
        ("k1", "gpt-4o", ["tenant monthly budget", "key 'k1' daily budget",
                          "model 'gpt-4o' daily budget"]),
        ("k2", "gpt-4o-mini", ["tenant monthly budget", "key 'k2' daily budget",
                               "model 'gpt-4o-mini' 3600s rolling budget"]),
        ("k3", "o1", ["tenant monthly budget"]),
    ],
)
def test_key_and_model_rules_apply_only_to_their_key_and_model(
    key_id: str, model: str, names: list[str],
) -> None:
    groups = plan(make_budget(*SCOPED_RULES, rpm=10), NOON, key_id=key_id, model=model)
    assert [g.name for g in groups] == [*names, "requests per minute"]
    assert [g.amount for g in groups] == [1234] * len(names) + [1]


def test_key_and_model_counter_names() -> None:
    groups = plan(make_budget(*SCOPED_RULES), NOON, key_id="k1", model="gpt-4o")
    assert [g.keys for g in groups] == [
        ("asc:{t:acme}:b:tenant:acme:m2026-11",),
        ("asc:{t:acme}:b:tenant:acme:key:k1:d2026-11-25",),
        ("asc:{t:acme}:b:tenant:acme:model:gpt-4o:d2026-11-25",),
    ]
    assert [g.limit for g in groups] == [5_000_000, 200_000, 400_000]


TAG_RE = re.compile(r"\{[^}]*\}")


def all_keys(groups: tuple[CounterGroup, ...]) -> list[str]:
    return [key for group in groups for key in group.keys]


def test_org_plan_uses_the_org_hash_tag_on_every_key() -> None:
    rules = (BudgetRule(Scope.ORG, Window.DAY, 9_000_000), BudgetRule(Scope.ORG,
             Window.ROLLING, 1, period_s=600), *SCOPED_RULES)
    budget = make_budget(*rules, org="bigco", rpm=1, tpm=1)
    groups = plan(budget, NOON, key_id="k1", model="gpt-4o-mini")
    assert hash_tag(budget) == "{o:bigco}"
    keys = all_keys(groups)
    assert len(keys) == 1 + 13 + 1 + 1 + 13 + 1 + 1
    assert all(TAG_RE.findall(key) == ["{o:bigco}"] for key in keys)
    assert all(key.startswith("asc:{o:bigco}:") for key in keys)
    assert groups[0].keys == ("asc:{o:bigco}:b:org:bigco:d2026-11-25",)
    assert groups[0].name == "organisation daily budget"
    assert groups[1].keys[0] == "asc:{o:bigco}:b:org:bigco:r600:" + str(1795608000 // 50)
    assert groups[2].keys == ("asc:{o:bigco}:b:tenant:acme:m2026-11",)
    assert groups[3].keys == ("asc:{o:bigco}:b:tenant:acme:key:k1:d2026-11-25",)
    assert groups[-2].keys == ("asc:{o:bigco}:rl:tenant:acme:rpm:29926800",)
    assert groups[-1].keys == ("asc:{o:bigco}:rl:tenant:acme:tpm:29926800",)


def test_tenant_plan_uses_the_tenant_hash_tag_on_every_key() -> None:
    budget = make_budget(*SCOPED_RULES, TENANT_HOUR, rpm=1, tpm=1)
    assert hash_tag(budget) == "{t:acme}"
    keys = all_keys(plan(budget, NOON, key_id="k2", model="gpt-4o-mini"))
    assert len(keys) == 1 + 1 + 13 + 13 + 1 + 1
    assert all(TAG_RE.findall(key) == ["{t:acme}"] for key in keys)
    assert all(key.startswith("asc:{t:acme}:") for key in keys)


# --- amounts and descriptions -------------------------------------------------------------

@pytest.mark.parametrize(
    ("input_tokens", "output_tokens", "input_price", "output_price", "expected"),
    [
        (0, 0, 150_000, 600_000, 0),
        (1, 0, 1, 0, 1),  # 0.000001 micro-USD rounds up to 1
        (1_000_000, 0, 1, 0, 1),
        (1_000_001, 0, 1, 0, 2),
        (1000, 500, 150_000, 600_000, 450),  # exact: 150 + 300
        (1001, 500, 150_000, 600_000, 451),  # 450.15 rounds up
        (3, 7, 333_333, 1, 2),  # 1_000_006 / 1e6
        (100, 4096, 2_500_000, 10_000_000, 41_210),
    ],
)
def test_worst_case_cost_rounds_up_to_a_micro_usd(input_tokens: int, output_tokens: int,
                                                  input_price: int, output_price: int,
                                                  expected: int) -> None:
    assert worst_case_cost(input_tokens, output_tokens, input_price, output_price) == expected


@pytest.mark.parametrize(
    ("body_bytes", "tokens"),
    [(0, 1), (1, 1), (2, 1), (3, 1), (4, 2), (6, 2), (7, 3), (3_000_000, 1_000_000),
     (3_000_001, 1_000_001)],
)
def test_estimate_input_tokens_is_bytes_over_three_rounded_up_at_least_one(
    body_bytes: int, tokens: int,
) -> None:
    assert estimate_input_tokens(body_bytes) == tokens


@pytest.mark.parametrize(
    ("rule", "text"),
    [
        (BudgetRule(Scope.ORG, Window.DAY, 1), "organisation daily budget"),
        (BudgetRule(Scope.ORG, Window.MONTH, 1), "organisation monthly budget"),
        (BudgetRule(Scope.TENANT, Window.MONTH, 1), "tenant monthly budget"),
        (BudgetRule(Scope.TENANT, Window.ROLLING, 1, period_s=86400),
         "tenant 86400s rolling budget"),
        (BudgetRule(Scope.KEY, Window.DAY, 1, subject="acme-1"), "key 'acme-1' daily budget"),
        (BudgetRule(Scope.MODEL, Window.ROLLING, 1, subject="gpt-4o", period_s=600),
         "model 'gpt-4o' 600s rolling budget"),
    ],
)
def test_rule_describe(rule: BudgetRule, text: str) -> None:
    assert rule.describe() == text


# --- config: budgets, orgs, rate limits ---------------------------------------------------

HASH_A = "hmac-sha256:v1:" + "a" * 64
HASH_B = "hmac-sha256:v1:" + "b" * 64
HASH_C = "hmac-sha256:v1:" + "c" * 64
BASE = """\
version: 1
auth:
  pepper: {env: ASC_PEPPER}
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
  gpt-4o:
    price: {input_per_mtok: 2.5, output_per_mtok: 10}
    deployments: [{provider: prov-us}]
"""
REDIS = 'redis: {url: "redis://127.0.0.1:6379"}\n'
ORGS = """\
orgs:
  bigco:
    budgets:
      - {window: month, limit_usd: 1000}
      - {window: rolling, period_s: 3600, limit_usd: 50.5}
"""


def config_text(acme: str = "", *, top: str = REDIS, others: str = "") -> str:
    tenant = (f"  acme:\n    keys: [{{id: acme-1, hash: '{HASH_A}'}}, "
              f"{{id: acme-2, hash: '{HASH_B}'}}]\n    models: [gpt-4o-mini]\n")
    return (BASE + top + "tenants:\n" + tenant + textwrap.indent(textwrap.dedent(acme), "    ")
            + textwrap.indent(textwrap.dedent(others), "  "))


def issues(text: str) -> list[tuple[str, str]]:
    with pytest.raises(ConfigError) as caught:
        parse_config(text)
    return [(issue.path, issue.message) for issue in caught.value.issues]


def test_valid_budget_rules_compile_to_a_tenant_budget() -> None:
    text = config_text(
        """\
        org: bigco
        budgets:
          - {scope: tenant, window: day, limit_usd: 10}
          - {scope: key, key: acme-1, window: day, limit_usd: 2.5}
          - {scope: model, model: gpt-4o-mini, window: rolling, period_s: 86400,
             limit_usd: 0.000001}
          - {scope: tenant, window: month, limit_usd: "0.25"}
        rate_limits: {rpm: 60, tpm: 100000}
        on_redis_error: fail_open
        fail_open_ceiling_usd: 5
        """,
        top=REDIS + "budgets: {timezone: Europe/Paris}\n" + ORGS,
    )
    config = parse_config(text)
    assert config.budgets == BudgetSettings(timezone="Europe/Paris", hold_ttl_s=600,
                                            default_max_tokens=4096)
    assert config.tenants["acme"].budget == TenantBudget(
        tenant="acme",
        org="bigco",
        rules=(
            BudgetRule(Scope.ORG, Window.MONTH, 1_000_000_000),
            BudgetRule(Scope.ORG, Window.ROLLING, 50_500_000, period_s=3600),
            BudgetRule(Scope.TENANT, Window.DAY, 10_000_000),
            BudgetRule(Scope.KEY, Window.DAY, 2_500_000, subject="acme-1"),
            BudgetRule(Scope.MODEL, Window.ROLLING, 1, subject="gpt-4o-mini", period_s=86400),
            BudgetRule(Scope.TENANT, Window.MONTH, 250_000),
        ),
        rate_limits=RateLimits(rpm=60, tpm=100_000),
        fail_open=True,
        fail_open_ceiling_micro_usd=5_000_000,
    )


def test_org_member_rate_limit_only_and_unbudgeted_tenants() -> None:
    others = f"""\
      member:
        keys: [{{id: m-1, hash: '{HASH_C}'}}]
        models: [gpt-4o]
        org: bigco
    """
    text = config_text("rate_limits: {tpm: 1}\n", top=REDIS + ORGS, others=others)
    config = parse_config(text)
    assert config.tenants["acme"].budget == TenantBudget(
        tenant="acme", org=None, rules=(), rate_limits=RateLimits(rpm=None, tpm=1))
    assert config.tenants["member"].budget == TenantBudget(
        tenant="member", org="bigco",
        rules=(BudgetRule(Scope.ORG, Window.MONTH, 1_000_000_000),
               BudgetRule(Scope.ORG, Window.ROLLING, 50_500_000, period_s=3600)),
        rate_limits=RateLimits())
    assert parse_config(config_text(top="")).tenants["acme"].budget is None
    assert parse_config(config_text(top="")).redis is None


RULE = "tenants.acme.budgets[0]"


@pytest.mark.parametrize(
    ("acme", "top", "expected"),
    [
        pytest.param("budgets: [{scope: team, window: day, limit_usd: 1}]", REDIS,
                     [(f"{RULE}.scope", "unknown scope 'team'")], id="unknown-scope"),
        pytest.param("budgets: [{scope: org, window: day, limit_usd: 1}]", REDIS,
                     [(f"{RULE}.scope", "unknown scope 'org'")], id="org-scope-on-tenant"),
        pytest.param("budgets: [{window: day, limit_usd: 1}]", REDIS,
                     [(f"{RULE}.scope", "is required")], id="missing-scope"),
        pytest.param("budgets: [{scope: tenant, window: week, limit_usd: 1}]", REDIS,
                     [(f"{RULE}.window", "unknown window 'week'")], id="unknown-window"),
        pytest.param("budgets: [{scope: tenant, window: rolling, limit_usd: 1}]", REDIS,
                     [(f"{RULE}.period_s", "is required for a rolling window")],
                     id="rolling-without-period"),
        pytest.param("budgets: [{scope: tenant, window: day, period_s: 3600, limit_usd: 1}]",
                     REDIS, [(f"{RULE}.period_s", "only applies to a rolling window")],
                     id="period-on-day"),
        pytest.param("budgets: [{scope: key, key: acme-9, window: day, limit_usd: 1}]", REDIS,
                     [(f"{RULE}.key", "unknown key id 'acme-9'")], id="unknown-key-id"),
        pytest.param("budgets: [{scope: model, model: gpt-4o, window: day, limit_usd: 1}]",
                     REDIS,
                     [(f"{RULE}.model", "model 'gpt-4o' is not allowed for this tenant")],
                     id="model-not-allowed"),
        pytest.param("budgets: [{scope: model, model: o9, window: day, limit_usd: 1}]",
                     REDIS, [(f"{RULE}.model", "model 'o9' is not allowed for this tenant")],
                     id="model-unknown"),
        pytest.param("org: nope\nbudgets: [{scope: tenant, window: day, limit_usd: 1}]",
                     REDIS + ORGS, [("tenants.acme.org", "unknown org 'nope'")],
                     id="unknown-org"),
        pytest.param("on_redis_error: fail_open\nrate_limits: {rpm: 5}", REDIS,
                     [("tenants.acme.fail_open_ceiling_usd", "is required with fail_open")],
                     id="fail-open-without-ceiling"),
        pytest.param("on_redis_error: retry\nrate_limits: {rpm: 5}", REDIS,
                     [("tenants.acme.on_redis_error", "unknown mode 'retry'")],
                     id="bad-on-redis-error"),
        pytest.param("rate_limits: {rpm: 0}", REDIS,
                     [("tenants.acme.rate_limits.rpm", "must be an integer from 1 to 10000000")],
                     id="rpm-zero"),
        pytest.param("rate_limits: {tpm: 0}", REDIS,
                     [("tenants.acme.rate_limits.tpm",
                       "must be an integer from 1 to 10000000000")], id="tpm-zero"),
        pytest.param("budgets: [{scope: tenant, window: day, limit_usd: 1}]", "",
                     [("tenants.acme", "budgets and rate limits need Redis")],
                     id="budgets-without-redis"),
        pytest.param("rate_limits: {rpm: 5}", "",
                     [("tenants.acme", "budgets and rate limits need Redis")],
                     id="rate-limits-without-redis"),
        pytest.param("rate_limits: {rpm: 5}", "redis: {cluster: false}\n",
                     [("redis.url", "is required")], id="redis-without-url"),
        pytest.param("", REDIS + "budgets: {timezone: Mars/Olympus}\n",
                     [("budgets.timezone", "unknown time zone 'Mars/Olympus'")],
                     id="unknown-timezone"),
        pytest.param("", REDIS + "budgets: {timezone: ../etc/passwd}\n",
                     [("budgets.timezone", "unknown time zone '../etc/passwd'")],
                     id="timezone-path"),
    ],
)
def test_invalid_budget_config(acme: str, top: str, expected: list[tuple[str, str]]) -> None:
    assert issues(config_text(acme, top=top)) == expected


def test_invalid_org_rules_are_reported_under_orgs() -> None:
    top = REDIS + """\
orgs:
  bigco:
    budgets:
      - {scope: tenant, window: day, limit_usd: 1}
      - {window: fortnight, limit_usd: 1}
      - {window: rolling, limit_usd: 1}
"""
    assert issues(config_text(top=top)) == [
        ("orgs.bigco.budgets[0].scope", "unknown field"),
        ("orgs.bigco.budgets[1].window", "unknown window 'fortnight'"),
        ("orgs.bigco.budgets[2].period_s", "is required for a rolling window"),
    ]


# --- plans of one second (planned once, amounts per request) ----------------------------

def test_plans_of_one_second_differ_only_in_their_amounts() -> None:
    budget = make_budget(TENANT_DAY, rpm=60, tpm=1000)

    first = plan(budget, NOON + timedelta(microseconds=1), cost=500, tokens=40)
    second = plan(budget, NOON + timedelta(microseconds=999_999), cost=900, tokens=70)

    assert [g.amount for g in first] == [500, 1, 40]
    assert [g.amount for g in second] == [900, 1, 70]
    assert [g.ttl_s for g in second] == [43_199 + WEEK_S, 120, 120]
    assert second == tuple(CounterGroup(g.name, g.unit, g.keys, g.limit, a, g.resets_at,
                                        g.ttl_s, g.scope, g.window)
                           for g, a in zip(first, (900, 1, 70), strict=True))


def test_a_plan_on_the_whole_second_keeps_its_own_calendar_ttl() -> None:
    budget = make_budget(TENANT_DAY)

    assert only_ttl(budget, NOON + timedelta(microseconds=500_000)) == 43_199 + WEEK_S
    assert only_ttl(budget, NOON) == 43_200 + WEEK_S
    assert only_ttl(budget, NOON + timedelta(microseconds=1)) == 43_199 + WEEK_S
    assert only_ttl(budget, NOON + timedelta(seconds=1)) == 43_199 + WEEK_S


def only_ttl(budget: TenantBudget, now: datetime) -> int:
    [group] = plan(budget, now)
    return group.ttl_s


def test_a_plan_is_the_principals_own_within_one_second() -> None:
    budget = make_budget(TENANT_DAY, BudgetRule(Scope.KEY, Window.DAY, 7_000, subject="k1"))

    mine = plan(budget, NOON, key_id="k1")
    theirs = plan(budget, NOON, key_id="k2")

    assert [g.limit for g in mine] == [1_000_000, 7_000]
    assert [g.limit for g in theirs] == [1_000_000]


def test_a_reloaded_budget_is_planned_with_its_own_limits_in_the_same_second() -> None:
    before = plan(make_budget(TENANT_DAY), NOON)
    after = plan(make_budget(BudgetRule(Scope.TENANT, Window.DAY, 2_000_000)), NOON)

    assert [g.limit for g in before] == [1_000_000]
    assert [g.limit for g in after] == [2_000_000]
