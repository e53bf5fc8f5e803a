"""The audit record of one request, built from its processor's state in one place.

`record_from` is the only function that reads a `RequestProcessor` for the audit: the
record's fields are documented in docs/audit.md and pinned by
deploy/schema/audit-record.schema.json. It never reads prompt or completion text, key
material or the client's credential: only names, ids, amounts, statuses and times.
"""

from __future__ import annotations

import time
from importlib import metadata
from typing import TYPE_CHECKING, Any, Final

from extproc.money import usage_cost

if TYPE_CHECKING:
    from extproc.auth import Principal
    from extproc.phases import RequestProcessor

__all__ = ["GATEWAY_VERSION", "RECORD_VERSION", "principal_fields", "record_from",
           "source_address"]

RECORD_VERSION: Final = 1
_MAX_ADDRESS_CHARS: Final = 64


def _gateway_version() -> str:
    try:
        return metadata.version("asc-extproc")
    except metadata.PackageNotFoundError:  # a source tree that was never installed
        return "0+unknown"


GATEWAY_VERSION: Final = _gateway_version()


def source_address(headers: dict[str, str] | Any) -> str | None:
    """The client's address from `x-forwarded-for`, when Envoy did not send the
    `source.address` attribute (a bootstrap rendered before it did).

    With `use_remote_address: true` Envoy appends the peer to `x-forwarded-for`, so the
    *last* entry is Envoy's own; earlier ones are client-supplied and never used. For a
    loopback peer Envoy appends its own local address instead (measured), which is why the
    attribute is preferred (decision 0081).
    """
    value = headers.get("x-forwarded-for")
    if not value:
        return None
    last = str(value).rsplit(",", 1)[-1].strip()
    return last[:_MAX_ADDRESS_CHARS] or None


def principal_fields(principal: Principal | None) -> dict[str, Any] | None:
    """Who called: subject (virtual key id, SPIFFE id or JWT issuer#sub), how it was
    authenticated, the virtual key id (virtual keys only) and the team."""
    if principal is None:
        return None
    return {
        "subject": principal.subject,
        "source": principal.source,
        "key_id": principal.key_id if principal.source == "virtual_key" else None,
        "team": principal.team,
    }


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 3)


def record_from(processor: RequestProcessor, *, aborted: bool) -> dict[str, Any]:
    """The request's audit record (plain JSON data, without the chain fields)."""
    p = processor
    now_mono = p._clock()
    latency_s = now_mono - p._started
    started_ns = time.time_ns() - int(latency_s * 1e9)
    route = p.route
    config = p._config
    providers = config.providers
    attempts: list[dict[str, Any]] = []
    if p._flight is not None:
        for attempt in p._flight.records():
            provider = providers.get(str(attempt.get("provider")))
            attempts.append({**attempt,
                             "cluster": provider.cluster if provider is not None else None})
    elif route is not None and p._sent_at is not None:
        attempts.append({
            "attempt": 1, "provider": route.provider.name, "region": route.provider.region,
            "cluster": route.provider.cluster, "status": p.upstream_status,
            "latency_ms": _ms(p.answered_at - p._sent_at
                              if p.answered_at is not None else None),
            "left": None if p.upstream_status is not None else "no answer",
            "credential": p.credential.label if p.credential is not None else None,
        })
    budget: dict[str, Any] | None = None
    if p.hold is not None:
        reserved = p._held()[0] if p.route is not None else 0
        settled = p.charged_micro_usd
        budget = {
            "mode": p.hold.mode,
            "reserved_micro_usd": reserved,
            "settled_micro_usd": settled if p.budget_settled else None,
            "released_micro_usd": (max(0, reserved - (settled or 0))
                                   if p.budget_settled else None),
            "settled": bool(p.budget_settled),
        }
    usage = p.usage
    cost = None
    if route is not None and usage is not None:
        cost = usage_cost(route.price, usage)
    decision = p.route_decision
    record: dict[str, Any] = {
        "v": RECORD_VERSION,
        "time_ns": started_ns,
        "request_id": p.request_id,
        "tenant": p.principal.tenant.id if p.principal is not None else None,
        "principal": principal_fields(p.principal),
        "source_address": p.source_address,
        "front_door": p.dialect.value,
        "endpoint": p.endpoint,
        "model_asked": p.model_asked,
        "model_served": route.deployment.model if route is not None else None,
        "route": None if route is None else {
            "provider": route.provider.name,
            "region": route.provider.region,
            "zone": route.provider.zone,
            "cluster": route.provider.cluster,
            "reason": decision.reason if decision is not None else route.reason,
            "served_reason": route.reason,
        },
        "attempts": attempts,
        "credential": p.credential.label if p.credential is not None else None,
        "budget": budget,
        "guardrails": [{"rule": rule, "action": action, "count": count}
                       for rule, action, count in p.guardrail_actions],
        "status": p.status,
        "upstream_status": p.upstream_status,
        "error": p.error.value if p.error is not None else None,
        "aborted": aborted and p.error is None,
        "stream": p.streaming,
        "stream_truncated": p.stream_truncated,
        "tokens": None if usage is None else {
            "input": usage.input_tokens, "output": usage.output_tokens,
            "cached": usage.cached_input_tokens},
        "cost_micro_usd": cost,
        "charged_micro_usd": p.charged_micro_usd,
        "ttft_ms": _ms(p._first_byte_at - p._started if p._first_byte_at is not None else None),
        "latency_ms": _ms(latency_s),
        "gateway_version": GATEWAY_VERSION,
        "config_version": config.digest[:16] or None,
    }
    if p.capture is not None:  # sealed by the writer, off the request path
        record["capture"] = p.capture
    return record
