"""`extproc.routing.select`: every rule, with exact choices, fallbacks and reasons
(issue 9 item 1). Pure: a fake clock drives the deployment breakers, a seeded RNG the
weights."""

from __future__ import annotations

import random
from collections import Counter
from typing import Any

import pytest

from extproc.config import (
    ConfigError,
    ConfigIssue,
    DeploymentHealthSettings,
    GatewayConfig,
    parse_config,
)
from extproc.credentials.pools import CredentialPool
from extproc.deployment_health import DeploymentHealth
from extproc.errors import ErrorCode, GatewayError
from extproc.routing import RouteOverride, select, select_route

HASH = "hmac-sha256:v1:" + "0" * 64
BASE = """\
version: 1
auth: {pepper: {env: PEPPER}}
credentials:
  k-oa-eu: {env: K1}
  k-az-eu: {env: K2}
  k-an-eu: {env: K3}
  k-oa-us: {env: K4}
providers:
  oa-eu: {kind: openai, base_url: "http://127.0.0.1:1", region: eu-west, zone: eu,
          cluster: oa_eu, credentials: [k-oa-eu]}
  az-eu: {kind: openai, base_url: "http://127.0.0.1:2", region: eu-north, zone: eu,
          cluster: az_eu, credentials: [k-az-eu]}
  an-eu: {kind: anthropic, base_url: "http://127.0.0.1:3", region: eu-west, zone: eu,
          cluster: an_eu, credentials: [k-an-eu]}
  oa-us: {kind: openai, base_url: "http://127.0.0.1:4", region: us-east, zone: us,
          cluster: oa_us, credentials: [k-oa-us]}
models:
  m:
    price: {input_per_mtok: 1, output_per_mtok: 4}
    deployments:
      - {provider: oa-us, model: m-us}
      - {provider: oa-eu, model: m-eu}
      - {provider: az-eu, model: m-az, price: {input_per_mtok: 2, output_per_mtok: 8}}
      - {provider: an-eu, model: claude-m, price: {input_per_mtok: 0.5, output_per_mtok: 2}}
tenants:
"""


def config_with(tenant: str) -> GatewayConfig:
    return parse_config(BASE + "  t:\n" + "\n".join(
        "    " + line for line in (
            f"keys: [{{id: t-1, hash: \"{HASH}\"}}]", "models: [m]", *tenant.splitlines()))
        + "\n")


class Clock:
    def __init__(self) -> None:
        self.now = 1_000.0

    def __call__(self) -> float:
        return self.now


def health(clock: Clock | None = None, pool: CredentialPool | None = None,
           **settings: Any) -> DeploymentHealth:
    return DeploymentHealth(DeploymentHealthSettings(**settings), pool=pool,
                            clock=clock or Clock())


def open_breaker(h: DeploymentHealth, key: str) -> None:
    for _ in range(h.settings.failures):
        permit = h.allow(key)
        assert permit is not None
        h.record(key, permit, status=503, latency_s=0.01)
    assert h.state(key) == "open"


# (tenant YAML, route override, deployments to open, choice, fallbacks, reason)
CASES: list[tuple[str, str, RouteOverride | None, tuple[str, ...], str, tuple[str, ...], str]] = [
    ("no zone: config order", "", None, (), "oa-us", ("oa-eu", "az-eu", "an-eu"),
     "first in order oa-us; fallbacks oa-eu, az-eu, an-eu"),
    ("zone is a hard rule", "zone: eu", None, (), "oa-eu", ("az-eu", "an-eu"),
     "zone eu; first in order oa-eu; fallbacks az-eu, an-eu"),
    ("tenant pin", "zone: eu\nroute_policy: {pin: az-eu}", None, (), "az-eu",
     ("oa-eu", "an-eu"), "zone eu; pinned to az-eu; fallbacks oa-eu, an-eu"),
    ("model rule over tenant policy",
     "zone: eu\nroute_policy: {pin: az-eu}\nrouting: {m: {pin: an-eu}}", None, (), "an-eu",
     ("oa-eu", "az-eu"), "zone eu; pinned to an-eu; fallbacks oa-eu, az-eu"),
    ("pinned region", "zone: eu\nrouting: {m: {pin_region: eu-north}}", None, (), "az-eu",
     ("oa-eu", "an-eu"), "zone eu; pinned to region eu-north: az-eu; fallbacks oa-eu, an-eu"),
    ("listed fallbacks come first", "zone: eu\nrouting: {m: {pin: oa-eu, fallbacks: [an-eu]}}",
     None, (), "oa-eu", ("an-eu", "az-eu"), "zone eu; pinned to oa-eu; fallbacks an-eu, az-eu"),
    ("open pin: the listed fallback takes over",
     "zone: eu\nrouting: {m: {pin: oa-eu, fallbacks: [an-eu]}}", None, ("oa-eu/m-eu",),
     "an-eu", ("az-eu",),
     "zone eu; skipped oa-eu (breaker open); pin oa-eu unavailable, listed fallback an-eu; "
     "fallbacks az-eu"),
    ("allow-list", "zone: eu\nroute_policy: {providers: [az-eu, an-eu, oa-us]}", None, (),
     "az-eu", ("an-eu",), "zone eu; allowed an-eu, az-eu; first in order az-eu; "
     "fallbacks an-eu"),
    ("prefer cost (deployment prices)", "zone: eu\nroute_policy: {prefer: cost}", None, (),
     "an-eu", ("oa-eu", "az-eu"), "zone eu; prefer cost; cheapest an-eu; fallbacks oa-eu, az-eu"),
    ("pin beats preference", "zone: eu\nroute_policy: {prefer: cost, pin: az-eu}", None, (),
     "az-eu", ("an-eu", "oa-eu"), "zone eu; prefer cost; pinned to az-eu; fallbacks an-eu, oa-eu"),
    ("route pin narrows", "zone: eu", RouteOverride(pin="an-eu"), (), "an-eu", (),
     "zone eu; route pin an-eu; first in order an-eu"),
    ("route region narrows", "zone: eu", RouteOverride(region="eu-west"), (), "oa-eu",
     ("an-eu",), "zone eu; route region eu-west; first in order oa-eu; fallbacks an-eu"),
    ("route zone for a tenant without one", "", RouteOverride(zone="eu"), (), "oa-eu",
     ("az-eu", "an-eu"), "route zone eu; first in order oa-eu; fallbacks az-eu, an-eu"),
    ("route providers and tenant allow-list intersect",
     "zone: eu\nroute_policy: {providers: [oa-eu, az-eu]}",
     RouteOverride(providers=frozenset({"az-eu", "an-eu"})), (), "az-eu", (),
     "zone eu; allowed az-eu, oa-eu; route providers an-eu, az-eu; first in order az-eu"),
    ("open breakers are skipped", "zone: eu", None, ("oa-eu/m-eu", "az-eu/m-az"), "an-eu", (),
     "zone eu; skipped oa-eu (breaker open), az-eu (breaker open); first in order an-eu"),
]


@pytest.mark.parametrize(("tenant", "override", "opened", "choice", "fallbacks", "reason"),
                         [case[1:] for case in CASES], ids=[case[0] for case in CASES])
def test_select(tenant: str, override: RouteOverride | None, opened: tuple[str, ...],
                choice: str, fallbacks: tuple[str, ...], reason: str) -> None:
    config = config_with(tenant)
    h = health()
    for key in opened:
        open_breaker(h, key)
    decision = select(config, config.tenants["t"], config.models["m"], health=h,
                      route_override=override)
    assert decision.choice.provider.name == choice
    assert tuple(r.provider.name for r in decision.fallbacks) == fallbacks
    assert decision.reason == reason
    assert all(r.provider.zone == "eu" for r in decision.fallbacks) or not config.tenants[
        "t"].zone


def test_route_reasons_of_choice_and_fallbacks() -> None:
    config = config_with("zone: eu\nrouting: {m: {pin: oa-eu, fallbacks: [an-eu]}}")
    decision = select(config, config.tenants["t"], config.models["m"])
    assert [(r.provider.name, r.deployment.model, r.reason)
            for r in (decision.choice, *decision.fallbacks)] == [
        ("oa-eu", "m-eu", "pinned to oa-eu"),
        ("an-eu", "claude-m", "fallback 1 (listed)"),
        ("az-eu", "m-az", "fallback 2 (in order)"),
    ]


@pytest.mark.parametrize(("tenant", "override", "message"), [
    ("zone: eu", RouteOverride(zone="us"),
     "No deployment of model 'm' is available in your residency zone."),
    ("zone: eu", RouteOverride(pin="oa-us"),
     "No deployment of model 'm' in your residency zone is allowed by the routing policy."),
    ("zone: eu\nroute_policy: {providers: [oa-us]}", None,
     "No deployment of model 'm' in your residency zone is allowed by the routing policy."),
], ids=["route zone outside the tenant's", "route pin outside the zone", "allow-list"])
def test_a_route_override_never_widens(tenant: str, override: RouteOverride | None,
                                       message: str) -> None:
    config = config_with(tenant)
    with pytest.raises(GatewayError) as caught:
        select(config, config.tenants["t"], config.models["m"], route_override=override)
    assert (caught.value.code, caught.value.status, str(caught.value)) == (
        ErrorCode.UNAVAILABLE, 503, message)
    assert "oa-us" not in str(caught.value)


def test_every_in_zone_deployment_down_is_503_and_never_the_us_one() -> None:
    config = config_with("zone: eu")
    h = health()
    for key in ("oa-eu/m-eu", "az-eu/m-az", "an-eu/claude-m"):
        open_breaker(h, key)
    with pytest.raises(GatewayError) as caught:
        select(config, config.tenants["t"], config.models["m"], health=h)
    assert (caught.value.code, caught.value.status, str(caught.value)) == (
        ErrorCode.UNAVAILABLE, 503,
        "Every deployment of model 'm' in your residency zone is unavailable.")


def test_a_provider_without_a_usable_credential_is_skipped() -> None:
    clock = Clock()
    pool = CredentialPool(open_after=1, clock=clock)
    choice = pool.choose(["global/k-oa-eu"], [1])
    pool.record(choice, 401, 0.01)
    assert pool.state("global/k-oa-eu") == "open"
    config = config_with("zone: eu")
    decision = select(config, config.tenants["t"], config.models["m"],
                      health=health(clock, pool))
    assert decision.choice.provider.name == "az-eu"
    assert decision.reason == ("zone eu; skipped oa-eu (no usable credential); first in "
                               "order az-eu; fallbacks an-eu")


def test_prefer_latency_orders_by_measured_latency() -> None:
    config = config_with("zone: eu\nroute_policy: {prefer: latency}")
    h = health()
    for key, latency in (("oa-eu/m-eu", 0.9), ("az-eu/m-az", 0.2)):
        permit = h.allow(key)
        assert permit is not None
        h.record(key, permit, status=200, latency_s=latency)
    decision = select(config, config.tenants["t"], config.models["m"], health=h)
    assert [decision.choice.provider.name, *(r.provider.name for r in decision.fallbacks)] == [
        "az-eu", "oa-eu", "an-eu"]  # an-eu has no measurement yet: last
    assert decision.reason == "zone eu; prefer latency; fastest az-eu; fallbacks oa-eu, an-eu"


def test_weights_are_honoured_over_1000_selections() -> None:
    config = config_with("zone: eu\nroute_policy: {weights: {oa-eu: 70, an-eu: 20, az-eu: 10}}")
    rng = random.Random(9)
    picks = Counter(select(config, config.tenants["t"], config.models["m"],
                           rng=rng).choice.provider.name for _ in range(1000))
    # Binomial bound: |count - n p| <= 4 sigma, sigma = sqrt(n p (1 - p)).
    for name, share in (("oa-eu", 0.7), ("an-eu", 0.2), ("az-eu", 0.1)):
        sigma = (1000 * share * (1 - share)) ** 0.5
        assert abs(picks[name] - 1000 * share) <= 4 * sigma, (name, picks)
    assert sum(picks.values()) == 1000
    decision = select(config, config.tenants["t"], config.models["m"], rng=random.Random(9))
    assert decision.reason.startswith("zone eu; weighted ")
    assert decision.reason.endswith("/100); fallbacks " + ", ".join(
        r.provider.name for r in decision.fallbacks))


def test_weights_skip_an_open_deployment() -> None:
    config = config_with("zone: eu\nroute_policy: {weights: {oa-eu: 90, an-eu: 10}}")
    h = health()
    open_breaker(h, "oa-eu/m-eu")
    picks = Counter(select(config, config.tenants["t"], config.models["m"], health=h,
                           rng=random.Random(1)).choice.provider.name for _ in range(200))
    assert picks == Counter({"an-eu": 200})


def test_select_route_keeps_the_old_shape() -> None:
    config = config_with("zone: eu")
    route = select_route(config, config.tenants["t"], config.models["m"])
    assert (route.provider.name, route.reason) == (
        "oa-eu", "zone eu; first in order oa-eu; fallbacks az-eu, an-eu")


@pytest.mark.parametrize(("metadata", "expected"), [
    (None, None),
    ({}, None),
    ({"pin": "an-eu"}, RouteOverride(pin="an-eu")),
    ({"zone": "eu", "providers": ["a", "b"]},
     RouteOverride(zone="eu", providers=frozenset({"a", "b"}))),
])
def test_route_override_from_metadata(metadata: dict[str, object] | None,
                                      expected: RouteOverride | None) -> None:
    assert RouteOverride.from_metadata(metadata) == expected


@pytest.mark.parametrize(("metadata", "why"), [
    ({"pinn": "x"}, "unknown field(s) pinn"),
    ({"pin": 3}, "pin must be a non-empty string"),
    ({"zone": ""}, "zone must be a non-empty string"),
    ({"providers": "a"}, "providers must be a non-empty list of names"),
    ({"providers": []}, "providers must be a non-empty list of names"),
])
def test_unreadable_route_metadata_is_refused_not_ignored(metadata: dict[str, object],
                                                          why: str) -> None:
    with pytest.raises(GatewayError) as caught:
        RouteOverride.from_metadata(metadata)
    assert (caught.value.status, str(caught.value)) == (
        500, f"The gateway route's routing metadata is invalid: {why}.")


@pytest.mark.parametrize(("tenant", "issue"), [
    ("zone: eu\nroute_policy: {pin: oa-us}",
     ConfigIssue("tenants.t.route_policy.pin", "'oa-us' is outside the tenant's zone 'eu'",
                 "residency is a hard rule; pin a provider in the tenant's zone")),
    ("zone: eu\nrouting: {m: {fallbacks: [oa-us]}}",
     ConfigIssue("tenants.t.routing.m.fallbacks[0]",
                 "'oa-us' is outside the tenant's zone 'eu'",
                 "residency is a hard rule; pin a provider in the tenant's zone")),
    ("routing: {m: {weights: {nope: 1}}}",
     ConfigIssue("tenants.t.routing.m.weights.nope", "'nope' is not a deployment of m",
                 "deployments: oa-us, oa-eu, az-eu, an-eu")),
    ("route_policy: {providers: [nope]}",
     ConfigIssue("tenants.t.route_policy.providers[0]", "unknown provider 'nope'")),
    ("zone: eu\nrouting: {m: {pin_region: us-east}}",
     ConfigIssue("tenants.t.routing.m.pin_region",
                 "no deployment in region 'us-east' in the tenant's zone 'eu'",
                 "regions: eu-north, eu-west")),
    ("routing: {m: {pin: oa-eu, pin_region: eu-west}}",
     ConfigIssue("tenants.t.routing.m", "needs at most one of `pin` or `pin_region`")),
    ("route_policy: {prefer: fast}",
     ConfigIssue("tenants.t.route_policy.prefer", "must be cost or latency, got 'fast'")),
])
def test_policy_config_errors(tenant: str, issue: ConfigIssue) -> None:
    with pytest.raises(ConfigError) as caught:
        config_with(tenant)
    [found] = caught.value.issues
    assert (found.path, found.message, found.hint) == (issue.path, issue.message, issue.hint)


def _headers_request(route_metadata_text: str | None) -> Any:
    from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
    request = pb.ProcessingRequest()
    request.request_headers.SetInParent()
    if route_metadata_text is not None:
        attributes = request.attributes["envoy.filters.http.ext_proc"]
        attributes.fields["xds.route_metadata"].string_value = route_metadata_text
    return request


# As Envoy 1.40 sends it (measured, docs/decisions/0060-route-metadata-to-the-service.md):
# the route's Metadata in protobuf text format, "" for a route without metadata.
MEASURED = ('filter_metadata { key: "asc" value { fields { key: "pin" value { string_value: '
            '"emu-eu" } } fields { key: "providers" value { list_value { values { '
            'string_value: "a" } values { string_value: "b" } } } } fields { key: "zone" '
            'value { string_value: "eu" } } } } ')


@pytest.mark.parametrize(("text", "expected"), [
    (MEASURED, {"pin": "emu-eu", "providers": ["a", "b"], "zone": "eu"}),
    ("", None),
    (None, None),
    ('filter_metadata { key: "other" value { fields { key: "pin" value { string_value: '
     '"x" } } } }', None),
])
def test_envoy_decodes_route_metadata(text: str | None, expected: object) -> None:
    from extproc.envoy import decode
    from extproc.messages import Headers
    inbound = decode(_headers_request(text))
    assert isinstance(inbound, Headers)
    assert inbound.route_metadata == expected


def test_a_degraded_credential_still_serves() -> None:
    clock = Clock()
    pool = CredentialPool(clock=clock)
    for status in [503] * 5 + [200] * 15:  # 25 % errors: degraded, breaker closed
        pool.record(pool.choose(["global/k-oa-eu"], [1]), status, 0.01)
    assert pool.state("global/k-oa-eu") == "degraded"
    config = config_with("zone: eu")
    decision = select(config, config.tenants["t"], config.models["m"],
                      health=health(clock, pool))
    assert decision.reason == "zone eu; first in order oa-eu; fallbacks az-eu, an-eu"
