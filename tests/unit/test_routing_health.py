"""Deployment health (issue 9 item 4): a breaker per deployment opens after the configured
failures, traffic shifts, one half-open probe brings it back, a probe that ends without a
verdict is given back, and opens are shared between replicas through a real Redis.
Request-path tests drive `RequestProcessor` with plain messages and a fake clock."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
from prometheus_client import REGISTRY

from extproc.auth import hash_key
from extproc.budgets.ledger import redis_client
from extproc.config import DeploymentHealthSettings, RedisSettings, parse_config
from extproc.deployment_health import DeploymentHealth
from extproc.messages import Body, Continue, Headers, Phase, Respond
from extproc.phases import RequestProcessor
from extproc.routing import select
from extproc.runtime import Runtime
from extproc.secrets import Secret
from tests.clock import StepClock

PEPPER = "pepper-routing-health"
KEYS = {"plain": "sk-canary-tenant-plain-R1", "debug": "sk-canary-tenant-debug-R2"}
ENVIRON = {"PEPPER": PEPPER, "K1": "sk-canary-provider-R1", "K2": "sk-canary-provider-R2",
           "K3": "sk-canary-provider-R3"}
CONFIG = f"""\
version: 1
auth: {{pepper: {{env: PEPPER}}}}
deployment_health: {{failures: 3, cooldown_s: 10, slow_ms: 2000}}
credentials:
  k1: {{env: K1}}
  k2: {{env: K2}}
  k3: {{env: K3}}
providers:
  eu-1: {{kind: openai, base_url: "http://127.0.0.1:1", region: eu-west-1, zone: eu,
         cluster: eu_1, credentials: [k1]}}
  eu-2: {{kind: openai, base_url: "http://127.0.0.1:2", region: eu-central-1, zone: eu,
         cluster: eu_2, credentials: [k2]}}
  us-1: {{kind: openai, base_url: "http://127.0.0.1:3", region: us-east-1, zone: us,
         cluster: us_1, credentials: [k3]}}
models:
  m:
    price: {{input_per_mtok: 1, output_per_mtok: 1}}
    deployments: [{{provider: us-1}}, {{provider: eu-1}}, {{provider: eu-2}}]
tenants:
  plain:
    zone: eu
    keys: [{{id: plain-1, hash: "{hash_key(Secret(PEPPER), KEYS["plain"])}"}}]
    models: [m]
    routing: {{m: {{pin: eu-1}}}}
  debug:
    zone: eu
    debug: true
    keys: [{{id: debug-1, hash: "{hash_key(Secret(PEPPER), KEYS["debug"])}"}}]
    models: [m]
    routing: {{m: {{pin: eu-1}}}}
"""
PARSED = parse_config(CONFIG)


def runtime_with(clock: StepClock) -> Runtime:
    runtime = Runtime.build(PARSED, environ=ENVIRON)
    return Runtime(config=runtime.config, tenants=runtime.tenants, keys=runtime.keys,
                   health=DeploymentHealth(PARSED.deployment_health, pool=runtime.keys.pool,
                                           clock=clock))


async def routed(runtime: Runtime, tenant: str = "plain",
                 clock: StepClock | None = None) -> RequestProcessor:
    processor = RequestProcessor(runtime, clock=clock or StepClock())
    headers = {":method": "POST", ":path": "/v1/chat/completions",
               "content-type": "application/json", "authorization": f"Bearer {KEYS[tenant]}"}
    assert isinstance(await processor.handle(
        Headers(Phase.REQUEST_HEADERS, headers, False)), Continue)
    reply = await processor.handle(Body(
        Phase.REQUEST_BODY, b'{"model":"m","messages":[{"role":"user","content":"hi"}]}', True))
    assert isinstance(reply, Continue), reply
    return processor


def cluster_of(processor: RequestProcessor) -> str:
    assert processor.route is not None
    return processor.route.provider.name


async def answer(processor: RequestProcessor, status: int) -> None:
    await processor.handle(Headers(Phase.RESPONSE_HEADERS, {
        ":status": str(status), "content-type": "application/json"}, True))
    await processor.finish()


async def test_breaker_opens_after_the_configured_failures_and_traffic_shifts() -> None:
    clock = StepClock()
    runtime = runtime_with(clock)
    for _ in range(2):
        processor = await routed(runtime)
        assert cluster_of(processor) == "eu-1"
        await answer(processor, 503)
    assert runtime.health.state("eu-1/m") == "closed"
    processor = await routed(runtime)
    assert cluster_of(processor) == "eu-1"
    await answer(processor, 503)  # the third failure opens it
    assert runtime.health.state("eu-1/m") == "open"
    assert [REGISTRY.get_sample_value("asc_deployment_state",
                                      {"deployment": "eu-1/m", "state": state})
            for state in ("closed", "open", "half_open")] == [0.0, 1.0, 0.0]
    shifted = await routed(runtime)
    assert cluster_of(shifted) == "eu-2"
    assert shifted.route_decision is not None
    assert shifted.route_decision.reason == (
        "zone eu; skipped eu-1 (breaker open); pin eu-1 unavailable, first in order eu-2")
    await answer(shifted, 200)


async def test_half_open_probe_brings_the_deployment_back() -> None:
    clock = StepClock()
    runtime = runtime_with(clock)
    for _ in range(3):
        await answer(await routed(runtime), 502)
    clock.now += 10  # cool-down over: one probe
    probe = await routed(runtime)
    assert cluster_of(probe) == "eu-1"
    assert runtime.health.state("eu-1/m") == "half_open"
    meanwhile = await routed(runtime)  # the probe is out: others go elsewhere
    assert cluster_of(meanwhile) == "eu-2"
    assert meanwhile.route_decision is not None
    assert "skipped eu-1 (breaker half-open)" in meanwhile.route_decision.reason
    await answer(probe, 200)
    assert runtime.health.state("eu-1/m") == "closed"
    assert cluster_of(await routed(runtime)) == "eu-1"


async def test_a_failed_probe_opens_it_again_for_a_full_cool_down() -> None:
    clock = StepClock()
    runtime = runtime_with(clock)
    for _ in range(3):
        await answer(await routed(runtime), 500)
    clock.now += 10
    await answer(await routed(runtime), 503)
    assert runtime.health.state("eu-1/m") == "open"
    clock.now += 9.9
    assert cluster_of(await routed(runtime)) == "eu-2"


async def test_a_probe_that_ends_without_a_verdict_is_given_back() -> None:
    clock = StepClock()
    runtime = runtime_with(clock)
    for _ in range(3):
        await answer(await routed(runtime), 503)
    clock.now += 10
    probe = await routed(runtime)
    assert cluster_of(probe) == "eu-1"
    await probe.finish()  # client left before the provider answered
    again = await routed(runtime)
    assert cluster_of(again) == "eu-1"  # the next request probes
    await answer(again, 200)
    assert runtime.health.state("eu-1/m") == "closed"


async def test_slow_answers_and_resets_count_429_does_not() -> None:
    clock = StepClock()
    health = DeploymentHealth(DeploymentHealthSettings(failures=2, slow_ms=2000), clock=clock)
    key = "eu-1/m"
    for status, latency in ((429, 0.1), (429, 0.1), (429, 0.1)):
        permit = health.allow(key)
        assert permit is not None
        health.record(key, permit, status=status, latency_s=latency)
    assert health.state(key) == "closed"
    permit = health.allow(key)
    assert permit is not None
    health.record(key, permit, status=200, latency_s=2.5)  # too slow: a failure
    permit = health.allow(key)
    assert permit is not None
    health.record(key, permit, status=None, latency_s=None)  # reset: a failure
    assert health.state(key) == "open"


async def test_every_in_zone_deployment_open_is_503_never_the_us_one() -> None:
    clock = StepClock()
    runtime = runtime_with(clock)
    for key in ("eu-1/m", "eu-2/m"):
        for _ in range(3):
            permit = runtime.health.allow(key)
            assert permit is not None
            runtime.health.record(key, permit, status=503, latency_s=0.01)
    processor = RequestProcessor(runtime, clock=clock)
    headers = {":method": "POST", ":path": "/v1/chat/completions",
               "content-type": "application/json", "authorization": f"Bearer {KEYS['plain']}"}
    await processor.handle(Headers(Phase.REQUEST_HEADERS, headers, False))
    reply = await processor.handle(Body(
        Phase.REQUEST_BODY, b'{"model":"m","messages":[{"role":"user","content":"hi"}]}', True))
    assert isinstance(reply, Respond)
    assert reply.status == 503
    assert b"us-1" not in reply.body
    assert reply.body == (b'{"error":{"message":"Every deployment of model \'m\' in your '
                          b'residency zone is unavailable.","type":"service_unavailable",'
                          b'"param":null,"code":"gateway_unavailable"}}')


async def test_route_reason_header_only_for_debug_tenants() -> None:
    runtime = runtime_with(StepClock())
    for tenant, expected in (("plain", None),
                             ("debug", "zone eu; pinned to eu-1; fallbacks eu-2")):
        processor = await routed(runtime, tenant)
        reply = await processor.handle(Headers(Phase.RESPONSE_HEADERS, {
            ":status": "200", "content-type": "application/json"}, False))
        assert isinstance(reply, Continue)
        assert dict(reply.set_headers).get("x-asc-route-reason") == expected
        await processor.finish()


@pytest.fixture
async def redis(redis_server: int) -> AsyncIterator[Any]:
    client = redis_client(RedisSettings(url=f"redis://127.0.0.1:{redis_server}/0",
                                        timeout_ms=2000))
    await client.delete("asc:deploy:health")
    yield client
    await client.delete("asc:deploy:health")
    await client.aclose()


async def test_opens_are_shared_between_replicas(redis: Any) -> None:
    clock = StepClock(now=2_000_000_000.0)
    one = DeploymentHealth(DeploymentHealthSettings(failures=1, cooldown_s=10), clock=clock)
    two = DeploymentHealth(DeploymentHealthSettings(failures=1, cooldown_s=10), clock=clock)
    key = f"eu-1/{uuid.uuid4().hex[:6]}"
    permit = one.allow(key)
    assert permit is not None
    one.record(key, permit, status=503, latency_s=0.1)
    await one.sync(redis)
    await two.sync(redis)
    assert two.state(key) == "open"
    tenant = PARSED.tenants["plain"]
    decision = select(PARSED, tenant, PARSED.models["m"], health=DeploymentHealth(
        PARSED.deployment_health, clock=clock))
    assert decision.choice.provider.name == "eu-1"  # a replica that did not sync
    synced = DeploymentHealth(PARSED.deployment_health, clock=clock)
    permit = one.allow("eu-1/m")
    assert permit is not None
    one.record("eu-1/m", permit, status=503, latency_s=0.1)
    await one.sync(redis)
    await synced.sync(redis)
    decision = select(PARSED, tenant, PARSED.models["m"], health=synced)
    assert decision.choice.provider.name == "eu-2"
    clock.now += 10  # the shared open ends: half-open on the other replica too
    assert two.state(key) == "half_open"


async def test_two_requests_racing_for_a_half_open_deployment_send_one_probe(
        redis_server: int) -> None:
    """The permit is taken with the decision: a request that selected the half-open
    deployment holds its probe across the awaits that follow (here the budget hold in a
    real Redis), so a request decided meanwhile goes elsewhere instead of sending a
    second probe."""
    config = parse_config(CONFIG.replace(
        "deployment_health:",
        f"redis: {{url: \"redis://127.0.0.1:{redis_server}/0\", timeout_ms: 2000}}\n"
        "deployment_health:").replace(
        "    routing: {m: {pin: eu-1}}\n  debug:",
        "    routing: {m: {pin: eu-1}}\n"
        "    budgets: [{scope: tenant, window: day, limit_usd: 1000}]\n  debug:"))
    assert config.tenants["plain"].budget is not None
    clock = StepClock()
    built = Runtime.build(config, environ=ENVIRON)
    runtime = Runtime(config=config, tenants=built.tenants, keys=built.keys,
                      budgets=built.budgets, redis=built.redis,
                      health=DeploymentHealth(config.deployment_health, clock=clock))
    for _ in range(3):
        permit = runtime.health.allow("eu-1/m")
        assert permit is not None
        runtime.health.record("eu-1/m", permit, status=503, latency_s=0.01)
    clock.now += 10
    first = RequestProcessor(runtime, clock=clock)
    second = RequestProcessor(runtime, clock=clock)
    headers = {":method": "POST", ":path": "/v1/chat/completions",
               "content-type": "application/json", "authorization": f"Bearer {KEYS['plain']}"}
    body = Body(Phase.REQUEST_BODY,
                b'{"model":"m","messages":[{"role":"user","content":"hi"}]}', True)
    for processor in (first, second):
        await processor.handle(Headers(Phase.REQUEST_HEADERS, dict(headers), False))
    replies = await asyncio.gather(first.handle(body), second.handle(body))
    assert all(isinstance(r, Continue) for r in replies), replies
    assert [cluster_of(p) for p in (first, second)] == ["eu-1", "eu-2"]
    for processor in (first, second):
        await answer(processor, 200)
    assert runtime.health.state("eu-1/m") == "closed"
    await runtime.redis.aclose()
