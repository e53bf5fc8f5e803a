"""The writer task's wait for records: one future and one timer per wait. A record
submitted while it waits is written at once (not after the checkpoint interval), records
submitted in the same event-loop turn go out as one batch, and `close` ends a wait."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from extproc.audit.chain import Chain, HmacKey, SigningKey, canonical, record_mac
from extproc.audit.writer import AuditWriter
from extproc.config import AuditSettings


class MemorySink:
    name = "jsonl-test"

    def __init__(self) -> None:
        self.batches: list[list[dict[str, Any]]] = []
        self.written = asyncio.Event()

    async def write(self, entries: Sequence[dict[str, Any]]) -> None:
        self.batches.append(list(entries))
        self.written.set()

    async def until(self, condition: Callable[[], bool]) -> None:
        while not condition():
            self.written.clear()
            await self.written.wait()

    async def close(self) -> None:
        return None

    def due_for_rotation(self) -> bool:
        return False


def writer_with(directory: Path, sink: MemorySink, **settings: Any) -> AuditWriter:
    chain = Chain(HmacKey("k1", b"\x02" * 32), SigningKey.load_or_create(directory / "s.key"))
    return AuditWriter(AuditSettings(dir=directory, checkpoint_interval_s=3600, **settings),
                       chain, [sink])


def records(sink: MemorySink) -> list[list[str]]:
    return [[e["request_id"] for e in batch if e["type"] == "record"]
            for batch in sink.batches]


async def test_a_record_submitted_while_the_writer_waits_is_written_at_once(
        tmp_path: Path) -> None:
    sink = MemorySink()
    writer = writer_with(tmp_path, sink)
    writer.start()
    await asyncio.sleep(0.05)  # the opening checkpoint is out; the writer waits (3600 s)
    assert records(sink) == [[]]
    await asyncio.gather(*(writer.submit({"request_id": f"r{i}"}) for i in range(3)))
    await asyncio.wait_for(sink.until(lambda: len(sink.batches) == 2), 1.0)
    assert records(sink) == [[], ["r0", "r1", "r2"]]  # one turn's records: one batch
    await asyncio.wait_for(writer.close(), 1.0)  # ends the writer's next wait at once
    assert records(sink)[-1] == []  # the final checkpoint
    assert sink.batches[-1][-1]["final"] is True


async def test_a_blocked_submit_wakes_the_writer(tmp_path: Path) -> None:
    sink = MemorySink()
    writer = writer_with(tmp_path, sink, queue_size=1, batch_records=2, on_failure="block")
    writer.start()
    await asyncio.sleep(0.05)
    await asyncio.wait_for(asyncio.gather(
        *(writer.submit({"request_id": f"r{i}"}) for i in range(4))), 1.0)
    await asyncio.wait_for(sink.until(lambda: sum(map(len, records(sink))) == 4), 1.0)
    assert [r for batch in records(sink) for r in batch] == ["r0", "r1", "r2", "r3"]
    await writer.close()


def test_sealed_bytes_are_the_json_dumps_canonical_form(tmp_path: Path) -> None:
    chain = Chain(HmacKey("k1", b"\x02" * 32), SigningKey.load_or_create(tmp_path / "s.key"))
    record = {"request_id": "r", "tenant": "t", "tokens": {"output": 2, "input": 1},
              "model_asked": "gpt-é", "cost_micro_usd": None, "aborted": False}
    given = dict(record)
    sealed = chain.seal(record)
    assert record == given  # sealing copies: the caller's dict is left as it was
    assert sealed is not record
    body = {k: v for k, v in sealed.items() if k != "mac"}
    expected = json.dumps(body, sort_keys=True, separators=(",", ":"),
                          ensure_ascii=False).encode("utf-8")
    assert canonical(dict(sealed), without="mac") == expected
    assert canonical(body, without="mac") == expected
    assert sealed["mac"] == hmac.new(b"\x02" * 32, expected, hashlib.sha256).hexdigest()
    assert record_mac(b"\x02" * 32, json.loads(sealed.line)) == sealed["mac"]

