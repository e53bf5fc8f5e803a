"""Failover inside a residency zone: which deployments a request may move to, which Envoy
cluster carries them, and the record of every attempt.

Envoy does the retrying (docs/decisions/0065-failover-envoy-retries-upstream-extproc.md):
the router-level processor sends a request to the failover cluster of its model and first
deployment, whose priority levels are the model's other deployments of the same zone;
Envoy's retry policy moves each retry to the next level, and the upstream (per-attempt)
ext_proc (`extproc/upstream.py`) puts that deployment's credential, path and body dialect
on it. Both ext_proc streams of a request usually reach the same extproc process (one
HTTP/2 connection per Envoy worker to the extproc cluster), so they meet in a
process-local `Flights` table keyed by the request id; an attempt whose stream reaches
another process is rebuilt there (`extproc.attempt_build`, decision 0135).
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Final

from extproc.breaker import Permit
from extproc.config import Deployment, GatewayConfig, Model, Provider
from extproc.credentials.selection import Selected
from extproc.deployment_health import DeploymentHealth, deployment_key
from extproc.errors import Dialect

__all__ = [
    "FAILOVER_CLUSTER_PREFIX",
    "Attempt",
    "Chain",
    "Flight",
    "Flights",
    "PreparedAttempt",
    "failover_chains",
    "failover_cluster",
    "has_failover_cluster",
    "ordered_chain",
    "zone_deployments",
]

FAILOVER_CLUSTER_PREFIX: Final = "asc_failover."
MAX_ORDERS: Final = 24
"""Most fallback orders rendered per deployment (one failover cluster each); a zone with
more possible orders keeps config order only (decision 0067)."""
_TIMEOUT_SHARE: Final = 0.8
"""An attempt that ended unanswered after this share of first_byte_timeout timed out."""


def failover_cluster(model: str, provider: str) -> str:
    """The Envoy cluster whose priority 0 is `provider`'s deployment of `model`."""
    return f"{FAILOVER_CLUSTER_PREFIX}{model}.{provider}"


def zone_deployments(config: GatewayConfig, model: Model,
                     first: Deployment) -> tuple[tuple[Deployment, Provider], ...]:
    """`first`, then the model's other deployments in `first`'s zone, in config order.

    This is the priority order the Envoy failover cluster is rendered with; a failover
    never leaves the zone of the deployment the route chose (the tenant's zone when it
    has one). Stand-in for `routing.RouteDecision.fallbacks` until routing lands; Envoy's
    priorities are static, so a per-tenant fallback order can only reorder inside this.
    """
    zone = config.providers[first.provider].zone
    rest = tuple((d, config.providers[d.provider]) for d in model.deployments
                 if d is not first and config.providers[d.provider].zone == zone)
    return ((first, config.providers[first.provider]), *rest)


Chain = tuple[tuple[Deployment, Provider], ...]
"""A failover cluster's deployments, priority 0 first."""


def _ordered_name(model: str, chain: Chain) -> str:
    """Cluster of one fallback order: `asc_failover.<model>.<first>><fb1>><fb2>` ('>'
    is not allowed in config names, so it cannot collide with the config-order one)."""
    return f"{FAILOVER_CLUSTER_PREFIX}{model}.{'>'.join(p.name for _, p in chain)}"


def _orders(config: GatewayConfig, zone_size: int) -> int:
    """How many fallback orders a deployment with `zone_size - 1` others in its zone has
    (only the first `max_attempts - 1` fallbacks can ever be tried); 1 (config order
    only) beyond MAX_ORDERS."""
    depth = min(zone_size - 1, config.failover.max_attempts - 1)
    orders = math.perm(zone_size - 1, depth) if depth > 0 else 1
    return orders if orders <= MAX_ORDERS else 1


def failover_chains(config: GatewayConfig, model: Model,
                    first: Deployment) -> list[tuple[str, Chain]]:
    """Every failover cluster of `first` (name, priority order): its zone in config order,
    then each other order of the fallbacks that could be tried, so that a request's
    attempts can follow its routing decision's `fallbacks` (decision 0067)."""
    zone = zone_deployments(config, model, first)
    chains = [(failover_cluster(model.name, first.provider), zone)]
    if _orders(config, len(zone)) == 1:
        return chains
    depth = min(len(zone) - 1, config.failover.max_attempts - 1)
    for tail in itertools.permutations(zone[1:], depth):
        if tail != zone[1:1 + depth]:
            chain = (zone[0], *tail)
            chains.append((_ordered_name(model.name, chain), chain))
    return chains


def ordered_chain(config: GatewayConfig, model: Model, first: Deployment,
                  fallbacks: Sequence[Deployment]) -> tuple[str, Chain, int]:
    """The failover cluster whose priorities follow `fallbacks` (the routing decision's
    order), its chain, and how many retries stay inside what the decision allows.

    Fallbacks outside `first`'s zone are dropped (a failover never leaves it). Without a
    rendered cluster for that order (more than MAX_ORDERS), the config-order cluster,
    whose retries stop before the first level the decision does not allow."""
    zone = zone_deployments(config, model, first)
    in_zone = {id(d) for d, _ in zone[1:]}
    wanted = [d for d in fallbacks if id(d) in in_zone]
    depth = min(len(zone) - 1, config.failover.max_attempts - 1)
    wanted = wanted[:depth]
    if [d for d, _ in zone[1:1 + len(wanted)]] == wanted or _orders(config, len(zone)) == 1:
        retries = 0
        allowed = {id(d) for d in fallbacks}
        for deployment, _ in zone[1:]:
            if id(deployment) not in allowed:
                break
            retries += 1
        return failover_cluster(model.name, first.provider), zone, min(retries, depth)
    by_id = {id(d): (d, p) for d, p in zone}
    rest = [by_id[id(d)] for d in wanted]
    rest += [c for c in zone[1:] if id(c[0]) not in {id(d) for d in wanted}]
    chain = (zone[0], *rest[:depth])
    return _ordered_name(model.name, chain), chain, len(wanted)


def has_failover_cluster(config: GatewayConfig, model: Model, deployment: Deployment) -> bool:
    """A request to this deployment can be retried: its zone has another deployment of
    the model, or its key may be a canary version (keyring credentials, a tenant's own
    keys), whose refusal is retried once on the active version. Other requests keep the
    plain provider cluster and cost no per-attempt ext_proc stream."""
    if len(zone_deployments(config, model, deployment)) > 1:
        return True
    return deployment.provider in _canary_capable(config)


_CANARY_CAPABLE: dict[int, tuple[GatewayConfig, frozenset[str]]] = {}


def _canary_capable(config: GatewayConfig) -> frozenset[str]:
    """Providers whose keys may be canary versions (keyring or BYOK), per config: computed
    once per loaded config, not per request (it looks at every tenant)."""
    cached = _CANARY_CAPABLE.get(id(config))
    if cached is not None and cached[0] is config:
        return cached[1]
    names = frozenset(
        name for name, provider in config.providers.items()
        if any(config.credentials[c].keyring for c in provider.credentials
               if c in config.credentials)
        or any(name in t.own_credentials for t in config.tenants.values()))
    _CANARY_CAPABLE.clear()  # one config is current; keep no old ones alive
    _CANARY_CAPABLE[id(config)] = (config, names)
    return names


@dataclass(slots=True)
class Attempt:
    """One try at one deployment, as the request record shows it."""

    number: int
    provider: str
    region: str
    started: float
    status: int | None = None
    latency_ms: float | None = None
    left: str | None = None
    """Why the request moved on: `status 503`, `reset`, `timeout`; None for the answer."""
    credential: str | None = None
    selected: Selected | None = field(default=None, repr=False)
    """The attempt's key and its breaker permit (reported on the answer)."""
    deployment: str | None = None
    """`deployment_key` of the deployment hit, when this attempt holds `permit`."""
    permit: Permit | None = field(default=None, repr=False)
    """The deployment breaker's permit of an attempt other than the choice's attempt 1
    (the router-level processor holds that one): its verdict goes to the deployment the
    attempt actually hit, not to the routing choice."""

    def record(self) -> dict[str, str | int | float | None]:
        return {"attempt": self.number, "provider": self.provider, "region": self.region,
                "status": self.status, "latency_ms": self.latency_ms, "left": self.left,
                "credential": self.credential}


@dataclass(frozen=True, slots=True)
class PreparedAttempt:
    """What one attempt at one deployment carries: set and removed headers, body."""

    set_headers: list[tuple[str, str]]
    remove_headers: list[str]
    body: bytes
    selected: Selected | None


Prepare = Callable[[Provider, Deployment, bool], Awaitable[PreparedAttempt]]
"""(provider, deployment, active_only) -> the attempt's headers and body, in that
provider's dialect and with its key. `active_only` skips a canary key version."""


@dataclass(slots=True)
class Flight:
    """A request's way through its zone's deployments, shared by both ext_proc streams."""

    request_id: str
    deployments: tuple[tuple[Deployment, Provider], ...]
    prepare: Prepare
    first_byte_timeout_s: float
    attempts: list[Attempt] = field(default_factory=list)
    dialect: Dialect = Dialect.OPENAI
    """The client's dialect: an attempt that cannot be made answers in it."""
    first_selected: Selected | None = None
    """The key the router-level processor put on attempt 1."""
    extension_headers: bool = False
    """Client extension headers reached the provider: a 401/403 may be the client's."""
    canary_refused: set[str] = field(default_factory=set)
    """Providers whose canary key version answered 401/403: retried on the active one."""
    clock: Callable[[], float] = time.monotonic

    def deployment_at(self, address: str,
                      number: int) -> tuple[Deployment, Provider] | None:
        """The deployment behind an upstream address (`host:port`, as Envoy reports it).

        Deployments sharing an address (one host serving two regions) are told apart by
        the attempt number: Envoy moves one priority level per retry.
        """
        matches = [(d, p) for d, p in self.deployments
                   if address in (f"{p.host}:{p.port}", f"[{p.host}]:{p.port}")]
        if len(matches) == 1:
            return matches[0]
        # Shared address, or a DNS name Envoy resolved: Envoy's retries move one
        # priority level at a time (previous_priorities).
        by_order = self.deployments[(number - 1) % len(self.deployments)]
        return by_order if not matches or by_order in matches else matches[0]

    def start(self, provider: Provider, number: int) -> Attempt:
        attempt = Attempt(number=number, provider=provider.name, region=provider.region,
                          started=self.clock())
        self.attempts.append(attempt)
        return attempt

    def end(self, attempt: Attempt, status: int | None) -> None:
        """An attempt's outcome: a status (response headers), or None (no answer)."""
        elapsed = self.clock() - attempt.started
        attempt.latency_ms = round(elapsed * 1000, 3)
        attempt.status = status
        if status is None:
            # Envoy's idle timer starts before this process hears of the attempt (one
            # gRPC hop, longer on a busy machine): "close to" the timeout is the timeout.
            attempt.left = ("timeout" if elapsed >= _TIMEOUT_SHARE * self.first_byte_timeout_s
                            else "reset")
        elif status in (429, 529) or status >= 500 or status in (401, 403):
            attempt.left = f"status {status}"

    def verdict(self, health: DeploymentHealth, attempt: Attempt) -> None:
        """An attempt answered (`status`, `latency_ms` set by `end`): the deployment it
        hit learns it. No-op for an attempt without a permit of its own."""
        permit, attempt.permit = attempt.permit, None
        if permit is None or attempt.deployment is None:
            return
        latency = None if attempt.latency_ms is None else attempt.latency_ms / 1000
        health.record(attempt.deployment, permit, status=attempt.status, latency_s=latency)

    def settle(self, health: DeploymentHealth) -> None:
        """Envoy stopped retrying (response headers reached the router-level processor):
        every attempt still without an answer failed (reset, timed out), and so did a
        fallback whose connection was refused (a gap in the attempt numbers, see
        `records`). The choice's own attempt 1 is the router-level processor's verdict."""
        for attempt in self.attempts:
            if attempt.permit is not None and attempt.status is None:
                self.verdict(health, attempt)
        seen = {a.number for a in self.attempts}
        for number in range(2, max(seen, default=0)):
            if number not in seen:
                deployment, _ = self.deployments[(number - 1) % len(self.deployments)]
                key = deployment_key(deployment)
                permit = health.allow(key)
                if permit is not None:
                    health.record(key, permit, status=None, latency_s=None)

    def release(self, health: DeploymentHealth) -> None:
        """The request ended before Envoy stopped retrying (the client left): attempts
        still holding a permit give it back without a verdict."""
        for attempt in self.attempts:
            permit, attempt.permit = attempt.permit, None
            if permit is not None and attempt.deployment is not None:
                health.release(attempt.deployment, permit)

    def choice_latency_s(self) -> float | None:
        """Attempt 1's time to response headers when it went to the choice (the
        request's own time would add every later attempt's to the choice's average)."""
        first = next((a for a in self.attempts if a.number == 1), None)
        if (first is None or first.latency_ms is None
                or first.provider != self.deployments[0][1].name):
            return None
        return first.latency_ms / 1000

    def choice_skipped(self) -> bool:
        """Attempt 1 went to another deployment than the choice (Envoy's outlier
        detection had ejected it): the choice was not tried, so it gets no verdict."""
        first = next((a for a in self.attempts if a.number == 1), None)
        return first is not None and first.provider != self.deployments[0][1].name

    def choice_status(self, final: int | None) -> int | None:
        """What the chosen deployment answered, for its health verdict: attempt 1's
        status when the request failed over (None: reset, refused, silent, or attempt 1
        went elsewhere), else the final status."""
        first = next((a for a in self.attempts if a.number == 1), None)
        if first is None:
            return final if not self.attempts else None
        return first.status if first.provider == self.deployments[0][1].name else None

    @property
    def answered(self) -> Attempt | None:
        """The last attempt, if it answered (its response is what the client gets)."""
        if self.attempts and self.attempts[-1].status is not None:
            return self.attempts[-1]
        return None

    def records(self) -> list[dict[str, str | int | float | None]]:
        """The attempts in order. An attempt whose connection failed never reached the
        per-attempt ext_proc (measured: Envoy runs upstream filters once connected); it
        shows as a gap in the attempt numbers and is listed at the deployment Envoy's
        priority order gives it, as `connect failure`."""
        seen = {a.number for a in self.attempts}
        for number in range(1, max(seen, default=0)):
            if number not in seen:
                _, provider = self.deployments[(number - 1) % len(self.deployments)]
                self.attempts.append(Attempt(number=number, provider=provider.name,
                                             region=provider.region, started=0.0,
                                             left="connect failure"))
        self.attempts.sort(key=lambda a: a.number)
        for attempt in self.attempts[:-1]:
            if attempt.left is None and attempt.status is None:
                attempt.left = "reset"
        final = self.attempts[-1] if self.attempts else None
        if final is not None and final.status is not None and final.status < 400:
            final.left = None
        return [a.record() for a in self.attempts]


class Flights:
    """Process-local table of the requests in flight that may fail over."""

    def __init__(self) -> None:
        self._flights: dict[str, Flight] = {}

    def add(self, flight: Flight) -> None:
        self._flights[flight.request_id] = flight

    def get(self, request_id: str) -> Flight | None:
        return self._flights.get(request_id)

    def remove(self, request_id: str) -> None:
        self._flights.pop(request_id, None)

    def __len__(self) -> int:
        return len(self._flights)


FLIGHTS: Final = Flights()
"""The one table of this process (router-level and upstream streams share it)."""
