"""Tracing on a real Envoy: the OTLP/HTTP exporter sends the request's span to a collector
(a local receiver on a free loopback port that decodes the protobuf export), and the
provider (the emulator) receives a `traceparent` naming that span in the client's trace."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.trace.v1.trace_pb2 import Span

from extproc.devstack import Stack
from tests.conftest import Emulator, Gateway, chat_body, gateway_config, start_gateway
from tests.polling import wait_for

CLIENT_TRACE = "0af7651916cd43dd8448eb211c80319c"
CLIENT_SPAN = "b7ad6b7169203331"


class Collector:
    """An OTLP/HTTP traces endpoint that keeps every span it is sent."""

    def __init__(self) -> None:
        self.spans: list[Span] = []
        self.paths: list[str] = []
        collector = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["content-length"]))
                export = ExportTraceServiceRequest()
                export.ParseFromString(body)
                collector.paths.append(self.path)
                for resource in export.resource_spans:
                    for scope in resource.scope_spans:
                        collector.spans.extend(scope.spans)
                self.send_response(200)
                self.send_header("content-type", "application/x-protobuf")
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *_: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


@pytest.fixture
def collector() -> Iterator[Collector]:
    running = Collector()
    yield running
    running.server.shutdown()
    running.server.server_close()


def attributes(span: Span) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for attribute in span.attributes:
        kind = attribute.value.WhichOneof("value")
        values[attribute.key] = getattr(attribute.value, kind)
    return values


def test_the_span_reaches_the_collector_and_the_provider_gets_its_traceparent(
        stack: Stack, collector: Collector) -> None:
    def traced(emulator_port: int) -> dict[str, Any]:
        document = gateway_config(emulator_port)
        document["tracing"] = {"otlp_endpoint":
                               f"http://127.0.0.1:{collector.port}/v1/traces",
                               "service_name": "asc-e2e"}
        return document

    stack.env["OTEL_BSP_SCHEDULE_DELAY"] = "100"  # export within 0.1 s, not 5 s
    gateway = start_gateway(stack, stack.workdir / "config", document=traced)
    answer = gateway.chat(chat_body(), headers={
        "traceparent": f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01"})
    assert answer.status_code == 200, answer.text
    usage = answer.json()["usage"]

    assert wait_for(lambda: len(collector.spans) == 1, timeout=15)
    [span] = collector.spans
    assert collector.paths == ["/v1/traces"]
    assert span.trace_id.hex() == CLIENT_TRACE
    assert span.parent_span_id.hex() == CLIENT_SPAN
    assert span.name == "chat gpt-4o-mini"
    assert span.kind == Span.SpanKind.SPAN_KIND_CLIENT
    assert attributes(span) == {
        "gen_ai.operation.name": "chat",
        "gen_ai.provider.name": "openai",
        "gen_ai.request.model": "gpt-4o-mini",
        "gen_ai.response.model": "gpt-4o-mini-eu",
        "gen_ai.usage.input_tokens": usage["prompt_tokens"],
        "gen_ai.usage.output_tokens": usage["completion_tokens"],
        "server.address": "127.0.0.1",
        "server.port": gateway.emulator.port,
        "http.response.status_code": 200,
        "asc.request_id": answer.headers["x-asc-request-id"],
        "asc.tenant": "acme",
        "asc.provider": "emu-eu",
        "asc.region": "eu-west-1",
        "asc.credential": "emu-eu-1@1",
        "asc.stream": False,
    }
    [sent] = gateway.emulator.requests()
    assert sent["headers"]["traceparent"] == f"00-{CLIENT_TRACE}-{span.span_id.hex()}-01"


def test_without_tracing_the_provider_gets_no_traceparent(gateway: Gateway,
                                                          emulator_clean: Emulator) -> None:
    """No `tracing:` (the shared test config): nothing is added, and the client's own trace
    context is removed with its other headers."""
    answer = gateway.chat(chat_body(), headers={
        "traceparent": f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01", "tracestate": "vendor=1"})
    assert answer.status_code == 200, answer.text
    [sent] = emulator_clean.requests()
    assert "traceparent" not in sent["headers"]
    assert "tracestate" not in sent["headers"]
