"""Tenant isolation through a real Envoy: the header-injection corpus
(tests/corpus/header_injection.py, 400+ cases) sent beside acme's valid key, and its
identity cases beside a workload certificate and a JWT of acme. No case may change the
resolved tenant, team, principal, route, cluster or provider key, and no injected header
may reach the provider; the cases Envoy's codec refuses never get an answer."""

from __future__ import annotations

import contextlib
import http.client
import json
import socket
import ssl
from collections.abc import Iterator
from typing import Any

import pytest

from extproc.devstack import Stack
from tests.conftest import (
    ACME_KEY,
    CANARIES,
    CHAT,
    PROVIDER_KEY_EU,
    Gateway,
    chat_body,
    provider_fingerprint,
)
from tests.corpus.header_injection import REFUSED_BY_ENVOY, cases, injected_names
from tests.identity_material import (
    ACME_WORKLOAD,
    ISSUER,
    IdentityGateway,
    start_identity_gateway,
)
from tests.polling import wait_for

pytestmark = pytest.mark.timeout(240)

CASES = list(cases())
BODY = json.dumps(chat_body()).encode()


@pytest.fixture(scope="module")
def identity(tmp_path_factory: pytest.TempPathFactory) -> Iterator[IdentityGateway]:
    workdir = tmp_path_factory.mktemp("isolation")
    with Stack(workdir / "stack") as stack:
        yield start_identity_gateway(stack, workdir)


def send_raw(port: int, extra: list[tuple[str, str]], *,
             credential: tuple[str, str] | None = ("x-api-key", ACME_KEY),
             tls: ssl.SSLContext | None = None) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 request with the headers exactly as given (any bytes, any order),
    after `credential`; with `tls`, over a TLS connection (the mTLS listener)."""
    lines = [f"POST {CHAT} HTTP/1.1", "host: gateway.test", "content-type: application/json",
             f"content-length: {len(BODY)}", "connection: close"]
    if credential is not None:
        lines.append(f"{credential[0]}: {credential[1]}")
    lines += [f"{name}: {value}" for name, value in extra]
    raw = ("\r\n".join(lines) + "\r\n\r\n").encode() + BODY
    with contextlib.ExitStack() as stack:
        sock = stack.enter_context(socket.create_connection(("127.0.0.1", port), timeout=15))
        if tls is not None:
            sock = stack.enter_context(tls.wrap_socket(sock, server_hostname="127.0.0.1"))
        sock.sendall(raw)
        response = http.client.HTTPResponse(sock)
        try:
            response.begin()
        except http.client.RemoteDisconnected:
            return 0, {}, b""  # closed without an answer
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()


def provider_saw(gateway: Gateway) -> list[dict[str, Any]]:
    """What the emulator received since the last call (then forgotten: the list stays
    short over hundreds of cases)."""
    seen = gateway.emulator.requests()
    gateway.emulator.client.delete("/_emulator/requests")
    return seen


def _records(text: str, key: str) -> dict[str, dict[str, Any]]:
    found = {}
    for line in text.splitlines():
        if line.startswith("{") and key in line:
            record = json.loads(line)
            if record.get("request_id"):
                found[record["request_id"]] = record
    return found


def test_corpus_is_large_and_named_uniquely() -> None:
    names = [name for name, _ in CASES]
    assert len(names) >= 200
    assert len(set(names)) == len(names)
    assert set(names) >= REFUSED_BY_ENVOY


def test_no_injected_header_changes_the_tenant_or_reaches_the_provider(
        identity: IdentityGateway) -> None:
    gateway = identity.gateway
    gateway.emulator.clear()
    served: dict[str, str] = {}  # request id -> case
    wrong: list[str] = []
    for name, extra in CASES:
        status, headers, body = send_raw(gateway.listen_port, extra)
        seen = provider_saw(gateway)
        if name in REFUSED_BY_ENVOY:
            if status != 0 or seen:
                wrong.append(f"{name}: expected Envoy to close the connection, got "
                             f"{status}, provider saw {len(seen)}")
            continue
        if status != 200 or len(seen) != 1:
            wrong.append(f"{name}: status {status}, provider saw {len(seen)}: {body[:200]!r}")
            continue
        if headers.get("x-asc-provider") != "emu-eu":  # acme's zone; globex is emu-us
            wrong.append(f"{name}: served by {headers.get('x-asc-provider')}")
        upstream = seen[0]["headers"]
        if upstream.get("authorization") != f"Bearer {provider_fingerprint(PROVIDER_KEY_EU)}":
            wrong.append(f"{name}: provider got another key")
        leaked = injected_names(extra) & set(upstream)
        if leaked:
            wrong.append(f"{name}: provider received {sorted(leaked)}")
        served[headers["x-asc-request-id"]] = name
    assert wrong == [], "\n".join(wrong)
    assert len(served) == len(CASES) - len(REFUSED_BY_ENVOY)

    # The service's record and Envoy's access log agree: acme, no team, acme's cluster.
    def all_logged() -> bool:
        return (set(served) <= set(_records(gateway.extproc.log_text(), "request finished"))
                and set(served) <= set(_records(gateway.envoy.log_text(), "upstream_cluster")))

    assert wait_for(all_logged, timeout=20)
    finished = _records(gateway.extproc.log_text(), "request finished")
    access = _records(gateway.envoy.log_text(), "upstream_cluster")
    for request_id, name in served.items():
        record = finished[request_id]
        assert (record["tenant"], record["identity_source"], record["subject"],
                record["team"]) == ("acme", "virtual_key", "acme-main", None), name
        assert (access[request_id]["tenant"], access[request_id]["upstream_cluster"]) == (
            "acme", "emu_eu"), name


IDENTITY_PREFIXES = ("forged-xfcc/", "forged-jwt-payload/", "crlf/split-", "duplicate/",
                 "value/x-asc-tenant/", "value/x-forwarded-client-cert/", "value/x-asc-team/")
IDENTITY_CASES = [(name, extra) for name, extra in CASES
                  if name.startswith(IDENTITY_PREFIXES)]


@pytest.mark.parametrize("source", ["mesh", "jwt"])
def test_injections_beside_a_workload_or_a_jwt_keep_that_identity(
        identity: IdentityGateway, source: str) -> None:
    """The corpus' identity cases beside acme's billing workload certificate (mTLS
    listener) or a JWT of acme's billing team: still that principal, whatever XFCC, JWT
    payload or x-asc-* header comes with it."""
    gateway = identity.gateway
    gateway.emulator.clear()
    tls = None
    credential = None
    port = gateway.listen_port
    expected = ("acme", "jwt", f"{ISSUER}#bob", "billing")
    if source == "mesh":
        tls = ssl.create_default_context(cafile=str(identity.pki.ca))
        tls.load_cert_chain(*identity.pki.workload("acme-corpus", ACME_WORKLOAD))
        port = identity.mesh_port
        expected = ("acme", "mesh", ACME_WORKLOAD, "billing")
    else:
        token = identity.issuer.token(tenant="acme", team="billing", sub="bob")
        credential = ("authorization", f"Bearer {token}")
    assert len(IDENTITY_CASES) >= 60
    served: dict[str, str] = {}
    wrong = []
    for name, extra in IDENTITY_CASES:
        status, headers, body = send_raw(port, extra, credential=credential, tls=tls)
        seen = provider_saw(gateway)
        if status != 200 or len(seen) != 1 or headers.get("x-asc-provider") != "emu-eu":
            wrong.append(f"{name}: status {status}, provider saw {len(seen)}: {body[:200]!r}")
            continue
        leaked = injected_names(extra) & set(seen[0]["headers"])
        if leaked:
            wrong.append(f"{name}: provider received {sorted(leaked)}")
        served[headers["x-asc-request-id"]] = name
    assert wrong == [], "\n".join(wrong)

    def all_logged() -> bool:
        return set(served) <= set(_records(gateway.extproc.log_text(), "request finished"))

    assert wait_for(all_logged, timeout=20)
    finished = _records(gateway.extproc.log_text(), "request finished")
    for request_id, name in served.items():
        record = finished[request_id]
        assert (record["tenant"], record["identity_source"], record["subject"],
                record["team"]) == expected, name


def test_no_canary_after_the_corpus(identity: IdentityGateway) -> None:
    logs = identity.gateway.extproc.log_text() + identity.gateway.envoy.log_text()
    for canary in CANARIES:
        assert canary not in logs
