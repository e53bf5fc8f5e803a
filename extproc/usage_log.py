"""The gRPC access-log service: where fast-path requests are settled and recorded.

Envoy's `envoy.access_loggers.http_grpc` logger (rendered only with the fast path, and
filtered to its requests by the `asc.fast` metadata) keeps one stream per Envoy worker
thread open to the extproc cluster and sends finished requests in batches (every
`fast_path.flush_interval_ms`). Each entry carries the fast-path reply's own `asc`
metadata, the usage Envoy read from the answer (`asc.usage`), the status and timings:
enough for any worker process to settle and record the request
(`fastpath.complete_from_log`). Delivery is best effort (Envoy drops entries when the
stream is down): a hold whose entry never comes is charged in full by the sweeper.

This is the only module besides `envoy.py` that reads Envoy protobufs.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any, Final

import grpc
import orjson
from envoy.data.accesslog.v3 import accesslog_pb2
from envoy.service.accesslog.v3 import als_pb2, als_pb2_grpc

from extproc.audit.writer import AuditWriter
from extproc.envoy import METADATA_NAMESPACE, struct_scalars
from extproc.fastpath import (
    ANSWER_NAMESPACE,
    FAST_MARK,
    RECORD_KEY,
    RECORD_KEYS,
    LogEntry,
    complete_from_log,
)
from extproc.runtime import RuntimeHolder

__all__ = ["USAGE_NAMESPACE", "AccessLogReceiver", "entry_of"]

log = logging.getLogger("extproc.usage_log")

USAGE_NAMESPACE: Final = "asc.usage"
_CLIENT_GONE_FLAGS: Final = ("downstream_connection_termination", "downstream_remote_reset",
                             "downstream_protocol_error")
"""Response flags that mean the client's side ended before the response did."""
_CUT_FLAGS: Final = (*_CLIENT_GONE_FLAGS, "upstream_remote_reset",
                     "upstream_connection_termination", "stream_idle_timeout",
                     "upstream_request_timeout", "local_reset", "duration_timeout",
                     "upstream_max_stream_duration_reached")
"""Response flags that mean the answer did not reach its end. Before the provider sent a
byte, only the client's leaving cuts anything: otherwise the client got Envoy's own
reply (a reset, a timeout) whole, as the full path sees it (decision 0140)."""


RETRY_AFTER: Final = "retry-after"
"""The one answer header the rendered access log sends (a 429's cool-down for the key)."""


def _record_fields(text: str) -> dict[str, object]:
    """The reply's packed metadata (`fastpath.RECORD_KEYS`, decision 0144): its known
    keys with plain values, as `struct_scalars` gives them; nothing from a malformed one
    (the request is then settled and recorded with what the other keys say)."""
    try:
        document = orjson.loads(text)
    except orjson.JSONDecodeError:
        return {}
    if not isinstance(document, dict):
        return {}
    return {key: value for key, value in document.items()
            if key in RECORD_KEYS and isinstance(value, (str, int, float, bool))}


def _seconds(duration: Any) -> float:
    return float(duration.seconds) + float(duration.nanos) / 1e9


def entry_of(entry: accesslog_pb2.HTTPAccessLogEntry) -> LogEntry | None:
    """The plain view of one entry; None when it is not a fast-path request's."""
    common = entry.common_properties
    metadata = common.metadata.filter_metadata
    if METADATA_NAMESPACE not in metadata:
        return None
    asc = struct_scalars(metadata[METADATA_NAMESPACE])
    if asc.get(FAST_MARK) is not True or not isinstance(asc.get("request_id"), str):
        return None
    record = asc.pop(RECORD_KEY, None)
    if isinstance(record, str):
        asc = {**_record_fields(record), **asc}
    usage: dict[str, float] = {}
    if USAGE_NAMESPACE in metadata:
        counts = metadata[USAGE_NAMESPACE].fields
        for name in counts:  # by key, as struct_scalars
            value = counts[name]
            if value.HasField("number_value"):
                usage[name] = value.number_value
    provider_status = None
    if ANSWER_NAMESPACE in metadata:
        value = metadata[ANSWER_NAMESPACE].fields.get("provider_status")
        if value is not None and value.HasField("number_value"):
            provider_status = int(value.number_value)
    flags = common.response_flags
    answered = common.HasField("time_to_first_upstream_rx_byte")
    # A message with no flag set serializes to nothing: most entries skip the ten reads.
    cut = flags.ByteSize() != 0 and any(
        getattr(flags, name) for name in (_CUT_FLAGS if answered else _CLIENT_GONE_FLAGS))
    return LogEntry(
        asc=asc,
        usage=usage,
        status=entry.response.response_code.value,
        upstream_answered=answered,
        downstream_cut=cut,
        duration_s=_seconds(common.duration) if common.HasField("duration") else 0.0,
        first_byte_s=_seconds(common.time_to_first_upstream_rx_byte) if answered else None,
        source_address=_peer(common.downstream_remote_address),
        retry_after=entry.response.response_headers.get(RETRY_AFTER),
        provider_status=provider_status,
    )


def _peer(address: Any) -> str | None:
    """`ip:port` of a socket address, None when Envoy logged none."""
    if not address.HasField("socket_address"):
        return None
    socket = address.socket_address
    return f"{socket.address}:{socket.port_value}"


class AccessLogReceiver(als_pb2_grpc.AccessLogServiceServicer):  # type: ignore[misc]
    """Settles and records each fast-path request of a batch, off the request path."""

    def __init__(self, holder: RuntimeHolder, audit: AuditWriter | None = None) -> None:
        self._holder = holder
        self._audit = audit
        self.finishing: set[asyncio.Task[None]] = set()

    async def StreamAccessLogs(
        self, request_iterator: AsyncIterator[als_pb2.StreamAccessLogsMessage],
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> als_pb2.StreamAccessLogsResponse:
        async for message in request_iterator:
            for raw in message.http_logs.log_entry:
                entry = entry_of(raw)
                if entry is None:
                    continue
                task = asyncio.get_running_loop().create_task(
                    complete_from_log(self._holder.current, entry, audit=self._audit))
                self.finishing.add(task)
                task.add_done_callback(self._finished)
        return als_pb2.StreamAccessLogsResponse()

    def _finished(self, task: asyncio.Task[None]) -> None:
        self.finishing.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("fast-path record failed", exc_info=task.exception())

    async def drain(self, timeout_s: float) -> None:
        if self.finishing:
            await asyncio.wait(set(self.finishing), timeout=timeout_s)
