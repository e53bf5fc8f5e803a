"""The boundary to the gateway's two networked backends, Redis and Vault/OpenBao (hvac):
which of their exceptions mean what, decided here once.

Callers catch `REDIS_FAILURES` / `hvac.exceptions.VaultError` and turn them into their own
exception (`LedgerUnavailable`, `StoreUnavailable`, `KekError`) with the text built here:
the operation and an HTTP status or an exception type, never a URL, a token, a key or the
server's own words.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Final

import hvac.exceptions
from redis import exceptions as redis_errors

__all__ = [
    "HVAC_THREADS",
    "REDIS_FAILURES",
    "describe_redis_failure",
    "describe_vault_failure",
    "hvac_executor",
    "run_blocking",
    "vault_status",
]

REDIS_FAILURES: Final[tuple[type[Exception], ...]] = (redis_errors.RedisError, OSError)
"""What a Redis call raises when Redis is down, slow, refusing or answering an error
(redis-py wraps most socket errors, but not all)."""

HVAC_THREADS: Final = 4
"""Threads per hvac client: enough for a few concurrent unwraps (the keyring keeps one in
flight per key version), few enough that a slow KMS cannot exhaust the process."""

_VAULT_STATUS: Final[tuple[tuple[type[Exception], int], ...]] = (
    (hvac.exceptions.InvalidRequest, 400),
    (hvac.exceptions.Unauthorized, 401),
    (hvac.exceptions.Forbidden, 403),
    (hvac.exceptions.InvalidPath, 404),
    (hvac.exceptions.PreconditionFailed, 412),
    (hvac.exceptions.RateLimitExceeded, 429),
    (hvac.exceptions.InternalServerError, 500),
    (hvac.exceptions.VaultNotInitialized, 501),
    (hvac.exceptions.BadGateway, 502),
    (hvac.exceptions.VaultDown, 503),
)


def describe_redis_failure(exc: BaseException) -> str:
    """`redis: ConnectionError`: safe to log, to count and to show an operator."""
    return f"redis: {type(exc).__name__}"


def vault_status(exc: BaseException) -> int | None:
    """The HTTP status behind an hvac exception; None for one without a status."""
    return next((status for kind, status in _VAULT_STATUS if isinstance(exc, kind)), None)


def describe_vault_failure(exc: BaseException) -> str:
    """`HTTP 403`, or the exception's type when it carries no status."""
    status = vault_status(exc)
    return f"HTTP {status}" if status is not None else type(exc).__name__


def hvac_executor(name: str, workers: int = HVAC_THREADS) -> ThreadPoolExecutor:
    """A bounded thread pool of its own for one blocking hvac client."""
    return ThreadPoolExecutor(max_workers=workers, thread_name_prefix=f"asc-{name}")


async def run_blocking(executor: ThreadPoolExecutor, call: Callable[..., Any],
                       *args: Any) -> Any:
    """`call(*args)` on `executor`, awaited without blocking the event loop."""
    return await asyncio.get_running_loop().run_in_executor(executor, call, *args)
