"""A canary key version the provider refuses costs clients nothing: each 401 on the canary
is retried once, by Envoy, on the active version (the per-attempt ext_proc re-keys it),
and the refusals still count toward the automatic rollback. Real Envoy, Redis, file KEK,
emulator; 4 concurrent clients."""

from __future__ import annotations

from extproc.devstack import Stack
from tests.e2e.test_credentials import (
    CREDENTIAL,
    Load,
    accept_keys,
    bearer,
    canary_key,
    keyring_document,
    list_rows,
    log_events,
    prepare,
    seen_keys,
)
from tests.e2e.test_credentials import redis_port as redis_port


def test_bad_canary_under_4_clients_gives_0_client_errors_then_rolls_back(
        stack: Stack, redis_port: int) -> None:
    rollback_after = 3
    v1, v2 = canary_key("v1"), canary_key("v2")
    ring = prepare(stack, keyring_document(
        redis_port, secrets={"rollback_after": rollback_after}), redis_port)
    ring.keys.ok("add", CREDENTIAL, secret=v1)
    gateway = ring.start()
    accept_keys(gateway, v1)  # v2 was never valid at the provider
    assert gateway.chat().status_code == 200
    ring.keys.ok("add", CREDENTIAL, secret=v2)
    with Load(gateway.base_url, threads=4, rate=20.0, duration=12.0) as load:
        load.wait_for(lambda samples: len(samples) >= 8)
        ring.keys.ok("rotate", "canary", CREDENTIAL, "--version", "2", "--percent", "50")
        load.wait_for(lambda _: bool(log_events(
            gateway, "canary rolled back after provider auth failures")))
        rolled_back_at = load.wait_for(lambda _: True)
        load.wait_for(lambda samples: len(samples) >= rolled_back_at + 40)
    samples = load.samples
    assert [(s.status, s.body) for s in samples if s.status != 200] == []
    # Every answer is on the active version: a canary refusal was retried on v1.
    assert {s.credential for s in samples} == {f"{CREDENTIAL}@1"}
    refused = seen_keys(gateway.emulator.requests()).count(bearer(v2))
    assert refused >= rollback_after
    rows = list_rows(ring.keys.ok("list"))
    assert rows[(f"global/{CREDENTIAL}", 1)][0] == "active"
    assert rows[(f"global/{CREDENTIAL}", 2)][0] == "staged(failed canary)"
    retried = [e for e in log_events(gateway, "request finished")
               if e.get("attempts") and len(e["attempts"]) == 2]
    assert len(retried) == refused
    for event in retried:
        first, second = event["attempts"]
        assert (first["credential"], first["status"], first["left"]) == (
            f"{CREDENTIAL}@2", 401, "status 401")
        assert (second["credential"], second["status"], second["left"]) == (
            f"{CREDENTIAL}@1", 200, None)
