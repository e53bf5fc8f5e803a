"""Polling instead of sleeping: tests wait for what they need to see, within a bound."""

from __future__ import annotations

import time
from collections.abc import Callable


def wait_for(predicate: Callable[[], object], timeout: float = 10.0,
             interval: float = 0.05) -> bool:
    """True as soon as `predicate()` is truthy; False once `timeout` seconds have passed."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return False
