"""Opt-in text capture (`tenants.<id>.audit.capture: true`), sealed under the tenant's scope.

The request processor keeps the client's request body and the response it got (bounded
to `MAX_CAPTURE_BYTES` each) in a `Capture`; the record carries it unsealed only in
memory, on the writer's queue. The writer seals it before the record enters the chain
(`seal_capture`): a fresh 256-bit DEK, AES-256-GCM (extproc/credentials/envelope.py), the
DEK wrapped by the KEK backend with the context `{"purpose": "asc-audit-capture",
"scope": "tenant:<id>", "request_id": ...}`. With a Transit KEK using derived keys the
context selects a per-tenant key. Only a holder of the KEK can open it (`open_capture`,
`extproc audit unseal`); the record, the chain and the files hold ciphertext only.
"""

from __future__ import annotations

import base64
import json
import os
from dataclasses import dataclass, field
from typing import Any, Final

from extproc.credentials.envelope import DEK_BYTES, decrypt_payload, encrypt_payload
from extproc.credentials.kek import KekBackend

__all__ = ["MAX_CAPTURE_BYTES", "Capture", "CaptureError", "open_capture", "seal_capture"]

MAX_CAPTURE_BYTES: Final = 256 * 1024
"""Per direction; longer text is cut and marked `truncated`."""


class CaptureError(Exception):
    """A sealed capture cannot be opened (wrong KEK, moved to another record, edited)."""


@dataclass(slots=True)
class Capture:
    """The text of one request, while it runs (never logged, never in repr)."""

    tenant: str
    request: bytes = field(default=b"", repr=False)
    response: bytearray = field(default_factory=bytearray, repr=False)
    truncated: bool = False

    def keep_request(self, body: bytes) -> None:
        self.request = body[:MAX_CAPTURE_BYTES]
        self.truncated = self.truncated or len(body) > MAX_CAPTURE_BYTES

    def keep_response(self, chunk: bytes) -> None:
        room = MAX_CAPTURE_BYTES - len(self.response)
        if len(chunk) > room:
            self.truncated = True
        self.response += chunk[:max(0, room)]


def _context(tenant: str, request_id: str) -> bytes:
    return json.dumps({"purpose": "asc-audit-capture", "scope": f"tenant:{tenant}",
                       "request_id": request_id}, sort_keys=True, separators=(",", ":"),
                      ensure_ascii=True).encode("ascii")


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


async def seal_capture(kek: KekBackend, capture: Capture, request_id: str) -> dict[str, Any]:
    """The record's `capture` field: ciphertext and the wrapped DEK, nothing readable."""
    plaintext = json.dumps({
        "request": capture.request.decode("utf-8", "replace"),
        "response": bytes(capture.response).decode("utf-8", "replace"),
        "truncated": capture.truncated,
    }, ensure_ascii=False).encode("utf-8")
    context = _context(capture.tenant, request_id)
    dek = os.urandom(DEK_BYTES)
    try:
        nonce, ciphertext = encrypt_payload(dek, plaintext, context)
        wrapped = await kek.wrap(dek, context)
    finally:
        del dek, plaintext
    return {"scope": f"tenant:{capture.tenant}", "kek_id": kek.kek_id,
            "wrapped_dek": _b64(wrapped), "nonce": _b64(nonce), "ciphertext": _b64(ciphertext)}


async def open_capture(kek: KekBackend, record: dict[str, Any]) -> dict[str, Any]:
    """The captured text of `record` (request, response, truncated), for a KEK holder."""
    sealed = record.get("capture")
    if not isinstance(sealed, dict) or "ciphertext" not in sealed:
        raise CaptureError(f"record {record.get('request_id')} has no sealed capture")
    scope = str(sealed.get("scope", ""))
    if not scope.startswith("tenant:") or scope != f"tenant:{record.get('tenant')}":
        raise CaptureError("the capture's scope does not match the record's tenant")
    if sealed.get("kek_id") != kek.kek_id:
        raise CaptureError(f"sealed under KEK {sealed.get('kek_id')}, not {kek.kek_id}")
    context = _context(scope.removeprefix("tenant:"), str(record.get("request_id")))
    try:
        dek = await kek.unwrap(base64.b64decode(sealed["wrapped_dek"]), context)
        plaintext = decrypt_payload(dek, base64.b64decode(sealed["nonce"]),
                                    base64.b64decode(sealed["ciphertext"]), context)
    except Exception as exc:
        raise CaptureError(f"cannot open the capture of {record.get('request_id')}: "
                           f"{type(exc).__name__}") from None
    opened: dict[str, Any] = json.loads(plaintext)
    return opened
