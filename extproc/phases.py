"""One `RequestProcessor` per ext_proc stream: one method per phase, plain types only.

Request headers pick the front door (OpenAI or Anthropic dialect), authenticate and strip
client credentials; the request body picks the route, reserves budget, translates the
body for the provider and injects the provider key; response headers tag the response
and choose how its body is read; response bodies are translated back to the client's
dialect (chunk by chunk for SSE) and read for usage. `finish()` runs exactly once per
stream, whatever happened (client abort, Envoy reset, timeout): it settles the budget,
measures and logs.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Final

from extproc import fastpath, metrics
from extproc.attempt_build import ATTEMPT_HEADER as _ATTEMPT_HEADER
from extproc.attempt_build import AUTH_HEADER as _AUTH_HEADER
from extproc.attempt_build import (
    AttemptSource,
    attempt_metadata,
    credential_named,
    note_remote_attempt,
    prepare_attempt,
)
from extproc.audit.capture import Capture
from extproc.audit.record import record_from, source_address
from extproc.audit.writer import AuditWriter
from extproc.auth import CLIENT_CREDENTIAL_HEADERS, Principal
from extproc.breaker import Permit
from extproc.budgets.guard import Hold
from extproc.config import Deployment, Provider
from extproc.credentials import ResolvedCredential
from extproc.credentials.selection import Selected
from extproc.endpoints import (
    ENDPOINTS,
    SUPPORT,
    Endpoint,
    EndpointSpec,
    Support,
    UnknownEndpoint,
    check_model,
    gateway_answer,
    match_endpoint,
    models_answer,
    translator_for_endpoint,
)
from extproc.errors import Dialect, ErrorCode, GatewayError, error_body
from extproc.failover import (
    FLIGHTS,
    Chain,
    Flight,
    PreparedAttempt,
    has_failover_cluster,
    ordered_chain,
)
from extproc.guardrails import (
    GuardrailAction,
    GuardrailPolicy,
    Screening,
    StreamRedactor,
    effective,
    route_guardrails,
    screen_request,
    tighter,
)
from extproc.identity import IDENTITY_HEADERS, allowed_models, authenticate, route_identity
from extproc.logs import log_event
from extproc.messages import (
    Body,
    BodyMode,
    Continue,
    Headers,
    Inbound,
    Outbound,
    Phase,
    Respond,
    Trailers,
)
from extproc.money import format_usd, usage_cost, worst_case_cost
from extproc.request_metrics import (
    NO_LABEL,
    observe_budget_remaining,
    observe_budget_spent,
    observe_denial,
    observe_fallbacks,
    observe_request,
)
from extproc.routing import Route, RouteDecision, RouteOverride, select
from extproc.runtime import Runtime
from extproc.secrets import SecretUnavailable
from extproc.tracing import TRACE_HEADERS, RequestSpan, request_attributes, start_request_span
from extproc.translate.base import (
    Backend,
    StreamTranslator,
    Translator,
    Usage,
    retry_after_headers,
)
from extproc.translate.gemini import key_verdict_status
from extproc.translate.headers import provider_account_headers, unforwarded_request_headers
from extproc.translate.limits import OutputLimit

__all__ = ["CLUSTER_HEADER", "RequestProcessor"]

CLUSTER_HEADER: Final = "x-asc-cluster"
_GATEWAY_HEADER_PREFIX: Final = "x-asc-"
_REQUEST_ID_HEADER: Final = "x-asc-request-id"
_CLIENT_ONLY_HEADERS: Final = frozenset({
    *CLIENT_CREDENTIAL_HEADERS,
    *IDENTITY_HEADERS,
    # These would pick an account or API version of the *gateway's* provider key.
    "openai-organization", "openai-project", "anthropic-version",
    # The gateway reads and translates bodies: providers must answer uncompressed.
    "accept-encoding",
})
_JSON: Final = ("content-type", "application/json")
_VIA_UPSTREAM: Final = "via_upstream"
"""Envoy's `response.code_details` of an answer the provider sent."""
_MAX_TOKENS_SANITY_BOUND: Final = 1_000_000
"""No model produces more; larger values are hostile or broken input."""
_SHOWN_MODEL_CHARS: Final = 64
"""An unknown model name is cut to this in answers, metadata and logs: it is client input
of any length."""
_SURROGATE_ESCAPE: Final = re.compile(rb"\\u[dD][89a-fA-F]")
"""A JSON escape of a UTF-16 surrogate: fine in pairs, unencodable when alone."""
_TOO_DEEP: Final = "The request body is nested too deeply."
_MAX_RETRIES_HEADER: Final = "x-envoy-max-retries"
"""Overrides the route's num_retries (0) for a request that may fail over; a client's own
value is removed with the other x-envoy-* headers (0040), so it never counts."""
_STREAM_TAIL_BYTES: Final = 256
_STREAM_ENDS: Final[dict[Dialect, tuple[bytes, ...]]] = {
    Dialect.OPENAI: (b"data: [DONE]", b'"error"'),
    Dialect.ANTHROPIC: (b"message_stop", b"event: error"),
}
"""What the end of a complete (or already failed) stream contains, per client dialect."""
_STREAM_CUT_MESSAGE: Final = ("The provider ended the stream before it was complete; "
                              "the answer is cut short.")
_STREAM_CUT_EVENT: Final[dict[Dialect, bytes]] = {
    Dialect.OPENAI: b"data: " + json.dumps({"error": {
        "message": _STREAM_CUT_MESSAGE, "type": "server_error", "param": None,
        "code": "stream_interrupted"}}).encode() + b"\n\n",
    Dialect.ANTHROPIC: b"event: error\ndata: " + json.dumps({"type": "error", "error": {
        "type": "api_error", "message": _STREAM_CUT_MESSAGE}}).encode() + b"\n\n",
}

_DENIAL_STATUSES: Final = frozenset({400, 401, 403, 404, 413, 429})
"""Statuses of the gateway's own refusals that count as policy denials (a 429 of ours is a
budget or rate limit; a provider's 429 is relayed by `_provider_error`, not counted)."""

_PROVIDER_ERROR_CODES: Final = {
    400: ErrorCode.INVALID_REQUEST,
    404: ErrorCode.NOT_FOUND,
    413: ErrorCode.PAYLOAD_TOO_LARGE,
    429: ErrorCode.RATE_LIMITED,
    503: ErrorCode.UNAVAILABLE,
}
"""What a provider error (as mapped by the translator) is called in logs and metadata."""

log = logging.getLogger("extproc.request")


class RequestProcessor:
    """The gateway's decisions for one HTTP request."""

    def __init__(self, runtime: Runtime, clock: Callable[[], float] = time.monotonic,
                 audit: AuditWriter | None = None, request_id: str | None = None) -> None:
        """`request_id`: a request rebuilt from Envoy's access log keeps its own id (no
        new one is drawn); any other request gets a new random one."""
        self._runtime = runtime
        self._audit = audit
        self._config = runtime.config
        self._clock = clock
        self._started = clock()
        self.request_id = request_id if request_id is not None else new_request_id()
        self.dialect = Dialect.OPENAI
        self.endpoint: str = Endpoint.CHAT.value
        """What the client called (`extproc.endpoints.Endpoint` values)."""
        self._endpoint: EndpointSpec = ENDPOINTS[("POST", "/v1/chat/completions")]
        self.principal: Principal | None = None
        self.source_address: str | None = None
        self.budget_settled: bool | None = None
        self.capture: Capture | None = None
        """The request's text, for a tenant with `audit.capture` (sealed by the writer)."""
        self.model_asked: str | None = None
        self.route: Route | None = None
        self.route_decision: RouteDecision | None = None
        self._route_override: RouteOverride | None = None
        self._deployment_permit: Permit | None = None
        """The chosen deployment's breaker permit until its verdict (or `finish()`)."""
        self._sent_at: float | None = None
        self.credential: ResolvedCredential | None = None
        self.streaming = False
        self.upstream_status: int | None = None
        self.status: int | None = None
        self.error: ErrorCode | None = None
        self.usage: Usage | None = None
        self.hold: Hold | None = None
        self.estimated_input_tokens = 0
        self.charged_micro_usd: int | None = None
        self.forwarded_extension_headers = False
        """True when the provider got a client header only its `forward_headers` allows:
        a 401/403 may then be the client's doing, not the key's."""
        self._client_headers: tuple[str, ...] = ()
        self._translator: Translator | None = None
        self._selected: Selected | None = None
        self._stream: StreamTranslator | None = None
        self._upstream_headers: Mapping[str, str] = {}
        self._first_byte_at: float | None = None
        self.answered_at: float | None = None
        """When the response headers arrived (the audit's attempt latency)."""
        self._flight: Flight | None = None
        self._stream_tail = b""
        self.stream_truncated = False
        """The provider ended a stream without its terminal event; the client got an
        error event instead of a silent cut."""
        self._request: dict[str, Any] = {}
        self._output_limit: OutputLimit | None = None
        self._answer_cut = False
        """True when the non-streamed answer was larger than max_response_bytes."""
        self._trace_context: dict[str, str] = {}
        """The client's W3C trace headers, kept only when `tracing` is configured."""
        self._span: RequestSpan | None = None
        self._finished = False
        self._complete = False
        self.fast_path = False
        """The one fast-path reply went out: Envoy's access log brings the answer, and
        `fastpath.complete_from_log` settles and records it (not this finish())."""
        self.guardrail_actions: list[tuple[str, str, int]] = []
        """(rule id, action, count) of every guardrail that acted (extproc.guardrails)."""
        self._route_guardrails: GuardrailPolicy | None = None
        self._screening: Screening | None = None
        self._stream_redactor: StreamRedactor | None = None

    async def handle(self, message: Inbound) -> Outbound:
        """Run the phase's method; every failure becomes a client error in its dialect."""
        try:
            if isinstance(message, Trailers):
                return self.on_trailers(message)
            return await _HANDLERS[message.phase](self, message)
        except GatewayError as exc:
            return self._respond_error(exc)
        except Exception:
            log.exception("phase failed", extra={"fields": {"request_id": self.request_id,
                                                            "phase": message.phase.value}})
            return self._respond_error(GatewayError(
                ErrorCode.INTERNAL, f"Internal gateway error (request id {self.request_id})."))

    # -- request headers --------------------------------------------------------------

    async def on_request_headers(self, message: Headers) -> Outbound:
        headers = message.headers
        if self._config.tracing is not None:
            self._trace_context = {name: headers[name] for name in TRACE_HEADERS
                                   if name in headers}
        path = headers.get(":path", "").partition("?")[0]
        method = headers.get(":method", "")
        self.source_address = message.source_address or source_address(headers)
        try:
            match = match_endpoint(method, path, headers)
        except UnknownEndpoint as exc:
            self.dialect = exc.dialect
            raise
        self.dialect = match.dialect
        self._endpoint = match.spec
        self.endpoint = match.spec.endpoint.value
        if self._audit is not None and self._audit.saturated:
            # Audit policy block: no request is served that could not be recorded.
            raise GatewayError(ErrorCode.UNAVAILABLE,
                               "The gateway cannot record requests right now; retry later.")
        route_sources, route_metadata = route_identity(message.route_metadata)
        self.principal = authenticate(self._runtime.tenants, self._config.identity, message,
                                      route_sources)
        if match.spec.endpoint is Endpoint.MODELS:  # from config: no provider, no budget
            return self._answer(models_answer(match, allowed_models(self.principal)))
        self._route_override = RouteOverride.from_metadata(route_metadata)
        self._route_guardrails = route_guardrails(self._config.guardrail_profiles,
                                                  message.route_metadata)
        limit = self._config.limits.max_body_bytes
        length = headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            raise GatewayError(ErrorCode.PAYLOAD_TOO_LARGE,
                               f"Request body exceeds the limit of {limit} bytes.")
        if message.end_of_stream:
            raise GatewayError(ErrorCode.INVALID_REQUEST, "A JSON request body is required.")
        remove = [name for name in headers
                  if name in _CLIENT_ONLY_HEADERS or name.startswith(_GATEWAY_HEADER_PREFIX)]
        # The provider (and so its allow-list) is known with the body: the rest goes there.
        self._client_headers = tuple(name for name in headers if name not in remove)
        if message.body_fields is not None:  # Envoy read the body: maybe one message
            fast = await fastpath.take(self, message, remove)
            if fast is not None:
                return fast
        # Envoy chose a route before this reply, from the headers as the client sent them:
        # clearing the cache makes it choose again without the headers removed here.
        return Continue(remove_headers=remove, request_body_mode=BodyMode.BUFFERED,
                        clear_route_cache=True)

    def on_trailers(self, message: Trailers) -> Outbound:
        """Request trailers before the body decision are refused.

        A body followed by trailers is refused in `on_request_body`, so request trailers
        reach here only after headers alone (h2 HEADERS, then a trailers-only HEADERS
        frame): no route, no key, no hold was chosen. Letting it go on would send it to
        whatever route Envoy holds, so it is refused like a request without a body.
        """
        if message.phase is Phase.REQUEST_TRAILERS and self.route is None:
            raise GatewayError(ErrorCode.INVALID_REQUEST, "A JSON request body is required.")
        return Continue()

    # -- request body -----------------------------------------------------------------

    async def on_request_body(self, message: Body) -> Outbound:
        principal = self.principal
        if principal is None:  # Envoy only sends a body after headers we accepted.
            raise GatewayError(ErrorCode.INTERNAL, "Request body before headers.")
        limit = self._config.limits.max_body_bytes
        if not message.end_of_stream and len(message.body) <= limit:
            # BUFFERED mode hands over a complete body without end_of_stream only when
            # request trailers follow (measured); chat APIs have no use for them.
            raise GatewayError(ErrorCode.INVALID_REQUEST, "Request trailers are not supported.")
        if not message.end_of_stream or len(message.body) > limit:
            # Envoy's buffer holds the limit plus some slack; a larger body arrives cut
            # short, without end_of_stream (measured): answer 413 instead of waiting.
            raise GatewayError(
                ErrorCode.PAYLOAD_TOO_LARGE,
                f"Request body exceeds the limit of {self._config.limits.max_body_bytes} bytes.",
            )
        spec = self._endpoint
        if principal.tenant.audit_capture and self._audit is not None:
            self.capture = Capture(principal.tenant.id)
            self.capture.keep_request(message.body)
        request = _parse_chat_request(message.body, spec.body_field or "messages")
        model_name: str = request["model"]
        model = self._config.models.get(model_name)
        if model is None:
            shown = _shown_model(model_name)
            self.model_asked = shown
            raise GatewayError(ErrorCode.MODEL_NOT_FOUND,
                               f"The model '{shown}' does not exist.", param="model")
        self.model_asked = model_name
        self.streaming = request.get("stream") is True
        if model_name not in allowed_models(principal):
            raise GatewayError(ErrorCode.MODEL_NOT_ALLOWED,
                               f"Your key is not allowed to use the model '{model_name}'.",
                               param="model")
        team = (principal.tenant.teams.get(principal.team)
                if principal.team is not None else None)
        policy = effective(principal.tenant.guardrails,
                           team.guardrails if team is not None else None,
                           self._route_guardrails)
        screening = self._screening = screen_request(policy, request, model_name)
        self._note_guardrails(screening.actions)
        if screening.denial is not None:
            raise screening.denial
        decision = select(self._config, principal.tenant, model,
                          health=self._runtime.health, route_override=self._route_override)
        self.route_decision = decision
        route = self.route = decision.choice
        # In the same tick as select(), which saw the deployment available, so the permit
        # is granted (the half-open probe, if it is one). A refusal below gives it back in
        # finish().
        self._deployment_permit = self._runtime.health.allow(route.key)
        backend = Backend.of(route.provider.kind)
        check_model(spec, model, backend)
        answer = gateway_answer(spec, backend, message.body)
        if answer is not None:
            return self._answer(answer)
        # Everything that can refuse the request without side effects comes first:
        # translation (400s), then the key (503); the budget hold is the last step.
        translator = translator_for_endpoint(spec, self.dialect, backend,
                                             tenant=principal.tenant)
        self._translator = translator
        tenant_cap = tighter(principal.tenant.max_tokens, policy.max_tokens)
        asked = translator.output_limit(request, cap=tenant_cap or _MAX_TOKENS_SANITY_BOUND)
        max_tokens = asked or tenant_cap or self._config.budgets.default_max_tokens
        choices = translator.choices(request)
        budget = principal.tenant.budget
        if (budget is not None and choices > 1
                and self._config.budgets.multiple_choices == "refuse"):
            raise GatewayError(
                ErrorCode.INVALID_REQUEST,
                "Requests with 'n' greater than 1 are not allowed for keys with a budget.",
                param="n")
        # A budget tenant's provider must not generate more than the hold covers.
        output_limit = OutputLimit(
            field=route.model.output_limit_field,
            default=max_tokens if budget is not None and asked is None else None)
        try:
            upstream = translator.request(request, upstream_model=route.deployment.model,
                                          api_version=route.provider.api_version,
                                          output_limit=output_limit)
        except RecursionError:
            raise GatewayError(ErrorCode.INVALID_REQUEST, _TOO_DEEP) from None
        auth = await self._provider_auth(route.provider, principal)
        if budget is not None and spec.budgeted:
            self.estimated_input_tokens = translator.input_estimate(message.body)
            output_tokens = max_tokens * choices  # the provider bills every choice
            price = route.price
            cost = worst_case_cost(self.estimated_input_tokens, output_tokens,
                                   price.input_micro_per_mtok, price.output_micro_per_mtok)
            self.hold = await self._runtime.budget_guard().reserve(
                request_id=self.request_id, budget=budget, key_id=principal.key_id,
                model=model_name, cost_micro_usd=cost,
                estimated_tokens=self.estimated_input_tokens + output_tokens,
                team=principal.team)
        extension = route.provider.forward_headers
        # Before the flight starts: its attempts judge their keys by it.
        self.forwarded_extension_headers = any(
            name in self._client_headers for name in extension)
        cluster, chain, retries = self._retries()
        failover: list[tuple[str, str]] = []
        forwarded: dict[str, str | int | float | bool] = {}
        if retries > 0:
            self._start_flight(request, output_limit, chain)
            failover = [(_MAX_RETRIES_HEADER, str(retries))]
        set_headers = [
            (CLUSTER_HEADER, cluster),
            *failover,
            (":path", route.provider.path_prefix + upstream.path),
            *upstream.headers,
            *auth,
            ("content-length", str(len(upstream.body))),
        ]
        if self._config.tracing is not None:
            self._span = start_request_span(
                self._config.tracing, self._trace_context, model_name,
                age_s=self._clock() - self._started)
            set_headers.extend(self._span.headers())
        self._sent_at = self._clock()
        if retries > 0:  # for an attempt whose stream reaches another process (0135)
            forwarded = attempt_metadata(spec, route.model, chain, output_limit,
                                         self.forwarded_extension_headers)
        ours = {name for name, _ in set_headers}
        remove = [name for name in unforwarded_request_headers(
            self._client_headers, backend, extension) if name not in ours]
        return Continue(
            set_headers=set_headers,
            remove_headers=remove,
            body=upstream.body,
            clear_route_cache=True,
            metadata={**self._metadata(), **forwarded},
        )

    def _retries(self) -> tuple[str, Chain, int]:
        """The failover cluster whose priorities follow the routing decision's fallbacks
        (decision 0067), its chain, and the retries Envoy may make: one per allowed
        fallback of the zone (each deployment is tried at most once, so a 429's
        retry-after is never ignored by retrying it), one at least when the key is a
        canary version (the retry carries the active version), never more than
        `failover.max_attempts` allows. No retry: the plain provider cluster."""
        route = self.route
        assert route is not None
        settings = self._config.failover
        if settings.max_attempts <= 1 or not self._endpoint.failover or not has_failover_cluster(
                self._config, route.model, route.deployment):
            return route.provider.cluster, (), 0
        fallbacks = [f.deployment for f in self.route_decision.fallbacks] \
            if self.route_decision is not None else []
        cluster, chain, retries = ordered_chain(self._config, route.model,
                                                route.deployment, fallbacks)
        if any(self._support(Backend.of(provider.kind)) is Support.REFUSED
               for _, provider in chain):  # one deployment's backend could not take it
            return route.provider.cluster, (), 0
        keyring = self._runtime.keys.keyring
        if (self._selected is not None and keyring is not None
                and keyring.is_canary(self._selected.credential, self._selected.scope)):
            retries = max(retries, 1)
        retries = min(retries, settings.max_attempts - 1)
        return (cluster, chain, retries) if retries > 0 else (route.provider.cluster, (), 0)

    def _start_flight(self, request: dict[str, Any], output_limit: OutputLimit,
                      chain: Chain) -> None:
        """Register the request for the per-attempt processor."""
        route = self.route
        assert route is not None
        self._request = request
        self._output_limit = output_limit
        flight = Flight(
            request_id=self.request_id,
            deployments=chain,
            prepare=self._prepare_attempt,
            first_byte_timeout_s=self._config.failover.first_byte_timeout_ms / 1000,
            dialect=self.dialect,
            first_selected=self._selected,
            extension_headers=self.forwarded_extension_headers,
            clock=self._clock,
        )
        FLIGHTS.add(flight)
        self._flight = flight

    async def _prepare_attempt(self, provider: Provider, deployment: Deployment,
                               active_only: bool) -> PreparedAttempt:
        """An attempt at another deployment of the zone (or a canary refused by the
        provider, again on the active key version): its key, path and body dialect."""
        assert self.principal is not None
        assert self.route is not None
        source = AttemptSource(
            request=self._request, spec=self._endpoint, dialect=self.dialect,
            tenant=self.principal.tenant, model=self.route.model,
            output_limit=self._output_limit, client_headers=self._client_headers,
            request_id=self.request_id)
        return await prepare_attempt(self._runtime, source, provider, deployment, active_only)

    def _support(self, backend: Backend) -> Support:
        return SUPPORT.get((self._endpoint.endpoint, backend), Support.REFUSED)

    def _translator_for(self, backend: Backend) -> Translator:
        assert self.principal is not None
        return translator_for_endpoint(self._endpoint, self.dialect, backend,
                                       tenant=self.principal.tenant)

    def _answer(self, body: bytes) -> Respond:
        """The gateway's own 200 answer (model lists, estimated token counts)."""
        self._complete = True
        self.status = 200
        # `answered` tells Envoy's local_reply_config to pass the body through unchanged.
        return Respond(status=200, body=body, headers=[_JSON, *self._tag_headers()],
                       details="asc_answered_by_gateway",
                       metadata={**self._metadata(), "answered": self.endpoint})

    async def _provider_auth(self, provider: Provider,
                             principal: Principal) -> list[tuple[str, str]]:
        try:
            selected = await self._runtime.keys.for_request(
                provider, principal.tenant, bucket=int(self.request_id[:8], 16) % 100)
        except SecretUnavailable as exc:
            log_event(log, logging.ERROR, "provider credential unavailable",
                      request_id=self.request_id, provider=provider.name, reason=str(exc))
            raise GatewayError(ErrorCode.UNAVAILABLE,
                               "No usable credential for the selected provider.") from None
        if selected is None:
            return []
        self._selected = selected
        self.credential = selected.credential
        name, prefix = _AUTH_HEADER[Backend.of(provider.kind)]
        return [(name, prefix + selected.credential.secret.reveal())]

    # -- response headers -------------------------------------------------------------

    async def on_response_headers(self, message: Headers) -> Outbound:
        headers = message.headers
        status_text = headers.get(":status", "")
        status = int(status_text) if status_text.isdigit() else 502
        self.upstream_status = status
        self.answered_at = self._clock()
        self.status = status
        if self._translator is None:  # Envoy's own reply (no route was chosen): tag it only.
            self._complete = True
            if self.principal is None and _REQUEST_ID_HEADER in headers:
                # The fast door's refusal (extproc/fastdoor.py), answered and recorded
                # there: passed through as it is, recorded once.
                self.fast_path = True
                return Continue()
            return Continue(set_headers=[(_REQUEST_ID_HEADER, self.request_id)])
        if (self._flight is None and message.code_details is not None
                and message.code_details != _VIA_UPSTREAM):
            return self._envoys_own_reply()
        self._upstream_headers = headers
        if self._flight is not None:
            first_elsewhere = note_remote_attempt(self._flight, self._config, headers, status)
            # Each attempt's verdict goes to the deployment it hit (0066); the choice's is
            # attempt 1's, with attempt 1's latency.
            self._flight.settle(self._runtime.health)
            if ((self._flight.choice_skipped() or first_elsewhere)
                    and self._deployment_permit is not None
                    and self.route is not None):
                self._runtime.health.release(self.route.key, self._deployment_permit)
                self._deployment_permit = None
            self._report_deployment(self._flight.choice_status(status),
                                    latency_s=self._flight.choice_latency_s())
            self._follow_failover()
        else:
            self._report_deployment(status)
        if self._selected is not None and not self._key_verdict_in_body(status, message):
            await self._report_key(status)
        content_type = headers.get("content-type", "")
        if status >= 400:
            if message.end_of_stream:
                return self._provider_error(b"")
            # The error body decides the client's status and message: read it whole (or
            # its first max_response_bytes, see on_response_body).
            return Continue(response_body_mode=BodyMode.BUFFERED_PARTIAL,
                            remove_headers=[_ATTEMPT_HEADER] if _ATTEMPT_HEADER in headers
                            else [])
        tags = self._tag_headers()
        ours = {name for name, _ in tags}  # set (overwriting the provider's), not removed
        reply = Continue(set_headers=tags, remove_headers=[
            name for name in provider_account_headers(headers) if name not in ours])
        if _ATTEMPT_HEADER in headers:
            reply.remove_headers.append(_ATTEMPT_HEADER)
        if message.end_of_stream:
            self._complete = True
        elif content_type.startswith("text/event-stream"):
            self._stream = self._translator.stream()
            if self._screening is not None:
                self._stream_redactor = self._screening.stream(self.dialect)
            reply.response_body_mode = BodyMode.STREAMED
        elif content_type.startswith("application/json"):
            # Not BUFFERED: Envoy stalls an answer larger than its buffer or answers 500,
            # depending on timing. BUFFERED_PARTIAL hands over the whole answer, or its
            # first max_response_bytes without end_of_stream, and holds the headers
            # until the reply: decision 0055. In that mode Envoy drops a content-length set
            # in the body reply, and may keep the provider's: the answer goes out chunked.
            reply.response_body_mode = BodyMode.BUFFERED_PARTIAL
            reply.remove_headers.append("content-length")
        else:
            self._complete = True  # the body passes through without us
        return reply

    def _key_verdict_in_body(self, status: int, message: Headers | None) -> bool:
        """True when only the error body tells whether the key failed: Gemini answers an
        invalid key with 400 (`key_verdict_status`), so its 400s wait for their body."""
        return (status == 400 and self.route is not None
                and Backend.of(self.route.provider.kind) is Backend.GEMINI
                and (message is None or not message.end_of_stream))

    async def _report_key(self, status: int) -> None:
        """The provider's answer with this key, for pool health and canary rollback.
        key_evidence: nothing client-controlled beyond the built-in header allow-list
        reached the provider (False once extension headers are forwarded)."""
        assert self._selected is not None
        await self._runtime.keys.report(
            self._selected, status, key_evidence=not self.forwarded_extension_headers,
            retry_after=self._upstream_headers.get("retry-after"))

    def _follow_failover(self) -> None:
        """The answer came from another attempt than the one this processor prepared: a
        later attempt (another deployment, or the same one re-keyed after a canary
        refusal), or attempt 1 at another deployment because Envoy's outlier detection
        had ejected the chosen one. Read it as that attempt's answer."""
        flight = self._flight
        assert flight is not None
        assert self.route is not None
        answered = flight.answered
        same_deployment = answered is not None and answered.provider == self.route.provider.name
        if answered is None or (answered.number == 1 and same_deployment):
            return
        served = [(d, p) for d, p in flight.deployments if p.name == answered.provider]
        if served and not same_deployment:
            deployment, provider = served[0]
            self.route = Route(model=self.route.model, deployment=deployment,
                               provider=provider,
                               reason=f"{self.route.reason}; served by {provider.name} "
                                      f"(attempt {answered.number})")
            translator = self._translator_for(Backend.of(provider.kind))
            # Translators keep what the answer's translation needs from request() (a
            # Responses request's echo, whether a client asked for usage): the same call
            # that prepared this attempt, which did not raise then.
            translator.request(self._request, upstream_model=deployment.model,
                               api_version=provider.api_version,
                               output_limit=self._output_limit or OutputLimit(
                                   field=self.route.model.output_limit_field))
            self._translator = translator
        if answered.selected is not None:
            self.credential = answered.selected.credential
            self._selected = answered.selected
        elif answered.credential is not None:
            # Answered by an attempt made in another process (0135): its key's verdict was
            # reported there; attempt 1's key gets none from this answer.
            if self._selected is not None:
                self._runtime.keys.release(self._selected)
                self._selected = None
            self.credential = credential_named(answered.credential)

    def _envoys_own_reply(self) -> Continue:
        """Envoy answered itself after routing (a refused connection, a reset before the
        answer, a timeout, a TLS failure: its `response.code_details`): the provider sent
        nothing. Its local reply (local_reply_config's JSON in the client's dialect) goes
        to the client as it is, as on the fast path; the record has no upstream status,
        the deployment a failure without answer, the key no verdict (decision 0140)."""
        self.upstream_status = None
        self.error = ErrorCode.PROVIDER_ERROR
        self._complete = True
        self._report_deployment(None)
        return Continue(set_headers=self._tag_headers())

    def _report_deployment(self, status: int | None, *,
                           latency_s: float | None = None) -> None:
        """The chosen deployment's verdict (once): what it answered and how fast.

        On the plain path the answer is the choice's. On a failover cluster every other
        attempt's verdict went to the deployment it hit (`extproc.upstream`, decision
        0066); here only attempt 1 at the choice counts (`Flight.choice_status`), so a
        fallback's 200 never closes the choice's breaker."""
        permit, self._deployment_permit = self._deployment_permit, None
        if permit is None or self.route is None:
            return
        latency = latency_s
        if latency is None and self._flight is None and self._sent_at is not None:
            latency = self._clock() - self._sent_at
        self._runtime.health.record(self.route.key, permit, status=status, latency_s=latency)

    def _tag_headers(self) -> list[tuple[str, str]]:
        tags = [(_REQUEST_ID_HEADER, self.request_id)]
        if (self.route_decision is not None and self.principal is not None
                and self.principal.tenant.debug):
            tags.append(("x-asc-route-reason", self.route_decision.reason))
        if self.hold is not None:
            tags.extend(self.hold.response_headers())
        if self.route is not None:
            tags.append(("x-asc-provider", self.route.provider.name))
            tags.append(("x-asc-region", self.route.provider.region))
        if self.credential is not None:
            tags.append(("x-asc-credential", self.credential.label))
        return tags

    # -- response body ----------------------------------------------------------------

    async def on_response_body(self, message: Body) -> Outbound:
        if self.capture is not None:
            self.capture.keep_response(message.body)
        if self._first_byte_at is None and message.body:
            self._first_byte_at = self._clock()
        if message.end_of_stream:
            self._complete = True
        if self._stream is not None:
            out = self._stream.feed(message.body)
            if message.end_of_stream:
                out += self._stream.flush()
                out = self._redact_stream(out, end=True)
                self.usage = self._stream.usage
                self._stream_tail = (self._stream_tail + out)[-_STREAM_TAIL_BYTES:]
                if self.usage is None and not any(
                        end in self._stream_tail for end in _STREAM_ENDS[self.dialect]):
                    # The provider ended the stream early and cleanly (no final usage, no
                    # terminal event): never let that pass as a complete answer.
                    self.stream_truncated = True
                    out += _STREAM_CUT_EVENT[self.dialect]
                return Continue() if out == message.body else Continue(body=out)
            out = self._redact_stream(out, end=False)
            if out:
                self._stream_tail = (self._stream_tail + out)[-_STREAM_TAIL_BYTES:]
            return Continue() if out == message.body else Continue(body=out)
        # BUFFERED_PARTIAL sends one message: the whole body with end_of_stream, or the
        # first part of a longer one, without it, once Envoy holds more than its buffer
        # (max_response_bytes). A body that arrived whole before the headers reply may be
        # longer than the buffer too: every answer above the limit is refused alike.
        # (Envoy also omits end_of_stream when trailers follow; no provider sends them
        # with JSON, and a body not known to be whole is never translated or billed by
        # its usage. Decision 0055.)
        body = message.body
        self._complete = True
        if self.upstream_status is not None and self.upstream_status >= 400:
            if self._selected is not None and self._key_verdict_in_body(
                    self.upstream_status, None):
                await self._report_key(key_verdict_status(self.upstream_status, body))
            return self._provider_error(body)  # scrubbed and cut short anyway
        if not message.end_of_stream or len(body) > self._config.limits.max_response_bytes:
            return self._answer_too_large()
        assert self._translator is not None
        translated = self._translator.response(self.upstream_status or 200, body)
        self.usage = translated.usage
        answer = translated.body
        if self._screening is not None:
            answer, actions = self._screening.answer(answer)
            self._note_guardrails(actions)
        # The headers are still held, ours to change (the cost); content-length went in
        # the headers reply.
        set_headers = []
        if self.usage is not None and self.route is not None:
            cost = usage_cost(self.route.price, self.usage)
            set_headers.append(("x-asc-cost-usd", format_usd(cost)))
        return Continue(set_headers=set_headers, body=None if answer == body else answer)

    def _redact_stream(self, out: bytes, *, end: bool) -> bytes:
        """Translated stream bytes through the guardrails' stream redactor, if any."""
        redactor = self._stream_redactor
        if redactor is None:
            return out
        out = redactor.feed(out)
        if end:
            out += redactor.flush()
            if self._screening is not None:
                self._note_guardrails(self._screening.stream_actions(redactor))
        return out

    def _note_guardrails(self, actions: list[GuardrailAction]) -> None:
        """Record guardrail actions: on the request (log line, audit) and in the metric,
        which counts requests a rule acted on (the count of matches is in the record)."""
        tenant = self._tenant_label()
        for rule, action, count in actions:
            self.guardrail_actions.append((rule, action, count))
            metrics.GUARDRAIL_ACTIONS.labels(tenant, rule, action).inc()

    def _answer_too_large(self) -> Respond:
        """A 502 for an answer the gateway cannot read whole; the whole hold is charged.

        502: the provider answered, but not with something the gateway can relay (the
        client's request was fine, and nothing in the gateway broke). `x-should-retry:
        false` stops the OpenAI and Anthropic SDKs from retrying: the same request would
        be answered (and billed) at the same size again.
        """
        self._answer_cut = True
        limit = self._config.limits.max_response_bytes
        return self._respond_error(GatewayError(
            ErrorCode.RESPONSE_TOO_LARGE,
            f"The provider's answer exceeds the gateway's limit of {limit} bytes.",
            headers=(("x-should-retry", "false"),)))

    def _provider_error(self, body: bytes) -> Respond:
        """The provider's error, in the client's dialect, with the status the client gets."""
        assert self._translator is not None
        flight = self._flight
        if (flight is not None and self.route is not None
                and (len(flight.attempts) > 1 or flight.answered is None)):
            # Several attempts failed, or none reached a provider's answer (refused
            # connections, resets, silence: this is Envoy's own reply).
            made = len(flight.records())
            counted = f" ({made} attempts)" if made > 1 and flight.answered is not None else ""
            return self._respond_error(GatewayError(
                ErrorCode.UNAVAILABLE,
                f"Every deployment of model '{self.route.model.name}' in residency zone "
                f"'{self.route.provider.zone}' failed{counted}; no deployment outside the "
                "zone was tried.",
                headers=tuple(retry_after_headers(self._upstream_headers))))
        self._complete = True
        status, translated = self._translator.error(self.upstream_status or 502, body,
                                                    self._upstream_headers)
        self.status = status
        # Every reply of ours carries an error code: Envoy's local_reply_config keys on it.
        self.error = _PROVIDER_ERROR_CODES.get(status, ErrorCode.PROVIDER_ERROR)
        return Respond(
            status=status,
            body=translated,
            headers=[_JSON, *self._tag_headers(), *retry_after_headers(self._upstream_headers)],
            details=f"asc_provider_status_{self.upstream_status}",
            metadata=self._metadata(),
        )

    # -- end of stream ----------------------------------------------------------------

    def _respond_error(self, error: GatewayError) -> Respond:
        self._complete = True
        self.status = error.status
        self.error = error.code
        if error.status in _DENIAL_STATUSES:
            observe_denial(self._tenant_label(), error.code.value)
        return Respond(
            status=error.status,
            body=error_body(error, self.dialect),
            headers=[_JSON, *self._tag_headers(), *error.headers],
            details=f"asc_{error.code.value}",
            metadata=self._metadata(),
        )

    def _metadata(self) -> dict[str, str | int | float | bool]:
        meta: dict[str, str | int | float | bool] = {"request_id": self.request_id}
        if self.dialect is Dialect.ANTHROPIC:
            # Envoy's own error replies follow the door (envoy_bootstrap._local_reply_config).
            meta["dialect"] = self.dialect.value
        if self.principal is not None:
            meta["tenant"] = self.principal.tenant.id
            meta["key_id"] = self.principal.key_id
        if self.model_asked is not None:
            meta["model"] = self.model_asked
        if self.route is not None:
            meta["provider"] = self.route.provider.name
            meta["region"] = self.route.provider.region
            meta["upstream_model"] = self.route.deployment.model
        if self.credential is not None:
            meta["credential"] = self.credential.label
        if self.error is not None:
            meta["error"] = self.error.value
        return meta

    async def finish(self) -> None:
        """Settle, measure and log; called once per stream, whatever ended it.

        Envoy may reset the ext_proc stream instead of closing it once the response is
        done (measured), so "aborted" is decided from what this request saw - a response
        that did not reach its end - not from how the gRPC stream ended.
        """
        if self._finished:
            return
        self._finished = True
        aborted = not self._complete
        if self._flight is not None:
            FLIGHTS.remove(self.request_id)
            self._flight.release(self._runtime.health)
        try:
            if self._selected is not None:  # no verdict was reported: a probe goes back
                self._runtime.keys.release(self._selected)
            if self._deployment_permit is not None and self.route is not None:
                self._runtime.health.release(self.route.key, self._deployment_permit)
                self._deployment_permit = None
            if (self.hold is not None and self.principal is not None
                    and self.route is not None and not self.fast_path):
                cost, tokens = self._real_cost(aborted)
                self.charged_micro_usd = cost
                settled = await self._runtime.budget_guard().settle(
                    self.hold, cost_micro_usd=cost, tokens=tokens,
                    budget=self.principal.tenant.budget)
                self.budget_settled = bool(settled)
                if settled:  # the metric follows the ledger: a lost settle is not spend
                    observe_budget_spent(self.principal.tenant.id, self.model_asked or "-",
                                         cost)
        except Exception:
            # The hold stays until the sweeper returns it; the request is still measured
            # and logged.
            log.exception("finish failed", extra={"fields": {
                "request_id": self.request_id}})
        finally:
            # Also when settling was cancelled (shutdown): every request is measured,
            # logged and audited exactly once (a fast-path request by complete_from_log).
            if not self.fast_path:
                self._measure_and_log(aborted)
                if self._audit is not None:
                    await self._submit_audit(aborted)

    async def _submit_audit(self, aborted: bool) -> None:
        assert self._audit is not None
        try:
            record = record_from(self, aborted=aborted)
        except Exception:
            log.exception("audit record failed", extra={"fields": {
                "request_id": self.request_id}})
            metrics.AUDIT_DROPPED.labels("record_error").inc()
            return
        await self._audit.submit(record)

    def _tenant_label(self) -> str:
        """The request's tenant as a metric label (cardinality guard: `metrics` config)."""
        if self.principal is None:
            return NO_LABEL
        return self._config.metrics.tenant_label(self.principal.tenant.id)

    def _measure_and_log(self, aborted: bool) -> None:
        """The request's metrics and its one log line (see finish)."""
        now = self._clock()
        duration = now - self._started
        tenant = self.principal.tenant.id if self.principal else "-"
        route = self.route
        attempts = self._flight.records() if self._flight is not None else None
        self._measure(aborted, duration, attempts)
        if self._config.tracing is not None:
            self._end_span(aborted, duration)
        if not self._config.logging.request_log:
            return
        log_event(
            log, logging.INFO, "request finished",
            request_id=self.request_id,
            tenant=tenant,
            key_id=self.principal.key_id if self.principal else None,
            subject=self.principal.subject if self.principal else None,
            identity_source=self.principal.source if self.principal else None,
            team=self.principal.team if self.principal else None,
            model=self.model_asked,
            provider=route.provider.name if route else None,
            region=route.provider.region if route else None,
            upstream_model=route.deployment.model if route else None,
            route_reason=self.route_decision.reason if self.route_decision else None,
            credential=self.credential.label if self.credential else None,
            status=self.status,
            upstream_status=self.upstream_status,
            error=self.error.value if self.error else None,
            aborted=aborted,
            stream=self.streaming,
            charged_micro_usd=self.charged_micro_usd,
            cost_micro_usd=(usage_cost(route.price, self.usage)
                            if route is not None and self.usage is not None else None),
            estimated_input_tokens=self.estimated_input_tokens or None,
            dialect=self.dialect.value,
            endpoint=self.endpoint,
            prompt_tokens=self.usage.input_tokens if self.usage else None,
            cached_prompt_tokens=self.usage.cached_input_tokens if self.usage else None,
            completion_tokens=self.usage.output_tokens if self.usage else None,
            streamed_tokens=(self._stream.output_tokens_so_far
                             if self._stream is not None else None),
            attempts=attempts,
            stream_truncated=self.stream_truncated or None,
            guardrails=[f"{rule}:{action}:{count}"
                        for rule, action, count in self.guardrail_actions] or None,
            duration_ms=round(duration * 1000, 3),
        )

    def _measure(self, aborted: bool, duration: float,
                 attempts: list[dict[str, str | int | float | None]] | None) -> None:
        """The request's Prometheus samples (`extproc.request_metrics`)."""
        tenant = self._tenant_label()
        route = self.route
        model = self.model_asked if route is not None and self.model_asked else "-"
        labels = (tenant, route.provider.name, route.provider.region, model) \
            if route is not None else (tenant, "-", "-", "-")
        usage = self.usage
        observe_request(
            labels, "aborted" if aborted and self.error is None else str(self.status or 0),
            routed=route is not None, duration_s=duration,
            ttft_s=(self._first_byte_at - self._started
                    if self._first_byte_at is not None else None),
            streamed=self._stream is not None,
            input_tokens=usage.input_tokens if usage is not None else None,
            output_tokens=usage.output_tokens if usage is not None else None)
        if attempts is not None and len(attempts) > 1:
            observe_fallbacks(tenant, model, attempts)
        if self.hold is not None and self.hold.remaining:
            observe_budget_remaining(tenant, self.hold.remaining,
                                                     self.charged_micro_usd)

    def _end_span(self, aborted: bool, duration: float) -> None:
        """The request's span (`extproc.tracing`), made now for a request refused before
        its route was chosen."""
        assert self._config.tracing is not None
        # No model in the name of a refused request's span: it may be any client input.
        span = self._span or start_request_span(
            self._config.tracing, self._trace_context, "", age_s=duration)
        self._span = None
        route = self.route
        status = self.status
        span.end(request_attributes(
            request_id=self.request_id,
            tenant=self.principal.tenant.id if self.principal else None,
            model=self.model_asked,
            provider_kind=route.provider.kind if route else None,
            provider=route.provider.name if route else None,
            region=route.provider.region if route else None,
            upstream_model=route.deployment.model if route else None,
            host=route.provider.host if route else None,
            port=route.provider.port if route else None,
            status=status, error=self.error.value if self.error else None,
            input_tokens=self.usage.input_tokens if self.usage else None,
            output_tokens=self.usage.output_tokens if self.usage else None,
            credential=self.credential.label if self.credential else None,
            stream=self.streaming, aborted=aborted and self.error is None),
            failed=(aborted and self.error is None) or (status is not None and status >= 500))

    # -- fast path hooks (extproc/fastpath.py) ----------------------------------------

    @property
    def runtime(self) -> Runtime:
        return self._runtime

    @property
    def route_override(self) -> RouteOverride | None:
        return self._route_override

    @property
    def route_guardrails(self) -> GuardrailPolicy | None:
        return self._route_guardrails

    @property
    def client_headers(self) -> tuple[str, ...]:
        return self._client_headers

    def clock(self) -> float:
        return self._clock()

    def take_deployment_permit(self) -> None:
        assert self.route is not None
        self._deployment_permit = self._runtime.health.allow(self.route.key)

    async def provider_auth(self, provider: Provider,
                            principal: Principal) -> list[tuple[str, str]]:
        return await self._provider_auth(provider, principal)

    @property
    def key_scope(self) -> str | None:
        """The chosen key's health scope (`global`, `tenant:<id>`), None without a key."""
        return self._selected.scope if self._selected is not None else None

    def metadata(self) -> dict[str, str | int | float | bool]:
        return self._metadata()

    def tag_headers(self) -> list[tuple[str, str]]:
        return self._tag_headers()

    def restore(self, *, request_id: str, started: float, first_byte_at: float | None) -> None:
        """A fast-path request rebuilt from Envoy's access log: its id and timings."""
        self.request_id = request_id
        self._started = started
        self._first_byte_at = first_byte_at

    def mark_complete(self, complete: bool) -> None:
        self._complete = complete

    def respond_error(self, error: GatewayError) -> Respond:
        """The refusal of `error` in the client's dialect (the fast door's own refusals)."""
        return self._respond_error(error)

    def abandon(self) -> None:
        """The fast door's check was given up by Envoy before its answer: the request never
        went upstream. finish() returns its hold and records it as refused (503)."""
        self.fast_path = False
        self._complete = True
        self.status = 503
        self.error = ErrorCode.UNAVAILABLE

    @property
    def finishes_without_waiting(self) -> bool:
        """finish() has nothing to await: no hold to settle here (server.py runs it
        inline instead of as a task)."""
        return self.fast_path or (self.hold is None and self._audit is None)

    def _real_cost(self, aborted: bool) -> tuple[int, int]:
        """(micro-USD, tokens) to charge: the provider's usage when it reported one.

        Usage with parts the gateway has no price for (server tools, audio, a premium
        service tier) is charged at least the full hold, never just its priced part.
        Without usage: nothing for a provider error; an estimate for a stream cut short
        (prompt estimate + content chunks seen); the full hold when the client left before
        any response, or when a non-streamed answer was larger than max_response_bytes
        (or never reached the service whole): the provider did - and billed - work whose
        size is unknown.
        """
        assert self.route is not None
        assert self.hold is not None
        price = self.route.price
        if self.usage is not None:
            usage = self.usage
            if usage.unpriced:
                cost = usage_cost(price, usage)
                tokens = usage.input_tokens + usage.output_tokens
                held_cost, held_tokens = self._held()
                log_event(log, logging.WARNING, "unpriced usage charged at the hold",
                          request_id=self.request_id, unpriced=list(usage.unpriced),
                          priced_micro_usd=cost, held_micro_usd=held_cost)
                return max(cost, held_cost), max(tokens, held_tokens)
        elif self.upstream_status is not None and self.upstream_status >= 400:
            return 0, 0
        elif self._answer_cut:
            return self._held()
        elif (self.upstream_status is not None and self._stream is None and aborted
              and self.hold.reservation is not None):
            held = {g.unit: g.amount for g in self.hold.reservation.groups}
            return held.get("usd", 0), held.get("tokens", 0)
        elif self.upstream_status is not None:
            streamed = self._stream.output_tokens_so_far if self._stream is not None else 0
            usage = Usage(self.estimated_input_tokens, streamed)
        elif aborted and self.hold.reservation is not None:
            return self._held()
        else:
            return 0, 0
        return usage_cost(price, usage), usage.input_tokens + usage.output_tokens

    def _held(self) -> tuple[int, int]:
        """(micro-USD, tokens) this request holds."""
        assert self.hold is not None
        if self.hold.reservation is None:
            return self.hold.local_amount, 0
        held = {g.unit: g.amount for g in self.hold.reservation.groups}
        return held.get("usd", 0), held.get("tokens", 0)


_HANDLERS: Final[dict[Phase, Callable[[RequestProcessor, Any], Awaitable[Outbound]]]] = {
    Phase.REQUEST_HEADERS: RequestProcessor.on_request_headers,
    Phase.REQUEST_BODY: RequestProcessor.on_request_body,
    Phase.RESPONSE_HEADERS: RequestProcessor.on_response_headers,
    Phase.RESPONSE_BODY: RequestProcessor.on_response_body,
}
"""The method of each phase, once per process rather than four bound methods per request."""


def new_request_id() -> str:
    """A new request id: the hex of a random (version 4) UUID, as `uuid.uuid4().hex`
    gives, without building a `UUID` object for it."""
    value = int.from_bytes(os.urandom(16), "big")
    return f"{(value & _UUID4_CLEAR) | _UUID4_SET:032x}"


_UUID4_CLEAR: Final = ~((0xF000 << 64) | (0xC000 << 48))
_UUID4_SET: Final = (4 << 76) | (0x8000 << 48)
"""The version (4) and variant (RFC 4122) bits `uuid.UUID(version=4)` sets."""




def _shown_model(name: str) -> str:
    """A client's model name as answers and logs show it: cut to a bounded length."""
    if len(name) <= _SHOWN_MODEL_CHARS:
        return name
    return name[:_SHOWN_MODEL_CHARS] + "..."


def _parse_chat_request(body: bytes, required: str = "messages") -> dict[str, Any]:
    if not body:
        raise GatewayError(ErrorCode.INVALID_REQUEST, "A JSON request body is required.")
    try:
        request = json.loads(body, parse_constant=_reject_constant)
    except (ValueError, UnicodeDecodeError):
        raise GatewayError(ErrorCode.INVALID_REQUEST,
                           "The request body is not valid JSON.") from None
    except RecursionError:
        raise GatewayError(ErrorCode.INVALID_REQUEST, _TOO_DEEP) from None
    if _SURROGATE_ESCAPE.search(body) is not None:
        # Rare (most clients send UTF-8): only then pay for a full check.
        try:
            json.dumps(request, ensure_ascii=False).encode()
        except UnicodeEncodeError:
            raise GatewayError(
                ErrorCode.INVALID_REQUEST,
                "The request body contains a lone surrogate escape, which is not valid "
                "Unicode.") from None
        except RecursionError:
            raise GatewayError(ErrorCode.INVALID_REQUEST, _TOO_DEEP) from None
    if not isinstance(request, dict):
        raise GatewayError(ErrorCode.INVALID_REQUEST, "The request body must be a JSON object.")
    model = request.get("model")
    if not isinstance(model, str) or not model:
        raise GatewayError(ErrorCode.INVALID_REQUEST, "'model' must be a non-empty string.",
                           param="model")
    messages = request.get(required)
    if required == "messages" and (not isinstance(messages, list) or not messages):
        raise GatewayError(ErrorCode.INVALID_REQUEST, "'messages' must be a non-empty array.",
                           param="messages")
    if messages is None:
        raise GatewayError(ErrorCode.INVALID_REQUEST, f"'{required}' is required.",
                           param=required)
    stream = request.get("stream", False)
    if not isinstance(stream, bool):
        raise GatewayError(ErrorCode.INVALID_REQUEST, "'stream' must be a boolean.",
                           param="stream")
    return request


def _reject_constant(name: str) -> Any:
    """NaN and Infinity are not JSON; Python's parser accepts them unless told not to."""
    raise ValueError(f"{name} is not valid JSON")
