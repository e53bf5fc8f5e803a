"""`extproc audit query` over 1M records: index build time and query latency.

Writes a synthetic audit log (real chain: HMAC'd and checkpointed by `extproc.audit.chain`,
so `extproc audit verify` accepts it) of `--records` requests from 50 tenants over 30
days, in files of 250,000 records, then times:

* the index build (`extproc audit index`, in process: `index_file` per file);
* in-process `query()` for: a tenant at a minute (`--tenant T --at ...Z`), a request id,
  a credential over a day, a model + region over an hour;
* the same (tenant, minute) question through the CLI as a subprocess (Python start-up
  included: what an operator waits for).

    .venv/bin/python bench/audit_query.py                 # 1,000,000 records
    .venv/bin/python bench/audit_query.py --records 100000

Results: a table on stdout and a dated `## Audit query ...` section at the end of
bench/RESULTS.md (bench/common.py). Target (issue 10): under 1 s per query over 1M.
"""

from __future__ import annotations

import argparse
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import common
from extproc.audit.chain import Chain, HmacKey, SigningKey
from extproc.audit.query import Query, index_file, parse_time, query
from extproc.audit.sinks import entry_line
from extproc.audit.verify import log_files

START_NS = 1_793_491_200_000_000_000  # 2026-11-01T00:00:00Z
SPAN_NS = 30 * 86_400 * 10**9
TENANTS = [f"tenant-{n:02d}" for n in range(50)]
MODELS = ["gpt-4o-mini", "gpt-4o", "claude-sonnet", "mistral-large", "llama-3-70b"]
DEPLOYMENTS = [("openai-us", "us-east-1"), ("azure-eu", "westeurope"),
               ("anthropic-eu", "eu"), ("mistral-eu", "eu-west"), ("vllm-onprem", "dc1")]
PER_FILE = 250_000


def synthetic_records(count: int, seed: int = 7) -> Iterator[dict[str, Any]]:
    """`count` request records in time order (deterministic for a seed)."""
    rng = random.Random(seed)
    step = SPAN_NS // max(1, count)
    for n in range(count):
        provider, region = DEPLOYMENTS[rng.randrange(len(DEPLOYMENTS))]
        tenant = TENANTS[rng.randrange(len(TENANTS))]
        model = MODELS[rng.randrange(len(MODELS))]
        latency_ms = round(rng.uniform(50, 20_000), 3)
        yield {
            "v": 1, "time_ns": START_NS + n * step + rng.randrange(step),
            "request_id": f"{rng.getrandbits(128):032x}", "tenant": tenant,
            "principal": {"subject": f"{tenant}-key", "source": "virtual_key",
                          "key_id": f"{tenant}-key", "team": None},
            "source_address": f"10.0.{rng.randrange(256)}.{rng.randrange(256)}:443",
            "front_door": "openai", "endpoint": "chat", "model_asked": model,
            "model_served": model + "-prod",
            "route": {"provider": provider, "region": region, "zone": "eu",
                      "cluster": provider.replace("-", "_"), "reason": "zone eu; weights",
                      "served_reason": "zone eu; weights"},
            "attempts": [], "credential": f"{provider}-{rng.randrange(2)}@1", "budget": None,
            "guardrails": [], "status": 200, "upstream_status": 200, "error": None,
            "aborted": False, "stream": False, "stream_truncated": False,
            "tokens": {"input": 30, "output": 40, "cached": 0}, "cost_micro_usd": 30,
            "charged_micro_usd": None, "ttft_ms": latency_ms / 2, "latency_ms": latency_ms,
            "gateway_version": "0.1.0", "config_version": "0123456789abcdef",
        }


def write_synthetic_log(directory: Path, count: int, *, seed: int = 7,
                        per_file: int = PER_FILE) -> list[dict[str, Any]]:
    """A chained log of `count` synthetic records in `directory`; returns the records'
    query fields (request_id, tenant, time_ns, latency_ms, credential, model, region)."""
    directory.mkdir(parents=True, exist_ok=True)
    signer = SigningKey.load_or_create(directory / "signing.key")
    signer.publish(directory / "audit.pub")
    chain = Chain(HmacKey("bench", b"\x01" * 32), signer, writer="bench-1-00000000",
                  clock_ns=lambda: START_NS)
    kept: list[dict[str, Any]] = []
    part = 1
    out = (directory / f"audit-20261101T000000Z-{chain.writer}-{part:05d}.jsonl").open("wb")
    out.write(entry_line(chain.checkpoint()))
    for written, record in enumerate(synthetic_records(count, seed), start=1):
        out.write(entry_line(chain.seal(record)))
        kept.append({k: record[k] for k in ("request_id", "tenant", "time_ns", "latency_ms",
                                             "credential", "model_asked")}
                    | {"region": record["route"]["region"]})
        if chain.since_checkpoint >= 1000:
            out.write(entry_line(chain.checkpoint()))
        if written % per_file == 0 and written < count:
            out.write(entry_line(chain.checkpoint()))
            out.close()
            part += 1
            out = (directory / f"audit-20261101T000000Z-{chain.writer}-{part:05d}.jsonl"
                   ).open("wb")
    out.write(entry_line(chain.checkpoint(final=True)))
    out.close()
    return kept


def _iso(ns: int, fmt: str = "%Y-%m-%dT%H:%MZ") -> str:
    return datetime.fromtimestamp(ns / 1e9, UTC).strftime(fmt)


def _time(runs: int, call: Any) -> tuple[float, int]:
    timings, found = [], 0
    for _ in range(runs):
        started = time.perf_counter()
        found = len(list(call()))
        timings.append(time.perf_counter() - started)
    return statistics.median(timings), found


def run(args: argparse.Namespace, workdir: Path) -> list[list[str]]:
    started = time.perf_counter()
    kept = write_synthetic_log(workdir, args.records)
    generated_s = time.perf_counter() - started
    rows = [["write the log (generate, chain, JSON)", f"{generated_s:.1f} s", "-"]]
    started = time.perf_counter()
    for path in log_files([workdir]):
        index_file(path).close()
    rows.append(["index build (`extproc audit index`)",
                 f"{time.perf_counter() - started:.1f} s", "-"])
    rng = random.Random(11)
    target = kept[rng.randrange(len(kept))]
    minute = _iso(target["time_ns"])
    questions = {
        f"--tenant {target['tenant']} --at {minute}": Query(
            tenant=target["tenant"], at=parse_time(minute)),
        "--request-id <id>": Query(request_id=target["request_id"]),
        f"--credential {target['credential']} --from/--to one day": Query(
            credential=target["credential"], since=parse_time(_iso(target["time_ns"],
                                                                    "%Y-%m-%d")),
            until=parse_time(_iso(target["time_ns"], "%Y-%m-%d"))),
        f"--model {target['model_asked']} --region {target['region']} one hour": Query(
            model=target["model_asked"], region=target["region"],
            since=parse_time(_iso(target["time_ns"], "%Y-%m-%dT%HZ")),
            until=parse_time(_iso(target["time_ns"], "%Y-%m-%dT%HZ"))),
    }
    for text, question in questions.items():
        median, found = _time(5, lambda q=question: query([workdir], q))
        rows.append([f"`query {text}` (in process)", f"{median * 1000:.1f} ms",
                     f"{found:,}"])
    cli = [sys.executable, "-m", "extproc", "audit", "query", str(workdir),
           "--tenant", target["tenant"], "--at", minute]
    median, found = _time(3, lambda: subprocess.run(
        cli, capture_output=True, text=True, check=True, timeout=60).stdout.splitlines())
    rows.append([f"`extproc audit query --tenant {target['tenant']} --at {minute}` (CLI, "
                 "incl. Python start-up)", f"{median * 1000:.0f} ms", f"{found:,}"])
    assert any(target["request_id"] in line for line in subprocess.run(
        cli, capture_output=True, text=True, check=True, timeout=60).stdout.splitlines())
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    raw_argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="bench/audit_query.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, default=1_000_000)
    parser.add_argument("--output", type=Path, default=common.RESULTS)
    args = parser.parse_args(raw_argv)
    if not 1_000 <= args.records <= 10_000_000:
        print("bench: --records 1000..10000000", file=sys.stderr)
        return 2
    started = common.utc_now()
    command = common.display_command("bench/audit_query.py", raw_argv)
    machine = common.machine_line()
    workdir = Path(tempfile.mkdtemp(prefix="asc-bench-audit-"))
    try:
        rows = run(args, workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    lines = common.table(["step", "time (median of 5, CLI: of 3)", "records found"], rows,
                         ["l", "r", "r"])
    print("\n".join(lines))
    common.append_section("audit-query", "\n".join([
        f"## Audit query {started:%Y-%m-%d %H:%M:%S} UTC — {args.records:,} records",
        "", f"Command: `{command}`", "", f"Machine: {machine}.", "",
        "A synthetic, chained log (50 tenants over 30 days, files of 250,000 records) with "
        "its sqlite indexes (`<file>.idx`); each query reads its hits back from the JSONL "
        "files. Target (issue 10): under 1 s per query over 1M records.", "",
        *lines, ""]), path=args.output)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
