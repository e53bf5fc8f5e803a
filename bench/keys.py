"""Key resolution cost: `Keyring.credential()` on cache hit and miss, FileKek and TransitKek.

In-process (no gateway): starts via `extproc.devstack.Stack` a bench redis-server (a free
loopback port, never the system 6379) and, for Transit, a real OpenBao dev server
(`tests/openbao.py`: transit mounted, a derived `asc-kek` key, root token). One provider
key per backend is sealed with `Keyring.add()` (version 1, active) into that Redis, then
`await keyring.credential(...)` is timed per call with `time.perf_counter_ns`:

* hit                 the gateway's steady state: state and key cached (production
                      defaults: key TTL 300 s, state TTL 1 s);
* hit + state refresh state TTL 0: the key is cached, the state is read again (one Redis
                      HGET): what the first request after every state TTL / published
                      change pays;
* miss, key TTL over  key TTL 0, state cached: Redis HGET of the sealed record + KEK
                      unwrap of the DEK + AES-GCM decrypt;
* miss, cold          a fresh `Keyring` per call (new replica, or right after a change):
                      state HGET + record HGET + unwrap + decrypt;
* open_sealed only    `open_sealed(kek, record)` on a record already read: KEK unwrap +
                      decrypt, no Redis.

A no-op `await` row gives the timing floor. Target (issue 4): a cache hit adds < 20 µs.

    .venv/bin/python bench/keys.py              # 50,000 hits, 2,000 / 1,000 misses
    .venv/bin/python bench/keys.py --quick      # 10,000 hits, 300 / 200 misses
    .venv/bin/python bench/keys.py --no-transit # FileKek only (no OpenBao)

Results: a table on stdout and a dated `## Key resolution ...` section at the end of
bench/RESULTS.md (see bench/common.py). Only 127.0.0.1 is contacted; every loop is bounded.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

REPO_ROOT: Final = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:  # `python bench/keys.py` puts bench/ first
    sys.path.insert(0, str(REPO_ROOT))

import common  # noqa: E402

from extproc.budgets.ledger import redis_client  # noqa: E402
from extproc.config import RedisSettings, SecretsSettings  # noqa: E402
from extproc.credentials.envelope import open_sealed  # noqa: E402
from extproc.credentials.kek import FileKek, KekBackend, init_kek_file  # noqa: E402
from extproc.credentials.keyring import Keyring, KeyStore  # noqa: E402
from extproc.devstack import LOOPBACK, Stack, redis_server_binary  # noqa: E402
from extproc.secrets import Secret  # noqa: E402

SCOPE: Final = "global"
TARGET_HIT_US: Final = 20.0
DEFAULTS: Final = SecretsSettings()


@dataclass(frozen=True, slots=True)
class Row:
    backend: str
    case: str
    iterations: int
    p50_us: float
    p99_us: float
    mean_us: float
    max_us: float


async def time_calls(make: Callable[[], Awaitable[object]], iterations: int, *,
                     backend: str, case: str,
                     before_each: Callable[[], Awaitable[object] | None] | None = None,
                     warmup: int = 20) -> Row:
    """Time `await make()` `iterations` times; `before_each` runs untimed before each call."""
    for _ in range(warmup):
        if before_each is not None:
            prepared = before_each()
            if prepared is not None:
                await prepared
        await make()
    gc.collect()
    samples = [0] * iterations
    clock = time.perf_counter_ns
    for index in range(iterations):
        if before_each is not None:
            prepared = before_each()
            if prepared is not None:
                await prepared
        started = clock()
        await make()
        samples[index] = clock() - started
    us = [s / 1000 for s in samples]
    return Row(backend, case, iterations, common.percentile(us, 50), common.percentile(us, 99),
               statistics.fmean(us), max(us))


async def _noop() -> None:
    return None


def keyring(store: KeyStore, kek: KekBackend, **overrides: float) -> Keyring:
    """A Keyring with the production defaults (`SecretsSettings()`), some overridden."""
    settings: dict[str, Any] = {"cache_ttl_s": DEFAULTS.cache_ttl_s,
                                "max_age_s": DEFAULTS.max_age_s,
                                "state_ttl_s": DEFAULTS.state_ttl_s,
                                "rollback_after": DEFAULTS.rollback_after, **overrides}
    return Keyring(store, kek, **settings)


async def bench_backend(name: str, store: KeyStore, kek: KekBackend, *, credential: str,
                        provider_key: str, hits: int, misses: int) -> list[Row]:
    setup = keyring(store, kek)
    version = await setup.add(SCOPE, credential, "openai", Secret(provider_key))
    resolved = await setup.credential(credential, scope=SCOPE)
    if resolved.secret.reveal() != provider_key or resolved.version != version:
        raise RuntimeError(f"{name}: the keyring returned the wrong key or version")
    rows: list[Row] = []

    warm = keyring(store, kek)
    await warm.credential(credential, scope=SCOPE)
    rows.append(await time_calls(lambda: warm.credential(credential, scope=SCOPE), hits,
                                 backend=name, case="hit (key + state cached)"))

    refresh = keyring(store, kek, state_ttl_s=0.0)
    rows.append(await time_calls(lambda: refresh.credential(credential, scope=SCOPE), misses,
                                 backend=name, case="hit + state refresh (1 Redis HGET)"))

    expired = keyring(store, kek, cache_ttl_s=0.0)
    rows.append(await time_calls(
        lambda: expired.credential(credential, scope=SCOPE), misses, backend=name,
        case="miss, key TTL over (record HGET + unwrap + decrypt)"))

    fresh: list[Keyring] = []

    def new_keyring() -> None:
        fresh[:] = [keyring(store, kek)]

    rows.append(await time_calls(
        lambda: fresh[0].credential(credential, scope=SCOPE), misses, backend=name,
        case="miss, cold keyring (state + record HGET + unwrap + decrypt)",
        before_each=new_keyring))

    record = await store.record(SCOPE, credential, version)
    if record is None:
        raise RuntimeError(f"{name}: sealed record not found")
    rows.append(await time_calls(lambda: open_sealed(kek, record), misses, backend=name,
                                 case="open_sealed only (unwrap + decrypt, no Redis)"))
    return rows


def _version(command: Sequence[str]) -> str:
    try:
        out = subprocess.run(list(command), capture_output=True, text=True, timeout=30,
                             check=False).stdout
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.split("(")[0].strip() if out else "unknown"


async def run(args: argparse.Namespace, stack: Stack) -> list[Row]:
    _, redis_port = stack.start_redis()
    client = redis_client(RedisSettings(url=f"redis://{LOOPBACK}:{redis_port}/0"))
    store = KeyStore(client)
    rows: list[Row] = [await time_calls(_noop, args.hits, backend="—",
                                        case="floor: await of a no-op coroutine")]
    try:
        kek_path = init_kek_file(stack.workdir / "bench-kek.bin")
        print("bench: FileKek...", flush=True)
        rows += await bench_backend(
            "FileKek", store, FileKek.load(kek_path), credential="bench-file",
            provider_key="sk-bench-file-" + secrets.token_hex(16), hits=args.hits,
            misses=args.file_misses)
        if args.transit:
            from tests.openbao import KEK_NAME, start_openbao

            print("bench: starting OpenBao dev server...", flush=True)
            bao = start_openbao(stack)
            bao.enable_transit()
            bao.create_derived_key(KEK_NAME)
            transit = bao.transit_kek()
            try:
                print("bench: TransitKek (OpenBao)...", flush=True)
                rows += await bench_backend(
                    "TransitKek (OpenBao)", store, transit, credential="bench-transit",
                    provider_key="sk-bench-transit-" + secrets.token_hex(16),
                    hits=args.hits, misses=args.transit_misses)
            finally:
                await transit.close()
    finally:
        await client.aclose()
    return rows


def result_table(rows: Sequence[Row]) -> list[str]:
    return common.table(
        ["KEK backend", "case", "iterations", "p50 µs", "p99 µs", "mean µs", "max µs"],
        [[r.backend, r.case, f"{r.iterations:,}", f"{r.p50_us:,.1f}", f"{r.p99_us:,.1f}",
          f"{r.mean_us:,.1f}", f"{r.max_us:,.1f}"] for r in rows],
        align=["l", "l", "r", "r", "r", "r", "r"])


def target_lines(rows: Sequence[Row]) -> list[str]:
    lines = []
    for r in rows:
        if r.case.startswith("hit (key"):
            mark = "met" if r.p50_us < TARGET_HIT_US else "NOT met"
            lines.append(f"- {r.backend}: cache hit p50 {r.p50_us:.1f} µs, p99 {r.p99_us:.1f} µs "
                         f"(target < {TARGET_HIT_US:g} µs) — {mark}"
                         + ("" if r.p99_us < TARGET_HIT_US else "; p99 over the target"))
    return lines


def render(*, args: argparse.Namespace, command: str, machine: str, started: Any,
           rows: Sequence[Row], failure: str | None) -> str:
    lines = [
        f"## Key resolution {started:%Y-%m-%d %H:%M:%S} UTC — {args.hits:,} hits, "
        f"{args.file_misses:,} FileKek / "
        + (f"{args.transit_misses:,} TransitKek misses" if args.transit else "no TransitKek")
        + (" — INCOMPLETE (run failed)" if failure else ""),
        "",
        f"Command: `{command}`",
        "",
        f"Machine: {machine}.",
        "",
    ]
    if failure:
        lines += [f"Failure: {failure}", ""]
    lines += [
        "In-process `await Keyring.credential(id)` (no gateway, no gRPC), one call at a time "
        "on one event loop, timed with `time.perf_counter_ns`; the bench redis-server and "
        "the OpenBao dev server (Transit, derived aes256-gcm96 key, root token, HTTP on "
        "loopback; hvac runs on the KEK's own 4-thread pool) on the same 2 cores. Keyring settings "
        f"are the product defaults (key TTL {DEFAULTS.cache_ttl_s} s, state TTL "
        f"{DEFAULTS.state_ttl_s:g} s) except where a case sets a TTL to 0 to force its miss; "
        "*cold keyring* builds a new `Keyring` (untimed) before each call.",
        "",
        *result_table(rows),
        "",
        *target_lines(rows),
        "",
        "Not measured here: the gateway's end-to-end overhead with credential injection on "
        "(keyring credentials in the gateway config, through Envoy).",
        "",
    ]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bench/keys.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hits", type=int, default=50_000,
                        help="timed cache-hit calls per backend (default 50000)")
    parser.add_argument("--file-misses", type=int, default=2_000,
                        help="timed calls per miss case with FileKek (default 2000)")
    parser.add_argument("--transit-misses", type=int, default=1_000,
                        help="timed calls per miss case with TransitKek (default 1000)")
    parser.add_argument("--no-transit", dest="transit", action="store_false",
                        help="skip TransitKek (no OpenBao server)")
    parser.add_argument("--quick", action="store_true",
                        help="smoke check: 10000 hits, 300 FileKek / 200 TransitKek misses")
    parser.add_argument("--output", type=Path, default=common.RESULTS,
                        help="results file (default bench/RESULTS.md)")
    parser.add_argument("--keep-history", type=int, default=3,
                        help="key-resolution sections kept in the results file (default 3)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    raw_argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(raw_argv)
    if args.quick:
        args.hits, args.file_misses, args.transit_misses = 10_000, 300, 200
    if not (100 <= args.hits <= 1_000_000 and 10 <= args.file_misses <= 100_000
            and 10 <= args.transit_misses <= 20_000):
        print("bench: --hits 100..1000000, --file-misses 10..100000, "
              "--transit-misses 10..20000", file=sys.stderr)
        return 2
    started = common.utc_now()
    command = common.display_command("bench/keys.py", raw_argv)
    extra = [_version([redis_server_binary(), "--version"]).split(" sha=")[0]]
    if args.transit:
        extra.append(_version([str(Path(sys.executable).parent / "bao"), "version"]))
    machine = common.machine_line(extra=extra)
    workdir = Path(tempfile.mkdtemp(prefix="asc-bench-keys-"))
    rows: list[Row] = []
    failure: str | None = None
    stack = Stack(workdir)
    try:
        rows = asyncio.run(run(args, stack))
    except Exception as exc:
        failure = f"{type(exc).__name__}: {exc}"
        print(f"bench: FAILED: {failure}\nbench: process logs kept in {workdir}",
              file=sys.stderr)
    finally:
        stack.stop()
    text = render(args=args, command=command, machine=machine, started=started, rows=rows,
                  failure=failure)
    common.append_section("keys", text, path=args.output, keep=args.keep_history)
    print()
    print("\n".join(result_table(rows)))
    print()
    print("\n".join(target_lines(rows)))
    print(f"\nbench: results appended to {args.output}")
    if failure is None:
        shutil.rmtree(workdir, ignore_errors=True)
    hit_rows = [r for r in rows if r.case.startswith("hit (key")]
    return 1 if failure or not hit_rows else 0


if __name__ == "__main__":
    raise SystemExit(main())
