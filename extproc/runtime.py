"""Everything a request needs, compiled from one config: immutable and swapped whole.

A stream takes the runtime current at its start and uses it to the end, so a hot reload
never changes the rules in the middle of a request. What holds live state - the Redis
client, the budget breaker, the keyring's decrypted-key cache, key pool health - carries
over to the new runtime when its settings did not change.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from redis.asyncio.cluster import RedisCluster

from extproc.auth import TenantDirectory
from extproc.budgets.guard import BudgetGuard
from extproc.budgets.ledger import RedisLedger, redis_client, resp_pool
from extproc.config import GatewayConfig, KekSettings, RecordStoreSettings
from extproc.credentials import StaticKeyProvider
from extproc.credentials.kek import (
    AppRoleAuth,
    FileKek,
    KekBackend,
    KekError,
    TokenAuth,
    TransitKek,
)
from extproc.credentials.keyring import (
    Keyring,
    KeyStore,
    RecordStore,
    RedisRecords,
    VaultKvRecords,
)
from extproc.credentials.pools import CredentialPool
from extproc.credentials.selection import ProviderKeys
from extproc.deployment_health import DeploymentHealth
from extproc.secrets import SecretUnavailable, resolve_secret

__all__ = ["Runtime", "RuntimeHolder", "kek_from_settings", "records_from_settings"]

_KMS_TIMEOUT_S = 1.5
"""Transit and KV calls: below Envoy's message_timeout (2 s), so a slow KMS is the
gateway's 503, not Envoy's 504."""


@dataclass(frozen=True, slots=True)
class Runtime:
    config: GatewayConfig
    tenants: TenantDirectory
    keys: ProviderKeys
    budgets: BudgetGuard | None = None
    redis: Any = None
    health: DeploymentHealth = field(default_factory=DeploymentHealth)
    """Deployment breakers; carried over a reload whose health settings did not change."""

    @classmethod
    def build(cls, config: GatewayConfig, environ: dict[str, str] | None = None,
              previous: Runtime | None = None) -> Runtime:
        """Resolve the pepper and provider keys; raises `SecretUnavailable` if one is missing."""
        pepper = resolve_secret(config.pepper, environ)
        same_redis = previous is not None and previous.config.redis == config.redis
        redis = None
        if config.redis is not None:
            redis = previous.redis if same_redis and previous else redis_client(config.redis)
        budgets = None
        if redis is not None and config.redis is not None:
            keep = (same_redis and previous is not None and previous.budgets is not None
                    and previous.config.budgets == config.budgets)
            budgets = previous.budgets if keep and previous else BudgetGuard(
                RedisLedger(redis, hold_ttl_s=config.budgets.hold_ttl_s,
                            io_timeout_s=config.redis.timeout_ms / 1000,
                            queue_timeout_s=config.redis.queue_timeout_ms / 1000,
                            resp=resp_pool(config.redis)),
                timezone=config.budgets.timezone)
        keyring = None
        if redis is not None and config.secrets.kek is not None:
            previous_keyring = previous.keys.keyring if previous else None
            keep = (same_redis and previous is not None and previous_keyring is not None
                    and previous.config.secrets == config.secrets)
            keyring = previous_keyring if keep else Keyring(
                KeyStore(redis, records_from_settings(config.secrets.store, redis, environ)),
                kek_from_settings(config.secrets.kek, environ),
                cache_ttl_s=config.secrets.cache_ttl_s, max_age_s=config.secrets.max_age_s,
                state_ttl_s=config.secrets.state_ttl_s,
                rollback_after=config.secrets.rollback_after)
        pool = previous.keys.pool if previous else CredentialPool()
        keys = ProviderKeys(config.credentials, StaticKeyProvider.from_config(config, environ),
                            keyring, pool)
        keep_health = (previous is not None
                       and previous.health.settings == config.deployment_health)
        health = previous.health if keep_health and previous else DeploymentHealth(
            config.deployment_health, pool=pool)
        return cls(config=config, tenants=TenantDirectory(config, pepper), keys=keys,
                   budgets=budgets, redis=redis, health=health)

    def budget_guard(self) -> BudgetGuard:
        if self.budgets is None:  # config validation requires redis for any budget
            raise RuntimeError("no budget ledger configured")
        return self.budgets


async def close_replaced(old: Runtime, new: Runtime) -> None:
    """Close what a reload replaced and `new` does not use: the old ledger's connections,
    the old keyring's KEK session and record store, the old Redis client. Before this a
    reload that changed `redis` or the budget settings left them open for good."""
    if old.budgets is not None and old.budgets is not new.budgets:
        old.budgets.close()
    keyring, kept = old.keys.keyring, new.keys.keyring
    if keyring is not None and keyring is not kept:
        await keyring.kek.close()
        await keyring.store.record_store.close()
    if old.redis is not None and old.redis is not new.redis:
        if isinstance(old.redis, RedisCluster):
            await old.redis.aclose()
        else:  # its pool was made apart (`redis_client`): not closed by default
            await old.redis.aclose(close_connection_pool=True)


def kek_from_settings(settings: KekSettings, environ: dict[str, str] | None = None
                      ) -> KekBackend:
    if settings.backend == "file":
        if settings.path is None:
            raise SecretUnavailable("secrets.kek.path is not set")
        try:
            return FileKek.load(settings.path)
        except KekError as exc:
            raise SecretUnavailable(str(exc)) from None
    if settings.url is None:
        raise SecretUnavailable("secrets.kek.url is not set")
    if settings.token is not None:
        auth: TokenAuth | AppRoleAuth = TokenAuth(resolve_secret(settings.token, environ))
    elif settings.role_id is not None and settings.secret_id is not None:
        auth = AppRoleAuth(settings.role_id, resolve_secret(settings.secret_id, environ))
    else:
        raise SecretUnavailable("secrets.kek needs a token or an AppRole")
    return TransitKek(settings.url, settings.key, auth=auth, mount_point=settings.mount,
                      timeout=_KMS_TIMEOUT_S)


def records_from_settings(settings: RecordStoreSettings, redis: Any,
                          environ: dict[str, str] | None = None) -> RecordStore:
    """Where sealed records live: next to their state in `redis`, or in Vault/OpenBao KV."""
    if settings.backend == "redis":
        return RedisRecords(redis)
    if settings.url is None or settings.token is None:
        raise SecretUnavailable("secrets.store needs url and token for backend vault_kv")
    return VaultKvRecords(settings.url, auth=TokenAuth(resolve_secret(settings.token, environ)),
                          mount=settings.mount, prefix=settings.prefix, timeout=_KMS_TIMEOUT_S)


class RuntimeHolder:
    """The current runtime; replaced whole, never mutated, so readers need no lock."""

    def __init__(self, runtime: Runtime) -> None:
        self.current = runtime
