"""Provider keys from environment variables or files (the pre-envelope-encryption source).

Secrets are resolved once per config load, so a missing key stops startup or a reload
instead of failing requests later. `{keyring: true}` credentials come from the
envelope-encrypted keyring instead; `selection.ProviderKeys` picks between the two.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from extproc.config import GatewayConfig
from extproc.secrets import Secret, SecretUnavailable, resolve_secret

__all__ = ["ResolvedCredential", "StaticKeyProvider"]


@dataclass(frozen=True, slots=True)
class ResolvedCredential:
    id: str
    version: int
    secret: Secret
    canary: bool = False
    """Chosen as its credential's canary version: what the provider answers to it stays
    the canary's (rollback count, retry on the active version) even when a rollback lands
    while the request is in flight."""

    @property
    def label(self) -> str:
        """`id@version`: what headers, logs and audit may show about a key."""
        return f"{self.id}@{self.version}"


class StaticKeyProvider:
    def __init__(self, credentials: Mapping[str, ResolvedCredential]) -> None:
        self._credentials = dict(credentials)

    @classmethod
    def from_config(
        cls, config: GatewayConfig, environ: dict[str, str] | None = None
    ) -> StaticKeyProvider:
        """Resolve every referenced credential; raise `SecretUnavailable` naming the first gap."""
        used = {cred for provider in config.providers.values() for cred in provider.credentials
                if not config.credentials[cred].keyring}
        resolved = {
            cred_id: ResolvedCredential(cred_id, 1, resolve_secret(config.credentials[cred_id],
                                                                   environ))
            for cred_id in sorted(used)
        }
        return cls(resolved)

    def credential(self, credential_id: str) -> ResolvedCredential:
        try:
            return self._credentials[credential_id]
        except KeyError:
            raise SecretUnavailable(f"credential {credential_id!r} is not loaded") from None

    def __repr__(self) -> str:
        return f"StaticKeyProvider({sorted(self._credentials)})"
