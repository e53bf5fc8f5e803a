"""Scenario 8: the rotation drill under 4 concurrent clients with 3 replicas: stage,
canary, promote, revoke of a good key, then a bad canary (a version the provider refuses).
0 client errors throughout, the bad canary's refusals retried on the active version and
rolled back automatically; the revoked key never reaches the provider again.
10 s of load in `make test`, 30 s in `make soak`.

The replicas are three Envoy + extproc pairs (the sidecar topology) sharing Redis: a
canary request goes through the per-attempt ext_proc, whose stream must reach the process
that handled the request (decision 0065), or be rebuilt from forwarded metadata where it
lands (decision 0135): `test_per_stream_balancing_keeps_canary_retries` below spreads
streams of one Envoy over three processes.
Related (one replica): tests/e2e/test_credentials.py (the drill),
tests/e2e/test_failover_canary.py (the bad canary).
"""

from __future__ import annotations

import collections
import time

import pytest

from extproc.devstack import Stack
from tests.e2e.test_credentials import (
    CREDENTIAL,
    bearer,
    canary_key,
    keyring_document,
    list_rows,
    prepare,
    seen_keys,
)
from tests.polling import wait_for
from tests.reliability.conftest import Load, Replicas, add_pair, figure, start_replicas

ROLLED_BACK = '"msg":"canary rolled back after provider auth failures"'
ON = f"{CREDENTIAL}@"


def accept(fleet: Replicas, *keys: str) -> None:
    response = fleet.emulator.client.put("/_emulator/keys", json={"keys": list(keys)})
    assert response.status_code == 204, response.text


def rolled_back(fleet: Replicas) -> bool:
    return any(ROLLED_BACK in p.log_text() for p in fleet.extprocs)


def progress(load: Load, condition: object, timeout: float = 30) -> int:
    """Waits (bounded) until `condition(results so far)` holds; how many results then."""
    assert callable(condition)
    assert wait_for(lambda: condition(load.snapshot()), timeout=timeout)
    return len(load.snapshot())


@pytest.mark.parametrize("seconds", [10, pytest.param(30, marks=pytest.mark.soak)])
def test_rotation_drill_with_three_replicas_and_a_bad_canary_has_no_client_errors(
        stack: Stack, seconds: int) -> None:
    redis_port = stack.start_redis()[1]
    v1, v2, v3 = canary_key("v1"), canary_key("v2"), canary_key("v3-bad")
    document = keyring_document(redis_port, secrets={"rollback_after": 3})
    ring = prepare(stack, document, redis_port)
    ring.keys.ok("add", CREDENTIAL, secret=v1)
    # Every request of the drill stays in the emulator's log (the default keeps 10,000:
    # the 30 s drill sent more, and the first refusals of the bad canary were gone).
    fleet = start_replicas(stack, document, redis_port=redis_port, replicas=1,
                           emulator_args=("--record-limit", "1000000"))
    urls = [fleet.base_url, add_pair(fleet, 1), add_pair(fleet, 2)]
    accept(fleet, v1)

    started = time.monotonic()
    with Load(urls, clients=4) as load:
        progress(load, lambda r: len(r) >= 20)
        ring.keys.ok("add", CREDENTIAL, secret=v2)  # staged
        accept(fleet, v1, v2)
        ring.keys.ok("rotate", "canary", CREDENTIAL, "--version", "2", "--percent", "30")
        progress(load, lambda r: any(x.credential == ON + "2" for x in r))
        ring.keys.ok("rotate", "promote", CREDENTIAL)
        # Every replica followed the promote: 40 answers in a row on v2 (4 clients, 3 Envoys).
        progress(load, lambda r: len(r) >= 40 and all(x.credential == ON + "2" for x in r[-40:]))
        ring.keys.ok("rotate", "revoke", CREDENTIAL, "--version", "1")
        accept(fleet, v2)  # v1 is revoked at the provider; v3 will never be accepted
        revoked_at = len(fleet.emulator.requests())
        ring.keys.ok("add", CREDENTIAL, secret=v3)
        ring.keys.ok("rotate", "canary", CREDENTIAL, "--version", "3", "--percent", "50")
        after_bad = progress(load, lambda _: rolled_back(fleet))
        progress(load, lambda r: len(r) >= after_bad + 40)
        # The load runs `seconds` in all: a duration, not a wait for an event.
        time.sleep(max(0.0, seconds - (time.monotonic() - started)))
    results = load.snapshot()
    errors = [(r.status, r.body[:200]) for r in results if r.status != 200]
    served = collections.Counter(r.credential for r in results)
    provider_saw = seen_keys(fleet.emulator.requests())
    figure(f"rotation_drill_{seconds}s_client_errors", f"{len(errors)}/{len(results)}")
    figure(f"rotation_drill_{seconds}s_answers_by_version",
           dict(sorted((k or "-", v) for k, v in served.items())))
    figure(f"rotation_drill_{seconds}s_bad_canary_refusals_retried",
           provider_saw.count(bearer(v3)))

    assert errors == []
    assert set(served) == {ON + "1", ON + "2"}  # the bad canary never answered a client
    assert provider_saw.count(bearer(v3)) >= 3  # refused, retried, counted to rollback
    assert bearer(v1) not in provider_saw[revoked_at:]
    rows = list_rows(ring.keys.ok("list"))
    assert [rows[(f"global/{CREDENTIAL}", v)][0] for v in (1, 2, 3)] == [
        "revoked", "active", "staged(failed canary)"]
    assert len({r["replica"] for r in fleet.records()}) == 3  # every replica served


def test_per_stream_balancing_keeps_canary_retries(stack: Stack) -> None:
    """Regression (decision 0135): a request's per-attempt ext_proc stream may reach
    another of the three processes than its router-level stream; the canary's retry is
    rebuilt there from the forwarded metadata and the client's body."""
    redis_port = stack.start_redis()[1]
    v1, v2 = canary_key("v1"), canary_key("v2-bad")
    document = keyring_document(redis_port, secrets={"rollback_after": 1000})
    ring = prepare(stack, document, redis_port)
    ring.keys.ok("add", CREDENTIAL, secret=v1)
    fleet = start_replicas(stack, document, redis_port=redis_port)  # 3 behind one Envoy
    accept(fleet, v1)
    ring.keys.ok("add", CREDENTIAL, secret=v2)
    ring.keys.ok("rotate", "canary", CREDENTIAL, "--version", "2", "--percent", "50")
    responses = [fleet.chat() for _ in range(60)]
    assert [r.status_code for r in responses] == [200] * 60
    assert {r.headers["x-asc-credential"] for r in responses} == {ON + "1"}
    assert not any("x-asc-attempt" in r.headers for r in responses)
    provider_saw = seen_keys(fleet.emulator.requests())
    refused = provider_saw.count(bearer(v2))
    assert refused >= 1  # the canary was tried, refused and retried on the active key
    assert provider_saw.count(bearer(v1)) == 60
    assert len(provider_saw) == 60 + refused
    records = fleet.records()
    assert len(records) == 60
    assert all(r["credential"] == ON + "1" for r in records)
    retried = [r["attempts"] for r in records if r.get("attempts")]
    assert len(retried) == refused  # each refusal retried once, in whichever process
    for attempts in retried:
        first, second = attempts
        assert first["attempt"] == 1
        assert first["left"] in ("status 401", "retried")  # "retried": made elsewhere
        assert (second["attempt"], second["status"], second["credential"], second["left"]) \
            == (2, 200, ON + "1", None)
