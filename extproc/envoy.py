"""The only module that touches ext_proc protobufs.

`decode` turns a `ProcessingRequest` into a plain `Inbound`; `encode` turns the processor's
`Outbound` into the `ProcessingResponse` Envoy expects for that phase. Facts it relies on
(measured on Envoy 1.40, see docs/decisions/0001-envoy-behaviour-measured.md):

* a reply must always set the phase's own field, even when empty, or Envoy answers 500
  "Spurious response message";
* header values arrive in `raw_value`; mutations are sent in `raw_value` too;
* `OVERWRITE_IF_EXISTS_OR_ADD` replaces client headers instead of appending beside them;
* dynamic metadata is kept only for namespaces Envoy lists in `receiving_namespaces`;
* `request_attributes: [xds.route_metadata]` arrives with the request headers under the
  filter's canonical name, as the protobuf *text format* of the route's `Metadata` (an
  empty string for a route without metadata): see
  docs/decisions/0060-route-metadata-to-the-service.md.
"""

from __future__ import annotations

from typing import Any, Final

from envoy.config.core.v3 import base_pb2
from envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.type.v3 import http_status_pb2
from google.protobuf import json_format, text_format  # type: ignore[import-untyped]

from extproc.messages import (
    Body,
    BodyMode,
    Headers,
    Inbound,
    Metadata,
    Outbound,
    Phase,
    Respond,
    Trailers,
)

__all__ = ["JWT_NAMESPACE", "JWT_PAYLOAD_KEY", "METADATA_NAMESPACE", "MTLS_ATTRIBUTE",
           "PEER_URI_SAN_ATTRIBUTE", "RESPONSE_CODE_DETAILS_ATTRIBUTE",
           "ROUTE_METADATA_ATTRIBUTE", "SOURCE_ADDRESS_ATTRIBUTE", "STAGE_HEADER",
           "STAGE_UPSTREAM", "attempt_context", "decode", "encode", "struct_scalars"]

METADATA_NAMESPACE: Final = "asc"
ROUTE_METADATA_ATTRIBUTE: Final = "xds.route_metadata"
SOURCE_ADDRESS_ATTRIBUTE: Final = "source.address"
"""The downstream peer (ip:port) Envoy accepted the connection from: the audit's
`source_address` (docs/decisions/0081-audit-source-address.md)."""
RESPONSE_CODE_DETAILS_ATTRIBUTE: Final = "response.code_details"
"""Why the response headers are what they are: `via_upstream` when the provider sent them,
else Envoy's own reply (a refused connection, a reset, a timeout, a TLS failure)."""
_ATTRIBUTES_KEY: Final = "envoy.filters.http.ext_proc"
MTLS_ATTRIBUTE: Final = "connection.mtls"
PEER_URI_SAN_ATTRIBUTE: Final = "connection.uri_san_peer_certificate"
"""Computed by Envoy from the TLS connection (a bool and a string, measured): no header a
client sends can change them (docs/decisions/0100-identity-from-envoy-attributes.md)."""
JWT_NAMESPACE: Final = "envoy.filters.http.jwt_authn"
JWT_PAYLOAD_KEY: Final = "claims"
"""jwt_authn's `payload_in_metadata`: verified claims arrive as a Struct under this key
in the forwarded `envoy.filters.http.jwt_authn` namespace."""
STAGE_HEADER: Final = "x-asc-stage"
"""gRPC metadata the upstream (per-attempt) ext_proc sends; the router-level one does not."""
STAGE_UPSTREAM: Final = "upstream"

_OVERWRITE: Final = base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD
_MODES: Final = {
    BodyMode.NONE: processing_mode_pb2.ProcessingMode.NONE,
    BodyMode.BUFFERED: processing_mode_pb2.ProcessingMode.BUFFERED,
    BodyMode.STREAMED: processing_mode_pb2.ProcessingMode.STREAMED,
    BodyMode.BUFFERED_PARTIAL: processing_mode_pb2.ProcessingMode.BUFFERED_PARTIAL,
}


def _headers(message: pb.HttpHeaders) -> dict[str, str]:
    result: dict[str, str] = {}
    for header in message.headers.headers:
        value = header.raw_value.decode("utf-8", "replace") if header.raw_value else header.value
        key = header.key.lower()
        previous = result.get(key)
        result[key] = value if previous is None else f"{previous}, {value}"
    return result


def decode(request: pb.ProcessingRequest) -> Inbound:
    kind = request.WhichOneof("request")
    if kind == "request_headers":
        message = request.request_headers
        mtls, peer = _peer(request)
        return Headers(Phase.REQUEST_HEADERS, _headers(message), message.end_of_stream,
                       route_metadata=_route_metadata(request), mtls=mtls,
                       peer_uri_san=peer, jwt_claims=_jwt_claims(request),
                       source_address=_string_attribute(request, SOURCE_ADDRESS_ATTRIBUTE))
    if kind == "request_body":
        body = request.request_body
        return Body(Phase.REQUEST_BODY, body.body, body.end_of_stream)
    if kind == "response_headers":
        message = request.response_headers
        return Headers(Phase.RESPONSE_HEADERS, _headers(message), message.end_of_stream,
                       code_details=_string_attribute(request,
                                                      RESPONSE_CODE_DETAILS_ATTRIBUTE))
    if kind == "response_body":
        body = request.response_body
        return Body(Phase.RESPONSE_BODY, body.body, body.end_of_stream)
    if kind == "request_trailers":
        return Trailers(Phase.REQUEST_TRAILERS)
    if kind == "response_trailers":
        return Trailers(Phase.RESPONSE_TRAILERS)
    raise ValueError(f"unknown ext_proc request kind {kind!r}")


def attempt_context(request: pb.ProcessingRequest) -> dict[str, str]:
    """What the upstream (per-attempt) ext_proc needs beyond headers: the attempt's
    upstream address (a request attribute) and the router-level stream's `asc` metadata
    (forwarded by `metadata_options.forwarding_namespaces`). Strings only."""
    context: dict[str, str] = {}
    for attributes in request.attributes.values():
        for name, value in attributes.fields.items():
            if value.HasField("string_value"):
                context[name] = value.string_value
    namespace = request.metadata_context.filter_metadata.get(METADATA_NAMESPACE)
    if namespace is not None:
        for name, value in namespace.fields.items():
            if value.HasField("string_value"):
                context[f"{METADATA_NAMESPACE}.{name}"] = value.string_value
    return context


def struct_scalars(struct: Any) -> dict[str, object]:
    """A protobuf Struct's string, number and bool fields as a plain dict, without
    json_format's generic (slow) walk; other kinds are left out."""
    plain: dict[str, object] = {}
    fields = struct.fields
    # By key: the map's items() is collections.abc's generator over the same lookups.
    for name in fields:
        value = fields[name]
        text = value.string_value
        if text:
            # Only the member of a oneof that is set reads other than its default: most
            # fields are strings, and skip the WhichOneof call.
            plain[name] = text
            continue
        kind = value.WhichOneof("kind")
        if kind == "string_value":
            plain[name] = value.string_value
        elif kind == "number_value":
            plain[name] = value.number_value
        elif kind == "bool_value":
            plain[name] = value.bool_value
    return plain


def _peer(request: pb.ProcessingRequest) -> tuple[bool, str | None]:
    """`connection.mtls` and the peer's URI SAN, as Envoy computed them."""
    if _ATTRIBUTES_KEY not in request.attributes:
        return False, None
    attributes = request.attributes[_ATTRIBUTES_KEY].fields
    mtls = MTLS_ATTRIBUTE in attributes and attributes[MTLS_ATTRIBUTE].bool_value is True
    peer = None
    if PEER_URI_SAN_ATTRIBUTE in attributes:
        peer = attributes[PEER_URI_SAN_ATTRIBUTE].string_value or None
    return mtls, peer


def _jwt_claims(request: pb.ProcessingRequest) -> dict[str, object] | None:
    """The verified JWT payload jwt_authn wrote (`payload_in_metadata`), if any."""
    namespace = request.metadata_context.filter_metadata.get(JWT_NAMESPACE)
    if namespace is None or JWT_PAYLOAD_KEY not in namespace.fields:
        return None
    payload = namespace.fields[JWT_PAYLOAD_KEY]
    if not payload.HasField("struct_value"):
        return None
    claims: dict[str, object] = json_format.MessageToDict(payload.struct_value)
    return claims


def _string_attribute(request: pb.ProcessingRequest, name: str) -> str | None:
    if _ATTRIBUTES_KEY not in request.attributes:
        return None
    value = request.attributes[_ATTRIBUTES_KEY].fields.get(name)
    if value is None or not value.HasField("string_value"):
        return None
    return value.string_value or None


def _route_metadata(request: pb.ProcessingRequest) -> dict[str, object] | None:
    """The route's `filter_metadata.asc` as plain data, or None when it has none."""
    if _ATTRIBUTES_KEY not in request.attributes:
        return None
    attributes = request.attributes[_ATTRIBUTES_KEY].fields
    if ROUTE_METADATA_ATTRIBUTE not in attributes:
        return None
    text = attributes[ROUTE_METADATA_ATTRIBUTE].string_value
    if not text:
        return None
    metadata = text_format.Parse(text, base_pb2.Metadata())
    if METADATA_NAMESPACE not in metadata.filter_metadata:
        return None
    result: dict[str, object] = json_format.MessageToDict(
        metadata.filter_metadata[METADATA_NAMESPACE])
    return result


def _header_mutation(
    mutation: pb.HeaderMutation, set_headers: list[tuple[str, str]], remove: list[str]
) -> None:
    for key, value in set_headers:
        option = mutation.set_headers.add()
        option.header.key = key
        option.header.raw_value = value.encode()
        option.append_action = _OVERWRITE
    mutation.remove_headers.extend(remove)


def _metadata(response: pb.ProcessingResponse, metadata: Metadata) -> None:
    namespace = response.dynamic_metadata.fields[METADATA_NAMESPACE].struct_value
    namespace.update(metadata)


def encode(phase: Phase, reply: Outbound) -> pb.ProcessingResponse:
    response = pb.ProcessingResponse()
    if isinstance(reply, Respond):
        immediate = response.immediate_response
        immediate.status.code = http_status_pb2.StatusCode.Value(_STATUS_NAMES[reply.status])
        immediate.body = reply.body
        immediate.details = reply.details
        _header_mutation(immediate.headers, reply.headers, [])
        if reply.metadata:
            _metadata(response, reply.metadata)
        return response

    if phase is Phase.REQUEST_TRAILERS or phase is Phase.RESPONSE_TRAILERS:
        getattr(response, phase.value).SetInParent()
        return response
    target = getattr(response, phase.value)
    target.SetInParent()
    common = target.response
    if reply.set_headers or reply.remove_headers:
        _header_mutation(common.header_mutation, reply.set_headers, reply.remove_headers)
    if reply.body is not None:
        common.body_mutation.body = reply.body
    if reply.clear_route_cache:
        common.clear_route_cache = True
    if reply.request_body_mode is not None:
        response.mode_override.request_body_mode = _MODES[reply.request_body_mode]
    if reply.response_body_mode is not None:
        response.mode_override.response_body_mode = _MODES[reply.response_body_mode]
    if reply.metadata:
        _metadata(response, reply.metadata)
    return response


def _status_names() -> dict[int, str]:
    names: dict[int, str] = {}
    for value in http_status_pb2.StatusCode.DESCRIPTOR.values:
        if value.number:
            names[value.number] = value.name
    return names


_STATUS_NAMES: Final = _status_names()
