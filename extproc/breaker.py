"""One circuit breaker for everything the gateway calls that can fail: the budget ledger
(Redis) and each provider credential.

* `closed`: calls pass. `threshold` consecutive failures open it.
* `open`: calls are refused until `cooldown_s` has passed (or `open_until`, when another
  replica shared a longer open through `trip`).
* `half_open`: after the cool-down exactly one caller gets a *probe* permit. Its verdict
  closes the breaker (`success`) or opens it again (`failure`). A probe that ends without a
  verdict - the request was refused for another reason, cancelled, or its client left -
  must be given back with `release`, or the breaker would wait for a verdict forever.

`allow()` returns a `Permit` (or None when refused); the caller hands the same permit back
with its verdict. Permits are cheap, plain values: a closed breaker returns one shared
permit, so the hot path allocates nothing.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final, Literal

__all__ = ["CircuitBreaker", "Permit", "State", "share_opens"]

State = Literal["closed", "open", "half_open"]


@dataclass(frozen=True, slots=True)
class Permit:
    """Leave to call once; `probe` is True for the one half-open trial call."""

    probe: bool


_PASS: Final = Permit(probe=False)
_PROBE: Final = Permit(probe=True)


class CircuitBreaker:
    __slots__ = ("_clock", "_failures", "_open_until", "_probing", "cooldown_s", "threshold")

    def __init__(self, *, threshold: int = 3, cooldown_s: float = 2.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if threshold < 1:
            raise ValueError("threshold must be at least 1")
        self.threshold = threshold
        self.cooldown_s = cooldown_s
        self._clock = clock
        self._failures = 0
        self._open_until: float | None = None
        self._probing = False

    @property
    def state(self) -> State:
        if self._open_until is None:
            return "closed"
        return "open" if self._clock() < self._open_until else "half_open"

    @property
    def is_open(self) -> bool:
        """Open or half-open: not (yet) known to be healthy again."""
        return self._open_until is not None

    @property
    def open_until(self) -> float | None:
        return self._open_until

    def allow(self) -> Permit | None:
        """A permit to call, or None: open, or half-open with its probe already out."""
        if self._open_until is None:
            return _PASS
        if self._probing or self._clock() < self._open_until:
            return None
        self._probing = True
        return _PROBE

    def success(self, permit: Permit) -> None:
        """The call worked: the breaker closes (a probe's success or any later one)."""
        self._failures = 0
        self._open_until = None
        if permit.probe:
            self._probing = False

    def failure(self, permit: Permit) -> None:
        """The call failed in a way that says the dependency is unhealthy."""
        self._failures += 1
        if permit.probe:
            self._probing = False
        if permit.probe or self._failures >= self.threshold:
            self._open_until = self._clock() + self.cooldown_s

    def release(self, permit: Permit) -> None:
        """The call ended without a verdict (cancelled, refused for another reason, never
        made): a probe permit goes back so the next caller can probe."""
        if permit.probe:
            self._probing = False

    def trip(self, until: float) -> None:
        """Open until `until` (another replica's open, shared through Redis)."""
        if self._open_until is None or until > self._open_until:
            self._open_until = until
            self._failures = max(self._failures, self.threshold)

    def __repr__(self) -> str:
        return f"CircuitBreaker({self.state}, failures={self._failures})"


async def share_opens(client: Any, hash_key: str, breakers: Mapping[str, CircuitBreaker],
                      now: float, adopt: Callable[[str], CircuitBreaker]) -> list[str]:
    """Share open breakers with other replicas through one Redis hash: push ours (name ->
    open-until, epoch seconds), adopt theirs. Returns the names whose breaker an other
    replica's open just tripped here (for the caller's state gauges).

    The breakers must run on the wall clock (`time.time`): open-until times are compared
    across processes. One HSET (when something is open) and one HGETALL per call.
    """
    mine = {name: repr(until) for name, breaker in breakers.items()
            if (until := breaker.open_until) is not None and until > now}
    if mine:
        await client.hset(hash_key, mapping=mine)
    tripped = []
    for raw_name, raw_until in (await client.hgetall(hash_key)).items():
        name = raw_name.decode() if isinstance(raw_name, bytes) else str(raw_name)
        until = float(raw_until)
        breaker = adopt(name)
        known = breaker.open_until
        if until > now and (known is None or until > known):
            breaker.trip(until)
            tripped.append(name)
    return tripped
