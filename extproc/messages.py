"""Plain values exchanged between the Envoy boundary (`envoy.py`) and the processor.

The processor (`phases.py`) reads and returns only these types, so policy code is tested
without protobufs and the wire format can change in one module.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

__all__ = [
    "Body",
    "BodyMode",
    "Continue",
    "Headers",
    "Inbound",
    "Metadata",
    "Outbound",
    "Phase",
    "Respond",
    "Trailers",
]

Metadata = dict[str, str | int | float | bool]


class Phase(enum.Enum):
    REQUEST_HEADERS = "request_headers"
    REQUEST_BODY = "request_body"
    REQUEST_TRAILERS = "request_trailers"
    RESPONSE_HEADERS = "response_headers"
    RESPONSE_BODY = "response_body"
    RESPONSE_TRAILERS = "response_trailers"


class BodyMode(enum.Enum):
    NONE = "none"
    BUFFERED = "buffered"
    BUFFERED_PARTIAL = "buffered_partial"
    STREAMED = "streamed"


@dataclass(slots=True)
class Headers:
    """Header names are lower-case; repeated headers are joined with ', '."""

    phase: Phase
    headers: dict[str, str]
    end_of_stream: bool
    route_metadata: dict[str, object] | None = None
    """The Envoy route's `filter_metadata.asc` (request headers only; see envoy.py)."""
    body_fields: dict[str, object] | None = None
    """The request body's fields the fast door read (`fastdoor.body_fields`); None on
    ext_proc's messages, which then take the full path (see extproc/fastpath.py)."""
    mtls: bool = False
    """Envoy's `connection.mtls` attribute: the client presented a verified certificate."""
    peer_uri_san: str | None = None
    """Envoy's `connection.uri_san_peer_certificate` (the peer's SPIFFE id), if any."""
    jwt_claims: dict[str, object] | None = None
    """Claims of a JWT Envoy's jwt_authn verified (forwarded dynamic metadata), if any."""
    source_address: str | None = None
    """The downstream peer `ip:port` Envoy saw (request headers only; see envoy.py)."""
    code_details: str | None = None
    """Envoy's `response.code_details` (response headers only; see envoy.py):
    `via_upstream` when the provider answered."""


@dataclass(slots=True)
class Body:
    phase: Phase
    body: bytes
    end_of_stream: bool


@dataclass(slots=True)
class Trailers:
    phase: Phase


Inbound = Headers | Body | Trailers


@dataclass(slots=True)
class Continue:
    """Let the message go on, changed as described. Headers set here overwrite."""

    set_headers: list[tuple[str, str]] = field(default_factory=list)
    remove_headers: list[str] = field(default_factory=list)
    body: bytes | None = None
    clear_route_cache: bool = False
    request_body_mode: BodyMode | None = None
    response_body_mode: BodyMode | None = None
    metadata: Metadata | None = None
    response_headers: Metadata | None = None
    """Headers Envoy puts on the answer without asking the service again (the fast path:
    the door's answer, through ext_authz's `allowed_client_headers_on_success`)."""


@dataclass(slots=True)
class Respond:
    """Answer the client now; the provider is not contacted (or its answer is replaced)."""

    status: int
    body: bytes
    headers: list[tuple[str, str]] = field(default_factory=list)
    details: str = ""
    metadata: Metadata | None = None


Outbound = Continue | Respond
