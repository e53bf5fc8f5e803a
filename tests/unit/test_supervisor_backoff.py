"""The supervisor's restart back-off (`extproc.server.RestartBackoff`): pure logic."""

from __future__ import annotations

from extproc.server import RestartBackoff


def test_delays_double_up_to_the_cap_while_the_worker_dies_young() -> None:
    backoff = RestartBackoff(base_s=0.5, cap_s=30.0, healthy_after_s=10.0)
    delays = [backoff.delay(ran_for_s=0.2) for _ in range(9)]
    assert delays == [0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0, 30.0]


def test_a_healthy_run_starts_the_sequence_again() -> None:
    backoff = RestartBackoff(base_s=0.5, cap_s=30.0, healthy_after_s=10.0)
    assert [backoff.delay(ran_for_s=1.0) for _ in range(3)] == [0.5, 1.0, 2.0]
    assert backoff.delay(ran_for_s=10.0) == 0.5
    assert backoff.delay(ran_for_s=9.9) == 1.0
