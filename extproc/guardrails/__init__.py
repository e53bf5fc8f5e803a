"""Guardrails: model and parameter rules, prompt size caps and PII detectors, as pure
functions over the parsed request and response (docs/guardrails.md).

`effective()` merges a tenant's, a team's and a route's policies (the strictest rule of
each wins); `screen_request()` checks and redacts a request; `redact_answer()` and
`StreamRedactor` clean the answer with the same placeholders.
"""

from extproc.guardrails.answers import StreamRedactor, redact_answer
from extproc.guardrails.policy import (
    ROUTE_METADATA_FIELD,
    GuardrailAction,
    Screening,
    route_guardrails,
    screen_request,
)
from extproc.guardrails.redact import Redactor
from extproc.guardrails.settings import (
    DETECTORS,
    Action,
    GuardrailPolicy,
    ResponseRedaction,
    effective,
    policy_from_spec,
    tighter,
)

__all__ = [
    "DETECTORS",
    "ROUTE_METADATA_FIELD",
    "Action",
    "GuardrailAction",
    "GuardrailPolicy",
    "Redactor",
    "ResponseRedaction",
    "Screening",
    "StreamRedactor",
    "effective",
    "policy_from_spec",
    "redact_answer",
    "route_guardrails",
    "screen_request",
    "tighter",
]
