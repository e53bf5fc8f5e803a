"""The keyring with an OpenBao Transit KEK (real `bao server -dev`), through real Envoy.

The gateway holds a token with the shipped `gateway` policy (decrypt only); operators run
`extproc keys` with their own tokens (`--token-env`): `key-operator` adds keys,
`kek-admin` rotates the Transit key and rewraps.
"""

from __future__ import annotations

import base64
import json
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import httpx
import hvac.exceptions
import pytest

from extproc.devstack import Stack
from extproc.secrets import Secret
from tests.conftest import ACME_KEY, CHAT, chat_body, write_config
from tests.e2e.test_credentials import (
    CREDENTIAL,
    UNAVAILABLE,
    VERSIONS_KEY,
    KeyringStack,
    KeysCli,
    Load,
    accept_keys,
    bearer,
    canary_key,
    keyring_document,
    leaks,
    list_rows,
    log_events,
    seen_keys,
)
from tests.openbao import KEK_NAME, TRANSIT_MOUNT, CountingProxy, OpenBao, start_openbao
from tests.polling import wait_for

GATEWAY_TOKEN_ENV = "ASC_TEST_GATEWAY_BAO_TOKEN"
OPERATOR_TOKEN_ENV = "ASC_TEST_KEY_OPERATOR_TOKEN"
ADMIN_TOKEN_ENV = "ASC_TEST_KEK_ADMIN_TOKEN"
DENIED = ("error: transit encrypt failed: HTTP 403 (permission denied) (hint: sealing needs "
          "a key-operator token (policy deploy/vault/key-operator.hcl): --token-env VAR "
          "naming the variable that holds it)\n")


@dataclass
class TransitStack:
    ring: KeyringStack
    bao: OpenBao
    tokens: dict[str, str]
    """policy name -> a token holding it."""

    def records(self) -> dict[int, dict[str, Any]]:
        raw = self.ring.redis().hgetall(VERSIONS_KEY)
        return {int(v): json.loads(text) for v, text in raw.items()}


def transit_stack(stack: Stack, monkeypatch: pytest.MonkeyPatch,
                  **secrets: Any) -> TransitStack:
    """Redis, OpenBao (transit, derived `asc-kek`, the shipped policies, one token per
    policy), and a config whose gateway token has the `gateway` policy."""
    _, redis_port = stack.start_redis()
    bao = start_openbao(stack)
    bao.enable_transit()
    bao.create_derived_key(KEK_NAME)
    assert bao.write_policies() == ["gateway", "kek-admin", "key-operator"]
    tokens = {policy: bao.create_token([policy]) for policy in
              ("gateway", "kek-admin", "key-operator")}
    stack.env[GATEWAY_TOKEN_ENV] = tokens["gateway"]  # extproc's own
    monkeypatch.setenv(GATEWAY_TOKEN_ENV, tokens["gateway"])
    monkeypatch.setenv(OPERATOR_TOKEN_ENV, tokens["key-operator"])
    monkeypatch.setenv(ADMIN_TOKEN_ENV, tokens["kek-admin"])
    kek = {"backend": "transit", "url": bao.url, "mount": TRANSIT_MOUNT, "key": KEK_NAME,
           "token": {"env": GATEWAY_TOKEN_ENV}}
    document = keyring_document(redis_port, secrets=secrets,
                                change=lambda doc: doc["secrets"].update(kek=kek))
    config = write_config(stack.workdir / "config", document(1))
    ring = KeyringStack(stack, redis_port, KeysCli(config), document)
    return TransitStack(ring, bao, tokens)


def wrapped_with(record: dict[str, Any]) -> str:
    """`vault:v<N>`: the Transit key version a record's DEK is wrapped with."""
    wrapped = base64.b64decode(record["wrapped_dek"]).decode("ascii")
    return wrapped.rpartition(":")[0]


def as_operator(*args: str) -> tuple[str, ...]:
    return (*args, "--token-env", OPERATOR_TOKEN_ENV)


def as_admin(*args: str) -> tuple[str, ...]:
    return (*args, "--token-env", ADMIN_TOKEN_ENV)


# -- 6a. KEK rotation and rewrap under load ------------------------------------------------


def test_transit_kek_rotation_and_rewrap_under_load_fail_no_request(
        stack: Stack, monkeypatch: pytest.MonkeyPatch) -> None:
    t = transit_stack(stack, monkeypatch, cache_ttl_s=1)  # re-unwrap every second
    provider_key = canary_key("transit")
    keys = t.ring.keys
    assert keys.ok(*as_operator("add", CREDENTIAL), secret=provider_key) == (
        f"global/{CREDENTIAL}@1: active, fingerprint {Secret(provider_key).fingerprint()}\n")
    [before] = t.records().values()
    assert before["kek_id"] == f"transit:{TRANSIT_MOUNT}/{KEK_NAME}"
    assert wrapped_with(before) == "vault:v1"
    gateway = t.ring.start()
    accept_keys(gateway, provider_key)
    assert gateway.chat().status_code == 200

    admin = t.bao.client(t.tokens["kek-admin"])

    def served_for(seconds: float) -> None:
        """Wait until the load has been answered for `seconds` more (more than one cache
        TTL: the gateway re-unwrapped the key since): paced by answers, not the clock."""
        mark = time.time()
        load.wait_for(lambda samples: bool(samples) and samples[-1].done - mark > seconds)

    with Load(gateway.base_url, threads=4, rate=25.0, duration=8.0) as load:
        served_for(1.2)
        admin.secrets.transit.rotate_key(KEK_NAME, mount_point=TRANSIT_MOUNT)
        served_for(1.2)
        assert keys.ok(*as_admin("rewrap")) == (
            "rewrapped 1 record(s) under the newest KEK version\n")
        served_for(1.2)
        admin.secrets.transit.update_key_configuration(
            KEK_NAME, min_decryption_version=2, mount_point=TRANSIT_MOUNT)
        served_for(2.2)

    assert len(load.samples) == 4 * 25 * 8
    assert Counter(s.status for s in load.samples) == {200: len(load.samples)}
    assert {s.credential for s in load.samples} == {f"{CREDENTIAL}@1"}
    [after] = t.records().values()
    assert wrapped_with(after) == "vault:v2"
    unchanged = ("ciphertext", "nonce", "fingerprint", "kek_id", "version")
    assert {k: after[k] for k in unchanged} == {k: before[k] for k in unchanged}
    # The gateway re-unwrapped every second (cache_ttl_s 1) across the rotation, the
    # rewrap and the raised min_decryption_version, and every unwrap worked: no request
    # failed and no cached key was served in place of a failed unwrap.
    assert log_events(gateway, "provider credential unavailable") == []
    assert log_events(gateway, "serving a cached key: KMS or store down") == []
    assert set(seen_keys(gateway.emulator.requests())) == {bearer(provider_key)}
    assert leaks(gateway, [provider_key, *t.tokens.values()],
                 cli="\n".join(keys.outputs)) == []


# -- 6b. KMS down -------------------------------------------------------------------------------


def test_kms_down_fails_closed_after_max_age_with_an_audited_503(
        stack: Stack, monkeypatch: pytest.MonkeyPatch) -> None:
    cache_ttl_s, max_age_s = 1, 4
    t = transit_stack(stack, monkeypatch, cache_ttl_s=cache_ttl_s, max_age_s=max_age_s)
    provider_key = canary_key("transit")
    t.ring.keys.ok(*as_operator("add", CREDENTIAL), secret=provider_key)
    gateway = t.ring.start()
    accept_keys(gateway, provider_key)
    assert gateway.chat().status_code == 200  # unwrapped: the cache's max age starts now

    t.bao.process.stop()
    down_at = time.monotonic()
    timeline: list[tuple[float, int, str]] = []
    while time.monotonic() < down_at + max_age_s + cache_ttl_s + 2:
        response = gateway.chat()
        timeline.append((time.monotonic() - down_at, response.status_code, response.text))
        if [s for _, s, _ in timeline[-5:]] == [503] * 5:
            break
        time.sleep(0.1)

    statuses = [s for _, s, _ in timeline]
    assert set(statuses) <= {200, 503}, statuses
    first_503 = statuses.index(503)
    # Fail closed within the bound (max age after the last unwrap, plus one TTL), and
    # stay closed: no request after that reaches the provider.
    assert timeline[first_503][0] <= max_age_s + cache_ttl_s + 0.5
    assert statuses[first_503:] == [503] * len(statuses[first_503:])
    assert all(json.loads(text) == UNAVAILABLE for _, s, text in timeline if s == 503)
    assert len(gateway.emulator.requests()) == 1 + first_503

    assert wait_for(lambda: len([e for e in log_events(gateway, "request finished")
                                 if e["status"] == 503]) == len(statuses) - first_503)
    audited = [e for e in log_events(gateway, "request finished") if e["status"] == 503]
    assert {(e["tenant"], e["provider"], e["error"], e["credential"], e["upstream_status"])
            for e in audited} == {("acme", "emu-eu", "gateway_unavailable", None, None)}
    reasons = {e["reason"] for e in log_events(gateway, "provider credential unavailable")}
    assert reasons == {f"credential global/{CREDENTIAL}@1: cannot open "
                       f"global/emu-eu/{CREDENTIAL}@1: DEK unwrap failed: transit decrypt "
                       "failed: ConnectionError"}
    assert leaks(gateway, [provider_key, *t.tokens.values()],
                 cli="\n".join(t.ring.keys.outputs),
                 responses="\n".join(text for _, _, text in timeline)) == []


# -- 6c. KMS stampede (issue 8 item 11) ------------------------------------------------------------


def test_a_hundred_requests_on_an_expired_cache_make_one_transit_decrypt(
        stack: Stack, monkeypatch: pytest.MonkeyPatch) -> None:
    # The hundred must all be asked for while the one decrypt is under way or cached: a
    # TTL of 1 s let late senders on a loaded machine (thread start, 100 connections)
    # miss the cache again and make a third decrypt.
    cache_ttl_s = 3
    t = transit_stack(stack, monkeypatch, cache_ttl_s=cache_ttl_s)
    provider_key = canary_key("stampede")
    t.ring.keys.ok(*as_operator("add", CREDENTIAL), secret=provider_key)
    # The gateway reaches Transit through a relay that answers in 1 s and counts decrypts.
    proxy = CountingProxy(int(t.bao.url.rsplit(":", 1)[1]), delay=1.0)
    direct = t.ring.document

    def via_proxy(emulator_port: int) -> dict[str, Any]:
        document = direct(emulator_port)
        document["secrets"]["kek"]["url"] = f"http://127.0.0.1:{proxy.port}"
        return document

    t.ring.document = via_proxy
    try:
        gateway = t.ring.start()
        accept_keys(gateway, provider_key)
        warm = gateway.chat()
        assert (warm.status_code, proxy.decrypts) == (200, 1)
        expired_at = time.monotonic() + cache_ttl_s + 0.1
        assert wait_for(lambda: time.monotonic() > expired_at)  # the TTL the test set

        start = threading.Barrier(100)

        def call(_: int) -> httpx.Response:
            with httpx.Client(base_url=gateway.base_url, timeout=15) as client:
                start.wait(timeout=30)  # every thread and client ready: send at once
                return client.post(CHAT, json=chat_body(),
                                   headers={"authorization": f"Bearer {ACME_KEY}"})

        with ThreadPoolExecutor(max_workers=100) as pool:
            responses = list(pool.map(call, range(100)))
    finally:
        proxy.close()

    assert Counter((r.status_code, r.headers.get("x-asc-credential")) for r in responses) == {
        (200, f"{CREDENTIAL}@1"): 100}
    assert proxy.decrypts == 2  # the warm-up, and one for the hundred
    assert log_events(gateway, "provider credential unavailable") == []
    assert set(seen_keys(gateway.emulator.requests())) == {bearer(provider_key)}


# -- 7. separation of duties through the CLI --------------------------------------------------


def test_only_the_key_operator_token_can_add_provider_keys(
        stack: Stack, monkeypatch: pytest.MonkeyPatch) -> None:
    t = transit_stack(stack, monkeypatch)
    keys = t.ring.keys
    provider_key, refused_key = canary_key("operator"), canary_key("refused")

    added = keys(*as_operator("add", CREDENTIAL), secret=provider_key)
    assert added.code == 0, added
    assert added.out == (f"global/{CREDENTIAL}@1: active, fingerprint "
                         f"{Secret(provider_key).fingerprint()}\n")

    # The KEK admin (and the gateway itself) may not seal provider keys.
    for token_env in (ADMIN_TOKEN_ENV, GATEWAY_TOKEN_ENV):
        refused = keys("add", CREDENTIAL, "--token-env", token_env, secret=refused_key)
        assert (refused.code, refused.out, refused.err) == (2, "", DENIED)
    assert list(t.records()) == [1]  # nothing sealed by the refused attempts

    # Rewrap: the KEK admin's job; the shipped key-operator policy allows it too
    # (transit/rewrap/asc-kek: update); the gateway's token may not.
    assert keys.ok(*as_admin("rewrap")) == "rewrapped 1 record(s) under the newest KEK version\n"
    assert keys.ok(*as_operator("rewrap")) == (
        "rewrapped 1 record(s) under the newest KEK version\n")
    gateway_rewrap = keys("rewrap", "--token-env", GATEWAY_TOKEN_ENV)
    assert (gateway_rewrap.code, gateway_rewrap.err) == (
        2, "error: transit rewrap failed: HTTP 403 (permission denied) (hint: rewrap needs a "
           "kek-admin token (policy deploy/vault/kek-admin.hcl) for records in Redis, a "
           "key-operator token (deploy/vault/key-operator.hcl) for records in Vault KV: "
           "--token-env VAR)\n")

    # The key operator may not rotate or reconfigure the KEK (no CLI command does that;
    # it is `bao write transit/keys/asc-kek/rotate` with the admin's token).
    operator = t.bao.client(t.tokens["key-operator"])
    with pytest.raises(hvac.exceptions.Forbidden):
        operator.secrets.transit.rotate_key(KEK_NAME, mount_point=TRANSIT_MOUNT)
    with pytest.raises(hvac.exceptions.Forbidden):
        operator.secrets.transit.update_key_configuration(
            KEK_NAME, min_decryption_version=1, mount_point=TRANSIT_MOUNT)
    t.bao.client(t.tokens["kek-admin"]).secrets.transit.rotate_key(
        KEK_NAME, mount_point=TRANSIT_MOUNT)

    # The gateway, with its decrypt-only token, serves the operator's key.
    gateway = t.ring.start()
    accept_keys(gateway, provider_key)
    response = gateway.chat()
    assert (response.status_code, response.headers["x-asc-credential"]) == (
        200, f"{CREDENTIAL}@1")
    assert seen_keys(gateway.emulator.requests()) == [bearer(provider_key)]
    rows = list_rows(keys.ok("list"))
    assert list(rows) == [(f"global/{CREDENTIAL}", 1)]
    assert rows[(f"global/{CREDENTIAL}", 1)][2] == f"transit:{TRANSIT_MOUNT}/{KEK_NAME}"
    assert leaks(gateway, [provider_key, refused_key, *t.tokens.values()],
                 cli="\n".join(keys.outputs)) == []
