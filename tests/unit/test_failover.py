"""Failover's pure parts: which clusters are rendered and what they hold, and the attempt
record. The Envoy behaviour itself is proven in tests/e2e/test_failover.py."""

from __future__ import annotations

from typing import Any

import pytest

from extproc.config import DeploymentHealthSettings, GatewayConfig, parse_config
from extproc.deployment_health import DeploymentHealth, deployment_key
from extproc.envoy_bootstrap import EnvoyPorts, render_bootstrap
from extproc.failover import (
    MAX_ORDERS,
    Flight,
    PreparedAttempt,
    failover_chains,
    failover_cluster,
    has_failover_cluster,
    ordered_chain,
    zone_deployments,
)

HASH = "hmac-sha256:v1:" + "c" * 64


def _config(*, failover: str = "", keyring: bool = False) -> GatewayConfig:
    ring = "{keyring: true}" if keyring else "{env: K}"
    return parse_config(f"""\
version: 1
auth: {{pepper: {{env: ASC_PEPPER}}}}
{failover}
redis: {{url: "redis://127.0.0.1:1/0"}}
secrets: {{kek: {{backend: file, path: kek.key}}}}
credentials:
  c-us: {{env: K}}
  c-eu: {{env: K}}
  c-eu2: {{env: K}}
  c-solo: {ring}
providers:
  us:
    {{kind: openai, base_url: "http://10.0.0.1:8000", region: us-1, zone: us, cluster: us,
     credentials: [c-us]}}
  eu:
    {{kind: openai, base_url: "http://10.0.0.2:8000", region: eu-1, zone: eu, cluster: eu,
     credentials: [c-eu]}}
  eu2:
    {{kind: anthropic, base_url: "https://api.example.eu", region: eu-2, zone: eu,
     cluster: eu2, credentials: [c-eu2]}}
  solo:
    {{kind: openai, base_url: "http://10.0.0.4:8000", region: x-1, zone: x, cluster: solo,
     credentials: [c-solo]}}
models:
  m:
    price: {{input_per_mtok: 1, output_per_mtok: 1}}
    deployments: [{{provider: us}}, {{provider: eu}}, {{provider: eu2, model: claude}}]
  s:
    price: {{input_per_mtok: 1, output_per_mtok: 1}}
    deployments: [{{provider: solo}}]
tenants:
  t:
    zone: eu
    keys: [{{id: k, hash: "{HASH}"}}]
    models: [m]
""")


def _clusters(config: GatewayConfig) -> dict[str, dict[str, Any]]:
    bootstrap = render_bootstrap(config, EnvoyPorts())
    return {c["name"]: c for c in bootstrap["static_resources"]["clusters"]}


def _route(config: GatewayConfig) -> dict[str, Any]:
    bootstrap = render_bootstrap(config, EnvoyPorts())
    [listener] = bootstrap["static_resources"]["listeners"]
    hcm = listener["filter_chains"][0]["filters"][0]["typed_config"]
    route: dict[str, Any] = hcm["route_config"]["virtual_hosts"][0]["routes"][0]["route"]
    return route


def test_failover_cluster_holds_only_the_zone_in_priority_order() -> None:
    clusters = _clusters(_config())
    eu = clusters[failover_cluster("m", "eu")]
    levels = [(e["priority"], e["lb_endpoints"][0]["endpoint"]["hostname"])
              for e in eu["load_assignment"]["endpoints"]]
    assert levels == [(0, "10.0.0.2:8000"), (1, "api.example.eu")]
    assert eu["type"] == "STRICT_DNS"
    # Each https endpoint gets its own TLS (SNI, SAN) through a socket match.
    [match] = eu["transport_socket_matches"]
    assert match["match"] == {"asc_provider": "eu2"}
    assert match["transport_socket"]["typed_config"]["sni"] == "api.example.eu"
    http_filters = eu["typed_extension_protocol_options"][
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"]["http_filters"]
    assert [f["name"] for f in http_filters] == [
        "asc.ext_proc.upstream", "envoy.filters.http.upstream_codec"]
    upstream = http_filters[0]["typed_config"]
    assert upstream["failure_mode_allow"] is False
    assert upstream["grpc_service"]["initial_metadata"] == [
        {"key": "x-asc-stage", "value": "upstream"}]
    assert upstream["metadata_options"] == {"forwarding_namespaces": {"untyped": ["asc"]}}
    eu2 = clusters[failover_cluster("m", "eu2")]
    assert [e["lb_endpoints"][0]["endpoint"]["hostname"]
            for e in eu2["load_assignment"]["endpoints"]] == ["api.example.eu", "10.0.0.2:8000"]
    # Alone in its zone with a static key: nothing to retry, no failover cluster.
    assert failover_cluster("m", "us") not in clusters
    assert failover_cluster("s", "solo") not in clusters


def test_retry_policy_and_outlier_detection_follow_the_config() -> None:
    config = _config(failover="failover: {max_attempts: 4, first_byte_timeout_ms: 2500, "
                              "retry_budget_percent: 10, outlier_consecutive_errors: 7}")
    policy = _route(config)["retry_policy"]
    assert policy["retry_on"] == "5xx,reset,connect-failure,retriable-status-codes"
    assert policy["retriable_status_codes"] == [429, 529, 401, 403]
    assert policy["num_retries"] == 0  # the service's x-envoy-max-retries decides
    assert policy["per_try_idle_timeout"] == "2.5s"
    assert policy["retry_priority"]["name"] == "envoy.retry_priorities.previous_priorities"
    eu = _clusters(config)[failover_cluster("m", "eu")]
    assert eu["outlier_detection"]["consecutive_5xx"] == 7
    assert eu["circuit_breakers"]["thresholds"][0]["retry_budget"]["budget_percent"] == {
        "value": 10.0}


def test_failover_off_renders_no_retry_and_no_failover_cluster() -> None:
    config = _config(failover="failover: {max_attempts: 1}")
    assert "retry_policy" not in _route(config)
    assert not any(name.startswith("asc_failover.") for name in _clusters(config))


def test_keyring_key_alone_in_its_zone_gets_a_cluster_for_the_canary_retry() -> None:
    config = _config(keyring=True)
    solo = config.models["s"].deployments[0]
    assert has_failover_cluster(config, config.models["s"], solo)
    endpoints = _clusters(config)[failover_cluster("s", "solo")]["load_assignment"]["endpoints"]
    assert len(endpoints) == 1


def _flight(config: GatewayConfig, now: list[float]) -> Flight:
    async def prepare(*_: Any) -> PreparedAttempt:
        raise AssertionError("not called")

    model = config.models["m"]
    return Flight(request_id="r", deployments=zone_deployments(config, model,
                                                                model.deployments[1]),
                  prepare=prepare, first_byte_timeout_s=1.0, clock=lambda: now[0])


def test_attempts_record_why_each_was_left() -> None:
    config = _config()
    now = [10.0]
    flight = _flight(config, now)
    assert [p.name for _, p in flight.deployments] == ["eu", "eu2"]
    eu, eu2 = (p for _, p in flight.deployments)
    first = flight.start(eu, 1)
    now[0] = 10.002
    flight.end(first, 503)
    second = flight.start(eu2, 2)
    now[0] = 11.5
    flight.end(second, None)
    third = flight.start(eu, 3)
    now[0] = 11.6
    flight.end(third, None)
    assert [(a["provider"], a["status"], a["left"], a["latency_ms"])
            for a in flight.records()] == [
        ("eu", 503, "status 503", 2.0), ("eu2", None, "timeout", 1498.0),
        ("eu", None, "reset", 100.0)]
    assert flight.answered is None


def test_the_answering_attempt_has_no_reason_to_leave() -> None:
    now = [0.0]
    flight = _flight(_config(), now)
    eu, eu2 = (p for _, p in flight.deployments)
    flight.end(flight.start(eu, 1), 429)
    flight.end(flight.start(eu2, 2), 200)
    assert [a["left"] for a in flight.records()] == ["status 429", None]
    answered = flight.answered
    assert answered is not None
    assert answered.provider == "eu2"


def test_deployment_is_found_by_address_or_by_attempt_order() -> None:
    flight = _flight(_config(), [0.0])
    found = flight.deployment_at("10.0.0.2:8000", 2)
    assert found is not None
    assert found[1].name == "eu"
    # A DNS name Envoy resolved (not in the config): Envoy's retries go one level down.
    by_order = flight.deployment_at("192.0.2.9:443", 2)
    assert by_order is not None
    assert by_order[1].name == "eu2"


def _health() -> DeploymentHealth:
    return DeploymentHealth(DeploymentHealthSettings(failures=1, cooldown_s=60),
                            clock=lambda: 100.0)


def test_each_attempt_is_the_verdict_of_the_deployment_it_hit() -> None:
    """Decision 0066: a fallback's failure opens the fallback's breaker, its success
    closes nothing else; a reset waits for `settle` (it may be the client leaving)."""
    flight = _flight(_config(), [0.0])
    (eu_deployment, eu), (eu2_deployment, eu2) = flight.deployments
    eu_key, eu2_key = deployment_key(eu_deployment), deployment_key(eu2_deployment)
    health = _health()
    reset = flight.start(eu2, 2)
    reset.deployment, reset.permit = eu2_key, health.allow(eu2_key)
    flight.end(reset, None)
    assert health.state(eu2_key) == "closed"  # no verdict before Envoy stops retrying
    answered = flight.start(eu, 3)
    answered.deployment, answered.permit = eu_key, health.allow(eu_key)
    flight.end(answered, 200)
    flight.verdict(health, answered)
    flight.settle(health)
    assert health.state(eu2_key) == "open"
    assert health.state(eu_key) == "closed"
    assert answered.permit is None
    assert reset.permit is None


def test_a_refused_fallback_connection_is_a_failure_of_that_fallback() -> None:
    """Attempt 2 never reached the per-attempt ext_proc (a gap): its deployment, by
    Envoy's priority order, fails; attempt 1 (the choice) is the router's verdict."""
    flight = _flight(_config(), [0.0])
    (eu_deployment, eu), (eu2_deployment, _) = flight.deployments
    health = _health()
    flight.end(flight.start(eu, 1), 503)
    flight.end(flight.start(eu, 3), 200)
    flight.settle(health)
    assert health.state(deployment_key(eu2_deployment)) == "open"
    assert health.state(deployment_key(eu_deployment)) == "closed"


def test_a_request_that_ends_before_the_verdict_gives_the_permit_back() -> None:
    """The client left during an attempt: no verdict, and a half-open probe permit is
    not lost (the deployment stays available for the next probe)."""
    now = [100.0]
    health = DeploymentHealth(DeploymentHealthSettings(failures=1, cooldown_s=1),
                              clock=lambda: now[0])
    flight = _flight(_config(), [0.0])
    _, (eu2_deployment, eu2) = flight.deployments
    key = deployment_key(eu2_deployment)
    opened = health.allow(key)
    assert opened is not None
    health.record(key, opened, status=503, latency_s=None)
    now[0] = 102.0
    attempt = flight.start(eu2, 2)
    attempt.deployment, attempt.permit = key, health.allow(key)
    assert attempt.permit is not None
    assert attempt.permit.probe
    assert not health.available(key)
    flight.end(attempt, None)
    flight.release(health)
    assert health.available(key)
    assert health.state(key) == "half_open"


def test_the_choice_gets_attempt_1s_latency_not_the_whole_request() -> None:
    now = [0.0]
    flight = _flight(_config(), now)
    (_, eu), (_, eu2) = flight.deployments
    first = flight.start(eu, 1)
    now[0] = 0.25
    flight.end(first, 503)
    second = flight.start(eu2, 2)
    now[0] = 2.0
    flight.end(second, 200)
    assert flight.choice_status(200) == 503
    assert flight.choice_latency_s() == 0.25
    assert not flight.choice_skipped()


def test_attempt_1_at_a_fallback_skips_the_choice() -> None:
    """Envoy's outlier detection ejected the choice: it was not tried, no verdict."""
    flight = _flight(_config(), [0.0])
    _, (_, eu2) = flight.deployments
    flight.end(flight.start(eu2, 1), 200)
    assert flight.choice_skipped()
    assert flight.choice_latency_s() is None


def _three_in_eu(max_attempts: int = 3) -> GatewayConfig:
    """Zone eu with three deployments (eu, eu2, eu3), us elsewhere."""
    return parse_config(_THREE.format(max_attempts=max_attempts, hash=HASH))


_THREE = """\
version: 1
auth: {{pepper: {{env: ASC_PEPPER}}}}
failover: {{max_attempts: {max_attempts}}}
credentials: {{c: {{env: K}}}}
providers:
  us: {{kind: openai, base_url: "http://10.0.0.1:8000", region: us-1, zone: us, cluster: us,
       credentials: [c]}}
  eu: {{kind: openai, base_url: "http://10.0.0.2:8000", region: eu-1, zone: eu, cluster: eu,
       credentials: [c]}}
  eu2: {{kind: openai, base_url: "http://10.0.0.3:8000", region: eu-2, zone: eu,
        cluster: eu2, credentials: [c]}}
  eu3: {{kind: anthropic, base_url: "http://10.0.0.5:8000", region: eu-3, zone: eu,
        cluster: eu3, credentials: [c]}}
models:
  m:
    price: {{input_per_mtok: 1, output_per_mtok: 1}}
    deployments: [{{provider: us}}, {{provider: eu}}, {{provider: eu2}},
                  {{provider: eu3, model: claude}}]
tenants:
  t:
    zone: eu
    keys: [{{id: k, hash: "{hash}"}}]
    models: [m]
"""


def _priorities(cluster: dict[str, Any]) -> list[str]:
    return [level["lb_endpoints"][0]["endpoint"]["address"]["socket_address"]["address"]
            for level in cluster["load_assignment"]["endpoints"]]


def test_every_fallback_order_of_the_zone_has_a_cluster() -> None:
    """Decision 0067: besides config order, one cluster per other order of the fallbacks
    that can be tried; none holds another zone's endpoint."""
    config = _three_in_eu()
    model = config.models["m"]
    _, eu, _, _ = model.deployments
    names = [name for name, _ in failover_chains(config, model, eu)]
    assert names == [failover_cluster("m", "eu"), "asc_failover.m.eu>eu3>eu2"]
    clusters = _clusters(config)
    assert _priorities(clusters["asc_failover.m.eu>eu3>eu2"]) == [
        "10.0.0.2", "10.0.0.5", "10.0.0.3"]
    assert _priorities(clusters[failover_cluster("m", "eu")]) == [
        "10.0.0.2", "10.0.0.3", "10.0.0.5"]
    for name, cluster in clusters.items():
        if name.startswith("asc_failover."):
            assert "10.0.0.1" not in _priorities(cluster)


def test_attempts_follow_the_routing_decisions_fallback_order() -> None:
    config = _three_in_eu()
    model = config.models["m"]
    us, eu, eu2, eu3 = model.deployments
    name, chain, retries = ordered_chain(config, model, eu, [eu3, eu2])
    assert (name, [p.name for _, p in chain], retries) == (
        "asc_failover.m.eu>eu3>eu2", ["eu", "eu3", "eu2"], 2)
    name, chain, retries = ordered_chain(config, model, eu, [eu2, eu3])
    assert (name, retries) == (failover_cluster("m", "eu"), 2)
    # eu2 not allowed (allow-list, open breaker): only eu3 is tried, first.
    name, chain, retries = ordered_chain(config, model, eu, [eu3])
    assert (name, [p.name for _, p in chain], retries) == (
        "asc_failover.m.eu>eu3>eu2", ["eu", "eu3", "eu2"], 1)
    # A tenant without a zone: fallbacks of another zone are never in the chain.
    name, chain, retries = ordered_chain(config, model, eu, [us, eu3])
    assert (name, retries) == ("asc_failover.m.eu>eu3>eu2", 1)
    assert ordered_chain(config, model, eu, [])[2] == 0


def test_two_attempts_need_only_the_first_fallback_ordered() -> None:
    """max_attempts 2: one retry, so only which fallback comes first matters."""
    config = _three_in_eu(max_attempts=2)
    model = config.models["m"]
    _, eu, eu2, eu3 = model.deployments
    assert [[p.name for _, p in chain] for _, chain in failover_chains(config, model, eu)] \
        == [["eu", "eu2", "eu3"], ["eu", "eu3"]]
    name, chain, retries = ordered_chain(config, model, eu, [eu3, eu2])
    assert (name, [p.name for _, p in chain], retries) == (
        "asc_failover.m.eu>eu3", ["eu", "eu3"], 1)


def test_too_many_orders_keep_config_order_and_stop_at_a_disallowed_level(
        monkeypatch: pytest.MonkeyPatch) -> None:
    config = _three_in_eu()
    model = config.models["m"]
    _, eu, eu2, eu3 = model.deployments
    assert MAX_ORDERS == 24
    monkeypatch.setattr("extproc.failover.MAX_ORDERS", 1)
    assert len(failover_chains(config, model, eu)) == 1
    name, _, retries = ordered_chain(config, model, eu, [eu3, eu2])
    assert (name, retries) == (failover_cluster("m", "eu"), 2)
    assert ordered_chain(config, model, eu, [eu3])[1:] == (
        zone_deployments(config, model, eu), 0)
