"""Choose the deployment (provider x region x upstream model) that serves a request, and
the ordered fallbacks behind it. Pure: no I/O; health is read from `DeploymentHealth`
(whose clock is injected), randomness from an injectable `random.Random`.

Selection runs in this order (docs/routing.md):

1. **residency** - only deployments in the tenant's zone (a hard rule), narrowed further
   by a route override's `zone`;
2. **allow-lists** - the tenant's `providers`, and a route override's `pin`, `region`
   and `providers` (a route override only ever narrows: it can leave nothing, never add);
3. **health** - deployments whose breaker is open (or half-open with its probe out), or
   whose provider has no usable credential, are skipped;
4. **order** - a healthy pin (provider or region) first; else a weighted pick; else the
   preference (cost or latency); else config order. Listed `fallbacks` come right after
   the choice, then the other healthy deployments in the same order.

The result carries a human-readable `reason` that goes into the request's log record and,
for tenants with `debug: true`, into `x-asc-route-reason`.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Final

from extproc.config import (
    Deployment,
    GatewayConfig,
    Model,
    Price,
    Provider,
    RoutePolicy,
    Tenant,
)
from extproc.deployment_health import DeploymentHealth, deployment_key
from extproc.errors import ErrorCode, GatewayError

__all__ = ["Route", "RouteDecision", "RouteOverride", "select", "select_route"]

_RNG: Final = random.Random()  # noqa: S311 - load spreading, not security
_USABLE_CREDENTIAL_STATES: Final = frozenset({"closed", "half_open"})
_OVERRIDE_FIELDS: Final = frozenset({"zone", "pin", "region", "providers"})
_OTHER_FIELDS: Final = frozenset({"guardrails"})
"""Route metadata read elsewhere (extproc.guardrails.route_guardrails), not routing."""


@dataclass(frozen=True, slots=True)
class Route:
    model: Model
    deployment: Deployment
    provider: Provider
    reason: str
    """Why this deployment has its place (`pinned to x`, `fallback 1 (listed)`, ...)."""

    @property
    def key(self) -> str:
        """The deployment's health key (`<provider>/<upstream model>`)."""
        return deployment_key(self.deployment)

    @property
    def price(self) -> Price:
        """What this deployment charges: its own price, else the model's."""
        return self.deployment.price or self.model.price


@dataclass(frozen=True, slots=True)
class RouteDecision:
    choice: Route
    fallbacks: tuple[Route, ...]
    """Ordered; healthy, in the tenant's zone and allowed; never the choice."""
    reason: str


@dataclass(frozen=True, slots=True)
class RouteOverride:
    """What an Envoy route's `metadata.filter_metadata.asc` asks for; it can only narrow
    what the tenant allows (docs/decisions/0060-route-metadata-to-the-service.md)."""

    zone: str | None = None
    pin: str | None = None
    region: str | None = None
    providers: frozenset[str] | None = None

    @classmethod
    def from_metadata(cls, metadata: Mapping[str, object] | None) -> RouteOverride | None:
        """None when the route carries no `asc` routing fields. Unknown or ill-typed fields
        are refused (`GatewayError` 500): ignoring a narrowing rule would widen the route."""
        if not metadata or not set(metadata) - _OTHER_FIELDS:
            return None
        unknown = set(metadata) - _OVERRIDE_FIELDS - _OTHER_FIELDS
        if unknown:
            raise _bad_override(f"unknown field(s) {', '.join(sorted(unknown))}")
        values: dict[str, str | None] = {}
        for name in ("zone", "pin", "region"):
            value = metadata.get(name)
            if value is not None and (not isinstance(value, str) or not value):
                raise _bad_override(f"{name} must be a non-empty string")
            values[name] = value
        providers = metadata.get("providers")
        if providers is not None and (not isinstance(providers, list) or not providers
                                      or not all(isinstance(p, str) for p in providers)):
            raise _bad_override("providers must be a non-empty list of names")
        return cls(zone=values["zone"], pin=values["pin"], region=values["region"],
                   providers=frozenset(providers) if providers is not None else None)

    def describe(self) -> str:
        parts = [f"{name} {value}" for name, value in
                 (("zone", self.zone), ("pin", self.pin), ("region", self.region)) if value]
        if self.providers is not None:
            parts.append(f"providers {', '.join(sorted(self.providers))}")
        return "route " + ", ".join(parts)


def _bad_override(why: str) -> GatewayError:
    return GatewayError(ErrorCode.INTERNAL,
                        f"The gateway route's routing metadata is invalid: {why}.")


_Candidate = tuple[Deployment, Provider]


def select(config: GatewayConfig, tenant: Tenant, model: Model, *,
           health: DeploymentHealth | None = None,
           route_override: RouteOverride | None = None,
           rng: random.Random | None = None) -> RouteDecision:
    """The deployment for this request and its ordered fallbacks.

    Raises `GatewayError(UNAVAILABLE)` (503) when nothing in the tenant's zone is usable;
    the message names no provider outside the zone.
    """
    policy = tenant.policies.get(model.name, tenant.default_policy)
    candidates: list[_Candidate] = [(d, config.providers[d.provider])
                                    for d in model.deployments]
    steps: list[str] = []

    # 1. residency
    if tenant.zone is not None:
        candidates = [(d, p) for d, p in candidates if p.zone == tenant.zone]
        steps.append(f"zone {tenant.zone}")
    if route_override is not None and route_override.zone is not None:
        candidates = [(d, p) for d, p in candidates if p.zone == route_override.zone]
    if not candidates:
        raise GatewayError(
            ErrorCode.UNAVAILABLE,
            f"No deployment of model '{model.name}' is available in your residency zone.")

    # 2. allow-lists
    if policy.providers is not None:
        candidates = [(d, p) for d, p in candidates if p.name in policy.providers]
        # Only the names that passed residency: the reason never names another zone.
        steps.append(f"allowed {', '.join(sorted({p.name for _, p in candidates})) or '-'}")
    if route_override is not None:
        candidates = [(d, p) for d, p in candidates if _override_allows(route_override, p)]
        steps.append(route_override.describe())
    if not candidates:
        raise GatewayError(
            ErrorCode.UNAVAILABLE,
            f"No deployment of model '{model.name}' in your residency zone is allowed by "
            "the routing policy.")

    # 3. health
    healthy: list[_Candidate] = []
    skipped: list[str] = []
    for deployment, provider in candidates:
        why = _unusable(config, tenant, deployment, provider, health)
        if why is None:
            healthy.append((deployment, provider))
        else:
            skipped.append(f"{provider.name} ({why})")
    if skipped:
        steps.append(f"skipped {', '.join(skipped)}")
    if not healthy:
        raise GatewayError(
            ErrorCode.UNAVAILABLE,
            f"Every deployment of model '{model.name}' in your residency zone is "
            "unavailable.")

    # 4. pin, weights, preference
    ordered = _by_preference(healthy, model, policy, health)
    if policy.prefer is not None and len(healthy) > 1:
        steps.append(f"prefer {policy.prefer}")
    choice, why = _choose(ordered, policy, rng or _RNG)
    steps.append(why)
    rest = [c for c in ordered if c is not choice]
    listed = [c for name in policy.fallbacks for c in rest if c[1].name == name]
    fallbacks = [*listed, *(c for c in rest if c not in listed)]
    routes = tuple(
        Route(model, d, p, f"fallback {i} ({'listed' if (d, p) in listed else 'in order'})")
        for i, (d, p) in enumerate(fallbacks, start=1))
    if routes:
        steps.append(f"fallbacks {', '.join(r.provider.name for r in routes)}")
    return RouteDecision(choice=Route(model, choice[0], choice[1], why), fallbacks=routes,
                         reason="; ".join(steps))


def select_route(config: GatewayConfig, tenant: Tenant, model: Model) -> Route:
    """The choice alone, with the whole decision's reason (callers before issue 9)."""
    decision = select(config, tenant, model)
    choice = decision.choice
    return Route(choice.model, choice.deployment, choice.provider, decision.reason)


def _override_allows(override: RouteOverride, provider: Provider) -> bool:
    return ((override.pin is None or provider.name == override.pin)
            and (override.region is None or provider.region == override.region)
            and (override.providers is None or provider.name in override.providers))


def _unusable(config: GatewayConfig, tenant: Tenant, deployment: Deployment,
              provider: Provider, health: DeploymentHealth | None) -> str | None:
    """Why a deployment cannot take this request now, or None."""
    if health is None:
        return None
    key = deployment_key(deployment)
    if not health.available(key):
        return f"breaker {health.state(key).replace('_', '-')}"
    own = tenant.own_credentials.get(provider.name)
    ids = own or provider.credentials
    if not ids:
        return None
    scope = f"tenant:{tenant.id}" if own else "global"
    for credential in ids:
        ref = config.credentials.get(credential)
        weight = ref.weight if ref is not None else 1
        if weight > 0 and health.credential_state(
                f"{scope}/{credential}") in _USABLE_CREDENTIAL_STATES:
            return None
    return "no usable credential"


def _cost(model: Model, deployment: Deployment) -> int:
    price: Price = deployment.price or model.price
    return price.input_micro_per_mtok + price.output_micro_per_mtok


def _by_preference(healthy: list[_Candidate], model: Model, policy: RoutePolicy,
                   health: DeploymentHealth | None) -> list[_Candidate]:
    """Config order, or cheapest / fastest first (stable: ties keep config order).
    Deployments without a latency measurement yet go after the measured ones."""
    if policy.prefer == "cost":
        return sorted(healthy, key=lambda c: _cost(model, c[0]))
    if policy.prefer == "latency" and health is not None:
        def latency(candidate: _Candidate) -> float:
            measured = health.latency_s(deployment_key(candidate[0]))
            return float("inf") if measured is None else measured
        return sorted(healthy, key=latency)
    return list(healthy)


def _choose(ordered: Sequence[_Candidate], policy: RoutePolicy,
            rng: random.Random) -> tuple[_Candidate, str]:
    unavailable = ""
    if policy.pin is not None:
        for candidate in ordered:
            if candidate[1].name == policy.pin:
                return candidate, f"pinned to {policy.pin}"
        unavailable = f"pin {policy.pin} unavailable, "
    if policy.pin_region is not None:
        for candidate in ordered:
            if candidate[1].region == policy.pin_region:
                return candidate, f"pinned to region {policy.pin_region}: {candidate[1].name}"
        unavailable = f"pin region {policy.pin_region} unavailable, "
    if unavailable and policy.fallbacks:
        for name in policy.fallbacks:
            for candidate in ordered:
                if candidate[1].name == name:
                    return candidate, f"{unavailable}listed fallback {name}"
    weighted = [(c, policy.weights.get(c[1].name, 0)) for c in ordered]
    weighted = [(c, w) for c, w in weighted if w > 0]
    if weighted:
        total = sum(w for _, w in weighted)
        point = rng.randrange(total)
        for candidate, weight in weighted:
            if point < weight:
                return candidate, f"{unavailable}weighted {candidate[1].name} ({weight}/{total})"
            point -= weight
    first = ordered[0]
    if policy.prefer == "cost" and len(ordered) > 1:
        return first, f"{unavailable}cheapest {first[1].name}"
    if policy.prefer == "latency" and len(ordered) > 1:
        return first, f"{unavailable}fastest {first[1].name}"
    return first, f"{unavailable}first in order {first[1].name}"
