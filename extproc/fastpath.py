"""The fast path: a same-dialect request decided by the fast door, with no ext_proc message.

Envoy's ext_authz filter sends the request and its body to the door (extproc.fastdoor),
which reads the body's `model`, `stream`, output limits and
`stream_options.include_usage` (`fastdoor.body_fields`) and calls `on_request_headers`
with them. When nothing about the request needs its body rewritten, `take` authenticates,
routes, reserves the budget and injects the key in its one reply; the door turns that
reply into its HTTP answer, and streamed chunks never reach Python (decision 0124).

What the full path learns from the answer arrives later, from Envoy: usage (read by the
rendered Lua filter from the answer's chunks as they pass), status and timings, in batches on the
gRPC access-log stream (`extproc.usage_log`). `complete_from_log` rebuilds the request's
`RequestProcessor` from the reply's own dynamic metadata and runs its one `finish()`:
settle, metrics and the request record go through the same code as on the full path, in
whichever worker process receives the entry. A hold whose entry never arrives is charged in
full by the sweeper (`Reservation.charge_on_expiry`), never returned.

Everything else - another dialect, a deployment whose model name differs, a failover
cluster, a budget tenant without `max_tokens`, an OpenAI stream without
`include_usage` (the gateway would have to add it and strip the usage chunk), a
non-standard `service_tier` - keeps the full path: the reply returns None and
`on_request_headers` asks for the body as before (the door answers `full`).
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any, Final

import orjson

from extproc.auth import Principal
from extproc.budgets.guard import Hold
from extproc.budgets.ledger import Reservation
from extproc.budgets.policy import CounterGroup, estimate_input_tokens
from extproc.credentials.static import ResolvedCredential
from extproc.endpoints import Endpoint
from extproc.errors import Dialect, ErrorCode, GatewayError
from extproc.failover import has_failover_cluster
from extproc.guardrails.settings import GuardrailPolicy, effective
from extproc.identity import allowed_models
from extproc.messages import Continue, Headers
from extproc.money import worst_case_cost
from extproc.routing import Route, RouteDecision, select
from extproc.secrets import Secret
from extproc.translate.base import (
    ANTHROPIC_VERSION,
    CHAT_COMPLETIONS_PATH,
    MESSAGES_PATH,
    Backend,
    translator_for,
)
from extproc.translate.headers import unforwarded_request_headers
from extproc.translate.limits import MAX_TOKENS, OPENAI_LIMIT_FIELDS, family_output_field
from extproc.translate.types import Usage
from extproc.translate.usage import usage_from_anthropic, usage_from_openai

if TYPE_CHECKING:
    from extproc.audit.writer import AuditWriter
    from extproc.phases import RequestProcessor
    from extproc.runtime import Runtime

__all__ = ["ANSWER_NAMESPACE", "DOOR_DIALECT_HEADER", "DOOR_ERROR_PATH", "DOOR_HEALTH_PATH",
           "DOOR_PATH_HEADER", "DOOR_STATUS_HEADER", "FAST_BACKEND_PATHS", "FAST_MARK",
           "FAST_METADATA", "META_PREFIX", "RECORD_KEY", "RECORD_KEYS", "ROUTE_METADATA_HEADER",
           "BodyFields", "LogEntry",
           "MetaKind", "complete_from_log", "take"]

log = logging.getLogger("extproc.fastpath")

FAST_MARK: Final = "fast"
"""`asc` metadata key set on fast-path replies; Envoy's access-log filter keys on it."""


DOOR_PATH_HEADER: Final = "x-asc-path"
"""Set by the fast door on every request it lets through: the provider path of a fast
request (a rendered route matches it), else `full` (extproc.fastdoor)."""
DOOR_HEALTH_PATH: Final = "/_asc/door-health"
"""Envoy's health check of each fast-door socket (one per worker)."""
DOOR_ERROR_PATH: Final = "/_asc/provider-error"
"""Where Envoy's Lua filter sends a fast answer's provider error (its status in
`DOOR_STATUS_HEADER`, the door's dialect in `DOOR_DIALECT_HEADER`, the body as sent) to
have it mapped and scrubbed as the full path does (extproc.fastdoor, decision 0136)."""
ROUTE_METADATA_HEADER: Final = "x-asc-route-metadata"
"""Set by Envoy's Lua filter named `asc` on a request whose route carries `asc` metadata
(a pin, identity sources, a guardrail profile): the door cannot read route metadata, so
such a request takes the full path, where ext_proc reads it (decision 0136)."""
DOOR_STATUS_HEADER: Final = "x-asc-status"
DOOR_DIALECT_HEADER: Final = "x-asc-dialect"
ANSWER_NAMESPACE: Final = "asc.answer"
"""Dynamic metadata the Lua filter writes on a mapped error: `provider_status`, the status
the provider sent (the client gets the mapped one)."""
META_PREFIX: Final = "x-asc-meta-"
"""Request headers Envoy's header_to_metadata turns into `asc` metadata (and removes)."""


class MetaKind(enum.Enum):
    STRING = "STRING"
    NUMBER = "NUMBER"
    BOOL = "BOOL"


RECORD_KEY: Final = "record"
FAST_METADATA: Final[dict[str, MetaKind]] = {
    **{key: MetaKind.STRING for key in (
        "request_id", "dialect", "tenant", "model", "provider", "region", "credential")},
    FAST_MARK: MetaKind.BOOL,
    RECORD_KEY: MetaKind.STRING,
}
"""The `asc` metadata of a fast request, and its type: the fast door sends each as an
`x-asc-meta-<key>` header, and the rendered header_to_metadata filter takes exactly these
(extproc.fastdoor, envoy_bootstrap). Only what Envoy itself reads has a key of its own
(its access log, the local-reply mappers, the Lua filter, the access-log filter); the rest
`complete_from_log` needs travels as one JSON object under `RECORD_KEY` (`RECORD_KEYS`):
every key costs Envoy a header_to_metadata rule and a field of every access-log entry
(decision 0144)."""
RECORD_KEYS: Final = frozenset({
    "key_id", "upstream_model", "endpoint", "subject", "source", "team", "route_reason",
    "hold", "key_scope", "estimated_input_tokens", "stream", "extension_headers"})
"""The reply's metadata that goes into the packed `record` (extproc.fastdoor), and that
`usage_log` unpacks into `LogEntry.asc` again."""
_SAME_DIALECT: Final[dict[Dialect, frozenset[Backend]]] = {
    Dialect.OPENAI: frozenset({Backend.OPENAI, Backend.OPENAI_COMPATIBLE}),
    Dialect.ANTHROPIC: frozenset({Backend.ANTHROPIC}),
}
"""Backends that take the door's body as the client sent it."""
FAST_BACKEND_PATHS: Final = {Backend.OPENAI: CHAT_COMPLETIONS_PATH,
                             Backend.OPENAI_COMPATIBLE: CHAT_COMPLETIONS_PATH,
                             Backend.ANTHROPIC: MESSAGES_PATH}
"""The provider path (after its `path_prefix`) of a fast request, by backend: Envoy's fast
routes rewrite `:path` to it."""
_DOOR_PATH: Final = {Dialect.OPENAI: CHAT_COMPLETIONS_PATH, Dialect.ANTHROPIC: MESSAGES_PATH}
_DOOR_HEADERS: Final[dict[Dialect, tuple[tuple[str, str], ...]]] = {
    Dialect.OPENAI: (),
    Dialect.ANTHROPIC: (("anthropic-version", ANTHROPIC_VERSION),),
}
_DIALECTS: Final = {dialect.value: dialect for dialect in Dialect}
_STANDARD_TIERS: Final = frozenset({"default", "auto", "standard"})
_FAST_ENDPOINTS: Final = frozenset({Endpoint.CHAT.value, Endpoint.MESSAGES.value})
_NO_GUARDRAILS: Final = GuardrailPolicy()
_MAX_TOKENS_SANITY_BOUND: Final = 1_000_000
_LIMIT_FIELDS: Final = {Dialect.OPENAI: OPENAI_LIMIT_FIELDS, Dialect.ANTHROPIC: (MAX_TOKENS,)}


@dataclass(frozen=True, slots=True)
class BodyFields:
    """What the fast door read out of the request body (`fastdoor.body_fields`)."""

    model: str
    stream: bool
    include_usage: bool
    limits: tuple[tuple[str, object], ...]
    """Output-limit fields present in the body, as Envoy read them."""
    n: object | None
    service_tier: object | None

    @classmethod
    def parse(cls, fields: Mapping[str, object]) -> BodyFields | None:
        """None when the fields cannot be trusted to describe the body (the full path
        parses it and answers any error in the client's dialect)."""
        model = fields.get("model")
        stream = fields.get("stream", False)
        include = fields.get("include_usage", False)
        if not isinstance(model, str) or not model:
            return None
        if not isinstance(stream, bool) or not isinstance(include, bool):
            return None
        limits = tuple((name, _integral(fields[name])) for name in OPENAI_LIMIT_FIELDS
                       if name in fields)
        return cls(model=model, stream=stream, include_usage=include, limits=limits,
                   n=_integral(fields["n"]) if "n" in fields else None,
                   service_tier=fields.get("service_tier"))

    def as_request(self) -> dict[str, Any]:
        """The fields as the translators' budget rules read a parsed body."""
        request: dict[str, Any] = {"model": self.model, **dict(self.limits)}
        if self.n is not None:
            request["n"] = self.n
        return request


def _integral(value: object) -> object:
    """Envoy hands JSON numbers over as doubles: 50.0 is the client's 50."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


async def take(processor: RequestProcessor, message: Headers,
               remove: list[str]) -> Continue | None:
    """The one reply of a fast-path request (the door's answer), or None for the full path.

    Called from `on_request_headers` after authentication, with the headers it removes.
    Raises `GatewayError` for what the full path would refuse with the same words (model
    limits, budget), so a refusal reads the same on both paths.
    """
    principal = processor.principal
    fields = message.body_fields
    runtime = processor.runtime
    config = runtime.config
    if (fields is None or principal is None
            or not config.fast_path.allows(principal.tenant.id)):
        return None
    body = BodyFields.parse(fields)
    if body is None:
        return None
    tenant = principal.tenant
    if processor.endpoint not in _FAST_ENDPOINTS or tenant.audit_capture:
        return None  # other endpoints, and captured text, need the body
    if config.tracing is not None:
        return None  # the request span starts with the body message (extproc.tracing)
    team = tenant.teams.get(principal.team) if principal.team is not None else None
    if effective(tenant.guardrails, team.guardrails if team is not None else None,
                 processor.route_guardrails) != _NO_GUARDRAILS:
        return None  # guardrails read (and may rewrite) the body
    model = config.models.get(body.model)
    if model is None or body.model not in allowed_models(principal):
        return None  # the full path answers the 404 / 403 (with its model-name cut)
    dialect = processor.dialect
    if body.stream and dialect is Dialect.OPENAI and not body.include_usage:
        return None  # the gateway would ask for usage and strip the extra chunk
    if body.service_tier is not None and body.service_tier not in _STANDARD_TIERS:
        return None
    decision = select(config, tenant, model, health=runtime.health,
                      route_override=processor.route_override)
    route = decision.choice
    backend = Backend.of(route.provider.kind)
    if backend not in _SAME_DIALECT[dialect] or route.deployment.model != body.model:
        return None
    if config.failover.max_attempts > 1 and has_failover_cluster(config, model,
                                                                route.deployment):
        return None  # per-attempt keys and bodies: the upstream ext_proc's work
    translator = translator_for(dialect, backend)
    request = body.as_request()
    asked = translator.output_limit(request, cap=tenant.max_tokens or _MAX_TOKENS_SANITY_BOUND)
    budget = tenant.budget
    if budget is not None and asked is None:
        return None  # the hold's max_tokens must be written into the body
    if dialect is Dialect.OPENAI and not _limits_pass_as_sent(body, route):
        return None
    choices = translator.choices(request)
    if budget is not None and choices > 1 and config.budgets.multiple_choices == "refuse":
        raise GatewayError(
            ErrorCode.INVALID_REQUEST,
            "Requests with 'n' greater than 1 are not allowed for keys with a budget.",
            param="n")
    # Decided: from here on the request is this processor's, as after a body message.
    processor.model_asked = body.model
    processor.streaming = body.stream
    processor.route_decision = decision
    processor.route = route
    processor.take_deployment_permit()
    auth = await processor.provider_auth(route.provider, principal)
    if budget is not None:
        length = message.headers.get("content-length", "")
        # No body here to count images in: bytes / 3, as for a text-only prompt.
        processor.estimated_input_tokens = estimate_input_tokens(
            int(length) if length.isdigit() else config.limits.max_body_bytes)
        output_tokens = (asked or 0) * choices
        price = route.price
        cost = worst_case_cost(processor.estimated_input_tokens, output_tokens,
                               price.input_micro_per_mtok, price.output_micro_per_mtok)
        processor.hold = await runtime.budget_guard().reserve(
            request_id=processor.request_id, budget=budget, key_id=principal.key_id,
            model=body.model, cost_micro_usd=cost,
            estimated_tokens=processor.estimated_input_tokens + output_tokens,
            team=principal.team, charge_on_expiry=True)
    set_headers = [
        ("x-asc-cluster", route.provider.cluster),
        (":path", route.provider.path_prefix + _DOOR_PATH[dialect]),
        *_DOOR_HEADERS[dialect],
        *auth,
    ]
    ours = {name for name, _ in set_headers}
    extension = route.provider.forward_headers
    processor.forwarded_extension_headers = any(
        name in processor.client_headers for name in extension)
    unforwarded = [name for name in unforwarded_request_headers(
        processor.client_headers, backend, extension) if name not in ours]
    metadata = processor.metadata()
    metadata[FAST_MARK] = True
    metadata["stream"] = body.stream
    metadata["endpoint"] = processor.endpoint
    metadata["subject"] = principal.subject
    metadata["source"] = principal.source
    if principal.team is not None:
        metadata["team"] = principal.team
    if processor.source_address is not None:
        metadata["source_address"] = processor.source_address
    metadata["dialect"] = dialect.value
    metadata["route_reason"] = decision.reason
    if processor.key_scope is not None:  # the key's verdict comes from the access log
        metadata["key_scope"] = processor.key_scope
    if processor.forwarded_extension_headers:
        metadata["extension_headers"] = True
    if processor.estimated_input_tokens:
        metadata["estimated_input_tokens"] = processor.estimated_input_tokens
    if processor.hold is not None:
        metadata["hold"] = _hold_text(processor.hold)
    # Its record and settle now come from Envoy's access log (complete_from_log).
    processor.fast_path = True
    return Continue(
        set_headers=set_headers,
        # One mutation sets the provider's key and removes the client's: never name a
        # header in both.
        remove_headers=[name for name in dict.fromkeys([*remove, *unforwarded])
                        if name not in ours],
        clear_route_cache=True,
        metadata=metadata,
        response_headers=dict(processor.tag_headers()),
    )


def _limits_pass_as_sent(body: BodyFields, route: Route) -> bool:
    """True when the OpenAI passthrough would leave the output-limit fields as they are
    (it folds them into the one field a reasoning model or the config names)."""
    configured = route.model.output_limit_field
    field = configured or family_output_field(route.deployment.model)
    if configured is None and field == MAX_TOKENS:
        return True
    return {name for name, _ in body.limits} <= {field}


# -- the hold, carried in the reply's metadata to whichever worker settles -------------

def _hold_text(hold: Hold) -> str:
    reservation = hold.reservation
    document: dict[str, Any] = {"mode": hold.mode, "local": hold.local_amount,
                                "day": hold.local_day}
    if reservation is not None:
        document["tag"] = reservation.tag
        document["groups"] = [
            [g.name, g.unit, list(g.keys), g.limit, g.amount, g.resets_at.isoformat(), g.ttl_s]
            for g in reservation.groups]
    return str(orjson.dumps(document).decode())


def _hold_from_text(text: str, request_id: str) -> Hold:
    document = orjson.loads(text)
    reservation = None
    if "tag" in document:
        groups = tuple(
            CounterGroup(name=name, unit=unit, keys=tuple(keys), limit=limit, amount=amount,
                         resets_at=datetime.fromisoformat(resets_at), ttl_s=ttl_s)
            for name, unit, keys, limit, amount, resets_at, ttl_s in document["groups"])
        reservation = Reservation(request_id=request_id, tag=document["tag"], groups=groups,
                                  charge_on_expiry=True)
    return Hold(reservation=reservation, mode=document["mode"],
                local_amount=document["local"], local_day=document["day"])


# -- the answer, from Envoy's access log ------------------------------------------------

@dataclass(frozen=True, slots=True)
class LogEntry:
    """What one access-log entry says about a finished fast-path request (plain values,
    decoded by `extproc.usage_log`)."""

    asc: Mapping[str, object]
    """The `asc` dynamic metadata of the fast-path reply."""
    usage: Mapping[str, float]
    """`asc.usage`: counts under the provider's names, read by Envoy."""
    status: int
    """The status the client got; 0 when it got none."""
    upstream_answered: bool
    """The provider sent response bytes (Envoy's time to first upstream byte is set)."""
    downstream_cut: bool
    """The client's connection ended before the response did (Envoy response flags)."""
    duration_s: float
    first_byte_s: float | None
    source_address: str | None = None
    """The downstream peer `ip:port` Envoy logged (the record's source address, 0081)."""
    retry_after: str | None = None
    """The answer's `retry-after` header (a 429's cool-down for the key)."""
    provider_status: int | None = None
    """The provider's status when the Lua filter mapped its error answer (`status` is then
    the mapped one the client got); None otherwise."""

    @property
    def upstream_status(self) -> int:
        """The status the provider sent."""
        return self.provider_status if self.provider_status is not None else self.status


def usage_from_fields(usage: Mapping[str, float], dialect: Dialect) -> Usage | None:
    """A `Usage` from the counts Envoy read, by the same rules as the full path."""
    counts = {name: int(value) for name, value in usage.items()}
    if dialect is Dialect.ANTHROPIC:
        document: dict[str, Any] = {
            name: counts[name] for name in ("input_tokens", "output_tokens",
                                            "cache_read_input_tokens",
                                            "cache_creation_input_tokens") if name in counts}
        if "web_search_requests" in counts:
            document["server_tool_use"] = {"web_search_requests": counts["web_search_requests"]}
        return usage_from_anthropic(document)
    details: dict[str, int] = {name: counts[name] for name in ("cached_tokens", "audio_tokens")
                               if name in counts}
    document = {name: counts[name] for name in ("prompt_tokens", "completion_tokens")
                if name in counts}
    return usage_from_openai({**document, "prompt_tokens_details": details})


async def complete_from_log(runtime: Runtime, entry: LogEntry, *,
                            audit: AuditWriter | None = None) -> None:
    """Rebuild the request from its reply's metadata and run its one `finish()` (settle,
    metrics, the request log line and the audit record, as on the full path)."""
    from extproc.phases import RequestProcessor

    asc = entry.asc
    config = runtime.config
    tenant = config.tenants.get(str(asc.get("tenant")))
    model = config.models.get(str(asc.get("model")))
    provider = config.providers.get(str(asc.get("provider")))
    if tenant is None or model is None or provider is None:
        # A reload removed it since the reply: the hold is charged in full when swept.
        log.warning("fast-path record for an unknown tenant, model or provider",
                    extra={"fields": {"request_id": asc.get("request_id")}})
        return
    deployment = next((d for d in model.deployments if d.provider == provider.name), None)
    if deployment is None:
        return
    processor = RequestProcessor(runtime, audit=audit, request_id=str(asc["request_id"]))
    now = processor.clock()
    processor.restore(
        request_id=processor.request_id,
        started=now - entry.duration_s,
        first_byte_at=(now - entry.duration_s + entry.first_byte_s
                       if entry.first_byte_s is not None else None))
    dialect = str(asc.get("dialect", Dialect.OPENAI.value))
    processor.dialect = _DIALECTS.get(dialect) or Dialect(dialect)
    team = asc.get("team")
    processor.principal = Principal(tenant=tenant, key_id=str(asc.get("key_id")),
                                    subject=str(asc.get("subject", "")),
                                    source=str(asc.get("source", "virtual_key")),
                                    team=team if isinstance(team, str) else None)
    processor.endpoint = str(asc.get("endpoint", Endpoint.CHAT.value))
    address = asc.get("source_address", entry.source_address)
    processor.source_address = address if isinstance(address, str) else None
    processor.model_asked = model.name
    reason = str(asc.get("route_reason", ""))
    route = Route(model=model, deployment=deployment, provider=provider, reason=reason)
    processor.route = route
    processor.route_decision = RouteDecision(choice=route, fallbacks=(), reason=reason)
    label = asc.get("credential")
    if isinstance(label, str):
        key_id, _, version = label.rpartition("@")
        processor.credential = ResolvedCredential(key_id, int(version), Secret(""))
    processor.streaming = asc.get("stream") is True
    estimate = asc.get("estimated_input_tokens")
    processor.estimated_input_tokens = (int(estimate) if isinstance(estimate, (int, float))
                                        and not isinstance(estimate, bool) else 0)
    hold = asc.get("hold")
    if isinstance(hold, str):
        processor.hold = _hold_from_text(hold, processor.request_id)
    processor.usage = usage_from_fields(entry.usage, processor.dialect) if entry.usage else None
    processor.upstream_status = entry.upstream_status if entry.upstream_answered else None
    processor.status = entry.status or None
    if not entry.upstream_answered and not entry.downstream_cut and entry.status >= 500:
        # Envoy's own reply (a refused connection, a reset, a timeout): as on the full
        # path, the provider failed and sent nothing (decision 0140).
        processor.error = ErrorCode.PROVIDER_ERROR
    # Complete: usage arrived, or an error answer (nothing to bill). Anything else - a
    # stream without its usage, a client gone, an answer cut - counts as aborted, and an
    # aborted request with a hold is charged the whole hold (`_real_cost`).
    processor.mark_complete(not entry.downstream_cut and (
        processor.usage is not None or entry.status >= 400))
    await _report_health(runtime, processor, route, entry)
    await processor.finish()


async def _report_health(runtime: Runtime, processor: RequestProcessor, route: Route,
                         entry: LogEntry) -> None:
    """The answer's verdicts on the key and the deployment, as the full path reports them
    when the answer's headers pass (the door gave their permits back when it decided)."""
    asc = entry.asc
    latency = entry.first_byte_s if entry.first_byte_s is not None else entry.duration_s
    scope = asc.get("key_scope")
    if entry.upstream_answered and processor.credential is not None and isinstance(scope, str):
        await runtime.keys.report_answer(
            processor.credential, scope, entry.upstream_status, latency_s=latency,
            key_evidence=asc.get("extension_headers") is not True,
            retry_after=entry.retry_after)
    if entry.upstream_answered:
        runtime.health.record_answer(route.key, status=entry.upstream_status,
                                     latency_s=latency)
    elif not entry.downstream_cut and entry.status >= 500:
        # No answer: Envoy's own 503/504 (refused, reset, timed out).
        runtime.health.record_answer(route.key, status=None, latency_s=None)
