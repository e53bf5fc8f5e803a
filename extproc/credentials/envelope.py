"""Envelope encryption of provider secrets (DESIGN §3).

Each secret version is encrypted with its own random 256-bit data key (DEK) under
AES-256-GCM; the DEK is then wrapped by a KEK backend (`kek.py`). Records can therefore
sit in Redis or KV without the KEK, and KEK rotation only rewraps small DEKs.

The additional authenticated data (AAD) binds a ciphertext to its place: scope (global
or one tenant), provider, key id and version. The same bytes are the context the KEK
wraps the DEK under, so a record copied onto another tenant, provider, key or version
fails twice over instead of decrypting into the wrong place.

Errors form one tree: `EnvelopeError` (malformed or unusable record) and its subclass
`DecryptionFailed`. Messages name the record (`scope/provider/key_id@version`) and the
reason class, never secret bytes, ciphertext or wrapped keys.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import hmac
import json
import math
import os
import re
import time
from dataclasses import dataclass
from typing import Any, Final

from cryptography.exceptions import InvalidTag

from extproc.credentials.kek import (
    NONCE_BYTES,
    KekBackend,
    KekError,
    aes_gcm_decrypt,
    aes_gcm_encrypt,
)
from extproc.secrets import Secret

__all__ = [
    "DEK_BYTES",
    "FORMAT_VERSION",
    "DecryptionFailed",
    "EnvelopeError",
    "SealedSecret",
    "aad",
    "decrypt_payload",
    "encrypt_payload",
    "open_sealed",
    "rewrap_sealed",
    "seal",
]

FORMAT_VERSION: Final = 1
DEK_BYTES: Final = 32
_GCM_TAG_BYTES: Final = 16
_MAX_WRAPPED_DEK_BYTES: Final = 4096
_NAME_RE: Final = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
_FINGERPRINT_RE: Final = re.compile(r"^sha256:[0-9a-f]{12}$")
_JSON_FIELDS: Final = frozenset({
    "format", "scope", "provider", "key_id", "version", "kek_id", "wrapped_dek", "nonce",
    "ciphertext", "fingerprint", "created_at",
})


class EnvelopeError(Exception):
    """A sealed record is malformed or cannot be used; the message is safe to log."""


class DecryptionFailed(EnvelopeError):
    """A record did not open. `reason` is a short class for metrics and audit:
    `format`, `kek_mismatch`, `unwrap`, `dek`, `ciphertext`, `fingerprint`."""

    def __init__(self, message: str, *, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True, slots=True, kw_only=True)
class SealedSecret:
    """One encrypted provider-secret version, as stored (see `to_json`).

    Holds no plaintext: safe to cache, copy and store. `repr` shows only ids and the
    fingerprint, so a record in a log line leaks neither ciphertext nor wrapped DEK.
    """

    format_version: int = FORMAT_VERSION
    scope: str
    provider: str
    key_id: str
    version: int
    kek_id: str
    wrapped_dek: bytes
    nonce: bytes
    ciphertext: bytes
    fingerprint: str
    created_at: float

    def __post_init__(self) -> None:
        problem = _record_problem(self)
        if problem is not None:
            raise EnvelopeError(f"malformed record: {problem}")

    @property
    def label(self) -> str:
        """`scope/provider/key_id@version`: how messages and audit name this record."""
        return _label(self.scope, self.provider, self.key_id, self.version)

    def to_json(self) -> str:
        """Compact JSON with sorted keys; bytes as standard base64."""
        return json.dumps({
            "format": self.format_version,
            "scope": self.scope,
            "provider": self.provider,
            "key_id": self.key_id,
            "version": self.version,
            "kek_id": self.kek_id,
            "wrapped_dek": _b64encode(self.wrapped_dek),
            "nonce": _b64encode(self.nonce),
            "ciphertext": _b64encode(self.ciphertext),
            "fingerprint": self.fingerprint,
            "created_at": self.created_at,
        }, sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str | bytes) -> SealedSecret:
        """Parse a stored record, refusing anything but exactly the format-1 shape."""
        try:
            document = json.loads(text)
        except json.JSONDecodeError as exc:
            raise EnvelopeError(f"malformed record: not valid JSON (line {exc.lineno} "
                                f"column {exc.colno})") from None
        except UnicodeDecodeError:
            raise EnvelopeError("malformed record: not UTF-8") from None
        if not isinstance(document, dict):
            raise EnvelopeError("malformed record: not a JSON object")
        record_format = document.get("format")
        if type(record_format) is not int:
            raise EnvelopeError("malformed record: format is missing or not an integer")
        if record_format != FORMAT_VERSION:
            raise EnvelopeError(f"unsupported record format {record_format}; this gateway "
                                f"reads format {FORMAT_VERSION}")
        missing = sorted(_JSON_FIELDS - document.keys())
        unknown = sorted(document.keys() - _JSON_FIELDS)
        if missing:
            raise EnvelopeError(f"malformed record: missing fields {', '.join(missing)}")
        if unknown:
            raise EnvelopeError(f"malformed record: unknown fields {', '.join(unknown)}")
        created_at = document["created_at"]
        if type(created_at) not in (int, float):
            raise EnvelopeError("malformed record: created_at is not a number")
        for name in ("scope", "provider", "key_id", "kek_id", "fingerprint"):
            if not isinstance(document[name], str):
                raise EnvelopeError(f"malformed record: {name} is not a string")
        if type(document["version"]) is not int:
            raise EnvelopeError("malformed record: version is not an integer")
        return cls(
            format_version=record_format,
            scope=document["scope"],
            provider=document["provider"],
            key_id=document["key_id"],
            version=document["version"],
            kek_id=document["kek_id"],
            wrapped_dek=_b64decode(document, "wrapped_dek"),
            nonce=_b64decode(document, "nonce"),
            ciphertext=_b64decode(document, "ciphertext"),
            fingerprint=document["fingerprint"],
            created_at=float(created_at),
        )

    def __repr__(self) -> str:
        return (f"SealedSecret({self.label}, kek={self.kek_id}, "
                f"fingerprint={self.fingerprint})")


def aad(scope: str, provider: str, key_id: str, version: int) -> bytes:
    """The AAD of a record, also the context its DEK is wrapped under.

    Canonical JSON (sorted keys, no whitespace, ASCII escapes) is unambiguous: no two
    different (scope, provider, key_id, version) tuples encode to the same bytes. The
    purpose string and format version keep these bytes from meaning anything elsewhere.
    """
    _check_names(scope, provider, key_id, version)
    return json.dumps({
        "format": FORMAT_VERSION,
        "purpose": "asc-provider-secret",
        "scope": scope,
        "provider": provider,
        "key_id": key_id,
        "version": version,
    }, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode("ascii")


def encrypt_payload(dek: bytes, plaintext: bytes, aad: bytes) -> tuple[bytes, bytes]:
    """AES-256-GCM under a DEK with a fresh random nonce: `(nonce, ciphertext+tag)`.

    `seal` encrypts through here; exposed so the nonce-uniqueness test runs the exact
    production path without 100,000 KEK round trips.
    """
    if len(dek) != DEK_BYTES:
        raise EnvelopeError(f"a DEK must be {DEK_BYTES} bytes")
    return aes_gcm_encrypt(dek, plaintext, aad)


def decrypt_payload(dek: bytes, nonce: bytes, ciphertext: bytes, aad: bytes) -> bytes:
    """Inverse of `encrypt_payload`; raises `cryptography.exceptions.InvalidTag`."""
    return aes_gcm_decrypt(dek, nonce, ciphertext, aad)


async def seal(kek: KekBackend, *, scope: str, provider: str, key_id: str, version: int,
               secret: Secret, created_at: float | None = None) -> SealedSecret:
    """Encrypt one secret version under a fresh DEK and wrap the DEK with `kek`.

    Python cannot wipe memory; "the DEK is dropped" means no reference to it outlives
    this call. `KekError` from the backend propagates unchanged (its message is safe).
    """
    _check_names(scope, provider, key_id, version)
    plaintext = secret.reveal().encode("utf-8")
    if not plaintext:
        raise EnvelopeError(f"cannot seal {_label(scope, provider, key_id, version)}: "
                            "the secret is empty")
    context = aad(scope, provider, key_id, version)
    dek = os.urandom(DEK_BYTES)
    try:
        nonce, ciphertext = encrypt_payload(dek, plaintext, context)
        wrapped_dek = await kek.wrap(dek, context)
    finally:
        del dek, plaintext
    return SealedSecret(
        scope=scope, provider=provider, key_id=key_id, version=version, kek_id=kek.kek_id,
        wrapped_dek=wrapped_dek, nonce=nonce, ciphertext=ciphertext,
        fingerprint=secret.fingerprint(),
        created_at=time.time() if created_at is None else created_at,
    )


async def open_sealed(kek: KekBackend, record: SealedSecret) -> Secret:
    """Unwrap the DEK and decrypt; any failure is `DecryptionFailed` naming the record.

    When the KEK backend failed, its `KekError` is the `__cause__` (check `.transient`
    to tell "KMS unreachable" from "this record is refused").
    """
    label = record.label
    if record.format_version != FORMAT_VERSION:
        raise DecryptionFailed(f"cannot open {label}: unsupported record format "
                               f"{record.format_version}", reason="format")
    if record.kek_id != kek.kek_id:
        raise DecryptionFailed(f"cannot open {label}: sealed under KEK {record.kek_id}, "
                               f"but this gateway holds KEK {kek.kek_id}",
                               reason="kek_mismatch")
    context = aad(record.scope, record.provider, record.key_id, record.version)
    try:
        dek = await kek.unwrap(record.wrapped_dek, context)
    except KekError as exc:
        raise DecryptionFailed(f"cannot open {label}: DEK unwrap failed: {exc}",
                               reason="unwrap") from exc
    try:
        if len(dek) != DEK_BYTES:
            raise DecryptionFailed(f"cannot open {label}: unwrapped DEK has the wrong length",
                                   reason="dek")
        plaintext = decrypt_payload(dek, record.nonce, record.ciphertext, context)
    except InvalidTag:
        raise DecryptionFailed(f"cannot open {label}: ciphertext authentication failed "
                               "(tampered ciphertext or nonce, or record moved)",
                               reason="ciphertext") from None
    finally:
        del dek
    try:
        secret = Secret(plaintext.decode("utf-8"))
    except UnicodeDecodeError:
        raise DecryptionFailed(f"cannot open {label}: plaintext is not UTF-8",
                               reason="ciphertext") from None
    if not hmac.compare_digest(secret.fingerprint(), record.fingerprint):
        raise DecryptionFailed(f"cannot open {label}: fingerprint does not match the "
                               "decrypted secret", reason="fingerprint")
    return secret


async def rewrap_sealed(kek: KekBackend, record: SealedSecret) -> SealedSecret:
    """Move a record's DEK to the KEK's newest version (after a KEK rotation).

    Only `wrapped_dek` changes: ciphertext, nonce and fingerprint stay byte-identical,
    and with Transit the DEK never leaves the server. `KekError` propagates.
    """
    label = record.label
    if record.format_version != FORMAT_VERSION:
        raise EnvelopeError(f"cannot rewrap {label}: unsupported record format "
                            f"{record.format_version}")
    if record.kek_id != kek.kek_id:
        raise EnvelopeError(f"cannot rewrap {label}: sealed under KEK {record.kek_id}, "
                            f"not {kek.kek_id}")
    context = aad(record.scope, record.provider, record.key_id, record.version)
    wrapped_dek = await kek.rewrap(record.wrapped_dek, context)
    return dataclasses.replace(record, wrapped_dek=wrapped_dek)


def _label(scope: str, provider: str, key_id: str, version: int) -> str:
    return f"{scope}/{provider}/{key_id}@{version}"


def _scope_problem(scope: str) -> str | None:
    if scope == "global":
        return None
    if scope.startswith("tenant:") and _NAME_RE.match(scope.removeprefix("tenant:")):
        return None
    return "scope must be 'global' or 'tenant:<id>'"


def _names_problem(scope: object, provider: object, key_id: object,
                   version: object) -> str | None:
    if not isinstance(scope, str) or _scope_problem(scope) is not None:
        return "scope must be 'global' or 'tenant:<id>'"
    if not isinstance(provider, str) or not _NAME_RE.match(provider):
        return "provider is not a valid name"
    if not isinstance(key_id, str) or not _NAME_RE.match(key_id):
        return "key_id is not a valid name"
    if type(version) is not int or version < 1:
        return "version must be an integer >= 1"
    return None


def _check_names(scope: str, provider: str, key_id: str, version: int) -> None:
    problem = _names_problem(scope, provider, key_id, version)
    if problem is not None:
        raise EnvelopeError(f"invalid record name: {problem}")


def _record_problem(record: SealedSecret) -> str | None:
    if type(record.format_version) is not int or record.format_version < 1:
        return "format version must be an integer >= 1"
    problem = _names_problem(record.scope, record.provider, record.key_id, record.version)
    if problem is not None:
        return problem
    if (not isinstance(record.kek_id, str) or not 0 < len(record.kek_id) <= 256
            or not record.kek_id.isprintable()):
        return "kek_id is missing or not printable"
    if (not isinstance(record.wrapped_dek, bytes)
            or not 0 < len(record.wrapped_dek) <= _MAX_WRAPPED_DEK_BYTES):
        return "wrapped_dek is missing or too long"
    if not isinstance(record.nonce, bytes) or len(record.nonce) != NONCE_BYTES:
        return f"nonce must be {NONCE_BYTES} bytes"
    if not isinstance(record.ciphertext, bytes) or len(record.ciphertext) <= _GCM_TAG_BYTES:
        return "ciphertext is shorter than its authentication tag"
    if not isinstance(record.fingerprint, str) or not _FINGERPRINT_RE.match(record.fingerprint):
        return "fingerprint must look like sha256:<12 hex>"
    if (type(record.created_at) not in (int, float) or not math.isfinite(record.created_at)
            or record.created_at < 0):
        return "created_at must be a finite, non-negative number"
    return None


def _b64encode(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _b64decode(document: dict[str, Any], name: str) -> bytes:
    value = document[name]
    if not isinstance(value, str):
        raise EnvelopeError(f"malformed record: {name} is not a string")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise EnvelopeError(f"malformed record: {name} is not valid base64") from None
