"""Key pools (`CredentialPool`) and key selection (`ProviderKeys`) with an injected clock.

Issue 8 item 2: a half-open probe that ends without a verdict is given back.
Issue 8 item 3: a 429 never opens a credential, it cools it down (honouring retry-after);
only 401/403 that are about the key (`key_evidence`) count against it.
"""

from __future__ import annotations

import random
from email.utils import formatdate
from typing import Any

import pytest

from extproc.config import GatewayConfig, parse_config
from extproc.credentials.pools import (
    Choice,
    CredentialPool,
    NoUsableCredential,
    retry_after_seconds,
)
from extproc.credentials.selection import ProviderKeys, Selected
from extproc.credentials.static import ResolvedCredential, StaticKeyProvider
from extproc.secrets import Secret, SecretUnavailable
from tests.clock import StepClock

A, B = "global/a", "global/b"
EPOCH = 1_800_000_000.0


@pytest.fixture
def clock() -> StepClock:
    return StepClock(EPOCH)


@pytest.fixture
def pool(clock: StepClock) -> CredentialPool:
    return CredentialPool(clock=clock, rng=random.Random(7))


def answer(pool: CredentialPool, credentials: list[str], status: int, *,
           key_evidence: bool = True, retry_after: str | None = None) -> str:
    choice = pool.choose(credentials, [1] * len(credentials))
    pool.record(choice, status, 0.05, key_evidence=key_evidence, retry_after=retry_after)
    return choice.credential


def open_credential(pool: CredentialPool, credential: str) -> None:
    for _ in range(3):
        assert answer(pool, [credential], 401) == credential
    assert pool.state(credential) == "open"


# -- item 2: the breaker's probe -------------------------------------------------------------


def test_open_credential_refuses_until_its_cooldown_then_gives_one_probe(
        pool: CredentialPool, clock: StepClock) -> None:
    open_credential(pool, A)
    with pytest.raises(NoUsableCredential):
        pool.choose([A], [1])
    clock.now += 30.0
    assert pool.state(A) == "half_open"
    probe = pool.choose([A], [1])
    assert probe == Choice(A, probe.permit)
    assert probe.permit.probe is True
    with pytest.raises(NoUsableCredential):  # one probe at a time
        pool.choose([A], [1])
    pool.record(probe, 200, 0.1)
    assert pool.state(A) == "closed"
    assert pool.choose([A], [1]).permit.probe is False


def test_a_probe_released_without_verdict_goes_to_the_next_request(
        pool: CredentialPool, clock: StepClock) -> None:
    open_credential(pool, A)
    clock.now += 30.0
    probe = pool.choose([A], [1])
    pool.release(probe)
    assert pool.state(A) == "half_open"
    again = pool.choose([A], [1])
    assert again.permit.probe is True


def test_a_probe_that_gets_a_5xx_is_released_not_decided(
        pool: CredentialPool, clock: StepClock) -> None:
    open_credential(pool, A)
    clock.now += 30.0
    pool.record(pool.choose([A], [1]), 503, 0.1)
    assert pool.state(A) == "half_open"
    assert pool.choose([A], [1]).permit.probe is True


def test_a_failed_probe_opens_again_for_a_full_cooldown(
        pool: CredentialPool, clock: StepClock) -> None:
    open_credential(pool, A)
    clock.now += 30.0
    pool.record(pool.choose([A], [1]), 403, 0.1)
    assert pool.state(A) == "open"
    clock.now += 29.9
    assert pool.state(A) == "open"
    clock.now += 0.1
    assert pool.state(A) == "half_open"


# -- item 3: 429 cools down, never opens ------------------------------------------------------


def test_429s_never_open_a_credential(pool: CredentialPool, clock: StepClock) -> None:
    for _ in range(10):
        assert answer(pool, [A], 429, retry_after="1") == A
        clock.now += 1.0
    assert pool.state(A) == "closed"
    assert pool.cooling_until(A) is None


def test_429_prefers_other_credentials_until_retry_after(
        pool: CredentialPool, clock: StepClock) -> None:
    both = [A, B]
    choice = pool.choose([A], [1])
    pool.record(choice, 429, 0.05, retry_after="5")
    assert pool.cooling_until(A) == EPOCH + 5
    assert {pool.choose(both, [1, 1]).credential for _ in range(50)} == {B}
    clock.now += 4.999
    assert {pool.choose(both, [1, 1]).credential for _ in range(50)} == {B}
    clock.now += 0.001
    assert pool.cooling_until(A) is None
    assert {pool.choose(both, [1, 1]).credential for _ in range(50)} == {A, B}


def test_when_every_credential_cools_down_the_one_ending_first_serves(
        pool: CredentialPool, clock: StepClock) -> None:
    pool.record(pool.choose([A], [1]), 429, 0.05, retry_after="20")
    pool.record(pool.choose([B], [1]), 429, 0.05, retry_after="3")
    assert {pool.choose([A, B], [1, 1]).credential for _ in range(20)} == {B}
    assert pool.state(A) == pool.state(B) == "closed"


def test_a_half_open_probe_goes_before_a_cooling_credential(
        pool: CredentialPool, clock: StepClock) -> None:
    open_credential(pool, A)
    pool.record(pool.choose([B], [1]), 429, 0.05, retry_after="60")
    clock.now += 30.0
    probe = pool.choose([A, B], [1, 1])
    assert (probe.credential, probe.permit.probe) == (A, True)
    # The probe is out: the cooling credential serves meanwhile.
    assert pool.choose([A, B], [1, 1]).credential == B


@pytest.mark.parametrize(("header", "seconds"), [
    (None, 1.0), ("", 1.0), ("soon", 1.0), ("7", 7.0), ("2.5", 2.5), ("-3", 0.0),
    ("86400", 60.0), ("nan", 1.0), ("inf", 1.0),
    (formatdate(EPOCH + 12, usegmt=True), 12.0),
    (formatdate(EPOCH - 100, usegmt=True), 0.0),
    (formatdate(EPOCH + 3600, usegmt=True), 60.0),
])
def test_retry_after_seconds_or_http_date_bounded(header: str | None, seconds: float) -> None:
    assert retry_after_seconds(header, now=EPOCH, default=1.0, limit=60.0) == seconds


def test_429_cooldown_honours_an_http_date_and_the_bound(
        pool: CredentialPool, clock: StepClock) -> None:
    pool.record(pool.choose([A], [1]), 429, 0.05,
                retry_after=formatdate(EPOCH + 9, usegmt=True))
    assert pool.cooling_until(A) == EPOCH + 9
    pool.record(pool.choose([B], [1]), 429, 0.05, retry_after="100000")
    assert pool.cooling_until(B) == EPOCH + 60
    pool.record(pool.choose([B], [1]), 429, 0.05, retry_after=None)
    assert pool.cooling_until(B) == EPOCH + 60  # a shorter cool-down never cuts one short


def test_429_proves_the_key_works_and_closes_a_probe(
        pool: CredentialPool, clock: StepClock) -> None:
    open_credential(pool, A)
    clock.now += 30.0
    pool.record(pool.choose([A], [1]), 429, 0.05, retry_after="2")
    assert pool.state(A) == "closed"


def test_client_caused_401_403_never_open_and_are_not_errors(
        pool: CredentialPool) -> None:
    for status in (401, 403) * 20:
        answer(pool, [A], status, key_evidence=False)
    assert pool.state(A) == "closed"
    for _ in range(2):
        answer(pool, [A], 401)
    assert pool.state(A) == "closed"
    answer(pool, [A], 401)
    assert pool.state(A) == "open"


def test_degraded_by_error_rate_then_used_only_without_a_closed_one(
        pool: CredentialPool) -> None:
    for i in range(100):
        answer(pool, [A], 500 if i % 10 == 0 else 200)
    assert pool.state(A) == "degraded"
    assert {pool.choose([A, B], [1, 1]).credential for _ in range(20)} == {B}
    assert pool.choose([A], [1]).credential == A


# -- replicas share opens, not cool-downs -----------------------------------------------------


class FakeRedis:
    """`hset`/`hgetall` of one hash, as the pool's `sync` uses them."""

    def __init__(self) -> None:
        self.hashes: dict[str, dict[str, str]] = {}

    async def hset(self, key: str, mapping: dict[str, str]) -> None:
        self.hashes.setdefault(key, {}).update(mapping)

    async def hgetall(self, key: str) -> dict[bytes, bytes]:
        return {k.encode(): v.encode() for k, v in self.hashes.get(key, {}).items()}


async def test_opens_are_shared_between_replicas_429s_are_not(clock: StepClock) -> None:
    redis = FakeRedis()
    one, two = CredentialPool(clock=clock), CredentialPool(clock=clock)
    for _ in range(3):
        one.record(one.choose([A], [1]), 429, 0.05, retry_after="5")
    await one.sync(redis)
    await two.sync(redis)
    assert redis.hashes == {}
    assert (one.state(A), two.state(A)) == ("closed", "closed")

    open_credential(one, A)
    await one.sync(redis)
    await two.sync(redis)
    assert redis.hashes == {"asc:cred:health": {A: str(EPOCH + 30)}}
    assert two.state(A) == "open"
    clock.now += 30.0
    assert two.choose([A], [1]).permit.probe is True


# -- ProviderKeys: the permit travels with Selected -------------------------------------------

CONFIG = """\
version: 1
auth: {pepper: {env: PEPPER}}
redis: {url: "redis://127.0.0.1:1/0"}
secrets: {kek: {backend: file, path: kek.key}}
credentials:
  a: {env: KEY_A}
  ring: {keyring: true}
providers:
  static-p: {kind: openai, base_url: "http://127.0.0.1:1", region: r, zone: eu,
             cluster: c1, credentials: [a]}
  ring-p: {kind: openai, base_url: "http://127.0.0.1:1", region: r, zone: eu,
           cluster: c2, credentials: [ring]}
models:
  m:
    price: {input_per_mtok: 1, output_per_mtok: 1}
    deployments: [{provider: static-p}]
tenants:
  t:
    zone: eu
    keys:
      - id: t-1
        hash: "hmac-sha256:v1:0000000000000000000000000000000000000000000000000000000000000000"
    models: [m]
"""


@pytest.fixture
def config() -> GatewayConfig:
    return parse_config(CONFIG)


def static_keys(config: GatewayConfig, pool: CredentialPool,
                keyring: Any = None) -> ProviderKeys:
    credential = ResolvedCredential("a", 1, Secret("sk-canary-pool-a"))
    return ProviderKeys(config.credentials, StaticKeyProvider({"a": credential}), keyring,
                        pool)


async def select(keys: ProviderKeys, config: GatewayConfig, provider: str) -> Selected:
    selected = await keys.for_request(config.providers[provider], config.tenants["t"],
                                      bucket=0)
    assert selected is not None
    return selected


async def test_released_selection_gives_the_probe_back(
        config: GatewayConfig, pool: CredentialPool, clock: StepClock) -> None:
    keys = static_keys(config, pool)
    open_credential(pool, "global/a")
    clock.now += 30.0
    probe = await select(keys, config, "static-p")
    assert probe.choice.permit.probe is True
    with pytest.raises(SecretUnavailable):  # the probe is out
        await select(keys, config, "static-p")
    keys.release(probe)  # e.g. the budget refused the request after the key was chosen
    again = await select(keys, config, "static-p")
    assert again.choice.permit.probe is True
    await keys.report(again, 200, key_evidence=True)
    assert pool.state("global/a") == "closed"


async def test_release_after_report_does_not_free_another_request_probe(
        config: GatewayConfig, pool: CredentialPool, clock: StepClock) -> None:
    keys = static_keys(config, pool)
    open_credential(pool, "global/a")
    clock.now += 30.0
    first = await select(keys, config, "static-p")
    await keys.report(first, 503, key_evidence=True)  # no verdict: probe given back
    second = await select(keys, config, "static-p")  # takes the probe
    keys.release(first)  # finish() of the first request: must be a no-op now
    with pytest.raises(SecretUnavailable):
        await select(keys, config, "static-p")
    await keys.report(second, 200, key_evidence=True)
    keys.release(second)
    assert pool.state("global/a") == "closed"


async def test_a_key_that_cannot_be_resolved_gives_the_probe_back(
        config: GatewayConfig, pool: CredentialPool, clock: StepClock) -> None:
    keys = static_keys(config, pool)  # `ring` needs a keyring; there is none
    open_credential(pool, "global/ring")
    clock.now += 30.0
    for _ in range(3):
        with pytest.raises(SecretUnavailable, match="no keyring configured"):
            await select(keys, config, "ring-p")
        assert pool.state("global/ring") == "half_open"


class CanaryKeyring:
    """Says every version is a canary; records what the pool reports to it."""

    def __init__(self) -> None:
        self.reports: list[int] = []

    async def credential(self, credential_id: str, *, scope: str = "global",
                         bucket: int = 0) -> ResolvedCredential:
        return ResolvedCredential(credential_id, 2, Secret("sk-canary-pool-ring"))

    def is_canary(self, credential: ResolvedCredential, scope: str) -> bool:
        return True

    async def report(self, credential: ResolvedCredential, scope: str, status: int) -> None:
        self.reports.append(status)


async def test_a_canary_answer_gives_the_probe_back(
        config: GatewayConfig, pool: CredentialPool, clock: StepClock) -> None:
    keyring = CanaryKeyring()
    keys = static_keys(config, pool, keyring)
    open_credential(pool, "global/ring")
    clock.now += 30.0
    canary = await select(keys, config, "ring-p")
    assert canary.choice.permit.probe is True
    await keys.report(canary, 200, key_evidence=True)
    assert keyring.reports == [200]
    assert pool.state("global/ring") == "half_open"
    assert (await select(keys, config, "ring-p")).choice.permit.probe is True


async def test_client_caused_canary_401_does_not_count_toward_rollback(
        config: GatewayConfig, pool: CredentialPool) -> None:
    keyring = CanaryKeyring()
    keys = static_keys(config, pool, keyring)
    for _ in range(5):
        await keys.report(await select(keys, config, "ring-p"), 401, key_evidence=False)
    assert keyring.reports == []
    await keys.report(await select(keys, config, "ring-p"), 401, key_evidence=True)
    assert keyring.reports == [401]
    assert pool.state("global/ring") == "closed"
