"""The audit writer: a bounded queue and one batch task, off the request's critical path.

`finish()` hands a record to `submit()` (a queue put, no I/O). The writer task takes up
to `batch_records` records at a time, seals them into the chain, appends them to each
sink's backlog and writes each backlog in one call (one fsync per batch). A sink that
fails keeps its backlog, is counted (`asc_audit_sink_failures_total`) and retried with
back-off; meanwhile the policy decides:

* `block`: the writer stops taking records while a backlog holds a batch, the queue
  fills, `submit()` waits for room, and `saturated` makes new requests answer 503;
* `buffer`: the writer keeps taking records into the backlog up to `buffer_records`;
  past that the queue fills and each record that finds it full is dropped, counted
  (`asc_audit_dropped_total`) and logged with its request id. Never silently.

Shutdown (`close`) drains the queue and every backlog (bounded by a timeout), then writes
the final checkpoint that marks the log as complete.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Final

from extproc import metrics
from extproc.audit.capture import Capture, seal_capture
from extproc.audit.chain import Chain, HmacKey, SigningKey
from extproc.audit.keys import create_key, newest_key
from extproc.audit.sinks import AuditSink, JsonlAuditSink, RedisStreamAuditSink
from extproc.config import AuditSettings, GatewayConfig
from extproc.credentials.kek import KekBackend, KekError
from extproc.logs import log_event

__all__ = ["AuditWriter", "audit_dir", "open_writer", "public_key_path"]

log = logging.getLogger("extproc.audit")

_RETRY_MIN_S: Final = 0.1
_RETRY_MAX_S: Final = 2.0
_PUBLIC_KEY_FILE: Final = "audit.pub"


def audit_dir(settings: AuditSettings) -> Path:
    return settings.directory


def public_key_path(settings: AuditSettings) -> Path:
    return audit_dir(settings) / _PUBLIC_KEY_FILE


class _Backlog:
    def __init__(self, sink: AuditSink) -> None:
        self.sink = sink
        self.entries: deque[dict[str, Any]] = deque()
        self.rotate_after = False
        self.failing_since: float | None = None
        self.retry_at = 0.0
        self.delay = _RETRY_MIN_S
        self.written_records = metrics.AUDIT_RECORDS.labels(sink.name, "record")
        self.written_checkpoints = metrics.AUDIT_RECORDS.labels(sink.name, "checkpoint")


class AuditWriter:
    def __init__(self, settings: AuditSettings, chain: Chain, sinks: list[AuditSink], *,
                 next_key: Callable[[], Awaitable[HmacKey | None]] | None = None,
                 kek: KekBackend | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.settings = settings
        self._kek = kek
        """Seals captured text (`tenants.<id>.audit.capture`)."""
        self.chain = chain
        self._backlogs = [_Backlog(sink) for sink in sinks]
        self._queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue(settings.queue_size)
        self._next_key = next_key
        self._clock = clock
        self._last_checkpoint = clock()
        self._waiter: asyncio.Future[None] | None = None
        """Set while the writer task waits for a record (or `close`); resolved by either."""
        self._closing = False
        self._closed = False
        self._task: asyncio.Task[None] | None = None
        self.dropped = 0

    # -- the request side -------------------------------------------------------------

    @property
    def saturated(self) -> bool:
        """Policy block with a full queue: new requests are refused (503) until it drains."""
        return self.settings.on_failure == "block" and self._queue.full()

    async def submit(self, record: dict[str, Any]) -> None:
        """Queue `record` (exactly once); waits for room under policy block."""
        if not self._closed:
            try:
                self._queue.put_nowait(record)
            except asyncio.QueueFull:
                if self.settings.on_failure == "block":
                    await self._queue.put(record)
                    self._wake_writer()
                    return
            else:
                self._wake_writer()
                return
        self._drop(record, "closed" if self._closed else "buffer_full")

    def _drop(self, record: dict[str, Any], reason: str) -> None:
        self.dropped += 1
        metrics.AUDIT_DROPPED.labels(reason).inc()
        log_event(log, logging.ERROR, "audit record dropped", reason=reason,
                  request_id=record.get("request_id"), tenant=record.get("tenant"))

    # -- the writer task --------------------------------------------------------------

    def start(self) -> None:
        """Write the opening checkpoint (seq 0) first, then records as they come."""
        self._append(self.chain.checkpoint())
        self._task = asyncio.get_running_loop().create_task(self._run())

    def _jsonl(self) -> _Backlog | None:
        return next((b for b in self._backlogs if isinstance(b.sink, JsonlAuditSink)), None)

    def _room(self) -> int:
        limit = (self.settings.batch_records if self.settings.on_failure == "block"
                 else self.settings.buffer_records)
        held = max((len(b.entries) for b in self._backlogs), default=0)
        return max(0, min(self.settings.batch_records, limit - held))

    def _append(self, entry: dict[str, Any]) -> None:
        for backlog in self._backlogs:
            backlog.entries.append(entry)

    def _wake_writer(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def _take(self, n: int, wait_s: float) -> list[dict[str, Any]]:
        """Up to `n` queued records; when there are none, first wait up to `wait_s` for
        one (or `close`). One future and one timer per wait: this runs once per batch."""
        if self._queue.empty() and wait_s > 0 and not self._closing:
            loop = asyncio.get_running_loop()
            waiter = self._waiter = loop.create_future()
            timer = loop.call_later(wait_s, _resolve, waiter)
            try:
                await waiter
            finally:
                timer.cancel()
                self._waiter = None
        items: list[dict[str, Any]] = []
        while len(items) < n and not self._queue.empty():
            items.append(self._queue.get_nowait())
        return items

    async def _seal_capture(self, record: dict[str, Any]) -> None:
        """Captured text becomes ciphertext before the record enters the chain; if it
        cannot be sealed, it is left out (never written in the clear)."""
        capture = record.get("capture")
        if not isinstance(capture, Capture):
            return
        if self._kek is None:
            record["capture"] = {"error": "no KEK"}
            return
        try:
            record["capture"] = await seal_capture(self._kek, capture, str(record["request_id"]))
        except Exception as exc:
            record["capture"] = {"error": "seal failed"}
            log_event(log, logging.ERROR, "audit capture not sealed; left out",
                      request_id=record.get("request_id"), error=type(exc).__name__)

    async def _checkpoint_if_due(self, *, force: bool = False) -> None:
        chain = self.chain
        now = self._clock()
        due = force or chain.since_checkpoint >= self.settings.checkpoint_every or (
            chain.since_checkpoint > 0
            and now - self._last_checkpoint >= self.settings.checkpoint_interval_s)
        if not due:
            return
        self._append(chain.checkpoint())
        self._last_checkpoint = now
        if self._next_key is not None:  # rotation: the newest key from the next record on
            try:
                key = await self._next_key()
            except Exception as exc:
                log_event(log, logging.WARNING, "audit key check failed",
                          error=type(exc).__name__)
            else:
                if key is not None and key.kid != chain.key.kid:
                    chain.rotate(key)
                    log_event(log, logging.INFO, "audit key rotated", kid=key.kid)

    def _wait_s(self) -> float:
        now = self._clock()
        waits = [max(0.0, self._last_checkpoint + self.settings.checkpoint_interval_s - now)
                 if self.chain.since_checkpoint else float(self.settings.checkpoint_interval_s)]
        waits += [max(0.0, b.retry_at - now) for b in self._backlogs if b.entries]
        return max(0.01, min(waits))

    async def _run(self) -> None:
        while True:
            room = self._room()
            batch = await self._take(room, self._wait_s()) if room else []
            for record in batch:
                await self._seal_capture(record)
                self._append(self.chain.seal(record))
                if self.chain.since_checkpoint >= self.settings.checkpoint_every:
                    await self._checkpoint_if_due()
            await self._checkpoint_if_due()
            jsonl = self._jsonl()
            if jsonl is not None and not jsonl.rotate_after and jsonl.sink.due_for_rotation():
                await self._checkpoint_if_due(force=True)
                jsonl.rotate_after = True
            await self._flush()
            metrics.AUDIT_BUFFERED.set(self._queue.qsize() + max(
                (len(b.entries) for b in self._backlogs), default=0))
            if self._closing and self._queue.empty() and not any(
                    b.entries for b in self._backlogs):
                return
            if not batch and room == 0:
                await asyncio.sleep(min(self._wait_s(), _RETRY_MAX_S))

    async def _flush(self, *, force: bool = False) -> None:
        now = self._clock()
        for backlog in self._backlogs:
            if not backlog.entries or (not force and now < backlog.retry_at):
                continue
            entries = list(backlog.entries)
            try:
                if isinstance(backlog.sink, JsonlAuditSink):
                    await backlog.sink.write(entries, rotate_after=backlog.rotate_after)
                else:
                    await backlog.sink.write(entries)
            except Exception as exc:
                metrics.AUDIT_SINK_FAILURES.labels(backlog.sink.name).inc()
                if backlog.failing_since is None:
                    backlog.failing_since = now
                    log_event(log, logging.ERROR, "audit sink failing; keeping its records",
                              sink=backlog.sink.name, error=type(exc).__name__,
                              detail=getattr(exc, "strerror", None),
                              policy=self.settings.on_failure, held=len(entries))
                backlog.retry_at = now + backlog.delay
                backlog.delay = min(_RETRY_MAX_S, backlog.delay * 2)
                continue
            for _ in entries:
                backlog.entries.popleft()
            backlog.rotate_after = False
            records = sum(1 for e in entries if e["type"] == "record")
            backlog.written_records.inc(records)
            backlog.written_checkpoints.inc(len(entries) - records)
            if backlog.failing_since is not None:
                log_event(log, logging.WARNING, "audit sink recovered",
                          sink=backlog.sink.name,
                          failed_for_s=round(now - backlog.failing_since, 3))
            backlog.failing_since = None
            backlog.delay = _RETRY_MIN_S
            backlog.retry_at = 0.0

    async def close(self, timeout_s: float = 10.0) -> None:
        """Drain the queue and the backlogs, write the final checkpoint, close the sinks."""
        if self._closed:
            return
        self._closing = True
        self._wake_writer()
        if self._task is not None:
            try:
                await asyncio.wait_for(self._task, timeout_s)
            except TimeoutError:
                log_event(log, logging.ERROR, "audit drain timed out",
                          queued=self._queue.qsize(),
                          held=max((len(b.entries) for b in self._backlogs), default=0))
        self._closed = True
        while not self._queue.empty():  # only after a timeout: sinks still failing
            record = self._queue.get_nowait()
            await self._seal_capture(record)
            self._append(self.chain.seal(record))
        self._append(self.chain.checkpoint(final=True))
        await self._flush(force=True)
        for backlog in self._backlogs:
            for entry in backlog.entries:
                if entry["type"] == "record":
                    self._drop(entry, f"shutdown_{backlog.sink.name}")
            await backlog.sink.close()


def _resolve(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


async def _chain_key(settings: AuditSettings, directory: Path,
                     kek: KekBackend | None) -> HmacKey:
    """The writer's HMAC key and the KEK that opens its key files (decision 0080).

    A gateway's Transit token may only decrypt (deploy/vault/gateway.hcl): it opens keys a
    key operator wrapped (`extproc audit rotate-key`) but cannot wrap one itself. With
    `hmac_key: auto` the writer then falls back to a local key and says so; with `kek` it
    refuses to start.
    """
    if settings.hmac_key == "kek" and kek is None:
        raise ValueError("audit.hmac_key is kek but secrets.kek is not set")
    use_kek = kek if settings.hmac_key != "local" else None
    try:
        key = await newest_key(directory, use_kek) or await create_key(directory, use_kek)
    except (KekError, LookupError) as exc:
        if settings.hmac_key == "kek" or use_kek is None:
            raise
        log_event(log, logging.WARNING, "audit HMAC key not wrapped by the KEK; using a "
                  "local key (run `extproc audit rotate-key` with a token that may "
                  "encrypt, see docs/audit.md)", error=type(exc).__name__)
        return await create_key(directory, None)
    return key


async def open_writer(config: GatewayConfig, *, kek: KekBackend | None = None,
                      redis: Callable[[], Any] | None = None) -> AuditWriter:
    """The process's writer for `config.audit`: keys loaded (or made), task started.
    `redis` gives the Redis client of the current config (the redis sink's)."""
    settings = config.audit
    directory = audit_dir(settings)
    directory.mkdir(parents=True, exist_ok=True)
    signer = SigningKey.load_or_create(settings.signing_key or directory / "signing.key")
    signer.publish(directory / _PUBLIC_KEY_FILE)
    chain = Chain(await _chain_key(settings, directory, kek), signer)
    use_kek = kek if settings.hmac_key != "local" else None
    sinks: list[AuditSink] = []
    if "jsonl" in settings.sinks:
        sinks.append(JsonlAuditSink(directory, chain.writer, rotate_bytes=settings.rotate_bytes,
                                    rotate_s=settings.rotate_s, fsync=settings.fsync))
    if "redis" in settings.sinks:
        if redis is None:
            raise ValueError("audit sink redis needs redis")
        sinks.append(RedisStreamAuditSink(redis, settings.redis_stream, settings.redis_maxlen))

    async def next_key() -> HmacKey | None:
        return await newest_key(directory, use_kek)

    writer = AuditWriter(settings, chain, sinks, next_key=next_key, kek=kek)
    writer.start()
    return writer
