"""Config validation (`extproc.config`) and the `extproc check-config` command.

Every validation rule has one small fixture in `config_cases/`; the table below is the
exact list of (path, message) problems each must produce, in the order they are found.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import random
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from pydantic import ValidationError

from extproc.cli import main
from extproc.config import (
    SCHEMA,
    BudgetSettings,
    ConfigError,
    ConfigIssue,
    CredentialRef,
    Deployment,
    GatewayConfig,
    Limits,
    MetricsConfig,
    Model,
    Price,
    Provider,
    RecordStoreSettings,
    RedisSettings,
    RoutePolicy,
    SecretsSettings,
    Tenant,
    TenantKey,
    load_config,
    parse_config,
)
from extproc.money import cost_micro_usd

CASES_DIR = Path(__file__).resolve().parent / "config_cases"
REPO_ROOT = Path(__file__).resolve().parents[2]
DEMO_CONFIG = REPO_ROOT / "deploy" / "demo" / "asc.yaml"
HASH_A = "hmac-sha256:v1:" + "a" * 64
HASH_B = "hmac-sha256:v1:" + "b" * 64

UNKNOWN = "unknown field"
RANGE = "must be an integer from 1 to 67108864"
RESPONSE_RANGE = "must be an integer from 65536 to 1073741824"
EXACTLY_ONE = "needs exactly one of `env` or `file`"
NOT_MAPPING = "must be a mapping, got nothing"
PRICE = "models.gpt-4o-mini.price"
BASE_URL = "providers.prov-us.base_url"
NOT_HTTP = "not an http(s) URL with a host: "
NO_QUERY = "must not carry a query, fragment or credentials"

EXPECTED: dict[str, list[tuple[str, str]]] = {
    # unknown fields, one per section of config.SCHEMA
    "unknown_field_top": [("colour", UNKNOWN)],
    "unknown_field_auth": [("auth.salt", UNKNOWN)],
    "unknown_field_pepper": [("auth.pepper.vault", UNKNOWN)],
    "unknown_field_limits": [("limits.max_tokens", UNKNOWN)],
    "unknown_field_redis": [("redis.db", UNKNOWN)],
    "unknown_field_credential": [("credentials.cred-us.rotate", UNKNOWN)],
    "unknown_field_provider": [("providers.prov-us.weight", UNKNOWN)],
    "unknown_field_model": [("models.gpt-4o-mini.aliases", UNKNOWN)],
    "unknown_field_price": [(f"{PRICE}.currency", UNKNOWN)],
    "unknown_field_deployment": [("models.gpt-4o-mini.deployments[0].weight", UNKNOWN)],
    "unknown_field_tenant": [("tenants.acme.budget", UNKNOWN)],
    "unknown_field_key": [("tenants.acme.keys[0].secret", UNKNOWN)],
    "unknown_field_routing": [("tenants.acme.routing.gpt-4o-mini.weight", UNKNOWN)],
    # missing required fields
    "missing_version": [("version", "is required")],
    "missing_auth": [("auth", "is required")],
    "missing_provider_fields": [
        ("providers.prov-us.kind", "is required"),
        ("providers.prov-us.base_url", "is required"),
        ("providers.prov-us.region", "is required"),
        ("providers.prov-us.zone", "is required"),
        ("providers.prov-us.cluster", "is required"),
    ],
    "missing_price": [(PRICE, "is required")],
    "missing_tenant_keys_and_models": [
        ("tenants.acme.keys", "must be a non-empty list of {id, hash}"),
        ("tenants.acme.models", "must be a non-empty list of model names"),
    ],
    "missing_key_hash": [("tenants.acme.keys[0].hash", "is required")],
    "no_providers": [
        ("providers", "must define at least one provider"),
        ("models.gpt-4o-mini.deployments[0].provider", "unknown provider 'prov-us'"),
    ],
    "not_a_mapping": [("", "must be a mapping, got list")],
    # version
    "bad_version": [("version", "unsupported version 2")],
    # metrics
    "bad_metrics_max_tenant_labels": [
        ("metrics.max_tenant_labels", "must be an integer from 0 to 100000"),
    ],
    # secret references
    "pepper_both_env_and_file": [("auth.pepper", EXACTLY_ONE)],
    "pepper_neither_env_nor_file": [("auth.pepper", EXACTLY_ONE)],
    "credential_bad_env_name": [
        ("credentials.cred-us.env", "must be an environment variable name"),
    ],
    # base_url
    "base_url_no_host": [(BASE_URL, NOT_HTTP + "'http:///v2'")],
    "base_url_ftp": [(BASE_URL, NOT_HTTP + "'ftp://files.example.com'")],
    "base_url_query": [(BASE_URL, NO_QUERY)],
    "base_url_credentials": [(BASE_URL, NO_QUERY)],
    "base_url_v1": [(BASE_URL, "must not end in /v1")],
    "base_url_v1beta": [(BASE_URL, "must not end in /v1beta")],
    # providers
    "unsupported_provider_kind": [
        ("providers.prov-us.kind", "provider kind 'bedrock' is not supported yet"),
    ],
    "unknown_credential": [
        ("providers.prov-us.credentials[0]", "unknown credential 'cred-missing'"),
    ],
    "openai_without_credentials": [
        ("providers.prov-us.credentials", "openai providers need at least one credential"),
    ],
    "bad_cluster_name": [("providers.prov-us.cluster", "invalid Envoy cluster name 'prov us'")],
    # money
    "money_negative": [(f"{PRICE}.input_per_mtok", "must be a finite number >= 0")],
    "money_too_precise": [(f"{PRICE}.output_per_mtok", "has more than 6 decimal places")],
    "money_string": [(f"{PRICE}.input_per_mtok", "must be a number, got 'cheap'")],
    "money_bool": [(f"{PRICE}.output_per_mtok", "must be a number, got bool")],
    # deployments
    "empty_deployments": [("models.gpt-4o-mini.deployments", "must be a non-empty list")],
    "unknown_deployment_provider": [
        ("models.gpt-4o-mini.deployments[1].provider", "unknown provider 'prov-ghost'"),
    ],
    # tenants, keys, routing
    "bad_key_hash": [("tenants.acme.keys[0].hash", "not a key hash")],
    "duplicate_key_hash": [
        ("tenants.beta.keys[0].hash", "same key already used by tenants.acme.keys[0]"),
    ],
    "unknown_tenant_model": [("tenants.acme.models[1]", "unknown model 'gpt-5'")],
    "routing_unknown_model": [("tenants.acme.routing.gpt-5", "unknown model 'gpt-5'")],
    "pin_not_a_deployment": [
        ("tenants.acme.routing.gpt-4o.pin", "'prov-eu' is not a deployment of gpt-4o"),
    ],
    "pin_outside_zone": [
        ("tenants.acme.routing.gpt-4o-mini.pin", "'prov-us' is outside the tenant's zone 'eu'"),
    ],
    "model_without_deployment_in_zone": [
        ("tenants.acme.models", "model 'gpt-4o' has no deployment in zone 'eu'"),
    ],
    # limits, redis
    "max_body_bytes_zero": [("limits.max_body_bytes", RANGE)],
    "max_body_bytes_too_large": [("limits.max_body_bytes", RANGE)],
    "max_response_bytes_too_small": [("limits.max_response_bytes", RESPONSE_RANGE)],
    "max_response_bytes_too_large": [("limits.max_response_bytes", RESPONSE_RANGE)],
    "bad_redis_url": [("redis.url", "must start with redis://, rediss:// or unix://")],
    "redis_sentinel_with_cluster": [("redis.sentinel", "cannot be used with cluster: true")],
    "redis_sentinel_bad_address": [("redis.sentinel.addresses[0]",
                                    "not host:port: 'sentinel-a'")],
    # syntax
    "invalid_yaml": [("", "not valid YAML: expected ',' or ']', but got '<scalar>'")],
    # duplicate keys, at any depth (YAML itself keeps the last one silently)
    "duplicate_tenant_block": [("tenants.acme", "duplicate key 'acme'")],
    "duplicate_field": [
        ("providers.prov-us.zone", "duplicate key 'zone'"),
        ("models.gpt-4o-mini.price.input_per_mtok", "duplicate key 'input_per_mtok'"),
    ],
    # an entry with a shape problem still has its cross-references checked (acme's zone)
    "five_mistakes": [
        ("providers.openai-us.base_url", "must not end in /v1"),
        ("models.gpt-4o-mini.price.output_per_mtok", "has more than 6 decimal places"),
        ("tenants.acme.keys[0].hash", "not a key hash"),
        ("tenants.acme.budget", UNKNOWN),
        ("tenants.acme.models", "model 'gpt-4o-mini' has no deployment in zone 'eu'"),
    ],
}

LINES: dict[str, list[int | None]] = {
    "unknown_field_top": [23],
    "invalid_yaml": [19],
    "duplicate_key_hash": [24],
    "pin_outside_zone": [36],
    "money_too_precise": [17],
    "missing_auth": [None],  # an absent section has no line to point at
    "duplicate_tenant_block": [23],  # the second block
    "duplicate_field": [13, 18],
    "five_mistakes": [9, 16, 22, 24, 23],
}


def test_every_fixture_has_expectations() -> None:
    assert sorted(p.stem for p in CASES_DIR.glob("*.yaml")) == sorted(EXPECTED)


@pytest.mark.parametrize("case", sorted(EXPECTED))
def test_invalid_config_reports_exact_issues(case: str) -> None:
    path = CASES_DIR / f"{case}.yaml"
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert caught.value.source == str(path)
    assert [(i.path, i.message) for i in caught.value.issues] == EXPECTED[case]
    if case in LINES:
        assert [i.line for i in caught.value.issues] == LINES[case]


def test_fixtures_differ_from_a_valid_config_only_by_their_rule() -> None:
    """The base the fixtures are built from is itself valid."""
    text = (CASES_DIR / "unknown_field_top.yaml").read_text(encoding="utf-8")
    config = parse_config(text.replace("colour: blue\n", ""))
    assert sorted(config.tenants) == ["acme"]


def test_issue_hints() -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(CASES_DIR / "base_url_v1.yaml")
    assert caught.value.issues == [ConfigIssue(
        BASE_URL, "must not end in /v1",
        "the gateway appends the API path (/v1/chat/completions) itself", 10)]
    with pytest.raises(ConfigError) as caught:
        load_config(CASES_DIR / "unknown_field_tenant.yaml")
    assert caught.value.issues[0].hint == (
        "known fields: zone, keys, models, route_policy, routing, debug, org, budgets, "
        "rate_limits, on_redis_error, fail_open_ceiling_usd, max_tokens, credentials, "
        "guardrails, teams, mesh_identities, "
        "responses_store, audit")


VALID = f"""\
version: 1
auth:
  pepper: {{file: secrets/pepper.txt}}
limits: {{max_body_bytes: 2048}}
redis: {{url: "rediss://cache.internal:6380/1"}}
credentials:
  cred-us: {{env: ASC_KEY_US}}
  cred-eu: {{file: keys/eu.key}}
  cred-abs: {{file: /run/secrets/abs}}
providers:
  prov-us:
    kind: openai
    base_url: "https://api.openai.com"
    region: us-east-1
    zone: us
    cluster: prov_us
    credentials: [cred-us]
  prov-eu:
    kind: openai_compatible
    base_url: "http://10.1.2.3:8080/openai/"
    region: eu-west-1
    zone: eu
    cluster: prov_eu
    credentials: [cred-eu, cred-abs]
  local:
    kind: openai_compatible
    base_url: "http://localhost"
    region: lab
    zone: lab
    cluster: local
models:
  gpt-4o-mini:
    price: {{input_per_mtok: 0.15, output_per_mtok: 0.60, cached_input_per_mtok: 0.075}}
    deployments:
      - {{provider: prov-us}}
      - {{provider: prov-eu, model: gpt-4o-mini-eu}}
  gpt-4o:
    price: {{input_per_mtok: "2.5", output_per_mtok: 10}}
    deployments: [{{provider: prov-us}}, {{provider: local, model: llama-3}}]
tenants:
  acme:
    zone: eu
    keys: [{{id: acme-1, hash: "{HASH_A}"}}]
    models: [gpt-4o-mini]
    routing:
      gpt-4o-mini: {{pin: prov-eu}}
  globex:
    keys:
      - {{id: globex-1, hash: "{HASH_B}"}}
    models: [gpt-4o-mini, gpt-4o]
"""


def test_valid_config_compiles_to_frozen_objects(tmp_path: Path) -> None:
    config_path = tmp_path / "asc.yaml"
    config_path.write_text(VALID, encoding="utf-8")

    config = load_config(config_path)

    assert config == GatewayConfig(
        source=str(config_path),
        pepper=CredentialRef("pepper", file=tmp_path / "secrets" / "pepper.txt"),
        limits=Limits(max_body_bytes=2048),
        redis=RedisSettings(url="rediss://cache.internal:6380/1"),
        budgets=BudgetSettings(),
        secrets=SecretsSettings(),
        credentials={
            "cred-us": CredentialRef("cred-us", env="ASC_KEY_US"),
            "cred-eu": CredentialRef("cred-eu", file=tmp_path / "keys" / "eu.key"),
            "cred-abs": CredentialRef("cred-abs", file=Path("/run/secrets/abs")),
        },
        providers={
            "prov-us": Provider(
                name="prov-us", kind="openai", base_url="https://api.openai.com",
                scheme="https", host="api.openai.com", port=443, path_prefix="",
                region="us-east-1", zone="us", cluster="prov_us", credentials=("cred-us",)),
            "prov-eu": Provider(
                name="prov-eu", kind="openai_compatible",
                base_url="http://10.1.2.3:8080/openai/", scheme="http", host="10.1.2.3",
                port=8080, path_prefix="/openai", region="eu-west-1", zone="eu",
                cluster="prov_eu", credentials=("cred-eu", "cred-abs")),
            "local": Provider(
                name="local", kind="openai_compatible", base_url="http://localhost",
                scheme="http", host="localhost", port=80, path_prefix="", region="lab",
                zone="lab", cluster="local", credentials=()),
        },
        models={
            "gpt-4o-mini": Model(
                name="gpt-4o-mini",
                price=Price(input_micro_per_mtok=150_000, output_micro_per_mtok=600_000,
                            cached_input_micro_per_mtok=75_000),
                deployments=(Deployment("prov-us", "gpt-4o-mini"),
                             Deployment("prov-eu", "gpt-4o-mini-eu"))),
            "gpt-4o": Model(
                name="gpt-4o",
                price=Price(input_micro_per_mtok=2_500_000, output_micro_per_mtok=10_000_000,
                            cached_input_micro_per_mtok=2_500_000),
                deployments=(Deployment("prov-us", "gpt-4o"), Deployment("local", "llama-3"))),
        },
        tenants={
            "acme": Tenant(id="acme", zone="eu", keys=(TenantKey("acme-1", HASH_A),),
                           models=frozenset({"gpt-4o-mini"}),
                           policies={"gpt-4o-mini": RoutePolicy(pin="prov-eu")}),
            "globex": Tenant(id="globex", zone=None, keys=(TenantKey("globex-1", HASH_B),),
                             models=frozenset({"gpt-4o-mini", "gpt-4o"})),
        },
        metrics=MetricsConfig(labelled_tenants=frozenset({"acme", "globex"})),
    )
    for frozen in (config, config.pepper, config.providers["prov-us"],
                   config.models["gpt-4o"].price, config.tenants["acme"]):
        first_field = dataclasses.fields(frozen)[0].name
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(frozen, first_field, "changed")
    # Settings sections are their (frozen) pydantic models.
    for settings in (config.limits, config.redis, config.budgets):
        with pytest.raises(ValidationError, match="frozen"):
            settings.__setattr__(next(iter(type(settings).model_fields)), "changed")
    assert isinstance(config.models["gpt-4o"].price.input_micro_per_mtok, int)


def test_parse_config_resolves_relative_files_against_base_dir(tmp_path: Path) -> None:
    config = parse_config(VALID, source="inline", base_dir=tmp_path)
    assert config.source == "inline"
    assert config.pepper.file == tmp_path / "secrets" / "pepper.txt"


def test_limits_and_redis_are_optional() -> None:
    text = (CASES_DIR / "unknown_field_top.yaml").read_text(encoding="utf-8")
    config = parse_config(text.replace("colour: blue\n", ""))
    assert config.limits == Limits(max_body_bytes=1_048_576, max_response_bytes=8_388_608)
    assert config.redis is None
    assert config.budgets == BudgetSettings(timezone="UTC", hold_ttl_s=600,
                                            default_max_tokens=4096)


@pytest.mark.parametrize(
    ("tokens", "price", "cost"),
    [
        (0, 150_000, 0),
        (1, 150_000, 1),             # 0.15 micro-USD rounds up to 1
        (7, 150_000, 2),             # 1.05 -> 2
        (10, 100_000, 1),            # exactly 1, no rounding
        (3, 333_333, 1),             # 0.999999 -> 1
        (1_000_000, 150_000, 150_000),
        (1_000_001, 1_000_000, 1_000_001),
        (5, 0, 0),
    ],
)
def test_cost_micro_usd_rounds_up(tokens: int, price: int, cost: int) -> None:
    assert cost_micro_usd(tokens, price) == cost


def test_config_error_str_lists_every_issue() -> None:
    error = ConfigError("asc.yaml", [
        ConfigIssue("version", "unsupported version 2", "set `version: 1`", 3),
        ConfigIssue("redis.url", "must start with redis://, rediss:// or unix://"),
        ConfigIssue("", "must be a mapping, got list", "", 1),
    ])
    assert str(error) == (
        "asc.yaml: 3 problem(s)\n"
        "  version (line 3): unsupported version 2\n"
        "    hint: set `version: 1`\n"
        "  redis.url: must start with redis://, rediss:// or unix://\n"
        "  <document> (line 1): must be a mapping, got list"
    )


def test_config_error_from_a_file_names_every_problem() -> None:
    path = CASES_DIR / "missing_price.yaml"
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert str(caught.value) == (
        f"{path}: 1 problem(s)\n"
        "  models.gpt-4o-mini.price: is required"
    )


def test_unreadable_file(tmp_path: Path) -> None:
    path = tmp_path / "missing.yaml"
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert caught.value.issues == [ConfigIssue("", "cannot read file: No such file or directory")]


def test_check_config_ok_on_demo(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check-config", str(DEMO_CONFIG)]) == 0
    out, err = capsys.readouterr()
    assert out == f"{DEMO_CONFIG}: ok (2 tenants, 2 providers, 2 models)\n"
    assert err == ""


def test_check_config_lists_problems(capsys: pytest.CaptureFixture[str]) -> None:
    path = CASES_DIR / "missing_tenant_keys_and_models.yaml"
    assert main(["check-config", str(path)]) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert err == (
        f"{path}: 2 problem(s)\n"
        "  tenants.acme.keys: must be a non-empty list of {id, hash}\n"
        "    hint: create a hash with `extproc keys hash --config asc.yaml`\n"
        "  tenants.acme.models: must be a non-empty list of model names\n"
    )


# --- secrets.store: where sealed records live ---------------------------------------------

STORE_BASE = (CASES_DIR / "unknown_field_top.yaml").read_text(encoding="utf-8").replace(
    "colour: blue\n", "")
VAULT_ONLY = ("only applies to backend vault_kv", "remove it, or set backend: vault_kv")
KV_PATH = "must be names separated by '/', without a leading or trailing '/'"
NOT_HTTP_STORE = ("must be an http(s) URL with a host", "e.g. https://openbao.internal:8200")
TOKEN_HINT = "e.g. {env: BAO_TOKEN} or {file: /run/secrets/bao-token}"
KV = 'backend: vault_kv, url: "https://bao.internal:8200", token: {env: BAO_TOKEN}'


def store_config(store: str, base_dir: Path | None = None) -> GatewayConfig:
    return parse_config(f"{STORE_BASE}secrets:\n  store: {store}\n", base_dir=base_dir)


def test_record_store_defaults_to_redis() -> None:
    assert parse_config(STORE_BASE).secrets.store == RecordStoreSettings()
    assert store_config("{backend: redis}").secrets.store == RecordStoreSettings()
    assert RecordStoreSettings() == RecordStoreSettings(
        backend="redis", url=None, mount="secret", prefix="asc", token=None)


def test_record_store_vault_kv(tmp_path: Path) -> None:
    store = store_config(f"{{{KV}}}").secrets.store
    assert store == RecordStoreSettings(
        backend="vault_kv", url="https://bao.internal:8200", mount="secret", prefix="asc",
        token=CredentialRef("token", env="BAO_TOKEN"))

    custom = store_config('{backend: vault_kv, url: "http://127.0.0.1:8200", mount: kv/asc, '
                          "prefix: gateway/prod, token: {file: bao-token}}",
                          base_dir=tmp_path).secrets.store
    assert custom == RecordStoreSettings(
        backend="vault_kv", url="http://127.0.0.1:8200", mount="kv/asc",
        prefix="gateway/prod", token=CredentialRef("token", file=tmp_path / "bao-token"))
    with pytest.raises(dataclasses.FrozenInstanceError):
        custom.backend = "redis"  # type: ignore[misc]


STORE_CASES: dict[str, tuple[str, list[tuple[str, str, str]]]] = {
    "not_a_mapping": ("vault_kv", [("secrets.store", "must be a mapping, got str", "")]),
    "unknown_field": ("{backend: redis, region: eu}", [
        ("secrets.store.region", UNKNOWN, "known fields: backend, url, mount, prefix, token"),
    ]),
    "missing_backend": ('{url: "https://bao.internal:8200"}', [
        ("secrets.store.backend", "is required", "redis or vault_kv"),
    ]),
    "empty": ("{}", [("secrets.store.backend", "is required", "redis or vault_kv")]),
    "unknown_backend": ("{backend: consul}", [
        ("secrets.store.backend", "unknown record store backend 'consul'", "redis or vault_kv"),
    ]),
    "redis_with_vault_fields": (
        '{backend: redis, url: "https://bao.internal:8200", mount: secret, prefix: asc, '
        "token: {env: BAO_TOKEN}}", [
            ("secrets.store.url", *VAULT_ONLY),
            ("secrets.store.mount", *VAULT_ONLY),
            ("secrets.store.prefix", *VAULT_ONLY),
            ("secrets.store.token", *VAULT_ONLY),
        ]),
    "vault_kv_missing_url_and_token": ("{backend: vault_kv}", [
        ("secrets.store.url", "is required with backend vault_kv",
         "e.g. https://openbao.internal:8200"),
        ("secrets.store.token", "is required with backend vault_kv", TOKEN_HINT),
    ]),
    "url_not_a_string": ("{backend: vault_kv, url: 8200, token: {env: BAO_TOKEN}}", [
        ("secrets.store.url", "must be a non-empty string, got int", ""),
    ]),
    "url_not_http": ('{backend: vault_kv, url: "ftp://bao.internal", token: {env: T}}', [
        ("secrets.store.url", *NOT_HTTP_STORE),
    ]),
    "url_without_host": ('{backend: vault_kv, url: "https://", token: {env: T}}', [
        ("secrets.store.url", *NOT_HTTP_STORE),
    ]),
    "url_bad_port": ('{backend: vault_kv, url: "https://bao:99999", token: {env: T}}', [
        ("secrets.store.url", *NOT_HTTP_STORE),
    ]),
    "url_with_credentials": (
        '{backend: vault_kv, url: "https://user:s3cret@bao.internal", token: {env: T}}', [
            ("secrets.store.url", "must not carry a query, fragment or credentials",
             "put the token under secrets.store.token"),
        ]),
    "url_with_query": ('{backend: vault_kv, url: "https://bao?token=x", token: {env: T}}', [
        ("secrets.store.url", "must not carry a query, fragment or credentials",
         "put the token under secrets.store.token"),
    ]),
    "mount_slashes": (f"{{{KV}, mount: /secret/}}", [
        ("secrets.store.mount", KV_PATH, "e.g. secret"),
    ]),
    "mount_dot_dot": (f"{{{KV}, mount: secret/../sys}}", [
        ("secrets.store.mount", KV_PATH, "e.g. secret"),
    ]),
    "mount_empty": (f'{{{KV}, mount: ""}}', [
        ("secrets.store.mount", "must be a non-empty string, got str", ""),
    ]),
    "prefix_slashes": (f"{{{KV}, prefix: asc/}}", [
        ("secrets.store.prefix", KV_PATH, "e.g. asc"),
    ]),
    "prefix_not_a_string": (f"{{{KV}, prefix: [asc]}}", [
        ("secrets.store.prefix", "must be a non-empty string, got list", ""),
    ]),
    "token_both": ('{backend: vault_kv, url: "https://bao", token: {env: T, file: t}}', [
        ("secrets.store.token", EXACTLY_ONE,
         "e.g. {file: /run/secrets/asc-vault-token} or {env: ASC_VAULT_TOKEN}"),
    ]),
    "token_bad_env": ('{backend: vault_kv, url: "https://bao", token: {env: 1BAD}}', [
        ("secrets.store.token.env", "must be an environment variable name", ""),
    ]),
    "token_unknown_field": ('{backend: vault_kv, url: "https://bao", token: {env: T, '
                            "role: x}}", [
        ("secrets.store.token.role", UNKNOWN, "known fields: env, file"),
    ]),
    "token_not_a_mapping": ('{backend: vault_kv, url: "https://bao", token: s.abc}', [
        ("secrets.store.token", "must be a mapping, got str", ""),
    ]),
}


@pytest.mark.parametrize("case", sorted(STORE_CASES))
def test_invalid_record_store_reports_exact_issues(case: str) -> None:
    store, expected = STORE_CASES[case]
    with pytest.raises(ConfigError) as caught:
        store_config(store)
    assert [(i.path, i.message, i.hint) for i in caught.value.issues] == expected
    store_line = STORE_BASE.count("\n") + 2
    assert {i.line for i in caught.value.issues} <= {store_line, None}  # None: a missing key
    assert "s3cret" not in str(caught.value)


def test_record_store_issues_point_at_their_line() -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(f"{STORE_BASE}secrets:\n  store:\n    backend: vault_kv\n"
                     "    url: ftp://x\n    token: {env: T}\n")
    assert [(i.path, i.line) for i in caught.value.issues] == [
        ("secrets.store.url", STORE_BASE.count("\n") + 4)]


def test_record_store_is_a_schema_section() -> None:
    assert "store" in SCHEMA["secrets"]
    assert SCHEMA["secrets.store"] == ("backend", "url", "mount", "prefix", "token")


# --- duplicate keys and every problem at once ---------------------------------------------

def test_duplicate_key_hint_names_the_first_line() -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(CASES_DIR / "duplicate_tenant_block.yaml")
    assert caught.value.issues == [ConfigIssue(
        "tenants.acme", "duplicate key 'acme'",
        "first defined at line 20; YAML would keep only the last one: merge them or remove "
        "one", 23)]


EVERYTHING_AT_ONCE = f"""\
version: 1
auth: {{pepper: {{env: ASC_PEPPER}}}}
credentials:
  cred-us: {{env: ASC_KEY_US}}
providers:
  prov-us: {{kind: openai, base_url: "http://10.0.0.1", region: r, zone: us,
            cluster: prov_us, credentials: [cred-us]}}
  prov-bad: {{kind: bedrock, base_url: "http://10.0.0.2", region: r, zone: us,
             cluster: prov_bad, credentials: [cred-us]}}
models:
  m:
    price: {{input_per_mtok: 1, output_per_mtok: 2}}
    deployments: [{{provider: prov-us}}, {{provider: prov-bad}}, {{provider: prov-none}}]
tenants:
  acme:
    keys: [{{id: a-1, hash: "{HASH_A}"}}]
    models: [m]
  acme:
    keys: [{{id: a-1, hash: "not-a-hash"}}]
    models: [m]
  beta:
    keys: [{{id: b-1, hash: "{HASH_B}"}}]
    models: [m, gpt-9]
    zone: us
    routing: {{m: {{pin: prov-bad}}}}
"""


def test_every_problem_is_reported_in_one_pass() -> None:
    """YAML duplicates, shape problems and cross-references together; an entry with a
    shape problem (prov-bad) is not reported again where it is named (a deployment, a
    pin)."""
    with pytest.raises(ConfigError) as caught:
        parse_config(EVERYTHING_AT_ONCE)
    assert [(i.path, i.message, i.line) for i in caught.value.issues] == [
        ("tenants.acme", "duplicate key 'acme'", 18),
        ("providers.prov-bad.kind", "provider kind 'bedrock' is not supported yet", 8),
        ("tenants.acme.keys[0].hash", "not a key hash", 19),
        ("models.m.deployments[2].provider", "unknown provider 'prov-none'", 13),
        ("tenants.beta.models[1]", "unknown model 'gpt-9'", 23),
    ]


# --- fields added with the pydantic schema -------------------------------------------------

def with_lines(*replacements: tuple[str, str]) -> str:
    text = STORE_BASE
    for old, new in replacements:
        assert old in text
        text = text.replace(old, new)
    return text


def test_new_fields_default_to_their_documented_values() -> None:
    config = parse_config(STORE_BASE + 'redis: {url: "redis://127.0.0.1:6379"}\n')
    assert config.redis == RedisSettings(url="redis://127.0.0.1:6379", cluster=False,
                                         timeout_ms=50, queue_timeout_ms=1000)
    assert config.budgets.multiple_choices == "hold_all"
    assert config.limits == Limits(max_body_bytes=1_048_576, max_response_bytes=8_388_608)
    assert config.providers["prov-us"].forward_headers == ()
    assert config.models["gpt-4o-mini"].output_limit_field is None


def test_new_fields_reach_the_runtime_objects() -> None:
    config = parse_config(with_lines(
        ("    credentials: [cred-us]\n",
         "    credentials: [cred-us]\n"
         "    forward_headers: [openai-beta, x-request-tag, openai-beta]\n"),
        ("    deployments: [{provider: prov-us}]\n",
         "    deployments: [{provider: prov-us}]\n"
         "    output_limit_field: max_completion_tokens\n"),
    ) + 'redis: {url: "redis://r:6379", queue_timeout_ms: 60000}\n'
        "budgets: {multiple_choices: refuse}\n"
        "limits: {max_response_bytes: 65536}\n")
    assert config.redis is not None
    assert config.redis.queue_timeout_ms == 60_000
    assert config.budgets.multiple_choices == "refuse"
    assert config.limits.max_response_bytes == 65_536
    assert config.providers["prov-us"].forward_headers == ("openai-beta", "x-request-tag")
    assert config.models["gpt-4o-mini"].output_limit_field == "max_completion_tokens"


REFUSED = ("credentials and account headers are the gateway's to set, x-asc-* headers "
           "are the gateway's own, framing headers are Envoy's")
HEADERS = "providers.prov-us.forward_headers"


@pytest.mark.parametrize(
    ("addition", "expected"),
    [
        pytest.param('redis: {url: "redis://r", queue_timeout_ms: 0}\n',
                     [("redis.queue_timeout_ms", "must be an integer from 1 to 60000", "")],
                     id="queue-timeout-zero"),
        pytest.param('redis: {url: "redis://r", queue_timeout_ms: 60001}\n',
                     [("redis.queue_timeout_ms", "must be an integer from 1 to 60000", "")],
                     id="queue-timeout-too-long"),
        pytest.param("budgets: {multiple_choices: split}\n",
                     [("budgets.multiple_choices", "must be one of hold_all, refuse, got 'split'",
                       "hold_all holds budget for every choice of a request with n > 1")],
                     id="multiple-choices"),
        pytest.param("limits: {max_response_bytes: 65535}\n",
                     [("limits.max_response_bytes",
                       "must be an integer from 65536 to 1073741824", "")],
                     id="max-response-too-small"),
        pytest.param("limits: {max_response_bytes: 1073741825}\n",
                     [("limits.max_response_bytes",
                       "must be an integer from 65536 to 1073741824", "")],
                     id="max-response-too-large"),
    ],
)
def test_new_settings_are_checked(addition: str, expected: list[tuple[str, str, str]]) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(STORE_BASE + addition)
    assert [(i.path, i.message, i.hint) for i in caught.value.issues] == expected


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        pytest.param("[authorization]", [(f"{HEADERS}[0]",
                                          "the header 'authorization' cannot be forwarded",
                                          REFUSED)], id="authorization"),
        pytest.param("[openai-beta, x-api-key, api-key, proxy-authorization, cookie, "
                     "x-goog-api-key, host, content-length, transfer-encoding, connection, "
                     "accept-encoding, openai-organization, openai-project, anthropic-version]",
                     [(f"{HEADERS}[{index}]", f"the header {name!r} cannot be forwarded",
                       REFUSED) for index, name in enumerate(
                          ["x-api-key", "api-key", "proxy-authorization", "cookie",
                           "x-goog-api-key", "host", "content-length", "transfer-encoding",
                           "connection", "accept-encoding", "openai-organization",
                           "openai-project", "anthropic-version"], start=1)],
                     id="every-refused-header"),
        pytest.param("[x-asc-tenant]", [(f"{HEADERS}[0]",
                                         "the header 'x-asc-tenant' cannot be forwarded",
                                         REFUSED)], id="gateway-header"),
        pytest.param("[OpenAI-Beta]", [(f"{HEADERS}[0]",
                                        "not a lower-case header name: 'OpenAI-Beta'",
                                        "e.g. anthropic-beta")], id="upper-case"),
        pytest.param("['x y']", [(f"{HEADERS}[0]", "not a lower-case header name: 'x y'",
                                  "e.g. anthropic-beta")], id="not-a-token"),
        pytest.param(f"[{'x' * 101}]", [(f"{HEADERS}[0]",
                                         f"not a lower-case header name: {'x' * 101!r}",
                                         "e.g. anthropic-beta")], id="too-long"),
        pytest.param("openai-beta", [(HEADERS, "must be a list of header names, got str",
                                      "e.g. [anthropic-beta]")], id="not-a-list"),
    ],
)
def test_forward_headers_refuse_credentials_and_bad_names(
    headers: str, expected: list[tuple[str, str, str]]
) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(with_lines(("    credentials: [cred-us]\n",
                                 f"    credentials: [cred-us]\n    forward_headers: {headers}\n")))
    assert [(i.path, i.message, i.hint) for i in caught.value.issues] == expected


def test_output_limit_field_is_one_of_two_names() -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(with_lines(("    deployments: [{provider: prov-us}]\n",
                                 "    deployments: [{provider: prov-us}]\n"
                                 "    output_limit_field: max_output_tokens\n")))
    assert [(i.path, i.message, i.hint) for i in caught.value.issues] == [(
        "models.gpt-4o-mini.output_limit_field",
        "must be one of max_tokens, max_completion_tokens or null, got 'max_output_tokens'",
        "o-series and gpt-5 models take max_completion_tokens; leave it out to let the "
        "gateway pick by model family")]


# --- the published JSON Schema -------------------------------------------------------------

SCHEMA_FILE = REPO_ROOT / "deploy" / "schema" / "asc.schema.json"


def schema_validator() -> jsonschema.protocols.Validator:
    schema = json.loads(SCHEMA_FILE.read_text(encoding="utf-8"))
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def test_shipped_schema_is_what_the_command_prints(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["config", "schema"]) == 0
    out, err = capsys.readouterr()
    assert err == ""
    assert out == SCHEMA_FILE.read_text(encoding="utf-8"), (
        "regenerate it: extproc config schema > deploy/schema/asc.schema.json")


@pytest.mark.parametrize("demo", sorted((REPO_ROOT / "deploy" / "demo").glob("*.yaml")),
                         ids=lambda path: path.name)
def test_demo_configs_validate_against_the_schema(demo: Path) -> None:
    document = yaml.safe_load(demo.read_text(encoding="utf-8"))
    assert [error.message for error in schema_validator().iter_errors(document)] == []
    load_config(demo)


def test_schema_accepts_the_full_example_and_refuses_what_the_gateway_refuses() -> None:
    validator = schema_validator()
    assert list(validator.iter_errors(yaml.safe_load(VALID))) == []
    allowed = VALID.replace("    credentials: [cred-us]\n", "    credentials: [cred-us]\n"
                            "    forward_headers: [openai-beta]\n")
    assert list(validator.iter_errors(yaml.safe_load(allowed))) == []
    parse_config(allowed)
    for old, new in [
        ("version: 1\n", "version: 2\n"),
        ("limits: {max_body_bytes: 2048}", "limits: {max_body_bytes: 0}"),
        ("limits: {max_body_bytes: 2048}", "limits: {max_bytes: 2048}"),
        ("kind: openai\n", "kind: bedrock\n"),
        (HASH_A, "sk-plaintext"),
        ("output_per_mtok: 10}", "output_per_mtok: ten}"),
        ("  globex:", "  'globex co':"),
        ("    credentials: [cred-us]\n", "    credentials: [cred-us]\n"
                                        "    forward_headers: [authorization]\n"),
        ("    credentials: [cred-us]\n", "    credentials: [cred-us]\n"
                                        "    forward_headers: [x-asc-tenant]\n"),
    ]:
        text = VALID.replace(old, new, 1)
        assert text != VALID
        with pytest.raises(ConfigError):
            parse_config(text)
        assert list(validator.iter_errors(yaml.safe_load(text))) != [], (old, new)


ODD_VALUES: list[object] = [None, 0, -1, True, 1.5, "", "x", "bad name!", [], {}, [1],
                            {"a": 1}, "http://h", "eu", "prov-us", "gpt-4o", 10**12]


def test_any_mangled_document_gives_config_error_never_a_crash() -> None:
    """Seeded mutations of the full example (values replaced, keys dropped or added): the
    three passes and the partial compile after a shape problem never crash, and a refusal
    always names at least one problem."""
    base = yaml.safe_load(VALID)

    def locations(node: object, path: tuple[object, ...] = ()) -> list[tuple[object, ...]]:
        found = [path] if path else []
        items = (node.items() if isinstance(node, dict)
                 else enumerate(node) if isinstance(node, list) else [])
        for key, child in items:
            found += locations(child, (*path, key))
        return found

    targets = locations(base)
    rng = random.Random(8)
    refused = 0
    for _ in range(300):
        document = copy.deepcopy(base)
        for _ in range(rng.randint(1, 3)):
            *parents, last = rng.choice(targets)
            parent: Any = document
            try:
                for part in parents:
                    parent = parent[part]
                choice = rng.random()
                if choice < 0.7:
                    parent[last] = copy.deepcopy(rng.choice(ODD_VALUES))
                elif isinstance(parent, dict):
                    parent.pop(last) if choice < 0.85 else parent.update(extra=1)
            except (KeyError, IndexError, TypeError):
                continue  # an earlier mutation removed this place
        try:
            parse_config(yaml.safe_dump(document))
        except ConfigError as exc:
            issues = exc.issues
            refused += 1
            assert issues
    assert refused > 250


def test_a_model_with_a_broken_deployment_list_is_not_reported_again() -> None:
    """Its deployments are unknown, so no pin or zone problem is made up from them."""
    with pytest.raises(ConfigError) as caught:
        parse_config(VALID.replace("      - {provider: prov-us}\n", "      - prov-us\n"))
    assert [(i.path, i.message) for i in caught.value.issues] == [
        ("models.gpt-4o-mini.deployments[0]", "must be a mapping, got str")]


@pytest.mark.parametrize(
    ("credential", "expected"),
    [
        pytest.param("{env: ASC_KEY_US, keyring: true}", [(
            "credentials.cred-us", "needs exactly one of `env`, `file` or `keyring`",
            "e.g. {env: OPENAI_API_KEY}, {file: /run/secrets/openai} or {keyring: true}")],
            id="keyring-and-env"),
        pytest.param("{weight: 2}", [(
            "credentials.cred-us", "needs exactly one of `env`, `file` or `keyring`",
            "e.g. {env: OPENAI_API_KEY}, {file: /run/secrets/openai} or {keyring: true}")],
            id="no-source"),
        pytest.param("{keyring: false}", [(
            "credentials.cred-us.keyring", "must be true",
            "or use {env: ...} / {file: ...} for a plain reference")], id="keyring-false"),
        pytest.param("{env: ASC_KEY_US, rotate: daily}", [(
            "credentials.cred-us.rotate", "unknown field",
            "known fields: env, file, keyring, weight")], id="unknown-field"),
        pytest.param("{file: ''}", [(
            "credentials.cred-us.file", "must be a non-empty string, got str", "")],
            id="empty-file"),
        pytest.param("{env: ASC_KEY_US, weight: 1001}", [(
            "credentials.cred-us.weight", "must be an integer from 0 to 1000", "")],
            id="weight-too-large"),
    ],
)
def test_credential_reference_rules(credential: str,
                                    expected: list[tuple[str, str, str]]) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(STORE_BASE.replace("cred-us: {env: ASC_KEY_US}", f"cred-us: {credential}"))
    assert [(i.path, i.message, i.hint) for i in caught.value.issues] == expected


def test_an_empty_redis_section_is_refused() -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(STORE_BASE + "redis: {}\n")
    assert [(i.path, i.message) for i in caught.value.issues] == [("redis.url", "is required")]


def test_check_config_reports_a_duplicate_with_line_and_hint(
    capsys: pytest.CaptureFixture[str]
) -> None:
    path = CASES_DIR / "duplicate_tenant_block.yaml"
    assert main(["check-config", str(path)]) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert err == (
        f"{path}: 1 problem(s)\n"
        "  tenants.acme (line 23): duplicate key 'acme'\n"
        "    hint: first defined at line 20; YAML would keep only the last one: merge them "
        "or remove one\n"
    )


def test_deep_nesting_is_a_config_error_not_a_crash() -> None:
    """PyYAML recurses once per level: 3,000 nested lists raised RecursionError, which
    `extproc check-config` printed as a traceback and a reload did not catch."""
    with pytest.raises(ConfigError) as caught:
        parse_config(STORE_BASE + "limits: " + "[" * 3000 + "]" * 3000 + "\n")
    assert [(i.path, i.message) for i in caught.value.issues] == [("", "nested too deeply")]
