"""The upstream (per-attempt) ext_proc: one `AttemptProcessor` per attempt Envoy makes.

Envoy runs this filter inside a failover cluster, once per attempt, after it picked the
attempt's host. Attempt 1 at the deployment the route chose goes on as the router-level
processor prepared it (one message, no body). Any other attempt gets the credential, path
and body of the deployment it landed on, in that provider's dialect; Envoy keeps attempt
1's header mutations and resets the body, so every provider header is overwritten or
removed and body and content-length are re-sent. The attempt's outcome (status, latency,
why it was left) goes into the request's `Flight`, which the router-level processor logs.
Without that `Flight` in this process (Envoy balanced the stream elsewhere), the attempt is
rebuilt from the forwarded metadata and the client's body, and its answer names it in an
`x-asc-attempt` header for the router-level processor (`extproc.attempt_build`, 0135).
"""

from __future__ import annotations

import logging
from typing import Final

from extproc.attempt_build import (
    RemoteAttempt,
    attempt_header,
    prepare_attempt,
    remote_attempt,
)
from extproc.config import Deployment, Provider
from extproc.deployment_health import deployment_key
from extproc.errors import Dialect, ErrorCode, GatewayError, error_body
from extproc.failover import Attempt, Flight, Flights, PreparedAttempt
from extproc.logs import log_event
from extproc.messages import Body, BodyMode, Continue, Headers, Inbound, Outbound, Phase, Respond
from extproc.runtime import Runtime
from extproc.secrets import SecretUnavailable

__all__ = ["AttemptProcessor"]

_ATTEMPT_HEADER: Final = "x-envoy-attempt-count"
_ADDRESS: Final = "upstream.address"
_REQUEST_ID: Final = "asc.request_id"

log = logging.getLogger("extproc.upstream")


class AttemptProcessor:
    """One attempt of one request at one deployment."""

    def __init__(self, runtime: Runtime, flights: Flights) -> None:
        self._runtime = runtime
        self._flights = flights
        self._flight: Flight | None = None
        self._attempt: Attempt | None = None
        self._body: bytes | None = None
        self._remote: RemoteAttempt | None = None
        """The request's state as forwarded, when its `Flight` is in another process."""
        self._pending: tuple[Provider, Deployment, bool, list[str]] | None = None
        """A rebuilt attempt waiting for the client's body: (provider, deployment,
        active_only, the attempt's header names)."""

    async def handle(self, message: Inbound, context: dict[str, str]) -> Outbound:
        try:
            if isinstance(message, Headers) and message.phase is Phase.REQUEST_HEADERS:
                return await self._start(message, context)
            if isinstance(message, Body) and message.phase is Phase.REQUEST_BODY:
                if self._pending is not None:
                    return await self._rebuild(message.body)
                return Continue(body=self._body) if self._body is not None else Continue()
            if isinstance(message, Headers) and message.phase is Phase.RESPONSE_HEADERS:
                return await self._answered(message)
            return Continue()
        except GatewayError as exc:
            flight = self._flight
            return _refuse(exc, flight.dialect if flight is not None else Dialect.OPENAI)

    async def _start(self, message: Headers, context: dict[str, str]) -> Outbound:
        flight = self._flights.get(context.get(_REQUEST_ID, ""))
        if flight is None:
            return self._start_elsewhere(message, context)
        self._flight = flight
        count = message.headers.get(_ATTEMPT_HEADER, "1")
        number = int(count) if count.isdigit() else len(flight.attempts) + 1
        landed = flight.deployment_at(context.get(_ADDRESS, ""), number)
        if landed is None:
            raise GatewayError(ErrorCode.UNAVAILABLE, "The request could not be retried.")
        deployment, provider = landed
        attempt = flight.start(provider, number)
        self._attempt = attempt
        first_deployment, _ = flight.deployments[0]
        if number == 1 and deployment is first_deployment:
            attempt.selected = flight.first_selected
            attempt.credential = (flight.first_selected.credential.label
                                  if flight.first_selected is not None else None)
            return Continue()
        # Any other attempt (a fallback, a canary re-keyed, attempt 1 at a fallback when
        # the choice was ejected) is the verdict of the deployment it hit (0066). Taken
        # before the await, like the router-level permit (0061); a deployment that opened
        # while this request was in flight still gets the attempt Envoy already made.
        attempt.deployment = deployment_key(deployment)
        attempt.permit = self._runtime.health.allow(attempt.deployment)
        # Active key version after a canary refusal; also when this deployment's earlier
        # attempt was made in another process (0135), whose outcome is unknown here.
        elsewhere = deployment is first_deployment and not any(
            a.number < number and a.provider == provider.name for a in flight.attempts)
        try:
            prepared = await flight.prepare(provider, deployment,
                                            provider.name in flight.canary_refused
                                            or elsewhere)
        except SecretUnavailable:
            log_event(log, logging.ERROR, "provider credential unavailable",
                      request_id=flight.request_id, provider=provider.name)
            raise GatewayError(ErrorCode.UNAVAILABLE,
                               "No usable credential for the fallback provider.") from None
        attempt.selected = prepared.selected
        attempt.credential = (prepared.selected.credential.label
                              if prepared.selected is not None else None)
        self._body = prepared.body
        return Continue(set_headers=prepared.set_headers,
                        remove_headers=prepared.remove_headers,
                        request_body_mode=BodyMode.BUFFERED)

    def _start_elsewhere(self, message: Headers, context: dict[str, str]) -> Outbound:
        """The request's `Flight` is in another process (Envoy balanced this stream
        elsewhere, decision 0135): rebuild the attempt from the forwarded metadata and the
        client's body. Without that state this attempt could only go out with another
        provider's key (attempt 1's headers persist): refuse, never guess."""
        remote = remote_attempt(self._runtime.config, context)
        if remote is None:
            raise GatewayError(ErrorCode.UNAVAILABLE, "The request could not be retried.")
        flight = Flight(request_id=remote.request_id, deployments=remote.deployments,
                        prepare=_unprepared,
                        first_byte_timeout_s=self._runtime.config.failover.first_byte_timeout_ms
                        / 1000,
                        dialect=remote.dialect, extension_headers=remote.extension_headers)
        self._flight = flight
        count = message.headers.get(_ATTEMPT_HEADER, "1")
        number = int(count) if count.isdigit() else 1
        landed = flight.deployment_at(context.get(_ADDRESS, ""), number)
        if landed is None:
            raise GatewayError(ErrorCode.UNAVAILABLE, "The request could not be retried.")
        deployment, provider = landed
        first_deployment, _ = flight.deployments[0]
        if number == 1:
            if deployment is first_deployment:
                return Continue()  # as the router-level processor prepared it
            # Attempt 1 carries the router-level body (the first deployment's
            # translation), not the client's: it cannot be rebuilt here.
            raise GatewayError(ErrorCode.UNAVAILABLE, "The request could not be retried.")
        self._remote = remote
        attempt = self._attempt = flight.start(provider, number)
        attempt.deployment = deployment_key(deployment)
        attempt.permit = self._runtime.health.allow(attempt.deployment)
        # A retry at the first deployment is a canary refusal's retry (or a retry after a
        # failure, where the active version is as good): the active key version.
        self._pending = (provider, deployment, deployment is first_deployment,
                         list(message.headers))
        return Continue(request_body_mode=BodyMode.BUFFERED)

    async def _rebuild(self, body: bytes) -> Outbound:
        """The rebuilt attempt's key, path, headers and body, from the client's body."""
        remote, pending, attempt = self._remote, self._pending, self._attempt
        assert remote is not None
        assert pending is not None
        assert attempt is not None
        self._pending = None
        provider, deployment, active_only, names = pending
        try:
            source = remote.source(body, names)
        except ValueError:  # json.JSONDecodeError included: not the client's body
            raise GatewayError(ErrorCode.UNAVAILABLE,
                               "The request could not be retried.") from None
        try:
            prepared = await prepare_attempt(self._runtime, source, provider, deployment,
                                             active_only)
        except SecretUnavailable:
            log_event(log, logging.ERROR, "provider credential unavailable",
                      request_id=remote.request_id, provider=provider.name)
            raise GatewayError(ErrorCode.UNAVAILABLE,
                               "No usable credential for the fallback provider.") from None
        attempt.selected = prepared.selected
        attempt.credential = (prepared.selected.credential.label
                              if prepared.selected is not None else None)
        return Continue(set_headers=prepared.set_headers,
                        remove_headers=prepared.remove_headers, body=prepared.body)

    async def _answered(self, message: Headers) -> Outbound:
        flight, attempt = self._flight, self._attempt
        if flight is None or attempt is None:
            return Continue()
        status_text = message.headers.get(":status", "")
        status = int(status_text) if status_text.isdigit() else 502
        flight.end(attempt, status)
        flight.verdict(self._runtime.health, attempt)
        selected = attempt.selected
        if selected is not None:
            keys = self._runtime.keys
            keyring = keys.keyring
            if (status in (401, 403) and keyring is not None
                    and keyring.is_canary(selected.credential, selected.scope)):
                flight.canary_refused.add(attempt.provider)
            await keys.report(selected, status, key_evidence=not flight.extension_headers,
                              retry_after=message.headers.get("retry-after"))
        if self._remote is not None:
            # The router-level processor has no record of this attempt: tell it which
            # attempt answered (it removes the header before the client sees it).
            return Continue(set_headers=[attempt_header(attempt)])
        return Continue()

    def finish(self) -> None:
        """The attempt's stream ended: without an answer it was reset or timed out."""
        flight, attempt = self._flight, self._attempt
        if flight is None or attempt is None:
            return
        if attempt.latency_ms is None:
            # No verdict yet: a reset may be the client leaving. The router-level
            # processor settles it once Envoy stops retrying (`Flight.settle`), or gives
            # the permit back (`Flight.release`).
            flight.end(attempt, None)
            if self._remote is not None and attempt.permit is not None:
                # No router-level processor here to settle it: a timeout is the
                # deployment's failure; a reset (maybe the client leaving) gives it back.
                if attempt.left == "timeout":
                    flight.verdict(self._runtime.health, attempt)
                elif attempt.deployment is not None:
                    self._runtime.health.release(attempt.deployment, attempt.permit)
                    attempt.permit = None
        if attempt.selected is not None:
            self._runtime.keys.release(attempt.selected)  # no-op after a report


def _refuse(error: GatewayError, dialect: Dialect) -> Respond:
    """An attempt that cannot be made is answered here; Envoy does not retry it."""
    return Respond(status=error.status, body=error_body(error, dialect),
                   headers=[("content-type", "application/json")],
                   details=f"asc_upstream_{error.code.value}",
                   metadata={"error": error.code.value})


async def _unprepared(provider: Provider, deployment: Deployment,
                      active_only: bool) -> PreparedAttempt:
    """The `prepare` of a `Flight` rebuilt from metadata: its attempt is prepared from
    the client's body (`AttemptProcessor._rebuild`), never through this."""
    raise GatewayError(ErrorCode.UNAVAILABLE, "The request could not be retried.")
