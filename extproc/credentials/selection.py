"""Which provider key goes on a request: the tenant's own (BYOK) or the provider's pool,
chosen by health and weight, resolved from env/file references or the keyring.

A request holds its credential's breaker permit from `for_request` until it either
`report`s what the provider answered (a verdict) or is `release`d without one; exactly
one of the two counts, so a half-open probe can never be lost (issue 8, item 2).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field

from extproc.breaker import Permit
from extproc.config import CredentialRef, Provider, Tenant
from extproc.credentials.keyring import Keyring
from extproc.credentials.pools import Choice, CredentialPool, NoUsableCredential
from extproc.credentials.static import ResolvedCredential, StaticKeyProvider
from extproc.secrets import SecretUnavailable

__all__ = ["ProviderKeys", "Selected"]


@dataclass(slots=True, eq=False)
class Selected:
    credential: ResolvedCredential
    scope: str
    """'global', or 'tenant:<id>' for a tenant's own key."""
    chosen_at: float
    choice: Choice
    """The pool's pick and its breaker permit (a probe, when the credential was half-open)."""
    settled: bool = field(default=False, repr=False)
    """A verdict was reported or the permit released: the permit is no longer ours."""


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
            choice = self._pool.choose([f"{scope}/{i}" for i in ids],
                                       [self._refs[i].weight for i in ids])
        except NoUsableCredential as exc:
            raise SecretUnavailable(f"provider {provider.name}: {exc}") from None
        chosen = choice.credential.partition("/")[2]
        ref = self._refs[chosen]
        try:
            if ref.keyring:
                if self._keyring is None:
                    raise SecretUnavailable(f"credential {chosen}: no keyring configured")
                credential = await self._keyring.credential(chosen, scope=scope, bucket=bucket)
            else:
                credential = self._static.credential(chosen)
        except BaseException:
            # Unavailable key, or the request was cancelled while the KMS answered: no
            # verdict on the credential, and its probe must not stay taken.
            self._pool.release(choice)
            raise
        return Selected(credential, scope, time.monotonic(), choice)

    async def report(self, selected: Selected, status: int, *, key_evidence: bool,
                     retry_after: str | None = None) -> None:
        """What the provider answered with this key: feeds pool health and canary rollback.

        `key_evidence`: True when nothing client-controlled (beyond the built-in header
        allow-list) reached the provider, so a 401/403 is about the key. A False report
        never opens the credential and never counts toward a canary rollback.
        """
        if selected.settled:
            return
        selected.settled = True
        await self._verdict(selected.credential, selected.scope, selected.choice, status,
                            latency_s=time.monotonic() - selected.chosen_at,
                            key_evidence=key_evidence, retry_after=retry_after)

    async def report_answer(self, credential: ResolvedCredential, scope: str, status: int, *,
                            latency_s: float, key_evidence: bool,
                            retry_after: str | None = None) -> None:
        """A verdict on a key whose permit went back before the answer came (the fast
        path: the answer arrives later, from Envoy's access log, maybe in another worker):
        recorded as an ordinary (not probe) call of `scope/credential.id`."""
        if credential.id not in self._refs:
            return  # removed by a reload since
        await self._verdict(credential, scope, Choice(f"{scope}/{credential.id}",
                                                      Permit(probe=False)),
                            status, latency_s=latency_s, key_evidence=key_evidence,
                            retry_after=retry_after)

    async def _verdict(self, credential: ResolvedCredential, scope: str, choice: Choice,
                       status: int, *, latency_s: float, key_evidence: bool,
                       retry_after: str | None) -> None:
        keyring = self._keyring if self._refs[credential.id].keyring else None
        if keyring is not None and keyring.is_canary(credential, scope):
            # A failing canary is the rollback's business; it must not close the whole
            # credential (and with it the healthy active version) for every replica. Nor
            # may a canary answer close a half-open credential: give the permit back.
            self._pool.release(choice)
            if key_evidence:
                await keyring.report(credential, scope, status)
            return
        self._pool.record(choice, status, latency_s, key_evidence=key_evidence,
                          retry_after=retry_after)

    def release(self, selected: Selected) -> None:
        """The request ended without a verdict (budget refusal, client abort, error before
        the provider answered): give the credential's permit back. A no-op after `report`,
        so `finish()` may call it unconditionally."""
        if selected.settled:
            return
        selected.settled = True
        self._pool.release(selected.choice)
