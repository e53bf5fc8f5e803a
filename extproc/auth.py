"""Tenant authentication: virtual keys, and the directory of every principal a config names.

Virtual keys are stored only as HMAC-SHA256(pepper, key): a leaked config or Redis dump
does not reveal them, and without the pepper they cannot be brute-forced offline. Lookup
hashes the presented key once and finds it in a dict; the match is then confirmed with
`hmac.compare_digest`. Timing can at most reveal facts about a peppered HMAC, never the key.

Mesh workloads (SPIFFE ids) are looked up here too; which source may authenticate a
request, and from what, is `extproc.identity`'s decision.
"""

from __future__ import annotations

import hmac
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final

from extproc.config import GatewayConfig, MeshIdentity, Tenant
from extproc.secrets import Secret

__all__ = [
    "CLIENT_CREDENTIAL_HEADERS",
    "Principal",
    "TenantDirectory",
    "hash_key",
    "presented_key",
]

HASH_PREFIX: Final = "hmac-sha256:v1:"

CLIENT_CREDENTIAL_HEADERS: Final = (
    "authorization",
    "x-api-key",
    "api-key",
    "proxy-authorization",
)
"""Headers that may carry a client credential; all are removed before the provider hop."""


def hash_key(pepper: Secret, key: str) -> str:
    """The stored form of a virtual key (what `extproc keys hash` prints)."""
    digest = hmac.digest(pepper.reveal().encode(), key.encode(), "sha256").hex()
    return HASH_PREFIX + digest


def presented_key(headers: Mapping[str, str]) -> str | None:
    """The virtual key from `Authorization: Bearer` or `x-api-key`, if any."""
    authorization = headers.get("authorization")
    if authorization is not None:
        scheme, _, token = authorization.strip().partition(" ")
        if scheme.lower() == "bearer" and token.strip():
            return token.strip()
    api_key = headers.get("x-api-key")
    if api_key is not None and api_key.strip():
        return api_key.strip()
    return None


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is calling: the tenant, the principal inside it, and how it was authenticated."""

    tenant: Tenant
    key_id: str
    """The virtual key's id; for mesh and JWT principals their `subject`, which can never
    equal a key id (key ids have no ':' or '/'), so no key budget applies to them."""
    subject: str = ""
    """Who: a virtual key id, a SPIFFE id, or `<iss>#<sub>` of a verified JWT. Left empty,
    it is `key_id` (a principal built from a key id alone is that virtual key)."""
    source: str = "virtual_key"
    """How: "virtual_key" | "mesh" | "jwt"."""
    team: str | None = None
    """The principal's team or app inside the tenant (`tenants.<t>.teams`), if any."""

    def __post_init__(self) -> None:
        if not self.subject:
            object.__setattr__(self, "subject", self.key_id)


class TenantDirectory:
    """Finds the principal of a virtual key or a SPIFFE id; built once per config."""

    def __init__(self, config: GatewayConfig, pepper: Secret) -> None:
        self._pepper = pepper
        self._by_hash: dict[str, Principal] = {
            key.hash: Principal(tenant=tenant, key_id=key.id, subject=key.id,
                                source="virtual_key", team=key.team)
            for tenant in config.tenants.values()
            for key in tenant.keys
        }
        self._tenants = config.tenants
        self._spiffe_exact: dict[str, tuple[Tenant, MeshIdentity]] = {}
        self._spiffe_prefixes: list[tuple[str, Tenant, MeshIdentity]] = []
        for tenant in config.tenants.values():
            for mesh in tenant.mesh_identities:
                if mesh.prefix:
                    self._spiffe_prefixes.append((mesh.spiffe, tenant, mesh))
                else:
                    self._spiffe_exact[mesh.spiffe] = (tenant, mesh)
        # The most specific prefix wins (config validation refuses equal prefixes).
        self._spiffe_prefixes.sort(key=lambda entry: len(entry[0]), reverse=True)

    def authenticate(self, key: str) -> Principal | None:
        digest = hash_key(self._pepper, key)
        principal = self._by_hash.get(digest)
        if principal is None:
            return None
        stored = next(k.hash for k in principal.tenant.keys if k.id == principal.key_id)
        return principal if hmac.compare_digest(stored, digest) else None

    def workload(self, spiffe_id: str) -> Principal | None:
        """The principal of an mTLS peer's SPIFFE id: an exact entry first, else the
        longest prefix entry (`spiffe://td/` matches every id of the trust domain td)."""
        found = self._spiffe_exact.get(spiffe_id)
        if found is None:
            found = next(((tenant, mesh) for prefix, tenant, mesh in self._spiffe_prefixes
                          if spiffe_id.startswith(prefix)), None)
        if found is None:
            return None
        tenant, mesh = found
        return Principal(tenant=tenant, key_id=spiffe_id, subject=spiffe_id, source="mesh",
                         team=mesh.team)

    def tenant(self, tenant_id: str) -> Tenant | None:
        return self._tenants.get(tenant_id)

    def __repr__(self) -> str:
        workloads = len(self._spiffe_exact) + len(self._spiffe_prefixes)
        shown = f", {workloads} workloads" if workloads else ""
        return f"TenantDirectory({len(self._by_hash)} keys{shown})"
