"""The fast door: Envoy's ext_authz HTTP check, where a same-dialect request is decided.

A grpc.aio ext_proc stream costs this process about 390 µs of CPU even when it carries one
message; an HTTP/1.1 check on a kept-alive connection costs it about 20 µs (measured on
the 2-core bench machine, docs/decisions/0124-fast-path-by-ext-authz-http.md). So the fast
path no longer goes through ext_proc at all. Envoy's `ext_authz` filter, first in the
chain, sends the request line, the client's headers and the buffered body here; this
module answers with one HTTP response:

* **fast**: 200 with the provider key and `x-asc-cluster` to set upstream, the client's
  credentials and other unforwarded headers to remove (`x-envoy-auth-headers-to-remove`),
  `x-asc-path` naming the provider path (a rendered route matches it, rewrites `:path`,
  and switches ext_proc off for the request), the request's `asc` metadata as
  `x-asc-meta-*` headers (Envoy's header_to_metadata filter moves them into dynamic
  metadata and off the request), and the `x-asc-*` answer headers for the client;
* **full**: 200 with `x-asc-path: full`: the request goes on to ext_proc, which decides
  it as before (another dialect, guardrails, an identity only Envoy's attributes carry,
  a refusal - every refusal before anything was taken is the full path's, so it reads
  and is recorded the same way);
* **refused** after the budget or the key was taken (a budget or rate limit, Redis down,
  no usable key): that status and body, in the client's dialect, recorded here.

The settle and the record of a fast request come later from Envoy's access log, as before
(`extproc.usage_log`, `fastpath.complete_from_log`).
"""

from __future__ import annotations

import asyncio
import base64
import logging
from collections import deque
from http import HTTPStatus
from typing import TYPE_CHECKING, Final, cast

import httptools
import orjson
from google.protobuf import struct_pb2  # type: ignore[import-untyped]

from extproc import metrics
from extproc.errors import Dialect, ErrorCode, GatewayError
from extproc.fastpath import (
    DOOR_DIALECT_HEADER,
    DOOR_ERROR_PATH,
    DOOR_HEALTH_PATH,
    DOOR_PATH_HEADER,
    DOOR_STATUS_HEADER,
    FAST_METADATA,
    META_PREFIX,
    RECORD_KEY,
    RECORD_KEYS,
    ROUTE_METADATA_HEADER,
    MetaKind,
)
from extproc.identity import IdentitySource, identity_sources
from extproc.messages import Continue, Headers, Phase, Respond
from extproc.phases import RequestProcessor
from extproc.translate.provider_errors import map_provider_error

if TYPE_CHECKING:
    from extproc.audit.writer import AuditWriter
    from extproc.runtime import RuntimeHolder

__all__ = [
    "DOOR_PATH_HEADER",
    "FULL_PATH",
    "META_PREFIX",
    "PARTIAL_BODY_HEADER",
    "DoorProtocol",
    "body_fields",
    "decide",
    "provider_error",
    "start_door",
]

log = logging.getLogger("extproc.fastdoor")

FULL_PATH: Final = "full"
REMOVE_HEADER: Final = "x-envoy-auth-headers-to-remove"
_GATEWAY_PREFIX: Final = "x-asc"
"""Every client header under it is removed upstream: none may pose as the door's."""
PARTIAL_BODY_HEADER: Final = "x-envoy-auth-partial-body"
"""Envoy's mark on a check whose body it cut at `max_request_bytes` (the filter's
`allow_partial_message`, decision 0136): such a request is never decided here."""
_OK_FULL: Final = f"HTTP/1.1 200 OK\r\n{DOOR_PATH_HEADER}: {FULL_PATH}\r\n".encode()
_NO_BODY: Final = b"content-length: 0\r\n\r\n"
_HEALTHY: Final = b"HTTP/1.1 200 OK\r\n" + _NO_BODY
_CHECKS: Final = {outcome: metrics.FAST_DOOR_CHECKS.labels(outcome)
                  for outcome in ("fast", "full", "refused", "abandoned")}


def _protobuf_bool(value: bool) -> str:
    return base64.b64encode(struct_pb2.Value(bool_value=value).SerializeToString()).decode()


_BOOL: Final = {True: _protobuf_bool(True), False: _protobuf_bool(False)}
"""header_to_metadata's PROTOBUF_VALUE (base64) of a bool: Envoy's filters then see a
bool, as they did when ext_proc set the metadata."""
_META_HEADERS: Final = {key: META_PREFIX + key for key in FAST_METADATA}
_BOOL_KEYS: Final = frozenset(key for key, kind in FAST_METADATA.items()
                              if kind is MetaKind.BOOL)
_OPTION_FIELDS: Final = ("model", "stream", "max_tokens", "max_completion_tokens", "n",
                         "service_tier")


def body_fields(body: bytes) -> dict[str, object] | None:
    """The body fields the fast path decides on, as json_to_metadata read them before:
    top-level scalars, `stream_options.include_usage`; a null, list or object is kept as
    None. None when the body is no JSON object (the full path answers the 400)."""
    try:
        document = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(document, dict):
        return None
    fields: dict[str, object] = {}
    for name in _OPTION_FIELDS:
        if name in document:
            value = document[name]
            fields[name] = None if isinstance(value, (dict, list)) else value
    options = document.get("stream_options")
    if isinstance(options, dict) and "include_usage" in options:
        include = options["include_usage"]
        fields["include_usage"] = None if isinstance(include, (dict, list)) else include
    return fields


async def decide(holder: RuntimeHolder, audit: AuditWriter | None, method: str,
                 target: str, headers: dict[str, str], body: bytes,
                 connection: asyncio.BaseTransport | None = None) -> bytes:
    """The door's HTTP response to one check (see the module docstring)."""
    if target == DOOR_HEALTH_PATH:
        return _HEALTHY
    if target == DOOR_ERROR_PATH and DOOR_STATUS_HEADER in headers:
        return provider_error(headers, body)
    runtime = holder.current
    config = runtime.config
    remove = _gateway_headers(headers)
    sources = config.identity.sources
    if ("?" in target or not body or not sources or ROUTE_METADATA_HEADER in headers
            or identity_sources(sources)[0] is not IdentitySource.VIRTUAL_KEY):
        # A query string, no body, a route with `asc` metadata (only ext_proc reads it),
        # or a first identity only Envoy's attributes carry.
        return _full(remove)
    if "true" in headers.get(PARTIAL_BODY_HEADER, "") or headers.get(
            "content-length", str(len(body))) != str(len(body)):
        # Only the first part of a larger body (Envoy cut it): the full path reads the
        # whole one, and answers the 413 over `limits.max_body_bytes`.
        return _full(remove)
    fields = body_fields(body)
    if fields is None:
        return _full(remove)
    processor = RequestProcessor(runtime, audit=audit)
    message = Headers(phase=Phase.REQUEST_HEADERS,
                      headers={**headers, ":method": method, ":path": target},
                      end_of_stream=False, body_fields=fields)
    try:
        reply = await processor.on_request_headers(message)
    except GatewayError as exc:
        if processor.route is None:
            return _full(remove)  # nothing taken yet: the full path refuses it, once
        return await _refused(processor, processor.respond_error(exc))
    except Exception:
        log.exception("fast door failed", extra={"fields": {
            "request_id": processor.request_id}})
        if processor.route is None:
            return _full(remove)
        return await _refused(processor, processor.respond_error(GatewayError(
            ErrorCode.INTERNAL,
            f"Internal gateway error (request id {processor.request_id}).")))
    if not processor.fast_path or not isinstance(reply, Continue):
        return _full(remove)
    if connection is not None and connection.is_closing():
        # Envoy gave up on this check (its timeout, a reset): it answers the client
        # itself and never forwards the request, so nothing was spent.
        processor.abandon()
        await processor.finish()
        _CHECKS["abandoned"].inc()
        return b""
    _CHECKS["fast"].inc()
    # The key's and the deployment's permits go back now (a half-open probe must not stay
    # taken); their verdicts come with the access-log entry (fastpath._report_health).
    await processor.finish()
    return _fast(reply)


def provider_error(headers: dict[str, str], body: bytes) -> bytes:
    """A fast answer's provider error, mapped and scrubbed as on the full path (Envoy's
    Lua filter calls this and puts the result in place of the provider's): the client's
    status in `x-asc-status`, the body in the door's dialect. A client that sends its own
    request to this path gets this too, as a check answer: Envoy drops the body and the
    header, and the request goes on to the full path (no `x-asc-path`)."""
    status = headers[DOOR_STATUS_HEADER]
    dialect = Dialect.ANTHROPIC if headers.get(DOOR_DIALECT_HEADER) == "anthropic" \
        else Dialect.OPENAI
    mapped, answer = map_provider_error(dialect, int(status) if status.isdigit() else 502,
                                        body)
    # As on every answer to a check: no client x-asc* header goes on upstream.
    return _response("HTTP/1.1 200 OK", [(DOOR_STATUS_HEADER, str(mapped)),
                                         ("content-type", "application/json"),
                                         (REMOVE_HEADER, ", ".join(_gateway_headers(headers)))],
                     answer)


def _gateway_headers(headers: dict[str, str]) -> list[str]:
    """The check's headers under `x-asc`: each answer removes them from the request."""
    return [name for name in headers if name.startswith(_GATEWAY_PREFIX)]


def _full(remove: list[str]) -> bytes:
    _CHECKS["full"].inc()
    remove = [name for name in remove if name != DOOR_PATH_HEADER]  # set here, not removed
    if not remove:
        return _OK_FULL + _NO_BODY
    return b"".join((_OK_FULL, REMOVE_HEADER.encode(), b": ",
                     ", ".join(remove).encode("latin-1"), b"\r\n", _NO_BODY))


def _fast(reply: Continue) -> bytes:
    # Only what header_to_metadata is rendered to take, as `x-asc-meta-<key>` headers; the
    # rest of what the access log must bring back, packed in one (decision 0144).
    metadata = reply.metadata or {}
    meta_headers = [(_META_HEADERS[key], _BOOL[bool(value)] if key in _BOOL_KEYS
                     else str(value))
                    for key, value in metadata.items() if key in _META_HEADERS]
    record = {key: value for key, value in metadata.items() if key in RECORD_KEYS}
    if record:
        meta_headers.append((_META_HEADERS[RECORD_KEY], orjson.dumps(record).decode()))
    ours = {DOOR_PATH_HEADER, *(name for name, _ in meta_headers)}
    headers = [(DOOR_PATH_HEADER if name == ":path" else name, value)
               for name, value in reply.set_headers]
    remove = [name for name in reply.remove_headers if name not in ours]
    if remove:
        headers.append((REMOVE_HEADER, ", ".join(remove)))
    headers.extend((name, str(value)) for name, value in (reply.response_headers or {}).items())
    headers.extend(meta_headers)
    return _response("HTTP/1.1 200 OK", headers)


def _response(status_line: str, headers: list[tuple[str, str]], body: bytes = b"") -> bytes:
    """The HTTP/1.1 response; header values come from the config and the gateway, and a CR,
    LF or NUL in one (which would split the response) becomes a space."""
    lines = [status_line, *(f"{name}: {value}" for name, value in headers),
             f"content-length: {len(body)}", "", ""]
    text = "\r\n".join(lines)
    separators = len(lines) - 1
    if text.count("\r") != separators or text.count("\n") != separators or "\0" in text:
        lines[1:len(headers) + 1] = [f"{name}: {_clean(value)}" for name, value in headers]
        text = "\r\n".join(lines)
    return text.encode("utf-8") + body


def _clean(value: str) -> str:
    return value.replace("\r", " ").replace("\n", " ").replace("\0", " ")


async def _refused(processor: RequestProcessor, answer: Respond) -> bytes:
    """A refusal after the budget or the key was taken: answered and recorded here."""
    await processor.finish()
    _CHECKS["refused"].inc()
    status = answer.status
    headers = list(answer.headers)
    if answer.metadata and "error" in answer.metadata:
        # Envoy's local-reply mappers pass the gateway's own answers through unchanged.
        headers.append((META_PREFIX + "error", str(answer.metadata["error"])))
    return _response(f"HTTP/1.1 {status} {HTTPStatus(status).phrase}", headers, answer.body)


class DoorProtocol(asyncio.Protocol):
    """One kept-alive HTTP/1.1 connection from Envoy's ext_authz client. Checks are
    answered in the order they came (Envoy sends one at a time per connection)."""

    def __init__(self, holder: RuntimeHolder, audit: AuditWriter | None,
                 tasks: set[asyncio.Task[None]]) -> None:
        self._holder = holder
        self._audit = audit
        self._tasks = tasks
        self._transport: asyncio.Transport | None = None
        self._parser = httptools.HttpRequestParser(self)
        self._url = b""
        self._headers: dict[str, str] = {}
        self._body: list[bytes] = []
        self._waiting: deque[tuple[str, str, dict[str, str], bytes]] = deque()
        self._busy = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # asyncio's or uvloop's transport (no common class beyond BaseTransport).
        self._transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError:
            if self._transport is not None:
                self._transport.close()

    # httptools callbacks
    def on_url(self, url: bytes) -> None:
        self._url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        key = name.decode("latin-1").lower()
        text = value.decode("utf-8", "replace")
        previous = self._headers.get(key)
        self._headers[key] = text if previous is None else f"{previous}, {text}"

    def on_body(self, body: bytes) -> None:
        self._body.append(body)

    def on_message_complete(self) -> None:
        method = self._parser.get_method().decode("latin-1")
        check = (method, self._url.decode("latin-1"), self._headers, b"".join(self._body))
        self._url, self._headers, self._body = b"", {}, []
        self._waiting.append(check)
        if not self._busy:
            self._next()

    def _next(self) -> None:
        if not self._waiting:
            self._busy = False
            return
        self._busy = True
        task = asyncio.get_running_loop().create_task(self._answer(*self._waiting.popleft()))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _answer(self, method: str, target: str, headers: dict[str, str],
                      body: bytes) -> None:
        try:
            response = await decide(self._holder, self._audit, method, target, headers,
                                    body, self._transport)
        except Exception:
            log.exception("fast door check failed")
            response = b""
        transport = self._transport
        if transport is None or transport.is_closing():
            return
        if not response:
            transport.close()  # Envoy answers the client 503 (status_on_error)
            return
        transport.write(response)
        self._next()

    def connection_lost(self, exc: Exception | None) -> None:
        self._waiting.clear()


async def start_door(listen: tuple[str, int] | str, holder: RuntimeHolder,
                     audit: AuditWriter | None, tasks: set[asyncio.Task[None]], *,
                     reuse_port: bool) -> asyncio.Server:
    """Serve the door on `(host, port)` or a Unix socket path (mode set by the caller)."""
    loop = asyncio.get_running_loop()

    def protocol() -> DoorProtocol:
        return DoorProtocol(holder, audit, tasks)

    if isinstance(listen, str):
        return await loop.create_unix_server(protocol, listen)
    host, port = listen
    return await loop.create_server(protocol, host, port, reuse_port=reuse_port or None)
