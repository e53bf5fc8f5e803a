"""Scenario 4: the KMS (OpenBao Transit) slow, then down, under three replicas.

Slow (every Transit call takes 1 s, through a relay) with the key cache expired and 120
requests in flight over three replicas: 0 errors, and no stampede - at most one decrypt
per replica. Down:
each replica keeps serving its cached key until `max_age_s` (each cache ages on its own),
then answers 503 JSON and sends nothing more to the provider.
Related (one replica): tests/e2e/test_credentials_transit.py
(test_kms_down_fails_closed_after_max_age_with_an_audited_503,
test_a_hundred_requests_on_an_expired_cache_make_one_transit_decrypt).
"""

from __future__ import annotations

import collections
import json
import time
from typing import Any

import pytest

from extproc.devstack import Stack
from tests.e2e.test_credentials import CREDENTIAL, UNAVAILABLE, canary_key
from tests.e2e.test_credentials_transit import as_operator, transit_stack
from tests.openbao import CountingProxy
from tests.polling import wait_for
from tests.reliability.conftest import REPLICAS, burst, figure, start_replicas

CACHE_TTL_S, MAX_AGE_S = 1, 4


def test_kms_slow_then_down_under_three_replicas(
        stack: Stack, monkeypatch: pytest.MonkeyPatch) -> None:
    t = transit_stack(stack, monkeypatch, cache_ttl_s=CACHE_TTL_S, max_age_s=MAX_AGE_S)
    provider_key = canary_key("kms")
    t.ring.keys.ok(*as_operator("add", CREDENTIAL), secret=provider_key)
    proxy = CountingProxy(int(t.bao.url.rsplit(":", 1)[1]), delay=1.0)
    direct = t.ring.document

    def via_proxy(emulator_port: int) -> dict[str, Any]:
        document = direct(emulator_port)
        document["secrets"]["kek"]["url"] = f"http://127.0.0.1:{proxy.port}"
        return document

    try:
        fleet = start_replicas(stack, via_proxy, redis_port=t.ring.redis_port)
        response = fleet.emulator.client.put("/_emulator/keys", json={"keys": [provider_key]})
        assert response.status_code == 204
        # Warm every replica (round robin), then let the cache TTL pass.
        assert [fleet.chat().status_code for _ in range(REPLICAS)] == [200] * REPLICAS
        warm = proxy.decrypts
        expired_at = time.monotonic() + CACHE_TTL_S + 0.1
        assert wait_for(lambda: time.monotonic() > expired_at)  # the TTL this test set

        slow = burst(fleet.base_url, 120, body={"model": "gpt-4o-mini", "messages": [
            {"role": "user", "content": "Hello there"}]})
        refreshes = proxy.decrypts - warm

        # Fresh keys on every replica (the TTL passes, one request each) so that each
        # cache has its whole max age ahead when the KMS goes down.
        proxy.delay = 0.0
        fresh_at = time.monotonic() + CACHE_TTL_S + 0.1
        assert wait_for(lambda: time.monotonic() > fresh_at)
        assert [fleet.chat().status_code for _ in range(REPLICAS)] == [200] * REPLICAS

        # Down: OpenBao stopped (the relay's pooled connections would still reach it).
        proxy.refuse = True  # new connections: a 503 from the relay itself
        t.bao.process.stop()
        down_at = time.monotonic()
        down_wall = time.time()
        timeline: list[tuple[float, int, str]] = []
        while time.monotonic() < down_at + MAX_AGE_S + 15:  # a bound, not a pace
            answer = fleet.chat()
            timeline.append((time.monotonic() - down_at, answer.status_code, answer.text))
            if [s for _, s, _ in timeline[-6:]] == [503] * 6:
                break
    finally:
        proxy.close()

    statuses = [s for _, s, _ in timeline]
    first_503 = statuses.index(503)
    # Each replica's cache ages on its own: per replica, 200s from its cache, then 503s.
    per_replica: dict[str, list[int]] = collections.defaultdict(list)
    for record in sorted(fleet.records(), key=lambda r: r["ts"]):
        if record["ts"] >= down_wall:
            per_replica[record["replica"]].append(record["status"])
    figure("kms_slow_errors", f"{sum(1 for o in slow if o.status != 200)}/{len(slow)}")
    figure("kms_slow_decrypts_for_120_requests_over_3_replicas", refreshes)
    figure("kms_down_served_from_cache_then_503_after_s", f"{timeline[first_503][0]:.1f}"
           f" (max_age_s {MAX_AGE_S})")

    assert collections.Counter(o.status for o in slow) == {200: 120}
    assert 1 <= refreshes <= REPLICAS  # no stampede: one unwrap per replica at most
    assert first_503 > 0  # the cache served while the KMS was down
    assert len(per_replica) == REPLICAS
    for seen in per_replica.values():
        served_from_cache = seen.index(503)
        assert served_from_cache > 0
        assert seen[served_from_cache:] == [503] * len(seen[served_from_cache:])  # closed
    assert all(json.loads(text) == UNAVAILABLE for _, s, text in timeline if s == 503)
    assert timeline[first_503][0] < MAX_AGE_S + 10  # generous; the figure is the measure
    served = len(fleet.emulator.requests())
    assert served == 2 * REPLICAS + 120 + statuses.count(200)  # nothing went out after a 503
