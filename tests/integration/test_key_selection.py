"""`ProviderKeys` with the real keyring (redis-server, file KEK): which provider answers
count toward a canary's automatic rollback (issue 8 item 3)."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path
from typing import Any

from extproc.config import GatewayConfig, parse_config
from extproc.credentials.kek import FileKek, init_kek_file
from extproc.credentials.keyring import Keyring, KeyStore
from extproc.credentials.pools import CredentialPool
from extproc.credentials.rotation import KeyState, canary
from extproc.credentials.selection import ProviderKeys
from extproc.credentials.static import StaticKeyProvider
from extproc.secrets import Secret
from tests.clock import StepClock


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


async def canary_ring(redis: Any, tmp_path: Path, *, rollback_after: int
                      ) -> tuple[str, GatewayConfig, KeyStore, Keyring]:
    """A keyring credential with v1 active and v2 its canary for every request."""
    credential = f"ring-{uuid.uuid4().hex[:8]}"
    store = KeyStore(redis)
    keyring = Keyring(store, FileKek.load(init_kek_file(tmp_path / "kek.key")),
                      rollback_after=rollback_after)
    await keyring.add("global", credential, "openai", Secret("sk-canary-selection-v1"))
    await keyring.add("global", credential, "openai", Secret("sk-canary-selection-v2"))
    await store.transition("global", credential, lambda s: canary(s, 2, 100))
    return credential, config_for(credential), store, keyring


async def test_only_key_evidence_401s_roll_a_canary_back(redis: Any, tmp_path: Path) -> None:
    credential, config, store, keyring = await canary_ring(redis, tmp_path, rollback_after=3)
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


def hget_calls(info: dict[str, Any]) -> int:
    return int(info.get("cmdstat_hget", {}).get("calls", 0))


async def test_an_expired_state_is_read_once_for_a_hundred_requests(
        redis: Any, tmp_path: Path) -> None:
    """The state TTL (1 s) ends under load: one Redis read serves every waiting request
    (100 reads at once exhausted the replica's Redis connections and turned the key
    unwrap behind them into a stale serve)."""
    credential = f"ring-{uuid.uuid4().hex[:8]}"
    clock = StepClock()
    keyring = Keyring(KeyStore(redis), FileKek.load(init_kek_file(tmp_path / "kek.key")),
                      clock=clock)
    await keyring.add("global", credential, "openai", Secret("sk-canary-state-v1"))
    assert (await keyring.credential(credential)).label == f"{credential}@1"
    clock.now += 2  # past state_ttl_s, well inside the key cache TTL

    await redis.config_resetstat()
    answers = await asyncio.gather(*(keyring.credential(credential) for _ in range(100)))

    assert {answer.label for answer in answers} == {f"{credential}@1"}
    assert hget_calls(await redis.info("commandstats")) == 1


class HeldStateReads(KeyStore):
    """The real store, but a state read's answer is held until the test lets it go."""

    def __init__(self, client: Any) -> None:
        super().__init__(client)
        self.hold = asyncio.Event()
        self.hold.set()
        self.read_done = asyncio.Event()

    async def state(self, scope: str, credential: str) -> KeyState:
        state = await super().state(scope, credential)
        self.read_done.set()
        await self.hold.wait()
        return state


async def test_a_change_published_during_a_state_read_is_not_cached(
        redis: Any, tmp_path: Path) -> None:
    credential = f"ring-{uuid.uuid4().hex[:8]}"
    store = HeldStateReads(redis)
    keyring = Keyring(store, FileKek.load(init_kek_file(tmp_path / "kek.key")))
    await keyring.add("global", credential, "openai", Secret("sk-canary-state-v1"))
    await keyring.add("global", credential, "openai", Secret("sk-canary-state-v2"))

    store.hold.clear()
    store.read_done.clear()
    read = asyncio.ensure_future(keyring.credential(credential))
    await store.read_done.wait()  # the read has its answer: v1 active, no canary
    await store.transition("global", credential, lambda s: canary(s, 2, 100))
    keyring.invalidate("global", credential)  # what the pub/sub listener does
    store.hold.set()
    assert (await read).version == 1  # the read that started before the change
    assert (await keyring.credential(credential)).version == 2  # not the stale state


async def test_a_canary_answer_after_the_rollback_is_still_the_canarys(
        redis: Any, tmp_path: Path) -> None:
    """Requests on the canary still in flight when another one rolls it back: their 401s
    stay the canary's (seen under load: such a 401 closed no breaker but went to the
    client, because the request no longer read as a canary and got no retry on v1)."""
    credential, config, store, keyring = await canary_ring(redis, tmp_path, rollback_after=1)
    pool = CredentialPool()
    keys = ProviderKeys(config.credentials, StaticKeyProvider({}), keyring, pool)
    in_flight = [await keys.for_request(config.providers["p"], config.tenants["t"], bucket=0)
                 for _ in range(4)]
    assert [(s.credential.version, s.credential.canary) for s in in_flight if s] == [
        (2, True)] * 4

    first, *late = in_flight
    assert first is not None
    await keys.report(first, 401, key_evidence=True)  # the rollback
    state = await store.state("global", credential)
    assert (state.active, state.canary, state.failed) == (1, None, (2,))
    for selected in late:
        assert selected is not None
        assert keyring.is_canary(selected.credential, "global")  # retried on v1
        await keys.report(selected, 401, key_evidence=True)
    assert pool.state(f"global/{credential}") == "closed"  # v1 still serves
    after = await keys.for_request(config.providers["p"], config.tenants["t"], bucket=0)
    assert after is not None
    assert (after.credential.version, after.credential.canary) == (1, False)
    assert not keyring.is_canary(after.credential, "global")
