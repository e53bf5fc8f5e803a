"""The tamper-evidence chain of one writer: sequence numbers, HMACs, signed checkpoints.

Every entry a writer emits is one JSON object (one JSONL line). A *record* carries
`writer`, `seq` (1, 2, ... without gaps), `kid` (the HMAC key id), `prev` (the MAC of the
writer's previous record, "" for the first) and `mac` = HMAC-SHA256(key[kid], canonical
bytes of the entry without `mac`). Because `prev` is inside the MACed bytes, each MAC
covers the record and, through `prev`, every record before it.

A *checkpoint* pins the chain head: the last `seq`, its MAC (`head`) and `digest`, a
SHA-256 accumulator over every record's canonical bytes and MAC since the writer started.
It is signed with Ed25519 (`sig`, by the key whose fingerprint is `signer`). The digest is
what lets an auditor holding only the public key check content: an edited, removed,
inserted or reordered record changes the digest the next checkpoint signed. The HMAC
additionally pins each record on its own (and the ones after the last checkpoint) for a
holder of the HMAC key. The writer's last entry is a checkpoint with `final: true`:
without it the log was cut short (or the writer died; see docs/audit.md).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import secrets
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import orjson
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

__all__ = [
    "CHAIN_FIELDS",
    "Chain",
    "HmacKey",
    "SigningKey",
    "canonical",
    "fingerprint",
    "genesis_digest",
    "load_public_keys",
    "new_writer_id",
    "next_digest",
    "record_mac",
    "verify_checkpoint_signature",
]

CHAIN_FIELDS: Final = ("type", "writer", "seq", "kid", "prev", "mac")
"""Fields the chain adds to a record (never set by `record_from`)."""
_PUBLIC_PEM_MARK: Final = b"-----BEGIN PUBLIC KEY-----"


class Sealed(dict[str, Any]):
    """A record as the chain sealed it, with its JSONL line already made from the bytes
    its MAC covers (one serialization per record instead of two)."""

    __slots__ = ("line",)

    def __init__(self, entry: dict[str, Any], line: bytes) -> None:
        super().__init__(entry)
        self.line = line


_CANONICAL: Final = json.JSONEncoder(sort_keys=True, separators=(",", ":"),
                                     ensure_ascii=False)
"""The canonical form: `json.dumps(..., sort_keys=True, separators=(",", ":"),
ensure_ascii=False)` in UTF-8. Every MAC and signature since the first log covers these
bytes, so they never change (old logs must verify)."""


def _small_float(text: bytes) -> bool:
    """True when orjson may have written a float under 1e-4 (`0.00007`, `6.75e-9`) that the
    canonical form writes as `7e-05`, `6.75e-09`: the only floats orjson writes differently
    (measured over two million random doubles, tests/unit/test_audit_chain.py). A string
    that looks like one costs the slower encoder, never a different byte. Plain searches:
    a regular expression here cost more than orjson saves."""
    if b"0.0000" in text:
        return True
    at = text.find(b"e-")
    while at != -1:
        if text[at - 1:at].isdigit() and text[at + 2:at + 3].isdigit():
            return True
        at = text.find(b"e-", at + 2)
    return False


def canonical(entry: dict[str, Any], *, without: str) -> bytes:
    """The bytes a MAC or signature covers: sorted keys, no spaces, UTF-8, less `without`.

    orjson writes the same bytes as the canonical encoder in a third of the time (about
    1.3 against 3.9 µs for a fast-path record, bench/RESULTS.md): the same escapes, the
    same shortest float digits, keys sorted by code point. Where it could differ - a float
    under 1e-4, an integer beyond 64 bits, a key that is no string - the canonical encoder
    writes the entry. A NaN or infinity, which no record holds, orjson would write as null
    (the canonical encoder writes no valid JSON for them)."""
    body = {k: v for k, v in entry.items() if k != without} if without in entry else entry
    try:
        fast = orjson.dumps(body, option=orjson.OPT_SORT_KEYS)
    except TypeError:
        fast = b""
    if fast and not _small_float(fast):
        return fast
    return _CANONICAL.encode(body).encode("utf-8")


def record_mac(key: bytes, entry: dict[str, Any]) -> str:
    return hmac.new(key, canonical(entry, without="mac"), hashlib.sha256).hexdigest()


def genesis_digest(writer: str) -> str:
    return hashlib.sha256(b"asc-audit-v1|" + writer.encode("utf-8")).hexdigest()


def next_digest(digest: str, entry: dict[str, Any], body: bytes | None = None) -> str:
    """The accumulator after `entry` (a record with its `mac`); `body` is its canonical
    bytes when the caller has them already."""
    h = hashlib.sha256(bytes.fromhex(digest))
    h.update(canonical(entry, without="mac") if body is None else body)
    h.update(str(entry.get("mac", "")).encode("ascii", "replace"))
    return h.hexdigest()


def new_writer_id() -> str:
    """host-pid-nonce: unique per process start, so a restart begins a new segment."""
    host = socket.gethostname().replace(" ", "_")[:64] or "host"
    return f"{host}-{os.getpid()}-{secrets.token_hex(4)}"


@dataclass(frozen=True, slots=True)
class HmacKey:
    """One chain key; `kid` goes into every record it MACs."""

    kid: str
    key: bytes = field(repr=False)

    def __repr__(self) -> str:
        return f"HmacKey({self.kid}, ***)"


def fingerprint(public: Ed25519PublicKey) -> str:
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return "ed25519:" + hashlib.sha256(raw).hexdigest()[:16]


class SigningKey:
    """The Ed25519 key that signs checkpoints (a PEM file, mode 0600)."""

    def __init__(self, private: Ed25519PrivateKey) -> None:
        self._private = private
        self.public = private.public_key()
        self.fingerprint = fingerprint(self.public)

    @classmethod
    def load_or_create(cls, path: Path) -> SigningKey:
        """Load `path`; create it (0600) when it does not exist yet."""
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            private = Ed25519PrivateKey.generate()
            pem = private.private_bytes(serialization.Encoding.PEM,
                                        serialization.PrivateFormat.PKCS8,
                                        serialization.NoEncryption())
            # Written whole under a temporary name, then linked: workers starting together
            # all end up with the one key that won, never a half-written file.
            temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
            fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "wb") as out:
                out.write(pem)
                out.flush()
                os.fsync(out.fileno())
            try:
                os.link(temporary, path)
            except FileExistsError:
                pass  # another worker's key won
            finally:
                temporary.unlink()
        if path.stat().st_mode & 0o077:
            raise ValueError(f"{path}: the audit signing key must be readable by its owner "
                             "only (chmod 600)")
        loaded = serialization.load_pem_private_key(path.read_bytes(), password=None)
        if not isinstance(loaded, Ed25519PrivateKey):
            raise ValueError(f"{path}: not an Ed25519 private key")
        return cls(loaded)

    def public_pem(self) -> bytes:
        return self.public.public_bytes(serialization.Encoding.PEM,
                                        serialization.PublicFormat.SubjectPublicKeyInfo)

    def publish(self, path: Path) -> None:
        """Add this public key to `path` (a PEM bundle: older keys stay verifiable)."""
        pem = self.public_pem()
        existing = path.read_bytes() if path.exists() else b""
        if pem in existing:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(existing + pem)

    def sign(self, entry: dict[str, Any]) -> str:
        return base64.b64encode(self._private.sign(canonical(entry, without="sig"))).decode()

    def __repr__(self) -> str:
        return f"SigningKey({self.fingerprint})"


def load_public_keys(*paths: Path) -> dict[str, Ed25519PublicKey]:
    """Public keys by fingerprint from PEM bundles (`extproc audit pubkey` output)."""
    keys: dict[str, Ed25519PublicKey] = {}
    for path in paths:
        data = path.read_bytes()
        for part in data.split(_PUBLIC_PEM_MARK)[1:]:
            loaded = serialization.load_pem_public_key(_PUBLIC_PEM_MARK + part)
            if isinstance(loaded, Ed25519PublicKey):
                keys[fingerprint(loaded)] = loaded
    return keys


def verify_checkpoint_signature(entry: dict[str, Any],
                                keys: dict[str, Ed25519PublicKey]) -> str | None:
    """None when `entry` is signed by one of `keys`, else why not."""
    public = keys.get(str(entry.get("signer")))
    if public is None:
        return f"signed by unknown key {entry.get('signer')!r}"
    try:
        public.verify(base64.b64decode(str(entry.get("sig", ""))),
                      canonical(entry, without="sig"))
    except Exception:
        return "bad checkpoint signature"
    return None


class Chain:
    """One writer's chain state: seals records, makes checkpoints. Not thread-safe: the
    writer task is its only user."""

    def __init__(self, key: HmacKey, signer: SigningKey, writer: str | None = None,
                 clock_ns: Any = time.time_ns) -> None:
        self.writer = writer or new_writer_id()
        self.key = key
        self._signer = signer
        self._clock_ns = clock_ns
        self.seq = 0
        self.head = ""
        self.digest = genesis_digest(self.writer)
        self.since_checkpoint = 0

    def rotate(self, key: HmacKey) -> None:
        """Records from now on carry `key.kid` (verifiers need both keys)."""
        self.key = key

    def seal(self, record: dict[str, Any]) -> dict[str, Any]:
        """`record` as the next entry of the chain (a new dict; the input is unchanged)."""
        self.seq += 1
        entry = Sealed(record, b"")  # the one copy of the record
        entry.update(type="record", writer=self.writer, seq=self.seq, kid=self.key.kid,
                     prev=self.head)
        entry.pop("mac", None)
        body = canonical(entry, without="mac")
        mac = hmac.digest(self.key.key, body, "sha256").hex()
        entry["mac"] = mac
        self.head = mac
        self.digest = next_digest(self.digest, entry, body)
        self.since_checkpoint += 1
        # The canonical object with the MAC as its last member: a valid line of the log
        # (readers parse it; key order carries no meaning).
        entry.line = b"".join((body[:-1], b',"mac":"', mac.encode("ascii"), b'"}\n'))
        return entry

    def checkpoint(self, *, final: bool = False) -> dict[str, Any]:
        entry: dict[str, Any] = {
            "type": "checkpoint", "writer": self.writer, "seq": self.seq, "head": self.head,
            "digest": self.digest, "time_ns": self._clock_ns(), "final": final,
            "signer": self._signer.fingerprint,
        }
        entry["sig"] = self._signer.sign(entry)
        self.since_checkpoint = 0
        return entry
