"""Which provider key goes on a request: the tenant's own (BYOK) or the provider's pool,
chosen by health and weight, resolved from env/file references or the keyring."""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass

from extproc.config import CredentialRef, Provider, Tenant
from extproc.credentials.keyring import Keyring
from extproc.credentials.pools import CredentialPool, NoUsableCredential
from extproc.credentials.static import ResolvedCredential, StaticKeyProvider
from extproc.secrets import SecretUnavailable

__all__ = ["ProviderKeys", "Selected"]


@dataclass(frozen=True, slots=True)
class Selected:
    credential: ResolvedCredential
    scope: str
    """'global', or 'tenant:<id>' for a tenant's own key."""
    chosen_at: float


class ProviderKeys:
    def __init__(self, refs: Mapping[str, CredentialRef], static: StaticKeyProvider,
                 keyring: Keyring | None, pool: CredentialPool) -> None:
        self._refs = refs
        self._static = static
        self._keyring = keyring
        self._pool = pool

    @property
    def keyring(self) -> Keyring | None:
        return self._keyring

    @property
    def pool(self) -> CredentialPool:
        return self._pool

    async def for_request(self, provider: Provider, tenant: Tenant,
                          bucket: int) -> Selected | None:
        """None for a provider without credentials (self-hosted, no auth)."""
        own = tenant.own_credentials.get(provider.name)
        ids = own or provider.credentials
        if not ids:
            return None
        scope = f"tenant:{tenant.id}" if own else "global"
        try:
            # Health is per scoped credential: one tenant's bad key never closes another's.
            qualified = self._pool.choose([f"{scope}/{i}" for i in ids],
                                          [self._refs[i].weight for i in ids])
        except NoUsableCredential as exc:
            raise SecretUnavailable(f"provider {provider.name}: {exc}") from None
        chosen = qualified.partition("/")[2]
        ref = self._refs[chosen]
        if ref.keyring:
            if self._keyring is None:
                raise SecretUnavailable(f"credential {chosen}: no keyring configured")
            credential = await self._keyring.credential(chosen, scope=scope, bucket=bucket)
        else:
            credential = self._static.credential(chosen)
        return Selected(credential, scope, time.monotonic())

    async def report(self, selected: Selected, status: int) -> None:
        """What the provider answered with this key: feeds pool health and canary rollback."""
        keyring = self._keyring if self._refs[selected.credential.id].keyring else None
        if keyring is not None and keyring.is_canary(selected.credential, selected.scope):
            # A failing canary is the rollback's business; it must not close the whole
            # credential (and with it the healthy active version) for every replica.
            await keyring.report(selected.credential, selected.scope, status)
            return
        self._pool.record(f"{selected.scope}/{selected.credential.id}", status,
                          time.monotonic() - selected.chosen_at)
