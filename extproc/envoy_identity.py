"""The Envoy pieces of each identity source, added to the rendered bootstrap on request
(`extproc envoy render --identity jwt,mesh`).

* **jwt** - Envoy's `jwt_authn` filter before the ext_proc filter: it verifies the token
  in `Authorization: Bearer` against a local JWKS file (signature, `exp`/`nbf`, issuer,
  audiences), answers 401/403 itself when one is wrong, removes the token, and writes the
  verified claims into dynamic metadata (`payload_in_metadata`). The ext_proc filter
  forwards that namespace to the service (`metadata_options.forwarding_namespaces`). A
  request without a token passes (`allow_missing`) so that the service can accept another
  source or answer 401 in the client's dialect.
* **mesh** - a second listener with mTLS (client certificate required, signed by the
  mesh CA, with a SPIFFE URI SAN), `forward_client_cert_details: SANITIZE_SET`; the plain
  listener is explicitly `SANITIZE` (a client's XFCC is removed). The service reads the
  peer's SPIFFE id from the attributes Envoy computes from the TLS connection
  (`connection.mtls`, `connection.uri_san_peer_certificate`), never from a header
  (docs/decisions/0100-identity-from-envoy-attributes.md).

Both listeners share one route table and filter chain; a route's
`filter_metadata.asc.identity` narrows which sources it accepts.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final

from envoy.extensions.filters.http.jwt_authn.v3 import config_pb2  # noqa: F401 - @type
from envoy.extensions.transport_sockets.tls.v3 import tls_pb2  # noqa: F401 - @type

from extproc.config import GatewayConfig, JwtIdentity
from extproc.envoy import JWT_NAMESPACE, JWT_PAYLOAD_KEY, MTLS_ATTRIBUTE, PEER_URI_SAN_ATTRIBUTE

__all__ = [
    "IDENTITY_CHOICES",
    "IdentityEnvoy",
    "IdentityOptionError",
    "MeshListener",
    "apply_identity",
    "identity_options",
    "jwt_authn_filter",
]

IDENTITY_CHOICES: Final = ("jwt", "mesh")
JWT_PROVIDER: Final = "asc"
MESH_LISTENER: Final = "asc_ingress_mtls"
_INGRESS: Final = "asc_ingress"
_EXT_PROC_NAME: Final = "asc.ext_proc"
_JWT_AUTHN: Final = (
    "type.googleapis.com/envoy.extensions.filters.http.jwt_authn.v3.JwtAuthentication")
_DOWNSTREAM_TLS: Final = (
    "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext")


class IdentityOptionError(ValueError):
    """The identity option asks for something the config or the arguments lack."""


@dataclass(frozen=True, slots=True)
class MeshListener:
    """The mTLS listener: its port, the server certificate, and the CA that signs the
    mesh workloads' client certificates."""

    port: int
    cert_chain: str
    private_key: str
    client_ca: str
    address: str = "127.0.0.1"


@dataclass(frozen=True, slots=True)
class IdentityEnvoy:
    jwt: JwtIdentity | None = None
    mesh: MeshListener | None = None


def identity_options(config: GatewayConfig, sources: Sequence[str],
                     mesh: MeshListener | None = None) -> IdentityEnvoy:
    """Check an `--identity` list against the config and the mesh listener arguments."""
    unknown = [name for name in sources if name not in IDENTITY_CHOICES]
    if unknown:
        raise IdentityOptionError(f"unknown identity source(s) {', '.join(unknown)}; "
                                  f"choose from {', '.join(IDENTITY_CHOICES)}")
    jwt = None
    if "jwt" in sources:
        jwt = config.identity.jwt
        if jwt is None:
            raise IdentityOptionError("--identity jwt needs `identity.jwt` (issuer, "
                                      "audiences, jwks_file) in the config")
    if "mesh" in sources and mesh is None:
        raise IdentityOptionError("--identity mesh needs --mesh-port, --mesh-cert, "
                                  "--mesh-key and --mesh-client-ca")
    return IdentityEnvoy(jwt=jwt, mesh=mesh if "mesh" in sources else None)


def jwt_authn_filter(jwt: JwtIdentity) -> dict[str, Any]:
    """Verifies `Authorization: Bearer <jwt>` only (no query parameter); a missing token
    passes, a present one must be valid: 401 (bad signature, expired, unknown issuer,
    malformed) or 403 (audience), answered by Envoy as JSON (local_reply_config)."""
    return {
        "name": "envoy.filters.http.jwt_authn",
        "typed_config": {
            "@type": _JWT_AUTHN,
            "providers": {JWT_PROVIDER: {
                "issuer": jwt.issuer,
                "audiences": list(jwt.audiences),
                "local_jwks": {"filename": str(jwt.jwks_file)},
                "from_headers": [{"name": "authorization", "value_prefix": "Bearer "}],
                "forward": False,
                "payload_in_metadata": JWT_PAYLOAD_KEY,
            }},
            "rules": [{"match": {"prefix": "/"}, "requires": {"requires_any": {
                "requirements": [{"provider_name": JWT_PROVIDER}, {"allow_missing": {}}],
            }}}],
        },
    }


def _hcm(listener: dict[str, Any]) -> dict[str, Any]:
    config: dict[str, Any] = listener["filter_chains"][0]["filters"][0]["typed_config"]
    return config


def _mesh_listener(plain: dict[str, Any], mesh: MeshListener) -> dict[str, Any]:
    listener = copy.deepcopy(plain)
    listener["name"] = MESH_LISTENER
    listener["address"] = {"socket_address": {"address": mesh.address,
                                              "port_value": mesh.port}}
    chain = listener["filter_chains"][0]
    chain["transport_socket"] = {
        "name": "envoy.transport_sockets.tls",
        "typed_config": {
            "@type": _DOWNSTREAM_TLS,
            "require_client_certificate": True,
            "common_tls_context": {
                "tls_certificates": [{
                    "certificate_chain": {"filename": mesh.cert_chain},
                    "private_key": {"filename": mesh.private_key},
                }],
                "validation_context": {
                    "trusted_ca": {"filename": mesh.client_ca},
                    # Only workload certificates: one with a SPIFFE id.
                    "match_typed_subject_alt_names": [
                        {"san_type": "URI", "matcher": {"prefix": "spiffe://"}}],
                },
            },
        },
    }
    hcm = _hcm(listener)
    hcm["stat_prefix"] = "asc_mtls"
    hcm["forward_client_cert_details"] = "SANITIZE_SET"
    hcm["set_current_client_cert_details"] = {"uri": True}
    return listener


def apply_identity(bootstrap: dict[str, Any], identity: IdentityEnvoy) -> None:
    """Add the identity pieces to a rendered bootstrap, in place."""
    listeners: list[dict[str, Any]] = bootstrap["static_resources"]["listeners"]
    plain = next(listener for listener in listeners if listener["name"] == _INGRESS)
    hcm = _hcm(plain)
    # The default, made explicit: a client's XFCC never passes the plain listener.
    hcm["forward_client_cert_details"] = "SANITIZE"
    filters: list[dict[str, Any]] = hcm["http_filters"]
    ext_proc = next(f for f in filters if f["name"] == _EXT_PROC_NAME)["typed_config"]
    if identity.jwt is not None:
        filters.insert(filters.index(next(f for f in filters if f["name"] == _EXT_PROC_NAME)),
                       jwt_authn_filter(identity.jwt))
        forwarding = ext_proc.setdefault("metadata_options", {}).setdefault(
            "forwarding_namespaces", {}).setdefault("untyped", [])
        forwarding.append(JWT_NAMESPACE)
    if identity.mesh is not None:
        ext_proc.setdefault("request_attributes", []).extend(
            [MTLS_ATTRIBUTE, PEER_URI_SAN_ATTRIBUTE])
        listeners.append(_mesh_listener(plain, identity.mesh))
