"""`extproc audit ...`: verify, query, index, unseal, pubkey, rotate-key (docs/audit.md)."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from extproc.cli_errors import CliError
from extproc.config import GatewayConfig, load_config

if TYPE_CHECKING:
    from extproc.credentials.kek import KekBackend

# The commands import what they use when they run: `extproc audit query` starts fast
# (no KMS client, no server modules).

__all__ = ["add_audit_commands"]

_TABLE_COLUMNS = (("time", 24), ("request_id", 32), ("tenant", 12), ("model_asked", 16),
                  ("provider", 12), ("region", 12), ("credential", 18), ("status", 6))


def _kek(config: GatewayConfig) -> KekBackend | None:
    from extproc.runtime import kek_from_settings

    if config.secrets.kek is None or config.audit.hmac_key == "local":
        return None
    return kek_from_settings(config.secrets.kek)


def _cmd_verify(args: argparse.Namespace) -> int:
    from extproc.audit.chain import load_public_keys
    from extproc.audit.keys import load_keys
    from extproc.audit.verify import log_files, verify_paths

    paths = [Path(p) for p in args.paths]
    if not log_files(paths):
        raise CliError(f"no audit files in {' '.join(args.paths)}",
                       "give the audit directory or audit-*.jsonl files")
    pubkeys = [Path(p) for p in args.pubkey] or [
        p / "audit.pub" for p in paths if p.is_dir() and (p / "audit.pub").exists()]
    if not pubkeys:
        raise CliError("no public key", "pass --pubkey FILE (`extproc audit pubkey` prints it)")
    public = load_public_keys(*pubkeys)
    hmac_keys: dict[str, bytes] | None = None
    if args.config:  # the KEK that opens the keys in <audit dir>/keys
        kek = _kek(load_config(args.config))
        hmac_keys = {}
        for directory in {p if p.is_dir() else p.parent for p in paths}:
            hmac_keys.update(asyncio.run(load_keys(directory, kek)))
        if not hmac_keys:
            raise CliError("no HMAC key could be opened",
                           "the keys are in <audit dir>/keys; --config names the KEK")
    report = verify_paths(paths, public, hmac_keys, allow_open=args.allow_open)
    for problem in report.problems:
        print(f"FAIL {problem}")
    mode = "checkpoint signatures, linkage and MACs" if report.macs_checked else \
        "checkpoint signatures and linkage (no HMAC key: --config)"
    verdict = "ok" if report.ok else f"{len(report.problems)} problem(s)"
    print(f"{verdict}: {report.records} records, {report.checkpoints} checkpoints, "
          f"{report.writers} writers; checked {mode}"
          + (f"; still open: {', '.join(report.open_writers)}" if report.open_writers else ""))
    return 0 if report.ok else 1


def _paths_or_config(args: argparse.Namespace) -> list[Path]:
    if args.paths:
        return [Path(p) for p in args.paths]
    if args.config:
        return [load_config(args.config).audit.directory]
    raise CliError("no audit files given", "pass the audit directory, or --config asc.yaml")


def _cmd_query(args: argparse.Namespace) -> int:
    from extproc.audit.query import Query, parse_time, query

    try:
        question = Query(
            tenant=args.tenant, request_id=args.request_id, credential=args.credential,
            model=args.model, provider=args.provider, region=args.region,
            at=parse_time(args.at) if args.at else None,
            since=parse_time(args.since) if args.since else None,
            until=parse_time(args.until) if args.until else None, limit=args.limit)
    except ValueError as exc:
        raise CliError(str(exc), "times are ISO 8601 in UTC, e.g. 2026-11-25T10:00Z") from None
    found = query(_paths_or_config(args), question)
    if args.table:
        print("  ".join(name.ljust(width) for name, width in _TABLE_COLUMNS))
        for record in found:
            print("  ".join(_cell(record, name).ljust(width)
                            for name, width in _TABLE_COLUMNS))
    else:
        for record in found:
            print(json.dumps(record, separators=(",", ":"), ensure_ascii=False))
    return 0


def _cell(record: dict[str, Any], name: str) -> str:
    if name == "time":
        ns = int(record.get("time_ns") or 0)
        return datetime.fromtimestamp(ns / 1e9, UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"
    if name in ("provider", "region"):
        return str((record.get("route") or {}).get(name) or "-")
    value = record.get(name)
    return "-" if value is None else str(value)


def _cmd_unseal(args: argparse.Namespace) -> int:
    from extproc.audit.capture import CaptureError, open_capture
    from extproc.audit.query import Query, query

    config = load_config(args.config)
    if config.secrets.kek is None:
        raise CliError("no KEK in the config", "captured text is sealed with secrets.kek")
    from extproc.runtime import kek_from_settings

    kek = kek_from_settings(config.secrets.kek)
    paths = [Path(p) for p in args.paths] or [config.audit.directory]
    found = list(query(paths, Query(request_id=args.request_id)))
    if not found:
        raise CliError(f"no record for request {args.request_id}",
                       "give the audit directory that holds it")
    try:
        opened = asyncio.run(open_capture(kek, found[0]))
    except CaptureError as exc:
        raise CliError(str(exc), "the record's capture opens only with the KEK it was "
                       "sealed under") from None
    print(json.dumps({"request_id": args.request_id, "tenant": found[0].get("tenant"),
                      **opened}, ensure_ascii=False))
    return 0


def _cmd_index(args: argparse.Namespace) -> int:
    from extproc.audit.query import index_file
    from extproc.audit.verify import log_files

    files = log_files(_paths_or_config(args))
    for path in files:
        index_file(path).close()
    print(f"indexed {len(files)} file(s)")
    return 0


def _cmd_pubkey(args: argparse.Namespace) -> int:
    from extproc.audit.chain import SigningKey

    config = load_config(args.config)
    settings = config.audit
    path = settings.directory / "audit.pub"
    if path.exists():
        sys.stdout.write(path.read_text(encoding="ascii"))
        return 0
    signer = SigningKey.load_or_create(settings.signing_key
                                       or settings.directory / "signing.key")
    sys.stdout.write(signer.public_pem().decode("ascii"))
    return 0


def _cmd_rotate_key(args: argparse.Namespace) -> int:
    from extproc.audit.keys import create_key

    config = load_config(args.config)
    directory = Path(args.dir) if args.dir else config.audit.directory
    key = asyncio.run(create_key(directory, _kek(config)))
    print(f"new audit HMAC key {key.kid}: writers use it from their next checkpoint")
    return 0


def add_audit_commands(commands: Any) -> None:
    """`extproc audit ...` on the top-level subparsers."""
    audit = commands.add_parser("audit", help="audit records: verify, query, keys")
    sub = audit.add_subparsers(dest="audit_command", required=True)

    verify = sub.add_parser("verify", help="check the chain and checkpoints; exit 1 naming "
                            "each problem (file:line, writer, seq)")
    verify.add_argument("paths", nargs="+", help="audit directory or audit-*.jsonl files")
    verify.add_argument("--pubkey", action="append", default=[],
                        help="public key PEM bundle (default: audit.pub in the directory)")
    verify.add_argument("--config", help="asc.yaml whose secrets.kek opens the HMAC keys "
                        "in <audit dir>/keys: also check every MAC")
    verify.add_argument("--allow-open", action="store_true",
                        help="accept writers still running (no final checkpoint yet)")
    verify.set_defaults(func=_cmd_verify)

    ask = sub.add_parser("query", help="records by tenant and time, request id, ...")
    ask.add_argument("paths", nargs="*", help="audit directory or files (or --config)")
    ask.add_argument("--config", help="asc.yaml whose audit.dir to read")
    ask.add_argument("--tenant")
    ask.add_argument("--at", help="requests running at this time, e.g. 2026-11-25T10:00Z "
                                  "(the whole minute)")
    ask.add_argument("--from", dest="since", help="started at or after")
    ask.add_argument("--to", dest="until", help="started before the end of")
    ask.add_argument("--request-id")
    ask.add_argument("--credential", help="id@version")
    ask.add_argument("--model", help="asked or served")
    ask.add_argument("--provider")
    ask.add_argument("--region")
    ask.add_argument("--limit", type=int, default=1000)
    ask.add_argument("--table", action="store_true", help="a table instead of JSON lines")
    ask.set_defaults(func=_cmd_query)

    index = sub.add_parser("index", help="build or extend the query index of each file")
    index.add_argument("paths", nargs="*")
    index.add_argument("--config")
    index.set_defaults(func=_cmd_index)

    unseal = sub.add_parser("unseal", help="print a record's captured text (needs the KEK; "
                            "tenants with audit.capture only)")
    unseal.add_argument("paths", nargs="*")
    unseal.add_argument("--config", required=True, help="asc.yaml whose secrets.kek opens it")
    unseal.add_argument("--request-id", required=True)
    unseal.set_defaults(func=_cmd_unseal)

    pubkey = sub.add_parser("pubkey", help="print the checkpoint public key(s) (PEM)")
    pubkey.add_argument("--config", required=True)
    pubkey.set_defaults(func=_cmd_pubkey)

    rotate = sub.add_parser("rotate-key", help="make a new chain HMAC key")
    rotate.add_argument("--config", required=True, help="asc.yaml whose secrets.kek wraps it")
    rotate.add_argument("--dir", help="the audit directory (default: audit.dir; with no "
                        "audit.dir, `audit/` under the current directory)")
    rotate.set_defaults(func=_cmd_rotate_key)
