"""`extproc health`: ask a running service for its gRPC health status.

Kubernetes' built-in `grpc` probe dials TCP only, and the service in a pod listens on a
Unix socket shared with Envoy (deploy/k8s). The probe is therefore this command, run as
an exec probe and as the container image's HEALTHCHECK: one gRPC `Health.Check` over the
same socket Envoy uses, so "healthy" means "Envoy can reach a serving ext_proc"
(docs/decisions/0096-health-probe-over-the-unix-socket.md).

Probes run it as `python -m extproc.health_probe`: the same command without importing
the whole CLI (config, Envoy protos), about a tenth of the CPU of `extproc health`,
which matters for a probe every few seconds in every pod.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from typing import Final

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

__all__ = ["DEFAULT_SOCKET", "HealthVerdict", "add_health_command", "check_health", "main"]

DEFAULT_SOCKET: Final = "/run/asc/extproc.sock"
_EXT_PROC_SERVICE: Final = "envoy.service.ext_proc.v3.ExternalProcessor"


@dataclass(frozen=True, slots=True)
class HealthVerdict:
    serving: bool
    detail: str
    """SERVING, NOT_SERVING, ... or why no answer came (for the probe's output)."""


def check_health(target: str, *, service: str = _EXT_PROC_SERVICE,
                 timeout_s: float = 2.0) -> HealthVerdict:
    """One `Health.Check` on `target` (a gRPC target: `unix:/path` or `host:port`)."""
    with grpc.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            reply = stub.Check(health_pb2.HealthCheckRequest(service=service),
                               timeout=timeout_s)
        except grpc.RpcError as exc:
            code = exc.code() if isinstance(exc, grpc.Call) else None
            return HealthVerdict(False, f"no answer ({code.name if code else 'error'})")
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    return HealthVerdict(reply.status == health_pb2.HealthCheckResponse.SERVING, status)


def _cmd_health(args: argparse.Namespace) -> int:
    target = args.target or f"unix:{args.socket}"
    verdict = check_health(target, timeout_s=args.timeout)
    print(f"{target}: {verdict.detail}", file=sys.stdout if verdict.serving else sys.stderr)
    return 0 if verdict.serving else 1


def add_health_command(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    health = commands.add_parser(
        "health", help="check a running service's gRPC health (exit 0 when SERVING)")
    where = health.add_mutually_exclusive_group()
    where.add_argument("--socket", default=DEFAULT_SOCKET,
                       help=f"the service's Unix socket (default {DEFAULT_SOCKET})")
    where.add_argument("--target", default=None,
                       help="a gRPC target instead, e.g. 127.0.0.1:50051")
    health.add_argument("--timeout", type=float, default=2.0, help="seconds to wait")
    health.set_defaults(func=_cmd_health)


def main(argv: list[str] | None = None) -> int:
    """`python -m extproc.health_probe [--socket PATH | --target T]`: exit 0 when SERVING."""
    parser = argparse.ArgumentParser(prog="python -m extproc.health_probe")
    add_health_command(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["health", *(sys.argv[1:] if argv is None else argv)])
    code: int = args.func(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
