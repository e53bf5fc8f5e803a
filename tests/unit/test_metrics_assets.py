"""The Grafana dashboard and the Prometheus alert rules stay valid and in step with the code.

No Prometheus or Grafana runs here: every expression is parsed with a real PromQL parser
(PyPI `promql-parser`, the Rust `promql-parser` crate that GreptimeDB uses), the rule file
is checked against the shape Prometheus loads (a JSON Schema of its rule-file format), and
every metric an expression names must be one `extproc.metrics` exports, so a renamed
metric breaks this test instead of a dashboard panel or a silent alert.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import promql_parser
import pytest
import yaml

from tests.unit.test_docs import exposed_metric_names

REPO = Path(__file__).resolve().parents[2]
DASHBOARD = REPO / "deploy" / "grafana" / "asc-gateway.json"
ALERTS = REPO / "deploy" / "prometheus" / "asc-alerts.yaml"

PENDING_METRICS: dict[str, str] = {
    "asc_audit_sink_failures_total": "the audit helper's extproc/audit.py (issue 10 item 3)",
}
"""Metrics that rules and panels reference ahead of the branch that exports them."""

_DURATION = r"^([0-9]+(ms|s|m|h|d|w|y))+$"
_RULE_FILE_SCHEMA: dict[str, Any] = {
    # Prometheus's rule file format (prometheus/model/rulefmt): alerting rules only here.
    "type": "object",
    "additionalProperties": False,
    "required": ["groups"],
    "properties": {"groups": {"type": "array", "minItems": 1, "items": {
        "type": "object",
        "additionalProperties": False,
        "required": ["name", "rules"],
        "properties": {
            "name": {"type": "string", "minLength": 1},
            "interval": {"type": "string", "pattern": _DURATION},
            "rules": {"type": "array", "minItems": 1, "items": {
                "type": "object",
                "additionalProperties": False,
                "required": ["alert", "expr", "labels", "annotations"],
                "properties": {
                    "alert": {"type": "string", "pattern": r"^[a-zA-Z_][a-zA-Z0-9_]*$"},
                    "expr": {"type": "string", "minLength": 1},
                    "for": {"type": "string", "pattern": _DURATION},
                    "keep_firing_for": {"type": "string", "pattern": _DURATION},
                    "labels": {
                        "type": "object",
                        "required": ["severity"],
                        "properties": {"severity": {"enum": ["info", "warning", "critical"]}},
                        "propertyNames": {"pattern": r"^[a-zA-Z_][a-zA-Z0-9_]*$"},
                        "additionalProperties": {"type": "string"},
                    },
                    "annotations": {
                        "type": "object",
                        "required": ["summary", "description"],
                        "additionalProperties": {"type": "string", "minLength": 1},
                    },
                },
            }},
        },
    }}},
}
_GRAFANA_VARIABLES = {"$__rate_interval": "5m", "$__interval": "1m", "$__range": "1h"}
_LABEL_REFERENCE = re.compile(r"\$labels\.([a-zA-Z_][a-zA-Z0-9_]*)")


def alert_rules() -> list[dict[str, Any]]:
    document = yaml.safe_load(ALERTS.read_text(encoding="utf-8"))
    return [rule for group in document["groups"] for rule in group["rules"]]


def dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    return loaded


def panel_exprs() -> list[tuple[str, str]]:
    """(panel title, PromQL) of every dashboard query, Grafana's variables filled in."""
    exprs = []
    for panel in dashboard()["panels"]:
        for target in panel.get("targets", ()):
            expr = target["expr"]
            for variable, value in _GRAFANA_VARIABLES.items():
                expr = expr.replace(variable, value)
            exprs.append((panel["title"], expr))
    return exprs


def _children(node: Any) -> Iterator[Any]:
    for name in ("lhs", "rhs", "expr", "param", "vector_selector"):
        child = getattr(node, name, None)
        if child is not None:
            yield child
    yield from getattr(node, "args", None) or ()


def selected_metrics(node: Any) -> set[str]:
    """Metric names of every vector selector in a parsed expression."""
    names = {node.name} if isinstance(node, promql_parser.VectorSelector) and node.name else set()
    for child in _children(node):
        names |= selected_metrics(child)
    return names


def output_labels(node: Any) -> set[str] | None:
    """Labels an expression's series surely carry; None when a raw selector keeps them all."""
    if isinstance(node, promql_parser.AggregateExpr):
        modifier = node.modifier
        if modifier is not None and str(modifier.type).endswith("By"):
            return set(modifier.labels)
        return set() if modifier is None else None
    if isinstance(node, promql_parser.BinaryExpr):
        left, right = output_labels(node.lhs), output_labels(node.rhs)
        if isinstance(node.rhs, promql_parser.NumberLiteral) or str(node.op) in (
                "and", "or", "unless"):
            return left
        if isinstance(node.lhs, promql_parser.NumberLiteral):
            return right
        if left is None or right is None:
            return right if left is None else left
        return left & right
    if isinstance(node, promql_parser.Call):
        vectors = [output_labels(arg) for arg in node.args
                   if not isinstance(arg, promql_parser.NumberLiteral)]
        return vectors[0] if vectors else set()
    children = list(_children(node))
    return output_labels(children[0]) if children else None


def known_metric(name: str) -> bool:
    exported = set(exposed_metric_names()) | set(PENDING_METRICS)
    return name in exported or any(
        name == f"{histogram}{suffix}" for histogram in exported
        for suffix in ("_bucket", "_count", "_sum"))


# -- alert rules --------------------------------------------------------------------------


def test_the_rule_file_has_the_shape_prometheus_loads() -> None:
    document = yaml.safe_load(ALERTS.read_text(encoding="utf-8"))
    jsonschema.validate(document, _RULE_FILE_SCHEMA)
    names = [rule["alert"] for rule in alert_rules()]
    assert len(names) == len(set(names))
    # The four alerts the operator guide promises, at least.
    assert {"AscBudgetNearlyExhausted", "AscCredentialOpen", "AscAuditSinkFailing",
            "AscKmsStaleServes"} <= set(names)


@pytest.mark.parametrize("rule", alert_rules(), ids=lambda rule: rule["alert"])
def test_every_alert_parses_and_names_exported_metrics(rule: dict[str, Any]) -> None:
    parsed = promql_parser.parse(rule["expr"])
    metrics = selected_metrics(parsed)
    assert metrics, "an alert must select at least one metric"
    assert sorted(name for name in metrics if not known_metric(name)) == []
    # An annotation can only show labels the expression keeps.
    kept = output_labels(parsed)
    shown = set(_LABEL_REFERENCE.findall(json.dumps(rule["annotations"])))
    if kept is not None:
        assert sorted(shown - kept) == []


# -- dashboard ----------------------------------------------------------------------------


def test_dashboard_layout_is_valid() -> None:
    board = dashboard()
    panels = board["panels"]
    ids = [panel["id"] for panel in panels]
    assert len(ids) == len(set(ids))
    assert board["uid"] == "asc-gateway"
    cells: set[tuple[int, int]] = set()
    for panel in panels:
        grid = panel["gridPos"]
        assert 0 <= grid["x"] < grid["x"] + grid["w"] <= 24, panel["title"]
        area = {(x, y) for x in range(grid["x"], grid["x"] + grid["w"])
                for y in range(grid["y"], grid["y"] + grid["h"])}
        assert not area & cells, f"{panel['title']} overlaps another panel"
        cells |= area
        if panel["type"] != "row":
            assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
            assert panel["targets"], panel["title"]
            assert panel["description"], panel["title"]
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["query"] == "prometheus"
    tenant_query = variables["tenant"]["query"]["query"]
    assert re.fullmatch(r"label_values\((\w+), tenant\)", tenant_query)
    assert known_metric(tenant_query.split("(")[1].split(",")[0])


@pytest.mark.parametrize(("title", "expr"), panel_exprs(), ids=[t for t, _ in panel_exprs()])
def test_every_panel_query_parses_and_names_exported_metrics(title: str, expr: str) -> None:
    metrics = selected_metrics(promql_parser.parse(expr))
    assert metrics, title
    assert sorted(name for name in metrics if not known_metric(name)) == []


def test_the_dashboard_covers_what_operators_asked_for() -> None:
    """Per-tenant spend, tokens, TTFT, errors and denials, fallbacks, credential states."""
    shown = set().union(*(selected_metrics(promql_parser.parse(expr))
                          for _, expr in panel_exprs()))
    assert {"asc_budget_spent_micro_usd_total", "gen_ai_client_token_usage_total",
            "gen_ai_server_time_to_first_token_seconds_bucket", "asc_requests_total",
            "asc_policy_denials_total", "asc_guardrail_actions_total", "asc_fallbacks_total",
            "asc_credential_state", "asc_budget_remaining_usd"} <= shown


def test_the_checks_catch_what_they_are_for() -> None:
    """The parser refuses broken PromQL, and an unknown or renamed metric is caught."""
    with pytest.raises(ValueError, match="unclosed left parenthesis"):
        promql_parser.parse("sum(rate(asc_requests_total[5m])")
    assert not known_metric("asc_request_total")
    assert known_metric("gen_ai_server_time_per_output_token_seconds_bucket")
    parsed = promql_parser.parse("sum by (tenant) (rate(asc_requests_total[5m])) > 1")
    assert selected_metrics(parsed) == {"asc_requests_total"}
    assert output_labels(parsed) == {"tenant"}
    assert output_labels(promql_parser.parse("sum(increase(x[5m])) > 0")) == set()
