"""`extproc.breaker.CircuitBreaker`: the one breaker behind budgets and credential pools."""

from __future__ import annotations

import pytest

from extproc.breaker import CircuitBreaker
from tests.clock import StepClock


@pytest.fixture
def clock() -> StepClock:
    return StepClock()


@pytest.fixture
def breaker(clock: StepClock) -> CircuitBreaker:
    return CircuitBreaker(threshold=3, cooldown_s=2.0, clock=clock)


def fail(breaker: CircuitBreaker, times: int) -> None:
    for _ in range(times):
        permit = breaker.allow()
        assert permit is not None
        breaker.failure(permit)


def test_closed_breaker_allows_and_counts_only_consecutive_failures(
        breaker: CircuitBreaker) -> None:
    fail(breaker, 2)
    permit = breaker.allow()
    assert permit is not None
    assert permit.probe is False
    breaker.success(permit)
    fail(breaker, 2)
    assert breaker.state == "closed"
    fail(breaker, 1)
    assert breaker.state == "open"
    assert breaker.allow() is None


def test_after_cooldown_exactly_one_probe_then_its_verdict_decides(
        breaker: CircuitBreaker, clock: StepClock) -> None:
    fail(breaker, 3)
    clock.now += 1.999
    assert breaker.allow() is None
    clock.now += 0.001
    assert breaker.state == "half_open"
    probe = breaker.allow()
    assert probe is not None
    assert probe.probe is True
    assert breaker.allow() is None  # one probe at a time
    breaker.failure(probe)
    assert breaker.state == "open"
    assert breaker.open_until == pytest.approx(clock.now + 2.0)
    clock.now += 2.0
    probe = breaker.allow()
    assert probe is not None
    assert probe.probe is True
    breaker.success(probe)
    assert breaker.state == "closed"
    assert breaker.allow() is not None


def test_released_probe_lets_the_next_caller_probe(
        breaker: CircuitBreaker, clock: StepClock) -> None:
    fail(breaker, 3)
    clock.now += 2.0
    probe = breaker.allow()
    assert probe is not None
    assert probe.probe
    assert breaker.allow() is None
    breaker.release(probe)  # e.g. the request was refused by its budget, or cancelled
    assert breaker.state == "half_open"
    again = breaker.allow()
    assert again is not None
    assert again.probe


def test_releasing_a_plain_permit_changes_nothing(breaker: CircuitBreaker) -> None:
    fail(breaker, 2)
    permit = breaker.allow()
    assert permit is not None
    breaker.release(permit)
    fail(breaker, 1)
    assert breaker.state == "open"  # the release did not reset the count


def test_trip_opens_until_the_shared_deadline_and_never_shortens_it(
        breaker: CircuitBreaker, clock: StepClock) -> None:
    breaker.trip(clock.now + 30)
    assert breaker.state == "open"
    breaker.trip(clock.now + 5)
    assert breaker.open_until == clock.now + 30
    clock.now += 30
    probe = breaker.allow()
    assert probe is not None
    assert probe.probe


def test_threshold_must_be_positive() -> None:
    with pytest.raises(ValueError, match="threshold"):
        CircuitBreaker(threshold=0)
