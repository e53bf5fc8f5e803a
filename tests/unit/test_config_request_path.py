"""The config fields of the request path: `providers.<name>.forward_headers`,
`models.<name>.output_limit_field` and `budgets.multiple_choices`, each with its exact
error and hint."""

from __future__ import annotations

from typing import Any

import pytest
import yaml

from extproc.config import ConfigError, GatewayConfig, parse_config

HASH = "hmac-sha256:v1:" + "a" * 64


def _config(*, provider: dict[str, Any] | None = None, model: dict[str, Any] | None = None,
            budgets: dict[str, Any] | None = None) -> GatewayConfig:
    document: dict[str, Any] = {
        "version": 1,
        "auth": {"pepper": {"env": "ASC_PEPPER"}},
        "credentials": {"cred-us": {"env": "ASC_KEY_US"}},
        "providers": {"prov-us": {"kind": "anthropic", "base_url": "http://127.0.0.1:18080",
                                  "region": "us-east-1", "zone": "us", "cluster": "prov_us",
                                  "credentials": ["cred-us"], **(provider or {})}},
        "models": {"m": {"price": {"input_per_mtok": 1, "output_per_mtok": 2},
                         "deployments": [{"provider": "prov-us"}], **(model or {})}},
        "tenants": {"acme": {"keys": [{"id": "k", "hash": HASH}], "models": ["m"]}},
    }
    if budgets is not None:
        document["budgets"] = budgets
    return parse_config(yaml.safe_dump(document))


def _issues(**parts: Any) -> list[tuple[str, str, str]]:
    with pytest.raises(ConfigError) as caught:
        _config(**parts)
    return [(issue.path, issue.message, issue.hint) for issue in caught.value.issues]


def test_defaults() -> None:
    config = _config()
    assert config.providers["prov-us"].forward_headers == ()
    assert config.models["m"].output_limit_field is None
    assert config.budgets.multiple_choices == "hold_all"


def test_values_are_read() -> None:
    config = _config(provider={"forward_headers": ["anthropic-beta", "x-trace", "x-trace"]},
                     model={"output_limit_field": "max_completion_tokens"},
                     budgets={"multiple_choices": "refuse"})
    assert config.providers["prov-us"].forward_headers == ("anthropic-beta", "x-trace")
    assert config.models["m"].output_limit_field == "max_completion_tokens"
    assert config.budgets.multiple_choices == "refuse"
    assert _config(model={"output_limit_field": None}).models["m"].output_limit_field is None


_REFUSED_HINT = ("credentials and account headers are the gateway's to set, x-asc-* headers "
                 "are the gateway's own, framing headers are Envoy's")


@pytest.mark.parametrize(("names", "issues"), [
    (["authorization"], [("providers.prov-us.forward_headers[0]",
                          "the header 'authorization' cannot be forwarded", _REFUSED_HINT)]),
    (["x-api-key", "x-asc-cluster"], [
        ("providers.prov-us.forward_headers[0]",
         "the header 'x-api-key' cannot be forwarded", _REFUSED_HINT),
        ("providers.prov-us.forward_headers[1]",
         "the header 'x-asc-cluster' cannot be forwarded", _REFUSED_HINT)]),
    (["Anthropic-Beta"], [("providers.prov-us.forward_headers[0]",
                           "not a lower-case header name: 'Anthropic-Beta'",
                           "e.g. anthropic-beta")]),
    ("anthropic-beta", [("providers.prov-us.forward_headers",
                         "must be a list of header names, got str", "e.g. [anthropic-beta]")]),
])
def test_forward_headers_refuses_credentials_and_gateway_headers(
    names: object, issues: list[tuple[str, str, str]]
) -> None:
    assert _issues(provider={"forward_headers": names}) == issues


def test_output_limit_field_error() -> None:
    assert _issues(model={"output_limit_field": "max_output_tokens"}) == [(
        "models.m.output_limit_field",
        "must be one of max_tokens, max_completion_tokens or null, got 'max_output_tokens'",
        "o-series and gpt-5 models take max_completion_tokens; leave it out to let the "
        "gateway pick by model family")]


def test_multiple_choices_error() -> None:
    assert _issues(budgets={"multiple_choices": "allow"}) == [(
        "budgets.multiple_choices", "must be one of hold_all, refuse, got 'allow'",
        "hold_all holds budget for every choice of a request with n > 1")]
