"""Request spans (`extproc.tracing`) through the processor: GenAI attributes, the client's
trace context, the `traceparent` the provider gets, and nothing at all without `tracing:`.

The OpenTelemetry SDK's in-memory exporter stands in for the OTLP one (each span is
exported when it ends); tests/e2e/test_tracing.py runs the real exporter.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from extproc import tracing
from extproc.config import parse_config
from extproc.config_schema import TracingSettings
from extproc.messages import Continue, Respond
from extproc.runtime import Runtime
from tests.unit.test_phases import (
    CONFIG,
    ENVIRON,
    STREAM_CHUNK,
    STREAM_DONE,
    chat,
    make_processor,
    request_body,
    request_headers,
    response_body,
    response_headers,
)

ENDPOINT = "http://127.0.0.1:4318/v1/traces"
CLIENT_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CLIENT_SPAN = "00f067aa0ba902b7"
CLIENT_PARENT = f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01"


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    tracing.install(TracingSettings(otlp_endpoint=ENDPOINT), exporter, batch=False)
    yield exporter
    tracing.shutdown()


def traced_runtime() -> Runtime:
    text = CONFIG.replace("credentials:\n", f'tracing: {{otlp_endpoint: "{ENDPOINT}"}}\n'
                          "credentials:\n", 1)
    return Runtime.build(parse_config(text), environ=ENVIRON)


def header(reply: Continue, name: str) -> str | None:
    return next((value for key, value in reply.set_headers if key == name), None)


async def test_a_streamed_request_is_one_client_span_child_of_the_clients_trace(
    spans: InMemorySpanExporter,
) -> None:
    processor = make_processor(traced_runtime())
    await processor.handle(request_headers(extra={"traceparent": CLIENT_PARENT,
                                                  "tracestate": "vendor=1"}))
    reply = await processor.handle(request_body(chat(stream=True)))
    assert isinstance(reply, Continue)
    await processor.handle(response_headers("200", "text/event-stream"))
    await processor.handle(response_body(
        STREAM_CHUNK + b'data: {"choices":[],"usage":{"prompt_tokens":9,'
        b'"completion_tokens":21}}\n\n' + STREAM_DONE, end_of_stream=True))
    await processor.finish()

    [span] = spans.get_finished_spans()
    context = span.get_span_context()
    assert span.name == "chat gpt-4o-mini"
    assert span.kind is SpanKind.CLIENT
    assert format(context.trace_id, "032x") == CLIENT_TRACE
    assert span.parent is not None
    assert format(span.parent.span_id, "016x") == CLIENT_SPAN
    # The provider gets a traceparent naming the gateway's span, in the client's trace.
    assert header(reply, "traceparent") == (
        f"00-{CLIENT_TRACE}-{format(context.span_id, '016x')}-01")
    assert header(reply, "tracestate") == "vendor=1"
    assert dict(span.attributes or {}) == {
        "gen_ai.operation.name": "chat",
        "gen_ai.provider.name": "openai",
        "gen_ai.request.model": "gpt-4o-mini",
        "gen_ai.response.model": "gpt-4o-mini",
        "gen_ai.usage.input_tokens": 9,
        "gen_ai.usage.output_tokens": 21,
        "server.address": "127.0.0.1",
        "server.port": 18080,
        "http.response.status_code": 200,
        "asc.request_id": processor.request_id,
        "asc.tenant": "acme",
        "asc.provider": "prov-us",
        "asc.region": "us-east-1",
        "asc.credential": "cred-us@1",
        "asc.stream": True,
    }
    assert span.status.status_code is StatusCode.UNSET


async def test_a_request_without_client_trace_starts_one(
    spans: InMemorySpanExporter,
) -> None:
    processor = make_processor(traced_runtime())
    await processor.handle(request_headers())
    reply = await processor.handle(request_body(chat()))
    assert isinstance(reply, Continue)
    await processor.handle(response_headers("502"))
    await processor.handle(response_body(b'{"error":{"message":"down"}}', end_of_stream=True))
    await processor.finish()
    [span] = spans.get_finished_spans()
    assert span.parent is None
    context = span.get_span_context()
    assert header(reply, "traceparent") == (
        f"00-{format(context.trace_id, '032x')}-{format(context.span_id, '016x')}"
        f"-{format(context.trace_flags, '02x')}")
    assert context.trace_flags.sampled
    assert header(reply, "tracestate") is None
    assert span.status.status_code is StatusCode.ERROR
    assert (span.attributes or {})["error.type"] == "provider_error"


async def test_a_refused_request_gets_a_span_without_provider_attributes(
    spans: InMemorySpanExporter,
) -> None:
    processor = make_processor(traced_runtime())
    reply = await processor.handle(request_headers(None))
    assert isinstance(reply, Respond)
    await processor.finish()
    [span] = spans.get_finished_spans()
    assert span.name == "chat"
    assert dict(span.attributes or {}) == {
        "gen_ai.operation.name": "chat", "http.response.status_code": 401,
        "error.type": "invalid_api_key", "asc.request_id": processor.request_id,
        "asc.stream": False}
    assert span.status.status_code is StatusCode.UNSET


async def test_without_tracing_nothing_is_traced_and_no_traceparent_is_sent(
    spans: InMemorySpanExporter,
) -> None:
    processor = make_processor()  # the test config has no `tracing:`
    await processor.handle(request_headers(extra={"traceparent": CLIENT_PARENT}))
    reply = await processor.handle(request_body(chat()))
    assert isinstance(reply, Continue)
    await processor.handle(response_headers("200"))
    await processor.handle(response_body(b'{"usage":{"prompt_tokens":1,"completion_tokens":1}}',
                                         end_of_stream=True))
    await processor.finish()
    assert header(reply, "traceparent") is None
    # The client's own one does not reach the provider either.
    assert "traceparent" in reply.remove_headers
    assert spans.get_finished_spans() == ()


def test_tracing_settings_refuse_a_bad_endpoint() -> None:
    text = CONFIG.replace("credentials:\n", 'tracing: {otlp_endpoint: "ftp://collector"}\n'
                          "credentials:\n", 1)
    with pytest.raises(Exception, match=r"tracing.otlp_endpoint.*not an http\(s\) URL"):
        parse_config(text)
