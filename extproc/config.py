"""`asc.yaml` -> one immutable, typed `GatewayConfig`.

The file is validated completely before anything uses it: every problem is reported with
its path in the file (and its line), a message and a hint, so an operator fixes them all in
one pass. A running server swaps configs atomically (`runtime.RuntimeHolder`); a reload that
fails validation keeps the old config (see `server.py`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Final
from urllib.parse import urlsplit
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import yaml

from extproc.budgets.policy import BudgetRule, RateLimits, Scope, TenantBudget, Window
from extproc.money import MoneyError, micro_from_usd

__all__ = [
    "MULTIPLE_CHOICES_MODES",
    "OUTPUT_LIMIT_FIELDS",
    "SCHEMA",
    "SUPPORTED_PROVIDER_KINDS",
    "BudgetSettings",
    "ConfigError",
    "ConfigIssue",
    "CredentialRef",
    "Deployment",
    "GatewayConfig",
    "Limits",
    "Model",
    "Price",
    "Provider",
    "RedisSettings",
    "Tenant",
    "TenantKey",
    "load_config",
    "parse_config",
]

SUPPORTED_PROVIDER_KINDS: Final = ("openai", "openai_compatible", "mistral", "azure",
                                   "anthropic")
"""Provider kinds (`translate.base.Backend` values). Only `openai_compatible` may run
without a credential (self-hosted servers without auth)."""

KEY_HASH_RE: Final = re.compile(r"^hmac-sha256:v1:[0-9a-f]{64}$")
_NAME_RE: Final = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
_CLUSTER_RE: Final = re.compile(r"^[A-Za-z0-9_.-]{1,128}$")
_ENV_RE: Final = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_KV_PATH_RE: Final = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*(/[A-Za-z0-9][A-Za-z0-9_.-]*)*$")
DEFAULT_MAX_BODY_BYTES: Final = 1_048_576
DEFAULT_MAX_RESPONSE_BYTES: Final = 8_388_608
_MAX_RESPONSE_BYTES_RANGE: Final = (65_536, 1_073_741_824)

OUTPUT_LIMIT_FIELDS: Final = ("max_tokens", "max_completion_tokens")
MULTIPLE_CHOICES_MODES: Final = ("hold_all", "refuse")
_HEADER_NAME_RE: Final = re.compile(r"^[a-z0-9!#$%&'*+.^_`|~-]{1,100}$")
_UNFORWARDABLE_HEADERS: Final = frozenset({
    "authorization", "proxy-authorization", "x-api-key", "api-key", "x-goog-api-key",
    "cookie", "host", "content-length", "transfer-encoding", "connection",
    "accept-encoding", "openai-organization", "openai-project", "anthropic-version",
})
"""Headers `forward_headers` may not name: credentials (the provider key is the gateway's
to set), framing headers Envoy and the gateway own, and headers that pick an account."""

SCHEMA: Final[dict[str, tuple[str, ...]]] = {
    "": ("version", "auth", "limits", "redis", "budgets", "secrets", "credentials", "providers",
         "models", "orgs", "tenants"),
    "auth": ("pepper",),
    "auth.pepper": ("env", "file"),
    "secrets": ("kek", "store", "cache_ttl_s", "max_age_s", "state_ttl_s", "rollback_after"),
    "secrets.kek": ("backend", "path", "url", "mount", "key", "token", "role_id",
                    "secret_id"),
    "secrets.store": ("backend", "url", "mount", "prefix", "token"),
    "limits": ("max_body_bytes", "max_response_bytes"),
    "redis": ("url", "cluster", "timeout_ms", "queue_timeout_ms"),
    "budgets": ("timezone", "hold_ttl_s", "default_max_tokens", "multiple_choices"),
    "credentials.<id>": ("env", "file", "keyring", "weight"),
    "providers.<name>": ("kind", "base_url", "region", "zone", "cluster", "credentials",
                         "api_version", "forward_headers"),
    "models.<name>": ("price", "deployments", "output_limit_field"),
    "models.<name>.price": ("input_per_mtok", "output_per_mtok", "cached_input_per_mtok"),
    "models.<name>.deployments[]": ("provider", "model"),
    "orgs.<id>": ("budgets",),
    "orgs.<id>.budgets[]": ("window", "period_s", "limit_usd"),
    "tenants.<id>": ("zone", "keys", "models", "routing", "org", "budgets", "rate_limits",
                     "on_redis_error", "fail_open_ceiling_usd", "max_tokens", "credentials"),
    "tenants.<id>.budgets[]": ("scope", "key", "model", "window", "period_s", "limit_usd"),
    "tenants.<id>.rate_limits": ("rpm", "tpm"),
    "tenants.<id>.keys[]": ("id", "hash"),
    "tenants.<id>.routing.<model>": ("pin",),
}
"""Every field the config accepts, by section: the validator and the docs check use it."""


@dataclass(frozen=True, slots=True)
class ConfigIssue:
    path: str
    message: str
    hint: str = ""
    line: int | None = None

    def __str__(self) -> str:
        path = self.path or "<document>"
        where = f"{path} (line {self.line})" if self.line else path
        text = f"{where}: {self.message}"
        return f"{text}\n    hint: {self.hint}" if self.hint else text


class ConfigError(Exception):
    """The config is invalid; `issues` lists every problem found."""

    def __init__(self, source: str, issues: list[ConfigIssue]) -> None:
        self.source = source
        self.issues = issues
        lines = "\n".join(f"  {issue}" for issue in issues)
        super().__init__(f"{source}: {len(issues)} problem(s)\n{lines}")


@dataclass(frozen=True, slots=True)
class CredentialRef:
    """Where a secret lives; never the secret itself. Exactly one of env / file / keyring."""

    id: str
    env: str | None = None
    file: Path | None = None
    keyring: bool = False
    """Sealed versions in the envelope-encrypted keyring (`extproc keys add`)."""
    weight: int = 1
    """Share of a provider's traffic among its healthy credentials."""


@dataclass(frozen=True, slots=True)
class KekSettings:
    backend: str
    path: Path | None = None
    url: str | None = None
    mount: str = "transit"
    key: str = "asc-kek"
    token: CredentialRef | None = None
    role_id: str | None = None
    secret_id: CredentialRef | None = None


@dataclass(frozen=True, slots=True)
class RecordStoreSettings:
    """Where sealed records live: `redis` (next to their state) or `vault_kv` (KV v2)."""

    backend: str = "redis"
    url: str | None = None
    mount: str = "secret"
    prefix: str = "asc"
    token: CredentialRef | None = None


@dataclass(frozen=True, slots=True)
class SecretsSettings:
    kek: KekSettings | None = None
    store: RecordStoreSettings = field(default_factory=RecordStoreSettings)
    cache_ttl_s: int = 300
    max_age_s: int = 3600
    state_ttl_s: float = 1.0
    rollback_after: int = 3


@dataclass(frozen=True, slots=True)
class Provider:
    name: str
    kind: str
    base_url: str
    scheme: str
    host: str
    port: int
    path_prefix: str
    region: str
    zone: str
    cluster: str
    credentials: tuple[str, ...]
    api_version: str | None = None
    """Azure OpenAI `api-version` query value."""
    forward_headers: tuple[str, ...] = ()
    """Client request headers forwarded to this provider on top of its kind's allow-list
    (lower case); a provider answer to a request that carried one may be the client's fault."""


@dataclass(frozen=True, slots=True)
class Price:
    """Micro-USD per million tokens (1 USD/Mtok == 1 micro-USD per token)."""

    input_micro_per_mtok: int
    output_micro_per_mtok: int
    cached_input_micro_per_mtok: int


@dataclass(frozen=True, slots=True)
class Deployment:
    provider: str
    model: str


@dataclass(frozen=True, slots=True)
class Model:
    name: str
    price: Price
    deployments: tuple[Deployment, ...]
    output_limit_field: str | None = None
    """The body field that bounds output tokens upstream ("max_tokens" or
    "max_completion_tokens"); None: the translator's rule for the model family."""


@dataclass(frozen=True, slots=True)
class TenantKey:
    id: str
    hash: str


@dataclass(frozen=True, slots=True)
class Tenant:
    id: str
    zone: str | None
    keys: tuple[TenantKey, ...]
    models: frozenset[str]
    pins: Mapping[str, str] = field(default_factory=dict)
    budget: TenantBudget | None = None
    """None when the tenant has no budgets and no rate limits: no Redis call at all."""
    own_credentials: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    """BYOK: provider name -> this tenant's own keyring credentials (scope tenant:<id>)."""
    max_tokens: int | None = None
    """Largest `max_tokens` a request may ask for (also the default when it asks none)."""


@dataclass(frozen=True, slots=True)
class RedisSettings:
    url: str
    cluster: bool = False
    timeout_ms: int = 50
    """Bound on Redis I/O: connect and socket read/write timeouts."""
    queue_timeout_ms: int = 1000
    """Bound on the wait for a free Redis connection; past it the request is shed (503)
    without counting against Redis in the breaker."""


@dataclass(frozen=True, slots=True)
class BudgetSettings:
    timezone: str = "UTC"
    hold_ttl_s: int = 600
    default_max_tokens: int = 4096
    multiple_choices: str = "hold_all"
    """Requests with `n` > 1 for budget tenants: "hold_all" holds every choice, "refuse"
    answers 400."""


@dataclass(frozen=True, slots=True)
class Limits:
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    max_response_bytes: int = DEFAULT_MAX_RESPONSE_BYTES
    """Largest non-streamed provider answer Envoy buffers for the service (its listener's
    per-connection buffer limit); a larger one is Envoy's 500 `response_payload_too_large`."""


@dataclass(frozen=True, slots=True)
class GatewayConfig:
    source: str
    pepper: CredentialRef
    limits: Limits
    redis: RedisSettings | None
    budgets: BudgetSettings
    secrets: SecretsSettings
    credentials: Mapping[str, CredentialRef]
    providers: Mapping[str, Provider]
    models: Mapping[str, Model]
    tenants: Mapping[str, Tenant]


class _Checker:
    """Collects issues while walking the raw YAML; knows the line of every path."""

    def __init__(self, lines: dict[str, int]) -> None:
        self.issues: list[ConfigIssue] = []
        self._lines = lines

    def add(self, path: str, message: str, hint: str = "") -> None:
        self.issues.append(ConfigIssue(path, message, hint, self._lines.get(path)))

    def mapping(self, value: object, path: str, *, required: bool = True) -> dict[str, Any]:
        if value is None and not required:
            return {}
        if not isinstance(value, dict):
            self.add(path, f"must be a mapping, got {_kind(value)}")
            return {}
        return {str(k): v for k, v in value.items()}

    def nonempty_list(self, value: object, path: str, message: str,
                      hint: str = "") -> list[Any]:
        """`value` if it is a non-empty list; else report `message` and return []."""
        if isinstance(value, list) and value:
            return value
        self.add(path, message, hint)
        return []

    def unknown(self, raw: dict[str, Any], path: str, known: tuple[str, ...]) -> None:
        for key in raw:
            if key not in known:
                self.add(_join(path, key), "unknown field", f"known fields: {', '.join(known)}")

    def string(self, raw: dict[str, Any], key: str, path: str, *, required: bool = True) -> str:
        value = raw.get(key)
        here = _join(path, key)
        if value is None:
            if required:
                self.add(here, "is required")
            return ""
        if not isinstance(value, str) or not value:
            self.add(here, f"must be a non-empty string, got {_kind(value)}")
            return ""
        return value

    def name(self, value: str, path: str) -> None:
        if not _NAME_RE.match(value):
            self.add(path, f"invalid name {value!r}", "use letters, digits, '_', '.', '-'")

    def money(self, raw: dict[str, Any], key: str, path: str, *, required: bool = True,
              example: str = "USD per million tokens, e.g. 0.15") -> int:
        value = raw.get(key)
        here = _join(path, key)
        if value is None:
            if required:
                self.add(here, "is required", example)
            return 0
        if isinstance(value, bool) or not isinstance(value, int | float | str):
            self.add(here, f"must be a number, got {_kind(value)}")
            return 0
        try:
            return micro_from_usd(value)
        except MoneyError as exc:
            self.add(here, str(exc), exc.hint)
            return 0


def _join(path: str, key: str | int) -> str:
    if isinstance(key, int):
        return f"{path}[{key}]"
    return f"{path}.{key}" if path else key


def _kind(value: object) -> str:
    return "nothing" if value is None else type(value).__name__


def _line_map(text: str) -> dict[str, int]:
    """Map every dotted path of the YAML document to its 1-based line number."""
    lines: dict[str, int] = {}
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError:
        return lines

    def walk(node: yaml.Node, path: str) -> None:
        lines.setdefault(path, node.start_mark.line + 1)
        if isinstance(node, yaml.MappingNode):
            for key_node, value_node in node.value:
                child = _join(path, str(key_node.value))
                lines[child] = key_node.start_mark.line + 1
                walk(value_node, child)
        elif isinstance(node, yaml.SequenceNode):
            for index, item in enumerate(node.value):
                walk(item, _join(path, index))

    if root is not None:
        walk(root, "")
    return lines


def load_config(path: str | Path) -> GatewayConfig:
    """Read and validate `path`; raises `ConfigError` listing every problem."""
    source = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(source, [ConfigIssue("", f"cannot read file: {exc.strerror}")]) from None
    return parse_config(text, source=source, base_dir=Path(path).resolve().parent)


def parse_config(
    text: str, *, source: str = "<string>", base_dir: Path | None = None
) -> GatewayConfig:
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark is not None else None
        issue = ConfigIssue("", f"not valid YAML: {getattr(exc, 'problem', exc)}", "", line)
        raise ConfigError(source, [issue]) from None
    check = _Checker(_line_map(text))
    config = _compile(raw, check, source, base_dir or Path.cwd())
    if check.issues:
        raise ConfigError(source, check.issues)
    return config


def _compile(raw_doc: object, check: _Checker, source: str, base_dir: Path) -> GatewayConfig:
    doc = check.mapping(raw_doc, "")
    check.unknown(doc, "", SCHEMA[""])
    version = doc.get("version")
    if type(version) is not int or version != 1:
        check.add("version", f"unsupported version {version!r}", "set `version: 1`")

    auth = check.mapping(doc.get("auth"), "auth")
    check.unknown(auth, "auth", SCHEMA["auth"])
    pepper = _secret_ref("pepper", auth.get("pepper"), "auth.pepper", check, base_dir)

    limits_raw = check.mapping(doc.get("limits"), "limits", required=False)
    check.unknown(limits_raw, "limits", SCHEMA["limits"])
    max_body = limits_raw.get("max_body_bytes", DEFAULT_MAX_BODY_BYTES)
    if isinstance(max_body, bool) or not isinstance(max_body, int) or not 1 <= max_body <= 64 << 20:
        check.add("limits.max_body_bytes", "must be an integer from 1 to 67108864")
        max_body = DEFAULT_MAX_BODY_BYTES
    max_response = limits_raw.get("max_response_bytes", DEFAULT_MAX_RESPONSE_BYTES)
    low, high = _MAX_RESPONSE_BYTES_RANGE
    if (isinstance(max_response, bool) or not isinstance(max_response, int)
            or not low <= max_response <= high):
        check.add("limits.max_response_bytes", f"must be an integer from {low} to {high}")
        max_response = DEFAULT_MAX_RESPONSE_BYTES

    redis = _redis(doc.get("redis"), check)
    budget_settings = _budget_settings(doc.get("budgets"), check)

    credentials: dict[str, CredentialRef] = {}
    for cred_id, cred_raw in check.mapping(doc.get("credentials"), "credentials",
                                           required=False).items():
        check.name(cred_id, _join("credentials", cred_id))
        credentials[cred_id] = _provider_credential(
            cred_id, cred_raw, _join("credentials", cred_id), check, base_dir
        )
    secrets_settings = _secrets(doc.get("secrets"), check, base_dir)
    if any(ref.keyring for ref in credentials.values()):
        if secrets_settings.kek is None:
            check.add("secrets.kek", "keyring credentials need a KEK",
                      "e.g. {backend: file, path: kek.key} (extproc keys init-kek)")
        if redis is None:
            check.add("redis", "keyring credentials need Redis (key versions and their state)",
                      "set redis.url")

    providers: dict[str, Provider] = {}
    for name, prov_raw in check.mapping(doc.get("providers"), "providers").items():
        provider = _provider(name, prov_raw, check, credentials)
        if provider is not None:
            providers[name] = provider
    upstream_of_cluster: dict[str, tuple[str, str, int, str]] = {}
    for provider in providers.values():
        upstream = (provider.scheme, provider.host, provider.port, provider.path_prefix)
        known = upstream_of_cluster.setdefault(provider.cluster, upstream)
        if provider.cluster and known != upstream:
            check.add(_join(_join("providers", provider.name), "cluster"),
                      f"cluster {provider.cluster!r} is used by another provider with a "
                      "different base_url", "give each upstream its own Envoy cluster")
    if not providers and not any(i.path.startswith("providers") for i in check.issues):
        check.add("providers", "must define at least one provider")

    models: dict[str, Model] = {}
    for name, model_raw in check.mapping(doc.get("models"), "models").items():
        models[name] = _model(name, model_raw, check, providers)

    orgs: dict[str, tuple[BudgetRule, ...]] = {}
    for org_id, org_raw in check.mapping(doc.get("orgs"), "orgs", required=False).items():
        org_path = _join("orgs", org_id)
        check.name(org_id, org_path)
        org = check.mapping(org_raw, org_path)
        check.unknown(org, org_path, SCHEMA["orgs.<id>"])
        orgs[org_id] = _budget_rules(org.get("budgets"), _join(org_path, "budgets"), check,
                                     org_level=True)

    tenants: dict[str, Tenant] = {}
    seen_hashes: dict[str, str] = {}
    for tenant_id, tenant_raw in check.mapping(doc.get("tenants"), "tenants").items():
        tenant = _tenant(tenant_id, tenant_raw, check, models, providers, seen_hashes)
        tenant = _with_budget(tenant, tenant_raw, check, orgs, budget_settings)
        tenants[tenant_id] = _with_own_credentials(tenant, tenant_raw, check, providers,
                                                   credentials)
        if tenants[tenant_id].budget is not None and redis is None:
            check.add(_join("tenants", tenant_id), "budgets and rate limits need Redis",
                      "set redis.url")

    return GatewayConfig(
        source=source,
        pepper=pepper,
        limits=Limits(max_body_bytes=max_body, max_response_bytes=max_response),
        redis=redis,
        budgets=budget_settings,
        secrets=secrets_settings,
        credentials=credentials,
        providers=providers,
        models=models,
        tenants=tenants,
    )


def _secret_ref(
    ref_id: str, raw_value: object, path: str, check: _Checker, base_dir: Path,
    extra_fields: tuple[str, ...] = (),
) -> CredentialRef:
    """An `{env: NAME}` or `{file: PATH}` reference (relative paths: to the config file)."""
    raw = check.mapping(raw_value, path)
    check.unknown(raw, path, ("env", "file", *extra_fields))
    env = raw.get("env")
    file = raw.get("file")
    if (env is None) == (file is None):
        check.add(path, "needs exactly one of `env` or `file`",
                  "e.g. {env: OPENAI_API_KEY} or {file: /run/secrets/openai}")
        return CredentialRef(ref_id)
    if env is not None:
        if not isinstance(env, str) or not _ENV_RE.match(env):
            check.add(_join(path, "env"), "must be an environment variable name")
        return CredentialRef(ref_id, env=str(env))
    if not isinstance(file, str) or not file:
        check.add(_join(path, "file"), "must be a file path")
        return CredentialRef(ref_id)
    return CredentialRef(ref_id, file=_relative_to(base_dir, file))


def _relative_to(base_dir: Path, file: str) -> Path:
    path = Path(file)
    return path if path.is_absolute() else base_dir / path


def _provider_credential(
    ref_id: str, raw_value: object, path: str, check: _Checker, base_dir: Path
) -> CredentialRef:
    raw = check.mapping(raw_value, path)
    weight = _int_field(raw, "weight", path, check, low=0, high=1000, default=1)
    if "keyring" in raw:
        check.unknown(raw, path, ("keyring", "weight"))
        if raw["keyring"] is not True:
            check.add(_join(path, "keyring"), "must be true",
                      "or use {env: ...} / {file: ...} for a plain reference")
        return CredentialRef(ref_id, keyring=True, weight=1 if weight is None else weight)
    fields = {k: v for k, v in raw.items() if k != "weight"}
    ref = _secret_ref(ref_id, fields, path, check, base_dir)
    return replace(ref, weight=1 if weight is None else weight)


def _secrets(raw_value: object, check: _Checker, base_dir: Path) -> SecretsSettings:
    raw = check.mapping(raw_value, "secrets", required=False)
    check.unknown(raw, "secrets", SCHEMA["secrets"])
    kek = None
    if "kek" in raw:
        kek_raw = check.mapping(raw["kek"], "secrets.kek")
        check.unknown(kek_raw, "secrets.kek", SCHEMA["secrets.kek"])
        backend = kek_raw.get("backend")
        if backend == "file":
            file = check.string(kek_raw, "path", "secrets.kek")
            kek = KekSettings(backend="file", path=_relative_to(base_dir, file) if file
                              else None)
        elif backend == "transit":
            url = check.string(kek_raw, "url", "secrets.kek")
            token = (_secret_ref("token", kek_raw["token"], "secrets.kek.token", check,
                                 base_dir) if "token" in kek_raw else None)
            role_id = check.string(kek_raw, "role_id", "secrets.kek", required=False) or None
            secret_id = (_secret_ref("secret_id", kek_raw["secret_id"],
                                     "secrets.kek.secret_id", check, base_dir)
                         if "secret_id" in kek_raw else None)
            if (token is None) == (role_id is None):
                check.add("secrets.kek", "transit needs exactly one of `token` or "
                          "`role_id` + `secret_id`")
            elif role_id is not None and secret_id is None:
                check.add("secrets.kek.secret_id", "is required with role_id")
            kek = KekSettings(
                backend="transit", url=url,
                mount=check.string(kek_raw, "mount", "secrets.kek", required=False)
                or "transit",
                key=check.string(kek_raw, "key", "secrets.kek", required=False) or "asc-kek",
                token=token, role_id=role_id, secret_id=secret_id)
        else:
            check.add("secrets.kek.backend", f"unknown KEK backend {backend!r}",
                      "file or transit")
    store = (_record_store(raw["store"], check, base_dir) if "store" in raw
             else RecordStoreSettings())
    defaults = SecretsSettings()
    return SecretsSettings(
        kek=kek,
        store=store,
        cache_ttl_s=_int_field(raw, "cache_ttl_s", "secrets", check, low=1, high=86_400,
                               default=defaults.cache_ttl_s) or defaults.cache_ttl_s,
        max_age_s=_int_field(raw, "max_age_s", "secrets", check, low=1, high=30 * 86_400,
                             default=defaults.max_age_s) or defaults.max_age_s,
        state_ttl_s=(_int_field(raw, "state_ttl_s", "secrets", check, low=1, high=60,
                                default=1) or 1) * 1.0,
        rollback_after=_int_field(raw, "rollback_after", "secrets", check, low=1,
                                  high=1000, default=3) or 3,
    )


def _record_store(raw_value: object, check: _Checker, base_dir: Path) -> RecordStoreSettings:
    path = "secrets.store"
    raw = check.mapping(raw_value, path)
    check.unknown(raw, path, SCHEMA[path])
    backend = raw.get("backend")
    vault_fields = [name for name in ("url", "mount", "prefix", "token") if name in raw]
    if backend is None:
        if isinstance(raw_value, dict):  # (not a mapping at all is reported already)
            check.add(_join(path, "backend"), "is required", "redis or vault_kv")
        return RecordStoreSettings()
    if backend == "redis":
        for name in vault_fields:
            check.add(_join(path, name), "only applies to backend vault_kv",
                      "remove it, or set backend: vault_kv")
        return RecordStoreSettings()
    if backend != "vault_kv":
        check.add(_join(path, "backend"), f"unknown record store backend {backend!r}",
                  "redis or vault_kv")
        return RecordStoreSettings()
    url = None
    if "url" not in raw:
        check.add(_join(path, "url"), "is required with backend vault_kv",
                  "e.g. https://openbao.internal:8200")
    else:
        url = check.string(raw, "url", path) or None
        parts = urlsplit(url or "")
        # The URL is never echoed back: it could carry credentials.
        if url is not None and (parts.scheme not in ("http", "https") or not parts.hostname
                                or not _valid_port(url)):
            check.add(_join(path, "url"), "must be an http(s) URL with a host",
                      "e.g. https://openbao.internal:8200")
        elif url is not None and (parts.query or parts.fragment or parts.username
                                  or parts.password):
            check.add(_join(path, "url"), "must not carry a query, fragment or credentials",
                      "put the token under secrets.store.token")
    locations: dict[str, str] = {}
    for name, default, example in (("mount", "secret", "secret"), ("prefix", "asc", "asc")):
        value = check.string(raw, name, path, required=False) if name in raw else default
        if value and not _KV_PATH_RE.match(value):
            check.add(_join(path, name), "must be names separated by '/', without a leading "
                      "or trailing '/'", f"e.g. {example}")
        locations[name] = value or default
    token = None
    if "token" not in raw:
        check.add(_join(path, "token"), "is required with backend vault_kv",
                  "e.g. {env: BAO_TOKEN} or {file: /run/secrets/bao-token}")
    else:
        token = _secret_ref("token", raw["token"], _join(path, "token"), check, base_dir)
    return RecordStoreSettings(backend="vault_kv", url=url, mount=locations["mount"],
                               prefix=locations["prefix"], token=token)


def _valid_port(url: str) -> bool:
    """False when the URL's port is not a number from 0 to 65535 (urlsplit raises)."""
    try:
        port = urlsplit(url).port
    except ValueError:
        return False
    return port != 0


def _provider(
    name: str, raw_value: object, check: _Checker, credentials: Mapping[str, CredentialRef]
) -> Provider | None:
    path = _join("providers", name)
    check.name(name, path)
    raw = check.mapping(raw_value, path)
    check.unknown(raw, path, SCHEMA["providers.<name>"])
    kind = check.string(raw, "kind", path)
    if kind and kind not in SUPPORTED_PROVIDER_KINDS:
        check.add(_join(path, "kind"), f"provider kind {kind!r} is not supported yet",
                  f"supported kinds: {', '.join(SUPPORTED_PROVIDER_KINDS)}")
    base_url = check.string(raw, "base_url", path)
    scheme = host = prefix = ""
    port = 0
    if base_url:
        parts = urlsplit(base_url)
        scheme, host, prefix = parts.scheme, parts.hostname or "", parts.path.rstrip("/")
        try:
            explicit_port = parts.port
        except ValueError:
            explicit_port = 0
        default_port = 443 if scheme == "https" else 80
        port = default_port if explicit_port is None else explicit_port
        if scheme not in ("http", "https") or not host or not port:
            check.add(_join(path, "base_url"), f"not an http(s) URL with a host: {base_url!r}",
                      "e.g. https://api.openai.com")
        elif parts.query or parts.fragment or parts.username or parts.password:
            check.add(_join(path, "base_url"), "must not carry a query, fragment or credentials",
                      "put credentials under `credentials:`")
        elif prefix.endswith("/v1"):
            check.add(_join(path, "base_url"), "must not end in /v1",
                      "the gateway appends the API path (/v1/chat/completions) itself")
    region = check.string(raw, "region", path)
    zone = check.string(raw, "zone", path)
    cluster = check.string(raw, "cluster", path)
    if cluster and not _CLUSTER_RE.match(cluster):
        check.add(_join(path, "cluster"), f"invalid Envoy cluster name {cluster!r}")
    creds_raw = raw.get("credentials", [])
    cred_ids: list[str] = []
    if not isinstance(creds_raw, list):
        check.add(_join(path, "credentials"), "must be a list of credential ids")
    else:
        for index, cred_id in enumerate(creds_raw):
            here = _join(_join(path, "credentials"), index)
            if not isinstance(cred_id, str) or cred_id not in credentials:
                known = ", ".join(credentials) or "-"
                check.add(here, f"unknown credential {cred_id!r}",
                          f"define it under `credentials:` (known: {known})")
            else:
                cred_ids.append(cred_id)
    if kind and kind != "openai_compatible" and not creds_raw:
        check.add(_join(path, "credentials"),
                  f"{kind} providers need at least one credential")
    api_version = check.string(raw, "api_version", path, required=False) or None
    if api_version is not None and kind != "azure":
        check.add(_join(path, "api_version"), "only applies to azure providers")
    return Provider(
        name=name, kind=kind, base_url=base_url, scheme=scheme, host=host, port=port,
        path_prefix=prefix, region=region, zone=zone, cluster=cluster,
        credentials=tuple(cred_ids), api_version=api_version,
        forward_headers=_forward_headers(raw.get("forward_headers"),
                                         _join(path, "forward_headers"), check),
    )


def _forward_headers(raw: object, path: str, check: _Checker) -> tuple[str, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, list):
        check.add(path, f"must be a list of header names, got {_kind(raw)}",
                  "e.g. [anthropic-beta]")
        return ()
    names: list[str] = []
    for index, name in enumerate(raw):
        here = _join(path, index)
        if not isinstance(name, str) or not _HEADER_NAME_RE.match(name):
            check.add(here, f"not a lower-case header name: {name!r}", "e.g. anthropic-beta")
        elif name in _UNFORWARDABLE_HEADERS or name.startswith("x-asc-"):
            check.add(here, f"the header {name!r} cannot be forwarded",
                      "credentials and account headers are the gateway's to set, x-asc-* "
                      "headers are the gateway's own, framing headers are Envoy's")
        elif name not in names:
            names.append(name)
    return tuple(names)


def _model(
    name: str, raw_value: object, check: _Checker, providers: Mapping[str, Provider]
) -> Model:
    path = _join("models", name)
    check.name(name, path)
    raw = check.mapping(raw_value, path)
    check.unknown(raw, path, SCHEMA["models.<name>"])
    price_path = _join(path, "price")
    price_raw = check.mapping(raw.get("price"), price_path)
    check.unknown(price_raw, price_path, SCHEMA["models.<name>.price"])
    input_price = check.money(price_raw, "input_per_mtok", price_path)
    cached = (check.money(price_raw, "cached_input_per_mtok", price_path)
              if "cached_input_per_mtok" in price_raw else input_price)
    price = Price(
        input_micro_per_mtok=input_price,
        output_micro_per_mtok=check.money(price_raw, "output_per_mtok", price_path),
        cached_input_micro_per_mtok=cached,
    )
    deployments: list[Deployment] = []
    deps_path = _join(path, "deployments")
    deps_raw = check.nonempty_list(raw.get("deployments"), deps_path, "must be a non-empty list",
                                   "e.g. [{provider: openai-us, model: gpt-4o-mini}]")
    for index, dep_value in enumerate(deps_raw):
        dep_path = _join(deps_path, index)
        dep = check.mapping(dep_value, dep_path)
        check.unknown(dep, dep_path, SCHEMA["models.<name>.deployments[]"])
        provider = check.string(dep, "provider", dep_path)
        if provider and provider not in providers:
            check.add(_join(dep_path, "provider"), f"unknown provider {provider!r}",
                      f"known providers: {', '.join(providers) or '-'}")
        upstream_model = check.string(dep, "model", dep_path, required=False) or name
        deployments.append(Deployment(provider=provider, model=upstream_model))
    limit_field = raw.get("output_limit_field")
    if limit_field is not None and limit_field not in OUTPUT_LIMIT_FIELDS:
        check.add(_join(path, "output_limit_field"),
                  f"must be one of {', '.join(OUTPUT_LIMIT_FIELDS)} or null, got {limit_field!r}",
                  "o-series and gpt-5 models take max_completion_tokens; leave it out to "
                  "let the gateway pick by model family")
        limit_field = None
    return Model(name=name, price=price, deployments=tuple(deployments),
                 output_limit_field=limit_field)


def _tenant(
    tenant_id: str,
    raw_value: object,
    check: _Checker,
    models: Mapping[str, Model],
    providers: Mapping[str, Provider],
    seen_hashes: dict[str, str],
) -> Tenant:
    path = _join("tenants", tenant_id)
    check.name(tenant_id, path)
    raw = check.mapping(raw_value, path)
    check.unknown(raw, path, SCHEMA["tenants.<id>"])
    zone = check.string(raw, "zone", path, required=False) or None
    keys: list[TenantKey] = []
    keys_path = _join(path, "keys")
    keys_raw = check.nonempty_list(raw.get("keys"), keys_path,
                                   "must be a non-empty list of {id, hash}",
                                   "create a hash with `extproc keys hash --config asc.yaml`")
    for index, key_value in enumerate(keys_raw):
        key_path = _join(keys_path, index)
        key_raw = check.mapping(key_value, key_path)
        check.unknown(key_raw, key_path, SCHEMA["tenants.<id>.keys[]"])
        key_id = check.string(key_raw, "id", key_path)
        if key_id:
            check.name(key_id, _join(key_path, "id"))
        if key_id and any(k.id == key_id for k in keys):
            check.add(_join(key_path, "id"), f"duplicate key id {key_id!r}",
                      "key ids name a key in logs and budgets; make each unique per tenant")
        key_hash = check.string(key_raw, "hash", key_path)
        if key_hash and not KEY_HASH_RE.match(key_hash):
            check.add(_join(key_path, "hash"), "not a key hash",
                      "expected hmac-sha256:v1:<64 hex>, from `extproc keys hash`; "
                      "never put a plaintext key here")
        elif key_hash in seen_hashes:
            check.add(_join(key_path, "hash"), f"same key already used by {seen_hashes[key_hash]}",
                      "every virtual key must be unique")
        elif key_hash:
            seen_hashes[key_hash] = f"{key_path}"
        keys.append(TenantKey(id=key_id, hash=key_hash))
    models_raw = check.nonempty_list(raw.get("models"), _join(path, "models"),
                                     "must be a non-empty list of model names")
    allowed: set[str] = set()
    for index, model_name in enumerate(models_raw):
        if not isinstance(model_name, str) or model_name not in models:
            check.add(_join(_join(path, "models"), index), f"unknown model {model_name!r}",
                      f"known models: {', '.join(models) or '-'}")
        else:
            allowed.add(model_name)
    pins: dict[str, str] = {}
    routing_path = _join(path, "routing")
    for model_name, rule_value in check.mapping(raw.get("routing"), routing_path,
                                                required=False).items():
        rule_path = _join(routing_path, model_name)
        rule = check.mapping(rule_value, rule_path)
        check.unknown(rule, rule_path, SCHEMA["tenants.<id>.routing.<model>"])
        pin = check.string(rule, "pin", rule_path, required=False)
        model = models.get(model_name)
        if model is None:
            check.add(rule_path, f"unknown model {model_name!r}")
        elif pin and pin not in {d.provider for d in model.deployments}:
            check.add(_join(rule_path, "pin"), f"{pin!r} is not a deployment of {model_name}",
                      f"deployments: {', '.join(d.provider for d in model.deployments)}")
        elif pin and pin not in providers:
            pass  # reported at the deployment that names the unknown provider
        elif pin and zone and providers[pin].zone != zone:
            check.add(_join(rule_path, "pin"), f"{pin!r} is outside the tenant's zone {zone!r}",
                      "residency is a hard rule; pin a provider in the tenant's zone")
        elif pin:
            pins[model_name] = pin
    if zone:
        for model_name in sorted(allowed):
            model = models[model_name]
            if not any(providers.get(d.provider, None) is not None
                       and providers[d.provider].zone == zone for d in model.deployments):
                check.add(_join(path, "models"),
                          f"model {model_name!r} has no deployment in zone {zone!r}",
                          "add a deployment in that zone or remove the model from the tenant")
    return Tenant(id=tenant_id, zone=zone, keys=tuple(keys), models=frozenset(allowed), pins=pins)


def _int_field(raw: dict[str, Any], key: str, path: str, check: _Checker, *, low: int,
               high: int, default: int | None = None) -> int | None:
    value = raw.get(key)
    if value is None:
        return default
    if type(value) is not int or not low <= value <= high:
        check.add(_join(path, key), f"must be an integer from {low} to {high}")
        return default
    return value


def _redis(raw_value: object, check: _Checker) -> RedisSettings | None:
    raw = check.mapping(raw_value, "redis", required=False)
    check.unknown(raw, "redis", SCHEMA["redis"])
    if not raw:
        return None
    url = check.string(raw, "url", "redis")
    if url and urlsplit(url).scheme not in ("redis", "rediss", "unix"):
        check.add("redis.url", "must start with redis://, rediss:// or unix://")
    cluster = raw.get("cluster", False)
    if not isinstance(cluster, bool):
        check.add("redis.cluster", "must be true or false")
        cluster = False
    timeout = _int_field(raw, "timeout_ms", "redis", check, low=1, high=10_000, default=50)
    queue_timeout = _int_field(raw, "queue_timeout_ms", "redis", check, low=1, high=60_000,
                               default=1000)
    return RedisSettings(url=url, cluster=cluster, timeout_ms=timeout or 50,
                         queue_timeout_ms=queue_timeout or 1000)


def _budget_settings(raw_value: object, check: _Checker) -> BudgetSettings:
    raw = check.mapping(raw_value, "budgets", required=False)
    check.unknown(raw, "budgets", SCHEMA["budgets"])
    zone = raw.get("timezone", "UTC")
    try:
        ZoneInfo(str(zone))
    except (ZoneInfoNotFoundError, ValueError, OSError):  # a directory name is an OSError
        check.add("budgets.timezone", f"unknown time zone {zone!r}", "e.g. UTC, Europe/Paris")
        zone = "UTC"
    hold_ttl = _int_field(raw, "hold_ttl_s", "budgets", check, low=1, high=86_400, default=600)
    default_max = _int_field(raw, "default_max_tokens", "budgets", check, low=1,
                             high=10_000_000, default=4096)
    choices = raw.get("multiple_choices", "hold_all")
    if choices not in MULTIPLE_CHOICES_MODES:
        check.add("budgets.multiple_choices",
                  f"must be one of {', '.join(MULTIPLE_CHOICES_MODES)}, got {choices!r}",
                  "hold_all holds budget for every choice of a request with n > 1")
        choices = "hold_all"
    return BudgetSettings(timezone=str(zone), hold_ttl_s=hold_ttl or 600,
                          default_max_tokens=default_max or 4096,
                          multiple_choices=str(choices))


def _budget_rules(raw_value: object, path: str, check: _Checker, *, org_level: bool,
                  key_ids: frozenset[str] = frozenset(),
                  models: frozenset[str] = frozenset()) -> tuple[BudgetRule, ...]:
    """Budget rules of an org or a tenant; a tenant's key/model rules must name one of its
    `key_ids` / `models`."""
    if raw_value is None:
        return ()
    if not isinstance(raw_value, list):
        check.add(path, "must be a list of budget rules",
                  "e.g. [{scope: tenant, window: month, limit_usd: 500}]")
        return ()
    section = "orgs.<id>.budgets[]" if org_level else "tenants.<id>.budgets[]"
    rules: list[BudgetRule] = []
    for index, item in enumerate(raw_value):
        rule_path = _join(path, index)
        raw = check.mapping(item, rule_path)
        check.unknown(raw, rule_path, SCHEMA[section])
        scope_name = "org" if org_level else raw.get("scope")
        scopes = {s.value: s for s in Scope if s is not Scope.ORG}
        scope = Scope.ORG if org_level else scopes.get(str(scope_name))
        if scope is None:
            check.add(_join(rule_path, "scope"), f"unknown scope {scope_name!r}",
                      "one of: tenant, key, model (org budgets live under orgs:)")
            continue
        subject: str | None = None
        if scope is Scope.KEY:
            subject = check.string(raw, "key", rule_path)
            if subject and subject not in key_ids:
                check.add(_join(rule_path, "key"), f"unknown key id {subject!r}",
                          f"key ids: {', '.join(sorted(key_ids))}")
        elif scope is Scope.MODEL:
            subject = check.string(raw, "model", rule_path)
            if subject and subject not in models:
                check.add(_join(rule_path, "model"),
                          f"model {subject!r} is not allowed for this tenant")
        windows = {w.value: w for w in Window}
        window = windows.get(str(raw.get("window")))
        if window is None:
            check.add(_join(rule_path, "window"), f"unknown window {raw.get('window')!r}",
                      "one of: day, month, rolling")
            continue
        period = None
        if window is Window.ROLLING:
            period = _int_field(raw, "period_s", rule_path, check, low=60, high=90 * 86_400)
            if period is None:
                if "period_s" not in raw:
                    check.add(_join(rule_path, "period_s"), "is required for a rolling window")
                continue
        elif "period_s" in raw:
            check.add(_join(rule_path, "period_s"), "only applies to a rolling window")
        limit = check.money(raw, "limit_usd", rule_path, example="USD, e.g. 500")
        rules.append(BudgetRule(scope=scope, window=window, limit_micro_usd=limit,
                                subject=subject, period_s=period))
    return tuple(rules)


def _with_budget(tenant: Tenant, raw_value: object, check: _Checker,
                 orgs: Mapping[str, tuple[BudgetRule, ...]],
                 settings: BudgetSettings) -> Tenant:
    raw = raw_value if isinstance(raw_value, dict) else {}
    path = _join("tenants", tenant.id)
    org = raw.get("org")
    if org is not None and (not isinstance(org, str) or org not in orgs):
        check.add(_join(path, "org"), f"unknown org {org!r}", "define it under orgs:")
        org = None
    rules = _budget_rules(raw.get("budgets"), _join(path, "budgets"), check, org_level=False,
                          key_ids=frozenset(key.id for key in tenant.keys),
                          models=tenant.models)
    limits_path = _join(path, "rate_limits")
    limits_raw = check.mapping(raw.get("rate_limits"), limits_path, required=False)
    check.unknown(limits_raw, limits_path, SCHEMA["tenants.<id>.rate_limits"])
    rate_limits = RateLimits(
        rpm=_int_field(limits_raw, "rpm", limits_path, check, low=1, high=10_000_000),
        tpm=_int_field(limits_raw, "tpm", limits_path, check, low=1, high=10_000_000_000),
    )
    mode = raw.get("on_redis_error", "fail_closed")
    if mode not in ("fail_closed", "fail_open"):
        check.add(_join(path, "on_redis_error"), f"unknown mode {mode!r}",
                  "fail_closed (default) or fail_open")
    ceiling = check.money(raw, "fail_open_ceiling_usd", path, required=False,
                          example="USD per replica and day, e.g. 5")
    if mode == "fail_open" and "fail_open_ceiling_usd" not in raw:
        check.add(_join(path, "fail_open_ceiling_usd"), "is required with fail_open",
                  "the most one replica may spend for this tenant per day while Redis is down")
    max_tokens = _int_field(raw, "max_tokens", path, check, low=1, high=10_000_000)
    all_rules = (orgs.get(org, ()) if org else ()) + rules
    budget = None
    if all_rules or rate_limits.rpm is not None or rate_limits.tpm is not None:
        budget = TenantBudget(tenant=tenant.id, org=org, rules=all_rules,
                              rate_limits=rate_limits, fail_open=mode == "fail_open",
                              fail_open_ceiling_micro_usd=ceiling)
    return replace(tenant, budget=budget, max_tokens=max_tokens)


def _with_own_credentials(tenant: Tenant, raw_value: object, check: _Checker,
                          providers: Mapping[str, Provider],
                          credentials: Mapping[str, CredentialRef]) -> Tenant:
    """BYOK: `credentials: {<provider>: [<keyring credential>, ...]}` on a tenant."""
    raw = raw_value if isinstance(raw_value, dict) else {}
    path = _join(_join("tenants", tenant.id), "credentials")
    own: dict[str, tuple[str, ...]] = {}
    for provider, ids in check.mapping(raw.get("credentials"), path, required=False).items():
        here = _join(path, provider)
        if provider not in providers:
            check.add(here, f"unknown provider {provider!r}")
            continue
        ids = check.nonempty_list(ids, here, "must be a non-empty list of credential ids")
        if not ids:
            continue
        for index, cred_id in enumerate(ids):
            ref = credentials.get(cred_id) if isinstance(cred_id, str) else None
            if ref is None:
                check.add(_join(here, index), f"unknown credential {cred_id!r}")
            elif not ref.keyring:
                check.add(_join(here, index), f"credential {cred_id!r} is not a keyring "
                          "credential", "a tenant's own key must be sealed for its scope: "
                          "{keyring: true} and `extproc keys add --scope tenant:<id>`")
        own[provider] = tuple(str(c) for c in ids)
    return replace(tenant, own_credentials=own)
