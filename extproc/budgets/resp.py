"""RESP2 to one Redis node on plain asyncio connections: the budget ledger's hot path.

redis-py's asyncio client costs about 100 us of this process's CPU per script call, and
its pipeline machinery is heavy too; a command encoded by hiredis and its reply parsed by
`hiredis.Reader` cost a few us (bench/ledger.py: a reserve + settle pair at 16 concurrent
requests, 71 us of CPU through redis-py's pipeline, 31 us here). The ledger sends each
event-loop turn's EVALSHAs through `RespPool.execute` when it runs against one Redis
node; Redis Cluster and Sentinel keep redis-py (slot routing, failover discovery), and so
do the ledger's rare calls (first call, SCRIPT LOAD, sweep).

The pieces are separate so that the logic is tested without sockets: `encode_command`
builds a command's bytes, `ReplyQueue` feeds bytes to the hiredis reader and hands each
batch its replies in order, `RespConnection` is the asyncio protocol around one queue.

Errors use redis-py's exception classes, so the ledger maps them exactly as it maps
redis-py's (`REDIS_FAILURES`, `describe_redis_failure`: "redis: ConnectionError"):
an error reply is a `ResponseError` (`NoScriptError` for NOSCRIPT) in its command's place
in the list of replies; a connection that cannot be opened, breaks or speaks garbage
raises `ConnectionError` (`AuthenticationError` when AUTH is refused). No message names
the address, the password or the server's own words.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Final, cast

import hiredis
from redis import exceptions as redis_errors
from redis.asyncio.connection import UnixDomainSocketConnection, parse_url

from extproc.secrets import Secret

__all__ = ["ReplyQueue", "RespAddress", "RespConnection", "RespPool", "encode_command"]

IDLE_CONNECTIONS: Final = 8
"""Open connections kept for reuse; more may be open while that many batches are in
flight (the ledger's gate bounds them), and are closed when they come back."""


def encode_command(args: tuple[object, ...]) -> bytes:
    """One command as a RESP2 array of bulk strings: `*N\\r\\n` then `$len\\r\\n<arg>\\r\\n`
    per argument; bytes as they are, str as UTF-8, int and float as decimal text. Anything
    else (a bool too) is a `TypeError`.

    hiredis' encoder, in C: 1.7 us for a ledger EVALSHA of 18 arguments, where the same
    loop in Python took 4 to 5 us (the largest part of the ledger's CPU per call)."""
    # The stub says a 1-tuple and no return type; it takes any length and returns bytes.
    return hiredis.pack_command(args)  # type: ignore[arg-type, no-any-return]


_ERROR_CLASSES: Final[dict[str, type[redis_errors.RedisError]]] = {
    "NOSCRIPT": redis_errors.NoScriptError,
    "NOAUTH": redis_errors.AuthenticationError,
    "WRONGPASS": redis_errors.AuthenticationError,
    "NOPERM": redis_errors.NoPermissionError,
    "READONLY": redis_errors.ReadOnlyError,
    "LOADING": redis_errors.BusyLoadingError,
    "OOM": redis_errors.OutOfMemoryError,
}
"""Error replies by their code, classed as redis-py classes them, so that the ledger
describes an error reply alike on both paths ("redis: AuthenticationError")."""


def _reply_error(message: str) -> redis_errors.RedisError:
    """An error reply, as hiredis builds it: the class from its code, the message only the
    code (the rest is the server's words: a script's error may quote keys)."""
    code = message.partition(" ")[0]
    return _ERROR_CLASSES.get(code, redis_errors.ResponseError)(code)


@dataclass(slots=True)
class _Batch:
    expected: int
    replies: list[Any]
    future: asyncio.Future[list[Any]]


class ReplyQueue:
    """Replies matched to batches first in, first out: the bytes Redis sends go to `feed`,
    each batch gets its `expected` replies in the order its commands were written.

    A batch whose caller stopped waiting (cancelled) keeps its place and its replies are
    dropped, so the batches behind it still get their own."""

    __slots__ = ("_batches", "_reader")

    def __init__(self) -> None:
        self._reader = hiredis.Reader(replyError=_reply_error)
        self._batches: deque[_Batch] = deque()

    def expect(self, count: int, future: asyncio.Future[list[Any]]) -> None:
        self._batches.append(_Batch(count, [], future))

    def __len__(self) -> int:
        """Batches still waiting for replies."""
        return len(self._batches)

    def feed(self, data: bytes) -> None:
        """Hand complete replies to their batches; raises `ConnectionError` on bytes that
        are not RESP or a reply nobody asked for (the connection is then unusable)."""
        self._reader.feed(data)
        while True:
            try:
                reply = self._reader.gets()
            except hiredis.ProtocolError:
                raise redis_errors.ConnectionError("unparseable reply") from None
            if reply is False:
                return
            if not self._batches:
                raise redis_errors.ConnectionError("reply without a command")
            batch = self._batches[0]
            batch.replies.append(reply)
            if len(batch.replies) == batch.expected:
                self._batches.popleft()
                if not batch.future.done():
                    batch.future.set_result(batch.replies)

    def fail(self, error: Exception) -> None:
        """Every waiting batch gets `error` (the connection is gone)."""
        while self._batches:
            future = self._batches.popleft().future
            if not future.done():
                future.set_exception(error)


class RespConnection(asyncio.Protocol):
    """One connection to Redis: `send` writes a batch of commands in one write and returns
    the future of their replies."""

    def __init__(self) -> None:
        self._queue = ReplyQueue()
        self._transport: asyncio.Transport | None = None
        self.broken = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # asyncio's or uvloop's transport (no common class beyond BaseTransport).
        self._transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        try:
            self._queue.feed(data)
        except redis_errors.ConnectionError as exc:
            self._break(exc)

    def eof_received(self) -> bool:
        self._break(redis_errors.ConnectionError("closed by redis"))
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._break(redis_errors.ConnectionError("connection lost"))

    def send(self, commands: Sequence[bytes]) -> asyncio.Future[list[Any]]:
        future: asyncio.Future[list[Any]] = asyncio.get_running_loop().create_future()
        if not commands:
            future.set_result([])
        elif self.broken or self._transport is None:
            future.set_exception(redis_errors.ConnectionError("connection closed"))
        else:
            self._queue.expect(len(commands), future)
            self._transport.write(b"".join(commands))
        return future

    @property
    def idle(self) -> bool:
        return not self.broken and len(self._queue) == 0

    def close(self) -> None:
        self._break(redis_errors.ConnectionError("connection closed"))

    def _break(self, error: Exception) -> None:
        self.broken = True
        self._queue.fail(error)
        if self._transport is not None:
            self._transport.close()


@dataclass(frozen=True, slots=True)
class RespAddress:
    """Where one Redis node listens and how to log in; `password` never shows in a repr."""

    host: str = "127.0.0.1"
    port: int = 6379
    path: str | None = None
    """A Unix socket instead of host and port."""
    db: int = 0
    username: str | None = None
    password: Secret | None = field(default=None, repr=False)

    @classmethod
    def from_url(cls, url: str) -> RespAddress | None:
        """The node of a `redis://` or `unix://` URL; None for `rediss://` (TLS stays
        with redis-py)."""
        options = parse_url(url)
        connection_class = options.get("connection_class")
        if connection_class is not None and connection_class is not UnixDomainSocketConnection:
            return None
        password = options.get("password")
        return cls(host=options.get("host", "127.0.0.1"), port=int(options.get("port", 6379)),
                   path=options.get("path"), db=int(options.get("db", 0) or 0),
                   username=options.get("username"),
                   password=Secret(password) if password else None)

    def login_commands(self) -> list[bytes]:
        commands = []
        if self.password is not None:
            user = (self.username,) if self.username else ()
            commands.append(encode_command(("AUTH", *user, self.password.reveal())))
        if self.db:
            commands.append(encode_command(("SELECT", self.db)))
        return commands


class RespPool:
    """A few connections to one Redis node, each batch on a connection of its own.

    A connection comes back to the pool only after its batch got every reply; a batch that
    failed or was cancelled in flight (the ledger's I/O deadline, shutdown) closes its
    connection, so no late reply is ever read as another batch's. A reused connection that
    turns out broken (Redis restarted while it was idle) is replaced once, at once: the
    ledger's scripts are idempotent by request id, so a resent batch never applies twice.
    """

    def __init__(self, address: RespAddress, *, connect_timeout_s: float,
                 idle_connections: int = IDLE_CONNECTIONS) -> None:
        self._address = address
        self._connect_timeout_s = connect_timeout_s
        self._idle_max = idle_connections
        self._idle: list[RespConnection] = []
        self._closed = False

    def __repr__(self) -> str:
        return f"RespPool({self._address!r})"

    async def execute(self, commands: Sequence[bytes]) -> list[Any]:
        """The replies of `commands` (encoded), in order; an error reply is an exception
        object in its command's place. Raises `ConnectionError` / `AuthenticationError`."""
        connection = self._take_idle()
        if connection is not None:
            try:
                return await self._send(connection, commands)
            except redis_errors.ConnectionError:
                pass  # it broke while idle (Redis restarted): once more, on a new one
        return await self._send(await self._connect(), commands)

    async def _send(self, connection: RespConnection, commands: Sequence[bytes]
                    ) -> list[Any]:
        try:
            replies = await connection.send(commands)
        except BaseException:
            connection.close()  # its late replies must never reach another batch
            raise
        self._give_back(connection)
        return replies

    def close(self) -> None:
        """Close the idle connections now and the busy ones when their batch is done."""
        self._closed = True
        idle, self._idle = self._idle, []
        for connection in idle:
            connection.close()

    def _take_idle(self) -> RespConnection | None:
        while self._idle:
            connection = self._idle.pop()
            if connection.idle:
                return connection
        return None

    def _give_back(self, connection: RespConnection) -> None:
        if connection.idle and not self._closed and len(self._idle) < self._idle_max:
            self._idle.append(connection)
        else:
            connection.close()

    async def _connect(self) -> RespConnection:
        loop = asyncio.get_running_loop()
        address = self._address
        try:
            async with asyncio.timeout(self._connect_timeout_s):
                if address.path is not None:
                    _, connection = await loop.create_unix_connection(RespConnection,
                                                                      address.path)
                else:
                    _, connection = await loop.create_connection(RespConnection,
                                                                 address.host, address.port)
        except TimeoutError:
            raise redis_errors.TimeoutError("connect timed out") from None
        except OSError:
            raise redis_errors.ConnectionError("cannot connect") from None
        login = address.login_commands()
        if not login:
            return connection
        try:
            replies = await connection.send(login)
        except BaseException:
            connection.close()
            raise
        if any(isinstance(reply, Exception) for reply in replies):
            connection.close()
            raise redis_errors.AuthenticationError("login refused")
        return connection
