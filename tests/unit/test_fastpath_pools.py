"""Credential-pool health kept incrementally (no re-sort per choice): the counts always
equal a recount of the window, and the state follows the window as it rolls."""

from __future__ import annotations

import math
import random

from extproc.credentials.pools import CredentialPool


def test_incremental_counts_equal_a_recount_of_the_rolling_window() -> None:
    rng = random.Random(3)
    pool = CredentialPool(window=30, rng=random.Random(1))
    for _ in range(500):
        choice = pool.choose(["k"], [1])
        status = rng.choice([200, 200, 200, 500, 429])
        pool.record(choice, status, rng.random(), retry_after="0")
        health = pool._of("k")
        answers = list(health.answers)
        assert health.errors == sum(1 for ok, _ in answers if not ok)
        assert health.latencies == sorted(latency for _, latency in answers)


def test_a_slow_window_degrades_and_recovers_as_it_rolls() -> None:
    pool = CredentialPool(window=20, p99_limit_s=0.8, rng=random.Random(1))
    for _ in range(20):
        pool.record(pool.choose(["k"], [1]), 200, 0.9)
    assert pool.state("k") == "degraded"
    for index in range(20):
        pool.record(pool.choose(["k"], [1]), 200, 0.1)
        slow_left = 20 - index - 1
        p99_slow = slow_left > 20 - math.ceil(0.99 * 20)
        assert pool.state("k") == ("degraded" if p99_slow else "closed")
    assert pool.state("k") == "closed"
