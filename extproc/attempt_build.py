"""One attempt at one deployment, built the same way wherever its request's state lives.

A request that may fail over has two ext_proc streams: the router-level one
(`extproc.phases.RequestProcessor`) and one per attempt (`extproc.upstream`). When both
reach the same process, the attempt finds the request's `Flight` there and is prepared
from the router-level processor's state. When Envoy balances streams over several
processes (three replicas behind one Envoy; the sidecar's `--workers N` sockets), the
attempt may land where no `Flight` exists: it is then rebuilt from what the router-level
reply forwarded in the `asc` dynamic metadata (`attempt_metadata`) plus the client's
body, which Envoy hands every retry again (decision 0135). Both paths call
`prepare_attempt`, so an attempt carries the same key, path, headers and body either way.

The attempt's answer tells the router-level processor which attempt it was through the
`x-asc-attempt` response header (`<number>;<provider>;<credential label>;<latency ms>`),
which that processor always removes before the client sees it.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Final

from extproc.config import Deployment, GatewayConfig, Model, Provider, Tenant
from extproc.credentials import ResolvedCredential
from extproc.endpoints import ENDPOINTS, EndpointSpec, translator_for_endpoint
from extproc.errors import Dialect
from extproc.failover import Attempt, Chain, Flight, PreparedAttempt
from extproc.runtime import Runtime
from extproc.secrets import Secret
from extproc.translate.base import Backend
from extproc.translate.headers import unforwarded_request_headers
from extproc.translate.limits import OutputLimit

__all__ = [
    "ACTIVE_BUCKET",
    "ATTEMPT_HEADER",
    "AUTH_HEADER",
    "PROVIDER_HEADERS",
    "AnsweredAttempt",
    "AttemptSource",
    "RemoteAttempt",
    "attempt_header",
    "attempt_metadata",
    "credential_named",
    "note_remote_attempt",
    "prepare_attempt",
    "read_attempt_header",
    "remote_attempt",
]

AUTH_HEADER: Final[dict[Backend, tuple[str, str]]] = {
    Backend.OPENAI: ("authorization", "Bearer "),
    Backend.OPENAI_COMPATIBLE: ("authorization", "Bearer "),
    Backend.MISTRAL: ("authorization", "Bearer "),
    Backend.AZURE: ("api-key", ""),
    Backend.ANTHROPIC: ("x-api-key", ""),
    Backend.GEMINI: ("x-goog-api-key", ""),
}
PROVIDER_HEADERS: Final = frozenset({
    *(name for name, _ in AUTH_HEADER.values()), "anthropic-version", "anthropic-beta"})
"""Headers one provider's attempt sets that must not reach another provider."""
ACTIVE_BUCKET: Final = 100
"""A canary bucket no canary percentage reaches: the active key version."""
ATTEMPT_HEADER: Final = "x-asc-attempt"
"""Set by an attempt rebuilt without its `Flight` on its response headers; read and
removed by the router-level processor."""

# Keys of the `asc` dynamic metadata an attempt is rebuilt from (strings only: the
# upstream processor reads string values, `extproc.envoy.attempt_context`).
_ENDPOINT: Final = "attempt_endpoint"
_CHAIN: Final = "attempt_chain"
_MODEL: Final = "attempt_model"
_LIMIT_DEFAULT: Final = "attempt_limit_default"
_EXTENSION: Final = "attempt_extension_headers"
_CHAIN_SEPARATOR: Final = ","


@dataclass(frozen=True, slots=True)
class AttemptSource:
    """What an attempt is built from: the client's request and who sent it."""

    request: Mapping[str, Any]
    spec: EndpointSpec
    dialect: Dialect
    tenant: Tenant
    model: Model
    output_limit: OutputLimit | None
    client_headers: Iterable[str]
    request_id: str


async def prepare_attempt(runtime: Runtime, source: AttemptSource, provider: Provider,
                          deployment: Deployment, active_only: bool) -> PreparedAttempt:
    """An attempt at another deployment of the zone (or a canary refused by the provider,
    again on the active key version): its key, path and body dialect."""
    backend = Backend.of(provider.kind)
    translator = translator_for_endpoint(source.spec, source.dialect, backend,
                                         tenant=source.tenant)
    upstream = translator.request(dict(source.request), upstream_model=deployment.model,
                                  api_version=provider.api_version,
                                  output_limit=source.output_limit or OutputLimit(
                                      field=source.model.output_limit_field))
    selected = await runtime.keys.for_request(
        provider, source.tenant,
        bucket=ACTIVE_BUCKET if active_only else int(source.request_id[:8], 16) % 100)
    auth: list[tuple[str, str]] = []
    if selected is not None:
        name, prefix = AUTH_HEADER[backend]
        auth = [(name, prefix + selected.credential.secret.reveal())]
    set_headers = [
        (":path", provider.path_prefix + upstream.path),
        *upstream.headers,
        *auth,
        ("content-length", str(len(upstream.body))),
    ]
    ours = {name for name, _ in set_headers}
    # Attempt 1's headers persist into this attempt (measured): another provider's
    # key header or dialect header must go.
    remove = {name for name in PROVIDER_HEADERS if name not in ours}
    # (x-envoy-* were removed at the router level; Envoy refuses to touch them here.)
    remove.update(name for name in unforwarded_request_headers(
        source.client_headers, backend, provider.forward_headers)
        if name not in ours and not name.startswith("x-envoy-"))
    return PreparedAttempt(set_headers=set_headers, remove_headers=sorted(remove),
                           body=upstream.body, selected=selected)


def attempt_metadata(spec: EndpointSpec, model: Model, chain: Chain,
                     output_limit: OutputLimit,
                     extension_headers: bool) -> dict[str, str | int | float | bool]:
    """What the router-level reply forwards so that an attempt can be rebuilt in another
    process. Names only (tenant, key id, dialect and request id are in the metadata
    already); nothing secret: the attempt selects its own key."""
    meta: dict[str, str | int | float | bool] = {
        _ENDPOINT: f"{spec.method} {spec.path}",
        _MODEL: model.name,
        _CHAIN: _CHAIN_SEPARATOR.join(p.name for _, p in chain),
    }
    if output_limit.default is not None:
        meta[_LIMIT_DEFAULT] = str(output_limit.default)
    if extension_headers:
        meta[_EXTENSION] = "1"
    return meta


@dataclass(frozen=True, slots=True)
class RemoteAttempt:
    """A request's attempt state rebuilt from forwarded metadata (no local `Flight`)."""

    request_id: str
    spec: EndpointSpec
    dialect: Dialect
    tenant: Tenant
    model: Model
    deployments: Chain
    output_limit: OutputLimit
    extension_headers: bool

    def source(self, body: bytes, client_headers: Iterable[str]) -> AttemptSource:
        """The attempt's source from the client's body (Envoy re-sends the original on
        every retry; it passed the router-level checks already, so it parses)."""
        request = json.loads(body)
        if not isinstance(request, dict):
            raise ValueError("request body is not an object")
        return AttemptSource(request=request, spec=self.spec, dialect=self.dialect,
                             tenant=self.tenant, model=self.model,
                             output_limit=self.output_limit,
                             client_headers=tuple(client_headers),
                             request_id=self.request_id)


def remote_attempt(config: GatewayConfig, context: Mapping[str, str]) -> RemoteAttempt | None:
    """The attempt state the router-level reply forwarded (`asc.*` keys of `context`);
    None when any part is missing or no longer in this config (then the attempt is
    refused, as before: never guess a key)."""
    def get(name: str) -> str:
        return context.get(f"asc.{name}", "")

    method, _, path = get(_ENDPOINT).partition(" ")
    spec = ENDPOINTS.get((method, path))
    tenant = config.tenants.get(get("tenant"))
    model = config.models.get(get(_MODEL))
    request_id = get("request_id")
    if spec is None or tenant is None or model is None or len(request_id) < 8:
        return None
    deployments: list[tuple[Deployment, Provider]] = []
    for name in get(_CHAIN).split(_CHAIN_SEPARATOR):
        provider = config.providers.get(name)
        deployment = next((d for d in model.deployments if d.provider == name), None)
        if provider is None or deployment is None:
            return None
        deployments.append((deployment, provider))
    limit_default = get(_LIMIT_DEFAULT)
    try:
        dialect = Dialect(get("dialect") or Dialect.OPENAI.value)
        int(request_id[:8], 16)
    except ValueError:
        return None
    return RemoteAttempt(
        request_id=request_id, spec=spec, dialect=dialect, tenant=tenant, model=model,
        deployments=tuple(deployments),
        output_limit=OutputLimit(field=model.output_limit_field,
                                 default=int(limit_default) if limit_default.isdigit()
                                 else None),
        extension_headers=get(_EXTENSION) == "1")


@dataclass(frozen=True, slots=True)
class AnsweredAttempt:
    """What an attempt rebuilt elsewhere tells the router-level processor."""

    number: int
    provider: str
    credential: str | None
    latency_ms: float | None


def attempt_header(attempt: Attempt) -> tuple[str, str]:
    """The response header naming the attempt that answered:
    `<number>;<provider>;<credential label>;<latency ms>` (labels only, no secret)."""
    label = attempt.credential or ""
    latency = "" if attempt.latency_ms is None else f"{attempt.latency_ms}"
    return ATTEMPT_HEADER, f"{attempt.number};{attempt.provider};{label};{latency}"


def read_attempt_header(headers: Mapping[str, str]) -> AnsweredAttempt | None:
    """The `x-asc-attempt` header's attempt; None when absent or malformed."""
    value = headers.get(ATTEMPT_HEADER)
    if value is None:
        return None
    parts = value.split(";", 3)
    if len(parts) != 4 or not parts[0].isdigit() or not parts[1]:
        return None
    try:
        latency = float(parts[3]) if parts[3] else None
    except ValueError:
        return None
    return AnsweredAttempt(number=int(parts[0]), provider=parts[1],
                           credential=parts[2] or None, latency_ms=latency)


def note_remote_attempt(flight: Flight, config: GatewayConfig, headers: Mapping[str, str],
                        status: int) -> bool:
    """The answer came from an attempt made in another process (`x-asc-attempt`): put it
    in this request's `Flight`, so that it is read with that deployment's translator and
    logged. No-op when the `Flight` knows the attempt already (made in this process).

    True when attempts were made elsewhere and attempt 1 is not known here: its outcome
    (a canary refusal, a 503) is unknown, so the choice's deployment gets no verdict."""
    answered = read_attempt_header(headers)
    if answered is None or any(a.number == answered.number for a in flight.attempts):
        return False
    provider = config.providers.get(answered.provider)
    if provider is None or all(p is not provider for _, p in flight.deployments):
        return False
    first_elsewhere = all(a.number != 1 for a in flight.attempts)
    known = {a.number for a in flight.attempts}
    for number in range(1, answered.number):
        if number not in known:
            # Made elsewhere too (or never connected): all that is known is that Envoy
            # retried it. Listed so that it is not taken for a connect failure.
            _, earlier = flight.deployments[(number - 1) % len(flight.deployments)]
            flight.attempts.append(Attempt(number=number, provider=earlier.name,
                                           region=earlier.region, started=0.0,
                                           left="retried"))
    attempt = flight.start(provider, answered.number)
    flight.end(attempt, status)
    attempt.latency_ms = answered.latency_ms
    attempt.credential = answered.credential
    return first_elsewhere


def credential_named(label: str | None) -> ResolvedCredential | None:
    """A key known by its label only (`id@version`, from another process's attempt): what
    tags, logs and audit show of it. Holds no secret; never sent anywhere."""
    if label is None:
        return None
    credential_id, _, version = label.rpartition("@")
    if not credential_id or not version.isdigit():
        return None
    return ResolvedCredential(id=credential_id, version=int(version), secret=Secret(""))
