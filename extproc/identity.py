"""Who is calling: the request's principal from the identity sources its route accepts.

Three sources, each mapped to (tenant, principal, team):

* `virtual_key` - `Authorization: Bearer` / `x-api-key`, checked against peppered hashes;
* `mesh` - the SPIFFE id of an mTLS peer, read **only** from the attributes Envoy computes
  from the TLS connection (`connection.mtls`, `connection.uri_san_peer_certificate`).
  No header counts: a client on a plain listener can send any `x-forwarded-client-cert`,
  and even on the mTLS listener the header is Envoy's copy of what the attribute says
  (docs/decisions/0100-identity-from-envoy-attributes.md);
* `jwt` - the claims of a token Envoy's `jwt_authn` verified (signature, expiry, issuer,
  audience), forwarded as dynamic metadata; a token is never parsed from a header here.

The sources are tried in the configured order (`identity.sources`, or a route's
`filter_metadata.asc.identity`); the first one the request *presents* decides: a
presented identity that maps to no tenant is refused, never passed on to the next source.
"""

from __future__ import annotations

import enum
import functools
from collections.abc import Mapping, Sequence
from typing import Final

from extproc.auth import Principal, TenantDirectory, presented_key
from extproc.config import IdentitySettings, JwtIdentity, Tenant
from extproc.errors import ErrorCode, GatewayError
from extproc.messages import Headers

__all__ = [
    "IDENTITY_HEADERS",
    "ROUTE_IDENTITY_FIELD",
    "IdentitySource",
    "allowed_models",
    "authenticate",
    "identity_sources",
    "route_identity",
]

ROUTE_IDENTITY_FIELD: Final = "identity"
"""`filter_metadata.asc.identity` on an Envoy route: the sources that route accepts."""

IDENTITY_HEADERS: Final = (
    "x-forwarded-client-cert",
    # What gateways commonly name a verified token's payload: never read, never forwarded.
    "x-jwt-payload",
    "x-jwt-claims",
)
"""Identity-looking headers the gateway never trusts; removed before the provider hop."""


class IdentitySource(enum.StrEnum):
    VIRTUAL_KEY = "virtual_key"
    MESH = "mesh"
    JWT = "jwt"


def route_identity(metadata: Mapping[str, object] | None
                   ) -> tuple[tuple[IdentitySource, ...] | None, dict[str, object] | None]:
    """Split a route's `identity` list off its `asc` metadata; the rest is routing
    (`RouteOverride.from_metadata`). An unreadable list is refused (500), like an
    unreadable routing field: guessing would widen who may call the route."""
    if not metadata or ROUTE_IDENTITY_FIELD not in metadata:
        return None, dict(metadata) if metadata else None
    rest = {name: value for name, value in metadata.items() if name != ROUTE_IDENTITY_FIELD}
    raw = metadata[ROUTE_IDENTITY_FIELD]
    known = {source.value for source in IdentitySource}
    if (not isinstance(raw, list) or not raw
            or not all(isinstance(item, str) and item in known for item in raw)):
        raise GatewayError(ErrorCode.INTERNAL, "The gateway route's identity metadata is "
                           "invalid: identity must be a non-empty list of "
                           f"{', '.join(sorted(known))}.")
    sources = tuple(IdentitySource(item) for item in dict.fromkeys(raw))
    return sources, rest or None


@functools.lru_cache(maxsize=16)
def identity_sources(names: tuple[str, ...]) -> tuple[IdentitySource, ...]:
    """The config's identity source names as `IdentitySource`s (one conversion per
    config rather than one per request)."""
    return tuple(IdentitySource(name) for name in names)


def authenticate(directory: TenantDirectory, settings: IdentitySettings, message: Headers,
                 route_sources: Sequence[IdentitySource] | None = None) -> Principal:
    """The request's principal, or GatewayError 401 (nothing presented, or a bad key) /
    403 (an identity Envoy verified that is no principal of any tenant)."""
    sources = route_sources or identity_sources(settings.sources)
    for source in sources:
        if source is IdentitySource.MESH:
            if message.mtls and message.peer_uri_san:
                return _workload(directory, message.peer_uri_san)
        elif source is IdentitySource.JWT:
            if message.jwt_claims is not None and settings.jwt is not None:
                return _jwt_principal(directory, settings.jwt, message.jwt_claims)
        else:
            key = presented_key(message.headers)
            if key is not None:
                principal = directory.authenticate(key)
                if principal is None:
                    raise GatewayError(ErrorCode.UNAUTHENTICATED, "Invalid API key.")
                return principal
    raise GatewayError(ErrorCode.UNAUTHENTICATED, _missing_message(sources))


def allowed_models(principal: Principal) -> frozenset[str]:
    """The models this principal may use: its team's list, else its tenant's."""
    tenant = principal.tenant
    team = tenant.teams.get(principal.team) if principal.team is not None else None
    if team is not None and team.models is not None:
        return team.models & tenant.models
    return tenant.models


_MISSING: Final = {
    IdentitySource.VIRTUAL_KEY: "an API key ('Authorization: Bearer <key>' or 'x-api-key')",
    IdentitySource.MESH: "a client certificate with a SPIFFE id (mTLS listener)",
    IdentitySource.JWT: "a bearer JWT of the configured issuer",
}


def _missing_message(sources: Sequence[IdentitySource]) -> str:
    if tuple(sources) == (IdentitySource.VIRTUAL_KEY,):
        return "Missing API key: send it as 'Authorization: Bearer <key>' or 'x-api-key'."
    return "Missing credentials: send " + " or ".join(_MISSING[s] for s in sources) + "."


def _workload(directory: TenantDirectory, spiffe_id: str) -> Principal:
    principal = directory.workload(spiffe_id)
    if principal is None:
        # The id comes from a certificate the mesh CA signed; naming it helps the operator
        # and reveals nothing the caller does not know.
        raise GatewayError(ErrorCode.FORBIDDEN,
                           f"The workload '{_shown(spiffe_id)}' is not a principal of any "
                           "tenant.")
    return principal


def _jwt_principal(directory: TenantDirectory, settings: JwtIdentity,
                   claims: Mapping[str, object]) -> Principal:
    issuer, subject = claims.get("iss"), claims.get("sub")
    if issuer != settings.issuer:  # jwt_authn checked it; a second look costs nothing
        raise GatewayError(ErrorCode.UNAUTHENTICATED, "The token's issuer is not accepted.")
    if not isinstance(subject, str) or not subject:
        raise GatewayError(ErrorCode.FORBIDDEN, "The token has no subject ('sub').")
    tenant = _claimed_tenant(directory, claims.get(settings.tenant_claim),
                             settings.tenant_claim)
    team = None
    if settings.team_claim is not None:
        claimed = claims.get(settings.team_claim)
        if claimed is not None:
            if not isinstance(claimed, str) or claimed not in tenant.teams:
                raise GatewayError(ErrorCode.FORBIDDEN,
                                   f"The token's '{settings.team_claim}' claim names no team "
                                   "of its tenant.")
            team = claimed
    who = f"{issuer}#{subject}"
    return Principal(tenant=tenant, key_id=who, subject=who, source="jwt", team=team)


def _claimed_tenant(directory: TenantDirectory, claimed: object, claim: str) -> Tenant:
    tenant = directory.tenant(claimed) if isinstance(claimed, str) else None
    if tenant is None:
        raise GatewayError(ErrorCode.FORBIDDEN,
                           f"The token's '{claim}' claim names no tenant of this gateway.")
    return tenant


_SHOWN_ID_CHARS: Final = 200


def _shown(value: str) -> str:
    return value[:_SHOWN_ID_CHARS]
