"""Key pools: which of a provider's credentials serves the next request.

Each credential has a circuit state from what the provider answered with it:

* `closed`: healthy, chosen by weight;
* `degraded`: p99 latency above 800 ms or more than 2 % errors over the last
  `window` answers; still used, but only when no closed credential is left;
* `open`: `open_after` consecutive 401/403/429; not used for `cooldown_s`;
* `half_open`: after the cool-down one request at a time probes it: a success closes
  it, an auth/quota failure opens it again.

Opens are shared across replicas through Redis (`sync`), so one replica's discovery
that a key was revoked at the provider protects the others too.
"""

from __future__ import annotations

import math
import random
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from extproc import metrics

__all__ = ["CredentialPool", "NoUsableCredential"]

_AUTH_OR_QUOTA: Final = frozenset({401, 403, 429})
_HEALTH_KEY: Final = "asc:cred:health"
_STATES: Final = ("closed", "degraded", "open", "half_open")


class NoUsableCredential(Exception):
    """Every credential of the provider is open (and none is due for a probe)."""


@dataclass
class _Health:
    answers: deque[tuple[bool, float]] = field(default_factory=lambda: deque(maxlen=200))
    consecutive_failures: int = 0
    opened: bool = False
    open_until: float = 0.0
    probing: bool = False


class CredentialPool:
    def __init__(
        self,
        *,
        window: int = 200,
        open_after: int = 3,
        cooldown_s: float = 30.0,
        p99_limit_s: float = 0.8,
        error_rate_limit: float = 0.02,
        clock: Callable[[], float] = time.time,
        rng: random.Random | None = None,
    ) -> None:
        self._window = window
        self._open_after = open_after
        self._cooldown_s = cooldown_s
        self._p99_limit_s = p99_limit_s
        self._error_rate_limit = error_rate_limit
        self._clock = clock
        self._rng = rng or random.Random()  # noqa: S311 - load spreading, not security
        self._health: dict[str, _Health] = {}

    def _of(self, credential: str) -> _Health:
        health = self._health.get(credential)
        if health is None:
            health = self._health[credential] = _Health(answers=deque(maxlen=self._window))
        return health

    def state(self, credential: str) -> str:
        health = self._of(credential)
        if health.opened:
            return "open" if health.open_until > self._clock() else "half_open"
        answers = health.answers
        if len(answers) >= 20:
            errors = sum(1 for ok, _ in answers if not ok)
            latencies = sorted(latency for _, latency in answers)
            p99 = latencies[min(len(latencies) - 1, math.ceil(0.99 * len(latencies)) - 1)]
            if errors / len(answers) > self._error_rate_limit or p99 > self._p99_limit_s:
                return "degraded"
        return "closed"

    def choose(self, credentials: Sequence[str], weights: Sequence[int]) -> str:
        """A credential for the next request: closed by weight, then degraded, then one
        half-open probe at a time."""
        states = [self.state(c) for c in credentials]
        for wanted in ("closed", "degraded"):
            pool = [(c, w) for c, w, s in zip(credentials, weights, states, strict=True)
                    if s == wanted and w > 0]
            if len(pool) == 1:
                return pool[0][0]
            if pool:
                return self._rng.choices([c for c, _ in pool], [w for _, w in pool])[0]
        for credential, state in zip(credentials, states, strict=True):
            health = self._of(credential)
            if state == "half_open" and not health.probing:
                health.probing = True
                return credential
        raise NoUsableCredential("every credential of the provider is open")

    def record(self, credential: str, status: int, latency_s: float) -> None:
        health = self._of(credential)
        ok = status < 500 and status not in _AUTH_OR_QUOTA
        health.answers.append((ok, latency_s))
        health.probing = False
        if status in _AUTH_OR_QUOTA:
            health.consecutive_failures += 1
            if health.opened or health.consecutive_failures >= self._open_after:
                health.opened = True
                health.open_until = self._clock() + self._cooldown_s
        elif ok:
            health.consecutive_failures = 0
            health.opened = False
        self._publish_state(credential)

    def _publish_state(self, credential: str) -> None:
        current = self.state(credential)
        for name in _STATES:
            metrics.CREDENTIAL_STATE.labels(credential, name).set(1 if name == current else 0)

    async def sync(self, client: Any) -> None:
        """Share opens with other replicas: push ours, adopt theirs (one round trip each)."""
        now = self._clock()
        mine = {c: h.open_until for c, h in self._health.items() if h.open_until > now}
        if mine:
            await client.hset(_HEALTH_KEY, mapping={c: str(t) for c, t in mine.items()})
        theirs = await client.hgetall(_HEALTH_KEY)
        for raw_credential, raw_until in theirs.items():
            credential = (raw_credential.decode() if isinstance(raw_credential, bytes)
                          else str(raw_credential))
            until = float(raw_until)
            health = self._of(credential)
            if until > health.open_until and until > now:
                health.opened = True
                health.open_until = until
                self._publish_state(credential)
