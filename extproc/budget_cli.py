"""`extproc budget show / set / reset`: the operator's view of live budget counters.

Every limit of a tenant has a number and a name, in one stable order (config order: the
org's budgets, the tenant's `budgets` as written, then `rpm`, then `tpm`), so that
`--limit 3` or `--limit key:alpha:day` of `set` / `reset` is the row `show` listed, in
any process. Names are `SCOPE[:SUBJECT]:WINDOW` for budgets (`org:month`,
`tenant:day`, `key:alpha:day`, `model:gpt-4o:rolling-3600s`) and `rpm` / `tpm` for the
rate limits; config names cannot contain `:`, so a name is never ambiguous.

A change is all-or-nothing: every argument is checked against every selected limit
before anything is written, and the writes go to Redis in one MULTI/EXEC transaction
(a tenant's counters share one hash tag, so this holds on Redis Cluster too). USD
budgets take `--spent-usd`; `rpm` takes `--requests` and `tpm` takes `--tokens`.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from zoneinfo import ZoneInfo

from extproc.budgets.policy import BudgetRule, CounterGroup, Scope, Window, tenant_limits
from extproc.cli_errors import CliError
from extproc.config import GatewayConfig, Tenant, load_config
from extproc.money import MoneyError, format_usd, micro_from_usd

__all__ = ["add_budget_commands", "tenant_limit_rows"]


@dataclass(frozen=True, slots=True)
class Limit:
    """One row of `budget show`: its number, name, scope and counters."""

    number: int
    name: str
    scope: str
    window: str
    group: CounterGroup

    @property
    def flag(self) -> str:
        """The `set` flag that gives this limit's spent amount."""
        return {"usd": "--spent-usd", "requests": "--requests", "tokens": "--tokens"}[
            self.group.unit]


def _rule_name(rule: BudgetRule) -> tuple[str, str, str]:
    window = (f"rolling-{rule.period_s}s" if rule.window is Window.ROLLING
              else rule.window.value)
    parts = [rule.scope.value]
    if rule.scope in (Scope.KEY, Scope.MODEL, Scope.TEAM) and rule.subject:
        parts.append(rule.subject)
    return ":".join([*parts, window]), rule.scope.value, window


def tenant_limit_rows(config: GatewayConfig, tenant: Tenant,
                      now: datetime | None = None) -> list[Limit]:
    """The tenant's limits, numbered and named (empty when it has none)."""
    if tenant.budget is None:
        return []
    groups = tenant_limits(tenant.budget, now=now or datetime.now(UTC),
                           zone=ZoneInfo(config.budgets.timezone))
    names = [_rule_name(rule) for rule in tenant.budget.rules]
    for rate in ("rpm", "tpm"):
        if getattr(tenant.budget.rate_limits, rate) is not None:
            names.append((rate, rate, "minute"))
    return [Limit(number, name, scope, window, group)
            for number, ((name, scope, window), group) in enumerate(zip(names, groups,
                                                                        strict=True), 1)]


def _amount(unit: str, amount: int) -> str:
    return f"{format_usd(amount)} USD" if unit == "usd" else f"{amount} {unit}"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], right: set[int]) -> list[str]:
    """Columns as wide as their widest cell; numbers right-aligned."""
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    return ["  ".join(cell.rjust(widths[i]) if i in right else cell.ljust(widths[i])
                      for i, cell in enumerate(row)).rstrip() for row in [header, *rows]]


def _redis(config: GatewayConfig) -> Any:
    import redis

    if config.redis is None:
        raise CliError("the config has no redis section",
                             "budgets live in Redis: add redis.url to the config")
    if config.redis.cluster:
        return redis.RedisCluster.from_url(config.redis.url, decode_responses=True)
    if config.redis.sentinel is not None:
        from redis.sentinel import Sentinel

        options = redis.ConnectionPool.from_url(config.redis.url).connection_kwargs
        addresses = [(host, int(port)) for host, _, port in
                     (a.rpartition(":") for a in config.redis.sentinel.addresses)]
        sentinel = Sentinel(addresses)  # type: ignore[no-untyped-call]
        return sentinel.master_for(  # type: ignore[no-untyped-call]
            config.redis.sentinel.service, decode_responses=True,
            **{k: v for k, v in options.items() if k in ("db", "username", "password")})
    return redis.Redis.from_url(config.redis.url, decode_responses=True)


def _tenant(config: GatewayConfig, tenant_id: str) -> Tenant:
    tenant = config.tenants.get(tenant_id)
    if tenant is None:
        raise CliError(f"unknown tenant {tenant_id!r}",
                             f"tenants: {', '.join(sorted(config.tenants)) or '-'}")
    return tenant


def _show(config: GatewayConfig, args: argparse.Namespace, client: Any) -> int:
    if args.all == bool(args.tenant):
        raise CliError("give a tenant or --all, not both or neither",
                             "extproc budget show TENANT --config FILE, or --all")
    tenants = (sorted(config.tenants) if args.all else [args.tenant])
    rows: list[list[str]] = []
    for tenant_id in tenants:
        limits = tenant_limit_rows(config, _tenant(config, tenant_id))
        if not limits and not args.all:
            raise CliError(f"tenant {tenant_id!r} has no budgets or rate limits",
                                 f"add budgets: or rate_limits: under tenants.{tenant_id}")
        for limit in limits:
            group = limit.group
            values = [client.hmget(key, "spent", "held") for key in group.keys]
            spent = sum(int(v[0] or 0) for v in values)
            held = sum(int(v[1] or 0) for v in values)
            rows.append([tenant_id, str(limit.number), limit.name, limit.scope,
                         _amount(group.unit, group.limit), _amount(group.unit, spent),
                         _amount(group.unit, held),
                         _amount(group.unit, group.limit - spent - held)])
    print("# limits in config order: org budgets, the tenant's budgets as written, then "
          "rpm, tpm; `set` / `reset --limit` take the # or the name")
    header = ["tenant", "#", "name", "scope", "limit", "spent", "held", "remaining"]
    for line in _table(header, rows, right={1, 4, 5, 6, 7}):
        print(line)
    return 0


def _select(limits: list[Limit], wanted: str | None) -> list[Limit]:
    if wanted is None:
        return limits
    for limit in limits:
        if wanted in (str(limit.number), limit.name):
            return [limit]
    choices = ", ".join(f"{limit.number}={limit.name}" for limit in limits)
    raise CliError(f"--limit {wanted!r} is not a limit of this tenant",
                         f"use a # or name from `extproc budget show`: {choices}")


def _targets(limits: list[Limit], args: argparse.Namespace) -> list[tuple[Limit, int]]:
    """(limit, new spent) for every limit the command changes; raises before any write."""
    if args.budget_command == "reset":
        return [(limit, 0) for limit in limits]
    given: dict[str, int] = {}
    if args.spent_usd is not None:
        try:
            given["usd"] = micro_from_usd(args.spent_usd)
        except MoneyError as exc:
            raise CliError(f"--spent-usd {exc}", "a USD amount such as 12.5") from None
    for unit, value in (("requests", args.requests), ("tokens", args.tokens)):
        if value is not None:
            if value < 0:
                raise CliError(f"--{unit} must be >= 0", "a whole number")
            given[unit] = value
    if not given:
        raise CliError("nothing to set",
                             "give --spent-usd (budgets), --requests (rpm) or --tokens (tpm)")
    if args.limit is not None:
        [limit] = limits
        if limit.group.unit not in given or len(given) > 1:
            raise CliError(
                f"limit {limit.number} ({limit.name}) counts {limit.group.unit}",
                f"set it with {limit.flag} only")
        return [(limit, given[limit.group.unit])]
    targets = [(limit, given[limit.group.unit]) for limit in limits
               if limit.group.unit in given]
    unused = set(given) - {limit.group.unit for limit, _ in targets}
    if unused:
        raise CliError(f"this tenant has no limit counted in {', '.join(sorted(unused))}",
                             "see `extproc budget show`")
    return targets


def _change(config: GatewayConfig, args: argparse.Namespace, client: Any) -> int:
    tenant = _tenant(config, args.tenant)
    limits = tenant_limit_rows(config, tenant)
    if not limits:
        raise CliError(f"tenant {args.tenant!r} has no budgets or rate limits",
                             f"add budgets: or rate_limits: under tenants.{args.tenant}")
    targets = _targets(_select(limits, args.limit), args)
    if not args.yes:
        raise CliError("refusing to change live budgets without --yes",
                             "check the limits with `extproc budget show` first")
    with client.pipeline(transaction=True) as pipe:
        for limit, amount in targets:
            for index, key in enumerate(limit.group.keys):
                pipe.hset(key, "spent", amount if index == 0 else 0)
                # A counter this creates expires like one the gateway creates; one that
                # exists keeps its TTL.
                pipe.expire(key, limit.group.ttl_s, nx=True)
        pipe.execute()
    for limit, amount in targets:
        unit = limit.group.unit
        print(f"{args.budget_command}: {limit.number} {limit.name}: spent "
              f"{_amount(unit, amount)}")
        if amount > limit.group.limit:
            print(f"warning: {limit.name}: spent {_amount(unit, amount)} is above its limit "
                  f"{_amount(unit, limit.group.limit)}; requests it covers are refused "
                  "until the window resets", file=sys.stderr)
    return 0


def _cmd_budget(args: argparse.Namespace) -> int:
    """Refusals raise `CliError`; `extproc.cli.main` prints them as its one-line errors
    (exit 2), like an invalid config."""
    import redis

    config = load_config(args.config)
    client = _redis(config)
    try:
        if args.budget_command == "show":
            return _show(config, args, client)
        return _change(config, args, client)
    except redis.RedisError as exc:
        raise CliError(f"redis: {type(exc).__name__}",
                       "is Redis (redis.url) reachable? a set or reset is one transaction: "
                       "`extproc budget show` tells whether it was applied") from None
    finally:
        client.close()


def add_budget_commands(commands: Any) -> None:
    """`extproc budget ...` on the top-level subparsers."""
    budget = commands.add_parser("budget", help="live budget state in Redis")
    budget_commands = budget.add_subparsers(dest="budget_command", required=True)
    show = budget_commands.add_parser(
        "show", help="limit, spent, held and remaining for every limit of a tenant")
    show.add_argument("tenant", nargs="?", help="tenant id (or --all)")
    show.add_argument("--all", action="store_true", help="every tenant with limits")
    show.add_argument("--config", required=True)
    show.set_defaults(func=_cmd_budget)
    for name, text in (("reset", "set spent to 0 in the current windows (holds stay)"),
                       ("set", "set spent in the current window, e.g. after reconciling "
                               "against a provider invoice")):
        command = budget_commands.add_parser(name, help=text)
        command.add_argument("tenant")
        command.add_argument("--config", required=True)
        command.add_argument("--limit", metavar="N|NAME",
                             help="only this limit: its # or name in `budget show` "
                                  "(default: all)")
        command.add_argument("--yes", action="store_true", help="really change Redis")
        if name == "set":
            command.add_argument("--spent-usd", help="spent for USD budgets")
            command.add_argument("--requests", type=int, help="spent for the rpm limit")
            command.add_argument("--tokens", type=int, help="spent for the tpm limit")
        command.set_defaults(func=_cmd_budget)
