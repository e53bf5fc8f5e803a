"""`extproc` command line: serve, check-config, config schema, keys hash, budget, envoy
render."""

from __future__ import annotations

import argparse
import secrets
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NoReturn
from zoneinfo import ZoneInfo

from extproc.auth import hash_key
from extproc.budgets.policy import CounterGroup, tenant_limits
from extproc.cli_errors import CliError, describe, report
from extproc.config import ConfigError, GatewayConfig, load_config
from extproc.envoy_bootstrap import EnvoyPorts, render_yaml
from extproc.keys_cli import add_keys_commands
from extproc.logs import configure_logging
from extproc.money import format_usd, micro_from_usd
from extproc.secrets import Secret, resolve_secret

__all__ = ["main"]


def _cmd_serve(args: argparse.Namespace) -> int:
    from extproc.server import ServeOptions, serve, serve_as_worker

    configure_logging(args.log_level)
    options = ServeOptions(
        config_path=Path(args.config),
        listen=args.listen,
        metrics_listen=args.metrics_listen or None,
        workers=args.workers,
        drain_seconds=args.drain_seconds,
        log_level=args.log_level,
    )
    return serve_as_worker(options) if args.worker else serve(options)


def _load_or_exit(path: str) -> GatewayConfig:
    """The config; an invalid one becomes one `error:` line naming its first problem
    (`check-config` is the command that lists them all)."""
    return load_config(path)


def _cmd_check_config(args: argparse.Namespace) -> int:
    try:
        config = load_config(args.file)
    except ConfigError as exc:  # the full list is this command's answer, not an error
        print(exc, file=sys.stderr)
        return 1
    print(
        f"{args.file}: ok ({len(config.tenants)} tenants, {len(config.providers)} providers, "
        f"{len(config.models)} models)"
    )
    return 0


def _cmd_config_schema(args: argparse.Namespace) -> int:
    from extproc.config_schema import json_schema_text

    sys.stdout.write(json_schema_text())
    return 0


def _cmd_keys_hash(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    pepper = resolve_secret(config.pepper)
    if args.generate:
        key = Secret("sk-asc-" + secrets.token_urlsafe(32))
        print(f"key:  {key.reveal()}")
        print(f"hash: {hash_key(pepper, key.reveal())}")
        return 0
    if sys.stdin.isatty():
        print("paste the virtual key, then press Enter:", file=sys.stderr)
    line = sys.stdin.readline().strip()
    if not line:
        raise CliError("no key on standard input",
                       "pipe the virtual key in, or use --generate for a new one")
    print(hash_key(pepper, line))
    return 0


def _cmd_envoy_render(args: argparse.Namespace) -> int:
    config = _load_or_exit(args.config)
    ports = EnvoyPorts(
        listen_address=args.listen_address,
        listen_port=args.listen_port,
        admin_socket=args.admin_socket,
        extproc_address=args.extproc_address,
        extproc_port=args.extproc_port,
    )
    text = render_yaml(config, ports)
    if args.output == "-":
        sys.stdout.write(text)
    else:
        Path(args.output).write_text(text, encoding="utf-8")
    return 0


def _budget_groups(config: GatewayConfig, tenant_id: str) -> tuple[CounterGroup, ...]:
    """The tenant's limits in one stable order (config order), so that `--limit N` of
    `set` / `reset` is the limit `show` listed as N, in any process."""
    tenant = config.tenants.get(tenant_id)
    if tenant is None:
        raise SystemExit(f"unknown tenant {tenant_id!r}")
    if tenant.budget is None:
        raise SystemExit(f"tenant {tenant_id!r} has no budgets or rate limits")
    return tenant_limits(tenant.budget, now=datetime.now(UTC),
                         zone=ZoneInfo(config.budgets.timezone))


def _sync_redis(config: GatewayConfig) -> Any:
    import redis

    if config.redis is None:
        raise SystemExit("the config has no redis section")
    if config.redis.cluster:
        return redis.RedisCluster.from_url(config.redis.url, decode_responses=True)
    return redis.Redis.from_url(config.redis.url, decode_responses=True)


def _format_amount(unit: str, amount: int) -> str:
    return f"{format_usd(amount)} USD" if unit == "usd" else f"{amount} {unit}"


def _cmd_budget(args: argparse.Namespace) -> int:
    config = _load_or_exit(args.config)
    groups = _budget_groups(config, args.tenant)
    client = _sync_redis(config)
    if args.budget_command == "show":
        print(f"{'#':>2}  {'limit':<34} {'spent':>18} {'held':>18} {'remaining':>18}")
        for index, group in enumerate(groups, 1):
            values = [client.hmget(key, "spent", "held") for key in group.keys]
            spent = sum(int(v[0] or 0) for v in values)
            held = sum(int(v[1] or 0) for v in values)
            print(f"{index:>2}  {group.name:<34} {_format_amount(group.unit, spent):>18} "
                  f"{_format_amount(group.unit, held):>18} "
                  f"{_format_amount(group.unit, group.limit - spent - held):>18}")
        return 0
    if not args.yes:
        print("refusing to change live budgets without --yes", file=sys.stderr)
        return 1
    if args.limit is not None and not 1 <= args.limit <= len(groups):
        print(f"--limit must be from 1 to {len(groups)} (see `budget show`)", file=sys.stderr)
        return 1
    selected = groups if args.limit is None else (groups[args.limit - 1],)
    for group in selected:
        amounts = [0] * len(group.keys)
        if args.budget_command == "set":
            amounts[0] = micro_from_usd(args.spent_usd) if group.unit == "usd" else int(
                args.spent_usd)
        for key, amount in zip(group.keys, amounts, strict=True):
            client.hset(key, "spent", amount)
            # A counter this creates expires like one the gateway creates; one that
            # exists keeps its TTL.
            client.expire(key, group.ttl_s, nx=True)
        print(f"{args.budget_command}: {group.name}")
    return 0


class _Parser(argparse.ArgumentParser):
    """Usage errors in the same one-line shape as every other error (exit 2, as
    argparse's own)."""

    def error(self, message: str) -> NoReturn:
        raise CliError(f"{self.prog}: {message}", f"`{self.prog} --help` shows the usage")


def build_parser() -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = _Parser(prog="extproc", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run the ext_proc gRPC service")
    serve.add_argument("--config", required=True, help="gateway config (asc.yaml)")
    serve.add_argument("--listen", default="127.0.0.1:50051", help="gRPC address host:port")
    serve.add_argument("--metrics-listen", default="127.0.0.1:9464",
                       help="Prometheus /metrics address host:port ('' to disable)")
    serve.add_argument("--workers", type=int, default=1, help="worker processes (SO_REUSEPORT)")
    serve.add_argument("--drain-seconds", type=float, default=10.0,
                       help="grace period for in-flight streams on SIGTERM")
    serve.add_argument("--log-level", default="info")
    serve.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    serve.set_defaults(func=_cmd_serve)

    check = commands.add_parser("check-config", help="validate a gateway config file")
    check.add_argument("file")
    check.set_defaults(func=_cmd_check_config)

    config = commands.add_parser("config", help="the gateway config format")
    config_commands = config.add_subparsers(dest="config_command", required=True)
    config_commands.add_parser(
        "schema", help="print the JSON Schema of asc.yaml (deploy/schema/asc.schema.json)"
    ).set_defaults(func=_cmd_config_schema)

    keys = commands.add_parser("keys", help="virtual and provider keys")
    key_commands = keys.add_subparsers(dest="keys_command", required=True)
    hash_cmd = key_commands.add_parser(
        "hash", help="print the stored form of a virtual key read from standard input")
    hash_cmd.add_argument("--config", required=True, help="config whose auth.pepper to use")
    hash_cmd.add_argument("--generate", action="store_true",
                          help="create a new random key and print it with its hash")
    hash_cmd.set_defaults(func=_cmd_keys_hash)
    add_keys_commands(key_commands)

    budget = commands.add_parser("budget", help="live budget state in Redis")
    budget_commands = budget.add_subparsers(dest="budget_command", required=True)
    for name, text in (("show", "spent, held and remaining for every limit of a tenant"),
                       ("reset", "set spent to 0 in the current windows (holds stay)"),
                       ("set", "set spent in the current window, e.g. after reconciling "
                               "against a provider invoice")):
        command = budget_commands.add_parser(name, help=text)
        command.add_argument("tenant")
        command.add_argument("--config", required=True)
        if name != "show":
            command.add_argument("--limit", type=int,
                                 help="only limit number N of `budget show` (default: all)")
            command.add_argument("--yes", action="store_true", help="really change Redis")
        if name == "set":
            command.add_argument("--spent-usd", required=True,
                                 help="USD for budgets; a count for rate limits")
        command.set_defaults(func=_cmd_budget)

    envoy = commands.add_parser("envoy", help="Envoy configuration")
    envoy_commands = envoy.add_subparsers(dest="envoy_command", required=True)
    render = envoy_commands.add_parser("render", help="render the Envoy bootstrap YAML")
    render.add_argument("--config", required=True)
    render.add_argument("--output", default="-")
    render.add_argument("--listen-address", default="127.0.0.1")
    render.add_argument("--listen-port", type=int, default=10000)
    render.add_argument("--admin-socket", default=None,
                        help="Unix socket for Envoy admin (mode 0600); default: no admin")
    render.add_argument("--extproc-address", default="127.0.0.1")
    render.add_argument("--extproc-port", type=int, default=50051)
    render.set_defaults(func=_cmd_envoy_render)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command; every failure is one `error: ... (hint: ...)` line, exit 2."""
    try:
        args = build_parser().parse_args(argv)
    except CliError as exc:
        return report(exc)
    command = getattr(args, "keys_command", None) or args.command
    try:
        code: int = args.func(args)
    except SystemExit as exit_:  # commands exit early with a code or a message
        if isinstance(exit_.code, int):
            return exit_.code
        return report(CliError(str(exit_.code), f"`extproc {args.command} --help`"))
    except Exception as exc:
        error = describe(exc, command)
        if error is None:
            raise  # not an operator error but a bug: keep its traceback
        return report(error)
    return code
