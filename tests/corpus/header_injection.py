"""Header-injection corpus: requests whose extra headers claim another tenant, team,
cluster, credential, route or cache, in every spelling a client can send.

`cases()` yields `(name, headers)`: `headers` is a list of raw `(name, value)` pairs (order
and duplicates kept, values may hold any bytes a client can put on the wire) to send
*beside* a valid credential of the victim-side tenant. A gateway passes when no case
changes the resolved tenant (or team, cluster, credential) and no injected header reaches
the provider; a case may also be refused outright (Envoy drops a malformed header's
connection).
Reusable by any suite: the names are stable, the list is deterministic.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Final

__all__ = ["CLAIM_HEADERS", "OTHER_TENANT", "REFUSED_BY_ENVOY", "cases", "injected_names"]

OTHER_TENANT: Final = "globex"
OTHER_WORKLOAD: Final = "spiffe://globex.test/ns/prod/sa/api"

CLAIM_HEADERS: Final = (
    # the gateway's own namespace (every x-asc-* header is the gateway's to set)
    "x-asc-tenant", "x-asc-team", "x-asc-principal", "x-asc-subject", "x-asc-cluster",
    "x-asc-provider", "x-asc-region", "x-asc-credential", "x-asc-byok", "x-asc-route",
    "x-asc-pin", "x-asc-zone", "x-asc-cache-key", "x-asc-stage", "x-asc-request-id",
    # what other gateways and apps call a tenant
    "x-tenant", "x-tenant-id", "tenant", "x-org-id", "x-team", "x-app-id",
    # identity headers a proxy would set
    "x-forwarded-client-cert", "x-jwt-payload", "x-jwt-claims", "x-forwarded-user",
)
_VALUES: Final = {
    "plain": OTHER_TENANT,
    "upper": OTHER_TENANT.upper(),
    "padded": f"   {OTHER_TENANT}   ",
    "tab": f"\t{OTHER_TENANT}\t",
    "list-after": f"acme, {OTHER_TENANT}",
    "list-before": f"{OTHER_TENANT}, acme",
    "greek-omicron": "gl\u03bfbex",
    "cyrillic-e": "glob\u0435x",
    "fullwidth": "\uff47\uff4c\uff4f\uff42\uff45\uff58",
    "zero-width": "glo\u200bbex",
    "cluster": "emu_us",
    "spiffe": OTHER_WORKLOAD,
}
_NAME_FORMS: Final = {
    "lower": str.lower,
    "upper": str.upper,
    "title": lambda name: "-".join(part.capitalize() for part in name.split("-")),
}
_LOOKALIKE_NAMES: Final = {
    "cyrillic-a": "x-\u0430sc-tenant",
    "fullwidth-x": "\uff58-asc-tenant",
    "dotless-i": "x-asc-\u0131dentity",
}
REFUSED_BY_ENVOY: Final = frozenset({
    # Envoy 1.40's HTTP/1 codec closes the connection, without an answer, on a header
    # name outside RFC 9110 tchar and on a bare LF or a NUL inside a value (measured). A
    # bare CR and an obs-fold continuation are accepted as part of the value, and stripped
    # with the header like any other case.
    *(f"lookalike-name/{label}" for label in _LOOKALIKE_NAMES),
    "crlf/bare-lf-in-value", "crlf/nul-in-value",
})
"""Cases that never reach the gateway: Envoy drops the connection before any filter."""


def cases() -> Iterator[tuple[str, list[tuple[str, str]]]]:
    """Every case once, in a stable order (at least 200)."""
    for header in CLAIM_HEADERS:
        for form, spell in _NAME_FORMS.items():
            yield f"name-case/{header}/{form}", [(spell(header), OTHER_TENANT)]
        for label, value in _VALUES.items():
            yield f"value/{header}/{label}", [(header, value)]
        yield f"duplicate/{header}", [(header, "acme"), (header, OTHER_TENANT)]
    for label, name in _LOOKALIKE_NAMES.items():
        yield f"lookalike-name/{label}", [(name, OTHER_TENANT)]
    yield from _crlf()
    yield from _forged_identity()


def _crlf() -> Iterator[tuple[str, list[tuple[str, str]]]]:
    # A CRLF in a value is a header line of its own on the wire: the split is visible to
    # Envoy as a second header, which is then stripped like any other x-asc-* header.
    yield "crlf/split-into-x-asc-tenant", [("x-note", f"hi\r\nx-asc-tenant: {OTHER_TENANT}")]
    yield "crlf/split-into-x-asc-cluster", [("x-note", "hi\r\nx-asc-cluster: emu_us")]
    yield "crlf/split-into-xfcc", [("x-note", f"hi\r\nx-forwarded-client-cert: "
                                              f"URI={OTHER_WORKLOAD}")]
    yield "crlf/bare-lf-in-value", [("x-asc-tenant", f"acme\n{OTHER_TENANT}")]
    yield "crlf/bare-cr-in-value", [("x-asc-tenant", f"acme\r{OTHER_TENANT}")]
    yield "crlf/nul-in-value", [("x-asc-tenant", f"acme\x00{OTHER_TENANT}")]
    yield "crlf/obs-fold", [("x-asc-tenant", f"acme\r\n {OTHER_TENANT}")]
    yield "crlf/percent-encoded", [("x-asc-tenant", "acme%0d%0ax-asc-cluster:%20emu_us")]


def _forged_identity() -> Iterator[tuple[str, list[tuple[str, str]]]]:
    xfcc = {
        "uri-only": f"URI={OTHER_WORKLOAD}",
        "by-hash-uri": f"By=spiffe://gateway;Hash=00ff;URI={OTHER_WORKLOAD}",
        "two-elements": f"URI=spiffe://acme.test/ns/billing/sa/api,URI={OTHER_WORKLOAD}",
        "quoted-subject": f'Hash=1;Subject="CN=globex,O=globex";URI={OTHER_WORKLOAD}',
        "dns": "Hash=2;DNS=api.globex.test",
    }
    for label, value in xfcc.items():
        yield f"forged-xfcc/{label}", [("x-forwarded-client-cert", value)]
    claims = ('{"iss":"https://idp.asc.test","aud":"asc-gateway","sub":"mallory",'
              f'"tenant":"{OTHER_TENANT}","team":"billing"}}')
    for header in ("x-jwt-payload", "x-jwt-claims", "x-asc-jwt", "jwt-payload",
                   "x-envoy-jwt-payload"):
        yield f"forged-jwt-payload/{header}", [(header, claims)]


def injected_names(headers: list[tuple[str, str]]) -> set[str]:
    """The lower-case header names a case puts on the wire, CRLF splits included."""
    names = set()
    for name, value in headers:
        names.add(name.lower())
        for line in value.split("\r\n")[1:]:
            split_name, colon, _ = line.partition(":")
            if colon and not split_name.startswith((" ", "\t")):
                names.add(split_name.strip().lower())
    return names
