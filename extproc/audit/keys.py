"""Chain HMAC keys: random 256-bit keys, wrapped by the KEK backend (or kept locally).

Decision 0080: one random key per key id, wrapped with the same KEK backend that wraps
provider-key DEKs (file KEK: AES-GCM; Transit: `encrypt` with a context), stored as
`<dir>/keys/<kid>.json`. The KEK is used once per writer start or rotation, never per
record: the hot path only runs HMAC-SHA256 in memory. Rotation = a new key file; a writer
takes the newest at start and at each checkpoint. Verifying MACs needs the KEK (to unwrap):
the people who can check MACs are those who hold the KEK, which is also why a `local` key
(a 0600 file beside the log, for setups without a KEK) proves much less (docs/audit.md).
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import time
from pathlib import Path
from typing import Final

from extproc.audit.chain import HmacKey
from extproc.credentials.kek import KekBackend

__all__ = ["create_key", "key_dir", "load_keys", "newest_key"]

_CONTEXT: Final = b"asc-audit-hmac:"


def key_dir(audit_dir: Path) -> Path:
    return audit_dir / "keys"


def _context(kid: str) -> bytes:
    return _CONTEXT + kid.encode("ascii")


async def create_key(audit_dir: Path, kek: KekBackend | None) -> HmacKey:
    """A new chain key: wrapped by `kek` when given, else a local 0600 file."""
    directory = key_dir(audit_dir)
    directory.mkdir(parents=True, exist_ok=True)
    created = time.time_ns()
    kid = f"k{created // 1_000_000_000}-{secrets.token_hex(3)}"
    key = secrets.token_bytes(32)
    document: dict[str, object] = {"kid": kid, "created_ns": created}
    if kek is not None:
        document.update(source="kek", kek_id=kek.kek_id,
                        wrapped=base64.b64encode(await kek.wrap(key, _context(kid))).decode())
    else:
        document.update(source="local", key=base64.b64encode(key).decode())
    path = directory / f"{kid}.json"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as out:
        json.dump(document, out)
        out.flush()
        os.fsync(out.fileno())
    return HmacKey(kid, key)


def _documents(audit_dir: Path) -> list[dict[str, object]]:
    directory = key_dir(audit_dir)
    if not directory.is_dir():
        return []
    documents = [json.loads(p.read_text(encoding="utf-8")) for p in directory.glob("*.json")]
    return sorted(documents, key=lambda d: (int(str(d.get("created_ns", 0))), str(d["kid"])))


async def _unwrap(document: dict[str, object], kek: KekBackend | None) -> HmacKey:
    kid = str(document["kid"])
    if document.get("source") == "local":
        return HmacKey(kid, base64.b64decode(str(document["key"])))
    if kek is None:
        raise LookupError(f"audit key {kid} is wrapped by a KEK; none is configured")
    wrapped = base64.b64decode(str(document["wrapped"]))
    return HmacKey(kid, await kek.unwrap(wrapped, _context(kid)))


async def newest_key(audit_dir: Path, kek: KekBackend | None) -> HmacKey | None:
    """The most recent key of `audit_dir`, or None when there is none yet."""
    documents = _documents(audit_dir)
    if not documents:
        return None
    return await _unwrap(documents[-1], kek)


async def load_keys(audit_dir: Path, kek: KekBackend | None) -> dict[str, bytes]:
    """Every key of `audit_dir` that can be opened with `kek` (for verification)."""
    keys: dict[str, bytes] = {}
    for document in _documents(audit_dir):
        try:
            key = await _unwrap(document, kek)
        except LookupError:
            continue
        keys[key.kid] = key.key
    return keys
