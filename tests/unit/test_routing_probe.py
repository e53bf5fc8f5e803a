"""Active deployment probes (issue 9 item 4, optional part): a GET without credentials to
the provider's base URL + path, reported to the deployment's breaker with a permit of its
own. Real sockets: the emulator answers, a closed port refuses."""

from __future__ import annotations

from collections.abc import AsyncIterator

import aiohttp
import pytest

from extproc.config import DeploymentHealthSettings, Probe, parse_config
from extproc.deployment_health import ActiveProber, DeploymentHealth, probe_once
from extproc.devstack import Stack, free_port


class Clock:
    def __init__(self, now: float = 1_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


PROBE = Probe(path="/_emulator/health", interval_s=10, timeout_ms=2000)


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as client:
        yield client


def open_health(clock: Clock, key: str) -> DeploymentHealth:
    health = DeploymentHealth(DeploymentHealthSettings(failures=2, cooldown_s=5), clock=clock)
    for _ in range(2):
        permit = health.allow(key)
        assert permit is not None
        health.record(key, permit, status=503, latency_s=0.1)
    assert health.state(key) == "open"
    return health


async def test_a_probe_that_answers_closes_a_half_open_deployment(
        stack: Stack, session: aiohttp.ClientSession) -> None:
    _, port = stack.start_emulator(["unused-key"])
    clock = Clock()
    health = open_health(clock, "p/m")
    url = f"http://127.0.0.1:{port}/_emulator/health"
    assert await probe_once(health, "p/m", url, PROBE, session) is None  # open: skipped
    assert health.state("p/m") == "open"
    clock.now += 5
    assert await probe_once(health, "p/m", url, PROBE, session) == 200
    assert health.state("p/m") == "closed"


async def test_a_refused_probe_is_a_failure_and_opens_it(
        session: aiohttp.ClientSession) -> None:
    clock = Clock()
    health = DeploymentHealth(DeploymentHealthSettings(failures=2, cooldown_s=5), clock=clock)
    url = f"http://127.0.0.1:{free_port()}/health"  # nothing listens there
    assert await probe_once(health, "p/m", url, PROBE, session) is None
    assert health.state("p/m") == "closed"
    assert await probe_once(health, "p/m", url, PROBE, session) is None
    assert health.state("p/m") == "open"
    clock.now += 5  # half-open: the probe takes the permit, fails, opens it again
    assert await probe_once(health, "p/m", url, PROBE, session) is None
    assert health.state("p/m") == "open"


async def test_the_prober_probes_each_configured_deployment_at_its_interval(
        session: aiohttp.ClientSession) -> None:
    dead = free_port()
    config = parse_config(f"""\
version: 1
auth: {{pepper: {{env: PEPPER}}}}
providers:
  local: {{kind: openai_compatible, base_url: "http://127.0.0.1:{dead}/base", region: r,
          zone: z, cluster: local}}
models:
  m:
    price: {{input_per_mtok: 1, output_per_mtok: 1}}
    deployments:
      - {{provider: local, probe: {{path: /health, interval_s: 10, timeout_ms: 500}}}}
      - {{provider: local, model: unprobed}}
tenants:
  t:
    keys: [{{id: t-1, hash: "hmac-sha256:v1:{'0' * 64}"}}]
    models: [m]
""")
    clock = Clock()
    health = DeploymentHealth(DeploymentHealthSettings(failures=3, cooldown_s=60), clock=clock)
    prober = ActiveProber(clock=clock)
    states = []
    for advance in (0, 5, 5, 10):  # due at 0, 10, 20
        clock.now += advance
        await prober.tick(config, health, session)
        await prober.settle()
        states.append(health.state("local/m"))
    assert states == ["closed", "closed", "closed", "open"]
    assert health.state("local/unprobed") == "closed"
    await prober.close()


@pytest.mark.parametrize(("path", "message"), [
    ("health", "must be an absolute path without query or fragment"),
    ("/health?x=1", "must be an absolute path without query or fragment"),
    ("//evil.example/x", "must be an absolute path without query or fragment"),
])
def test_probe_path_rules(path: str, message: str) -> None:
    from extproc.config import ConfigError
    with pytest.raises(ConfigError) as caught:
        parse_config(f"""\
version: 1
auth: {{pepper: {{env: PEPPER}}}}
providers:
  local: {{kind: openai_compatible, base_url: "http://127.0.0.1:1", region: r, zone: z,
          cluster: local}}
models:
  m:
    price: {{input_per_mtok: 1, output_per_mtok: 1}}
    deployments: [{{provider: local, probe: {{path: "{path}"}}}}]
tenants:
  t:
    keys: [{{id: t-1, hash: "hmac-sha256:v1:{'0' * 64}"}}]
    models: [m]
""")
    [issue] = caught.value.issues
    assert (issue.path, issue.message) == ("models.m.deployments[0].probe.path", message)
