"""Fixtures shared by the integration tests (real redis-server, OpenBao)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest

from extproc.budgets.ledger import redis_client
from extproc.config import RedisSettings

LEDGER_IO_TIMEOUT_S = 2.0
"""The ledger deadline of tests about what the ledger stores, not about timeouts: the
product's 50 ms counts Redis's own time, and a Redis starved of CPU on a loaded 2-core
host (a cold cluster, other suites) may take longer; these tests must not depend on it."""


@pytest.fixture
async def redis(redis_server: int) -> AsyncIterator[Any]:
    client = redis_client(RedisSettings(url=f"redis://127.0.0.1:{redis_server}/0",
                                        timeout_ms=2000))
    yield client
    await client.aclose()
