"""Guardrail policy: merging levels, each rule's refusal, redaction with stable
placeholders, answers and streams redacted, and the config that builds the policy."""

from __future__ import annotations

import json
from types import MappingProxyType
from typing import Any

import pytest
import yaml

from extproc.config import ConfigError, parse_config
from extproc.errors import Dialect, ErrorCode, GatewayError, error_body
from extproc.guardrails import (
    Action,
    GuardrailPolicy,
    ResponseRedaction,
    StreamRedactor,
    effective,
    route_guardrails,
    screen_request,
)
from extproc.guardrails.redact import Redactor
from extproc.routing import RouteOverride
from extproc.translate.sse import SseDecoder
from tests.conftest import gateway_config

ALL_REDACT = {name: Action.REDACT for name in (
    "email", "phone", "credit_card", "iban", "us_ssn", "ipv4", "ipv6", "secret")}


def chat(content: Any, **fields: Any) -> dict[str, Any]:
    return {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": content}],
            **fields}


def refusal(policy: GuardrailPolicy, request: dict[str, Any]) -> tuple[int, str, str | None]:
    screening = screen_request(policy, request, request["model"])
    assert screening.denial is not None
    return screening.denial.status, screening.denial.message, screening.denial.param


# --- merging levels ----------------------------------------------------------------------

def test_effective_keeps_the_strictest_rule_of_each_level() -> None:
    tenant = GuardrailPolicy(
        models_allow=frozenset({"a", "b", "c"}), models_deny=frozenset({"x"}), max_tokens=1000,
        max_n=4, temperature_min=0.0, temperature_max=1.5, tools_allowed=True,
        response_formats=frozenset({"text", "json_object"}), max_prompt_bytes=10_000,
        pii={"email": Action.DENY, "phone": Action.REDACT},
        responses=ResponseRedaction(enabled=False, stream_window=32))
    team = GuardrailPolicy(models_allow=frozenset({"b", "c", "d"}), max_tokens=2000, max_n=2,
                           temperature_min=0.2, pii={"email": Action.ALLOW,
                                                      "iban": Action.REDACT})
    route = GuardrailPolicy(models_deny=frozenset({"c"}), temperature_max=1.0,
                            tools_allowed=False, response_formats=frozenset({"text"}),
                            max_prompt_bytes=500, pii={"phone": Action.DENY},
                            responses=ResponseRedaction(enabled=True, stream_window=16))
    merged = effective(tenant, team, route)
    assert merged.models_allow == frozenset({"b", "c"})
    assert merged.models_deny == frozenset({"x", "c"})
    assert (merged.max_tokens, merged.max_n) == (1000, 2)
    assert (merged.temperature_min, merged.temperature_max) == (0.2, 1.0)
    assert merged.tools_allowed is False
    assert merged.response_formats == frozenset({"text"})
    assert merged.max_prompt_bytes == 500
    # A team cannot allow what its tenant denies.
    assert dict(merged.pii) == {"email": Action.DENY, "phone": Action.DENY,
                                "iban": Action.REDACT}
    assert merged.responses == ResponseRedaction(enabled=True, stream_window=32)


def test_effective_without_levels_is_no_rule() -> None:
    assert effective(None) == GuardrailPolicy()
    only_route = GuardrailPolicy(max_n=1)
    assert effective(None, None, only_route) == only_route


# --- request rules -----------------------------------------------------------------------

@pytest.mark.parametrize(("policy", "request_", "expected"), [
    (GuardrailPolicy(models_deny=frozenset({"gpt-4o-mini"})), chat("hi"),
     (403, "Guardrail 'model.deny': the model 'gpt-4o-mini' is denied for this key.", "model")),
    (GuardrailPolicy(models_allow=frozenset({"gpt-4o"})), chat("hi"),
     (403, "Guardrail 'model.allow': the model 'gpt-4o-mini' is not in this key's allowed "
      "models.", "model")),
    (GuardrailPolicy(max_tokens=100), chat("hi", max_completion_tokens=101),
     (400, "Guardrail 'params.max_tokens': 'max_completion_tokens' may be at most 100.",
      "max_completion_tokens")),
    (GuardrailPolicy(max_n=1), chat("hi", n=2),
     (400, "Guardrail 'params.n': 'n' may be at most 1.", "n")),
    (GuardrailPolicy(temperature_min=0.2, temperature_max=1), chat("hi", temperature=1.5),
     (400, "Guardrail 'params.temperature': 'temperature' must be between 0.2 and 1.",
      "temperature")),
    (GuardrailPolicy(temperature_max=1), chat("hi", temperature=1.01),
     (400, "Guardrail 'params.temperature': 'temperature' must be at most 1.", "temperature")),
    (GuardrailPolicy(tools_allowed=False), chat("hi", tools=[{"type": "function"}]),
     (403, "Guardrail 'params.tools': tools are not allowed for this key.", "tools")),
    (GuardrailPolicy(response_formats=frozenset({"text"})),
     chat("hi", response_format={"type": "json_object"}),
     (403, "Guardrail 'params.response_format': 'response_format' type must be one of: text.",
      "response_format")),
    (GuardrailPolicy(max_prompt_bytes=10), chat("0123456789é"),
     (400, "Guardrail 'prompt.max_bytes': the prompt may be at most 10 bytes of text.",
      "messages")),
    (GuardrailPolicy(max_prompt_tokens=3), chat("x" * 10),
     (400, "Guardrail 'prompt.max_tokens': the prompt may be at most about 3 tokens.",
      "messages")),
])
def test_each_rule_refuses_with_its_rule_id(policy: GuardrailPolicy, request_: dict[str, Any],
                                            expected: tuple[int, str, str | None]) -> None:
    assert refusal(policy, request_) == expected


def test_rules_within_limits_pass() -> None:
    policy = GuardrailPolicy(max_tokens=100, max_n=2, temperature_min=0, temperature_max=1,
                             tools_allowed=False, response_formats=frozenset({"text"}),
                             max_prompt_bytes=10, max_prompt_tokens=4)
    request = chat("0123456789", max_tokens=100, n=2, temperature=1, tools=[],
                   response_format={"type": "text"})
    screening = screen_request(policy, request, "gpt-4o-mini")
    assert screening.denial is None
    assert screening.actions == []


def test_pii_deny_names_the_rule_never_the_data() -> None:
    policy = GuardrailPolicy(pii={"credit_card": Action.DENY, "email": Action.DENY,
                                  "phone": Action.REDACT})
    request = chat("card 4111 1111 1111 1111, mail a@example.com, b@example.com, "
                   "call +1 415 555 0132")
    screening = screen_request(policy, request, "gpt-4o-mini")
    assert screening.denial is not None
    assert screening.denial.code is ErrorCode.GUARDRAIL_DENIED
    assert screening.denial.message == (
        "Guardrail 'pii.credit_card': the prompt contains a payment card number, which this "
        "key may not send. (also denied: pii.email)")
    # The phone number would have been redacted, but nothing was sent: only denials count.
    assert screening.actions == [("pii.credit_card", "deny", 1), ("pii.email", "deny", 2)]
    for dialect in Dialect:
        body = error_body(screening.denial, dialect).decode()
        assert "4111" not in body
        assert "example.com" not in body


def test_redaction_uses_stable_placeholders_per_request() -> None:
    policy = GuardrailPolicy(pii=ALL_REDACT)
    request: dict[str, Any] = {
        "model": "gpt-4o-mini",
        "messages": [
            {"role": "system", "content": "Support for alice@example.com"},
            {"role": "user", "content": [
                {"type": "text", "text": "I am alice@example.com, cc bob@example.com"},
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,a@b.com"}},
            ]},
            {"role": "assistant", "tool_calls": [{
                "id": "call_1", "type": "function",
                "function": {"name": "lookup", "arguments": '{"ip": "10.0.0.1"}'}}]},
        ],
    }
    screening = screen_request(policy, request, "gpt-4o-mini")
    assert screening.denial is None
    messages = request["messages"]
    assert messages[0]["content"] == "Support for [EMAIL_1]"
    assert messages[1]["content"][0]["text"] == "I am [EMAIL_1], cc [EMAIL_2]"
    assert messages[1]["content"][1]["image_url"]["url"] == "data:image/png;base64,a@b.com"
    assert messages[2]["tool_calls"][0]["function"]["arguments"] == '{"ip": "[IPV4_1]"}'
    assert screening.actions == [("pii.email", "redact", 3), ("pii.ipv4", "redact", 1)]


def test_anthropic_system_blocks_are_redacted() -> None:
    request: dict[str, Any] = {
        "model": "claude", "max_tokens": 10,
        "system": [{"type": "text", "text": "Key AKIAIOSFODNN7EXAMPLE"}],
        "messages": [{"role": "user", "content": "ok"}],
    }
    screening = screen_request(GuardrailPolicy(pii={"secret": Action.REDACT}), request, "claude")
    assert request["system"][0]["text"] == "Key [SECRET_1]"
    assert screening.actions == [("pii.secret", "redact", 1)]


def test_a_policy_without_prompt_rules_does_not_walk_the_prompt() -> None:
    request = chat("alice@example.com")
    screening = screen_request(GuardrailPolicy(max_n=3), request, "gpt-4o-mini")
    assert screening.redactor.prompt_bytes == 0
    assert request["messages"][0]["content"] == "alice@example.com"


# --- answers -----------------------------------------------------------------------------

def _answer_policy() -> GuardrailPolicy:
    return GuardrailPolicy(pii={"email": Action.REDACT, "credit_card": Action.DENY},
                           responses=ResponseRedaction(enabled=True, stream_window=24))


def test_non_streamed_answer_reuses_the_request_placeholders() -> None:
    request = chat("write to alice@example.com")
    screening = screen_request(_answer_policy(), request, "gpt-4o-mini")
    answer = json.dumps({"id": "x", "choices": [{"index": 0, "message": {
        "role": "assistant", "content": "Sure: alice@example.com and carol@example.com, "
        "card 4111111111111111"}}]}).encode()
    body, actions = screening.answer(answer)
    content = json.loads(body)["choices"][0]["message"]["content"]
    assert content == "Sure: [EMAIL_1] and [EMAIL_2], card [CREDIT_CARD_1]"
    assert actions == [("response.pii.credit_card", "redact", 1),
                       ("response.pii.email", "redact", 2)]


def test_answer_untouched_without_response_redaction() -> None:
    policy = GuardrailPolicy(pii={"email": Action.REDACT})
    screening = screen_request(policy, chat("hi"), "gpt-4o-mini")
    answer = b'{"choices":[{"message":{"content":"alice@example.com"}}]}'
    assert screening.answer(answer) == (answer, [])


def _openai_chunks(pieces: list[str]) -> bytes:
    events = [{"id": "c", "choices": [{"index": 0, "delta": {"content": piece},
                                       "finish_reason": None}]} for piece in pieces]
    events.append({"id": "c", "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
    return b"".join(b"data: " + json.dumps(e).encode() + b"\n\n" for e in events) + \
        b"data: [DONE]\n\n"


def _openai_text(stream: bytes) -> str:
    text = ""
    for event in SseDecoder().feed(stream):
        if event.data != "[DONE]":
            for choice in json.loads(event.data)["choices"]:
                text += choice["delta"].get("content", "")
    return text


@pytest.mark.parametrize("split", [1, 3, 7, 1000])
def test_stream_redaction_sees_values_split_across_chunks(split: int) -> None:
    redactor = Redactor({"email": Action.REDACT})
    stream = StreamRedactor(redactor, Dialect.OPENAI, window=24)
    raw = _openai_chunks(["Mail jo", "hn.doe@exa", "mple.com now, or john.doe@example.com",
                          " again"])
    out = b"".join(stream.feed(raw[i:i + split]) for i in range(0, len(raw), split))
    out += stream.flush()
    assert _openai_text(out) == "Mail [EMAIL_1] now, or [EMAIL_1] again"
    assert out.endswith(b"data: [DONE]\n\n")
    assert redactor.redacted["email"] == 2


def test_stream_holds_back_at_most_the_window() -> None:
    stream = StreamRedactor(Redactor({"email": Action.REDACT}), Dialect.OPENAI, window=8)
    out = stream.feed(_openai_chunks(["x" * 30])[:-len(b"data: [DONE]\n\n")].split(b"\n\n")[0]
                      + b"\n\n")
    assert _openai_text(out) == "x" * 22


def test_anthropic_stream_redaction() -> None:
    redactor = Redactor({"phone": Action.REDACT})
    stream = StreamRedactor(redactor, Dialect.ANTHROPIC, window=16)
    events = [("message_start", {"type": "message_start", "message": {"id": "m"}}),
              ("content_block_start", {"type": "content_block_start", "index": 0,
                                       "content_block": {"type": "text", "text": ""}})]
    for piece in ["Call +44 20 79", "46 0958 today"]:
        events.append(("content_block_delta", {"type": "content_block_delta", "index": 0,
                                               "delta": {"type": "text_delta", "text": piece}}))
    events += [("content_block_stop", {"type": "content_block_stop", "index": 0}),
               ("message_stop", {"type": "message_stop"})]
    raw = b"".join(f"event: {name}\ndata: {json.dumps(data)}\n\n".encode()
                   for name, data in events)
    out = stream.feed(raw) + stream.flush()
    decoded = SseDecoder().feed(out)
    text = "".join(json.loads(e.data)["delta"]["text"] for e in decoded
                   if e.event == "content_block_delta")
    assert text == "Call [PHONE_1] today"
    names = [e.event for e in decoded]
    assert names.index("content_block_stop") > max(
        i for i, name in enumerate(names) if name == "content_block_delta")
    assert names[-1] == "message_stop"


# --- config ------------------------------------------------------------------------------

def _config(guardrails: dict[str, Any], profiles: dict[str, Any] | None = None) -> Any:
    document = gateway_config(1)
    document["tenants"]["acme"]["guardrails"] = guardrails
    if profiles is not None:
        document["guardrail_profiles"] = profiles
    return parse_config(yaml.safe_dump(document))


def test_config_compiles_tenant_guardrails_and_profiles() -> None:
    config = _config(
        {"models": {"deny": ["gpt-4o"]}, "max_tokens": 512, "n": 1,
         "temperature": {"min": 0, "max": 1}, "tools": False,
         "response_format": ["text"], "prompt": {"max_bytes": 2048},
         "pii": {"email": "redact", "credit_card": "deny", "phone": "allow"},
         "responses": {"redact": True, "stream_window": 32}},
        profiles={"strict": {"pii": {"email": "deny"}}})
    policy = config.tenants["acme"].guardrails
    assert policy == GuardrailPolicy(
        models_deny=frozenset({"gpt-4o"}), max_tokens=512, max_n=1, temperature_min=0.0,
        temperature_max=1.0, tools_allowed=False, response_formats=frozenset({"text"}),
        max_prompt_bytes=2048, pii={"email": Action.REDACT, "credit_card": Action.DENY,
                                    "phone": Action.ALLOW},
        responses=ResponseRedaction(enabled=True, stream_window=32))
    assert config.guardrail_profiles["strict"].pii == {"email": Action.DENY}
    assert config.tenants["globex"].guardrails is None


def test_config_refuses_unknown_models_and_actions() -> None:
    with pytest.raises(ConfigError) as caught:
        _config({"models": {"allow": ["nope"]}, "pii": {"email": "mask"}})
    issues = {(issue.path, issue.message) for issue in caught.value.issues}
    assert ("tenants.acme.guardrails.pii.email", "unknown action 'mask'") in issues
    with pytest.raises(ConfigError) as caught:
        _config({"models": {"allow": ["nope"]}})
    assert [(i.path, i.message) for i in caught.value.issues] == [
        ("tenants.acme.guardrails.models.allow[0]", "unknown model 'nope'")]


def test_route_metadata_names_a_profile() -> None:
    strict = GuardrailPolicy(max_n=1)
    assert route_guardrails({"strict": strict}, {"guardrails": "strict"}) is strict
    assert route_guardrails({"strict": strict}, {"pin": "x"}) is None
    assert route_guardrails({}, None) is None
    with pytest.raises(GatewayError) as caught:
        route_guardrails({"strict": strict}, {"guardrails": "lenient"})
    assert caught.value.status == 500


def test_route_override_leaves_the_guardrails_field_to_guardrails() -> None:
    assert RouteOverride.from_metadata({"guardrails": "strict"}) is None
    override = RouteOverride.from_metadata({"guardrails": "strict", "pin": "emu-eu"})
    assert override == RouteOverride(pin="emu-eu")


def test_a_callers_actions_are_read_on_every_redactor() -> None:
    """A policy's compiled actions are cached by identity; a plain mapping a caller may
    change afterwards is read again (a stale cache would keep redacting)."""
    actions = {"email": Action.REDACT}
    assert Redactor(actions).text("mail a@example.com") == "mail [EMAIL_1]"
    actions["email"] = Action.ALLOW
    assert Redactor(actions).text("mail a@example.com") == "mail a@example.com"


def test_a_policys_actions_are_compiled_once() -> None:
    from extproc.guardrails.redact import _compiled

    policy = GuardrailPolicy(pii=MappingProxyType({"email": Action.DENY,
                                                   "phone": Action.ALLOW}))
    first = _compiled(policy.pii)
    assert first == ({"email": Action.DENY}, ("email",), True)
    assert _compiled(policy.pii) is first
