"""Passive health of deployments (provider x upstream model): one circuit breaker each.

Routing (`extproc.routing.select`) skips a deployment whose breaker is open, and one whose
provider has no usable credential (the credential pool's own breakers). A request that is
sent to a deployment holds a `Permit` from `allow` until it reports what came back
(`record`) or ends without a verdict (`release`, from `finish()`), so a half-open probe is
never lost - the same discipline as the credential pools.

What counts as a failure: an answer with status >= 500 (Envoy's own 503 for a reset or a
refused connection included, and 529), no answer at all (`status=None`), and, when
`slow_ms` is set, response headers later than that. A 429 says the key or the account is
rate limited, not that the deployment is down: it is no verdict (the credential pool cools
the key down). Any other answer is a success and closes the breaker.

Opens are shared across replicas through Redis (`sync`, called by the server's key-sync
loop every second), as the credential pools share theirs: one replica that saw a region
fail keeps every replica off it for the cool-down. Times are epoch seconds for that reason.

Optional **active probes** (`deployments[].probe`, off by default): `ActiveProber` sends a
periodic GET without credentials to the provider's base URL + path and reports it like an
answer, with a permit of its own. So a half-open deployment's probe can be this GET
instead of a client's request, and a region that stops answering opens without clients
paying for it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

from extproc import metrics
from extproc.breaker import CircuitBreaker, Permit, State, share_opens
from extproc.config import Deployment, DeploymentHealthSettings, GatewayConfig, Probe, Provider
from extproc.credentials.pools import CredentialPool
from extproc.logs import log_event

if TYPE_CHECKING:
    import aiohttp

__all__ = ["ActiveProber", "DeploymentHealth", "deployment_key", "probe_url"]

log = logging.getLogger("extproc.health")

_HEALTH_KEY: Final = "asc:deploy:health"
_LATENCY_WEIGHT: Final = 0.2
"""Weight of the newest answer in the latency average (`prefer: latency`)."""
_RATE_LIMITED: Final = 429
_STATES: Final = ("closed", "open", "half_open")


def deployment_key(deployment: Deployment) -> str:
    """`<provider>/<upstream model>`: names a deployment in Redis and logs."""
    return f"{deployment.provider}/{deployment.model}"


@dataclass(slots=True)
class _Deployment:
    breaker: CircuitBreaker
    probing: bool = False
    latency_s: float | None = None


class DeploymentHealth:
    def __init__(self, settings: DeploymentHealthSettings | None = None, *,
                 pool: CredentialPool | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.settings = settings or DeploymentHealthSettings()
        self._pool = pool
        self._clock = clock
        self._slow_s = (self.settings.slow_ms / 1000 if self.settings.slow_ms is not None
                        else None)
        self._deployments: dict[str, _Deployment] = {}
        self._published: dict[str, str] = {}
        """The state last written to the `asc_deployment_state` gauges, by key."""

    def _of(self, key: str) -> _Deployment:
        health = self._deployments.get(key)
        if health is None:
            health = self._deployments[key] = _Deployment(CircuitBreaker(
                threshold=self.settings.failures, cooldown_s=float(self.settings.cooldown_s),
                clock=self._clock))
        return health

    # -- what routing reads -------------------------------------------------------------

    def state(self, key: str) -> State:
        health = self._deployments.get(key)
        return "closed" if health is None else health.breaker.state

    def available(self, key: str) -> bool:
        """Closed, or half-open with its probe not yet taken."""
        health = self._deployments.get(key)
        if health is None:
            return True
        state = health.breaker.state
        return state == "closed" or (state == "half_open" and not health.probing)

    def latency_s(self, key: str) -> float | None:
        """Moving average of the time to response headers; None before the first answer."""
        health = self._deployments.get(key)
        return None if health is None else health.latency_s

    def credential_state(self, scoped_credential: str) -> str:
        """The breaker state (closed, open, half_open) of a scoped credential
        (`global/<id>`, `tenant:<t>/<id>`) in the credential pool; a degraded key is
        closed here: the pool still uses it."""
        return ("closed" if self._pool is None
                else self._pool.breaker_state(scoped_credential))

    # -- what a request reports ---------------------------------------------------------

    def allow(self, key: str) -> Permit | None:
        """The permit of a request sent to this deployment (a probe when half-open)."""
        health = self._of(key)
        permit = health.breaker.allow()
        if permit is not None and permit.probe:
            health.probing = True
            self._publish(key)
        return permit

    def record(self, key: str, permit: Permit, *, status: int | None,
               latency_s: float | None) -> None:
        """What the deployment answered (`status` None: reset, refused, no answer)."""
        health = self._of(key)
        if permit.probe:
            health.probing = False
        if status == _RATE_LIMITED:
            health.breaker.release(permit)
            self._publish(key)
            return
        if latency_s is not None and status is not None:
            health.latency_s = latency_s if health.latency_s is None else (
                (1 - _LATENCY_WEIGHT) * health.latency_s + _LATENCY_WEIGHT * latency_s)
        slow = self._slow_s is not None and latency_s is not None and latency_s > self._slow_s
        if status is None or status >= 500 or slow:
            health.breaker.failure(permit)
        else:
            health.breaker.success(permit)
        self._publish(key)

    def record_answer(self, key: str, *, status: int | None, latency_s: float | None) -> None:
        """A verdict whose permit went back before the answer came (the fast path's
        answers, from Envoy's access log): recorded as an ordinary (not probe) call."""
        self.record(key, Permit(probe=False), status=status, latency_s=latency_s)

    def release(self, key: str, permit: Permit) -> None:
        """The request ended without a verdict: a probe permit goes back."""
        health = self._of(key)
        if permit.probe:
            health.probing = False
        health.breaker.release(permit)
        self._publish(key)

    # -- shared across replicas ---------------------------------------------------------

    async def sync(self, client: Any) -> None:
        """Push our opens, adopt other replicas' (one round trip each)."""
        breakers = {key: health.breaker for key, health in self._deployments.items()}
        for key in await share_opens(client, _HEALTH_KEY, breakers, self._clock(),
                                     lambda key: self._of(key).breaker):
            self._publish(key)

    def _publish(self, key: str) -> None:
        """The gauges follow the state; written only when it changed (every request
        releases or records a permit: three gauge writes each, otherwise)."""
        current = self.state(key)
        if self._published.get(key) == current:
            return
        self._published[key] = current
        for name in _STATES:
            metrics.DEPLOYMENT_STATE.labels(key, name).set(1 if name == current else 0)

    def __repr__(self) -> str:
        opened = sorted(k for k, h in self._deployments.items() if h.breaker.is_open)
        return f"DeploymentHealth(open={opened})"


def probe_url(provider: Provider, probe: Probe) -> str:
    """The provider's base URL (from config only) with the probe's path."""
    return provider.base_url.rstrip("/") + probe.path


class ActiveProber:
    """Sends each configured deployment probe when it is due (`tick`, called about once a
    second by the server). A probe runs only when the breaker gives it a permit: never
    while the deployment is open and cooling down, and as *the* half-open probe after."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._due: dict[str, float] = {}
        self._running: set[asyncio.Task[Any]] = set()

    async def tick(self, config: GatewayConfig, health: DeploymentHealth,
                   session: aiohttp.ClientSession) -> None:
        """Start the probes that are due; does not wait for them."""
        now = self._clock()
        for model in config.models.values():
            for deployment in model.deployments:
                probe = deployment.probe
                if probe is None:
                    continue
                key = deployment_key(deployment)
                if self._due.get(key, 0.0) > now:
                    continue
                self._due[key] = now + probe.interval_s
                task = asyncio.create_task(probe_once(
                    health, key, probe_url(config.providers[deployment.provider], probe),
                    probe, session, clock=self._clock))
                self._running.add(task)
                task.add_done_callback(self._running.discard)

    async def settle(self) -> None:
        """Wait for the probes in flight (shutdown, tests)."""
        await asyncio.gather(*self._running, return_exceptions=True)

    async def close(self) -> None:
        for task in list(self._running):
            task.cancel()
        await asyncio.gather(*self._running, return_exceptions=True)


async def probe_once(health: DeploymentHealth, key: str, url: str, probe: Probe,
                     session: aiohttp.ClientSession,
                     clock: Callable[[], float] = time.monotonic) -> int | None:
    """One probe: its status (None: no answer) is reported like a request's. Skipped
    (returns None, reports nothing) when the breaker gives no permit."""
    import aiohttp  # only with probes configured: 0.1 to 0.25 s of every start otherwise

    permit = health.allow(key)
    if permit is None:
        return None
    started = clock()
    status: int | None = None
    try:
        async with session.get(url, allow_redirects=False,
                               timeout=aiohttp.ClientTimeout(total=probe.timeout_ms / 1000)
                               ) as response:
            status = response.status
    except asyncio.CancelledError:
        health.release(key, permit)
        raise
    except (aiohttp.ClientError, TimeoutError, OSError) as exc:
        log_event(log, logging.WARNING, "deployment probe failed", deployment=key,
                  error=type(exc).__name__)
    # The probe's own latency says little about inference latency: it is neither averaged
    # (`prefer: latency`) nor checked against `slow_ms`; its timeout bounds it.
    health.record(key, permit, status=status, latency_s=None)
    log_event(log, logging.DEBUG, "deployment probed", deployment=key, status=status,
              duration_ms=round((clock() - started) * 1000, 3))
    return status
