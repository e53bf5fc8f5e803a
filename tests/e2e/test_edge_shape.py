"""The edge shape against a real TLS provider endpoint: an Envoy rendered by
`extproc envoy render --shape edge` reaches a provider over TLS with SNI, checks its
certificate against `--trusted-ca`, speaks HTTP/2 to it, and refuses downstream
connections above its overload-manager limit.

The "provider" is a second Envoy that terminates TLS (h2 and http/1.1 by ALPN) with a
certificate for `localhost` from a CA made here, in front of the emulator."""

from __future__ import annotations

import datetime
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from extproc.cli import main as extproc_cli
from extproc.devstack import ManagedProcess, Stack, free_port
from extproc.emulator.app import key_fingerprint
from tests.conftest import (
    ACME_KEY,
    CHAT,
    PROVIDER_KEY_EU,
    PROVIDER_KEY_US,
    Emulator,
    chat_body,
    envoy_admin,
    gateway_config,
    json_lines,
    only_json_line,
    provider_env,
    write_config,
)
from tests.polling import wait_for

_TLS_DOWNSTREAM = (
    "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext")
_HCM = ("type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3"
        ".HttpConnectionManager")
_ROUTER = "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
_TLS_INSPECTOR = (
    "type.googleapis.com/envoy.extensions.filters.listener.tls_inspector.v3.TlsInspector")
_STDOUT_LOG = "type.googleapis.com/envoy.extensions.access_loggers.stream.v3.StdoutAccessLog"


@dataclass(frozen=True)
class Pki:
    ca: Path
    other_ca: Path
    """A CA that did not sign the provider's certificate."""
    cert: Path
    key: Path


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _ca(common_name: str) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(_name(common_name))
            .issuer_name(_name(common_name)).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(
                digital_signature=True, key_cert_sign=True, crl_sign=True,
                content_commitment=False, key_encipherment=False, data_encipherment=False,
                key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
            .sign(key, hashes.SHA256()))
    return key, cert


def make_pki(directory: Path) -> Pki:
    ca_key, ca_cert = _ca("asc test CA")
    _, other_cert = _ca("asc other CA")
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(_name("localhost"))
            .issuer_name(ca_cert.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))
    pem = serialization.Encoding.PEM
    pki = Pki(ca=directory / "ca.pem", other_ca=directory / "other-ca.pem",
              cert=directory / "provider.pem", key=directory / "provider.key")
    pki.ca.write_bytes(ca_cert.public_bytes(pem))
    pki.other_ca.write_bytes(other_cert.public_bytes(pem))
    pki.cert.write_bytes(cert.public_bytes(pem))
    pki.key.write_bytes(key.private_bytes(pem, serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))
    pki.key.chmod(0o600)
    return pki


def tls_provider_bootstrap(pki: Pki, port: int, emulator_port: int,
                           admin_socket: Path) -> dict[str, Any]:
    """An Envoy that plays a provider's TLS front: h2 or http/1.1 by ALPN."""
    return {
        "admin": {"address": {"pipe": {"path": str(admin_socket), "mode": 0o600}}},
        "static_resources": {
            "listeners": [{
                "name": "provider_tls",
                "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}},
                # Records the SNI the client sent (%REQUESTED_SERVER_NAME%).
                "listener_filters": [{"name": "envoy.filters.listener.tls_inspector",
                                      "typed_config": {"@type": _TLS_INSPECTOR}}],
                "filter_chains": [{
                    "transport_socket": {"name": "envoy.transport_sockets.tls", "typed_config": {
                        "@type": _TLS_DOWNSTREAM,
                        "common_tls_context": {
                            "alpn_protocols": ["h2", "http/1.1"],
                            "tls_certificates": [{
                                "certificate_chain": {"filename": str(pki.cert)},
                                "private_key": {"filename": str(pki.key)},
                            }],
                        },
                    }},
                    "filters": [{"name": "envoy.filters.network.http_connection_manager",
                                 "typed_config": {
                        "@type": _HCM, "stat_prefix": "provider", "codec_type": "AUTO",
                        "access_log": [{"name": "envoy.access_loggers.stdout", "typed_config": {
                            "@type": _STDOUT_LOG, "log_format": {"json_format": {
                                "protocol": "%PROTOCOL%", "sni": "%REQUESTED_SERVER_NAME%",
                                "path": "%REQ(:PATH)%", "status": "%RESPONSE_CODE%"}}}}],
                        "route_config": {"virtual_hosts": [{
                            "name": "provider", "domains": ["*"],
                            "routes": [{"match": {"prefix": "/"},
                                        "route": {"cluster": "emulator"}}]}]},
                        "http_filters": [{"name": "envoy.filters.http.router",
                                          "typed_config": {"@type": _ROUTER}}],
                    }}],
                }],
            }],
            "clusters": [{
                "name": "emulator", "type": "STATIC", "connect_timeout": "1s",
                "load_assignment": {"cluster_name": "emulator", "endpoints": [{"lb_endpoints": [
                    {"endpoint": {"address": {"socket_address": {
                        "address": "127.0.0.1", "port_value": emulator_port}}}}]}]},
            }],
        },
    }


@dataclass
class Edge:
    stack: Stack
    emulator: Emulator
    provider: ManagedProcess
    extproc: ManagedProcess
    config_path: Path
    extproc_port: int
    pki: Pki

    def start_envoy(self, name: str, *options: str) -> tuple[int, ManagedProcess]:
        """An edge Envoy rendered by the CLI with `options`: its listen port and process."""
        listen_port = free_port()
        admin_socket = self.stack.admin_socket(name)
        output = self.stack.workdir / f"{name}-rendered.yaml"
        assert extproc_cli([
            "envoy", "render", "--shape", "edge", "--config", str(self.config_path),
            "--listen-address", "127.0.0.1", "--listen-port", str(listen_port),
            "--admin-socket", str(admin_socket), "--extproc-port", str(self.extproc_port),
            *options, "--output", str(output)]) == 0
        envoy = self.stack.start_envoy(output.read_text(encoding="utf-8"),
                                       listen_port=listen_port, admin_socket=admin_socket,
                                       name=name)
        return listen_port, envoy


def provider_log(edge: Edge) -> list[dict[str, Any]]:
    return json_lines(edge.provider)


@pytest.fixture
def edge(stack: Stack) -> Edge:
    pki = make_pki(stack.workdir)
    emulator_process, emulator_port = stack.start_emulator([PROVIDER_KEY_EU, PROVIDER_KEY_US])
    tls_port = free_port()
    provider_admin = stack.admin_socket("provider")
    provider = stack.start_envoy(
        yaml.safe_dump(tls_provider_bootstrap(pki, tls_port, emulator_port, provider_admin)),
        listen_port=tls_port, admin_socket=provider_admin, name="provider")
    document = gateway_config(emulator_port)
    for spec in document["providers"].values():
        spec["base_url"] = f"https://localhost:{tls_port}"
    config_path = write_config(stack.workdir / "config", document)
    extproc, extproc_port, _ = stack.start_extproc(config_path,
                                                   env=dict(stack.env, **provider_env()))
    return Edge(stack=stack, emulator=Emulator(emulator_port, emulator_process),
                provider=provider, extproc=extproc, config_path=config_path,
                extproc_port=extproc_port, pki=pki)


def _chat(port: int) -> httpx.Response:
    return httpx.post(f"http://127.0.0.1:{port}{CHAT}", json=chat_body(), timeout=15,
                      headers={"authorization": f"Bearer {ACME_KEY}"})


def test_edge_speaks_http2_over_verified_tls_to_the_provider(edge: Edge) -> None:
    port, _ = edge.start_envoy("edge", "--trusted-ca", str(edge.pki.ca))

    response = _chat(port)

    assert response.status_code == 200, response.text
    assert response.json()["model"] == "gpt-4o-mini-eu"
    assert response.headers["x-asc-provider"] == "emu-eu"
    [seen] = edge.emulator.requests()
    assert seen["headers"]["authorization"] == "Bearer " + key_fingerprint(PROVIDER_KEY_EU)
    assert wait_for(lambda: len(provider_log(edge)) == 1)
    [line] = provider_log(edge)
    assert (line["protocol"], line["sni"], line["path"], line["status"]) == (
        "HTTP/2", "localhost", CHAT, 200)


def test_edge_refuses_a_provider_certificate_from_another_ca(edge: Edge) -> None:
    port, envoy = edge.start_envoy("edge-other-ca", "--trusted-ca", str(edge.pki.other_ca))

    response = _chat(port)

    # Envoy's own 503 (no TLS connection; the provider sent nothing) reaches the client
    # as local_reply_config made it, in the client's dialect (decision 0140).
    assert response.status_code == 503
    assert response.headers["content-type"] == "application/json"
    assert edge.emulator.requests() == []
    assert provider_log(edge) == []
    line = only_json_line(envoy)
    assert (line["flags"], line["upstream_cluster"]) == ("UF", "emu_eu")
    assert line["details"].startswith(
        "upstream_reset_before_response_started{remote_connection_failure"), line["details"]
    assert "CERTIFICATE_VERIFY_FAILED" in line["details"]
    # The verify failure is the operator's to read, not the client's (decision 0141).
    assert response.json() == {"error": {
        "message": "The gateway or the provider is unavailable.", "type": "gateway_error",
        "param": None, "code": "gateway_unavailable"}}
    stats = envoy_admin(edge.stack.admin_socket("edge-other-ca"), "GET",
                        "/stats?filter=^cluster\\.emu_eu\\.ssl\\.fail_verify_error$").text
    assert stats.strip() == "cluster.emu_eu.ssl.fail_verify_error: 1"


def _listener_stat(edge: Edge, name: str, port: int, stat: str) -> str:
    text = envoy_admin(edge.stack.admin_socket(name), "GET",
                       f"/stats?filter=^listener\\.127\\.0\\.0\\.1_{port}\\.{stat}$").text
    return text.strip().rpartition(": ")[2]


def _answers(connection: socket.socket) -> bytes:
    """The first bytes of Envoy's answer to a request; b'' when it closed or reset."""
    connection.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    try:
        return connection.recv(9)
    except ConnectionResetError:
        return b""


def test_edge_refuses_connections_above_its_limit(edge: Edge) -> None:
    port, _ = edge.start_envoy("edge-limited", "--trusted-ca", str(edge.pki.ca),
                               "--max-downstream-connections", "2")
    # The start-up probe's connection must be gone before counting.
    assert wait_for(lambda: _listener_stat(edge, "edge-limited", port,
                                           "downstream_cx_active") == "0")
    held = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(2)]
    try:
        assert [_answers(connection) for connection in held] == [b"HTTP/1.1 "] * 2
        with socket.create_connection(("127.0.0.1", port), timeout=5) as third:
            assert _answers(third) == b""
        assert _listener_stat(edge, "edge-limited", port, "downstream_global_cx_overflow") == "1"
    finally:
        for connection in held:
            connection.close()
    # Below the limit again, requests flow.
    assert wait_for(lambda: _chat(port).status_code == 200, timeout=10)
