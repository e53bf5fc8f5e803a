"""Key pools: which of a provider's credentials serves the next request.

Each scoped credential (`global/<id>` or `tenant:<t>/<id>`) has two independent kinds of
state, because they answer different questions:

* **Is the key itself good?** One `extproc.breaker.CircuitBreaker` per credential:
  `open_after` consecutive provider 401/403 *that are about the key* (no client-controlled
  input reached the provider: `key_evidence`) open it for `cooldown_s`; then one request
  probes it (`half_open`): its success closes it, another 401/403 opens it again, and a
  request that ends without a verdict (refused by budget, cancelled, key unavailable, a
  canary version, a 5xx) gives the probe back (`release`).
* **Is the key usable right now?**
  - `degraded`: p99 latency above 800 ms or more than 2 % errors (5xx and key 401/403)
    over the last `window` answers; used only when no closed credential is left;
  - *cooling down*: the provider answered 429. A 429 never opens a credential (a client
    can cause one, e.g. "request too large", so it says nothing about the key); it only
    makes the pool prefer other credentials until `retry-after` (seconds or HTTP date,
    at most `max_retry_after_s`, `default_retry_after_s` when absent) has passed. When
    every usable credential is cooling down, the one whose cool-down ends first is still
    used: the provider, not the gateway, decides whether it is still limited, and its own
    429 and `retry-after` reach the client. docs/credentials.md explains the choice.

Opens are shared across replicas through Redis (`sync`), so one replica's discovery that
a key was revoked at the provider protects the others too. Cool-downs stay per replica.
"""

from __future__ import annotations

import bisect
import email.utils
import math
import random
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from extproc import metrics
from extproc.breaker import CircuitBreaker, Permit, share_opens

__all__ = ["Choice", "CredentialPool", "NoUsableCredential", "retry_after_seconds"]

_KEY_REFUSED: Final = frozenset({401, 403})
_RATE_LIMITED: Final = 429
_HEALTH_KEY: Final = "asc:cred:health"
_STATES: Final = ("closed", "degraded", "open", "half_open")
_MIN_ANSWERS_FOR_DEGRADED: Final = 20


class NoUsableCredential(Exception):
    """Every credential of the provider is open (and none is due for a probe)."""


@dataclass(frozen=True, slots=True)
class Choice:
    """The credential for one request and the breaker permit it holds; the permit goes
    back with the verdict (`record`) or without one (`release`)."""

    credential: str
    permit: Permit


@dataclass(slots=True)
class _Health:
    breaker: CircuitBreaker
    answers: deque[tuple[bool, float]] = field(default_factory=deque)
    cool_until: float = 0.0
    errors: int = 0
    """Failed answers in `answers`, kept as answers come and go."""
    latencies: list[float] = field(default_factory=list)
    """The latencies of `answers`, kept sorted (insort / remove as answers come and go)."""
    published: str = ""
    """The state last written to the `asc_credential_state` gauges."""

    def add(self, ok: bool, latency_s: float) -> None:
        """One answer into the window, its counts updated incrementally: `state()` then
        reads them instead of re-summing and re-sorting the window on every choice."""
        answers = self.answers
        if answers.maxlen is not None and len(answers) == answers.maxlen:
            old_ok, old_latency = answers[0]
            self.errors -= not old_ok
            del self.latencies[bisect.bisect_left(self.latencies, old_latency)]
        answers.append((ok, latency_s))
        self.errors += not ok
        bisect.insort(self.latencies, latency_s)


def retry_after_seconds(value: str | None, *, now: float, default: float,
                        limit: float) -> float:
    """Seconds a `retry-after` header asks for, within [0, limit]; `default` when absent
    or unreadable. Accepts delta-seconds (also fractional, as some providers send) and
    HTTP dates (RFC 9110 §10.2.3), which count from `now` (epoch seconds)."""
    if value is None or not value.strip():
        return min(default, limit)
    text = value.strip()
    try:
        seconds = float(text)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(text)
        except (TypeError, ValueError, IndexError):
            return min(default, limit)
        if when.tzinfo is None:  # an HTTP date is always GMT
            return min(default, limit)
        seconds = when.timestamp() - now
    if not math.isfinite(seconds):
        return min(default, limit)
    return max(0.0, min(seconds, limit))


class CredentialPool:
    def __init__(
        self,
        *,
        window: int = 200,
        open_after: int = 3,
        cooldown_s: float = 30.0,
        p99_limit_s: float = 0.8,
        error_rate_limit: float = 0.02,
        default_retry_after_s: float = 1.0,
        max_retry_after_s: float = 60.0,
        clock: Callable[[], float] = time.time,
        rng: random.Random | None = None,
    ) -> None:
        self._window = window
        self._open_after = open_after
        self._cooldown_s = cooldown_s
        self._p99_limit_s = p99_limit_s
        self._error_rate_limit = error_rate_limit
        self._default_retry_after_s = default_retry_after_s
        self._max_retry_after_s = max_retry_after_s
        # Wall clock by default: opens are shared with other replicas as epoch times.
        self._clock = clock
        self._rng = rng or random.Random()  # noqa: S311 - load spreading, not security
        self._health: dict[str, _Health] = {}

    def _of(self, credential: str) -> _Health:
        health = self._health.get(credential)
        if health is None:
            breaker = CircuitBreaker(threshold=self._open_after, cooldown_s=self._cooldown_s,
                                     clock=self._clock)
            health = self._health[credential] = _Health(breaker, deque(maxlen=self._window))
        return health

    def state(self, credential: str) -> str:
        """closed, degraded, open or half_open (cooling down is separate: `cooling_until`)."""
        health = self._of(credential)
        breaker_state = health.breaker.state
        if breaker_state != "closed":
            return breaker_state
        latencies = health.latencies
        count = len(latencies)
        if count >= _MIN_ANSWERS_FOR_DEGRADED:
            p99 = latencies[min(count - 1, math.ceil(0.99 * count) - 1)]
            if health.errors / count > self._error_rate_limit or p99 > self._p99_limit_s:
                return "degraded"
        return "closed"

    def breaker_state(self, credential: str) -> str:
        """closed, open or half_open: the key's breaker alone, without the latency window
        that `state` sorts (routing asks this for every candidate of every request)."""
        health = self._health.get(credential)
        return "closed" if health is None else health.breaker.state

    def cooling_until(self, credential: str) -> float | None:
        """When this credential's 429 cool-down ends (pool clock), or None."""
        until = self._of(credential).cool_until
        return until if until > self._clock() else None

    def choose(self, credentials: Sequence[str], weights: Sequence[int]) -> Choice:
        """A credential for the next request, in this order: closed by weight, degraded by
        weight (both skipping credentials cooling down), one half-open probe, and last
        the cooling-down credential whose cool-down ends first."""
        now = self._clock()
        states = [self.state(c) for c in credentials]
        cooling = [self._of(c).cool_until > now for c in credentials]
        candidates = list(zip(credentials, weights, states, cooling, strict=True))
        for wanted in ("closed", "degraded"):
            pool = [(c, w) for c, w, s, cool in candidates if s == wanted and w > 0 and not cool]
            if pool:
                chosen = pool[0][0] if len(pool) == 1 else self._rng.choices(
                    [c for c, _ in pool], [w for _, w in pool])[0]
                return self._take(chosen)
        for credential, _, state, _ in candidates:
            if state == "half_open":
                permit = self._of(credential).breaker.allow()
                if permit is not None:
                    self._publish_state(credential)
                    return Choice(credential, permit)
        usable = [(self._of(c).cool_until, c) for c, w, s, cool in candidates
                  if cool and w > 0 and s in ("closed", "degraded")]
        if usable:
            return self._take(min(usable)[1])
        raise NoUsableCredential("every credential of the provider is open")

    def _take(self, credential: str) -> Choice:
        permit = self._of(credential).breaker.allow()
        if permit is None:  # cannot happen for a closed breaker; stay safe if it did
            raise NoUsableCredential("every credential of the provider is open")
        return Choice(credential, permit)

    def record(self, choice: Choice, status: int, latency_s: float, *,
               key_evidence: bool = True, retry_after: str | None = None) -> None:
        """What the provider answered on `choice`; gives its permit back with a verdict.

        `key_evidence` False means client-controlled input reached the provider, so a
        401/403 may be the client's doing: it neither opens the credential nor counts as
        an error. A 429 starts a cool-down and proves the key is accepted.
        """
        health = self._of(choice.credential)
        breaker = health.breaker
        if status in _KEY_REFUSED and key_evidence:
            health.add(False, latency_s)
            breaker.failure(choice.permit)
        elif status in _KEY_REFUSED or status >= 500:
            # Nothing learnt about the key: a 5xx is the provider's trouble (and counts
            # as an error for `degraded`), a client-caused 401/403 is the client's.
            if status >= 500:
                health.add(False, latency_s)
            breaker.release(choice.permit)
        else:
            if status == _RATE_LIMITED:
                now = self._clock()
                wait = retry_after_seconds(retry_after, now=now,
                                           default=self._default_retry_after_s,
                                           limit=self._max_retry_after_s)
                health.cool_until = max(health.cool_until, now + wait)
            else:
                health.add(True, latency_s)
            breaker.success(choice.permit)
        self._publish_state(choice.credential)

    def release(self, choice: Choice) -> None:
        """The request ended without a verdict on the key: its probe (if any) goes back."""
        self._of(choice.credential).breaker.release(choice.permit)
        if choice.permit.probe:
            self._publish_state(choice.credential)

    def _publish_state(self, credential: str) -> None:
        """The gauges follow the state; written only when it changed (four gauge writes
        per answer otherwise)."""
        current = self.state(credential)
        health = self._of(credential)
        if health.published == current:
            return
        health.published = current
        for name in _STATES:
            metrics.CREDENTIAL_STATE.labels(credential, name).set(1 if name == current else 0)

    async def sync(self, client: Any) -> None:
        """Share opens with other replicas: push ours, adopt theirs (one round trip each)."""
        breakers = {name: health.breaker for name, health in self._health.items()}
        for credential in await share_opens(client, _HEALTH_KEY, breakers, self._clock(),
                                            lambda name: self._of(name).breaker):
            self._publish_state(credential)
