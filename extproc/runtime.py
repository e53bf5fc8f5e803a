"""Everything a request needs, compiled from one config: immutable and swapped whole.

A stream takes the runtime current at its start and uses it to the end, so a hot reload
never changes the rules in the middle of a request.
"""

from __future__ import annotations

from dataclasses import dataclass

from extproc.auth import TenantDirectory
from extproc.config import GatewayConfig
from extproc.credentials import KeyProvider, StaticKeyProvider
from extproc.secrets import resolve_secret

__all__ = ["Runtime", "RuntimeHolder"]


@dataclass(frozen=True, slots=True)
class Runtime:
    config: GatewayConfig
    tenants: TenantDirectory
    keys: KeyProvider

    @classmethod
    def build(cls, config: GatewayConfig, environ: dict[str, str] | None = None) -> Runtime:
        """Resolve the pepper and provider keys; raises `SecretUnavailable` if one is missing."""
        pepper = resolve_secret(config.pepper, environ)
        return cls(
            config=config,
            tenants=TenantDirectory(config, pepper),
            keys=StaticKeyProvider.from_config(config, environ),
        )


class RuntimeHolder:
    """The current runtime; replaced whole, never mutated, so readers need no lock."""

    def __init__(self, runtime: Runtime) -> None:
        self.current = runtime
