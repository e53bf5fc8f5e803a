"""The request metrics a `RequestProcessor` records, and the tenant label cardinality guard.

Driven with plain messages through the processor of tests/unit/test_phases.py on a fake
clock, so every latency is exact. The registry is process-wide: each test reads the
change of the series it touches, never absolute values.
"""

from __future__ import annotations

import dataclasses
import logging
from datetime import UTC, datetime
from typing import Any

import pytest
from prometheus_client import REGISTRY

from extproc.budgets.guard import Hold
from extproc.budgets.policy import CounterGroup
from extproc.config import OTHER_TENANT_LABEL, MetricsConfig, parse_config
from extproc.errors import ErrorCode, GatewayError
from extproc.failover import Flight
from extproc.messages import Continue, Respond
from extproc.request_metrics import fallback_reason, observe_fallbacks
from extproc.runtime import Runtime
from tests.unit.test_phases import (
    CONFIG,
    ENVIRON,
    STREAM_CHUNK,
    STREAM_DONE,
    FakeClock,
    RecordingGuard,
    budget_runtime,
    chat,
    make_processor,
    request_body,
    request_headers,
    response_body,
    response_headers,
)

US = {"provider": "prov-us", "region": "us-east-1", "model": "gpt-4o-mini"}
EU_PINNED = {"tenant": "pinned", "provider": "prov-eu", "region": "eu-west-1",
             "model": "gpt-4o-mini"}


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


class Delta:
    """The change of some samples between its creation and `of()`."""

    def __init__(self, *series: tuple[str, dict[str, str]]) -> None:
        self._series = series
        self._before = [sample(name, **labels) for name, labels in series]

    def of(self) -> list[float]:
        return [sample(name, **labels) - before
                for (name, labels), before in zip(self._series, self._before, strict=True)]


def runtime_with(metrics_section: str) -> Runtime:
    text = CONFIG.replace("credentials:\n", f"{metrics_section}\ncredentials:\n", 1)
    return Runtime.build(parse_config(text), environ=ENVIRON)


# -- the cardinality guard ----------------------------------------------------------------


def test_only_the_first_n_tenants_in_file_order_are_labelled() -> None:
    config = runtime_with("metrics: {max_tenant_labels: 2}").config
    # CONFIG lists acme, euco, pinned, azco.
    assert config.metrics == MetricsConfig(max_tenant_labels=2,
                                           labelled_tenants=frozenset({"acme", "euco"}))
    assert [config.metrics.tenant_label(t) for t in ("acme", "euco", "pinned", "azco")] == [
        "acme", "euco", OTHER_TENANT_LABEL, OTHER_TENANT_LABEL]
    # A tenant the config does not know (removed by a reload) is never a label either.
    assert config.metrics.tenant_label("gone") == OTHER_TENANT_LABEL


def test_default_labels_up_to_100_tenants_and_zero_labels_none() -> None:
    default = runtime_with("").config.metrics
    assert default.max_tenant_labels == 100
    assert default.labelled_tenants == frozenset({"acme", "euco", "pinned", "azco"})
    none = runtime_with("metrics: {max_tenant_labels: 0}").config.metrics
    assert none.tenant_label("acme") == OTHER_TENANT_LABEL


async def test_a_tenant_past_the_cap_is_counted_as_other() -> None:
    processor = make_processor(runtime_with("metrics: {max_tenant_labels: 1}"))
    delta = Delta(("asc_requests_total", {**EU_PINNED, "tenant": "other", "status": "200"}),
                  ("asc_requests_total", {**EU_PINNED, "status": "200"}))
    await processor.handle(request_headers("pinned"))
    await processor.handle(request_body(chat()))
    await processor.handle(response_headers("200"))
    await processor.handle(response_body(b'{"usage":{"prompt_tokens":3,"completion_tokens":4}}',
                                         end_of_stream=True))
    await processor.finish()
    assert delta.of() == [1.0, 0.0]


# -- latency and tokens -------------------------------------------------------------------


async def test_stream_records_ttft_time_per_output_token_and_tokens() -> None:
    clock = FakeClock(100.0)
    processor = make_processor(clock=clock)
    labels = {"tenant": "acme", **US}
    delta = Delta(
        ("gen_ai_server_time_to_first_token_seconds_sum", labels),
        ("gen_ai_server_time_per_output_token_seconds_sum", labels),
        ("gen_ai_server_time_per_output_token_seconds_count", labels),
        ("gen_ai_server_request_duration_seconds_sum", labels),
        ("gen_ai_client_token_usage_total", {**labels, "token_type": "input"}),
        ("gen_ai_client_token_usage_total", {**labels, "token_type": "output"}),
        ("asc_requests_total", {**labels, "status": "200"}),
    )
    await processor.handle(request_headers())
    await processor.handle(request_body(chat(stream=True)))
    await processor.handle(response_headers("200", "text/event-stream"))
    clock.now = 100.5  # first chunk: TTFT 0.5 s
    await processor.handle(response_body(STREAM_CHUNK, end_of_stream=False))
    clock.now = 102.5
    await processor.handle(response_body(
        b'data: {"choices":[],"usage":{"prompt_tokens":9,"completion_tokens":21}}\n\n'
        + STREAM_DONE, end_of_stream=True))
    await processor.finish()
    # (2.5 s - 0.5 s) / (21 - 1) tokens.
    assert delta.of() == [0.5, pytest.approx(0.1), 1.0, 2.5, 9.0, 21.0, 1.0]


async def test_buffered_answer_has_no_time_per_output_token() -> None:
    """A JSON answer arrives whole: its first byte is its last token."""
    clock = FakeClock(100.0)
    processor = make_processor(clock=clock)
    labels = {"tenant": "acme", **US}
    delta = Delta(("gen_ai_server_time_per_output_token_seconds_count", labels),
                  ("gen_ai_server_time_to_first_token_seconds_count", labels))
    await processor.handle(request_headers())
    await processor.handle(request_body(chat()))
    await processor.handle(response_headers("200"))
    clock.now = 101.0
    await processor.handle(response_body(
        b'{"usage":{"prompt_tokens":3,"completion_tokens":40}}', end_of_stream=True))
    await processor.finish()
    assert delta.of() == [0.0, 1.0]


async def test_stream_of_one_output_token_has_no_time_per_output_token() -> None:
    clock = FakeClock(100.0)
    processor = make_processor(clock=clock)
    labels = {"tenant": "acme", **US}
    delta = Delta(("gen_ai_server_time_per_output_token_seconds_count", labels))
    await processor.handle(request_headers())
    await processor.handle(request_body(chat(stream=True)))
    await processor.handle(response_headers("200", "text/event-stream"))
    clock.now = 100.2
    await processor.handle(response_body(
        STREAM_CHUNK + b'data: {"choices":[],"usage":{"prompt_tokens":9,'
        b'"completion_tokens":1}}\n\n' + STREAM_DONE, end_of_stream=True))
    await processor.finish()
    assert delta.of() == [0.0]


# -- denials ------------------------------------------------------------------------------


async def test_policy_denials_are_counted_by_reason() -> None:
    delta = Delta(
        ("asc_policy_denials_total", {"tenant": "-", "reason": "invalid_api_key"}),
        ("asc_policy_denials_total", {"tenant": "acme", "reason": "model_not_allowed"}),
    )
    unauthenticated = make_processor()
    reply = await unauthenticated.handle(request_headers(None))
    assert isinstance(reply, Respond)
    assert reply.status == 401
    refused = make_processor()
    await refused.handle(request_headers())
    reply = await refused.handle(request_body(chat("gpt-4o")))
    assert isinstance(reply, Respond)
    assert reply.status == 403
    assert delta.of() == [1.0, 1.0]


class DenyingGuard(RecordingGuard):
    async def reserve(self, **request: Any) -> Hold:
        raise GatewayError(ErrorCode.RATE_LIMITED, "Request refused: it would exceed the "
                           "tenant daily budget (limit USD 10.00).")


async def test_a_budget_refusal_is_a_policy_denial() -> None:
    processor = make_processor(budget_runtime(DenyingGuard()))
    delta = Delta(("asc_policy_denials_total", {"tenant": "pinned", "reason": "rate_limited"}))
    await processor.handle(request_headers("pinned"))
    reply = await processor.handle(request_body(chat()))
    assert isinstance(reply, Respond)
    assert reply.status == 429
    assert delta.of() == [1.0]


async def test_a_provider_error_is_not_a_policy_denial() -> None:
    processor = make_processor()
    delta = Delta(("asc_policy_denials_total", {"tenant": "acme", "reason": "rate_limited"}),
                  ("asc_requests_total", {"tenant": "acme", **US, "status": "429"}))
    await processor.handle(request_headers())
    await processor.handle(request_body(chat()))
    await processor.handle(response_headers("429"))
    await processor.handle(response_body(b'{"error":{"message":"slow down"}}',
                                         end_of_stream=True))
    await processor.finish()
    assert delta.of() == [0.0, 1.0]


# -- fallbacks and budgets -------------------------------------------------------


def flight_of(*attempts: tuple[str, int | None]) -> Flight:
    """A flight whose attempts hit these providers and ended with these statuses."""
    providers = {name: dataclasses.replace(runtime_with("").config.providers[name])
                 for name, _ in attempts}
    first_byte_timeout = 10.0

    async def never(*_: object) -> Any:
        raise AssertionError("not prepared in this test")

    flight = Flight(request_id="r1", deployments=(), prepare=never,
                    first_byte_timeout_s=first_byte_timeout, clock=FakeClock(1.0))
    for number, (name, status) in enumerate(attempts, start=1):
        flight.end(flight.start(providers[name], number), status)
    return flight


def test_each_move_to_the_next_attempt_is_one_fallback() -> None:
    flight = flight_of(("prov-us", 503), ("prov-eu", None), ("prov-az", 200))
    labels = {"tenant": "acme", "model": "gpt-4o-mini"}
    delta = Delta(
        ("asc_fallbacks_total", {**labels, "from_provider": "prov-us",
                                 "to_provider": "prov-eu", "reason": "status_503"}),
        ("asc_fallbacks_total", {**labels, "from_provider": "prov-eu",
                                 "to_provider": "prov-az", "reason": "reset"}),
        ("asc_fallbacks_total", {**labels, "from_provider": "prov-az",
                                 "to_provider": "prov-az", "reason": "reset"}),
    )
    observe_fallbacks("acme", "gpt-4o-mini", flight.records())
    assert delta.of() == [1.0, 1.0, 0.0]


def test_fallback_reasons_are_label_values() -> None:
    assert [fallback_reason(left) for left in (
        "status 429", "connect failure", "reset", "timeout")] == [
        "status_429", "connect_failure", "reset", "timeout"]


def usd_group(scope: str, window: str, limit: int, amount: int) -> CounterGroup:
    return CounterGroup(f"{scope} {window} budget", "usd", ("k",), limit, amount,
                        datetime(2026, 12, 1, tzinfo=UTC), ttl_s=60, scope=scope,
                        window=window)


class RemainingGuard(RecordingGuard):
    """Holds 5,000 micro-USD and answers what the ledger would have left."""

    async def reserve(self, **request: Any) -> Hold:
        self.reserved.append(request)
        rpm = CounterGroup("requests per minute", "requests", ("r",), 60, 1,
                           datetime(2026, 12, 1, tzinfo=UTC), ttl_s=120)
        held = request["cost_micro_usd"]
        return Hold(reservation=None, mode="redis", remaining=(
            (usd_group("tenant", "day", 10_000_000, held), 7_000_000),
            (usd_group("org", "month", 50_000_000, held), 1_234_567),
            (rpm, 59)))


async def test_budget_remaining_is_the_ledgers_answer_plus_what_settle_gave_back(
    caplog: pytest.LogCaptureFixture,
) -> None:
    guard = RemainingGuard()
    processor = make_processor(budget_runtime(guard))
    await processor.handle(request_headers("pinned"))
    assert isinstance(await processor.handle(request_body(chat())), Continue)
    held = guard.reserved[0]["cost_micro_usd"]
    await processor.handle(response_headers("200"))
    await processor.handle(response_body(
        b'{"usage":{"prompt_tokens":1000,"completion_tokens":1000}}', end_of_stream=True))
    with caplog.at_level(logging.INFO, logger="extproc.request"):
        await processor.finish()
    charged = 150 + 600  # 1000 tokens each at 0.15 and 0.60 USD per million
    assert guard.settled == [(charged, 2000)]
    returned = held - charged
    assert sample("asc_budget_remaining_usd", tenant="pinned", scope="tenant",
                  window="day") == (7_000_000 + returned) / 1_000_000
    assert sample("asc_budget_remaining_usd", tenant="pinned", scope="org",
                  window="month") == (1_234_567 + returned) / 1_000_000
    assert sample("asc_budget_limit_usd", tenant="pinned", scope="org", window="month") == 50.0
    # Rate limits are not money.
    assert REGISTRY.get_sample_value("asc_budget_remaining_usd", {
        "tenant": "pinned", "scope": "-", "window": "-"}) is None
