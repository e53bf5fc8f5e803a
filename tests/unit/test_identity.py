"""Identity sources (`extproc.identity`, `extproc.auth`): which principal a request is,
from a virtual key, an mTLS peer's SPIFFE id, or verified JWT claims; teams; the Envoy
wire (`extproc.envoy.decode`) and render pieces (`extproc.envoy_identity`)."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb

from extproc.auth import Principal, TenantDirectory, hash_key
from extproc.budget_cli import tenant_limit_rows
from extproc.budgets.policy import Scope, plan_reservation
from extproc.config import ConfigError, GatewayConfig, parse_config
from extproc.envoy import decode
from extproc.envoy_bootstrap import EnvoyPorts, render_bootstrap
from extproc.envoy_identity import (
    IdentityOptionError,
    MeshListener,
    identity_options,
    jwt_authn_filter,
)
from extproc.errors import ErrorCode, GatewayError
from extproc.identity import (
    IdentitySource,
    allowed_models,
    authenticate,
    route_identity,
)
from extproc.messages import Headers, Phase
from extproc.secrets import Secret

PEPPER = Secret("pepper-for-identity-tests")
ACME_KEY = "sk-asc-acme-identity"
ISSUER = "https://idp.example"
WORKLOAD = "spiffe://acme.example/ns/billing/sa/api"


def config_text(*, identity: str = "", acme_extra: str = "", globex_extra: str = "") -> str:
    acme_hash = hash_key(PEPPER, ACME_KEY)
    return f"""\
version: 1
auth: {{pepper: {{env: ASC_PEPPER}}}}
redis: {{url: "redis://127.0.0.1:1/0"}}
providers:
  local: {{kind: openai_compatible, base_url: "http://127.0.0.1:18080", region: lab,
          zone: lab, cluster: local}}
models:
  small: {{price: {{input_per_mtok: 1, output_per_mtok: 2}}, deployments: [{{provider: local}}]}}
  large: {{price: {{input_per_mtok: 5, output_per_mtok: 9}}, deployments: [{{provider: local}}]}}
tenants:
  acme:
    keys: [{{id: acme-main, hash: "{acme_hash}", team: billing}}]
    models: [small, large]
    teams:
      billing: {{models: [small], budgets: [{{window: day, limit_usd: 1}}]}}
      research: {{}}
    mesh_identities:
      - {{spiffe: "{WORKLOAD}", team: billing}}
      - {{spiffe: "spiffe://acme.example/", match: prefix}}
      - {{spiffe: "spiffe://acme.example/ns/research/", match: prefix, team: research}}
{acme_extra}
  globex:
    keys: [{{id: globex-main, hash: "{hash_key(PEPPER, "sk-globex")}"}}]
    models: [small]
    mesh_identities: [{{spiffe: "spiffe://globex.example/", match: prefix}}]
{globex_extra}
{identity}"""


JWT_IDENTITY = f"""\
identity:
  sources: [mesh, jwt, virtual_key]
  jwt: {{issuer: "{ISSUER}", audiences: [asc], jwks_file: jwks.json, team_claim: team}}
"""


@pytest.fixture
def config() -> GatewayConfig:
    return parse_config(config_text(identity=JWT_IDENTITY), base_dir=Path("/etc/asc"))


@pytest.fixture
def directory(config: GatewayConfig) -> TenantDirectory:
    return TenantDirectory(config, PEPPER)


def request(headers: dict[str, str] | None = None, *, mtls: bool = False,
            peer: str | None = None, claims: dict[str, object] | None = None) -> Headers:
    return Headers(Phase.REQUEST_HEADERS, headers or {}, False, mtls=mtls, peer_uri_san=peer,
                   jwt_claims=claims)


def who(principal: Principal) -> tuple[str, str, str, str | None]:
    return principal.tenant.id, principal.source, principal.subject, principal.team


def refusal(directory: TenantDirectory, config: GatewayConfig, message: Headers,
            sources: tuple[IdentitySource, ...] | None = None) -> tuple[int, str]:
    with pytest.raises(GatewayError) as caught:
        authenticate(directory, config.identity, message, sources)
    return caught.value.status, caught.value.message


# -- virtual keys ------------------------------------------------------------------------

def test_virtual_key_principal_carries_its_team(directory: TenantDirectory,
                                                config: GatewayConfig) -> None:
    principal = authenticate(directory, config.identity, request({"x-api-key": ACME_KEY}))
    assert who(principal) == ("acme", "virtual_key", "acme-main", "billing")
    assert principal.key_id == "acme-main"


def test_default_sources_are_virtual_keys_only() -> None:
    config = parse_config(config_text())
    assert config.identity.sources == ("virtual_key",)
    directory = TenantDirectory(config, PEPPER)
    assert refusal(directory, config, request(mtls=True, peer=WORKLOAD)) == (
        401, "Missing API key: send it as 'Authorization: Bearer <key>' or 'x-api-key'.")
    assert refusal(directory, config, request(claims={"iss": ISSUER, "sub": "a",
                                                      "tenant": "acme"}))[0] == 401


# -- mesh --------------------------------------------------------------------------------

@pytest.mark.parametrize(("spiffe", "expected"), [
    (WORKLOAD, ("acme", "billing")),                                   # exact
    ("spiffe://acme.example/ns/other/sa/x", ("acme", None)),           # trust domain
    ("spiffe://acme.example/ns/research/sa/x", ("acme", "research")),  # longest prefix
    ("spiffe://globex.example/a", ("globex", None)),
])
def test_workload_maps_by_exact_then_longest_prefix(
        directory: TenantDirectory, config: GatewayConfig, spiffe: str,
        expected: tuple[str, str | None]) -> None:
    principal = authenticate(directory, config.identity, request(mtls=True, peer=spiffe))
    assert (principal.tenant.id, principal.team) == expected
    assert (principal.source, principal.subject, principal.key_id) == ("mesh", spiffe, spiffe)


@pytest.mark.parametrize("spiffe", [
    "spiffe://acme.example.evil/ns/a", "spiffe://globex.examplex/", "spiffe://other/",
])
def test_unknown_workload_is_403(directory: TenantDirectory, config: GatewayConfig,
                                 spiffe: str) -> None:
    assert refusal(directory, config, request(mtls=True, peer=spiffe)) == (
        403, f"The workload '{spiffe}' is not a principal of any tenant.")


def test_peer_id_without_mtls_or_an_xfcc_header_never_counts(
        directory: TenantDirectory, config: GatewayConfig) -> None:
    xfcc = {"x-forwarded-client-cert": f"URI={WORKLOAD}"}
    assert refusal(directory, config, request(xfcc, mtls=False, peer=WORKLOAD))[0] == 401
    assert refusal(directory, config, request(xfcc, mtls=True, peer=None))[0] == 401


# -- jwt ---------------------------------------------------------------------------------

def claims(**extra: object) -> dict[str, object]:
    return {"iss": ISSUER, "sub": "alice", "aud": "asc", **extra}


def test_jwt_claims_map_tenant_subject_and_team(directory: TenantDirectory,
                                                config: GatewayConfig) -> None:
    principal = authenticate(directory, config.identity,
                             request(claims=claims(tenant="acme", team="research")))
    assert who(principal) == ("acme", "jwt", f"{ISSUER}#alice", "research")
    no_team = authenticate(directory, config.identity, request(claims=claims(tenant="globex")))
    assert who(no_team) == ("globex", "jwt", f"{ISSUER}#alice", None)


@pytest.mark.parametrize(("token_claims", "expected"), [
    (claims(tenant="initech"), (403, "The token's 'tenant' claim names no tenant of this "
                                     "gateway.")),
    (claims(tenant=["acme"]), (403, "The token's 'tenant' claim names no tenant of this "
                                    "gateway.")),
    (claims(), (403, "The token's 'tenant' claim names no tenant of this gateway.")),
    (claims(tenant="acme", team="marketing"), (403, "The token's 'team' claim names no "
                                                    "team of its tenant.")),
    (claims(tenant="acme", sub=""), (403, "The token has no subject ('sub').")),
    (claims(tenant="acme", iss="https://other"), (401, "The token's issuer is not accepted.")),
])
def test_jwt_claims_that_name_no_principal(directory: TenantDirectory, config: GatewayConfig,
                                           token_claims: dict[str, object],
                                           expected: tuple[int, str]) -> None:
    assert refusal(directory, config, request(claims=token_claims)) == expected


def test_first_presented_source_decides_and_never_falls_through(
        directory: TenantDirectory, config: GatewayConfig) -> None:
    both = request({"x-api-key": ACME_KEY}, mtls=True, peer="spiffe://nobody/")
    assert refusal(directory, config, both)[0] == 403  # mesh first: refused, no fallback
    principal = authenticate(directory, config.identity, request(
        {"x-api-key": ACME_KEY}, claims=claims(tenant="globex")))
    assert principal.source == "jwt"


def test_route_sources_replace_the_default(directory: TenantDirectory,
                                           config: GatewayConfig) -> None:
    jwt_only = (IdentitySource.JWT,)
    assert refusal(directory, config, request({"x-api-key": ACME_KEY}), jwt_only) == (
        401, "Missing credentials: send a bearer JWT of the configured issuer.")
    mesh_only = (IdentitySource.MESH,)
    principal = authenticate(directory, config.identity,
                             request({"x-api-key": ACME_KEY}, mtls=True, peer=WORKLOAD),
                             mesh_only)
    assert principal.source == "mesh"


def test_route_identity_is_split_off_the_routing_fields() -> None:
    assert route_identity(None) == (None, None)
    assert route_identity({"pin": "a"}) == (None, {"pin": "a"})
    assert route_identity({"identity": ["mesh", "jwt", "mesh"], "zone": "eu"}) == (
        (IdentitySource.MESH, IdentitySource.JWT), {"zone": "eu"})
    assert route_identity({"identity": ["jwt"]}) == ((IdentitySource.JWT,), None)


@pytest.mark.parametrize("value", [[], "jwt", ["password"], [1]])
def test_unreadable_route_identity_is_refused(value: object) -> None:
    with pytest.raises(GatewayError) as caught:
        route_identity({"identity": value})
    assert caught.value.code is ErrorCode.INTERNAL
    assert caught.value.message == (
        "The gateway route's identity metadata is invalid: identity must be a non-empty "
        "list of jwt, mesh, virtual_key.")


# -- teams -------------------------------------------------------------------------------

def test_team_models_narrow_the_tenants(directory: TenantDirectory,
                                        config: GatewayConfig) -> None:
    billing = authenticate(directory, config.identity, request({"x-api-key": ACME_KEY}))
    assert allowed_models(billing) == frozenset({"small"})
    research = authenticate(directory, config.identity,
                            request(claims=claims(tenant="acme", team="research")))
    assert allowed_models(research) == frozenset({"small", "large"})


def test_team_budget_is_one_more_counter_of_the_same_reservation(
        config: GatewayConfig) -> None:
    budget = config.tenants["acme"].budget
    assert budget is not None
    (rule,) = budget.rules
    assert (rule.scope, rule.subject, rule.limit_micro_usd) == (Scope.TEAM, "billing", 1_000_000)
    now = datetime(2026, 11, 30, 12, tzinfo=UTC)
    plan = {"key_id": "acme-main", "model": "small", "cost_micro_usd": 7,
            "estimated_tokens": 3, "now": now, "zone": ZoneInfo("UTC")}
    groups = plan_reservation(budget, team="billing", **plan)  # type: ignore[arg-type]
    assert [(g.name, g.keys, g.amount) for g in groups] == [
        ("team 'billing' daily budget", ("asc:{t:acme}:b:tenant:acme:team:billing:d2026-11-30",),
         7)]
    assert plan_reservation(budget, team="research", **plan) == ()  # type: ignore[arg-type]
    assert plan_reservation(budget, **plan) == ()  # type: ignore[arg-type]


# -- config ------------------------------------------------------------------------------

def problems(text: str) -> list[tuple[str, str]]:
    with pytest.raises(ConfigError) as caught:
        parse_config(text)
    return [(issue.path, issue.message) for issue in caught.value.issues]


def test_config_rules_for_identity() -> None:
    assert problems(config_text(identity="identity: {sources: [jwt]}\n")) == [
        ("identity.jwt", "is required when `jwt` is a source")]
    assert problems(config_text(identity="identity: {sources: [mesh, mesh]}\n")) == [
        ("identity.sources", "lists a source twice")]
    assert problems(config_text(identity="identity: {sources: [password]}\n")) == [
        ("identity.sources[0]", "unknown identity source 'password'")]
    bad_prefix = config_text(globex_extra="").replace(
        '"spiffe://globex.example/", match', '"spiffe://globex.example", match')
    assert problems(bad_prefix) == [
        ("tenants.globex.mesh_identities[0].spiffe", "a prefix must end with '/'")]
    twice = config_text().replace('"spiffe://globex.example/"', '"spiffe://acme.example/"')
    assert problems(twice) == [("tenants.globex.mesh_identities[0].spiffe",
                                "same SPIFFE id already used by "
                                "tenants.acme.mesh_identities[1]")]
    unknown_team = config_text().replace("team: billing}]", "team: sales}]")
    assert problems(unknown_team) == [("tenants.acme.keys[0].team", "unknown team 'sales'")]
    not_spiffe = config_text().replace(f'"{WORKLOAD}"', '"https://acme.example/x"')
    assert problems(not_spiffe) == [("tenants.acme.mesh_identities[0].spiffe",
                                     "not a SPIFFE id")]


# -- the Envoy wire ----------------------------------------------------------------------

def test_decode_reads_peer_attributes_and_verified_claims() -> None:
    message = pb.ProcessingRequest()
    message.request_headers.headers.headers.add(key=":path", raw_value=b"/v1/chat/completions")
    attributes = message.attributes["envoy.filters.http.ext_proc"]
    attributes.update({"connection.mtls": True, "xds.route_metadata": "",
                       "connection.uri_san_peer_certificate": WORKLOAD})
    message.metadata_context.filter_metadata["envoy.filters.http.jwt_authn"].update(
        {"claims": {"iss": ISSUER, "sub": "alice", "tenant": "acme"}})
    decoded = decode(message)
    assert isinstance(decoded, Headers)
    assert (decoded.mtls, decoded.peer_uri_san) == (True, WORKLOAD)
    assert decoded.jwt_claims == {"iss": ISSUER, "sub": "alice", "tenant": "acme"}


def test_decode_without_attributes_is_no_identity() -> None:
    message = pb.ProcessingRequest()
    message.request_headers.headers.headers.add(key="x-forwarded-client-cert",
                                               raw_value=f"URI={WORKLOAD}".encode())
    decoded = decode(message)
    assert isinstance(decoded, Headers)
    assert (decoded.mtls, decoded.peer_uri_san, decoded.jwt_claims) == (False, None, None)


# -- render ------------------------------------------------------------------------------

MESH = MeshListener(port=10443, cert_chain="/etc/asc/tls/envoy.crt",
                    private_key="/etc/asc/tls/envoy.key", client_ca="/etc/asc/tls/mesh-ca.crt")


def _hcm(listener: dict[str, Any]) -> dict[str, Any]:
    hcm: dict[str, Any] = listener["filter_chains"][0]["filters"][0]["typed_config"]
    return hcm


def test_render_identity_adds_jwt_authn_and_the_mtls_listener(config: GatewayConfig) -> None:
    bootstrap = render_bootstrap(config, EnvoyPorts(),
                                 identity=identity_options(config, ["jwt", "mesh"], MESH))
    plain, mtls = bootstrap["static_resources"]["listeners"]
    assert (plain["name"], mtls["name"]) == ("asc_ingress", "asc_ingress_mtls")
    for listener in (plain, mtls):
        filters = [f["name"] for f in _hcm(listener)["http_filters"]]
        assert filters == ["envoy.filters.http.jwt_authn", "asc.ext_proc",
                           "envoy.filters.http.router"]
        ext_proc = _hcm(listener)["http_filters"][1]["typed_config"]
        assert ext_proc["request_attributes"] == [
            "xds.route_metadata", "source.address", "connection.mtls",
            "connection.uri_san_peer_certificate"]
        assert ext_proc["metadata_options"]["forwarding_namespaces"] == {
            "untyped": ["envoy.filters.http.jwt_authn"]}
    assert _hcm(plain)["forward_client_cert_details"] == "SANITIZE"
    assert "transport_socket" not in plain["filter_chains"][0]
    assert _hcm(mtls)["forward_client_cert_details"] == "SANITIZE_SET"
    assert _hcm(mtls)["set_current_client_cert_details"] == {"uri": True}
    tls = mtls["filter_chains"][0]["transport_socket"]["typed_config"]
    assert tls["require_client_certificate"] is True
    assert tls["common_tls_context"]["validation_context"] == {
        "trusted_ca": {"filename": "/etc/asc/tls/mesh-ca.crt"},
        "match_typed_subject_alt_names": [{"san_type": "URI",
                                           "matcher": {"prefix": "spiffe://"}}]}
    assert mtls["address"] == {"socket_address": {"address": "127.0.0.1", "port_value": 10443}}


def test_jwt_authn_reads_only_the_bearer_header_and_lets_a_missing_token_pass(
        config: GatewayConfig) -> None:
    assert config.identity.jwt is not None
    provider = jwt_authn_filter(config.identity.jwt)["typed_config"]
    assert provider["providers"] == {"asc": {
        "issuer": ISSUER, "audiences": ["asc"],
        "local_jwks": {"filename": "/etc/asc/jwks.json"},
        "from_headers": [{"name": "authorization", "value_prefix": "Bearer "}],
        "forward": False, "payload_in_metadata": "claims"}}
    assert provider["rules"] == [{"match": {"prefix": "/"}, "requires": {"requires_any": {
        "requirements": [{"provider_name": "asc"}, {"allow_missing": {}}]}}}]


def test_render_without_identity_adds_no_identity_piece(config: GatewayConfig) -> None:
    bootstrap = render_bootstrap(config, EnvoyPorts())
    (listener,) = bootstrap["static_resources"]["listeners"]
    hcm = _hcm(listener)
    assert "forward_client_cert_details" not in hcm
    assert [f["name"] for f in hcm["http_filters"]] == ["asc.ext_proc",
                                                        "envoy.filters.http.router"]
    ext_proc = hcm["http_filters"][0]["typed_config"]
    assert ext_proc["request_attributes"] == ["xds.route_metadata", "source.address"]
    assert "forwarding_namespaces" not in ext_proc["metadata_options"]


def test_identity_option_errors(config: GatewayConfig) -> None:
    with pytest.raises(IdentityOptionError, match="unknown identity source"):
        identity_options(config, ["kerberos"])
    with pytest.raises(IdentityOptionError, match="--identity mesh needs --mesh-port"):
        identity_options(config, ["mesh"])
    plain = parse_config(config_text())
    with pytest.raises(IdentityOptionError, match=r"needs `identity\.jwt`"):
        identity_options(plain, ["jwt"])


def test_principal_of_a_key_id_alone_is_that_virtual_key(config: GatewayConfig) -> None:
    principal = Principal(tenant=config.tenants["acme"], key_id="acme-main")
    assert (principal.subject, principal.source, principal.team) == (
        "acme-main", "virtual_key", None)


def test_budget_cli_names_a_team_limit(config: GatewayConfig) -> None:
    rows = tenant_limit_rows(config, config.tenants["acme"],
                             now=datetime(2026, 11, 30, 12, tzinfo=UTC))
    assert [(row.number, row.name, row.scope) for row in rows] == [
        (1, "team:billing:day", "team")]
