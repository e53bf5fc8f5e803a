"""Envelope-encrypted provider keys: the key store, and the in-process keyring cache.

`KeyStore` keeps, per credential (scope + id), its lifecycle `KeyState` and version
counter in Redis, and publishes every change on one pub/sub channel. The sealed versions
themselves sit behind a small `RecordStore`: `RedisRecords` (the default, next to the
state) or `VaultKvRecords` (Vault/OpenBao KV v2). `Keyring` answers "which key goes on
this request" from memory:

* the state (which version is active / canary) is cached for `state_ttl_s` and dropped at
  once when a change is published, so every replica follows a rotation within about a
  second, and within `state_ttl_s` even if a pub/sub message is lost;
* a decrypted key is cached for `cache_ttl_s`; after that it is unwrapped again, once per
  key version however many requests miss at the same moment (single flight). When the
  KMS (or Redis) is down the cached key keeps serving until `max_age_s` after its last
  successful unwrap, then requests fail closed (503);
* a revoked version is dropped from the cache and never returned again;
* provider 401/403 answers to a canary version count towards an automatic rollback.

The plaintext exists only here, in memory, inside `Secret`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any, Final, Protocol

import hvac
import hvac.exceptions
from redis import exceptions as redis_errors

from extproc import metrics
from extproc.backends import (
    HVAC_THREADS,
    REDIS_FAILURES,
    describe_redis_failure,
    describe_vault_failure,
    hvac_executor,
    run_blocking,
    vault_status,
)
from extproc.credentials.envelope import EnvelopeError, SealedSecret, open_sealed, seal
from extproc.credentials.kek import KekBackend, KekError, TokenAuth
from extproc.credentials.rotation import (
    KeyState,
    RotationError,
    choose_version,
    rollback,
    stage,
)
from extproc.credentials.static import ResolvedCredential
from extproc.logs import log_event
from extproc.secrets import Secret, SecretUnavailable
from extproc.singleflight import SingleFlight

__all__ = [
    "CHANGES_CHANNEL",
    "KeyStore",
    "Keyring",
    "RecordStore",
    "RedisRecords",
    "StoreUnavailable",
    "VaultKvRecords",
    "listen_for_changes",
]

CHANGES_CHANNEL: Final = "asc:cred:changes"
log = logging.getLogger("extproc.credentials")


async def listen_for_changes(client: Any, on_change: Callable[[str, str], None]) -> None:
    """Call `on_change(scope, credential)` for every published key change (runs forever).

    Reconnects after a second on Redis errors; the keyring's `state_ttl_s` bounds how stale
    a replica can be meanwhile. (Redis Cluster's asyncio client has no pub/sub: there the
    state TTL alone bounds propagation.)
    """
    while True:
        pubsub = client.pubsub()
        try:
            await pubsub.subscribe(CHANGES_CHANNEL)
            async for message in pubsub.listen():
                if message.get("type") != "message":
                    continue
                data = message["data"]
                text = data.decode() if isinstance(data, bytes) else str(data)
                scope, _, credential = text.rpartition("/")
                on_change(scope, credential)
        except REDIS_FAILURES:
            await asyncio.sleep(1.0)
        finally:  # cancelled too (a reload moved to another Redis): its connection goes
            await pubsub.aclose()


class StoreUnavailable(Exception):
    """Redis or the record store could not be reached (or refused us); safe to log.

    Messages name the operation and an HTTP status or exception type, never a URL, a
    token or record contents.
    """


def _base(scope: str, credential: str) -> str:
    # One hash tag per credential: its versions and state live in one cluster slot.
    return f"asc:cred:{{{scope}/{credential}}}"


async def _redis_call(awaitable: Any) -> Any:
    try:
        return await awaitable
    except REDIS_FAILURES as exc:
        raise StoreUnavailable(describe_redis_failure(exc)) from None


class RecordStore(Protocol):
    """Where sealed records (`SealedSecret`) live. They hold no plaintext and no DEK."""

    async def get(self, scope: str, credential: str, version: int) -> SealedSecret | None:
        """The record of one version, or None when there is none."""
        ...

    async def put(self, record: SealedSecret) -> None:
        """Create or replace the record at its own (scope, key_id, version)."""
        ...

    async def all(self, scope: str, credential: str) -> list[SealedSecret]:
        """Every stored version of a credential, oldest version first."""
        ...

    async def close(self) -> None: ...


class RedisRecords:
    """Sealed records in a Redis hash per credential: `asc:cred:{<scope>/<cred>}:versions`."""

    def __init__(self, client: Any) -> None:
        self._client = client

    async def get(self, scope: str, credential: str, version: int) -> SealedSecret | None:
        raw = await _redis_call(
            self._client.hget(f"{_base(scope, credential)}:versions", str(version)))
        return None if raw is None else SealedSecret.from_json(raw)

    async def put(self, record: SealedSecret) -> None:
        key = f"{_base(record.scope, record.key_id)}:versions"
        await _redis_call(self._client.hset(key, str(record.version), record.to_json()))

    async def all(self, scope: str, credential: str) -> list[SealedSecret]:
        raw = await _redis_call(self._client.hgetall(f"{_base(scope, credential)}:versions"))
        return sorted((SealedSecret.from_json(v) for v in raw.values()), key=lambda r: r.version)

    async def close(self) -> None:
        """Nothing to do: the Redis client belongs to the `KeyStore`."""

    def __repr__(self) -> str:
        return "RedisRecords()"


_KV_SEGMENT: Final = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$")
_KV_VERSION: Final = re.compile(r"^v([1-9][0-9]{0,17})$")


class VaultKvRecords:
    """Sealed records in Vault/OpenBao KV v2, one secret per version.

    A record lives at `<mount>/data/<prefix>/<scope>/<credential>/v<version>` as
    `{"record": <SealedSecret JSON>}`; versions are listed through KV metadata. KV's own
    secret versioning keeps the history of each record (rewraps replace the value).

    hvac is synchronous (requests): every call runs on a small thread pool of this object's
    own, so the event loop never blocks on it and asyncio's default pool stays free.
    Every failure is mapped once, here, to `StoreUnavailable` naming the operation and the
    HTTP status or exception type.
    """

    def __init__(self, url: str, *, auth: TokenAuth, mount: str = "secret",
                 prefix: str = "asc", timeout: float = 5.0, verify: bool | str = True,
                 namespace: str | None = None, threads: int = HVAC_THREADS) -> None:
        self._mount = mount
        self._prefix = prefix.strip("/")
        self._client: Any = hvac.Client(url=url, token=auth.token.reveal(), timeout=timeout,
                                        verify=verify, namespace=namespace)
        self._executor = hvac_executor("vault-kv", threads)

    async def get(self, scope: str, credential: str, version: int) -> SealedSecret | None:
        path = f"{self._folder(scope, credential)}/v{int(version)}"
        response = await self._call("read", lambda client: client.secrets.kv.v2
                                    .read_secret_version(path=path, mount_point=self._mount,
                                                         raise_on_deleted_version=True))
        return None if response is None else _kv_record(response, scope, credential)

    async def put(self, record: SealedSecret) -> None:
        path = f"{self._folder(record.scope, record.key_id)}/v{record.version}"
        document = {"record": record.to_json()}
        await self._call("write", lambda client: client.secrets.kv.v2.create_or_update_secret(
            path=path, secret=document, mount_point=self._mount), missing_ok=False)

    async def all(self, scope: str, credential: str) -> list[SealedSecret]:
        folder = self._folder(scope, credential)
        response = await self._call("list", lambda client: client.secrets.kv.v2.list_secrets(
            path=folder, mount_point=self._mount))
        versions: list[int] = []
        for key in _kv_keys(response):
            match = _KV_VERSION.match(key)
            if match is not None:  # anything else (a sub-folder, a stray key) is not ours
                versions.append(int(match.group(1)))
        records = []
        for version in sorted(versions):
            record = await self.get(scope, credential, version)
            if record is not None:  # deleted between list and read
                records.append(record)
        return records

    async def close(self) -> None:
        """Close the HTTP session (its pooled connections) and the worker threads."""
        try:
            await run_blocking(self._executor, self._client.adapter.close)
        finally:
            self._executor.shutdown(wait=False)

    def __repr__(self) -> str:
        return f"VaultKvRecords({self._mount}/{self._prefix})"

    def _folder(self, scope: str, credential: str) -> str:
        # Scope and credential come from validated config, but a path is built from them:
        # refuse anything that could climb out of or past the credential's folder.
        if not (_KV_SEGMENT.match(scope) and _KV_SEGMENT.match(credential)):
            raise StoreUnavailable("vault kv: invalid scope or credential name")
        return f"{self._prefix}/{scope}/{credential}" if self._prefix else f"{scope}/{credential}"

    async def _call(self, operation: str, request: Callable[[Any], Any], *,
                    missing_ok: bool = True) -> Any:
        return await run_blocking(self._executor, self._call_blocking, operation, request,
                                  missing_ok)

    def _call_blocking(self, operation: str, request: Callable[[Any], Any],
                       missing_ok: bool) -> Any:
        """Runs in a worker thread. A 404 without error text is "no such secret": None."""
        try:
            return request(self._client)
        except hvac.exceptions.InvalidPath as exc:
            if missing_ok and not exc.errors:
                return None
            raise StoreUnavailable(f"vault kv {operation} failed: HTTP 404 (no such mount "
                                   "or path)") from None
        except hvac.exceptions.VaultError as exc:
            hint = {401: " (token refused)", 403: " (permission denied)"}.get(
                vault_status(exc) or 0, "")
            raise StoreUnavailable(f"vault kv {operation} failed: "
                                   f"{describe_vault_failure(exc)}{hint}") from None
        except OSError as exc:  # every requests exception is an OSError
            raise StoreUnavailable(f"vault kv {operation} failed: "
                                   f"{type(exc).__name__}") from None


def _kv_keys(response: Any) -> list[str]:
    """The key names of a KV metadata LIST answer (None: nothing stored there)."""
    try:
        keys = response["data"]["keys"]
    except (KeyError, TypeError):
        return []
    return [key for key in keys if isinstance(key, str)] if isinstance(keys, list) else []


def _kv_record(response: Any, scope: str, credential: str) -> SealedSecret:
    try:
        text = response["data"]["data"]["record"]
    except (KeyError, TypeError):
        text = None
    if not isinstance(text, str):
        raise EnvelopeError(f"malformed record in KV for {scope}/{credential}: no "
                            "'record' string")
    return SealedSecret.from_json(text)


class KeyStore:
    """Lifecycle state, version counter and change feed in Redis; records in a `RecordStore`."""

    def __init__(self, client: Any, records: RecordStore | None = None) -> None:
        self._client = client
        self._records: RecordStore = RedisRecords(client) if records is None else records

    @property
    def record_store(self) -> RecordStore:
        return self._records

    async def close(self) -> None:
        try:
            await self._client.aclose()
        finally:
            await self._records.close()

    async def aclose(self) -> None:
        """`close` under the name Redis clients use (so callers can close either)."""
        await self.close()

    async def state(self, scope: str, credential: str) -> KeyState:
        raw = await self._call(self._client.hget(f"{_base(scope, credential)}:state", "state"))
        return _state_from_json(raw)

    async def record(self, scope: str, credential: str, version: int) -> SealedSecret | None:
        record = await self._records.get(scope, credential, version)
        if record is not None and (record.scope, record.key_id, record.version) != (
                scope, credential, version):
            # The AAD binds a record to its own names, not to where it is stored: a record
            # copied to another version's slot would open, as that other version.
            raise EnvelopeError(f"record stored as {scope}/{credential}@{version} is "
                                f"{record.label}")
        return record

    async def records(self, scope: str, credential: str) -> list[SealedSecret]:
        return await self._records.all(scope, credential)

    async def next_version(self, scope: str, credential: str) -> int:
        return int(await self._call(
            self._client.hincrby(f"{_base(scope, credential)}:meta", "next_version", 1)))

    async def put_record(self, record: SealedSecret) -> None:
        await self._records.put(record)

    async def transition(self, scope: str, credential: str,
                         change: Callable[[KeyState], KeyState]) -> KeyState:
        """Apply `change` atomically (optimistic: retried when another writer raced us)."""
        key = f"{_base(scope, credential)}:state"
        for _ in range(20):
            try:
                async with self._client.pipeline(transaction=True) as pipe:
                    await pipe.watch(key)
                    current = _state_from_json(await pipe.hget(key, "state"))
                    new = change(current)
                    pipe.multi()
                    pipe.hset(key, "state", json.dumps(asdict(new), sort_keys=True))
                    await pipe.execute()
            except redis_errors.WatchError:
                continue
            except REDIS_FAILURES as exc:
                raise StoreUnavailable(describe_redis_failure(exc)) from None
            await self.publish(scope, credential)
            return new
        raise StoreUnavailable("redis: too much contention on the key state")

    async def publish(self, scope: str, credential: str) -> None:
        await self._call(self._client.publish(CHANGES_CHANNEL, f"{scope}/{credential}"))

    async def _call(self, awaitable: Any) -> Any:
        return await _redis_call(awaitable)


def _outage(exc: Exception) -> bool:
    """A KMS or store that cannot be reached, as opposed to a record that is wrong.

    Only an outage may be bridged with a cached key; a tampered record, a wrong KEK or a
    refused unwrap must stop the key at once.
    """
    if isinstance(exc, StoreUnavailable):
        return True
    kek_error = exc if isinstance(exc, KekError) else exc.__cause__
    return isinstance(kek_error, KekError) and kek_error.transient


def _state_from_json(raw: str | bytes | None) -> KeyState:
    if raw is None:
        return KeyState()
    data = json.loads(raw)
    for name in ("staged", "retiring", "revoked", "failed"):
        data[name] = tuple(data.get(name, ()))
    return KeyState(**data)


@dataclass(slots=True)
class _CachedState:
    state: KeyState
    fetched_at: float


@dataclass(slots=True)
class _CachedSecret:
    secret: Secret
    unwrapped_at: float
    """Last successful unwrap; serving stops `max_age_s` after it."""
    checked_at: float


class Keyring:
    def __init__(
        self,
        store: KeyStore,
        kek: KekBackend,
        *,
        cache_ttl_s: float = 300.0,
        max_age_s: float = 3600.0,
        state_ttl_s: float = 1.0,
        rollback_after: int = 3,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._store = store
        self._kek = kek
        self._cache_ttl_s = cache_ttl_s
        self._max_age_s = max_age_s
        self._state_ttl_s = state_ttl_s
        self._rollback_after = rollback_after
        self._clock = clock
        self._states: dict[tuple[str, str], _CachedState] = {}
        self._secrets: dict[tuple[str, str, int], _CachedSecret] = {}
        self._canary_failures: dict[tuple[str, str, int], int] = {}
        self._unwraps: SingleFlight[tuple[str, str, int], Secret] = SingleFlight()
        self._state_reads: SingleFlight[tuple[str, str], KeyState] = SingleFlight()
        self._state_generation: dict[tuple[str, str], int] = {}
        """Bumped by `invalidate`: a state read that started before it is not cached."""

    @property
    def store(self) -> KeyStore:
        return self._store

    @property
    def kek(self) -> KekBackend:
        return self._kek

    async def credential(self, credential_id: str, *, scope: str = "global",
                         bucket: int = 0) -> ResolvedCredential:
        """The key for a new request; `bucket` (0..99, from the request id) picks canaries."""
        state = await self._state(scope, credential_id)
        version = choose_version(state, bucket)
        if version is None:
            raise SecretUnavailable(f"credential {scope}/{credential_id} has no active version")
        secret = await self._secret(scope, credential_id, version)
        return ResolvedCredential(credential_id, version, secret,
                                  canary=version == state.canary)

    async def _state(self, scope: str, credential: str) -> KeyState:
        key = (scope, credential)
        cached = self._states.get(key)
        if cached is not None and self._clock() - cached.fetched_at < self._state_ttl_s:
            return cached.state
        # Single flight too: when the state TTL ends under load, one Redis read serves
        # every request that was waiting for it.
        return await self._state_reads.run(key, lambda: self._read_state(key))

    async def _read_state(self, key: tuple[str, str]) -> KeyState:
        scope, credential = key
        generation = self._state_generation.get(key, 0)
        now = self._clock()
        try:
            state = await self._store.state(scope, credential)
        except StoreUnavailable:
            cached = self._states.get(key)
            if cached is not None:  # Redis blip: the last known state is the best we have
                return cached.state
            raise SecretUnavailable(f"credential {scope}/{credential}: key store "
                                    "unavailable") from None
        if self._state_generation.get(key, 0) == generation:
            # (A change published while the read was under way invalidated it: the next
            # request reads again rather than caching what may predate the change.)
            self._states[key] = _CachedState(state, now)
        for (s, c, version) in list(self._secrets):
            if (s, c) == key and not state.servable(version):
                del self._secrets[(s, c, version)]  # revoked or out of rotation: forget it
        return state

    async def _secret(self, scope: str, credential: str, version: int) -> Secret:
        key = (scope, credential, version)
        cached = self._secrets.get(key)
        now = self._clock()
        if (cached is not None and now - cached.checked_at < self._cache_ttl_s
                and now - cached.unwrapped_at < self._max_age_s):
            # (The max-age bound matters after a stale serve, which moves `checked_at` but
            # not `unwrapped_at`: without it a key could outlive max_age_s by a cache TTL.)
            return cached.secret
        # Single flight: one unwrap per key version, however many requests miss at once
        # (a cache expiry under load would otherwise send each of them to the KMS).
        return await self._unwraps.run(key, lambda: self._unwrap(key))

    async def _unwrap(self, key: tuple[str, str, int]) -> Secret:
        scope, credential, version = key
        cached = self._secrets.get(key)
        now = self._clock()
        try:
            record = await self._store.record(scope, credential, version)
            if record is None:
                raise SecretUnavailable(f"credential {scope}/{credential}@{version}: "
                                        "no sealed record")
            secret = await open_sealed(self._kek, record)
        except (StoreUnavailable, KekError, EnvelopeError) as exc:
            if _outage(exc) and cached is not None and now - cached.unwrapped_at < self._max_age_s:
                # Try the KMS again after another TTL (from now: the failure may have
                # taken a KMS timeout), not per request.
                cached.checked_at = self._clock()
                metrics.CREDENTIAL_STALE_SERVES.labels(credential).inc()
                log_event(log, logging.WARNING, "serving a cached key: KMS or store down",
                          credential=f"{credential}@{version}", error=str(exc))
                return cached.secret
            detail = (str(exc) if isinstance(exc, EnvelopeError)
                      else f"cannot unwrap ({type(exc).__name__})")
            raise SecretUnavailable(f"credential {scope}/{credential}@{version}: "
                                    f"{detail}") from None
        # The TTL counts from when the key arrived, not from when it was asked for: with
        # a KMS as slow as the TTL, a start-time stamp would be stale on arrival and the
        # requests queued behind it would each unwrap again.
        done = self._clock()
        self._secrets[key] = _CachedSecret(secret, done, done)
        return secret

    def invalidate(self, scope: str, credential: str) -> None:
        key = (scope, credential)
        self._states.pop(key, None)
        self._state_generation[key] = self._state_generation.get(key, 0) + 1
        self._state_reads.forget(key)

    def is_canary(self, credential: ResolvedCredential, scope: str) -> bool:
        """Chosen as the canary, or the canary now (a key known by its label only, from
        another process's attempt or the fast path's access log)."""
        if credential.canary:
            return True
        cached = self._states.get((scope, credential.id))
        return cached is not None and cached.state.canary == credential.version

    async def report(self, credential: ResolvedCredential, scope: str, status: int) -> None:
        """Count provider auth failures of a canary version; roll it back past the bound."""
        state = self._states.get((scope, credential.id))
        if state is None or state.state.canary != credential.version:
            return
        key = (scope, credential.id, credential.version)
        if status not in (401, 403):
            return
        self._canary_failures[key] = failures = self._canary_failures.get(key, 0) + 1
        if failures < self._rollback_after:
            return
        self._canary_failures.pop(key, None)

        def undo_canary(current: KeyState) -> KeyState:
            if current.canary != credential.version:
                raise RotationError("canary already changed")
            return rollback(current)

        try:
            await self._store.transition(scope, credential.id, undo_canary)
        except (RotationError, StoreUnavailable) as exc:
            log_event(log, logging.WARNING, "canary rollback skipped",
                      credential=credential.label, reason=str(exc))
            return
        self.invalidate(scope, credential.id)
        metrics.CREDENTIAL_ROLLBACKS.labels(credential.id).inc()
        log_event(log, logging.WARNING, "canary rolled back after provider auth failures",
                  credential=credential.label, failures=failures)

    async def add(self, scope: str, credential: str, provider: str, secret: Secret) -> int:
        """Seal `secret` as the next version of `credential` and stage it."""
        version = await self._store.next_version(scope, credential)
        record = await seal(self._kek, scope=scope, provider=provider, key_id=credential,
                            version=version, secret=secret)
        await self._store.put_record(record)
        await self._store.transition(scope, credential, lambda s: stage(s, version))
        return version

    def __repr__(self) -> str:
        return f"Keyring({len(self._secrets)} cached keys)"
