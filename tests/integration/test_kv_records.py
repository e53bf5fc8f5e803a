"""Sealed records in Vault/OpenBao KV v2 (`VaultKvRecords`) against a real OpenBao dev server.

The keyring's lifecycle state, version counter and change feed stay in a real Redis; only
the sealed records move to KV (dev mode mounts KV v2 at `secret/`). A file KEK wraps the
DEKs, so these tests need no Transit. Covers: `Keyring.add` writes the sealed JSON (and no
plaintext) to `secret/data/asc/<scope>/<credential>/v<version>`, `Keyring.credential`
resolves it, listing, rewrap, the shipped gateway policy (read, never write), safe
error messages, and a KV outage: a cold keyring fails closed while a warm one serves its
cached key until `max_age_s`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import socket
import stat
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from extproc import cli, metrics
from extproc.auth import hash_key
from extproc.config import load_config
from extproc.credentials.envelope import EnvelopeError, SealedSecret, rewrap_sealed, seal
from extproc.credentials.kek import FileKek, TokenAuth, init_kek_file
from extproc.credentials.keyring import (
    Keyring,
    KeyStore,
    RedisRecords,
    StoreUnavailable,
    VaultKvRecords,
)
from extproc.devstack import Stack, free_port
from extproc.runtime import Runtime
from extproc.secrets import Secret, SecretUnavailable
from tests.openbao import OpenBao, pump, start_openbao

CANARY = "sk-canary-kv-" + secrets.token_hex(12)
CANARY_2 = "sk-canary-kv2-" + secrets.token_hex(12)


@pytest.fixture(scope="module")
def openbao(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OpenBao]:
    """One dev server per module (KV v2 at `secret/`), with the shipped policies loaded."""
    with Stack(tmp_path_factory.mktemp("openbao-kv")) as stack:
        bao = start_openbao(stack)
        assert bao.write_policies() == ["gateway", "kek-admin", "key-operator"]
        yield bao


@pytest.fixture
def kek(tmp_path: Path) -> FileKek:
    path = init_kek_file(tmp_path / "kek.key")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    return FileKek.load(path)


@pytest.fixture
def cred() -> str:
    """A fresh credential id: Redis and KV are shared by the tests of this module."""
    return f"openai-{uuid.uuid4().hex[:8]}"


def kv_records(bao: OpenBao, *, token: str | None = None, url: str | None = None,
               mount: str = "secret", timeout: float = 5.0) -> VaultKvRecords:
    return VaultKvRecords(url or bao.url, auth=TokenAuth(Secret(token or bao.root_token)),
                          mount=mount, timeout=timeout)


def kv_read(bao: OpenBao, path: str) -> Any:
    return bao.client().secrets.kv.v2.read_secret_version(path=path,
                                                         raise_on_deleted_version=True)


def assert_safe(bao: OpenBao, *texts: str, tokens: tuple[str, ...] = ()) -> None:
    for text in texts:
        for secret in (CANARY, CANARY_2, bao.root_token, *tokens):
            assert secret not in text
        assert "127.0.0.1" not in text
        assert "http" not in text


class Relay:
    """A loopback TCP relay to OpenBao that can be cut: `close()` refuses new connections
    and drops open ones, as a KV outage would. `delay` holds each new connection first."""

    def __init__(self, upstream_port: int, *, delay: float = 0.0) -> None:
        self._upstream_port = upstream_port
        self._delay = delay
        self._server = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._server.getsockname()[1]
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        self._closed = False
        threading.Thread(target=self._accept_loop, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def close(self) -> None:
        with self._lock:
            self._closed = True
            # shutdown() wakes the blocked accept(); close() alone would leave it listening.
            with contextlib.suppress(OSError):
                self._server.shutdown(socket.SHUT_RDWR)
            self._server.close()
            for sock in self._sockets:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                sock.close()

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
        with self._lock:
            if self._closed:
                client.close()
                upstream.close()
                return
            self._sockets += [client, upstream]
        threading.Thread(target=pump, args=(upstream, client), daemon=True).start()
        pump(client, upstream)


def bao_port(bao: OpenBao) -> int:
    return int(bao.url.rsplit(":", 1)[1])


# --- the record lives in KV ---------------------------------------------------------------


async def test_add_seals_into_kv_and_the_keyring_resolves_it(
        openbao: OpenBao, redis: Any, kek: FileKek, cred: str) -> None:
    keyring = Keyring(KeyStore(redis, kv_records(openbao)), kek)

    version = await keyring.add("global", cred, "openai", Secret(CANARY))

    assert version == 1
    stored = kv_read(openbao, f"asc/global/{cred}/v1")
    assert list(stored["data"]["data"]) == ["record"]
    text = stored["data"]["data"]["record"]
    record = SealedSecret.from_json(text)
    assert text == record.to_json()
    assert record.label == f"global/openai/{cred}@1"
    assert record.kek_id == kek.kek_id
    assert record.fingerprint == Secret(CANARY).fingerprint()
    assert CANARY not in repr(stored)
    # Only the state and the version counter went to Redis: no sealed record there.
    assert await redis.exists(f"asc:cred:{{global/{cred}}}:versions") == 0
    assert await redis.exists(f"asc:cred:{{global/{cred}}}:state") == 1

    resolved = await keyring.credential(cred)
    assert (resolved.id, resolved.version, resolved.secret.reveal()) == (cred, 1, CANARY)
    cold = Keyring(KeyStore(redis, kv_records(openbao)), kek)
    assert (await cold.credential(cred)).secret.reveal() == CANARY


async def test_records_list_in_version_order_and_ignore_strangers(
        openbao: OpenBao, redis: Any, kek: FileKek, cred: str) -> None:
    store = KeyStore(redis, kv_records(openbao))
    keyring = Keyring(store, kek)
    scope = "tenant:acme"
    assert await keyring.add(scope, cred, "openai", Secret(CANARY)) == 1
    assert await keyring.add(scope, cred, "openai", Secret(CANARY_2)) == 2
    late = await seal(kek, scope=scope, provider="openai", key_id=cred, version=10,
                      secret=Secret(CANARY_2))
    await store.put_record(late)  # v10 sorts after v2, as a number
    root = openbao.client().secrets.kv.v2
    root.create_or_update_secret(path=f"asc/{scope}/{cred}/notes", secret={"a": "b"})
    root.create_or_update_secret(path=f"asc/{scope}/{cred}/sub/v3", secret={"a": "b"})

    records = await store.records(scope, cred)

    assert [r.version for r in records] == [1, 2, 10]
    assert [r.fingerprint for r in records] == [Secret(CANARY).fingerprint(),
                                                Secret(CANARY_2).fingerprint(),
                                                Secret(CANARY_2).fingerprint()]
    assert sorted(root.list_secrets(path=f"asc/{scope}/{cred}")["data"]["keys"]) == [
        "notes", "sub/", "v1", "v10", "v2"]
    assert await store.records(scope, f"{cred}-none") == []
    assert await store.record(scope, cred, 3) is None
    assert (await keyring.credential(cred, scope=scope)).secret.reveal() == CANARY
    await store.record_store.close()


async def test_rewrap_replaces_the_record_in_place(
        openbao: OpenBao, redis: Any, kek: FileKek, cred: str) -> None:
    """What `extproc keys rewrap` does, record by record; KV keeps the old value as a
    KV version of the same secret."""
    store = KeyStore(redis, kv_records(openbao))
    keyring = Keyring(store, kek)
    await keyring.add("global", cred, "openai", Secret(CANARY))
    [before] = await store.records("global", cred)

    for record in await keyring.store.records("global", cred):
        await keyring.store.put_record(await rewrap_sealed(keyring.kek, record))

    [after] = await store.records("global", cred)
    assert after.wrapped_dek != before.wrapped_dek
    assert (after.ciphertext, after.nonce, after.fingerprint) == (
        before.ciphertext, before.nonce, before.fingerprint)
    assert kv_read(openbao, f"asc/global/{cred}/v1")["data"]["metadata"]["version"] == 2
    fresh = Keyring(KeyStore(redis, kv_records(openbao)), kek)
    assert (await fresh.credential(cred)).secret.reveal() == CANARY


async def test_a_record_copied_to_another_version_is_refused(
        openbao: OpenBao, redis: Any, kek: FileKek, cred: str) -> None:
    """The AAD binds a record to its own names, not to its KV path: a v1 record planted
    at the v2 path would open as v1's key. The store refuses it instead."""
    store = KeyStore(redis, kv_records(openbao))
    await Keyring(store, kek).add("global", cred, "openai", Secret(CANARY))
    root = openbao.client().secrets.kv.v2
    v1 = kv_read(openbao, f"asc/global/{cred}/v1")["data"]["data"]
    root.create_or_update_secret(path=f"asc/global/{cred}/v2", secret=v1)
    root.create_or_update_secret(path=f"asc/global/{cred}/v3", secret={"note": "x"})

    with pytest.raises(EnvelopeError) as moved:
        await store.record("global", cred, 2)
    with pytest.raises(EnvelopeError) as malformed:
        await store.record("global", cred, 3)

    assert str(moved.value) == (f"record stored as global/{cred}@2 is "
                                f"global/openai/{cred}@1")
    assert str(malformed.value) == (f"malformed record in KV for global/{cred}: no "
                                    "'record' string")


# --- policies -----------------------------------------------------------------------------


async def test_the_gateway_policy_reads_records_but_cannot_write_them(
        openbao: OpenBao, redis: Any, kek: FileKek, cred: str) -> None:
    operator_token = openbao.create_token(["key-operator"])
    operator = Keyring(KeyStore(redis, kv_records(openbao, token=operator_token)), kek)
    await operator.add("global", cred, "openai", Secret(CANARY))
    gateway_token = openbao.create_token(["gateway"])
    gateway_records = kv_records(openbao, token=gateway_token)
    gateway = Keyring(KeyStore(redis, gateway_records), kek)

    assert (await gateway.credential(cred)).secret.reveal() == CANARY
    assert [r.version for r in await gateway.store.records("global", cred)] == [1]
    record = await gateway_records.get("global", cred, 1)
    assert record is not None
    with pytest.raises(StoreUnavailable) as write:
        await gateway_records.put(record)
    with pytest.raises(StoreUnavailable) as add:
        await gateway.add("global", cred, "openai", Secret(CANARY_2))
    admin_records = kv_records(openbao, token=openbao.create_token(["kek-admin"]))
    with pytest.raises(StoreUnavailable) as admin_read:
        await admin_records.get("global", cred, 1)

    assert str(write.value) == "vault kv write failed: HTTP 403 (permission denied)"
    assert str(add.value) == "vault kv write failed: HTTP 403 (permission denied)"
    assert str(admin_read.value) == "vault kv read failed: HTTP 403 (permission denied)"
    assert [r.version for r in await operator.store.records("global", cred)] == [1]
    assert_safe(openbao, str(write.value), repr(gateway_records),
                tokens=(operator_token, gateway_token))


async def test_errors_are_mapped_to_safe_messages(openbao: OpenBao, cred: str) -> None:
    cases: list[tuple[VaultKvRecords, str]] = [
        (kv_records(openbao, url=f"http://127.0.0.1:{free_port()}"),
         "vault kv read failed: ConnectionError"),
        (kv_records(openbao, mount="nope"),
         "vault kv read failed: HTTP 404 (no such mount or path)"),
        (kv_records(openbao, token="s.not-a-token-" + secrets.token_hex(6)),
         "vault kv read failed: HTTP 403 (permission denied)"),
    ]
    for records, expected in cases:
        with pytest.raises(StoreUnavailable) as caught:
            await records.get("global", cred, 1)
        assert str(caught.value) == expected
        assert caught.value.__cause__ is None
        assert caught.value.__suppress_context__
        assert_safe(openbao, str(caught.value), repr(records))
    with pytest.raises(StoreUnavailable) as bad_name:
        await kv_records(openbao).get("global/../other", cred, 1)
    assert str(bad_name.value) == "vault kv: invalid scope or credential name"


async def test_kv_calls_do_not_block_the_event_loop(openbao: OpenBao, cred: str) -> None:
    relay = Relay(bao_port(openbao), delay=0.3)
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.01)
            ticks += 1

    task = asyncio.create_task(ticker())
    try:
        assert await kv_records(openbao, url=relay.url).get("global", cred, 1) is None
    finally:
        task.cancel()
        relay.close()
    assert ticks >= 10  # ~30 expected; 0 would mean the loop was blocked for 300 ms


# --- KV outage ----------------------------------------------------------------------------


async def test_kv_down_cold_keyring_fails_closed_warm_keyring_serves_until_max_age(
        openbao: OpenBao, redis: Any, kek: FileKek, cred: str,
        caplog: pytest.LogCaptureFixture) -> None:
    await Keyring(KeyStore(redis, kv_records(openbao)), kek).add("global", cred, "openai",
                                                                  Secret(CANARY))
    relay = Relay(bao_port(openbao))
    now = [1000.0]
    clock: Callable[[], float] = lambda: now[0]  # noqa: E731
    records = kv_records(openbao, url=relay.url, timeout=2.0)
    warm = Keyring(KeyStore(redis, records), kek, cache_ttl_s=10, max_age_s=60, clock=clock)
    assert (await warm.credential(cred)).secret.reveal() == CANARY  # unwrapped at t=1000
    stale = metrics.CREDENTIAL_STALE_SERVES.labels(cred)
    stale_before = stale._value.get()

    relay.close()  # KV is down from here on; Redis (state) stays up

    cold = Keyring(KeyStore(redis, records), kek, cache_ttl_s=10, max_age_s=60, clock=clock)
    with pytest.raises(SecretUnavailable) as cold_error:
        await cold.credential(cred)
    assert str(cold_error.value) == (f"credential global/{cred}@1: cannot unwrap "
                                     "(StoreUnavailable)")

    with caplog.at_level(logging.WARNING, logger="extproc.credentials"):
        now[0] = 1005.0  # within cache_ttl_s: served from cache, KV not even asked
        assert (await warm.credential(cred)).secret.reveal() == CANARY
        assert stale._value.get() == stale_before
        now[0] = 1030.0  # past cache_ttl_s: KV fails, the cached key bridges the outage
        assert (await warm.credential(cred)).secret.reveal() == CANARY
        assert stale._value.get() == stale_before + 1
        now[0] = 1035.0  # KV is asked again only a cache_ttl_s after the failed try
        assert (await warm.credential(cred)).secret.reveal() == CANARY
        assert stale._value.get() == stale_before + 1
        now[0] = 1059.0  # still within max_age_s of the last successful unwrap
        assert (await warm.credential(cred)).secret.reveal() == CANARY
        assert stale._value.get() == stale_before + 2
    warnings = [r for r in caplog.records if r.getMessage().startswith("serving a cached")]
    assert [r.fields for r in warnings] == [  # type: ignore[attr-defined]
        {"credential": f"{cred}@1", "error": "vault kv read failed: ConnectionError"}] * 2

    now[0] = 1061.0  # max_age_s after the last successful unwrap: fail closed, even though
    # the last (failed) check was only 2 s ago
    with pytest.raises(SecretUnavailable) as expired:
        await warm.credential(cred)
    assert str(expired.value) == (f"credential global/{cred}@1: cannot unwrap "
                                  "(StoreUnavailable)")
    assert_safe(openbao, str(cold_error.value), str(expired.value),
                *(f"{r.getMessage()} {getattr(r, 'fields', '')}" for r in caplog.records
                  if r.name.startswith("extproc")))


# --- config, runtime and `extproc keys` -----------------------------------------------------


def write_config(directory: Path, redis_port: int, bao: OpenBao, credential: str) -> Path:
    document = {
        "version": 1,
        "auth": {"pepper": {"env": "ASC_TEST_PEPPER"}},
        "redis": {"url": f"redis://127.0.0.1:{redis_port}/0"},
        "secrets": {
            "kek": {"backend": "file", "path": "kek.key"},
            "store": {"backend": "vault_kv", "url": bao.url,
                      "token": {"env": "ASC_TEST_KV_TOKEN"}},
        },
        "credentials": {credential: {"keyring": True}},
        "providers": {"openai-eu": {
            "kind": "openai", "base_url": "https://api.openai.com", "region": "eu",
            "zone": "eu", "cluster": "openai_eu", "credentials": [credential]}},
        "models": {"gpt-4o-mini": {"price": {"input_per_mtok": 0.15, "output_per_mtok": 0.6},
                                   "deployments": [{"provider": "openai-eu"}]}},
        "tenants": {"acme": {"keys": [{"id": "acme-1", "hash": hash_key(
            Secret("pepper"), "sk-acme")}], "models": ["gpt-4o-mini"]}},
    }
    init_kek_file(directory / "kek.key")
    path = directory / "asc.yaml"
    path.write_text(yaml.safe_dump(document), encoding="utf-8")
    return path


def keys_cli(*args: str, capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = cli.main(["keys", *args])
    out, err = capsys.readouterr()
    return code, out, err


def test_keys_cli_and_runtime_use_the_configured_kv_store(
        openbao: OpenBao, redis_server: int, tmp_path: Path, cred: str,
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    config_path = write_config(tmp_path, redis_server, openbao, cred)
    operator_token = openbao.create_token(["key-operator"])
    gateway_token = openbao.create_token(["gateway"])
    key_file = tmp_path / "provider.key"
    key_file.write_text(CANARY + "\n", encoding="utf-8")
    monkeypatch.setenv("ASC_TEST_KV_TOKEN", gateway_token)  # the gateway's own token
    monkeypatch.setenv("OPERATOR_TOKEN", operator_token)

    # With the gateway's token the write is refused; with the operator's it goes through.
    refused = keys_cli("add", cred, "--config", str(config_path), "--from-file",
                       str(key_file), capsys=capsys)
    added = keys_cli("add", cred, "--config", str(config_path), "--from-file", str(key_file),
                     "--token-env", "OPERATOR_TOKEN", capsys=capsys)
    listed = keys_cli("list", "--config", str(config_path), capsys=capsys)

    assert refused == (2, "", "error: vault kv write failed: HTTP 403 (permission denied) "
                       "(hint: sealing needs a key-operator token (policy "
                       "deploy/vault/key-operator.hcl): --token-env VAR naming the variable "
                       "that holds it)\n")
    # The refused attempt used up version 1 of the counter (Redis), but stored nothing.
    fingerprint = Secret(CANARY).fingerprint()
    assert added == (0, f"global/{cred}@2: active, fingerprint {fingerprint}\n", "")
    assert listed[0] == 0
    [row] = [line for line in listed[1].splitlines() if line.startswith(f"global/{cred}")]
    assert row.split() == [f"global/{cred}", "2", "active", fingerprint, kek_id(tmp_path), "-"]
    assert SealedSecret.from_json(
        kv_read(openbao, f"asc/global/{cred}/v2")["data"]["data"]["record"]).version == 2
    for text in (*refused, *added, *listed):
        assert_safe(openbao, str(text), tokens=(operator_token, gateway_token))

    config = load_config(config_path)
    runtime = Runtime.build(config, {"ASC_TEST_PEPPER": "pepper",
                                     "ASC_TEST_KV_TOKEN": gateway_token})
    keyring = runtime.keys.keyring
    assert keyring is not None
    assert isinstance(keyring.store.record_store, VaultKvRecords)

    async def resolve() -> str:
        try:
            return (await keyring.credential(cred)).secret.reveal()
        finally:
            await keyring.store.close()

    assert asyncio.run(resolve()) == CANARY


def kek_id(directory: Path) -> str:
    return FileKek.load(directory / "kek.key").kek_id


def test_runtime_defaults_to_redis_records(redis_server: int, tmp_path: Path,
                                           openbao: OpenBao, cred: str) -> None:
    config_path = write_config(tmp_path, redis_server, openbao, cred)
    document = yaml.safe_load(config_path.read_text(encoding="utf-8"))
    del document["secrets"]["store"]
    config_path.write_text(yaml.safe_dump(document), encoding="utf-8")

    runtime = Runtime.build(load_config(config_path), {"ASC_TEST_PEPPER": "pepper"})

    assert runtime.keys.keyring is not None
    assert isinstance(runtime.keys.keyring.store.record_store, RedisRecords)
    asyncio.run(runtime.redis.aclose())


def test_runtime_without_the_kv_token_refuses_to_build(redis_server: int, tmp_path: Path,
                                                       openbao: OpenBao, cred: str) -> None:
    config = load_config(write_config(tmp_path, redis_server, openbao, cred))

    with pytest.raises(SecretUnavailable) as caught:
        Runtime.build(config, {"ASC_TEST_PEPPER": "pepper"})

    assert str(caught.value) == ("secret 'token': environment variable ASC_TEST_KV_TOKEN "
                                 "is not set")
    assert os.environ.get("ASC_TEST_KV_TOKEN") is None
