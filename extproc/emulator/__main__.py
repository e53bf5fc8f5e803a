"""Command line entry point: ``python -m extproc.emulator``.

Why a hand-rolled runner instead of ``aiohttp.web.run_app``: callers (tests, bench
scripts, demo launchers) wait for exactly one machine-readable stdout line,
``emulator listening on http://HOST:PORT``, printed only after the socket is bound
(``--port 0`` prints the port actually chosen).  SIGTERM/SIGINT shut down cleanly
with exit code 0.

Keys: prefer ``EMULATOR_KEYS=key1,key2`` or ``--keys-file PATH`` (one key per line,
``#`` comments allowed) over ``--key``, because argv is visible to every local user
in ``ps``.  All three sources are merged.  No access log is written, so neither
keys nor query strings end up in logs.

Shapes: ``--shape openai,anthropic,azure`` is the default set; ``--shape mistral`` (alone
or with ``anthropic`` / ``azure``) serves Mistral on ``/v1/chat/completions`` instead of
OpenAI; ``gemini`` (Google's ``/v1beta/models/...`` paths) combines with any set.  The
first shape answers unknown paths.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

from aiohttp import web

from extproc.emulator.app import (
    DEFAULT_REPLY,
    DEFAULT_SHAPE_NAMES,
    SHAPE_REGISTRY,
    SHAPES,
    EmulatorConfig,
    ProviderShape,
    make_app,
    shapes_named,
)

__all__ = ["build_parser", "load_keys", "main", "serve"]

KEYS_ENV = "EMULATOR_KEYS"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m extproc.emulator",
        description=(
            "Deterministic LLM provider emulator (OpenAI, Anthropic, Azure OpenAI, "
            "Mistral and Gemini shapes)."
        ),
        epilog=f"Prefer {KEYS_ENV}=k1,k2 or --keys-file over --key: argv is visible in ps.",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default %(default)s)")
    parser.add_argument("--port", type=int, default=8080, help="port to bind; 0 picks a free one")
    parser.add_argument(
        "--key", action="append", default=[], metavar="KEY", help="accepted API key (repeatable)"
    )
    parser.add_argument("--keys-file", type=Path, help="file with one accepted key per line")
    parser.add_argument("--latency-ms", type=int, default=0, help="delay before every reply")
    parser.add_argument(
        "--chunk-delay-ms", type=int, default=0, help="delay between streamed chunks"
    )
    parser.add_argument(
        "--record-limit", type=int, default=10000, help="max recorded requests kept"
    )
    parser.add_argument("--reply", default=DEFAULT_REPLY, help="reply text (split into words)")
    parser.add_argument(
        "--shape",
        default=",".join(DEFAULT_SHAPE_NAMES),
        help=(
            "comma-separated provider shapes to serve, first answers unknown paths "
            f"(default %(default)s; known: {', '.join(sorted(SHAPE_REGISTRY))}; "
            "openai and mistral share a path, so pick one)"
        ),
    )
    return parser


def load_keys(
    cli_keys: Sequence[str], keys_file: Path | None, env_value: str | None
) -> frozenset[str]:
    """Merge keys from ``--key``, ``--keys-file`` and ``EMULATOR_KEYS``."""
    keys = {k.strip() for k in cli_keys}
    if env_value:
        keys.update(k.strip() for k in env_value.split(","))
    if keys_file is not None:
        for line in keys_file.read_text(encoding="utf-8").splitlines():
            stripped = line.strip()
            if stripped and not stripped.startswith("#"):
                keys.add(stripped)
    keys.discard("")
    return frozenset(keys)


def _url(host: str, port: int) -> str:
    shown = f"[{host}]" if ":" in host else host
    return f"http://{shown}:{port}"


async def serve(
    config: EmulatorConfig, host: str, port: int, shapes: tuple[ProviderShape, ...] = SHAPES
) -> None:
    """Serve until SIGTERM/SIGINT."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    # access_log=None: no per-request log lines (speed, and nothing secret can leak).
    runner = web.AppRunner(make_app(config, shapes), access_log=None, handle_signals=False)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host=host, port=port)
        await site.start()
        bound_port = port
        for address in runner.addresses:
            if isinstance(address, tuple) and len(address) >= 2:
                bound_port = int(address[1])
                break
        print(f"emulator listening on {_url(host, bound_port)}", flush=True)
        await stop.wait()
    finally:
        await runner.cleanup()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        keys = load_keys(args.key, args.keys_file, os.environ.get(KEYS_ENV))
        config = EmulatorConfig(
            keys=keys,
            latency_ms=args.latency_ms,
            chunk_delay_ms=args.chunk_delay_ms,
            record_limit=args.record_limit,
            reply=args.reply,
        )
        shapes = shapes_named(name.strip() for name in args.shape.split(",") if name.strip())
    except (OSError, ValueError) as exc:
        print(f"emulator: {exc}", file=sys.stderr)
        return 2
    if not keys:
        print(
            "emulator: warning: no keys configured; every call gets 401 until PUT /_emulator/keys",
            file=sys.stderr,
        )
    try:
        asyncio.run(serve(config, args.host, args.port, shapes))
    except OSError as exc:  # e.g. address already in use
        print(f"emulator: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
