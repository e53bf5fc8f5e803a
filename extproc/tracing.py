"""OpenTelemetry spans per request, with GenAI semantic-convention attributes (optional).

Off unless asc.yaml has a `tracing:` section: then nothing is imported from OpenTelemetry,
no span is made and no `traceparent` goes to a provider (the client's own one is removed
with its other headers, as always). With it, each request gets one CLIENT span named
`chat <model>` (the gateway calls the provider on the client's behalf), a child of the
client's W3C `traceparent` when it sent one; the provider receives a `traceparent` naming
that span, so its own traces (if any) join the client's. Spans leave in batches through
the OTLP/HTTP exporter to `tracing.otlp_endpoint`, off the request path.

Attributes follow the GenAI conventions (`gen_ai.operation.name`, `gen_ai.provider.name`,
`gen_ai.request.model`, `gen_ai.response.model`, `gen_ai.usage.*`), plus `server.*`,
`http.response.status_code`, `error.type` and the gateway's own `asc.*` (tenant, region,
credential id@version, request id). Never a prompt, a completion or a key.

The SDK is the optional extra `tracing` (`pip install 'asc-extproc[tracing]'`); a config
with `tracing:` on an install without it fails at startup with a clear message.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Final

from extproc.config_schema import TracingSettings

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SpanExporter
    from opentelemetry.trace import Span, Tracer

__all__ = [
    "TRACE_HEADERS",
    "RequestSpan",
    "TracingUnavailable",
    "install",
    "request_attributes",
    "shutdown",
    "start_request_span",
]

TRACE_HEADERS: Final = ("traceparent", "tracestate")
"""W3C trace context headers: read from the client, written for the provider."""
_PROVIDER_NAMES: Final = {"openai": "openai", "openai_compatible": "openai",
                          "azure": "azure.ai.openai", "anthropic": "anthropic",
                          "mistral": "mistral_ai"}
"""`gen_ai.provider.name` (GenAI semconv well-known values) per provider kind."""

_installed: dict[TracingSettings, tuple[TracerProvider, Tracer]] = {}


class TracingUnavailable(RuntimeError):
    """`tracing:` is configured but the OpenTelemetry SDK is not installed."""


def install(settings: TracingSettings, exporter: SpanExporter | None = None,
            *, batch: bool = True) -> Tracer:
    """The tracer for `settings`, made once per process and settings (a reload with the
    same section keeps it). `exporter` replaces the OTLP one (tests); `batch=False`
    exports each span when it ends (tests)."""
    existing = _installed.get(settings)
    if existing is not None:
        return existing[1]
    try:
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor
        from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
    except ImportError:
        raise TracingUnavailable(
            "tracing is configured but OpenTelemetry is not installed: "
            "pip install 'asc-extproc[tracing]'") from None
    if exporter is None:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        exporter = OTLPSpanExporter(endpoint=settings.otlp_endpoint)
    provider = TracerProvider(
        resource=Resource.create({"service.name": settings.service_name}),
        sampler=ParentBased(TraceIdRatioBased(settings.sample_ratio)))
    provider.add_span_processor(BatchSpanProcessor(exporter) if batch
                                else SimpleSpanProcessor(exporter))
    tracer = provider.get_tracer("extproc")
    _installed[settings] = (provider, tracer)
    return tracer


def shutdown() -> None:
    """Export what is still batched (drain, tests); later requests make a new provider."""
    for provider, _ in _installed.values():
        provider.shutdown()
    _installed.clear()


class RequestSpan:
    """One request's span: started when its route is known (or at its end, for a request
    refused before), ended once by `end()`."""

    __slots__ = ("_span",)

    def __init__(self, span: Span) -> None:
        self._span = span

    def headers(self) -> list[tuple[str, str]]:
        """`traceparent` (and `tracestate`) for the provider request."""
        from opentelemetry.propagate import inject
        from opentelemetry.trace import set_span_in_context

        carrier: dict[str, str] = {}
        inject(carrier, context=set_span_in_context(self._span))
        return [(name, carrier[name]) for name in TRACE_HEADERS if name in carrier]

    def end(self, attributes: Mapping[str, str | int | bool], *, failed: bool) -> None:
        from opentelemetry.trace import Status, StatusCode

        self._span.set_attributes(dict(attributes))
        if failed:
            self._span.set_status(Status(StatusCode.ERROR))
        self._span.end()


def start_request_span(settings: TracingSettings, client_headers: Mapping[str, str],
                       model: str, *, age_s: float) -> RequestSpan:
    """A span for a request that began `age_s` ago, child of the client's trace context."""
    from opentelemetry.propagate import extract
    from opentelemetry.trace import SpanKind

    carrier = {name: client_headers[name] for name in TRACE_HEADERS if name in client_headers}
    span = install(settings).start_span(
        f"chat {model}" if model else "chat",
        context=extract(carrier) if carrier else None, kind=SpanKind.CLIENT,
        start_time=time.time_ns() - int(age_s * 1e9))
    return RequestSpan(span)


def request_attributes(*, request_id: str, tenant: str | None, model: str | None,
                       provider_kind: str | None, provider: str | None, region: str | None,
                       upstream_model: str | None, host: str | None, port: int | None,
                       status: int | None, error: str | None, input_tokens: int | None,
                       output_tokens: int | None, credential: str | None, stream: bool,
                       aborted: bool) -> dict[str, str | int | bool]:
    """A finished request's span attributes; what the request never had is left out."""
    values: dict[str, Any] = {
        "gen_ai.operation.name": "chat",
        "gen_ai.provider.name": (_PROVIDER_NAMES.get(provider_kind, provider_kind)
                                 if provider_kind else None),
        "gen_ai.request.model": model,
        "gen_ai.response.model": upstream_model,
        "gen_ai.usage.input_tokens": input_tokens,
        "gen_ai.usage.output_tokens": output_tokens,
        "server.address": host,
        "server.port": port,
        "http.response.status_code": status,
        "error.type": error or ("aborted" if aborted else None),
        "asc.request_id": request_id,
        "asc.tenant": tenant,
        "asc.provider": provider,
        "asc.region": region,
        "asc.credential": credential,
        "asc.stream": stream,
    }
    return {name: value for name, value in values.items() if value is not None}
