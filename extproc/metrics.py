"""Prometheus metrics, defined once. Names follow the OTel GenAI conventions where one exists.

Labels are bounded by config (tenants, providers, models, guardrail rules), never by
request content; tenant labels are further capped by `metrics.max_tenant_labels` (the
cardinality guard, `extproc.config.MetricsConfig`). docs/observability.md lists them all.

With `serve --workers N` every metric is written by N processes and merged by the
supervisor (prometheus_client multiprocess mode): counters and histograms add up, gauges
say how (`multiprocess_mode`).
"""

from __future__ import annotations

from typing import Final

from prometheus_client import Counter, Gauge, Histogram

__all__ = [
    "AUDIT_BUFFERED",
    "AUDIT_DROPPED",
    "AUDIT_RECORDS",
    "AUDIT_SINK_FAILURES",
    "BUDGET_LIMIT",
    "BUDGET_OVERRUN",
    "BUDGET_REMAINING",
    "BUDGET_RESERVATIONS",
    "BUDGET_SETTLE_FAILURES",
    "BUDGET_SPENT",
    "CONFIG_RELOADS",
    "CREDENTIAL_ROLLBACKS",
    "CREDENTIAL_STALE_SERVES",
    "CREDENTIAL_STATE",
    "DEPLOYMENT_STATE",
    "FALLBACKS",
    "FAST_DOOR_CHECKS",
    "GUARDRAIL_ACTIONS",
    "PHASE_SECONDS",
    "POLICY_DENIALS",
    "REQUESTS",
    "REQUEST_DURATION",
    "TIME_PER_OUTPUT_TOKEN",
    "TIME_TO_FIRST_TOKEN",
    "TOKEN_USAGE",
]

_ROUTE_LABELS: Final = ("tenant", "provider", "region", "model")

REQUESTS: Final = Counter(
    "asc_requests",
    "Requests finished by the gateway, by outcome status.",
    [*_ROUTE_LABELS, "status"],
)
REQUEST_DURATION: Final = Histogram(
    "gen_ai_server_request_duration_seconds",
    "Time from request headers to the end of the response, as seen by the gateway.",
    _ROUTE_LABELS,
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
)
TIME_TO_FIRST_TOKEN: Final = Histogram(
    "gen_ai_server_time_to_first_token_seconds",
    "Time from request headers to the first response body chunk.",
    _ROUTE_LABELS,
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
TOKEN_USAGE: Final = Counter(
    "gen_ai_client_token_usage",
    "Tokens reported by providers.",
    [*_ROUTE_LABELS, "token_type"],
)
TIME_PER_OUTPUT_TOKEN: Final = Histogram(
    "gen_ai_server_time_per_output_token_seconds",
    "Streamed responses: time from the first body chunk to the end, per output token "
    "after the first ((duration - ttft) / (output_tokens - 1)).",
    _ROUTE_LABELS,
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.25, 0.5, 1, 2.5),
)
POLICY_DENIALS: Final = Counter(
    "asc_policy_denials",
    "Requests the gateway refused itself (400, 401, 403, 404, 413, and 429 for budgets "
    "and rate limits), by reason (the error code).",
    ["tenant", "reason"],
)
FALLBACKS: Final = Counter(
    "asc_fallbacks",
    "Moves from one deployment attempt to the next (Envoy retries on the failover cluster), "
    "by why the earlier attempt was left.",
    ["tenant", "model", "from_provider", "to_provider", "reason"],
)
FAST_DOOR_CHECKS: Final = Counter(
    "asc_fast_door_checks",
    "Envoy's fast-path checks (extproc/fastdoor.py) by outcome: fast (decided there, no "
    "ext_proc stream), full (on to ext_proc), refused (a budget, limit or key refusal "
    "answered there), abandoned (Envoy gave up on the check first).",
    ["outcome"],
)
PHASE_SECONDS: Final = Histogram(
    "asc_extproc_phase_seconds",
    "Processing time spent inside the service per ext_proc phase.",
    ["phase"],
    buckets=(0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.05),
)
BUDGET_RESERVATIONS: Final = Counter(
    "asc_budget_reservations",
    "Budget reservations by result: held, replay, denied, unavailable, overloaded,"
    " fail_open, released.",
    ["tenant", "result"],
)
BUDGET_SPENT: Final = Counter(
    "asc_budget_spent_micro_usd",
    "Settled cost in micro-USD (what budgets were charged).",
    ["tenant", "model"],
)
BUDGET_REMAINING: Final = Gauge(
    "asc_budget_remaining_usd",
    "USD left in a budget window, as the ledger answered the tenant's latest reserve, "
    "corrected by what that request's settle gave back; concurrent requests make it "
    "approximate (`extproc budget show` reads the ledger).",
    ["tenant", "scope", "window"],
    # Every worker writes the value it last learnt; the newest one is the best knowledge.
    multiprocess_mode="livemostrecent",
)
BUDGET_LIMIT: Final = Gauge(
    "asc_budget_limit_usd",
    "The limit of the budget window `asc_budget_remaining_usd` is part of (the alert on a "
    "nearly exhausted budget divides one by the other).",
    ["tenant", "scope", "window"],
    multiprocess_mode="livemostrecent",
)
BUDGET_SETTLE_FAILURES: Final = Counter(
    "asc_budget_settle_failures",
    "Settles that could not reach the ledger; their holds wait for the sweeper.",
    ["tag"],
)
BUDGET_OVERRUN: Final = Counter(
    "asc_budget_overrun",
    "How far settles pushed a limit past its end (micro-USD, tokens or requests).",
    ["tenant", "unit"],
)
CREDENTIAL_STATE: Final = Gauge(
    "asc_credential_state",
    "1 for the current circuit state of each provider credential (closed, degraded, "
    "open, half_open), else 0.",
    ["credential", "state"],
    # livemax: the supervisor drops a dead worker's file, so its states go with it.
    multiprocess_mode="livemax",
)
DEPLOYMENT_STATE: Final = Gauge(
    "asc_deployment_state",
    "1 for the current circuit state of each deployment (closed, open, half_open), else 0.",
    ["deployment", "state"],
    multiprocess_mode="livemax",
)
CREDENTIAL_ROLLBACKS: Final = Counter(
    "asc_credential_rollbacks",
    "Canary key versions rolled back automatically after provider 401/403.",
    ["credential"],
)
CREDENTIAL_STALE_SERVES: Final = Counter(
    "asc_credential_stale_serves",
    "Requests served with a cached key while the KMS or key store was unreachable.",
    ["credential"],
)
CONFIG_RELOADS: Final = Counter(
    "asc_config_reloads",
    "Config reload attempts; a failed reload keeps the previous config.",
    ["result"],
)
GUARDRAIL_ACTIONS: Final = Counter(
    "asc_guardrail_actions",
    "Guardrail actions (deny, redact) by rule id (`pii.email`, `params.n`, ...); counts "
    "matches, never their text.",
    ["tenant", "rule", "action"],
)
AUDIT_RECORDS: Final = Counter(
    "asc_audit_records",
    "Audit records (and checkpoints) written, by sink and entry type.",
    ["sink", "type"],
)
AUDIT_SINK_FAILURES: Final = Counter(
    "asc_audit_sink_failures",
    "Audit sink writes that failed (the batch is kept and retried).",
    ["sink"],
)
AUDIT_DROPPED: Final = Counter(
    "asc_audit_dropped",
    "Audit records lost because every buffer was full (policy buffer); each is also logged.",
    ["reason"],
)
AUDIT_BUFFERED: Final = Gauge(
    "asc_audit_buffered_records",
    "Audit records waiting in memory for a sink (queue plus backlog).",
    multiprocess_mode="livesum",
)
