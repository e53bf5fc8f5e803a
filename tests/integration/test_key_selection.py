"""`ProviderKeys` with the real keyring (redis-server, file KEK): which provider answers
count toward a canary's automatic rollback (issue 8 item 3)."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from extproc.budgets.ledger import redis_client
from extproc.config import GatewayConfig, RedisSettings, parse_config
from extproc.credentials.kek import FileKek, init_kek_file
from extproc.credentials.keyring import Keyring, KeyStore
from extproc.credentials.pools import CredentialPool
from extproc.credentials.rotation import canary
from extproc.credentials.selection import ProviderKeys
from extproc.credentials.static import StaticKeyProvider
from extproc.secrets import Secret


@pytest.fixture
async def redis(redis_server: int) -> AsyncIterator[Any]:
    client = redis_client(RedisSettings(url=f"redis://127.0.0.1:{redis_server}/0",
                                        timeout_ms=2000))
    yield client
    await client.aclose()


def config_for(credential: str) -> GatewayConfig:
    return parse_config(f"""\
version: 1
auth: {{pepper: {{env: PEPPER}}}}
redis: {{url: "redis://127.0.0.1:1/0"}}
secrets: {{kek: {{backend: file, path: kek.key}}}}
credentials:
  {credential}: {{keyring: true}}
providers:
  p: {{kind: openai, base_url: "http://127.0.0.1:1", region: r, zone: eu, cluster: c,
      credentials: [{credential}]}}
models:
  m:
    price: {{input_per_mtok: 1, output_per_mtok: 1}}
    deployments: [{{provider: p}}]
tenants:
  t:
    zone: eu
    keys:
      - id: t-1
        hash: "hmac-sha256:v1:{'0' * 64}"
    models: [m]
""")


async def test_only_key_evidence_401s_roll_a_canary_back(redis: Any, tmp_path: Path) -> None:
    credential = f"ring-{uuid.uuid4().hex[:8]}"
    config = config_for(credential)
    store = KeyStore(redis)
    keyring = Keyring(store, FileKek.load(init_kek_file(tmp_path / "kek.key")),
                      rollback_after=3)
    await keyring.add("global", credential, "openai", Secret("sk-canary-selection-v1"))
    await keyring.add("global", credential, "openai", Secret("sk-canary-selection-v2"))
    await store.transition("global", credential, lambda s: canary(s, 2, 100))
    keys = ProviderKeys(config.credentials, StaticKeyProvider({}), keyring, CredentialPool())

    async def answer(status: int, *, key_evidence: bool) -> int:
        selected = await keys.for_request(config.providers["p"], config.tenants["t"],
                                          bucket=0)
        assert selected is not None
        await keys.report(selected, status, key_evidence=key_evidence)
        return selected.credential.version

    # 401/403 after client-controlled input reached the provider: the canary stays.
    for status in (401, 403) * 5:
        assert await answer(status, key_evidence=False) == 2
    state = await store.state("global", credential)
    assert (state.canary, state.failed) == (2, ())

    # 401s about the key: rolled back after `rollback_after`, traffic back on v1.
    assert [await answer(401, key_evidence=True) for _ in range(3)] == [2, 2, 2]
    state = await store.state("global", credential)
    assert (state.active, state.canary, state.failed) == (1, None, (2,))
    assert await answer(200, key_evidence=True) == 1
