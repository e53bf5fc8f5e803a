"""Failing audit sinks follow their policy and are counted: a full disk (the JSONL file is
/dev/full, so the kernel answers ENOSPC) and a Redis server that is stopped and started
again. Real writer, real files, real redis-server; nothing is mocked.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
from prometheus_client import REGISTRY

from extproc.audit.chain import Chain, SigningKey, load_public_keys
from extproc.audit.keys import create_key, load_keys
from extproc.audit.sinks import AuditSink, JsonlAuditSink, RedisStreamAuditSink
from extproc.audit.verify import verify_paths
from extproc.audit.writer import AuditWriter
from extproc.config import AuditSettings
from extproc.devstack import Stack


def record(n: int) -> dict[str, Any]:
    return {"v": 1, "time_ns": 1_700_000_000_000_000_000 + n, "request_id": f"{n:032x}",
            "tenant": "acme", "status": 200}


def metric(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


async def until(predicate: Callable[[], bool], within_s: float = 15.0) -> bool:
    """Poll `predicate` on the event loop (the writer task must keep running)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within_s
    while loop.time() < deadline:
        if predicate():
            return True
        await asyncio.sleep(0.02)
    return False


async def make_writer(directory: Path, settings: AuditSettings,
                      sink_for: Callable[[str], AuditSink]) -> AuditWriter:
    signer = SigningKey.load_or_create(directory / "signing.key")
    signer.publish(directory / "audit.pub")
    chain = Chain(await create_key(directory, None), signer)
    writer = AuditWriter(settings, chain, [sink_for(chain.writer)])
    return writer


async def writer_on_full_disk(directory: Path,
                              settings: AuditSettings) -> tuple[AuditWriter, Path]:
    """A writer to one JSONL sink whose first part is a link to /dev/full (every write
    fails with ENOSPC) until the test removes the returned path: "space again"."""
    sinks: list[JsonlAuditSink] = []

    def sink_for(writer: str) -> AuditSink:
        sink = JsonlAuditSink(directory, writer, rotate_bytes=1 << 20, rotate_s=3600)
        sinks.append(sink)
        return sink

    writer = await make_writer(directory, settings, sink_for)
    first_file = sinks[0].path_for(1)
    first_file.symlink_to("/dev/full")
    return writer, first_file


def jsonl_records(directory: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for path in sorted(directory.glob("audit-*.jsonl"))
            for line in path.read_text(encoding="utf-8").splitlines()
            if '"type":"record"' in line]


async def test_full_disk_blocks_then_every_record_lands_once(tmp_path: Path) -> None:
    directory = tmp_path / "audit"
    directory.mkdir()
    settings = AuditSettings(dir=directory, queue_size=4, batch_records=2,
                             on_failure="block", fsync="batch")
    writer, first_file = await writer_on_full_disk(directory, settings)
    failures = metric("asc_audit_sink_failures_total", sink="jsonl")
    writer.start()
    assert await until(lambda: metric("asc_audit_sink_failures_total", sink="jsonl")
                       > failures)
    # The writer holds one batch (the opening checkpoint and record 0) and takes no more;
    # records 1-4 fill the queue; then the policy blocks.
    for n in range(5):
        await writer.submit(record(n))
    assert await until(lambda: writer.saturated)
    waiting = asyncio.ensure_future(writer.submit(record(5)))
    await asyncio.sleep(0.3)  # (a bound for "still waiting", not a sync point)
    assert not waiting.done()

    first_file.unlink()  # space again: the same part is created as a regular file
    await asyncio.wait_for(waiting, 15)
    for n in range(6, 9):
        await writer.submit(record(n))
    await writer.close()

    assert [r["request_id"] for r in jsonl_records(directory)] == [
        f"{n:032x}" for n in range(9)]
    assert writer.dropped == 0
    report = verify_paths([directory], load_public_keys(directory / "audit.pub"),
                          await load_keys(directory, None))
    assert report.ok, [str(p) for p in report.problems]
    assert report.records == 9


async def test_full_disk_with_buffer_policy_counts_and_logs_each_drop(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    directory = tmp_path / "audit"
    directory.mkdir()
    settings = AuditSettings(dir=directory, queue_size=2, batch_records=2,
                             on_failure="buffer", buffer_records=3, fsync="batch")
    writer, first_file = await writer_on_full_disk(directory, settings)
    dropped_before = metric("asc_audit_dropped_total", reason="buffer_full")
    writer.start()
    # Let the writer fill its buffer (opening checkpoint + records) while the disk is full.
    for n in range(2):
        await writer.submit(record(n))
    assert await until(lambda: metric("asc_audit_sink_failures_total", sink="jsonl") > 0)
    with caplog.at_level(logging.ERROR, logger="extproc.audit"):
        for n in range(2, 12):
            await writer.submit(record(n))
            await asyncio.sleep(0)  # the writer takes what fits between submits
    assert writer.dropped > 0
    assert metric("asc_audit_dropped_total", reason="buffer_full") - dropped_before == \
        writer.dropped
    dropped_ids = {r.__dict__["fields"]["request_id"] for r in caplog.records
                   if r.getMessage() == "audit record dropped"}
    assert len(dropped_ids) == writer.dropped
    assert not writer.saturated  # buffer never blocks

    first_file.unlink()
    await writer.close()
    written = {r["request_id"] for r in jsonl_records(directory)}
    assert written | dropped_ids == {f"{n:032x}" for n in range(12)}
    assert not written & dropped_ids
    report = verify_paths([directory], load_public_keys(directory / "audit.pub"))
    assert report.ok, [str(p) for p in report.problems]


async def test_redis_down_is_counted_and_buffered_records_land_once_it_is_back(
        tmp_path: Path) -> None:
    with Stack(tmp_path / "stack") as stack:
        process, port = stack.start_redis(persist=True)
        client = aioredis.Redis(host="127.0.0.1", port=port, socket_timeout=1,
                                socket_connect_timeout=1)
        settings = AuditSettings(dir=tmp_path / "audit", sinks=("redis",), queue_size=100,
                                 batch_records=10, on_failure="buffer", buffer_records=100)
        (tmp_path / "audit").mkdir()
        writer = await make_writer(
            tmp_path / "audit", settings,
            lambda _w: RedisStreamAuditSink(lambda: client, "asc:audit", 1000))
        failures = metric("asc_audit_sink_failures_total", sink="redis")
        writer.start()
        for n in range(3):
            await writer.submit(record(n))

        async def stream_seqs() -> list[int]:
            try:
                entries = await client.xrange("asc:audit")
            except Exception:
                return []
            return [json.loads(fields[b"e"])["seq"] for _, fields in entries
                    if b'"type":"record"' in fields[b"e"]]

        seen: list[int] = []

        async def poll_seqs(expected: list[int]) -> bool:
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 20
            while loop.time() < deadline:
                seen[:] = await stream_seqs()
                if seen == expected:
                    return True
                await asyncio.sleep(0.05)
            return False

        assert await poll_seqs([1, 2, 3])
        process.stop()
        stack.processes.remove(process)
        for n in range(3, 6):
            await writer.submit(record(n))
        assert await until(lambda: metric("asc_audit_sink_failures_total", sink="redis")
                           > failures)
        assert writer.dropped == 0

        stack.start_redis(port, persist=True)
        assert await poll_seqs([1, 2, 3, 4, 5, 6]), seen
        await writer.close()
        assert await stream_seqs() == [1, 2, 3, 4, 5, 6]
        await client.aclose()

