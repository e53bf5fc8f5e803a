"""Identity sources through a real Envoy (rendered with `--identity jwt,mesh`): JWTs
verified by jwt_authn against a local JWKS, SPIFFE ids of mTLS peers, and virtual keys,
each mapped to its tenant; every refusal has its exact status and JSON body, and the
provider (emulator) receives nothing."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from extproc.devstack import Stack
from tests.conftest import (
    ACME_KEY,
    CANARIES,
    CHAT,
    PROVIDER_KEY_EU,
    PROVIDER_KEY_US,
    chat_body,
    provider_fingerprint,
)
from tests.e2e.audit_check import assert_one_record
from tests.identity_material import (
    ACME_WORKLOAD,
    AUDIENCE,
    ISSUER,
    IdentityGateway,
    start_identity_gateway,
)
from tests.polling import wait_for

pytestmark = pytest.mark.timeout(120)

EU_KEY_SEEN = f"Bearer {provider_fingerprint(PROVIDER_KEY_EU)}"
US_KEY_SEEN = f"Bearer {provider_fingerprint(PROVIDER_KEY_US)}"


@pytest.fixture(scope="module")
def identity(tmp_path_factory: pytest.TempPathFactory) -> Iterator[IdentityGateway]:
    workdir = tmp_path_factory.mktemp("identity")
    with Stack(workdir / "stack") as stack:
        yield start_identity_gateway(stack, workdir)


@pytest.fixture
def ident(identity: IdentityGateway) -> IdentityGateway:
    identity.gateway.emulator.clear()
    return identity


def _post(client: httpx.Client, headers: dict[str, str] | None = None) -> httpx.Response:
    return client.post(CHAT, content=json.dumps(chat_body()).encode(),
                       headers={"content-type": "application/json", **(headers or {})})


def _finished(ident: IdentityGateway, request_id: str) -> dict[str, Any]:
    """The extproc's `request finished` log record of one request."""
    found: list[dict[str, Any]] = []

    def logged() -> bool:
        for line in ident.gateway.extproc.log_text().splitlines():
            if request_id in line and '"request finished"' in line:
                found.append(json.loads(line))
                return True
        return False

    assert wait_for(logged), f"no log record for {request_id}"
    return found[0]


def _bearer(token: str) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"}


# -- JWT ---------------------------------------------------------------------------------

def test_valid_jwt_authenticates_its_tenant_and_team(ident: IdentityGateway) -> None:
    token = ident.issuer.token(tenant="acme", team="billing", sub="alice")
    response = _post(ident.gateway.client, _bearer(token))

    assert response.status_code == 200, response.text
    assert response.headers["x-asc-provider"] == "emu-eu"  # acme's zone
    (seen,) = ident.gateway.emulator.requests()
    assert seen["headers"]["authorization"] == EU_KEY_SEEN  # the token never reaches it
    record = _finished(ident, response.headers["x-asc-request-id"])
    assert (record["tenant"], record["identity_source"], record["subject"], record["team"]) == (
        "acme", "jwt", f"{ISSUER}#alice", "billing")
    assert_one_record(ident.gateway, response.headers["x-asc-request-id"], tenant="acme",
                      principal={"subject": f"{ISSUER}#alice", "source": "jwt",
                                 "key_id": None, "team": "billing"})


def test_jwt_claim_of_another_tenant_gets_that_tenants_route(ident: IdentityGateway) -> None:
    response = _post(ident.gateway.client, _bearer(ident.issuer.token(tenant="globex")))

    assert response.status_code == 200, response.text
    assert response.headers["x-asc-provider"] == "emu-us"
    (seen,) = ident.gateway.emulator.requests()
    assert seen["headers"]["authorization"] == US_KEY_SEEN


@pytest.mark.parametrize(("case", "status", "code", "message"), [
    ("expired", 401, "jwt_authn_access_denied{Jwt_is_expired}", "Jwt is expired"),
    ("wrong_issuer", 401, "jwt_authn_access_denied{Jwt_issuer_is_not_configured}",
     "Jwt issuer is not configured"),
    ("wrong_audience", 403, "jwt_authn_access_denied{Audiences_in_Jwt_are_not_allowed}",
     "Audiences in Jwt are not allowed"),
    ("wrong_signature", 401, "jwt_authn_access_denied{Jwt_verification_fails}",
     "Jwt verification fails"),
])
def test_jwt_rejected_by_envoy_with_a_json_body(ident: IdentityGateway, case: str, status: int,
                                                code: str, message: str) -> None:
    issuer = ident.issuer
    token = {
        "expired": lambda: issuer.token(tenant="acme", lifetime_s=-600),
        "wrong_issuer": lambda: issuer.token(tenant="acme", iss="https://evil.test"),
        "wrong_audience": lambda: issuer.token(tenant="acme", aud="someone-else"),
        "wrong_signature": lambda: issuer.token(
            tenant="acme", signing_key=rsa.generate_private_key(public_exponent=65537,
                                                                key_size=2048)),
    }[case]()
    response = _post(ident.gateway.client, _bearer(token))

    assert response.status_code == status
    assert response.headers["content-type"] == "application/json"
    assert response.json() == {"error": {"message": message, "type": "gateway_error",
                                         "param": None, "code": code}}
    assert ident.gateway.emulator.requests() == []


@pytest.mark.parametrize(("claims", "message"), [
    ({"tenant": "initech"}, "The token's 'tenant' claim names no tenant of this gateway."),
    ({"tenant": None}, "The token's 'tenant' claim names no tenant of this gateway."),
    ({"tenant": "acme", "team": "marketing"},
     "The token's 'team' claim names no team of its tenant."),
])
def test_verified_jwt_of_no_tenant_is_forbidden(ident: IdentityGateway, claims: dict[str, Any],
                                                message: str) -> None:
    response = _post(ident.gateway.client, _bearer(ident.issuer.token(**claims)))

    assert response.status_code == 403
    assert response.json() == {"error": {"message": message, "type": "permission_error",
                                         "param": None, "code": "permission_denied"}}
    assert ident.gateway.emulator.requests() == []


def test_missing_credentials_is_the_services_401(ident: IdentityGateway) -> None:
    response = _post(ident.gateway.client)

    assert response.status_code == 401
    assert response.json()["error"] == {
        "message": "Missing credentials: send a client certificate with a SPIFFE id (mTLS "
                   "listener) or a bearer JWT of the configured issuer or an API key "
                   "('Authorization: Bearer <key>' or 'x-api-key').",
        "type": "authentication_error", "param": None, "code": "invalid_api_key"}
    assert ident.gateway.emulator.requests() == []


def test_virtual_key_still_works_beside_jwt(ident: IdentityGateway) -> None:
    response = _post(ident.gateway.client, {"x-api-key": ACME_KEY})

    assert response.status_code == 200, response.text
    record = _finished(ident, response.headers["x-asc-request-id"])
    assert (record["tenant"], record["identity_source"], record["subject"]) == (
        "acme", "virtual_key", "acme-main")


def test_forged_jwt_payload_headers_do_not_authenticate(ident: IdentityGateway) -> None:
    claims = json.dumps({"iss": ISSUER, "aud": AUDIENCE, "sub": "mallory", "tenant": "acme"})
    response = _post(ident.gateway.client, {"x-jwt-payload": claims, "x-jwt-claims": claims,
                                            "x-asc-tenant": "acme"})

    assert response.status_code == 401
    assert ident.gateway.emulator.requests() == []


# -- mesh (mTLS + SPIFFE) ----------------------------------------------------------------

def test_workload_spiffe_id_authenticates_its_tenant_and_team(ident: IdentityGateway) -> None:
    cert = ident.pki.workload("acme-billing", ACME_WORKLOAD)
    with ident.mesh_client(cert) as client:
        response = _post(client)

    assert response.status_code == 200, response.text
    assert response.headers["x-asc-provider"] == "emu-eu"
    (seen,) = ident.gateway.emulator.requests()
    assert seen["headers"]["authorization"] == EU_KEY_SEEN
    assert "x-forwarded-client-cert" not in seen["headers"]
    record = _finished(ident, response.headers["x-asc-request-id"])
    assert (record["tenant"], record["identity_source"], record["subject"], record["team"]) == (
        "acme", "mesh", ACME_WORKLOAD, "billing")
    assert_one_record(ident.gateway, response.headers["x-asc-request-id"], tenant="acme",
                      principal={"subject": ACME_WORKLOAD, "source": "mesh", "key_id": None,
                                 "team": "billing"})


def test_trust_domain_prefix_maps_every_workload_of_it(ident: IdentityGateway) -> None:
    spiffe = "spiffe://globex.test/ns/any/sa/batch"
    with ident.mesh_client(ident.pki.workload("globex-batch", spiffe)) as client:
        response = _post(client)

    assert response.status_code == 200, response.text
    assert response.headers["x-asc-provider"] == "emu-us"
    record = _finished(ident, response.headers["x-asc-request-id"])
    assert (record["tenant"], record["subject"], record["team"]) == ("globex", spiffe, None)


@pytest.mark.parametrize("spiffe", [
    "spiffe://acme.test/ns/billing/sa/other",      # same trust domain, not listed
    "spiffe://globex.test.evil/ns/a/sa/b",          # prefix look-alike
    "spiffe://acme.test/ns/billing/sa/api/extra",   # exact entries are exact
])
def test_unknown_workload_is_forbidden(ident: IdentityGateway, spiffe: str) -> None:
    with ident.mesh_client(ident.pki.workload("unknown", spiffe)) as client:
        response = _post(client)

    assert response.status_code == 403
    assert response.json()["error"] == {
        "message": f"The workload '{spiffe}' is not a principal of any tenant.",
        "type": "permission_error", "param": None, "code": "permission_denied"}
    assert ident.gateway.emulator.requests() == []


def test_workload_certificate_wins_over_a_forged_xfcc(ident: IdentityGateway) -> None:
    forged = "By=spiffe://x;Hash=00;URI=spiffe://globex.test/ns/a/sa/b"
    cert = ident.pki.workload("acme-billing-2", ACME_WORKLOAD)
    with ident.mesh_client(cert) as client:
        response = _post(client, {"x-forwarded-client-cert": forged})

    assert response.status_code == 200, response.text
    assert response.headers["x-asc-provider"] == "emu-eu"  # acme, not the forged globex


def test_mtls_listener_refuses_a_client_without_certificate(ident: IdentityGateway) -> None:
    with ident.mesh_client(None) as client, pytest.raises(
            (httpx.ConnectError, httpx.ReadError, httpx.RemoteProtocolError)):
        _post(client)
    assert ident.gateway.emulator.requests() == []


@pytest.mark.parametrize("xfcc", [
    f"URI={ACME_WORKLOAD}",
    f"By=spiffe://gateway;Hash=abc;URI={ACME_WORKLOAD}",
    f'Hash=0;Subject="CN=x";URI={ACME_WORKLOAD};DNS=api',
])
def test_forged_xfcc_on_the_plain_listener_never_authenticates(ident: IdentityGateway,
                                                               xfcc: str) -> None:
    response = _post(ident.gateway.client, {"x-forwarded-client-cert": xfcc})

    assert response.status_code == 401
    assert response.json()["error"]["code"] == "invalid_api_key"
    assert ident.gateway.emulator.requests() == []


def test_forged_xfcc_beside_a_key_never_reaches_the_provider(ident: IdentityGateway) -> None:
    response = _post(ident.gateway.client, {"authorization": f"Bearer {ACME_KEY}",
                                            "x-forwarded-client-cert": f"URI={ACME_WORKLOAD}"})

    # A virtual key in `Authorization: Bearer` on a JWT listener is read by jwt_authn as
    # a (malformed) token: such keys go in x-api-key there (docs/tenancy.md).
    assert response.status_code == 401
    response = _post(ident.gateway.client, {"x-api-key": ACME_KEY,
                                            "x-forwarded-client-cert": f"URI={ACME_WORKLOAD}"})
    assert response.status_code == 200, response.text
    (seen,) = ident.gateway.emulator.requests()
    assert "x-forwarded-client-cert" not in seen["headers"]
    record = _finished(ident, response.headers["x-asc-request-id"])
    assert (record["identity_source"], record["team"]) == ("virtual_key", None)


def test_no_canary_in_identity_logs(identity: IdentityGateway) -> None:
    logs = identity.gateway.extproc.log_text() + identity.gateway.envoy.log_text()
    for canary in CANARIES:
        assert canary not in logs


# -- per route (filter_metadata.asc.identity) --------------------------------------------

def test_route_accepting_only_jwt_refuses_a_valid_key(ident: IdentityGateway) -> None:
    response = _post(ident.gateway.client, {"host": "jwt-only.test", "x-api-key": ACME_KEY})

    assert response.status_code == 401
    assert response.json()["error"]["message"] == (
        "Missing credentials: send a bearer JWT of the configured issuer.")
    token = ident.issuer.token(tenant="acme")
    ok = _post(ident.gateway.client, {"host": "jwt-only.test", **_bearer(token)})
    assert ok.status_code == 200, ok.text
    assert len(ident.gateway.emulator.requests()) == 1


def test_route_accepting_only_mesh(ident: IdentityGateway) -> None:
    refused = _post(ident.gateway.client, {"host": "mesh-only.test", "x-api-key": ACME_KEY})
    assert refused.status_code == 401
    assert refused.json()["error"]["message"] == (
        "Missing credentials: send a client certificate with a SPIFFE id (mTLS listener).")
    with ident.mesh_client(ident.pki.workload("acme-route", ACME_WORKLOAD)) as client:
        ok = _post(client, {"host": "mesh-only.test", "x-api-key": ACME_KEY})
    assert ok.status_code == 200, ok.text
    record = _finished(ident, ok.headers["x-asc-request-id"])
    assert (record["tenant"], record["identity_source"]) == ("acme", "mesh")
    assert len(ident.gateway.emulator.requests()) == 1
