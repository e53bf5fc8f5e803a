"""A clock the test moves by hand: breakers, pools and caches take it instead of time."""

from __future__ import annotations


class StepClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now
