"""User-facing errors (`extproc.errors`) and the protobuf boundary (`extproc.envoy`)."""

from __future__ import annotations

import json
from typing import Any

import pytest
from envoy.config.core.v3 import base_pb2
from envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.type.v3 import http_status_pb2
from google.protobuf import struct_pb2

from extproc import envoy
from extproc.errors import Dialect, ErrorCode, GatewayError, error_body
from extproc.messages import (
    Body,
    BodyMode,
    Continue,
    Headers,
    Phase,
    Respond,
    Trailers,
)

OVERWRITE = base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD
MODE = processing_mode_pb2.ProcessingMode

# code -> (status, OpenAI error type, Anthropic error type)
ERROR_TABLE: dict[ErrorCode, tuple[int, str, str]] = {
    ErrorCode.INVALID_REQUEST: (400, "invalid_request_error", "invalid_request_error"),
    ErrorCode.UNAUTHENTICATED: (401, "authentication_error", "authentication_error"),
    ErrorCode.MODEL_NOT_ALLOWED: (403, "permission_error", "permission_error"),
    ErrorCode.FORBIDDEN: (403, "permission_error", "permission_error"),
    ErrorCode.NOT_FOUND: (404, "not_found_error", "not_found_error"),
    ErrorCode.MODEL_NOT_FOUND: (404, "not_found_error", "not_found_error"),
    ErrorCode.PAYLOAD_TOO_LARGE: (413, "invalid_request_error", "request_too_large"),
    ErrorCode.RATE_LIMITED: (429, "rate_limit_error", "rate_limit_error"),
    ErrorCode.PROVIDER_ERROR: (502, "upstream_error", "api_error"),
    ErrorCode.RESPONSE_TOO_LARGE: (502, "upstream_error", "api_error"),
    ErrorCode.UNAVAILABLE: (503, "service_unavailable", "overloaded_error"),
    ErrorCode.INTERNAL: (500, "server_error", "api_error"),
    ErrorCode.GUARDRAIL_DENIED: (403, "permission_error", "permission_error"),
    ErrorCode.GUARDRAIL_LIMIT: (400, "invalid_request_error", "invalid_request_error"),
}

CODE_VALUES = {
    ErrorCode.INVALID_REQUEST: "invalid_request",
    ErrorCode.UNAUTHENTICATED: "invalid_api_key",
    ErrorCode.MODEL_NOT_ALLOWED: "model_not_allowed",
    ErrorCode.FORBIDDEN: "permission_denied",
    ErrorCode.NOT_FOUND: "not_found",
    ErrorCode.MODEL_NOT_FOUND: "model_not_found",
    ErrorCode.PAYLOAD_TOO_LARGE: "payload_too_large",
    ErrorCode.RATE_LIMITED: "rate_limited",
    ErrorCode.PROVIDER_ERROR: "provider_error",
    ErrorCode.RESPONSE_TOO_LARGE: "response_too_large",
    ErrorCode.UNAVAILABLE: "gateway_unavailable",
    ErrorCode.INTERNAL: "internal_error",
    ErrorCode.GUARDRAIL_DENIED: "guardrail_denied",
    ErrorCode.GUARDRAIL_LIMIT: "guardrail_limit_exceeded",
}


# -- errors -----------------------------------------------------------------------------


def test_error_table_covers_every_code() -> None:
    assert set(ERROR_TABLE) == set(ErrorCode)
    assert set(CODE_VALUES) == set(ErrorCode)


@pytest.mark.parametrize("code", list(ErrorCode))
def test_error_code_status_and_bodies(code: ErrorCode) -> None:
    status, openai_type, anthropic_type = ERROR_TABLE[code]
    error = GatewayError(code, "Something \"quoted\" went wrong.", param="model")

    assert code.value == CODE_VALUES[code]
    assert code.status == status
    assert error.status == status
    assert json.loads(error_body(error, Dialect.OPENAI)) == {
        "error": {
            "message": "Something \"quoted\" went wrong.",
            "type": openai_type,
            "param": "model",
            "code": CODE_VALUES[code],
        }
    }
    assert json.loads(error_body(error, Dialect.ANTHROPIC)) == {
        "type": "error",
        "error": {"type": anthropic_type, "message": "Something \"quoted\" went wrong."},
    }


def test_error_body_exact_bytes() -> None:
    error = GatewayError(ErrorCode.UNAUTHENTICATED, "Invalid API key.")
    assert error_body(error, Dialect.OPENAI) == (
        b'{"error":{"message":"Invalid API key.","type":"authentication_error",'
        b'"param":null,"code":"invalid_api_key"}}'
    )
    assert error_body(error, Dialect.ANTHROPIC) == (
        b'{"type":"error","error":{"type":"authentication_error","message":"Invalid API key."}}'
    )


def test_gateway_error_attributes_and_repr() -> None:
    error = GatewayError(ErrorCode.RATE_LIMITED, "Slow down.", headers=(("retry-after", "3"),))
    assert str(error) == "Slow down."
    assert repr(error) == "GatewayError('rate_limited', 'Slow down.')"
    assert error.param is None
    assert error.headers == (("retry-after", "3"),)


# -- envoy.decode -----------------------------------------------------------------------


def header_map(*pairs: tuple[str, str], raw: bool = True) -> base_pb2.HeaderMap:
    values = [
        base_pb2.HeaderValue(key=key, raw_value=value.encode()) if raw
        else base_pb2.HeaderValue(key=key, value=value)
        for key, value in pairs
    ]
    return base_pb2.HeaderMap(headers=values)


@pytest.mark.parametrize("raw", [True, False], ids=["raw_value", "value"])
def test_decode_request_headers(raw: bool) -> None:
    request = pb.ProcessingRequest(request_headers=pb.HttpHeaders(
        headers=header_map(
            (":method", "POST"),
            (":path", "/v1/chat/completions"),
            ("Authorization", "Bearer sk-1"),
            ("X-Forwarded-For", "10.0.0.1"),
            ("x-forwarded-for", "10.0.0.2"),
            ("Accept", "application/json"),
            ("accept", "text/event-stream"),
            ("accept", "*/*"),
            ("x-caf\u00e9", "caf\u00e9"),
            raw=raw,
        ),
        end_of_stream=False,
    ))
    assert envoy.decode(request) == Headers(
        Phase.REQUEST_HEADERS,
        {
            ":method": "POST",
            ":path": "/v1/chat/completions",
            "authorization": "Bearer sk-1",
            "x-forwarded-for": "10.0.0.1, 10.0.0.2",
            "accept": "application/json, text/event-stream, */*",
            "x-caf\u00e9": "caf\u00e9",
        },
        False,
    )


def test_decode_raw_value_wins_over_value() -> None:
    header = base_pb2.HeaderValue(key="x-a", value="from-value", raw_value=b"from-raw")
    request = pb.ProcessingRequest(request_headers=pb.HttpHeaders(
        headers=base_pb2.HeaderMap(headers=[header])))
    assert envoy.decode(request) == Headers(Phase.REQUEST_HEADERS, {"x-a": "from-raw"}, False)


def test_decode_invalid_utf8_is_replaced() -> None:
    request = pb.ProcessingRequest(response_headers=pb.HttpHeaders(
        headers=base_pb2.HeaderMap(headers=[base_pb2.HeaderValue(key="x-b", raw_value=b"a\xffb")]),
        end_of_stream=True,
    ))
    assert envoy.decode(request) == Headers(Phase.RESPONSE_HEADERS, {"x-b": "a\ufffdb"}, True)


def test_decode_response_headers() -> None:
    request = pb.ProcessingRequest(response_headers=pb.HttpHeaders(
        headers=header_map((":status", "200"), ("Content-Type", "application/json")),
        end_of_stream=True,
    ))
    assert envoy.decode(request) == Headers(
        Phase.RESPONSE_HEADERS, {":status": "200", "content-type": "application/json"}, True)


@pytest.mark.parametrize("end_of_stream", [True, False])
def test_decode_bodies(end_of_stream: bool) -> None:
    request = pb.ProcessingRequest(request_body=pb.HttpBody(
        body=b'{"model":"m"}', end_of_stream=end_of_stream))
    assert envoy.decode(request) == Body(Phase.REQUEST_BODY, b'{"model":"m"}', end_of_stream)
    response = pb.ProcessingRequest(response_body=pb.HttpBody(
        body=b"data: x\n\n", end_of_stream=end_of_stream))
    assert envoy.decode(response) == Body(Phase.RESPONSE_BODY, b"data: x\n\n", end_of_stream)


def test_decode_empty_body() -> None:
    request = pb.ProcessingRequest(response_body=pb.HttpBody(end_of_stream=True))
    assert envoy.decode(request) == Body(Phase.RESPONSE_BODY, b"", True)


def test_decode_trailers() -> None:
    assert envoy.decode(pb.ProcessingRequest(request_trailers=pb.HttpTrailers())) == Trailers(
        Phase.REQUEST_TRAILERS)
    assert envoy.decode(pb.ProcessingRequest(response_trailers=pb.HttpTrailers())) == Trailers(
        Phase.RESPONSE_TRAILERS)


def test_decode_nothing_set() -> None:
    with pytest.raises(ValueError, match=r"^unknown ext_proc request kind None$"):
        envoy.decode(pb.ProcessingRequest())


# -- envoy.encode: Continue -------------------------------------------------------------


def set_option(key: str, value: str) -> base_pb2.HeaderValueOption:
    return base_pb2.HeaderValueOption(
        header=base_pb2.HeaderValue(key=key, raw_value=value.encode()), append_action=OVERWRITE)


def asc_metadata(**fields: object) -> Any:
    """The `dynamic_metadata` Struct holding `fields` under the `asc` namespace."""
    holder = pb.ProcessingResponse()
    holder.dynamic_metadata.fields["asc"].struct_value.update(fields)
    return holder.dynamic_metadata


HEADER_PHASES = [Phase.REQUEST_HEADERS, Phase.RESPONSE_HEADERS]
BODY_PHASES = [Phase.REQUEST_BODY, Phase.RESPONSE_BODY]


@pytest.mark.parametrize("phase", list(Phase))
def test_empty_continue_still_sets_the_phase_field(phase: Phase) -> None:
    response = envoy.encode(phase, Continue())
    assert response.WhichOneof("response") == phase.value
    assert response.HasField(phase.value)
    assert not response.HasField("mode_override")
    assert not response.HasField("dynamic_metadata")
    expected = {
        Phase.REQUEST_HEADERS: pb.ProcessingResponse(request_headers=pb.HeadersResponse()),
        Phase.RESPONSE_HEADERS: pb.ProcessingResponse(response_headers=pb.HeadersResponse()),
        Phase.REQUEST_BODY: pb.ProcessingResponse(request_body=pb.BodyResponse()),
        Phase.RESPONSE_BODY: pb.ProcessingResponse(response_body=pb.BodyResponse()),
        Phase.REQUEST_TRAILERS: pb.ProcessingResponse(request_trailers=pb.TrailersResponse()),
        Phase.RESPONSE_TRAILERS: pb.ProcessingResponse(response_trailers=pb.TrailersResponse()),
    }[phase]
    assert response == expected
    assert response.SerializeToString() != b""


def test_encode_request_headers_continue() -> None:
    reply = Continue(
        set_headers=[("x-asc-cluster", "prov_us"), ("authorization", "Bearer sk-p")],
        remove_headers=["x-api-key", "content-length"],
        request_body_mode=BodyMode.BUFFERED_PARTIAL,
    )
    response = envoy.encode(Phase.REQUEST_HEADERS, reply)
    assert response == pb.ProcessingResponse(
        request_headers=pb.HeadersResponse(response=pb.CommonResponse(
            header_mutation=pb.HeaderMutation(
                set_headers=[set_option("x-asc-cluster", "prov_us"),
                             set_option("authorization", "Bearer sk-p")],
                remove_headers=["x-api-key", "content-length"],
            ),
        )),
        mode_override=MODE(request_body_mode=MODE.BUFFERED_PARTIAL),
    )
    option = response.request_headers.response.header_mutation.set_headers[0]
    assert option.header.value == ""
    assert option.append_action == base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD


def test_encode_only_remove_headers() -> None:
    response = envoy.encode(Phase.REQUEST_HEADERS, Continue(remove_headers=["x-asc-debug"]))
    assert response == pb.ProcessingResponse(request_headers=pb.HeadersResponse(
        response=pb.CommonResponse(header_mutation=pb.HeaderMutation(
            remove_headers=["x-asc-debug"]))))


def test_encode_request_body_continue_with_everything() -> None:
    reply = Continue(
        set_headers=[(":path", "/openai/v1/chat/completions"), ("content-length", "12")],
        body=b'{"model":"x"}',
        clear_route_cache=True,
        metadata={"request_id": "r1", "tenant": "acme", "tokens": 7, "ratio": 0.5,
                  "stream": True},
    )
    response = envoy.encode(Phase.REQUEST_BODY, reply)
    assert response == pb.ProcessingResponse(
        request_body=pb.BodyResponse(response=pb.CommonResponse(
            header_mutation=pb.HeaderMutation(set_headers=[
                set_option(":path", "/openai/v1/chat/completions"),
                set_option("content-length", "12"),
            ]),
            body_mutation=pb.BodyMutation(body=b'{"model":"x"}'),
            clear_route_cache=True,
        )),
        dynamic_metadata=asc_metadata(request_id="r1", tenant="acme", tokens=7, ratio=0.5,
                                      stream=True),
    )
    assert list(response.dynamic_metadata.fields) == ["asc"]
    asc = response.dynamic_metadata.fields["asc"].struct_value
    assert asc.fields["tenant"].string_value == "acme"
    assert asc.fields["tokens"].number_value == 7.0
    assert asc.fields["stream"].bool_value is True


def test_encode_empty_body_replacement_is_kept() -> None:
    """`body=b""` replaces the body with nothing; only `None` means 'unchanged'."""
    response = envoy.encode(Phase.RESPONSE_BODY, Continue(body=b""))
    assert response.response_body.response.HasField("body_mutation")
    assert response.response_body.response.body_mutation.WhichOneof("mutation") == "body"


@pytest.mark.parametrize(
    ("mode", "wire"),
    [
        (BodyMode.NONE, MODE.NONE),
        (BodyMode.BUFFERED, MODE.BUFFERED),
        (BodyMode.STREAMED, MODE.STREAMED),
        (BodyMode.BUFFERED_PARTIAL, MODE.BUFFERED_PARTIAL),
    ],
)
def test_encode_mode_overrides(mode: BodyMode, wire: int) -> None:
    request_side = envoy.encode(Phase.REQUEST_HEADERS, Continue(request_body_mode=mode))
    assert request_side.HasField("mode_override")
    assert request_side.mode_override == MODE(request_body_mode=wire)
    response_side = envoy.encode(Phase.RESPONSE_HEADERS, Continue(response_body_mode=mode))
    assert response_side.mode_override == MODE(response_body_mode=wire)
    assert response_side.HasField("response_headers")


def test_encode_response_headers_tags() -> None:
    reply = Continue(set_headers=[("x-asc-request-id", "r1"), ("x-asc-provider", "p")],
                     response_body_mode=BodyMode.STREAMED)
    assert envoy.encode(Phase.RESPONSE_HEADERS, reply) == pb.ProcessingResponse(
        response_headers=pb.HeadersResponse(response=pb.CommonResponse(
            header_mutation=pb.HeaderMutation(set_headers=[
                set_option("x-asc-request-id", "r1"), set_option("x-asc-provider", "p")]),
        )),
        mode_override=MODE(response_body_mode=MODE.STREAMED),
    )


@pytest.mark.parametrize("phase", [Phase.REQUEST_TRAILERS, Phase.RESPONSE_TRAILERS])
def test_encode_trailers_ignore_mutations(phase: Phase) -> None:
    response = envoy.encode(phase, Continue(set_headers=[("x", "y")], metadata={"a": 1}))
    assert response.WhichOneof("response") == phase.value
    assert response.ListFields()[0][0].name == phase.value
    assert len(response.ListFields()) == 1


# -- envoy.encode: Respond --------------------------------------------------------------


def test_encode_respond() -> None:
    body = b'{"error":{"message":"m"}}'
    reply = Respond(
        status=502,
        body=body,
        headers=[("content-type", "application/json"), ("x-asc-request-id", "r1")],
        details="asc_provider_error",
        metadata={"request_id": "r1", "error": "provider_error"},
    )
    for phase in (Phase.REQUEST_HEADERS, Phase.RESPONSE_HEADERS):
        response = envoy.encode(phase, reply)
        assert response == pb.ProcessingResponse(
            immediate_response=pb.ImmediateResponse(
                status=http_status_pb2.HttpStatus(code=http_status_pb2.BadGateway),
                headers=pb.HeaderMutation(set_headers=[
                    set_option("content-type", "application/json"),
                    set_option("x-asc-request-id", "r1"),
                ]),
                body=body,
                details="asc_provider_error",
            ),
            dynamic_metadata=asc_metadata(request_id="r1", error="provider_error"),
        )
        assert response.WhichOneof("response") == "immediate_response"
        assert response.immediate_response.status.code == 502


@pytest.mark.parametrize("status", [400, 401, 403, 404, 413, 429, 500, 502, 503, 504])
def test_encode_respond_status_enum(status: int) -> None:
    response = envoy.encode(Phase.REQUEST_BODY, Respond(status=status, body=b""))
    assert response.immediate_response.status.code == status
    assert not response.HasField("dynamic_metadata")
    assert response.immediate_response.headers == pb.HeaderMutation()
    assert response.immediate_response.body == b""


def test_encode_headers_reply_that_clears_the_route_cache() -> None:
    """The request-headers reply re-routes without the client's x-asc-* headers."""
    response = envoy.encode(Phase.REQUEST_HEADERS, Continue(
        remove_headers=["x-asc-cluster"], request_body_mode=BodyMode.BUFFERED,
        clear_route_cache=True))
    assert response == pb.ProcessingResponse(
        request_headers=pb.HeadersResponse(response=pb.CommonResponse(
            header_mutation=pb.HeaderMutation(remove_headers=["x-asc-cluster"]),
            clear_route_cache=True)),
        mode_override=processing_mode_pb2.ProcessingMode(
            request_body_mode=processing_mode_pb2.ProcessingMode.BUFFERED))


def test_encode_refusal_of_request_trailers_is_an_immediate_response() -> None:
    reply = Respond(status=400, body=b'{"error":{}}', details="asc_invalid_request")
    response = envoy.encode(Phase.REQUEST_TRAILERS, reply)
    assert response.WhichOneof("response") == "immediate_response"
    assert response.immediate_response.status.code == 400
    assert response.immediate_response.details == "asc_invalid_request"


def test_struct_scalars_keeps_strings_numbers_and_bools_of_any_value() -> None:
    struct = struct_pb2.Struct()
    struct.update({"text": "acme", "empty": "", "zero": 0.0, "count": 3.5, "no": False,
                   "yes": True, "nothing": None, "list": [1, "a"], "nested": {"a": "b"}})

    assert envoy.struct_scalars(struct) == {"text": "acme", "empty": "", "zero": 0.0,
                                            "count": 3.5, "no": False, "yes": True}
    assert envoy.struct_scalars(struct_pb2.Struct()) == {}
