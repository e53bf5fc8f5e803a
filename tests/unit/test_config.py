"""Config validation (`extproc.config`) and the `extproc check-config` command.

Every validation rule has one small fixture in `config_cases/`; the table below is the
exact list of (path, message) problems each must produce, in the order they are found.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

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
    Model,
    Price,
    Provider,
    RecordStoreSettings,
    RedisSettings,
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
    "missing_version": [("version", "unsupported version None")],
    "missing_auth": [
        ("auth", NOT_MAPPING),
        ("auth.pepper", NOT_MAPPING),
        ("auth.pepper", EXACTLY_ONE),
    ],
    "missing_provider_fields": [
        ("providers.prov-us.kind", "is required"),
        ("providers.prov-us.base_url", "is required"),
        ("providers.prov-us.region", "is required"),
        ("providers.prov-us.zone", "is required"),
        ("providers.prov-us.cluster", "is required"),
    ],
    "missing_price": [
        (PRICE, NOT_MAPPING),
        (f"{PRICE}.input_per_mtok", "is required"),
        (f"{PRICE}.output_per_mtok", "is required"),
    ],
    "missing_tenant_keys_and_models": [
        ("tenants.acme.keys", "must be a non-empty list of {id, hash}"),
        ("tenants.acme.models", "must be a non-empty list of model names"),
    ],
    "missing_key_hash": [("tenants.acme.keys[0].hash", "is required")],
    "no_providers": [
        ("providers", "must define at least one provider"),
        ("models.gpt-4o-mini.deployments[0].provider", "unknown provider 'prov-us'"),
    ],
    "not_a_mapping": [
        ("", "must be a mapping, got list"),
        ("version", "unsupported version None"),
        ("auth", NOT_MAPPING),
        ("auth.pepper", NOT_MAPPING),
        ("auth.pepper", EXACTLY_ONE),
        ("providers", NOT_MAPPING),
        ("models", NOT_MAPPING),
        ("tenants", NOT_MAPPING),
    ],
    # version
    "bad_version": [("version", "unsupported version 2")],
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
    # syntax
    "invalid_yaml": [("", "not valid YAML: expected ',' or ']', but got '<scalar>'")],
}

LINES: dict[str, list[int | None]] = {
    "unknown_field_top": [23],
    "invalid_yaml": [19],
    "duplicate_key_hash": [24],
    "pin_outside_zone": [36],
    "money_too_precise": [17],
    "missing_auth": [None, None, None],  # an absent section has no line to point at
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
        "known fields: zone, keys, models, routing, org, budgets, rate_limits, "
        "on_redis_error, fail_open_ceiling_usd, max_tokens, credentials")


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
                           models=frozenset({"gpt-4o-mini"}), pins={"gpt-4o-mini": "prov-eu"}),
            "globex": Tenant(id="globex", zone=None, keys=(TenantKey("globex-1", HASH_B),),
                             models=frozenset({"gpt-4o-mini", "gpt-4o"}), pins={}),
        },
    )
    for frozen in (config, config.limits, config.pepper, config.providers["prov-us"],
                   config.models["gpt-4o"].price, config.tenants["acme"]):
        first_field = dataclasses.fields(frozen)[0].name
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(frozen, first_field, "changed")
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
        f"{path}: 3 problem(s)\n"
        "  models.gpt-4o-mini.price: must be a mapping, got nothing\n"
        "  models.gpt-4o-mini.price.input_per_mtok: is required\n"
        "    hint: USD per million tokens, e.g. 0.15\n"
        "  models.gpt-4o-mini.price.output_per_mtok: is required\n"
        "    hint: USD per million tokens, e.g. 0.15"
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
         "e.g. {env: OPENAI_API_KEY} or {file: /run/secrets/openai}"),
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
        ("secrets.store.token", EXACTLY_ONE,
         "e.g. {env: OPENAI_API_KEY} or {file: /run/secrets/openai}"),
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
