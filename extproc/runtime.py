"""Everything a request needs, compiled from one config: immutable and swapped whole.

A stream takes the runtime current at its start and uses it to the end, so a hot reload
never changes the rules in the middle of a request.
"""

from __future__ import annotations

from dataclasses import dataclass

from extproc.auth import TenantDirectory
from extproc.budgets.guard import BudgetGuard
from extproc.budgets.ledger import RedisLedger, redis_client
from extproc.config import GatewayConfig
from extproc.credentials import KeyProvider, StaticKeyProvider
from extproc.secrets import resolve_secret

__all__ = ["Runtime", "RuntimeHolder"]


@dataclass(frozen=True, slots=True)
class Runtime:
    config: GatewayConfig
    tenants: TenantDirectory
    keys: KeyProvider
    budgets: BudgetGuard | None = None

    @classmethod
    def build(cls, config: GatewayConfig, environ: dict[str, str] | None = None,
              previous: Runtime | None = None) -> Runtime:
        """Resolve the pepper and provider keys; raises `SecretUnavailable` if one is missing.

        The Redis client and breaker carry over from `previous` when the Redis and budget
        settings did not change, so a reload does not drop connections or breaker state.
        """
        pepper = resolve_secret(config.pepper, environ)
        budgets = None
        if config.redis is not None:
            same = (previous is not None and previous.budgets is not None
                    and previous.config.redis == config.redis
                    and previous.config.budgets == config.budgets)
            budgets = previous.budgets if same and previous else _budget_guard(config)
        return cls(
            config=config,
            tenants=TenantDirectory(config, pepper),
            keys=StaticKeyProvider.from_config(config, environ),
            budgets=budgets,
        )

    def budget_guard(self) -> BudgetGuard:
        if self.budgets is None:  # config validation requires redis for any budget
            raise RuntimeError("no budget ledger configured")
        return self.budgets


def _budget_guard(config: GatewayConfig) -> BudgetGuard:
    settings = config.redis
    assert settings is not None
    ledger = RedisLedger(redis_client(settings), hold_ttl_s=config.budgets.hold_ttl_s)
    return BudgetGuard(ledger, timezone=config.budgets.timezone,
                       timeout_s=settings.timeout_ms / 1000)


class RuntimeHolder:
    """The current runtime; replaced whole, never mutated, so readers need no lock."""

    def __init__(self, runtime: Runtime) -> None:
        self.current = runtime
