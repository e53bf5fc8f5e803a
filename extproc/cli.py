"""`extproc` command line: serve, check-config, config schema, keys hash, budget, audit,
envoy render."""

from __future__ import annotations

import argparse
import secrets
import shlex
import sys
from pathlib import Path
from typing import Final, NoReturn

from extproc.audit_cli import add_audit_commands
from extproc.auth import hash_key
from extproc.budget_cli import add_budget_commands
from extproc.cli_errors import CliError, describe, report
from extproc.config import ConfigError, GatewayConfig, load_config
from extproc.envoy_bootstrap import (
    SYSTEM_CA,
    EdgeLimits,
    EnvoyPorts,
    Shape,
    ShapeError,
    render_yaml,
)
from extproc.envoy_identity import IdentityOptionError, MeshListener, identity_options
from extproc.health_probe import add_health_command
from extproc.keys_cli import add_keys_commands
from extproc.logs import configure_logging
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
        fast_door=args.fast_door or None,
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


_SHAPE_DEFAULTS: dict[Shape, dict[str, object]] = {
    Shape.FRONT: {},
    # In a pod: the listener serves the pod port; service and admin on a shared volume.
    Shape.SIDECAR: {"listen_address": "0.0.0.0", "admin_socket": "/run/asc/envoy-admin.sock",
                    "extproc_socket": "/run/asc/extproc.sock"},
    Shape.EDGE: {"listen_address": "0.0.0.0"},
}
_PORTS_OPTIONS: Final = ("listen_address", "listen_port", "admin_socket", "extproc_address",
                         "extproc_port", "extproc_socket", "extproc_workers", "trusted_ca",
                         "extproc_streams_per_connection", "fast_door_port")
"""`envoy render` options that are `EnvoyPorts` fields."""
_RENDER_OPTIONS: Final = (*_PORTS_OPTIONS, "max_downstream_connections", "identity",
                           "mesh_address", "mesh_port", "mesh_cert", "mesh_key",
                           "mesh_client_ca")
"""`envoy render` options that shape the output, in the order the regenerate line names
them (options left unset are not named: their default is part of the shape)."""


def _render_command(args: argparse.Namespace) -> str:
    """The command line that renders this output again (for the file's header)."""
    words = ["extproc", "envoy", "render", "--shape", args.shape, "--config", args.config]
    for name in _RENDER_OPTIONS:
        value = getattr(args, name)
        if value is not None:
            words += ["--" + name.replace("_", "-"), str(value)]
    return shlex.join(words)


def _cmd_envoy_render(args: argparse.Namespace) -> int:
    config = _load_or_exit(args.config)
    shape = Shape(args.shape)
    chosen = {name: getattr(args, name) for name in _PORTS_OPTIONS
              if getattr(args, name) is not None}
    ports = EnvoyPorts(**{**_SHAPE_DEFAULTS[shape], **chosen})
    edge = (EdgeLimits() if args.max_downstream_connections is None
            else EdgeLimits(max_downstream_connections=args.max_downstream_connections))
    mesh = None
    if args.mesh_port is not None and args.mesh_cert and args.mesh_key and args.mesh_client_ca:
        mesh = MeshListener(port=args.mesh_port, address=args.mesh_address or "127.0.0.1",
                            cert_chain=args.mesh_cert, private_key=args.mesh_key,
                            client_ca=args.mesh_client_ca)
    sources = [name.strip() for name in (args.identity or "").split(",") if name.strip()]
    try:
        identity = identity_options(config, sources, mesh) if sources else None
        text = render_yaml(config, ports, shape=shape, edge=edge, command=_render_command(args),
                           identity=identity)
    except IdentityOptionError as exc:
        raise CliError(str(exc), "`extproc envoy render --help` lists the options") from None
    except ShapeError as exc:
        raise CliError(str(exc), "`extproc envoy render --help` lists the options") from None
    if args.output == "-":
        sys.stdout.write(text)
    else:
        Path(args.output).write_text(text, encoding="utf-8")
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
    serve.add_argument("--listen", default="127.0.0.1:50051",
                       help="gRPC address host:port, or unix:/path (a socket with mode 0660)")
    serve.add_argument("--metrics-listen", default="127.0.0.1:9464",
                       help="Prometheus /metrics address host:port ('' to disable)")
    serve.add_argument("--workers", type=int, default=1,
                       help="worker processes (SO_REUSEPORT on host:port; with unix:/path "
                            "one socket each, NAME-0.sock, NAME-1.sock, ...)")
    serve.add_argument("--fast-door", default=None,
                       help="the fast path's HTTP check address (config fast_path), host:port "
                            "or unix:/path; default: the --listen port + 1 on its host, or "
                            "<socket>.door beside a Unix --listen")
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

    add_budget_commands(commands)
    add_health_command(commands)
    add_audit_commands(commands)

    envoy = commands.add_parser("envoy", help="Envoy configuration")
    envoy_commands = envoy.add_subparsers(dest="envoy_command", required=True)
    render = envoy_commands.add_parser("render", help="render the Envoy bootstrap YAML")
    render.add_argument("--shape", choices=[s.value for s in Shape], default=Shape.FRONT.value,
                        help="front: local front proxy; sidecar: beside the service, "
                             "ext_proc and admin on Unix sockets; edge: TLS/HTTP2 to "
                             "providers, connection limits, timeouts")
    render.add_argument("--config", required=True)
    render.add_argument("--output", default="-")
    render.add_argument("--listen-address", default=None,
                        help="default 127.0.0.1; 0.0.0.0 for sidecar and edge")
    render.add_argument("--listen-port", type=int, default=None, help="default 10000")
    render.add_argument("--admin-socket", default=None,
                        help="Unix socket for Envoy admin (mode 0600); default: no admin "
                             "(sidecar: /run/asc/envoy-admin.sock)")
    render.add_argument("--extproc-address", default=None, help="default 127.0.0.1")
    render.add_argument("--extproc-port", type=int, default=None, help="default 50051")
    render.add_argument("--extproc-socket", default=None,
                        help="the service's Unix socket (extproc serve --listen unix:PATH); "
                             "default: TCP (sidecar: /run/asc/extproc.sock)")
    render.add_argument("--fast-door-port", type=int, default=None,
                        help="the service's fast door on --extproc-address (extproc serve "
                             "--fast-door); default --extproc-port + 1; on a Unix socket "
                             "<socket>.door")
    render.add_argument("--extproc-workers", type=int, default=None,
                        help="the service's --workers on that socket (one socket each); "
                             "default 1")
    render.add_argument("--trusted-ca", default=None,
                        help=f"CA bundle for provider TLS; default {SYSTEM_CA}")
    render.add_argument("--max-downstream-connections", type=int, default=None,
                        help="edge: overload manager connection limit; default "
                             f"{EdgeLimits().max_downstream_connections}")
    render.add_argument("--identity", default=None,
                        help="identity sources to enable in Envoy: jwt, mesh (comma-separated)")
    render.add_argument("--mesh-address", default=None,
                        help="address of the mTLS listener (--identity mesh); default 127.0.0.1")
    render.add_argument("--mesh-port", type=int, default=None,
                        help="port of the mTLS listener (--identity mesh)")
    render.add_argument("--mesh-cert", default=None, help="server certificate chain (PEM)")
    render.add_argument("--mesh-key", default=None, help="server private key (PEM)")
    render.add_argument("--mesh-client-ca", default=None,
                        help="CA (PEM) that signs the workloads' client certificates")
    render.add_argument("--extproc-streams-per-connection", type=int, default=None,
                        help="HTTP/2 streams per connection to extproc: a small number makes "
                        "each Envoy worker open several connections, which the kernel "
                        "spreads over `serve --workers` processes (default: no limit)")
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
