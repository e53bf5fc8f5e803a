"""Where chained audit entries go: append-only JSONL files, a Redis Stream.

A sink takes a batch of entries (already sealed by the chain) and writes all of them or
raises: the writer keeps a failed batch and hands the same entries again later, so each
entry lands exactly once per sink. The JSONL sink cuts a half-written batch back to the
file's length before the batch (a full disk leaves no partial line behind).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final, Protocol

from extproc.audit.chain import Sealed

__all__ = ["AuditSink", "JsonlAuditSink", "RedisStreamAuditSink", "entry_line"]

_FILE_PREFIX: Final = "audit-"


def entry_line(entry: dict[str, Any]) -> bytes:
    if isinstance(entry, Sealed):
        return entry.line
    return json.dumps(entry, separators=(",", ":"), ensure_ascii=False).encode("utf-8") + b"\n"


class AuditSink(Protocol):
    name: str

    async def write(self, entries: Sequence[dict[str, Any]]) -> None:
        """Write every entry or raise (then none of them counts as written)."""
        ...

    async def close(self) -> None: ...

    def due_for_rotation(self) -> bool:
        """True when the sink wants a checkpoint to end its current file."""
        ...


class JsonlAuditSink:
    """One writer's files: `audit-<UTC start>-<writer>-<part>.jsonl` in `directory`.

    Append-only: a file is opened with O_APPEND, never rewritten; a new part starts past
    `rotate_bytes` or `rotate_s`. fsync policy `batch`: every batch is fsynced before the
    writer takes the next one (and the directory once per new file).
    """

    name = "jsonl"

    def __init__(self, directory: Path, writer: str, *, rotate_bytes: int, rotate_s: int,
                 fsync: str = "batch", clock: Any = time.monotonic) -> None:
        self.directory = directory
        self.writer = writer
        self._rotate_bytes = rotate_bytes
        self._rotate_s = rotate_s
        self._fsync = fsync == "batch"
        self._clock = clock
        self._stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
        self._part = 0
        self._fd: int | None = None
        self._rotated = False
        """The current part was closed by rotation (not by a failure): open the next."""
        self._opened_at = 0.0
        self._size = 0
        self.path: Path | None = None

    def due_for_rotation(self) -> bool:
        return self._fd is not None and (
            self._size >= self._rotate_bytes
            or self._clock() - self._opened_at >= self._rotate_s)

    def path_for(self, part: int) -> Path:
        return self.directory / f"{_FILE_PREFIX}{self._stamp}-{self.writer}-{part:05d}.jsonl"

    def _open(self) -> None:
        """The next part after a rotation (or the first); the same part after a failure
        (its directory may have been recreated meanwhile)."""
        if self.path is None or self._rotated:
            self._part += 1
            self._rotated = False
        self.directory.mkdir(parents=True, exist_ok=True)
        self.path = self.path_for(self._part)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o640)
        self._size = os.fstat(self._fd).st_size
        self._opened_at = self._clock()
        if self._fsync:
            dir_fd = os.open(self.directory, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)

    def _close_file(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def _write_sync(self, data: bytes, rotate_after: bool) -> None:
        if self._fd is None:
            self._open()
        assert self._fd is not None
        before = self._size
        try:
            view = memoryview(data)
            while view:
                written = os.write(self._fd, view)
                view = view[written:]
            if self._fsync:
                os.fsync(self._fd)
        except OSError:
            # No partial line stays behind; the batch is written again later.
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, before)
            self._close_file()  # reopened (maybe in a recreated directory) next time
            raise
        self._size = before + len(data)
        if rotate_after:
            self._close_file()
            self._rotated = True

    async def write(self, entries: Sequence[dict[str, Any]], *,
                    rotate_after: bool = False) -> None:
        data = b"".join(entry_line(e) for e in entries)
        await asyncio.to_thread(self._write_sync, data, rotate_after)

    async def close(self) -> None:
        self._close_file()


class RedisStreamAuditSink:
    """XADD of each entry (field `e`: the JSON line) to one stream, in one MULTI/EXEC.

    MAXLEN `~ maxlen` trims the oldest entries approximately (cheap): the stream is a
    feed for consumers, the JSONL files are the archive (docs/audit.md).
    """

    name = "redis"

    def __init__(self, client: Callable[[], Any], stream: str, maxlen: int) -> None:
        """`client` gives the Redis client to write to now: the current config's, so a
        reload that moves `redis` moves the stream with it."""
        self._client = client
        self._stream = stream
        self._maxlen = maxlen

    async def write(self, entries: Sequence[dict[str, Any]]) -> None:
        async with self._client().pipeline(transaction=True) as pipe:
            for entry in entries:
                pipe.xadd(self._stream, {"e": entry_line(entry)[:-1]},
                          maxlen=self._maxlen, approximate=True)
            await pipe.execute()

    async def close(self) -> None:
        return None

    def due_for_rotation(self) -> bool:
        return False
