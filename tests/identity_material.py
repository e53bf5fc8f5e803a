"""Identity material made by the tests: a mesh CA with workload certificates (SPIFFE URI
SANs), and a JWT issuer with its local JWKS file. Nothing is fetched; keys live in tmp."""

from __future__ import annotations

import copy
import datetime
import ipaddress
import json
import ssl
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import jwt
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID
from jwt.algorithms import RSAAlgorithm

from extproc.config import load_config
from extproc.devstack import Stack, free_port, wait_for_port
from extproc.envoy_identity import MeshListener, apply_identity, identity_options
from tests.conftest import Gateway, gateway_config, start_gateway

ISSUER = "https://idp.asc.test"
AUDIENCE = "asc-gateway"


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


@dataclass
class MeshPki:
    """A CA, Envoy's server certificate (127.0.0.1) and client certificates on demand."""

    directory: Path
    name: str = "mesh"
    _key: ec.EllipticCurvePrivateKey = field(init=False)
    _cert: x509.Certificate = field(init=False)

    def __post_init__(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        self._key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"{self.name} test CA")])
        now = datetime.datetime.now(datetime.UTC)
        self._cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
                      .public_key(self._key.public_key())
                      .serial_number(x509.random_serial_number())
                      .not_valid_before(now - datetime.timedelta(hours=1))
                      .not_valid_after(now + datetime.timedelta(days=1))
                      .add_extension(x509.BasicConstraints(ca=True, path_length=None),
                                     critical=True)
                      .sign(self._key, hashes.SHA256()))
        self.ca = self.directory / f"{self.name}-ca.crt"
        self.ca.write_bytes(self._cert.public_bytes(serialization.Encoding.PEM))
        self.server_cert, self.server_key = self.issue(
            "envoy", [x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                      x509.DNSName("localhost")])

    def issue(self, label: str, sans: list[x509.GeneralName]) -> tuple[Path, Path]:
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        cert = (x509.CertificateBuilder()
                .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, label)]))
                .issuer_name(self._cert.subject).public_key(key.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(hours=1))
                .not_valid_after(now + datetime.timedelta(days=1))
                .add_extension(x509.SubjectAlternativeName(sans), critical=False)
                .sign(self._key, hashes.SHA256()))
        cert_path = self.directory / f"{self.name}-{label}.crt"
        key_path = self.directory / f"{self.name}-{label}.key"
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        key_path.write_bytes(_pem_key(key))
        return cert_path, key_path

    def workload(self, label: str, spiffe_id: str) -> tuple[str, str]:
        """A client certificate whose URI SAN is `spiffe_id` (httpx's `cert=`)."""
        cert, key = self.issue(label, [x509.UniformResourceIdentifier(spiffe_id)])
        return str(cert), str(key)


@dataclass
class JwtIssuer:
    """An RS256 issuer: its JWKS file for Envoy, and tokens minted on demand."""

    directory: Path
    issuer: str = ISSUER
    kid: str = "test-key-1"
    _key: rsa.RSAPrivateKey = field(init=False)

    def __post_init__(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        self._key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        public: dict[str, Any] = json.loads(RSAAlgorithm.to_jwk(self._key.public_key()))
        public.update(kid=self.kid, alg="RS256", use="sig")
        self.jwks_file = self.directory / "jwks.json"
        self.jwks_file.write_text(json.dumps({"keys": [public]}), encoding="utf-8")

    def token(self, *, lifetime_s: int = 600, signing_key: rsa.RSAPrivateKey | None = None,
              **claims: Any) -> str:
        """A token with iss, aud, sub and exp set (override any; None removes one)."""
        payload: dict[str, Any] = {"iss": self.issuer, "aud": AUDIENCE, "sub": "alice",
                                   "exp": int(time.time()) + lifetime_s}
        payload.update(claims)
        payload = {name: value for name, value in payload.items() if value is not None}
        return jwt.encode(payload, signing_key or self._key, algorithm="RS256",
                          headers={"kid": self.kid})


# --- a gateway with every identity source on ----------------------------------------------

ACME_WORKLOAD = "spiffe://acme.test/ns/billing/sa/api"
GLOBEX_TRUST_DOMAIN = "spiffe://globex.test/"


def identity_config(emulator_port: int, jwks_file: Path) -> dict[str, Any]:
    """`gateway_config` plus: JWT and mesh sources, an acme team `billing` (its workload),
    and every globex workload by trust-domain prefix."""
    document = gateway_config(emulator_port)
    document["identity"] = {
        "sources": ["mesh", "jwt", "virtual_key"],
        "jwt": {"issuer": ISSUER, "audiences": [AUDIENCE], "jwks_file": str(jwks_file),
                "tenant_claim": "tenant", "team_claim": "team"},
    }
    acme = document["tenants"]["acme"]
    acme["teams"] = {"billing": {}}
    acme["mesh_identities"] = [{"spiffe": ACME_WORKLOAD, "team": "billing"}]
    document["tenants"]["globex"]["mesh_identities"] = [
        {"spiffe": GLOBEX_TRUST_DOMAIN, "match": "prefix"}]
    return document


ROUTE_SOURCES = {"jwt-only.test": ["jwt"], "mesh-only.test": ["mesh"]}
"""Virtual hosts whose route accepts only these identity sources (route metadata)."""


def add_identity_routes(bootstrap: dict[str, Any]) -> None:
    """One virtual host per `ROUTE_SOURCES` entry, its route a copy of the catch-all one
    with `filter_metadata.asc.identity` (before the mTLS listener copies the routes)."""
    (listener,) = bootstrap["static_resources"]["listeners"]
    route_config = listener["filter_chains"][0]["filters"][0]["typed_config"]["route_config"]
    (catch_all,) = route_config["virtual_hosts"]
    for domain, sources in ROUTE_SOURCES.items():
        host = copy.deepcopy(catch_all)
        host["name"], host["domains"] = domain, [domain]
        for route in host["routes"]:
            route["metadata"] = {"filter_metadata": {"asc": {"identity": sources}}}
        route_config["virtual_hosts"].insert(0, host)


@dataclass
class IdentityGateway:
    gateway: Gateway
    pki: MeshPki
    issuer: JwtIssuer
    mesh_port: int

    def mesh_client(self, cert: tuple[str, str] | None) -> httpx.Client:
        context = ssl.create_default_context(cafile=str(self.pki.ca))
        if cert is not None:
            context.load_cert_chain(*cert)
        return httpx.Client(base_url=f"https://127.0.0.1:{self.mesh_port}", verify=context,
                            timeout=15)


def start_identity_gateway(stack: Stack, workdir: Path) -> IdentityGateway:
    """Emulator, extproc and Envoy rendered with `--identity jwt,mesh`."""
    pki = MeshPki(workdir / "pki")
    issuer = JwtIssuer(workdir / "jwt")
    mesh_port = free_port()
    mesh = MeshListener(port=mesh_port, cert_chain=str(pki.server_cert),
                        private_key=str(pki.server_key), client_ca=str(pki.ca))

    def add_identity(bootstrap: dict[str, Any]) -> None:
        config = load_config(workdir / "config" / "asc.yaml")
        add_identity_routes(bootstrap)
        apply_identity(bootstrap, identity_options(config, ["jwt", "mesh"], mesh))

    gateway = start_gateway(stack, workdir / "config",
                            document=lambda port: identity_config(port, issuer.jwks_file),
                            edit_bootstrap=add_identity)
    wait_for_port(mesh_port, process=gateway.envoy)
    return IdentityGateway(gateway=gateway, pki=pki, issuer=issuer, mesh_port=mesh_port)
