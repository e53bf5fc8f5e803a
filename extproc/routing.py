"""Choose the deployment (provider x region x upstream model) that serves a request.

Order: residency zone (a hard rule) -> tenant pin -> first remaining deployment in config
order. Health, weights and fallbacks join this function in later releases; the result
always carries a `reason` that goes into logs and audit.
"""

from __future__ import annotations

from dataclasses import dataclass

from extproc.config import Deployment, GatewayConfig, Model, Provider, Tenant
from extproc.errors import ErrorCode, GatewayError

__all__ = ["Route", "select_route"]


@dataclass(frozen=True, slots=True)
class Route:
    model: Model
    deployment: Deployment
    provider: Provider
    reason: str


def select_route(config: GatewayConfig, tenant: Tenant, model: Model) -> Route:
    candidates = [(d, config.providers[d.provider]) for d in model.deployments]
    reason = "first deployment"
    if tenant.zone is not None:
        candidates = [(d, p) for d, p in candidates if p.zone == tenant.zone]
        reason = f"zone {tenant.zone}: first deployment"
    if not candidates:
        raise GatewayError(
            ErrorCode.UNAVAILABLE,
            f"No deployment of model '{model.name}' is available in your residency zone.",
        )
    pin = tenant.pins.get(model.name)
    if pin is not None:
        pinned = [(d, p) for d, p in candidates if p.name == pin]
        if pinned:
            candidates, reason = pinned, f"pinned to {pin}"
    deployment, provider = candidates[0]
    return Route(model=model, deployment=deployment, provider=provider, reason=reason)
