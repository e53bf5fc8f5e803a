"""The closed set of errors a client can receive from the gateway.

Every user-facing failure is one `GatewayError` with a fixed `ErrorCode`; each code maps
once to an HTTP status and to a JSON body in the client's dialect. Messages are written
by the gateway itself: no exception text, stack trace or secret ever reaches a client.
"""

from __future__ import annotations

import enum
import json
from dataclasses import dataclass

__all__ = ["Dialect", "ErrorCode", "GatewayError", "error_body"]


class Dialect(enum.Enum):
    """The API shape the client spoke, and so the shape of its error bodies."""

    OPENAI = "openai"
    ANTHROPIC = "anthropic"


@dataclass(frozen=True, slots=True)
class _ErrorSpec:
    status: int
    openai_type: str
    anthropic_type: str


class ErrorCode(enum.Enum):
    """Every error the gateway answers with; the value is the `code` clients see."""

    INVALID_REQUEST = "invalid_request"
    UNAUTHENTICATED = "invalid_api_key"
    FORBIDDEN = "permission_denied"
    """Authenticated by Envoy (mTLS peer, verified JWT) but not a principal of any tenant."""
    MODEL_NOT_ALLOWED = "model_not_allowed"
    NOT_FOUND = "not_found"
    MODEL_NOT_FOUND = "model_not_found"
    PAYLOAD_TOO_LARGE = "payload_too_large"
    RATE_LIMITED = "rate_limited"
    PROVIDER_ERROR = "provider_error"
    RESPONSE_TOO_LARGE = "response_too_large"
    UNAVAILABLE = "gateway_unavailable"
    INTERNAL = "internal_error"
    GUARDRAIL_DENIED = "guardrail_denied"
    GUARDRAIL_LIMIT = "guardrail_limit_exceeded"

    @property
    def spec(self) -> _ErrorSpec:
        return _SPECS[self]

    @property
    def status(self) -> int:
        return _SPECS[self].status


_SPECS: dict[ErrorCode, _ErrorSpec] = {
    ErrorCode.INVALID_REQUEST: _ErrorSpec(400, "invalid_request_error", "invalid_request_error"),
    ErrorCode.UNAUTHENTICATED: _ErrorSpec(401, "authentication_error", "authentication_error"),
    ErrorCode.MODEL_NOT_ALLOWED: _ErrorSpec(403, "permission_error", "permission_error"),
    ErrorCode.FORBIDDEN: _ErrorSpec(403, "permission_error", "permission_error"),
    ErrorCode.NOT_FOUND: _ErrorSpec(404, "not_found_error", "not_found_error"),
    ErrorCode.MODEL_NOT_FOUND: _ErrorSpec(404, "not_found_error", "not_found_error"),
    ErrorCode.PAYLOAD_TOO_LARGE: _ErrorSpec(413, "invalid_request_error", "request_too_large"),
    ErrorCode.RATE_LIMITED: _ErrorSpec(429, "rate_limit_error", "rate_limit_error"),
    ErrorCode.PROVIDER_ERROR: _ErrorSpec(502, "upstream_error", "api_error"),
    ErrorCode.RESPONSE_TOO_LARGE: _ErrorSpec(502, "upstream_error", "api_error"),
    ErrorCode.UNAVAILABLE: _ErrorSpec(503, "service_unavailable", "overloaded_error"),
    ErrorCode.INTERNAL: _ErrorSpec(500, "server_error", "api_error"),
    ErrorCode.GUARDRAIL_DENIED: _ErrorSpec(403, "permission_error", "permission_error"),
    ErrorCode.GUARDRAIL_LIMIT: _ErrorSpec(400, "invalid_request_error", "invalid_request_error"),
}


class GatewayError(Exception):
    """A failure the client is told about; `message` must be safe to show to anyone."""

    def __init__(
        self,
        code: ErrorCode,
        message: str,
        *,
        param: str | None = None,
        headers: tuple[tuple[str, str], ...] = (),
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.param = param
        self.headers = headers

    @property
    def status(self) -> int:
        return self.code.status

    def __repr__(self) -> str:
        return f"GatewayError({self.code.value!r}, {self.message!r})"


def error_body(error: GatewayError, dialect: Dialect) -> bytes:
    """Render `error` as the JSON body its client's SDK knows how to parse."""
    spec = error.code.spec
    if dialect is Dialect.ANTHROPIC:
        payload: dict[str, object] = {
            "type": "error",
            "error": {"type": spec.anthropic_type, "message": error.message},
        }
    else:
        payload = {
            "error": {
                "message": error.message,
                "type": spec.openai_type,
                "param": error.param,
                "code": error.code.value,
            }
        }
    return json.dumps(payload, separators=(",", ":")).encode()
