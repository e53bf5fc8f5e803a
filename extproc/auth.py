"""Tenant authentication by virtual key.

Virtual keys are stored only as HMAC-SHA256(pepper, key): a leaked config or Redis dump
does not reveal them, and without the pepper they cannot be brute-forced offline. Lookup
hashes the presented key once and finds it in a dict; the match is then confirmed with
`hmac.compare_digest`. Timing can at most reveal facts about a peppered HMAC, never the key.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final

from extproc.config import GatewayConfig, Tenant
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
    digest = hmac.new(pepper.reveal().encode(), key.encode(), hashlib.sha256).hexdigest()
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
    """Who is calling: the tenant and which of its virtual keys was used."""

    tenant: Tenant
    key_id: str


class TenantDirectory:
    """Finds the tenant of a virtual key; built once per config."""

    def __init__(self, config: GatewayConfig, pepper: Secret) -> None:
        self._pepper = pepper
        self._by_hash: dict[str, Principal] = {
            key.hash: Principal(tenant=tenant, key_id=key.id)
            for tenant in config.tenants.values()
            for key in tenant.keys
        }

    def authenticate(self, key: str) -> Principal | None:
        digest = hash_key(self._pepper, key)
        principal = self._by_hash.get(digest)
        if principal is None:
            return None
        stored = next(k.hash for k in principal.tenant.keys if k.id == principal.key_id)
        return principal if hmac.compare_digest(stored, digest) else None

    def __repr__(self) -> str:
        return f"TenantDirectory({len(self._by_hash)} keys)"
