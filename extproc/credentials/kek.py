"""Key-encryption keys (KEKs): what wraps the per-secret data keys of envelope encryption.

Provider secrets are sealed with their own random data key (DEK, see `envelope.py`);
only the DEK is handed to a KEK backend. Keeping the backend behind one small protocol
lets `make run` use a local key file while production keeps the KEK inside Vault or
OpenBao Transit, where it never leaves the server and can be rotated, versioned and
audited there.

Every failure surfaces as `KekError`, whose message is written here: the operation and
an HTTP status or exception type, never key material, tokens, ciphertext or server text.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import re
import stat
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Protocol

import hvac
import hvac.exceptions
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from extproc.backends import (
    HVAC_THREADS,
    describe_vault_failure,
    hvac_executor,
    run_blocking,
    vault_status,
)
from extproc.secrets import Secret

__all__ = [
    "KEK_BYTES",
    "NONCE_BYTES",
    "AppRoleAuth",
    "FileKek",
    "KekBackend",
    "KekError",
    "TokenAuth",
    "TransitKek",
    "aes_gcm_decrypt",
    "aes_gcm_encrypt",
    "init_kek_file",
]

KEK_BYTES: Final = 32
"""Worker threads per hvac client. Bounded and dedicated: a slow KMS ties up these, not
asyncio's default pool (which DNS lookups and other libraries share); with one in-flight
unwrap per key version (the keyring) a handful is plenty."""
NONCE_BYTES: Final = 12
_FILE_WRAP_FORMAT: Final = 1
_GCM_TAG_BYTES: Final = 16
_FILE_WRAP_HEADER: Final = bytes([_FILE_WRAP_FORMAT])
# Transit ciphertexts look like `vault:v3:<base64>`; OpenBao keeps the `vault:` prefix.
_TRANSIT_CIPHERTEXT_RE: Final = re.compile(r"^[a-z]+:v([0-9]{1,9}):[A-Za-z0-9+/]+={0,2}$")


class KekError(Exception):
    """A KEK operation failed. The message is safe to log and to show an operator.

    `operation` names what was attempted ("transit decrypt", "file KEK unwrap", ...),
    `status` is the HTTP status from Vault/OpenBao when there was one, and `transient`
    tells a cache whether the KMS looked unreachable or overloaded (keep serving cached
    keys) rather than refusing this particular request (fail now).
    """

    def __init__(self, message: str, *, operation: str, status: int | None = None,
                 transient: bool = False) -> None:
        super().__init__(message)
        self.operation = operation
        self.status = status
        self.transient = transient


class KekBackend(Protocol):
    """Wraps and unwraps data keys; the KEK itself never leaves the backend.

    `context` is authenticated (bound) but not encrypted: a DEK wrapped for one record
    does not unwrap under another record's context.
    """

    @property
    def kek_id(self) -> str:
        """A stable, non-secret name stored in records: `file:sha256:<12hex>`,
        `transit:<mount>/<key>`. Stable across KEK *versions* of one backend key."""
        ...

    async def wrap(self, dek: bytes, context: bytes) -> bytes: ...

    async def unwrap(self, wrapped: bytes, context: bytes) -> bytes: ...

    async def rewrap(self, wrapped: bytes, context: bytes) -> bytes:
        """The same DEK wrapped under the newest KEK version, ideally without exposing it."""
        ...

    async def close(self) -> None:
        """Let go of the backend's connections (a reload replaced it)."""
        ...


def aes_gcm_encrypt(key: bytes, plaintext: bytes, aad: bytes) -> tuple[bytes, bytes]:
    """AES-256-GCM with a fresh random 96-bit nonce; returns `(nonce, ciphertext+tag)`.

    The one encryption code path for both secret sealing and file-KEK wrapping, so the
    nonce-uniqueness test exercises exactly what production uses. Random nonces are safe
    here because each DEK encrypts one plaintext and each KEK wraps few DEKs (far below
    the 2^32 messages per key bound for random 96-bit nonces).
    """
    nonce = os.urandom(NONCE_BYTES)
    return nonce, AESGCM(key).encrypt(nonce, plaintext, aad)


def aes_gcm_decrypt(key: bytes, nonce: bytes, ciphertext: bytes, aad: bytes) -> bytes:
    """Inverse of `aes_gcm_encrypt`; raises `cryptography.exceptions.InvalidTag`."""
    return AESGCM(key).decrypt(nonce, ciphertext, aad)


# --- file KEK ------------------------------------------------------------------------------


def init_kek_file(path: str | os.PathLike[str]) -> Path:
    """Create a new random 32-byte KEK file with mode 0600; never overwrite one.

    The key is written to a private temporary file first and then hard-linked into
    place, so the KEK path either does not exist or holds a complete key (a crash never
    leaves a short file behind), and an existing KEK, which would orphan every record
    sealed under it, is refused rather than replaced.
    """
    target = Path(path)
    if target.exists() or target.is_symlink():
        raise KekError(f"KEK file {target} already exists; refusing to overwrite it",
                       operation="file KEK init")
    temporary = target.with_name(f".{target.name}.{os.getpid()}.{os.urandom(4).hex()}.tmp")
    try:
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    except OSError as exc:
        raise KekError(f"cannot create KEK file in {target.parent}: {exc.strerror}",
                       operation="file KEK init") from None
    try:
        try:
            os.fchmod(fd, 0o600)  # the umask may only narrow the mode; make it exact
            os.write(fd, os.urandom(KEK_BYTES))
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.link(temporary, target)
        except FileExistsError:
            raise KekError(f"KEK file {target} already exists; refusing to overwrite it",
                           operation="file KEK init") from None
        except OSError as exc:
            raise KekError(f"cannot create KEK file {target}: {exc.strerror}",
                           operation="file KEK init") from None
    finally:
        temporary.unlink(missing_ok=True)
    _fsync_directory(target.parent)
    return target


def _read_up_to(fd: int, limit: int) -> bytes:
    chunks: list[bytes] = []
    remaining = limit
    while remaining > 0:
        chunk = os.read(fd, remaining)
        if not chunk:
            break
        chunks.append(chunk)
        remaining -= len(chunk)
    return b"".join(chunks)


def _fsync_directory(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class FileKek:
    """A KEK held in a local 0600 file: the default for `make run` and single hosts.

    Anyone who can read the file can unwrap every DEK, so `load` refuses to start on a
    file that group or others can read or write, rather than warning and carrying on.
    """

    __slots__ = ("_key", "kek_id")

    def __init__(self, key: bytes) -> None:
        if len(key) != KEK_BYTES:
            raise KekError(f"a file KEK must be {KEK_BYTES} bytes, got {len(key)}",
                           operation="file KEK load")
        self._key = bytes(key)
        digest = hashlib.sha256(b"asc-kek-id\x00" + self._key).hexdigest()[:12]
        self.kek_id: str = f"file:sha256:{digest}"

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> FileKek:
        """Read a KEK file, checking mode and size on the opened file (no check/use race)."""
        kek_path = Path(path)
        try:
            fd = os.open(kek_path, os.O_RDONLY)
        except FileNotFoundError:
            raise KekError(f"KEK file {kek_path} does not exist (create it with "
                           "`extproc keys init-kek`)", operation="file KEK load") from None
        except OSError as exc:
            raise KekError(f"cannot open KEK file {kek_path}: {exc.strerror}",
                           operation="file KEK load") from None
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                raise KekError(f"KEK file {kek_path} is not a regular file",
                               operation="file KEK load")
            mode = stat.S_IMODE(info.st_mode)
            if mode & 0o077:
                raise KekError(f"KEK file {kek_path} has mode {mode:04o}; it must be 0600 "
                               f"(chmod 600 {kek_path})", operation="file KEK load")
            data = _read_up_to(fd, KEK_BYTES + 1)
        finally:
            os.close(fd)
        if len(data) != KEK_BYTES:
            raise KekError(f"KEK file {kek_path} must hold exactly {KEK_BYTES} bytes "
                           f"(found {'more' if len(data) > KEK_BYTES else len(data)}); "
                           "it is not a KEK created by `extproc keys init-kek`",
                           operation="file KEK load")
        return cls(data)

    async def wrap(self, dek: bytes, context: bytes) -> bytes:
        """`format(1) || nonce(12) || AES-256-GCM(dek)`, AAD = format byte || context."""
        nonce, sealed = aes_gcm_encrypt(self._key, dek, _FILE_WRAP_HEADER + context)
        return _FILE_WRAP_HEADER + nonce + sealed

    async def unwrap(self, wrapped: bytes, context: bytes) -> bytes:
        operation = "file KEK unwrap"
        if len(wrapped) < 1 + NONCE_BYTES + _GCM_TAG_BYTES:
            raise KekError(f"{operation} failed: wrapped DEK is truncated", operation=operation)
        if wrapped[0] != _FILE_WRAP_FORMAT:
            raise KekError(f"{operation} failed: unknown wrapped-DEK format {wrapped[0]}",
                           operation=operation)
        nonce, sealed = wrapped[1:1 + NONCE_BYTES], wrapped[1 + NONCE_BYTES:]
        try:
            return aes_gcm_decrypt(self._key, nonce, sealed, _FILE_WRAP_HEADER + context)
        except InvalidTag:
            raise KekError(f"{operation} failed: authentication failed (wrong KEK, wrong "
                           "context or tampered wrapped DEK)", operation=operation) from None

    async def rewrap(self, wrapped: bytes, context: bytes) -> bytes:
        """A file KEK has one version: re-wrapping just refreshes the nonce."""
        return await self.wrap(await self.unwrap(wrapped, context), context)

    async def close(self) -> None:
        """Nothing to let go of: the key is in memory."""

    def __repr__(self) -> str:
        return f"FileKek({self.kek_id})"


# --- Vault / OpenBao Transit ------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class TokenAuth:
    """A Vault/OpenBao token (periodic or long-lived), e.g. from a Vault Agent sink."""

    token: Secret


@dataclass(frozen=True, eq=False)
class AppRoleAuth:
    """AppRole credentials; the gateway logs in lazily and again when its token is refused."""

    role_id: str = field(repr=False)
    secret_id: Secret
    mount_point: str = "approle"


class TransitKek:
    """DEKs wrapped by a Vault/OpenBao Transit key; the KEK never leaves the server.

    The Transit key must be created with `derived=True`: derivation is what makes Transit
    honour a `context`, which binds each wrapped DEK to its record. Rotation happens in
    Transit (`transit/keys/<key>/rotate`); `rewrap` moves a wrapped DEK to the newest key
    version server-side, without the DEK being sent to us; once every record is rewrapped
    an operator raises `min_decryption_version` and older wrapped DEKs stop working.

    hvac is synchronous (requests), so every call runs on a small thread pool of this
    object's own (`hvac_executor`); the event loop that serves ext_proc streams never
    blocks on it, and a slow KMS cannot starve asyncio's shared default pool.
    """

    def __init__(self, url: str, key_name: str, *, auth: TokenAuth | AppRoleAuth,
                 mount_point: str = "transit", timeout: float = 5.0,
                 verify: bool | str = True, namespace: str | None = None,
                 threads: int = HVAC_THREADS) -> None:
        self._key_name = key_name
        self._mount_point = mount_point
        self._auth = auth
        self._url = url
        self.kek_id: str = f"transit:{mount_point}/{key_name}"
        token = auth.token.reveal() if isinstance(auth, TokenAuth) else None
        self._client: Any = hvac.Client(url=url, token=token, timeout=timeout, verify=verify,
                                        namespace=namespace)
        self._login_lock = threading.Lock()
        self._token_generation = 0  # bumped by each AppRole login
        self._executor = hvac_executor("transit", threads)

    async def wrap(self, dek: bytes, context: bytes) -> bytes:
        response = await self._call("encrypt", lambda client: client.secrets.transit.encrypt_data(
            self._key_name, plaintext=_b64(dek), context=_b64(context),
            mount_point=self._mount_point))
        return _response_field(response, "ciphertext", "encrypt").encode("ascii")

    async def unwrap(self, wrapped: bytes, context: bytes) -> bytes:
        ciphertext, key_version = _transit_ciphertext(wrapped, "decrypt")
        response = await self._call("decrypt", lambda client: client.secrets.transit.decrypt_data(
            self._key_name, ciphertext=ciphertext, context=_b64(context),
            mount_point=self._mount_point), key_version=key_version)
        try:
            return base64.b64decode(_response_field(response, "plaintext", "decrypt"),
                                    validate=True)
        except (binascii.Error, ValueError):
            raise KekError("transit decrypt failed: unexpected response",
                           operation="transit decrypt") from None

    async def rewrap(self, wrapped: bytes, context: bytes) -> bytes:
        ciphertext, key_version = _transit_ciphertext(wrapped, "rewrap")
        response = await self._call("rewrap", lambda client: client.secrets.transit.rewrap_data(
            self._key_name, ciphertext=ciphertext, context=_b64(context),
            mount_point=self._mount_point), key_version=key_version)
        return _response_field(response, "ciphertext", "rewrap").encode("ascii")

    async def verify_context_binding(self) -> None:
        """Fail unless the Transit key binds contexts, i.e. was created `derived=True`.

        A non-derived key silently ignores `context`: wrap and unwrap succeed under any
        context, so the KEK layer would stop binding DEKs to records (the payload AAD
        still does). Needs encrypt and decrypt rights, so `keys` commands run it, not the
        gateway. The probe DEK is random and thrown away.
        """
        probe = os.urandom(KEK_BYTES)
        wrapped = await self.wrap(probe, b"asc-context-probe:a")
        try:
            await self.unwrap(wrapped, b"asc-context-probe:b")
        except KekError as exc:
            if exc.status == 400:
                return
            raise
        raise KekError(f"transit key {self._mount_point}/{self._key_name} ignores the "
                       "context (it was not created with derived=true); recreate it derived",
                       operation="transit verify")

    async def close(self) -> None:
        """Close the HTTP session (its pooled connections) and the worker threads."""
        try:
            await run_blocking(self._executor, self._client.adapter.close)
        finally:
            self._executor.shutdown(wait=False)

    def __repr__(self) -> str:
        return f"TransitKek({self.kek_id} at {self._url})"

    async def _call(self, operation: str, request: Callable[[Any], Any], *,
                    key_version: int | None = None) -> Any:
        return await run_blocking(self._executor, self._call_blocking, operation, request,
                                  key_version)

    def _call_blocking(self, operation: str, request: Callable[[Any], Any],
                       key_version: int | None) -> Any:
        """Runs in a worker thread: (log in,) call, and on 403 log in again once."""
        approle = isinstance(self._auth, AppRoleAuth)
        if approle and self._token_generation == 0:
            self._login(stale_generation=0)
        generation = self._token_generation
        try:
            try:
                return request(self._client)
            except hvac.exceptions.Forbidden:
                if not approle:
                    raise
                # An expired or revoked AppRole token is refused with 403, like a denied
                # path; one fresh login tells the two apart.
                self._login(stale_generation=generation)
                return request(self._client)
        except hvac.exceptions.VaultError as exc:
            raise _vault_error(f"transit {operation}", exc, key_version) from None
        except OSError as exc:  # every requests exception is an OSError
            raise KekError(f"transit {operation} failed: {type(exc).__name__}",
                           operation=f"transit {operation}", transient=True) from None

    def _login(self, *, stale_generation: int) -> None:
        auth = self._auth
        assert isinstance(auth, AppRoleAuth)
        with self._login_lock:
            if self._token_generation != stale_generation:
                return  # another thread logged in while we waited
            try:
                self._client.auth.approle.login(role_id=auth.role_id,
                                                secret_id=auth.secret_id.reveal(),
                                                mount_point=auth.mount_point, use_token=True)
            except hvac.exceptions.VaultError as exc:
                raise _vault_error("approle login", exc, None) from None
            except OSError as exc:
                raise KekError(f"approle login failed: {type(exc).__name__}",
                               operation="approle login", transient=True) from None
            self._token_generation += 1


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _transit_ciphertext(wrapped: bytes, operation: str) -> tuple[str, int]:
    try:
        text = wrapped.decode("ascii")
    except UnicodeDecodeError:
        text = ""
    match = _TRANSIT_CIPHERTEXT_RE.match(text)
    if match is None:
        raise KekError(f"transit {operation} failed: wrapped DEK is not a Transit ciphertext",
                       operation=f"transit {operation}")
    return text, int(match.group(1))


def _response_field(response: Any, name: str, operation: str) -> str:
    try:
        value = response["data"][name]
    except (KeyError, TypeError):
        value = None
    if not isinstance(value, str):
        raise KekError(f"transit {operation} failed: unexpected response",
                       operation=f"transit {operation}")
    return value


def _vault_error(operation: str, exc: Exception, key_version: int | None) -> KekError:
    """Map an hvac error once: status plus a hint we wrote, never the server's text.

    The hints key off Vault/OpenBao Transit error strings ("... disallowed by policy (too
    old)", "cipher: message authentication failed"); if a server words them differently
    the message degrades to the bare status, which is still correct.
    """
    status = vault_status(exc)
    errors = " ".join(str(e) for e in (getattr(exc, "errors", None) or []))
    hint = ""
    if status == 400 and "too old" in errors:
        version = f"key version {key_version}" if key_version is not None else "a key version"
        hint = (f" (wrapped with {version}, below the key's min_decryption_version; "
                "records must be rewrapped before it is raised)")
    elif status == 400 and "message authentication failed" in errors:
        hint = " (authentication failed: wrong context, wrong key or tampered wrapped DEK)"
    elif status == 403:
        hint = " (permission denied)"
    elif status == 404:
        hint = " (no such key or mount)"
    return KekError(f"{operation} failed: {describe_vault_failure(exc)}{hint}", operation=operation,
                    status=status, transient=status is None or status == 429 or status >= 500)
