"""Check a parsed request against its guardrail policy: models, parameters, prompt size,
PII. Pure: no I/O, no clock; the processor records what it returns.

Order: model rules, then parameter caps, then the prompt (its size, then PII), so a
request refused for its model is never scanned. A refusal names the rule (`model.deny`,
`params.temperature`, `pii.credit_card`, ...) and never the matched text. Caps that the
client can meet by changing a number answer 400 (`guardrail_limit_exceeded`); rules that
forbid (a model, tools, a response format, data in the prompt) answer 403
(`guardrail_denied`).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from extproc.budgets.policy import estimate_input_tokens
from extproc.errors import Dialect, ErrorCode, GatewayError
from extproc.guardrails.answers import StreamRedactor, redact_answer
from extproc.guardrails.redact import Redactor
from extproc.guardrails.settings import GuardrailPolicy

__all__ = ["ROUTE_METADATA_FIELD", "GuardrailAction", "Screening", "route_guardrails",
           "screen_request"]

ROUTE_METADATA_FIELD: Final = "guardrails"
"""The field of a route's `filter_metadata.asc` that names a guardrail profile."""

GuardrailAction = tuple[str, str, int]
"""(rule id, action, count): what `RequestProcessor.guardrail_actions` holds."""

_DETECTOR_NAMES: Final = {
    "email": "an email address",
    "phone": "a phone number",
    "credit_card": "a payment card number",
    "iban": "an IBAN",
    "us_ssn": "a US social security number",
    "ipv4": "an IPv4 address",
    "ipv6": "an IPv6 address",
    "secret": "a secret (API key or private key)",
}
_OUTPUT_FIELDS: Final = ("max_tokens", "max_completion_tokens")
_TOOL_FIELDS: Final = ("tools", "functions", "tool_choice", "function_call")


@dataclass(slots=True)
class Screening:
    """What the guardrails did to one request: its actions, its refusal if any, and the
    redactor that answers are cleaned with (same placeholders)."""

    policy: GuardrailPolicy
    redactor: Redactor
    actions: list[GuardrailAction] = field(default_factory=list)
    denial: GatewayError | None = None

    def answer(self, body: bytes) -> tuple[bytes, list[GuardrailAction]]:
        """A non-streamed answer (client dialect), redacted when the policy says so, and
        the `response.pii.*` actions taken."""
        if not self.policy.redacts_responses:
            return body, []
        before = self.redactor.redacted.copy()
        body = redact_answer(self.redactor, body)
        return body, self._response_actions(before)

    def stream(self, dialect: Dialect) -> StreamRedactor | None:
        """A redactor for a streamed answer, when the policy redacts answers."""
        responses = self.policy.responses
        if responses is None or not self.policy.redacts_responses:
            return None
        return StreamRedactor(self.redactor, dialect, responses.stream_window)

    def stream_actions(self, stream: StreamRedactor) -> list[GuardrailAction]:
        """The `response.pii.*` actions of a finished stream."""
        return self._response_actions(stream.before)

    def _response_actions(self, before: Counter[str]) -> list[GuardrailAction]:
        after = self.redactor.redacted - before
        return [(f"response.pii.{name}", "redact", count)
                for name, count in sorted(after.items())]


_Refusal = tuple[str, GatewayError]
"""(rule id, the error the client gets)."""


def _limit(rule: str, message: str, param: str) -> _Refusal:
    return rule, GatewayError(ErrorCode.GUARDRAIL_LIMIT, f"Guardrail '{rule}': {message}",
                              param=param)


def _denied(rule: str, message: str, param: str | None = None) -> _Refusal:
    return rule, GatewayError(ErrorCode.GUARDRAIL_DENIED, f"Guardrail '{rule}': {message}",
                              param=param)


def _number(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def _check_model(policy: GuardrailPolicy, model: str) -> _Refusal | None:
    if model in policy.models_deny:
        return _denied("model.deny", f"the model '{model}' is denied for this key.", "model")
    if policy.models_allow is not None and model not in policy.models_allow:
        return _denied("model.allow", f"the model '{model}' is not in this key's allowed "
                       "models.", "model")
    return None


def _check_parameters(policy: GuardrailPolicy, request: dict[str, Any]) -> _Refusal | None:
    if policy.max_tokens is not None:
        for name in _OUTPUT_FIELDS:
            asked = _number(request.get(name))
            if asked is not None and asked > policy.max_tokens:
                return _limit("params.max_tokens",
                              f"'{name}' may be at most {policy.max_tokens}.", name)
    if policy.max_n is not None:
        n = _number(request.get("n"))
        if n is not None and n > policy.max_n:
            return _limit("params.n", f"'n' may be at most {policy.max_n}.", "n")
    low, high = policy.temperature_min, policy.temperature_max
    if low is not None or high is not None:
        temperature = _number(request.get("temperature"))
        if temperature is not None and ((low is not None and temperature < low)
                                        or (high is not None and temperature > high)):
            if low is not None and high is not None:
                shown = f"between {low:g} and {high:g}"
            else:
                shown = f"at least {low:g}" if low is not None else f"at most {high:g}"
            return _limit("params.temperature", f"'temperature' must be {shown}.",
                          "temperature")
    if policy.tools_allowed is False:
        for name in _TOOL_FIELDS:
            if request.get(name) not in (None, [], "none"):
                return _denied("params.tools", "tools are not allowed for this key.", name)
    if policy.response_formats is not None and "response_format" in request:
        shape = request["response_format"]
        kind = shape.get("type") if isinstance(shape, dict) else None
        if not isinstance(kind, str) or kind not in policy.response_formats:
            allowed = ", ".join(sorted(policy.response_formats)) or "none"
            return _denied("params.response_format",
                           f"'response_format' type must be one of: {allowed}.",
                           "response_format")
    return None


def _check_size(policy: GuardrailPolicy, prompt_bytes: int) -> _Refusal | None:
    if policy.max_prompt_bytes is not None and prompt_bytes > policy.max_prompt_bytes:
        return _limit("prompt.max_bytes", f"the prompt may be at most "
                      f"{policy.max_prompt_bytes} bytes of text.", "messages")
    if policy.max_prompt_tokens is not None:
        estimate = estimate_input_tokens(prompt_bytes)
        if estimate > policy.max_prompt_tokens:
            return _limit("prompt.max_tokens", f"the prompt may be at most about "
                          f"{policy.max_prompt_tokens} tokens.", "messages")
    return None


def screen_request(policy: GuardrailPolicy, request: dict[str, Any], model: str) -> Screening:
    """Check `request` (redacting its prompt in place) against `policy`."""
    screening = Screening(policy, Redactor(policy.pii))  # Redactor drops `allow` itself
    refusal = _check_model(policy, model) or _check_parameters(policy, request)
    if refusal is not None:
        return _deny(screening, refusal)
    redactor = screening.redactor
    if (not redactor.active and policy.max_prompt_bytes is None
            and policy.max_prompt_tokens is None):
        return screening  # nothing reads the prompt: no walk
    try:
        redactor.scan_request(request)
    except RecursionError:
        screening.denial = GatewayError(ErrorCode.INVALID_REQUEST,
                                        "The request body is nested too deeply.")
        return screening
    refusal = _check_size(policy, redactor.prompt_bytes)
    if refusal is not None:
        return _deny(screening, refusal)
    if not redactor.denied:
        screening.actions.extend((f"pii.{name}", "redact", count)
                                 for name, count in sorted(redactor.redacted.items()))
    else:  # refused: what would have been redacted was not sent at all
        screening.actions.extend((f"pii.{name}", "deny", count)
                                 for name, count in sorted(redactor.denied.items()))
        names = sorted(redactor.denied)
        _, screening.denial = _denied(
            f"pii.{names[0]}", f"the prompt contains {_DETECTOR_NAMES[names[0]]}, which this "
            "key may not send." + (f" (also denied: {', '.join('pii.' + n for n in names[1:])})"
                                   if len(names) > 1 else ""))
    return screening


def _deny(screening: Screening, refusal: _Refusal) -> Screening:
    rule, screening.denial = refusal
    screening.actions.append((rule, "deny", 1))
    return screening


def route_guardrails(profiles: Mapping[str, GuardrailPolicy],
                     metadata: Mapping[str, object] | None) -> GuardrailPolicy | None:
    """The profile a route names in its metadata (`filter_metadata.asc.guardrails`), or
    None. A name the config does not define is refused (500), never ignored: ignoring a
    tightening rule would loosen the route (as for routing fields, decision 0060)."""
    if not metadata or ROUTE_METADATA_FIELD not in metadata:
        return None
    name = metadata[ROUTE_METADATA_FIELD]
    if not isinstance(name, str) or name not in profiles:
        raise GatewayError(ErrorCode.INTERNAL, "The gateway route's guardrails metadata names "
                           "no configured guardrail profile.")
    return profiles[name]
