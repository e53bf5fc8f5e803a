"""Shared core of the LLM provider emulator: app factory, recording, faults and keys.

Why this exists: demos, tests and benchmarks of the gateway need an upstream that
behaves like a real LLM provider (auth, validation, streaming, error shapes) but is
deterministic, free, offline and able to misbehave on demand.  Everything that is
*not* specific to one provider's wire format lives here, so each provider shape
(``openai_shape``, ``anthropic_shape``, ``azure_shape``, ``mistral_shape``,
``gemini_shape``) is a small module that only knows how to authenticate, validate and
answer in its own format.

Shapes plug in through the explicit registration table :data:`SHAPE_REGISTRY` (name ->
:class:`ProviderShape` built from plain functions of the shape module).  A process
serves one set of shapes: :data:`SHAPES` (``openai``, ``anthropic``, ``azure``) by
default, or the set :func:`shapes_named` builds (``--shape mistral`` on the command
line: Mistral and OpenAI share ``POST /v1/chat/completions``, so they cannot be served
together).  No base classes, no import-time side effects.  Shape modules only import
this module for type checking, so there is no runtime import cycle.

Request pipeline for every non-control path (``/_emulator/*`` is the control API)::

    record (before anything else, so even rejected calls are visible)
    -> fault: delay -> reset -> status/html    (header faults win over queued ones)
    -> configured latency
    -> shape authentication (401 in the shape's error format)
    -> shape handler (validation + reply)

Secrets: presented credentials are never echoed.  Error messages are fixed strings,
and recorded credential headers / query parameters are replaced with
``<redacted sha256:XXXXXXXXXXXXXXXX>`` (see :func:`key_fingerprint`) so tests can
still tell *which* key the gateway sent without the key appearing in any response.
The emulator writes no access log for the same reason.

Account headers: like the real providers, every provider answer (errors too) names the
account and its rate limits - OpenAI-style paths send ``openai-organization``,
``openai-project`` and ``x-ratelimit-*`` (:data:`OPENAI_ACCOUNT_HEADERS`), the Anthropic
path ``anthropic-organization-id`` and ``anthropic-ratelimit-*``
(:data:`ANTHROPIC_ACCOUNT_HEADERS`), so tests can check that they stop at the gateway.

Control API (loopback tool, no auth):

* ``GET /_emulator/health`` -> ``{"status": "ok"}``
* ``GET|DELETE /_emulator/requests`` -> recorded requests / clear them
* ``GET|POST|DELETE /_emulator/faults`` -> list / queue / clear queued faults
* ``PUT /_emulator/keys`` ``{"keys": [...]}`` -> replace the accepted key set (204)
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import socket
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from http import HTTPStatus
from types import ModuleType
from typing import Any, Final

from aiohttp import web

from extproc.emulator import (
    anthropic_shape,
    azure_shape,
    gemini_shape,
    mistral_shape,
    openai_shape,
)

__all__ = [
    "ANTHROPIC_ACCOUNT_HEADERS",
    "CONFIG_KEY",
    "CONTROL_PREFIX",
    "DEFAULT_REPLY",
    "DEFAULT_SHAPE_NAMES",
    "OPENAI_ACCOUNT_HEADERS",
    "SHAPES",
    "SHAPE_REGISTRY",
    "STATE_KEY",
    "CallContext",
    "EmulatorConfig",
    "EmulatorState",
    "Fault",
    "ProviderShape",
    "QueuedFault",
    "key_fingerprint",
    "make_app",
    "shapes_named",
]

CONTROL_PREFIX: Final = "/_emulator/"
DEFAULT_REPLY: Final = "Hello from the emulator."
# Big enough for multimodal prompts in benchmarks; aiohttp's default is 1 MiB.
_CLIENT_MAX_SIZE: Final = 32 * 1024 * 1024
# Header and query-parameter names that carry credentials in any supported or planned
# provider shape (OpenAI/Mistral bearer, Anthropic x-api-key, Azure api-key, ...).
_SECRET_HEADERS: Final = frozenset(
    {"authorization", "proxy-authorization", "x-api-key", "api-key", "x-goog-api-key"}
)
_SECRET_QUERY_PARAMS: Final = frozenset({"key", "api-key", "api_key", "apikey"})
OPENAI_ACCOUNT_HEADERS: Final[Mapping[str, str]] = {
    "openai-organization": openai_shape.EMULATED_ORGANIZATION,
    "openai-project": "proj_emulat0rpr0ject",
    "x-ratelimit-limit-requests": "5000",
    "x-ratelimit-remaining-requests": "4999",
    "x-ratelimit-limit-tokens": "2000000",
    "x-ratelimit-remaining-tokens": "1999990",
    "x-ratelimit-reset-requests": "12ms",
}
ANTHROPIC_ACCOUNT_HEADERS: Final[Mapping[str, str]] = {
    "anthropic-organization-id": "5f0c1d2e-3a4b-4c5d-8e6f-7a8b9c0d1e2f",
    "anthropic-ratelimit-requests-limit": "50",
    "anthropic-ratelimit-requests-remaining": "49",
    "anthropic-ratelimit-tokens-limit": "40000",
    "anthropic-ratelimit-tokens-remaining": "39990",
}
_ANTHROPIC_PATH: Final = "/v1/messages"
_TRUE: Final = frozenset({"1", "true", "yes", "on"})
_FALSE: Final = frozenset({"0", "false", "no", "off", ""})


def key_fingerprint(secret: str) -> str:
    """Return the non-reversible stand-in used wherever a credential would be shown.

    Tests compare ``key_fingerprint(expected_key)`` with recorded headers to check
    which key reached the provider without the key itself ever being echoed.
    """
    digest = hashlib.sha256(secret.encode("utf-8", "surrogateescape")).hexdigest()
    return f"<redacted sha256:{digest[:16]}>"


@dataclass(frozen=True, slots=True)
class EmulatorConfig:
    """Start-up configuration; runtime-mutable parts live in :class:`EmulatorState`."""

    keys: frozenset[str]
    latency_ms: int = 0
    chunk_delay_ms: int = 0
    record_limit: int = 10000
    reply: str = DEFAULT_REPLY

    def __post_init__(self) -> None:
        for name in ("latency_ms", "chunk_delay_ms", "record_limit"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be a non-negative int")


@dataclass(frozen=True, slots=True)
class Fault:
    """One injected misbehaviour; fields that are ``None``/``False`` do nothing."""

    status: int | None = None
    html: bool = False
    delay_ms: int = 0
    reset: bool = False
    reset_after_chunks: int | None = None
    end_after_chunks: int | None = None
    """A streamed answer ends cleanly (complete HTTP body) after this many events, without
    its terminal event: the silent truncation a gateway must not pass on as a 200."""
    retry_after: str | None = None
    pad_bytes: int = 0
    """Grow a non-streamed JSON answer by this many bytes (an `emulator_padding` field)."""
    message: str | None = None
    """The error message of a status fault (default: a realistic one of the shape), e.g.
    a provider echoing a huge unknown field back."""
    stream_error: str | None = None
    """A streamed answer sends its first event, then an in-stream error event with this
    message (OpenAI `data: {"error": ...}`, Anthropic `event: error`), and ends."""
    stream_error_split: int | None = None
    """The error event goes out in two writes, split after this many bytes, 50 ms apart
    (a proxy then sees it in two chunks)."""
    stream_error_id: bool = False
    """The OpenAI-shaped error event has an `id` before its `error` (as OpenAI-compatible
    servers that put the error in a chunk send it)."""

    @property
    def is_empty(self) -> bool:
        return (
            self.status is None
            and not self.html
            and self.delay_ms == 0
            and not self.reset
            and self.reset_after_chunks is None
            and self.end_after_chunks is None
            and self.pad_bytes == 0
            and self.stream_error is None
        )

    @property
    def effective_status(self) -> int | None:
        """HTML faults without an explicit status imitate a proxy's 502 page."""
        if self.status is None and self.html:
            return HTTPStatus.BAD_GATEWAY
        return self.status

    def to_json(self) -> dict[str, Any]:
        return {
            "status": self.status,
            "html": self.html,
            "delay_ms": self.delay_ms,
            "reset": self.reset,
            "reset_after_chunks": self.reset_after_chunks,
            "end_after_chunks": self.end_after_chunks,
            "retry_after": self.retry_after,
            "pad_bytes": self.pad_bytes,
            "message": self.message,
            "stream_error": self.stream_error,
            "stream_error_split": self.stream_error_split,
            "stream_error_id": self.stream_error_id,
        }


@dataclass(slots=True)
class QueuedFault:
    """A control-API fault with the number of provider calls it still applies to."""

    fault: Fault
    remaining: int


@dataclass(slots=True)
class EmulatorState:
    """Mutable per-app state: accepted keys, recordings, fault queue, id counter."""

    records: deque[dict[str, Any]]
    _keys: tuple[bytes, ...] = ()
    faults: deque[QueuedFault] = field(default_factory=deque)
    _counter: int = 0

    @classmethod
    def from_config(cls, config: EmulatorConfig) -> EmulatorState:
        state = cls(records=deque(maxlen=config.record_limit))
        state.set_keys(config.keys)
        return state

    def set_keys(self, keys: Iterable[str]) -> None:
        self._keys = tuple(sorted({k.encode("utf-8", "surrogateescape") for k in keys}))

    def key_is_valid(self, presented: str) -> bool:
        """Constant-time check of ``presented`` against every accepted key."""
        candidate = presented.encode("utf-8", "surrogateescape")
        ok = False
        for key in self._keys:
            ok |= hmac.compare_digest(key, candidate)
        return ok

    def next_id(self) -> int:
        self._counter += 1
        return self._counter

    def take_queued_fault(self) -> Fault | None:
        if not self.faults:
            return None
        head = self.faults[0]
        head.remaining -= 1
        if head.remaining <= 0:
            self.faults.popleft()
        return head.fault


chunk_pause: Callable[[float], Awaitable[None]] = asyncio.sleep
"""The wait between streamed events (`chunk_delay_ms`); tests swap it for a gate so they
can check pacing without reading clocks."""


@dataclass(slots=True)
class CallContext:
    """What the core hands a shape handler: config, state and a fault-aware SSE writer."""

    request: web.Request
    config: EmulatorConfig
    state: EmulatorState
    reset_after_chunks: int | None = None
    stream_error: str | None = None
    stream_error_split: int | None = None
    stream_error_id: bool = False
    end_after_chunks: int | None = None
    events_sent: int = 0

    async def open_stream(self, content_type: str = "text/event-stream") -> web.StreamResponse:
        """Send streaming headers immediately (like real providers do)."""
        resp = web.StreamResponse(
            status=200,
            headers={"Content-Type": content_type, "Cache-Control": "no-cache"},
        )
        await resp.prepare(self.request)
        await resp.write(b"")  # flush the buffered headers now, not with the first event
        if self.reset_after_chunks == 0:
            _abort(self.request)
        return resp

    async def send_event(self, resp: web.StreamResponse, data: bytes) -> bool:
        """Write one event; returns ``False`` once the connection is gone.

        ``StreamResponse.write`` hands the bytes to the transport immediately and
        drains when the buffer is over its limit, so each event leaves right away.
        """
        if self.request.transport is None or self.request.transport.is_closing():
            return False
        if self.events_sent and self.config.chunk_delay_ms:
            await chunk_pause(self.config.chunk_delay_ms / 1000)
        try:
            await resp.write(data)
        except ConnectionError:
            return False
        self.events_sent += 1
        if self.reset_after_chunks is not None and self.events_sent >= self.reset_after_chunks:
            _abort(self.request)
            return False
        if self.end_after_chunks is not None and self.events_sent >= self.end_after_chunks:
            await resp.write_eof()
            return False
        if self.stream_error is not None:
            event = _stream_error_event(self.request.path, self.stream_error,
                                        with_id=self.stream_error_id)
            split = self.stream_error_split
            if split is not None and 0 < split < len(event):
                await resp.write(event[:split])
                await chunk_pause(_SPLIT_PAUSE_S)
                event = event[split:]
            await resp.write(event)
            return False
        return True


ShapeHandler = Callable[[web.Request, CallContext], Awaitable[web.StreamResponse]]
ErrorBody = Callable[[int, str | None], dict[str, Any]]


@dataclass(frozen=True, slots=True)
class ProviderShape:
    """Registration record for one provider wire format.

    * ``routes``: ``(method, path, handler)`` triples served by this shape.
    * ``authenticate(request, state) -> bool``: does the request carry a valid key?
    * ``auth_error() -> body``: the shape's 401 body (must not echo the key).
    * ``error_body(status, message) -> body``: the shape's error body for injected
      faults and generic errors (``message=None`` means "pick a realistic one").
    * ``not_found(method, path) -> body``: the shape's 404 body.
    * ``auth_failure(request) -> (status, body)``: optional; the answer to a request
      without a valid key when it is not the usual 401 (Gemini: 403 without a key, 400
      ``API_KEY_INVALID`` with a wrong one, as Google answers).
    """

    name: str
    routes: tuple[tuple[str, str, ShapeHandler], ...]
    authenticate: Callable[[web.Request, EmulatorState], bool]
    auth_error: Callable[[], dict[str, Any]]
    error_body: ErrorBody
    not_found: Callable[[str, str], dict[str, Any]]
    auth_failure: Callable[[web.Request], tuple[int, dict[str, Any]]] | None = None


# The registration table.  Adding a provider = one module + one entry here.
def _shape_of(name: str, module: ModuleType) -> ProviderShape:
    """A shape module's plain functions, under the names the core calls them by."""
    return ProviderShape(
        name=name,
        routes=module.ROUTES,
        authenticate=module.authenticate,
        auth_error=module.auth_error,
        error_body=module.error_body,
        not_found=module.not_found,
        auth_failure=getattr(module, "auth_failure", None),
    )


SHAPE_REGISTRY: Final[dict[str, ProviderShape]] = {
    name: _shape_of(name, module)
    for name, module in (("openai", openai_shape), ("anthropic", anthropic_shape),
                         ("azure", azure_shape), ("mistral", mistral_shape),
                         ("gemini", gemini_shape))
}
DEFAULT_SHAPE_NAMES: Final = ("openai", "anthropic", "azure")


def shapes_named(names: Iterable[str]) -> tuple[ProviderShape, ...]:
    """The shapes to serve, in order; the first also answers unknown paths (404s).

    Raises ``ValueError`` for an unknown or repeated name, or for two shapes that would
    serve the same method and path (``openai`` and ``mistral``).
    """
    shapes: list[ProviderShape] = []
    routes: dict[tuple[str, str], str] = {}
    for name in names:
        shape = SHAPE_REGISTRY.get(name)
        if shape is None:
            known = ", ".join(sorted(SHAPE_REGISTRY))
            raise ValueError(f"unknown shape {name!r} (known: {known})")
        if shape in shapes:
            raise ValueError(f"shape {name!r} is listed twice")
        for method, path, _handler in shape.routes:
            other = routes.setdefault((method, path), name)
            if other != name:
                raise ValueError(f"shapes {other!r} and {name!r} both serve {method} {path}")
        shapes.append(shape)
    if not shapes:
        raise ValueError("at least one provider shape is required")
    return tuple(shapes)


# The shapes a process serves unless told otherwise.
SHAPES: Final[tuple[ProviderShape, ...]] = shapes_named(DEFAULT_SHAPE_NAMES)

STATE_KEY: Final = web.AppKey("emulator_state", EmulatorState)
CONFIG_KEY: Final = web.AppKey("emulator_config", EmulatorConfig)
_SHAPES_KEY: Final = web.AppKey("emulator_shapes", tuple[ProviderShape, ...])


_SPLIT_PAUSE_S: Final = 0.05


def _stream_error_event(path: str, message: str, *, with_id: bool = False) -> bytes:
    """An in-stream error event in the format of the path's provider."""
    if path.startswith(gemini_shape.PATH_PREFIX):
        return gemini_shape.stream_error_event(message)
    if path == _ANTHROPIC_PATH:
        data = {"type": "error", "error": {"type": "overloaded_error", "message": message}}
        return b"event: error\ndata: " + json.dumps(data).encode() + b"\n\n"
    error: dict[str, Any] = {"id": "chatcmpl-emulator"} if with_id else {}
    error["error"] = {"message": message, "type": "server_error", "param": None,
                      "code": None}
    return b"data: " + json.dumps(error).encode() + b"\n\n"


def _abort(request: web.Request) -> None:
    """Drop the TCP connection without a response (RST where the OS allows)."""
    transport = request.transport
    if transport is not None:
        transport.abort()


def _ensure_nodelay(request: web.Request) -> None:
    """Belt and braces for TCP_NODELAY.

    aiohttp already sets it in ``BaseProtocol.connection_made``; without it small
    responses wait for delayed ACKs and benchmarks cap out around 358 rps.  This
    costs one ``getsockopt`` per request and only writes when the option is off.
    """
    transport = request.transport
    sock = transport.get_extra_info("socket") if transport is not None else None
    if sock is None or sock.family not in (socket.AF_INET, socket.AF_INET6):
        return
    try:
        if not sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except OSError:
        return


def _json_response(
    body: Mapping[str, Any], status: int = 200, headers: Mapping[str, str] | None = None
) -> web.Response:
    return web.Response(
        body=json.dumps(body, separators=(",", ":")).encode(),
        status=status,
        content_type="application/json",
        headers=headers,
    )


def _redact_query(request: web.Request) -> str:
    if not request.query_string:
        return ""
    if not any(name.lower() in _SECRET_QUERY_PARAMS for name in request.query):
        return request.query_string
    parts = []
    for name, value in request.query.items():
        shown = key_fingerprint(value) if name.lower() in _SECRET_QUERY_PARAMS else value
        parts.append(f"{name}={shown}")
    return "&".join(parts)


def _redact_header(name: str, value: str) -> str:
    if name not in _SECRET_HEADERS:
        return value
    scheme, sep, token = value.partition(" ")
    if sep and scheme.lower() in ("bearer", "basic", "token"):
        return f"{scheme} {key_fingerprint(token.strip())}"
    return key_fingerprint(value.strip())


async def _record(request: web.Request, state: EmulatorState) -> None:
    too_large: web.HTTPException | None = None
    try:
        raw = await request.read()
    except web.HTTPException as exc:  # body over client_max_size
        raw, too_large = b"", exc
    headers: dict[str, str] = {}
    for name, value in request.headers.items():
        lname = name.lower()
        shown = _redact_header(lname, value)
        headers[lname] = f"{headers[lname]}, {shown}" if lname in headers else shown
    state.records.append(
        {
            "method": request.method,
            "path": request.path,
            "query": _redact_query(request),
            "headers": headers,
            "body": raw.decode("utf-8", errors="replace"),
            "ts": time.time(),
        }
    )
    if too_large is not None:
        raise too_large


def _int_header(request: web.Request, name: str, low: int, high: int) -> int | None:
    raw = request.headers.get(name)
    if raw is None:
        return None
    try:
        value = int(raw.strip())
    except ValueError:
        raise _BadFaultHeader(name) from None
    if not low <= value <= high:
        raise _BadFaultHeader(name)
    return value


def _bool_header(request: web.Request, name: str) -> bool:
    raw = request.headers.get(name)
    if raw is None:
        return False
    value = raw.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise _BadFaultHeader(name)


class _BadFaultHeader(Exception):
    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.header = name


def _header_fault(request: web.Request) -> Fault:
    retry_after = request.headers.get("x-emulator-retry-after")
    return Fault(
        status=_int_header(request, "x-emulator-status", 400, 599),
        html=_bool_header(request, "x-emulator-html"),
        delay_ms=_int_header(request, "x-emulator-delay-ms", 0, 3_600_000) or 0,
        reset=_bool_header(request, "x-emulator-reset"),
        reset_after_chunks=_int_header(request, "x-emulator-reset-after-chunks", 0, 1_000_000),
        retry_after=retry_after.strip() if retry_after is not None else None,
    )


def _fault_response(shape: ProviderShape, fault: Fault, status: int) -> web.Response:
    headers: dict[str, str] = {}
    if fault.retry_after is not None:
        headers["retry-after"] = fault.retry_after
    elif status == HTTPStatus.TOO_MANY_REQUESTS:
        headers["retry-after"] = "1"
    if fault.html:
        try:
            phrase = HTTPStatus(status).phrase
        except ValueError:
            phrase = "Error"
        page = f"<html><body><h1>{status} {phrase}</h1></body></html>"
        return web.Response(text=page, status=status, content_type="text/html", headers=headers)
    return _json_response(shape.error_body(status, fault.message), status=status, headers=headers)


def _wrap(
    shape: ProviderShape, handler: ShapeHandler
) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    """Apply faults, latency and auth in front of a shape handler."""

    async def endpoint(request: web.Request) -> web.StreamResponse:
        config = request.app[CONFIG_KEY]
        state = request.app[STATE_KEY]
        try:
            fault = _header_fault(request)
        except _BadFaultHeader as exc:
            return _json_response(
                shape.error_body(400, f"Invalid value for emulator header {exc.header}."),
                status=400,
            )
        if fault.is_empty:
            fault = state.take_queued_fault() or fault
        if fault.delay_ms:
            await asyncio.sleep(fault.delay_ms / 1000)
        if fault.reset:
            _abort(request)
            # Nothing can be sent any more; aiohttp notices the closed transport.
            return web.Response(status=499)
        status = fault.effective_status
        if status is not None:
            return _fault_response(shape, fault, status)
        if config.latency_ms:
            await asyncio.sleep(config.latency_ms / 1000)
        if not shape.authenticate(request, state):
            if shape.auth_failure is not None:
                auth_status, auth_body = shape.auth_failure(request)
                return _json_response(auth_body, status=auth_status)
            return _json_response(shape.auth_error(), status=401)
        ctx = CallContext(
            request=request,
            config=config,
            state=state,
            reset_after_chunks=fault.reset_after_chunks,
            end_after_chunks=fault.end_after_chunks,
            stream_error=fault.stream_error,
            stream_error_split=fault.stream_error_split,
            stream_error_id=fault.stream_error_id,
        )
        response = await handler(request, ctx)
        if fault.pad_bytes and isinstance(response, web.Response) and response.body:
            return _padded(response, fault.pad_bytes)
        return response

    return endpoint


def _padded(response: web.Response, pad_bytes: int) -> web.Response:
    """A provider answer larger than a proxy's buffer, still valid JSON with its usage."""
    assert isinstance(response.body, bytes)
    document = json.loads(response.body)
    document["emulator_padding"] = "x" * pad_bytes
    return _json_response(document, status=response.status)


@web.middleware
async def _core_middleware(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    _ensure_nodelay(request)
    control = request.path.startswith(CONTROL_PREFIX)
    try:
        if not control:
            await _record(request, request.app[STATE_KEY])
        return await handler(request)
    except (web.HTTPNotFound, web.HTTPMethodNotAllowed):
        if control:
            return _json_response(
                {"error": {"message": f"Unknown control endpoint {request.method} {request.path}"}},
                status=404,
            )
        default_shape = request.app[_SHAPES_KEY][0]
        return _json_response(default_shape.not_found(request.method, request.path), status=404)
    except web.HTTPRequestEntityTooLarge:
        if control:
            raise
        default_shape = request.app[_SHAPES_KEY][0]
        return _json_response(default_shape.error_body(413, "Request body too large."), status=413)


async def _account_headers(request: web.Request, response: web.StreamResponse) -> None:
    """Name the (emulated) provider account on every provider answer, as providers do."""
    if request.path.startswith((CONTROL_PREFIX, gemini_shape.PATH_PREFIX)):
        return  # Google names no account in its answers
    account = (ANTHROPIC_ACCOUNT_HEADERS if request.path == _ANTHROPIC_PATH
               else OPENAI_ACCOUNT_HEADERS)
    for name, value in account.items():
        response.headers.setdefault(name, value)


# --------------------------------------------------------------------------- control API


def _control_error(message: str, status: int = 400) -> web.Response:
    return _json_response({"error": {"message": message}}, status=status)


async def _read_json_object(request: web.Request) -> dict[str, Any] | None:
    try:
        body = await request.json()
    except (ValueError, UnicodeDecodeError):
        return None
    return body if isinstance(body, dict) else None


async def _health(request: web.Request) -> web.Response:
    return _json_response({"status": "ok"})


async def _get_requests(request: web.Request) -> web.Response:
    return _json_response({"requests": list(request.app[STATE_KEY].records)})


async def _clear_requests(request: web.Request) -> web.Response:
    request.app[STATE_KEY].records.clear()
    return web.Response(status=204)


def _pending_faults(state: EmulatorState) -> dict[str, Any]:
    return {"faults": [{**q.fault.to_json(), "remaining": q.remaining} for q in state.faults]}


async def _get_faults(request: web.Request) -> web.Response:
    return _json_response(_pending_faults(request.app[STATE_KEY]))


_FAULT_FIELDS: Final = frozenset(
    {"status", "html", "delay_ms", "reset", "reset_after_chunks", "end_after_chunks",
     "retry_after", "count",
     "pad_bytes", "message", "stream_error", "stream_error_split", "stream_error_id"}
)
_MAX_FAULT_MESSAGE: Final = 16 * 1024 * 1024


def _opt_int(body: Mapping[str, Any], name: str, low: int, high: int) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ValueError(f"'{name}' must be an integer in [{low}, {high}]")
    return value


def _opt_bool(body: Mapping[str, Any], name: str) -> bool:
    value = body.get(name, False)
    if not isinstance(value, bool):
        raise ValueError(f"'{name}' must be a boolean")
    return value


def _parse_fault(body: Mapping[str, Any]) -> QueuedFault:
    unknown = sorted(set(body) - _FAULT_FIELDS)
    if unknown:
        raise ValueError(f"unknown fault field(s): {', '.join(unknown)}")
    retry_after = body.get("retry_after")
    if retry_after is not None:
        if isinstance(retry_after, bool) or not isinstance(retry_after, int) or retry_after < 0:
            raise ValueError("'retry_after' must be a non-negative integer")
        retry_after = str(retry_after)
    message = body.get("message")
    if message is not None and (not isinstance(message, str)
                                or not 0 < len(message) <= _MAX_FAULT_MESSAGE):
        raise ValueError(f"'message' must be a string of 1 to {_MAX_FAULT_MESSAGE} characters")
    stream_error = body.get("stream_error")
    if stream_error is not None and (not isinstance(stream_error, str)
                                     or not 0 < len(stream_error) <= _MAX_FAULT_MESSAGE):
        raise ValueError(
            f"'stream_error' must be a string of 1 to {_MAX_FAULT_MESSAGE} characters")
    fault = Fault(
        status=_opt_int(body, "status", 400, 599),
        html=_opt_bool(body, "html"),
        delay_ms=_opt_int(body, "delay_ms", 0, 3_600_000) or 0,
        reset=_opt_bool(body, "reset"),
        reset_after_chunks=_opt_int(body, "reset_after_chunks", 0, 1_000_000),
        end_after_chunks=_opt_int(body, "end_after_chunks", 1, 1_000_000),
        retry_after=retry_after,
        pad_bytes=_opt_int(body, "pad_bytes", 0, 1 << 30) or 0,
        message=message,
        stream_error=stream_error,
        stream_error_split=_opt_int(body, "stream_error_split", 1, 1_000_000),
        stream_error_id=_opt_bool(body, "stream_error_id"),
    )
    if fault.is_empty:
        raise ValueError(
            "a fault needs at least one of status, html, delay_ms, reset, reset_after_chunks,"
            " end_after_chunks, pad_bytes, stream_error"
        )
    count = _opt_int(body, "count", 1, 1_000_000_000)
    return QueuedFault(fault=fault, remaining=1 if count is None else count)


async def _post_faults(request: web.Request) -> web.Response:
    body = await _read_json_object(request)
    if body is None:
        return _control_error("body must be a JSON object")
    try:
        queued = _parse_fault(body)
    except ValueError as exc:
        return _control_error(str(exc))
    state = request.app[STATE_KEY]
    state.faults.append(queued)
    return _json_response(_pending_faults(state))


async def _clear_faults(request: web.Request) -> web.Response:
    request.app[STATE_KEY].faults.clear()
    return web.Response(status=204)


async def _put_keys(request: web.Request) -> web.Response:
    body = await _read_json_object(request)
    keys = body.get("keys") if body is not None else None
    if not isinstance(keys, list) or not all(isinstance(k, str) and k for k in keys):
        # Deliberately generic: never describe (or echo) the offending values.
        return _control_error('body must be {"keys": [non-empty strings]}')
    request.app[STATE_KEY].set_keys(keys)
    return web.Response(status=204)


# --------------------------------------------------------------------------- factory


def make_app(config: EmulatorConfig, shapes: tuple[ProviderShape, ...] = SHAPES) -> web.Application:
    """Build the emulator application; each call gets fresh, independent state."""
    if not shapes:
        raise ValueError("at least one provider shape is required")
    app = web.Application(middlewares=[_core_middleware], client_max_size=_CLIENT_MAX_SIZE)
    app[CONFIG_KEY] = config
    app[STATE_KEY] = EmulatorState.from_config(config)
    app[_SHAPES_KEY] = shapes
    app.on_response_prepare.append(_account_headers)
    router = app.router
    router.add_get(CONTROL_PREFIX + "health", _health, allow_head=False)
    router.add_get(CONTROL_PREFIX + "requests", _get_requests, allow_head=False)
    router.add_delete(CONTROL_PREFIX + "requests", _clear_requests)
    router.add_get(CONTROL_PREFIX + "faults", _get_faults, allow_head=False)
    router.add_post(CONTROL_PREFIX + "faults", _post_faults)
    router.add_delete(CONTROL_PREFIX + "faults", _clear_faults)
    router.add_put(CONTROL_PREFIX + "keys", _put_keys)
    for shape in shapes:
        for method, path, handler in shape.routes:
            router.add_route(method, path, _wrap(shape, handler))
    return app
