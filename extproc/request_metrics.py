"""A finished request's Prometheus samples: what `RequestProcessor` measured, as metrics.

Kept out of `extproc.phases` so that the processor only hands over plain values once per
request (in `finish()`, or `_respond_error` for a denial), and out of `extproc.metrics`,
which defines the metrics and is imported by modules this one depends on.

This runs once per request on the event loop, so it caches the labelled children of the
route metrics: `labels()` validates and joins its label values and takes a lock every
call; a dict lookup of the same tuple does not. The caches grow with the label
combinations, which the config bounds (tenant labels past `metrics.max_tenant_labels` are
`other`), exactly like prometheus_client's own children.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Final

from prometheus_client import Counter, Histogram

from extproc import metrics
from extproc.budgets.policy import CounterGroup

__all__ = [
    "NO_LABEL",
    "RouteLabels",
    "fallback_reason",
    "observe_budget_remaining",
    "observe_budget_spent",
    "observe_denial",
    "observe_fallbacks",
    "observe_request",
]

NO_LABEL: Final = "-"
"""Label value of what a request never had: a tenant (not authenticated), a route."""

RouteLabels = tuple[str, str, str, str]
"""(tenant, provider, region, model) as labels: `model` is the name the client asked."""


@dataclass(frozen=True, slots=True)
class _RouteSeries:
    duration: Histogram
    ttft: Histogram
    tpot: Histogram
    input_tokens: Counter
    output_tokens: Counter


_ROUTE_SERIES: dict[RouteLabels, _RouteSeries] = {}
_REQUESTS: dict[tuple[RouteLabels, str], Counter] = {}


def _route_series(labels: RouteLabels) -> _RouteSeries:
    series = _ROUTE_SERIES.get(labels)
    if series is None:
        series = _ROUTE_SERIES[labels] = _RouteSeries(
            duration=metrics.REQUEST_DURATION.labels(*labels),
            ttft=metrics.TIME_TO_FIRST_TOKEN.labels(*labels),
            tpot=metrics.TIME_PER_OUTPUT_TOKEN.labels(*labels),
            input_tokens=metrics.TOKEN_USAGE.labels(*labels, "input"),
            output_tokens=metrics.TOKEN_USAGE.labels(*labels, "output"),
        )
    return series


def observe_request(labels: RouteLabels, outcome: str, *, routed: bool, duration_s: float,
                    ttft_s: float | None, streamed: bool, input_tokens: int | None,
                    output_tokens: int | None) -> None:
    """One finished request: its outcome, and for a routed one its latencies and tokens.

    Time per output token is observed for streams only: a buffered JSON answer reaches the
    gateway whole, so its "first token" is its last. It needs two output tokens or more
    (the first one's time is the TTFT), and is (duration - TTFT) / (output tokens - 1).
    """
    key = (labels, outcome)
    counter = _REQUESTS.get(key)
    if counter is None:
        counter = _REQUESTS[key] = metrics.REQUESTS.labels(*labels, outcome)
    counter.inc()
    if not routed:
        return
    series = _route_series(labels)
    series.duration.observe(duration_s)
    if ttft_s is not None:
        series.ttft.observe(ttft_s)
        if streamed and output_tokens is not None and output_tokens > 1:
            series.tpot.observe(max(0.0, duration_s - ttft_s) / (output_tokens - 1))
    if input_tokens is not None:
        series.input_tokens.inc(input_tokens)
    if output_tokens is not None:
        series.output_tokens.inc(output_tokens)


def observe_denial(tenant: str, reason: str) -> None:
    """A request the gateway refused itself (the reason is its error code)."""
    metrics.POLICY_DENIALS.labels(tenant, reason).inc()


def fallback_reason(left: str) -> str:
    """An attempt's `left` (`status 503`, `connect failure`, `reset`, `timeout`) as a label
    value: `status_503`, `connect_failure`, ..."""
    return left.replace(" ", "_")


def observe_fallbacks(tenant: str, model: str,
                      attempts: Sequence[Mapping[str, str | int | float | None]]) -> None:
    """Every move from one attempt to the next (`Flight.records()`, in attempt order).

    The last attempt's own failure is not a fallback: nothing came after it."""
    for left_attempt, next_attempt in itertools.pairwise(attempts):
        left = left_attempt.get("left")
        metrics.FALLBACKS.labels(
            tenant, model, str(left_attempt.get("provider")), str(next_attempt.get("provider")),
            fallback_reason(str(left) if left is not None else "reset")).inc()


_BUDGET_SPENT: dict[tuple[str, str], Counter] = {}


def observe_budget_spent(tenant: str, model: str, micro_usd: int) -> None:
    """What a settle charged (the metric follows the ledger: only a settle that landed)."""
    counter = _BUDGET_SPENT.get((tenant, model))
    if counter is None:
        counter = _BUDGET_SPENT[tenant, model] = metrics.BUDGET_SPENT.labels(tenant, model)
    counter.inc(micro_usd)


def observe_budget_remaining(tenant: str,
                             remaining: Iterable[tuple[CounterGroup, int]],
                             charged_micro_usd: int | None) -> None:
    """USD left per budget window after this request, from the ledger's answer to its
    reserve (`Hold.remaining`: what was left with the worst case held) plus what settling
    gave back (held - charged). Rate limits (requests, tokens) are not money: skipped."""
    for group, left in remaining:
        if group.unit != "usd":
            continue
        returned = group.amount - charged_micro_usd if charged_micro_usd is not None else 0
        labels = (tenant, group.scope or NO_LABEL, group.window or NO_LABEL)
        metrics.BUDGET_REMAINING.labels(*labels).set(max(0, left + returned) / 1_000_000)
        metrics.BUDGET_LIMIT.labels(*labels).set(group.limit / 1_000_000)
