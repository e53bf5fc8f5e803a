"""Regression tests for credential defects found by the e2e credential tests (all fixed).

Each states the behaviour DESIGN §3 / issue 4 / docs/credentials.md promise; the comment
above each says what was wrong.
"""

from __future__ import annotations

import time
from typing import Any

import httpx
import pytest

from extproc.devstack import Stack
from tests.conftest import GLOBEX_KEY, write_config
from tests.e2e.test_credentials import (
    CREDENTIAL,
    REJECTED,
    KeysCli,
    accept_keys,
    canary_key,
    keyring_document,
    metric_value,
    prepare,
)
from tests.e2e.test_credentials_transit import as_operator, transit_stack


# BUG 1 - a failed canary takes the whole provider down for 30 s.
#
# `ProviderKeys.report` (extproc/credentials/selection.py) feeds every provider answer to
# both the keyring (canary rollback, per credential *version*) and the key pool's circuit
# breaker `CredentialPool.record` (extproc/credentials/pools.py), which is keyed by the
# credential id only and opens it after 3 consecutive 401/403/429 (`open_after=3`, fixed).
# With the default `secrets.rollback_after: 3`, three canary failures in a row roll the
# canary back AND open the credential: every following request gets 503 "No usable
# credential for the selected provider." for the 30 s cool-down (and the open is shared
# with every replica through `asc:cred:health`), although the active version is healthy.
# Issue 4 says clients see at most `rollback_after` failures. With a 100 % canary this is
# deterministic; with a 50 % canary it happens whenever the 3 failing canary requests come
# in a row (1 run in 4 with sequential requests).
# Reproduce: file KEK, v1 active, v2 added but not accepted by the provider,
# `keys rotate canary ring-eu --version 2 --percent 100`, send 4 requests: 502, 502, 502,
# then 503 (expected 200 on ring-eu@1).
def test_bug_canary_rollback_also_opens_the_credential_circuit(
        stack: Stack) -> None:
    _, redis_port = stack.start_redis()
    v1, v2 = canary_key("v1"), canary_key("v2")
    # Failover off, so that the canary's refusals reach the client and can be counted.
    ring = prepare(stack, keyring_document(  # rollback_after: 3
        redis_port, change=lambda doc: doc.update(failover={"max_attempts": 1})), redis_port)
    ring.keys.ok("add", CREDENTIAL, secret=v1)
    gateway = ring.start()
    accept_keys(gateway, v1)
    assert gateway.chat().status_code == 200
    ring.keys.ok("add", CREDENTIAL, secret=v2)
    ring.keys.ok("rotate", "canary", CREDENTIAL, "--version", "2", "--percent", "100")

    # Until the gateway sees the canary its answers are v1 and 200; from then on every
    # request is the canary's, until the third failure rolls it back.
    before: list[httpx.Response] = []
    failures: list[httpx.Response] = []
    while len(failures) < 3:
        response = gateway.chat()
        (before if not failures and response.status_code == 200 else failures).append(response)
        assert len(before) < 100, "the gateway never served the canary"
    assert {(r.status_code, r.headers["x-asc-credential"]) for r in before} <= {
        (200, f"{CREDENTIAL}@1")}
    assert [(r.status_code, r.json()) for r in failures] == [(502, REJECTED)] * 3
    assert metric_value(gateway.metrics(), "asc_credential_rollbacks_total",
                        credential=CREDENTIAL) == 1
    after = [gateway.chat() for _ in range(5)]
    # Observed: [503, 503, 503, 503, 503] for 30 s.
    assert [(r.status_code, r.headers.get("x-asc-credential")) for r in after] == [
        (200, f"{CREDENTIAL}@1")] * 5


# BUG 2 - KMS down: no stale serving at all; requests fail as soon as the cache TTL ends.
#
# `Keyring._secret` (extproc/credentials/keyring.py) serves a cached key while the KMS is
# down only on `except (StoreUnavailable, KekError)`, but `open_sealed`
# (extproc/credentials/envelope.py) never lets a `KekError` out: it re-raises every unwrap
# failure as `DecryptionFailed` (an `EnvelopeError`, with the `KekError` as __cause__),
# which lands in the `except EnvelopeError` branch -> `SecretUnavailable` -> 503. So with
# Transit unreachable, requests fail `cache_ttl_s` after the last unwrap instead of
# `max_age_s`, and `asc_credential_stale_serves_total` never moves. (Redis-down staleness
# works: `StoreUnavailable` is raised directly.) The check should look at
# `exc.__cause__` being a transient `KekError`.
# Reproduce: Transit KEK, `cache_ttl_s: 1`, `max_age_s: 30`; one request, stop OpenBao,
# request every 0.1 s: 503 from about 1 s on (expected 200 until 30 s).
def test_bug_kms_down_serves_no_cached_key(stack: Stack,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    t = transit_stack(stack, monkeypatch, cache_ttl_s=1, max_age_s=30)
    provider_key = canary_key("transit")
    t.ring.keys.ok(*as_operator("add", CREDENTIAL), secret=provider_key)
    gateway = t.ring.start()
    accept_keys(gateway, provider_key)
    assert gateway.chat().status_code == 200

    t.bao.process.stop()
    down_at = time.monotonic()
    timeline: list[tuple[float, int]] = []
    while time.monotonic() < down_at + 3.0:
        timeline.append((round(time.monotonic() - down_at, 2), gateway.chat().status_code))
        time.sleep(0.1)

    # Observed: 200 until ~1.0 s, then 503 on every request.
    assert [t for t in timeline if t[1] != 200] == []
    assert metric_value(gateway.metrics(), "asc_credential_stale_serves_total",
                        credential=CREDENTIAL) > 0


# BUG 3 - BYOK: one tenant's failing own key takes down another tenant's own key.
#
# The keyring keeps a credential per (scope, id): `keys add byok --scope tenant:acme` and
# `--scope tenant:globex` are two separate sealed keys, and the config lets two tenants
# list the same keyring credential id under `credentials:` (nothing refuses it). But the
# key pool (`CredentialPool`, extproc/credentials/pools.py, and the shared
# `asc:cred:health` hash) tracks health per credential *id*, ignoring the scope: after 3
# provider 401s on acme's key, the circuit `byok` is open for everyone and globex, whose
# own key is fine, gets 503 for 30 s. (The same happens when a tenant's own key uses the
# id of a global credential.) A per-tenant isolation failure.
# Reproduce: credentials {byok: {keyring: true}}, tenants acme and globex both
# `credentials: {emu-eu: [byok]}`; add a key per scope, only globex's accepted by the
# provider; 3 acme requests (502 each), then globex: 503 (expected 200 on byok@1).
def test_bug_byok_circuit_is_shared_between_tenants(stack: Stack) -> None:
    _, redis_port = stack.start_redis()
    acme_key, globex_key, global_key = (canary_key("acme"), canary_key("globex"),
                                        canary_key("global"))

    def byok(doc: dict[str, Any]) -> None:
        doc["credentials"]["byok"] = {"keyring": True}
        doc["tenants"]["acme"]["credentials"] = {"emu-eu": ["byok"]}
        doc["tenants"]["globex"].update(zone="eu", models=["gpt-4o-mini"],
                                        credentials={"emu-eu": ["byok"]})

    ring = prepare(stack, keyring_document(redis_port, change=byok), redis_port)
    ring.keys.ok("add", CREDENTIAL, secret=global_key)
    ring.keys.ok("add", "byok", "--scope", "tenant:acme", secret=acme_key)
    ring.keys.ok("add", "byok", "--scope", "tenant:globex", secret=globex_key)
    gateway = ring.start()
    accept_keys(gateway, globex_key, global_key)  # acme's own key was revoked upstream

    first = gateway.chat(key=GLOBEX_KEY)
    assert (first.status_code, first.headers["x-asc-credential"]) == (200, "byok@1")
    acme = [gateway.chat() for _ in range(3)]
    assert [r.status_code for r in acme] == [502] * 3
    globex = gateway.chat(key=GLOBEX_KEY)
    # Observed: 503 "No usable credential for the selected provider." for 30 s.
    assert (globex.status_code, globex.headers.get("x-asc-credential")) == (200, "byok@1")


# BUG 4 - `extproc keys add` seals under a non-derived Transit key without a word.
#
# `TransitKek.verify_context_binding` (extproc/credentials/kek.py) exists because a Transit
# key created without `derived=true` silently ignores the `context`, so the KEK layer stops
# binding each wrapped DEK to its record; its docstring says "`keys` commands run it, not
# the gateway", and docs/credentials.md says `derived=true` is needed. No code calls it
# (grep: only tests/integration uses it): `keys add` against a non-derived key succeeds,
# and the gateway serves from it.
# Reproduce: `bao write -f transit/keys/plain-kek` (not derived), config
# `secrets.kek.key: plain-kek`, `extproc keys add ring-eu` -> exit 0 (expected exit 1 with
# an error naming derived=true, nothing sealed).
def test_bug_keys_add_does_not_check_that_the_transit_key_is_derived(
        stack: Stack, monkeypatch: pytest.MonkeyPatch) -> None:
    t = transit_stack(stack, monkeypatch)
    t.bao.client().secrets.transit.create_key("plain-kek", mount_point="transit")  # derived=no
    monkeypatch.setenv("ASC_TEST_ROOT_TOKEN", t.bao.root_token)
    document = t.ring.document(1)
    document["secrets"]["kek"]["key"] = "plain-kek"
    keys = KeysCli(write_config(stack.workdir / "plain", document))

    result = keys("add", CREDENTIAL, "--token-env", "ASC_TEST_ROOT_TOKEN",
                  secret=canary_key("plain"))

    # Observed: CliResult(code=0, out='global/ring-eu@1: active, fingerprint ...', err='')
    assert result.code == 2, result
    assert "derived" in result.err
    assert t.records() == {}
