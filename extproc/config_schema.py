"""The shape of `asc.yaml`: every field, its type, range, default and description.

This module is the one source of truth for what the file accepts. Pydantic models describe
the raw document and do the first validation pass; the JSON Schema that editors use
(`extproc config schema`, `deploy/schema/asc.schema.json`) and the field list the docs are
checked against are generated from them. Checks that only need one object (a secret
reference names exactly one source, a rolling window has a period, a tenant's key ids are
unique) are validators here; checks across sections (a tenant's model exists, a pin stays
in the tenant's zone) are in `extproc.config`, which compiles these models into the
runtime objects.

Adding a field starts here: a typed, described attribute with its default. In the sections
whose runtime object *is* the model (`Limits`, `RedisSettings`, `BudgetSettings`) that is
the whole change; elsewhere the runtime dataclass (`extproc.config`) gets an attribute of
the same name, and the value is copied over by name.

Error wording: pydantic's own messages are generic, so fields carry a `Rule` (message when
the value is refused, message when it is missing or empty, hint) that `extproc.config`
turns into `path (line N): message` + `hint`. Validators raise `problem(...)`, which can
name sub-fields and several issues at once.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar, Final, Literal, get_args
from urllib.parse import urlsplit
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    PlainValidator,
    WithJsonSchema,
    model_validator,
)
from pydantic.json_schema import GenerateJsonSchema, JsonSchemaValue
from pydantic_core import PydanticCustomError, core_schema

from extproc.money import MoneyError, micro_from_usd

__all__ = [
    "KEY_HASH_PATTERN",
    "MULTIPLE_CHOICES_MODES",
    "NAME_PATTERN",
    "OUTPUT_LIMIT_FIELDS",
    "SUPPORTED_PROVIDER_KINDS",
    "UNFORWARDABLE_HEADERS",
    "AuditSpec",
    "AuthSpec",
    "BudgetSettings",
    "CredentialSpec",
    "DeploymentHealthSettings",
    "DeploymentSpec",
    "Document",
    "FailoverSettings",
    "GuardrailModelsSpec",
    "GuardrailsSpec",
    "IdentitySpec",
    "JwtIdentitySpec",
    "KekSpec",
    "KeySpec",
    "Limits",
    "MeshIdentitySpec",
    "MetricsSettings",
    "ModelSpec",
    "OrgBudgetSpec",
    "OrgSpec",
    "PiiSpec",
    "PriceSpec",
    "ProbeSpec",
    "PromptCapSpec",
    "ProviderSpec",
    "RateLimitsSpec",
    "RecordStoreSpec",
    "RedisSentinelSettings",
    "RedisSettings",
    "ResponseRedactionSpec",
    "RouteSpec",
    "Rule",
    "SecretRefSpec",
    "SecretsSpec",
    "TeamBudgetSpec",
    "TeamSpec",
    "TemperatureRangeSpec",
    "TenantAuditSpec",
    "TenantBudgetSpec",
    "TenantSpec",
    "TracingSettings",
    "field_paths",
    "json_schema",
    "json_schema_text",
    "kind_of",
    "problem",
]

ProviderKind = Literal[
    "openai", "openai_compatible", "mistral", "azure", "anthropic", "gemini"]
SUPPORTED_PROVIDER_KINDS: Final = get_args(ProviderKind)
"""Provider kinds (`translate.base.Backend` values). Only `openai_compatible` may run
without a credential (self-hosted servers without auth)."""

NAME_PATTERN: Final = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$"
KEY_HASH_PATTERN: Final = r"^hmac-sha256:v1:[0-9a-f]{64}$"
_CLUSTER_PATTERN: Final = r"^[A-Za-z0-9_.-]{1,128}$"
_ENV_PATTERN: Final = r"^[A-Za-z_][A-Za-z0-9_]*$"
_KV_PATH_PATTERN: Final = r"^[A-Za-z0-9][A-Za-z0-9_.-]*(/[A-Za-z0-9][A-Za-z0-9_.-]*)*$"
_HEADER_PATTERN: Final = r"^[a-z0-9!#$%&'*+.^_`|~-]{1,100}$"
UNFORWARDABLE_HEADERS: Final = frozenset({
    "authorization", "proxy-authorization", "x-api-key", "api-key", "x-goog-api-key",
    "cookie", "host", "content-length", "transfer-encoding", "connection",
    "accept-encoding", "openai-organization", "openai-project", "anthropic-version",
})
"""Headers `forward_headers` may not name: credentials (the provider key is the gateway's
to set), framing headers Envoy and the gateway own, and headers that pick an account."""
OutputLimitField = Literal["max_tokens", "max_completion_tokens"]
OUTPUT_LIMIT_FIELDS: Final = get_args(OutputLimitField)
MultipleChoices = Literal["hold_all", "refuse"]
MULTIPLE_CHOICES_MODES: Final = get_args(MultipleChoices)


@dataclass(frozen=True, slots=True)
class Rule:
    """How a field's problems read. `invalid` (may use `{value!r}` and `{kind}`) replaces
    the message for a value outside the allowed set or of the wrong type (except the
    plain "must be a non-empty string / a mapping" cases); `required` replaces
    `is required` and the message for an empty list/mapping; `hint` goes with either."""

    invalid: str = ""
    required: str = ""
    hint: str = ""


Issue = tuple[tuple[str | int, ...], str, str]
"""(location below the object that raised it, message, hint)."""


def problem(*issues: Issue) -> PydanticCustomError:
    """One validation error that carries one or more issues, each at its own sub-path."""
    return PydanticCustomError("asc", "{summary}",
                               {"summary": issues[0][1], "issues": list(issues)})


def kind_of(value: object) -> str:
    """The YAML-side name of a value's type, for `must be ..., got <kind>` messages."""
    return "nothing" if value is None else type(value).__name__


class _Spec(BaseModel):
    """Raw document objects: unknown fields are errors, `"5"` is not an integer."""

    model_config = ConfigDict(strict=True, extra="forbid", frozen=True)


# --- field types shared by several sections ----------------------------------------------

Name = Annotated[
    str, Field(pattern=NAME_PATTERN),
    Rule(invalid="invalid name {value!r}", hint="use letters, digits, '_', '.', '-'"),
]
"""Ids that appear in logs, metrics and Redis keys (tenants, keys, providers, ...)."""

Text = Annotated[str, Field(min_length=1)]


def _usd(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise problem(((), f"must be a number, got {kind_of(value)}", ""))
    try:
        return micro_from_usd(value)
    except MoneyError as exc:
        raise problem(((), str(exc), exc.hint)) from None


Usd = Annotated[
    int, PlainValidator(_usd),
    WithJsonSchema({"anyOf": [{"type": "number", "minimum": 0},
                              {"type": "string", "pattern": r"^[0-9]+(\.[0-9]{1,6})?$"}],
                    "description": "USD, at most 6 decimals (kept as integer micro-USD)"}),
]
"""A USD amount in the file (`0.15` or `"0.15"`); integer micro-USD once validated."""


PerMtok = Annotated[Usd, Rule(hint="USD per million tokens, e.g. 0.15")]
BudgetUsd = Annotated[Usd, Rule(hint="USD, e.g. 500")]
WindowName = Annotated[
    Literal["day", "month", "rolling"],
    Rule(invalid="unknown window {value!r}", hint="one of: day, month, rolling"),
]
PeriodS = Annotated[int, Field(ge=60, le=90 * 86_400)]


# --- secret references -------------------------------------------------------------------

# Secret references other than provider keys are Vault/OpenBao credentials or the pepper:
# their hints name those, not a provider key.
_SECRET_HINT: Final = (
    "e.g. {file: /run/secrets/asc-vault-token} or {env: ASC_VAULT_TOKEN}")  # noqa: S105
_PEPPER_HINT: Final = "e.g. {file: /etc/asc/pepper.txt} or {env: ASC_PEPPER}"
EnvName = Annotated[str, Field(pattern=_ENV_PATTERN),
                    Rule(invalid="must be an environment variable name")]
FilePath = Annotated[str, Field(min_length=1)]


class SecretRefSpec(_Spec):
    """Where a secret is read from, never the secret itself."""

    _hint: ClassVar[str] = _SECRET_HINT

    env: EnvName | None = Field(default=None, description="Environment variable of the "
                                "`extproc serve` process that holds the secret.")
    file: FilePath | None = Field(default=None, description="File that holds the secret; relative "
                                  "paths are resolved against the config file's directory.")

    @model_validator(mode="after")
    def _one_source(self) -> SecretRefSpec:
        if (self.env is None) == (self.file is None):
            raise problem(((), "needs exactly one of `env` or `file`", self._hint))
        return self


class PepperRefSpec(SecretRefSpec):
    """Where the pepper is read from (its own hint: it is no provider key)."""

    _hint: ClassVar[str] = _PEPPER_HINT


class CredentialSpec(_Spec):
    """A provider key: a plain `{env}` / `{file}` reference, or `{keyring: true}`."""

    env: EnvName | None = Field(default=None, description="Environment variable holding the key.")
    file: FilePath | None = Field(default=None, description="File holding the key (relative to "
                                  "the config file).")
    keyring: Annotated[Literal[True], Rule(
        invalid="must be true",
        hint="or use {env: ...} / {file: ...} for a plain reference")] | None = Field(
        default=None, description="The key's sealed versions live in the envelope-encrypted "
        "keyring (`extproc keys add`).")
    weight: Annotated[int, Field(ge=0, le=1000)] = Field(
        default=1, description="Share of the provider's traffic among its healthy credentials; "
        "0 takes it out of rotation.")

    @model_validator(mode="after")
    def _one_source(self) -> CredentialSpec:
        if [self.env, self.file, self.keyring].count(None) != 2:
            raise problem(((), "needs exactly one of `env`, `file` or `keyring`",
                           "e.g. {env: OPENAI_API_KEY}, {file: /run/secrets/openai} or "
                           "{keyring: true}"))
        return self


# --- sections whose runtime object is the model itself -----------------------------------

class Limits(_Spec):  # also the runtime object
    """Size limits of the gateway."""

    max_body_bytes: Annotated[int, Field(ge=1, le=64 << 20)] = Field(
        default=1_048_576, description="Largest request body accepted (413 above); Envoy's "
        "request buffer is rendered from it.")
    max_response_bytes: Annotated[int, Field(ge=65_536, le=1 << 30)] = Field(
        default=8_388_608, description="Largest non-streamed provider answer the gateway "
        "reads whole (Envoy's response buffer is rendered from it); a larger one is "
        "answered 502 response_too_large and charged the whole budget hold.")


class FailoverSettings(_Spec):  # also the runtime object
    """How a request moves to the next deployment of its tenant's zone (docs/failover.md).

    Envoy does the retrying (route retry_policy over a priority cluster per model and
    first deployment); these numbers are rendered into the Envoy bootstrap.
    """

    max_attempts: Annotated[int, Field(ge=1, le=5)] = Field(
        default=3, description="Most provider attempts per request, the first included "
        "(1 turns failover off).")
    first_byte_timeout_ms: Annotated[int, Field(ge=100, le=600_000)] = Field(
        default=30_000, description="An attempt that sends nothing for this long is left "
        "for the next deployment (Envoy per_try_idle_timeout); also the longest silence "
        "allowed inside a stream.")
    retry_budget_percent: Annotated[int, Field(ge=0, le=100)] = Field(
        default=20, description="Retries in flight at most this share of a provider "
        "cluster's active requests (Envoy retry_budget), so an outage cannot become a "
        "retry storm.")
    min_retry_concurrency: Annotated[int, Field(ge=0, le=10_000)] = Field(
        default=16, description="Retries always allowed in flight per cluster, whatever "
        "the budget share (a canary key's refusals are retried within it too).")
    outlier_consecutive_errors: Annotated[int, Field(ge=1, le=1000)] = Field(
        default=5, description="Consecutive 5xx/resets that eject a deployment from "
        "failover clusters (Envoy outlier detection).")
    outlier_ejection_s: Annotated[int, Field(ge=1, le=3600)] = Field(
        default=30, description="Base time an ejected deployment stays out (Envoy grows "
        "it with each ejection).")



class FastPathSettings(_Spec):  # also the runtime object
    """The fast path: a same-dialect request decided by one HTTP check at the service's
    fast door, with no ext_proc message (docs/fast-path.md, decision 0124).

    Envoy's ext_authz filter sends the request to the door, its Lua filter reads the
    answer's usage, and its gRPC access log brings the outcome back for settle and the
    record. Requests that need their body rewritten keep the full path.
    """

    enabled: Annotated[bool, Rule(invalid="must be true or false")] = Field(
        default=False, description="Every tenant may use the fast path.")
    tenants: list[Text] = Field(
        default_factory=list, description="Tenants that may use the fast path when "
        "`enabled` is false.")
    flush_interval_ms: Annotated[int, Field(ge=10, le=10_000)] = Field(
        default=100, description="How often Envoy sends its batch of finished fast-path "
        "requests (usage, status) to the service: settle and the request record wait this "
        "long at most.")

    def allows(self, tenant: str) -> bool:
        return self.enabled or tenant in self.tenants

    @property
    def rendered(self) -> bool:
        """Envoy carries the fast path's filters when any tenant may use it."""
        return self.enabled or bool(self.tenants)


class LoggingSettings(_Spec):  # also the runtime object
    """What the service logs per request."""

    request_log: Annotated[bool, Rule(invalid="must be true or false")] = Field(
        default=True, description="One JSON line per finished request (`request finished`); "
        "off saves its CPU on the hot path (metrics and budgets are kept).")

def _redis_url(url: str) -> str:
    if urlsplit(url).scheme not in ("redis", "rediss", "unix"):
        raise problem(((), "must start with redis://, rediss:// or unix://", ""))
    return url


def _host_port(address: str) -> str:
    host, colon, port = address.rpartition(":")
    if not colon or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise problem(((), f"not host:port: {address!r}", "e.g. 10.0.0.5:26379"))
    return address


class RedisSentinelSettings(_Spec):  # also the runtime object
    """Redis Sentinel: the service asks the sentinels which server is the master, and asks
    again after a failover (docs/reliability.md)."""

    addresses: Annotated[list[Annotated[Text, AfterValidator(_host_port)]],
                         Field(min_length=1), Rule(
        required="must be a non-empty list of host:port",
        hint="the sentinels, e.g. [10.0.0.5:26379, 10.0.0.6:26379]")] = Field(
        description="host:port of each sentinel.")
    service: Text = Field(description="The master's name in the sentinels' config "
                          "(`sentinel monitor <name> ...`).")


class RedisSettings(_Spec):  # also the runtime object
    """The Redis (or Redis Cluster) that holds budgets, rate limits and keyring state."""

    url: Annotated[Text, AfterValidator(_redis_url)] = Field(
        description="redis://, rediss:// or unix:// URL of Redis or of one cluster node.")
    cluster: Annotated[bool, Rule(invalid="must be true or false")] = Field(
        default=False, description="Use the Redis Cluster client.")
    timeout_ms: Annotated[int, Field(ge=1, le=10_000)] = Field(
        default=50, description="How long a budget call may wait for Redis itself; time the "
        "process spends busy or waiting for a CPU does not count (up to max(1 s, 20 x "
        "timeout_ms) in all).")
    queue_timeout_ms: Annotated[int, Field(ge=1, le=60_000)] = Field(
        default=1000, description="How long a budget call may wait for a free ledger slot (64 "
        "in flight per process); past it the request is shed with 503 and retry-after, "
        "which is not a Redis failure.")
    sentinel: RedisSentinelSettings | None = Field(
        default=None, description="Find the master through Redis Sentinel; `url` then gives "
        "only the scheme, database and credentials (its host and port are not used).")

    @model_validator(mode="after")
    def _one_topology(self) -> RedisSettings:
        if self.sentinel is not None and self.cluster:
            raise problem((("sentinel",), "cannot be used with cluster: true",
                           "Sentinel watches one master; a Redis Cluster fails over itself"))
        return self


def _timezone(name: str) -> str:
    try:
        ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError, OSError):  # a directory name is an OSError
        raise problem(((), f"unknown time zone {name!r}", "e.g. UTC, Europe/Paris")) from None
    return name


class BudgetSettings(_Spec):  # also the runtime object
    """Gateway-wide settings of the budget ledger."""

    timezone: Annotated[str, AfterValidator(_timezone)] = Field(
        default="UTC", description="IANA time zone where day and month windows start.")
    hold_ttl_s: Annotated[int, Field(ge=1, le=86_400)] = Field(
        default=600,
        description="Lifetime of an unsettled reservation before the sweep releases it.")
    default_max_tokens: Annotated[int, Field(ge=1, le=10_000_000)] = Field(
        default=4096, description="Output tokens held for a request that sets no max_tokens.")
    multiple_choices: Annotated[MultipleChoices, Rule(
        invalid=f"must be one of {', '.join(MULTIPLE_CHOICES_MODES)}, got {{value!r}}",
        hint="hold_all holds budget for every choice of a request with n > 1")] = Field(
        default="hold_all", description="Requests with n > 1 for budget tenants: hold every "
        "choice's output tokens, or refuse them.")


# --- secrets -----------------------------------------------------------------------------

class KekSpec(_Spec):
    """The key-encryption key: a local file, or Vault/OpenBao Transit."""

    backend: Annotated[Literal["file", "transit"], Rule(
        invalid="unknown KEK backend {value!r}", hint="file or transit")] = Field(
        description="file (a local 0600 key file) or transit (Vault/OpenBao Transit).")
    path: FilePath | None = Field(default=None, description="backend file: the KEK file "
                                  "(relative to the config file).")
    url: Text | None = Field(default=None, description="backend transit: Vault/OpenBao address.")
    mount: Text = Field(default="transit", description="backend transit: Transit mount path.")
    key: Text = Field(default="asc-kek", description="backend transit: Transit key name.")
    token: SecretRefSpec | None = Field(default=None, description="backend transit: token "
                                        "reference (or role_id + secret_id).")
    role_id: Text | None = Field(default=None, description="backend transit: AppRole role id.")
    secret_id: SecretRefSpec | None = Field(default=None, description="backend transit: AppRole "
                                            "secret id reference.")

    @model_validator(mode="after")
    def _backend_fields(self) -> KekSpec:
        if self.backend == "file":
            if self.path is None:
                raise problem((("path",), "is required", ""))
            return self
        if self.url is None:
            raise problem((("url",), "is required", ""))
        if (self.token is None) == (self.role_id is None):
            raise problem(((), "transit needs exactly one of `token` or "
                           "`role_id` + `secret_id`", ""))
        if self.role_id is not None and self.secret_id is None:
            raise problem((("secret_id",), "is required with role_id", ""))
        return self


def _http_url(url: str) -> str:
    """An http(s) URL with a host; never echoed back (it could carry credentials)."""
    parts = urlsplit(url)
    try:
        port_ok = parts.port != 0
    except ValueError:
        port_ok = False
    if parts.scheme not in ("http", "https") or not parts.hostname or not port_ok:
        raise problem(((), "must be an http(s) URL with a host",
                       "e.g. https://openbao.internal:8200"))
    if parts.query or parts.fragment or parts.username or parts.password:
        raise problem(((), "must not carry a query, fragment or credentials",
                       "put the token under secrets.store.token"))
    return url


KvPath = Annotated[
    str, Field(min_length=1, pattern=_KV_PATH_PATTERN),
    Rule(invalid="must be names separated by '/', without a leading or trailing '/'"),
]
_VAULT_ONLY: Final = ("url", "mount", "prefix", "token")


class RecordStoreSpec(_Spec):
    """Where sealed key records live: `redis` (next to their state) or `vault_kv`."""

    backend: Annotated[Literal["redis", "vault_kv"], Rule(
        invalid="unknown record store backend {value!r}", hint="redis or vault_kv")] = Field(
        description="redis or vault_kv (Vault/OpenBao KV v2).")
    url: Annotated[Text, AfterValidator(_http_url)] | None = Field(
        default=None, description="backend vault_kv: Vault/OpenBao address.")
    mount: Annotated[KvPath, Rule(hint="e.g. secret")] = Field(
        default="secret", description="backend vault_kv: KV v2 mount path.")
    prefix: Annotated[KvPath, Rule(hint="e.g. asc")] = Field(
        default="asc", description="backend vault_kv: path prefix of the records.")
    token: SecretRefSpec | None = Field(default=None,
                                        description="backend vault_kv: token reference.")

    @model_validator(mode="after")
    def _backend_fields(self) -> RecordStoreSpec:
        if self.backend == "redis":
            extra = [name for name in _VAULT_ONLY if name in self.model_fields_set]
            if extra:
                raise problem(*[((name,), "only applies to backend vault_kv",
                                 "remove it, or set backend: vault_kv") for name in extra])
            return self
        missing: list[Issue] = []
        if self.url is None:
            missing.append((("url",), "is required with backend vault_kv",
                            "e.g. https://openbao.internal:8200"))
        if self.token is None:
            missing.append((("token",), "is required with backend vault_kv",
                            "e.g. {env: BAO_TOKEN} or {file: /run/secrets/bao-token}"))
        if missing:
            raise problem(*missing)
        return self


class SecretsSpec(_Spec):
    """The KEK, the record store and the keyring's cache settings."""

    kek: KekSpec | None = Field(default=None, description="Key-encryption key; needed by keyring "
                                "credentials.")
    store: RecordStoreSpec | None = Field(default=None, description="Where sealed records live "
                                          "(default: redis).")
    cache_ttl_s: Annotated[int, Field(ge=1, le=86_400)] = Field(
        default=300, description="How long an unwrapped key stays cached in memory.")
    max_age_s: Annotated[int, Field(ge=1, le=30 * 86_400)] = Field(
        default=3600, description="Longest a cached key is used without re-reading its record.")
    state_ttl_s: Annotated[int, Field(ge=1, le=60)] = Field(
        default=1, description="How often a replica re-reads credential lifecycle state.")
    rollback_after: Annotated[int, Field(ge=1, le=1000)] = Field(
        default=3, description="Provider 401/403 answers on a canary version before it rolls back.")


# --- providers, models -------------------------------------------------------------------

def _base_url(url: str) -> str:
    parts = urlsplit(url)
    try:
        explicit_port = parts.port
    except ValueError:
        explicit_port = 0
    port = (443 if parts.scheme == "https" else 80) if explicit_port is None else explicit_port
    if parts.scheme not in ("http", "https") or not parts.hostname or not port:
        raise problem(((), f"not an http(s) URL with a host: {url!r}",
                       "e.g. https://api.openai.com"))
    if parts.query or parts.fragment or parts.username or parts.password:
        raise problem(((), "must not carry a query, fragment or credentials",
                       "put credentials under `credentials:`"))
    if parts.path.rstrip("/").endswith("/v1"):
        raise problem(((), "must not end in /v1",
                       "the gateway appends the API path (/v1/chat/completions) itself"))
    if parts.path.rstrip("/").endswith("/v1beta"):
        raise problem(((), "must not end in /v1beta",
                       "the gateway appends Gemini's API path (/v1beta/models/...) itself"))
    return url


def _forwardable(name: str) -> str:
    if name in UNFORWARDABLE_HEADERS or name.startswith("x-asc-"):
        raise problem(((), f"the header {name!r} cannot be forwarded",
                       "credentials and account headers are the gateway's to set, x-asc-* "
                       "headers are the gateway's own, framing headers are Envoy's"))
    return name


HeaderName = Annotated[
    str, Field(pattern=_HEADER_PATTERN, json_schema_extra={"not": {"anyOf": [
        {"enum": sorted(UNFORWARDABLE_HEADERS)}, {"pattern": "^x-asc-"}]}}),
    AfterValidator(_forwardable),
    Rule(invalid="not a lower-case header name: {value!r}", hint="e.g. anthropic-beta"),
]


class ProviderSpec(_Spec):
    """One upstream: a provider account in one region, reached through one Envoy cluster."""

    kind: Annotated[ProviderKind,
                    Rule(invalid="provider kind {value!r} is not supported yet",
                         hint=f"supported kinds: {', '.join(SUPPORTED_PROVIDER_KINDS)}")] = (
        Field(description="API dialect of the upstream."))
    base_url: Annotated[Text, AfterValidator(_base_url)] = Field(
        description="http(s)://host[:port][/prefix], without /v1 (the gateway appends the "
        "API path).")
    region: Text = Field(description="Region label (metrics, audit, x-asc-region).")
    zone: Text = Field(description="Residency zone; a tenant with a zone is never routed "
                       "outside it.")
    cluster: Annotated[str, Field(pattern=_CLUSTER_PATTERN), Rule(
        invalid="invalid Envoy cluster name {value!r}")] = Field(
        description="Envoy cluster name the router sends this provider's requests to.")
    credentials: list[Text] = Field(
        default_factory=list, description="Credential ids (from `credentials:`) of this "
        "provider's key pool.")
    api_version: Text | None = Field(default=None, description="Azure OpenAI `api-version` query "
                                     "value (azure only).")
    forward_headers: Annotated[list[HeaderName], Rule(
        invalid="must be a list of header names, got {kind}",
        hint="e.g. [anthropic-beta]")] = Field(
        default_factory=list, description="Client request headers forwarded to this provider "
        "on top of the allow-list of its kind (lower case; repeats are ignored).")

    @model_validator(mode="after")
    def _kind_rules(self) -> ProviderSpec:
        issues: list[Issue] = []
        if self.kind != "openai_compatible" and not self.credentials:
            issues.append((("credentials",),
                           f"{self.kind} providers need at least one credential", ""))
        if self.api_version is not None and self.kind != "azure":
            issues.append((("api_version",), "only applies to azure providers", ""))
        if issues:
            raise problem(*issues)
        return self


class PriceSpec(_Spec):
    """USD per million tokens."""

    input_per_mtok: PerMtok = Field(description="Input (prompt) tokens.")
    output_per_mtok: PerMtok | None = Field(
        default=None, description="Output (completion) tokens; required for chat models, "
        "absent for embedding models (which produce no output tokens).")
    cached_input_per_mtok: PerMtok | None = Field(
        default=None, description="Cached input tokens (default: the input price).")
    cache_write_per_mtok: PerMtok | None = Field(
        default=None, description="Input tokens written to the provider's prompt cache "
        "(Anthropic `cache_creation_input_tokens`; default: twice the input price, the "
        "highest surcharge Anthropic bills, so a write is never under-charged).")


def _probe_path(path: str) -> str:
    if not path.startswith("/") or "?" in path or "#" in path or "//" in path:
        raise problem(((), "must be an absolute path without query or fragment",
                       "e.g. /health"))
    return path


class ProbeSpec(_Spec):
    """An active health probe: a periodic GET, without credentials, straight to the
    provider's base URL (not through Envoy)."""

    path: Annotated[Text, AfterValidator(_probe_path)] = Field(
        description="Path appended to the provider's base_url, e.g. /health; it must answer "
        "without a provider key.")
    interval_s: Annotated[int, Field(ge=1, le=3600)] = Field(
        default=10, description="Seconds between probes.")
    timeout_ms: Annotated[int, Field(ge=10, le=60_000)] = Field(
        default=2000, description="A probe without an answer by then is a failure.")


class DeploymentSpec(_Spec):
    provider: Text = Field(description="Provider name (from `providers:`).")
    model: Text | None = Field(default=None, description="Model name upstream (default: the "
                               "model's own name).")
    price: PriceSpec | None = Field(default=None, description="This deployment's price when it "
                                    "differs from the model's (routing `prefer: cost`).")
    probe: ProbeSpec | None = Field(default=None, description="Active health probe; off by "
                                    "default (passive health only).")


class ModelSpec(_Spec):
    """A model clients ask for by name, its price and where it runs."""

    price: PriceSpec = Field(description="Price of the model.")
    deployments: Annotated[list[DeploymentSpec], Field(min_length=1), Rule(
        required="must be a non-empty list",
        hint="e.g. [{provider: openai-us, model: gpt-4o-mini}]")] = Field(
        description="Providers (and upstream model names) that serve it.")
    output_limit_field: Annotated[OutputLimitField, Rule(
        invalid=f"must be one of {', '.join(OUTPUT_LIMIT_FIELDS)} or null, got {{value!r}}",
        hint="o-series and gpt-5 models take max_completion_tokens; leave it out to let "
        "the gateway pick by model family")] | None = Field(
        default=None, description="Field that carries the output-token limit on the wire for this "
        "model; null: the translator decides by model family.")
    kind: Annotated[Literal["chat", "embedding"], Rule(
        invalid="must be chat or embedding, got {value!r}",
        hint="embedding models serve POST /v1/embeddings only")] = Field(
        default="chat", description="chat: served by the chat, messages and responses "
        "endpoints; embedding: served by /v1/embeddings only, priced per input token.")

    @model_validator(mode="after")
    def _output_price(self) -> ModelSpec:
        if self.kind == "chat":
            issues: list[Issue] = []
            if self.price.output_per_mtok is None:
                issues.append((("price", "output_per_mtok"), "is required for a chat model",
                               "embedding models set kind: embedding"))
            for index, dep in enumerate(self.deployments):
                if dep.price is not None and dep.price.output_per_mtok is None:
                    issues.append((("deployments", index, "price", "output_per_mtok"),
                                   "is required for a chat model", ""))
            if issues:
                raise problem(*issues)
        return self


# --- orgs, tenants -----------------------------------------------------------------------

def _rolling_period(window: str, period_s: int | None, fields_set: set[str]) -> None:
    if window == "rolling" and period_s is None:
        raise problem((("period_s",), "is required for a rolling window", ""))
    if window != "rolling" and "period_s" in fields_set:
        raise problem((("period_s",), "only applies to a rolling window", ""))


class _WindowSpec(_Spec):
    """A USD limit over a time window: what org and tenant budget rules share."""

    window: WindowName = Field(description="day, month (calendar, in budgets.timezone) "
                               "or rolling.")
    period_s: PeriodS | None = Field(default=None, description="Length of a rolling window, "
                                     "60 s to 90 days.")
    limit_usd: BudgetUsd = Field(description="Limit in USD.")

    @model_validator(mode="after")
    def _period(self) -> _WindowSpec:
        _rolling_period(self.window, self.period_s, self.model_fields_set)
        return self


class OrgBudgetSpec(_WindowSpec):
    """A budget shared by every tenant of an org."""


class OrgSpec(_Spec):
    budgets: Annotated[list[OrgBudgetSpec], Rule(
        invalid="must be a list of budget rules",
        hint="e.g. [{window: month, limit_usd: 5000}]")] | None = Field(
        default=None, description="Budgets shared by the org's tenants.")


class TenantBudgetSpec(_WindowSpec):
    scope: Annotated[Literal["tenant", "key", "model"], Rule(
        invalid="unknown scope {value!r}",
        hint="one of: tenant, key, model (org budgets live under orgs:)")] = Field(
        description="What the limit applies to: the whole tenant, one key, one model.")
    key: Text | None = Field(default=None, description="scope key: the key id.")
    model: Text | None = Field(default=None, description="scope model: the model name.")

    @model_validator(mode="after")
    def _subject(self) -> TenantBudgetSpec:
        for scope in ("key", "model"):
            if self.scope == scope and getattr(self, scope) is None:
                raise problem(((scope,), "is required", ""))
        return self


class KeySpec(_Spec):
    id: Name = Field(description="Key id: names the key in logs, metrics and budgets.")
    hash: Annotated[str, Field(pattern=KEY_HASH_PATTERN), Rule(
        invalid="not a key hash", hint="expected hmac-sha256:v1:<64 hex>, from `extproc "
        "keys hash`; never put a plaintext key here")] = Field(
        description="HMAC-SHA256(pepper, key) from `extproc keys hash`.")
    team: Name | None = Field(default=None, description="Team (or app) of the tenant this key "
                              "belongs to (`teams.<id>`).")


Prefer = Literal["cost", "latency"]


class RouteSpec(_Spec):
    """A routing policy: on a tenant (`route_policy`, every model) or per model
    (`routing.<model>`, field by field over the tenant's). docs/routing.md explains the
    selection order: zone, allow-list, health, then pin, weights and preference."""

    pin: Text | None = Field(default=None, description="Provider preferred for this model "
                             "while it is healthy (one of the model's deployments).")
    pin_region: Text | None = Field(default=None, description="Region preferred while one of "
                                    "its deployments is healthy (a provider `region`).")
    fallbacks: list[Text] | None = Field(default=None, description="Providers tried next, in "
                                         "this order, before the other allowed deployments.")
    weights: dict[Text, Annotated[int, Field(ge=0, le=1000)]] | None = Field(
        default=None, description="Share of traffic per provider among the healthy ones; "
        "providers not named get none unless the named ones are all unavailable.",
        json_schema_extra={"x-key": "<provider>"})
    providers: Annotated[list[Text], Field(min_length=1), Rule(
        required="must be a non-empty list of provider names")] | None = Field(
        default=None, description="Allow-list: only these providers serve the tenant.")
    prefer: Annotated[Prefer, Rule(invalid="must be cost or latency, got {value!r}")] | None = (
        Field(default=None, description="Order of the remaining deployments: cost (cheapest "
              "price first) or latency (fastest measured first); default: config order."))

    @model_validator(mode="after")
    def _one_pin(self) -> RouteSpec:
        if self.pin is not None and self.pin_region is not None:
            raise problem(((), "needs at most one of `pin` or `pin_region`", ""))
        return self


# --- guardrails (extproc.guardrails; docs/guardrails.md) -----------------------------------

PiiAction = Annotated[Literal["allow", "redact", "deny"], Rule(
    invalid="unknown action {value!r}", hint="allow, redact or deny")]
Temperature = Annotated[float, Field(ge=0, le=2)]


class GuardrailModelsSpec(_Spec):
    allow: Annotated[list[Text], Field(min_length=1), Rule(
        required="must be a non-empty list of model names")] | None = Field(
        default=None, description="Only these models (also within the tenant's `models`).")
    deny: list[Text] | None = Field(default=None, description="Never these models.")


class TemperatureRangeSpec(_Spec):
    min: Temperature | None = Field(default=None, description="Lowest temperature allowed.")
    max: Temperature | None = Field(default=None, description="Highest temperature allowed.")

    @model_validator(mode="after")
    def _ordered(self) -> TemperatureRangeSpec:
        if self.min is not None and self.max is not None and self.min > self.max:
            raise problem(((), "min is above max", ""))
        return self


class PromptCapSpec(_Spec):
    max_bytes: Annotated[int, Field(ge=1, le=1_000_000_000)] | None = Field(
        default=None, description="Most UTF-8 bytes of prompt text (messages, system, tool "
        "results).")
    max_tokens: Annotated[int, Field(ge=1, le=1_000_000_000)] | None = Field(
        default=None, description="Most estimated prompt tokens (text bytes / 3).")


class PiiSpec(_Spec):
    """One action per detector; a detector not named is `allow` (not run)."""

    email: PiiAction | None = Field(default=None, description="Email addresses.")
    phone: PiiAction | None = Field(default=None, description="Phone numbers with separators "
                                    "(+CC, North American, 0-prefixed national).")
    credit_card: PiiAction | None = Field(default=None, description="Payment card numbers "
                                          "(issuer prefix and Luhn checksum).")
    iban: PiiAction | None = Field(default=None, description="IBANs (country length and mod-97 "
                                   "checksum).")
    us_ssn: PiiAction | None = Field(default=None, description="US social security numbers "
                                     "(NNN-NN-NNNN, valid ranges).")
    ipv4: PiiAction | None = Field(default=None, description="IPv4 addresses.")
    ipv6: PiiAction | None = Field(default=None, description="IPv6 addresses.")
    secret: PiiAction | None = Field(default=None, description="Secret-looking tokens: `sk-...` "
                                     "API keys, AWS access key ids, private-key blocks.")


class ResponseRedactionSpec(_Spec):
    redact: Annotated[bool, Rule(invalid="must be true or false")] = Field(
        default=False, description="Redact answers with the detectors whose action is redact "
        "or deny (an answer is cleaned, never refused), with the request's placeholders.")
    stream_window: Annotated[int, Field(ge=8, le=4096)] = Field(
        default=64, description="Characters of a streamed answer held back so a value split "
        "across chunks is seen whole.")


class GuardrailsSpec(_Spec):
    """Guardrails of a tenant, or a profile a route names; a route's profile and a team's
    rules can only tighten the tenant's."""

    models: GuardrailModelsSpec | None = Field(default=None,
                                               description="Model allow and deny lists.")
    max_tokens: Annotated[int, Field(ge=1, le=10_000_000)] | None = Field(
        default=None, description="Largest max_tokens / max_completion_tokens a request may ask "
        "for (also the default when it asks none).")
    n: Annotated[int, Field(ge=1, le=128)] | None = Field(
        default=None, description="Largest `n` (choices) a request may ask for.")
    temperature: TemperatureRangeSpec | None = Field(
        default=None, description="Allowed temperature range.")
    tools: Annotated[bool, Rule(invalid="must be true or false")] | None = Field(
        default=None, description="false: requests that offer tools or functions are refused.")
    response_format: list[Literal["text", "json_object", "json_schema"]] | None = Field(
        default=None, description="Allowed `response_format.type` values.")
    prompt: PromptCapSpec | None = Field(default=None, description="Prompt size caps.")
    pii: PiiSpec | None = Field(default=None, description="PII detectors and their actions.")
    responses: ResponseRedactionSpec | None = Field(
        default=None, description="Redaction of answers (non-streamed and streamed).")


class DeploymentHealthSettings(_Spec):  # also the runtime object
    """Passive health of deployments: a circuit breaker per deployment (provider x
    upstream model), shared across replicas through Redis."""

    failures: Annotated[int, Field(ge=1, le=1000)] = Field(
        default=5, description="Consecutive failed answers (5xx, reset, too slow) that open "
        "a deployment's breaker.")
    cooldown_s: Annotated[int, Field(ge=1, le=3600)] = Field(
        default=10, description="How long an open deployment gets no traffic before one "
        "request probes it (half-open).")
    slow_ms: Annotated[int, Field(ge=1, le=600_000)] | None = Field(
        default=None, description="Response headers later than this count as a failure; "
        "null: latency never opens a breaker.")


class MetricsSettings(_Spec):
    """Prometheus metrics (docs/observability.md)."""

    max_tenant_labels: Annotated[int, Field(ge=0, le=100_000)] = Field(
        default=100, description="Cardinality guard: only the first N tenants of `tenants` "
        "(file order) keep their id as the `tenant` label of request metrics; the others "
        "are counted as `other`.")


def _otlp_url(url: str) -> str:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise problem(((), "not an http(s) URL with a host", "e.g. http://127.0.0.1:4318/v1/traces"))
    if parts.username or parts.password:
        raise problem(((), "must not carry credentials", ""))
    return url


class TracingSettings(_Spec):  # also the runtime object
    """OpenTelemetry spans per request, exported over OTLP/HTTP (docs/observability.md).
    Without this section nothing is traced or exported."""

    otlp_endpoint: Annotated[Text, AfterValidator(_otlp_url)] = Field(
        description="OTLP/HTTP traces endpoint of the collector, e.g. "
        "http://127.0.0.1:4318/v1/traces.")
    service_name: Text = Field(default="asc-extproc",
                               description="The `service.name` resource attribute.")
    sample_ratio: Annotated[float, Field(ge=0, le=1)] = Field(
        default=1.0, description="Share of new traces recorded (a client's sampled "
        "`traceparent` is always followed).")


class RateLimitsSpec(_Spec):
    rpm: Annotated[int, Field(ge=1, le=10_000_000)] | None = Field(
        default=None, description="Requests per minute.")
    tpm: Annotated[int, Field(ge=1, le=10_000_000_000)] | None = Field(
        default=None, description="Tokens per minute (estimate held, real usage settled).")


# --- identity: who a principal is, and its team (docs/tenancy.md) -----------------------

IdentitySourceName = Annotated[
    Literal["virtual_key", "mesh", "jwt"],
    Rule(invalid="unknown identity source {value!r}", hint="one of: virtual_key, mesh, jwt"),
]
SPIFFE_PATTERN: Final = r"^spiffe://[a-z0-9._-]+(/[A-Za-z0-9._~%!$&'()*+,;=:@-]*)*$"


class JwtIdentitySpec(_Spec):
    """A JWT issuer whose tokens Envoy's jwt_authn verifies (signature, expiry, issuer,
    audience); the service maps the verified claims to a tenant, principal and team."""

    issuer: Text = Field(description="Expected `iss`; Envoy rejects tokens of other issuers.")
    audiences: Annotated[list[Text], Field(min_length=1), Rule(
        required="must be a non-empty list of audiences")] = Field(
        description="Accepted `aud` values; Envoy answers 403 to any other.")
    jwks_file: FilePath = Field(description="Local JWKS file Envoy verifies signatures with "
                                "(relative to the config file).")
    tenant_claim: Text = Field(default="tenant", description="Claim naming the tenant id.")
    team_claim: Text | None = Field(default=None, description="Claim naming the principal's "
                                    "team (a `teams.<id>` of that tenant); absent: no team.")


class IdentitySpec(_Spec):
    """Which identity sources authenticate a request, in order of precedence; an Envoy
    route's `filter_metadata.asc.identity` replaces the list for that route."""

    sources: Annotated[list[IdentitySourceName], Field(min_length=1), Rule(
        required="must be a non-empty list of identity sources")] = Field(
        default=["virtual_key"], description="virtual_key, mesh (SPIFFE id of an mTLS peer) "
        "and/or jwt (claims verified by Envoy's jwt_authn), first presented wins.")
    jwt: JwtIdentitySpec | None = Field(default=None, description="The JWT issuer; required "
                                        "when `jwt` is a source.")

    @model_validator(mode="after")
    def _jwt_needs_issuer(self) -> IdentitySpec:
        if "jwt" in self.sources and self.jwt is None:
            raise problem((("jwt",), "is required when `jwt` is a source",
                           "e.g. {issuer: https://idp.example, audiences: [asc], "
                           "jwks_file: jwks.json}"))
        if len(set(self.sources)) != len(self.sources):
            raise problem((("sources",), "lists a source twice", ""))
        return self


class MeshIdentitySpec(_Spec):
    """A workload (SPIFFE id of an mTLS peer) that authenticates as this tenant."""

    spiffe: Annotated[str, Field(pattern=SPIFFE_PATTERN), Rule(
        invalid="not a SPIFFE id", hint="e.g. spiffe://acme.example/ns/billing/sa/api")] = Field(
        description="SPIFFE id (exact), or with `match: prefix` a prefix ending in '/' "
        "(e.g. a trust domain `spiffe://acme.example/`).")
    match: Annotated[Literal["exact", "prefix"], Rule(
        invalid="unknown match {value!r}", hint="exact or prefix")] = Field(
        default="exact", description="exact: the whole id; prefix: every id under it.")
    team: Name | None = Field(default=None, description="Team (or app) of these workloads.")

    @model_validator(mode="after")
    def _prefix_ends_at_a_segment(self) -> MeshIdentitySpec:
        if self.match == "prefix" and not self.spiffe.endswith("/"):
            raise problem((("spiffe",), "a prefix must end with '/'",
                           "spiffe://acme.example/ would otherwise also match "
                           "spiffe://acme.example.evil/"))
        return self


class TeamBudgetSpec(_WindowSpec):
    """A USD limit of one team (or app), reserved with the tenant's and key's limits."""


class TeamSpec(_Spec):
    """A team or app inside a tenant: its own models and budgets."""

    models: Annotated[list[Text], Field(min_length=1), Rule(
        required="must be a non-empty list of model names")] | None = Field(
        default=None, description="Models the team may use (among the tenant's); "
        "absent: the tenant's.")
    budgets: Annotated[list[TeamBudgetSpec], Rule(
        invalid="must be a list of budget rules",
        hint="e.g. [{window: day, limit_usd: 20}]")] | None = Field(
        default=None, description="USD budgets of the team (scope team).")
    guardrails: GuardrailsSpec | None = Field(
        default=None, description="Guardrails of the team; they tighten the tenant's.")


class TenantAuditSpec(_Spec):
    capture: Annotated[bool, Rule(invalid="must be true or false")] = Field(
        default=False, description="Keep the request and response text in the audit record, "
        "sealed with the KEK under this tenant's scope (needs `secrets.kek`; docs/audit.md).")


class TenantSpec(_Spec):
    """A tenant: who may call, which models, where (residency) and for how much."""

    zone: Text | None = Field(default=None, description="Residency zone: never routed outside it.")
    keys: Annotated[list[KeySpec], Field(min_length=1), Rule(
        required="must be a non-empty list of {id, hash}",
        hint="create a hash with `extproc keys hash --config asc.yaml`")] = Field(
        description="Virtual keys, stored as hashes.")
    models: Annotated[list[Text], Field(min_length=1), Rule(
        required="must be a non-empty list of model names")] = Field(
        description="Models the tenant may use.")
    route_policy: RouteSpec | None = Field(
        default=None, description="Routing policy for every model of the tenant.")
    routing: dict[str, RouteSpec] | None = Field(
        default=None, description="Per-model routing rules, field by field over "
        "`route_policy`.", json_schema_extra={"x-key": "<model>"})
    debug: Annotated[bool, Rule(invalid="must be true or false")] = Field(
        default=False, description="Answers carry `x-asc-route-reason` (why this deployment "
        "was chosen).")
    org: Name | None = Field(default=None,
                             description="Org (from `orgs:`) whose budgets also apply.")
    budgets: Annotated[list[TenantBudgetSpec], Rule(
        invalid="must be a list of budget rules",
        hint="e.g. [{scope: tenant, window: month, limit_usd: 500}]")] | None = Field(
        default=None, description="USD budgets of the tenant, its keys and models.")
    rate_limits: RateLimitsSpec | None = Field(default=None, description="RPM / TPM limits.")
    on_redis_error: Annotated[Literal["fail_closed", "fail_open"], Rule(
        invalid="unknown mode {value!r}", hint="fail_closed (default) or fail_open")] = Field(
        default="fail_closed", description="What budget requests get while Redis is unavailable.")
    fail_open_ceiling_usd: Annotated[Usd, Rule(
        hint="USD per replica and day, e.g. 5")] | None = Field(
        default=None, description="With fail_open: the most one replica may spend for this tenant "
        "per day while Redis is down.")
    max_tokens: Annotated[int, Field(ge=1, le=10_000_000)] | None = Field(
        default=None, description="Largest max_tokens a request may ask for (also the default).")
    credentials: dict[str, Annotated[list[Text], Field(min_length=1), Rule(
        required="must be a non-empty list of credential ids")]] | None = Field(
        default=None, description="BYOK: provider name -> this tenant's own keyring credentials.",
        json_schema_extra={"x-key": "<provider>"})
    guardrails: GuardrailsSpec | None = Field(
        default=None, description="Model, parameter, prompt size and PII rules.")
    teams: dict[Name, TeamSpec] | None = Field(
        default=None, description="Teams and apps of the tenant.",
        json_schema_extra={"x-key": "<team>"})
    mesh_identities: list[MeshIdentitySpec] | None = Field(
        default=None, description="Workloads (SPIFFE ids of mTLS peers) of the tenant.")
    responses_store: Annotated[bool, Rule(invalid="must be true or false")] = Field(
        default=False, description="POST /v1/responses may store responses upstream "
        "(`store: true`, `previous_response_id`). Stored responses live on the gateway's "
        "provider account, shared by every tenant: off by default (decision 0112).")
    audit: TenantAuditSpec | None = Field(
        default=None, description="Per-tenant audit options (text capture).")

    @model_validator(mode="after")
    def _teams_known(self) -> TenantSpec:
        teams = set(self.teams or ())
        issues: list[Issue] = []
        named = [(("keys", i, "team"), k.team) for i, k in enumerate(self.keys)]
        named += [(("mesh_identities", i, "team"), m.team)
                  for i, m in enumerate(self.mesh_identities or ())]
        for where, team in named:
            if team is not None and team not in teams:
                issues.append((where, f"unknown team {team!r}",
                               f"teams: {', '.join(sorted(teams)) or '-'}"))
        for team_id, team_spec in (self.teams or {}).items():
            for index, model in enumerate(team_spec.models or ()):
                if model not in self.models:
                    issues.append((("teams", team_id, "models", index),
                                   f"model {model!r} is not allowed for this tenant", ""))
        if issues:
            raise problem(*issues)
        return self

    @model_validator(mode="after")
    def _local_rules(self) -> TenantSpec:
        issues: list[Issue] = []
        seen: set[str] = set()
        for index, key in enumerate(self.keys):
            if key.id in seen:
                issues.append((("keys", index, "id"), f"duplicate key id {key.id!r}",
                               "key ids name a key in logs and budgets; make each unique "
                               "per tenant"))
            seen.add(key.id)
        for index, rule in enumerate(self.budgets or ()):
            if rule.scope == "key" and rule.key not in seen:
                issues.append((("budgets", index, "key"), f"unknown key id {rule.key!r}",
                               f"key ids: {', '.join(sorted(seen))}"))
            if rule.scope == "model" and rule.model not in self.models:
                issues.append((("budgets", index, "model"),
                               f"model {rule.model!r} is not allowed for this tenant", ""))
        if self.on_redis_error == "fail_open" and self.fail_open_ceiling_usd is None:
            issues.append((("fail_open_ceiling_usd",), "is required with fail_open",
                           "the most one replica may spend for this tenant per day while "
                           "Redis is down"))
        if issues:
            raise problem(*issues)
        return self


# --- the document ------------------------------------------------------------------------

class AuditSpec(_Spec):
    """Per-request audit records: sinks, rotation, queue, failure policy, chain keys
    (docs/audit.md). Read at start; a reload does not change them."""

    sinks: Annotated[list[Literal["jsonl", "redis"]], Field(min_length=1), Rule(
        invalid="unknown sink {value!r}", hint="one or both of: jsonl, redis")] = Field(
        default=["jsonl"], description="Where records go: append-only JSONL files in `dir` "
        "and/or a Redis Stream (`redis_stream`, needs `redis`).")
    dir: FilePath | None = Field(
        default=None, description="Directory of the JSONL files, the public key and the "
        "chain keys; relative to the config file. Default: `audit/` under the working "
        "directory of `extproc serve` (`make run`: var/run/audit).")
    rotate_bytes: Annotated[int, Field(ge=4096, le=1 << 40)] = Field(
        default=64 << 20, description="A JSONL file is closed and a new one opened past "
        "this size.")
    rotate_s: Annotated[int, Field(ge=1, le=31 * 86_400)] = Field(
        default=86_400, description="... or past this age (seconds).")
    fsync: Annotated[Literal["batch", "none"], Rule(
        invalid="must be batch or none, got {value!r}")] = Field(
        default="batch", description="batch: fsync after every batch written (a record "
        "is on disk before the next batch starts); none: leave it to the OS.")
    queue_size: Annotated[int, Field(ge=1, le=1_000_000)] = Field(
        default=10_000, description="Records waiting for the writer; when full, "
        "`on_failure` applies.")
    batch_records: Annotated[int, Field(ge=1, le=100_000)] = Field(
        default=512, description="Most records written (and fsynced) in one batch.")
    on_failure: Annotated[Literal["block", "buffer"], Rule(
        invalid="must be block or buffer, got {value!r}")] = Field(
        default="block", description="A failing sink: block (finishing requests wait for "
        "queue room, new requests get 503 while the queue is full) or buffer (keep up to "
        "`buffer_records` in memory, then count and log each record dropped).")
    buffer_records: Annotated[int, Field(ge=1, le=10_000_000)] = Field(
        default=100_000, description="on_failure buffer: records kept in memory per sink.")
    checkpoint_every: Annotated[int, Field(ge=1, le=1_000_000)] = Field(
        default=1000, description="A signed checkpoint after this many records ...")
    checkpoint_interval_s: Annotated[int, Field(ge=1, le=86_400)] = Field(
        default=60, description="... or this many seconds with new records.")
    signing_key: FilePath | None = Field(
        default=None, description="Ed25519 private key (PEM, mode 0600) that signs "
        "checkpoints; relative to the config file. Default: `<dir>/signing.key`, made on "
        "first start.")
    hmac_key: Annotated[Literal["auto", "kek", "local"], Rule(
        invalid="must be auto, kek or local, got {value!r}")] = Field(
        default="auto", description="Chain HMAC key: kek (a random key wrapped by "
        "`secrets.kek`), local (a 0600 file in `<dir>/keys`), auto (kek when "
        "`secrets.kek` is set).")
    redis_stream: Text = Field(default="asc:audit",
                               description="Redis sink: the stream key.")
    redis_maxlen: Annotated[int, Field(ge=1000, le=1_000_000_000)] = Field(
        default=10_000_000, description="Redis sink: approximate MAXLEN of the stream "
        "(oldest entries trimmed; the JSONL files are the archive).")


class AuthSpec(_Spec):
    pepper: PepperRefSpec = Field(description="HMAC key that virtual keys are hashed with.")


def _version_one(version: int) -> int:
    if version != 1:
        raise problem(((), f"unsupported version {version!r}", "set `version: 1`"))
    return version


class Document(_Spec):
    """`asc.yaml`, version 1."""

    model_config = ConfigDict(title="asc.yaml", json_schema_extra={
        "$schema": "https://json-schema.org/draft/2020-12/schema"})

    version: Annotated[int, AfterValidator(_version_one),
                       Rule(invalid="unsupported version {value!r}", hint="set `version: 1`"),
                       WithJsonSchema({"const": 1, "type": "integer"})] = Field(
        description="Format version; only 1 exists.")
    auth: AuthSpec = Field(description="How virtual keys are checked.")
    limits: Limits | None = Field(default=None, description="Size limits.")
    failover: FailoverSettings | None = Field(
        default=None, description="Attempts, retry budget and outlier detection of failover.")
    redis: RedisSettings | None = Field(default=None, description="Redis; needed by budgets, rate "
                                        "limits and keyring credentials.")
    budgets: BudgetSettings | None = Field(default=None,
                                           description="Gateway-wide budget settings.")
    deployment_health: DeploymentHealthSettings | None = Field(
        default=None, description="Circuit breakers of deployments.")
    fast_path: FastPathSettings | None = Field(
        default=None, description="One HTTP check, no ext_proc message, per same-dialect "
        "request.")
    logging: LoggingSettings | None = Field(
        default=None, description="Per-request logging.")
    metrics: MetricsSettings | None = Field(
        default=None, description="Prometheus metrics: the tenant label cardinality guard.")
    tracing: TracingSettings | None = Field(
        default=None, description="OpenTelemetry tracing; off without this section.")
    secrets: SecretsSpec | None = Field(default=None, description="KEK, record store and keyring "
                                        "cache; needed by keyring credentials.")
    credentials: dict[Name, CredentialSpec] | None = Field(
        default=None, description="Provider keys by id: references, never values.",
        json_schema_extra={"x-key": "<id>"})
    providers: Annotated[dict[Name, ProviderSpec], Field(min_length=1), Rule(
        required="must define at least one provider")] = Field(
        description="Upstreams by name.", json_schema_extra={"x-key": "<name>"})
    models: dict[Name, ModelSpec] = Field(
        description="Models by the name clients send.", json_schema_extra={"x-key": "<name>"})
    orgs: dict[Name, OrgSpec] | None = Field(
        default=None, description="Orgs: budgets shared by several tenants.",
        json_schema_extra={"x-key": "<id>"})
    tenants: dict[Name, TenantSpec] = Field(
        description="Tenants by id.", json_schema_extra={"x-key": "<id>"})
    identity: IdentitySpec | None = Field(
        default=None, description="Identity sources (default: virtual keys only).")
    guardrail_profiles: dict[Name, GuardrailsSpec] | None = Field(
        default=None, description="Guardrails an Envoy route names in its metadata "
        "(`filter_metadata.asc.guardrails`); they tighten the tenant's.",
        json_schema_extra={"x-key": "<name>"})
    audit: AuditSpec | None = Field(default=None, description="Audit records (docs/audit.md).")


class _AscJsonSchema(GenerateJsonSchema):
    """Names a mapping's keys must match become `propertyNames` (pydantic writes
    `patternProperties`, which lets keys that do not match through unchecked)."""

    def dict_schema(self, schema: core_schema.DictSchema) -> JsonSchemaValue:
        result = super().dict_schema(schema)
        patterns = result.get("patternProperties", {})
        if len(patterns) == 1:
            (pattern, values), = patterns.items()
            del result["patternProperties"]
            result["propertyNames"] = {"pattern": pattern}
            result["additionalProperties"] = values
        return result


def json_schema() -> dict[str, Any]:
    """The JSON Schema of `asc.yaml` (what `extproc config schema` prints)."""
    return Document.model_json_schema(schema_generator=_AscJsonSchema)

def json_schema_text() -> str:
    """The JSON Schema as shipped in `deploy/schema/asc.schema.json`."""
    return json.dumps(json_schema(), indent=2) + "\n"


def field_paths(schema: dict[str, Any]) -> dict[str, tuple[str, ...]]:
    """Every field of a JSON Schema of `asc.yaml`, by section, in the reference's naming:
    `""` (top), `redis`, `providers.<name>`, `tenants.<id>.keys[]`, ...

    Mapping keys chosen by the operator appear as the schema's `x-key` placeholder.
    """
    definitions = schema.get("$defs", {})
    sections: dict[str, tuple[str, ...]] = {}

    def resolve(node: dict[str, Any]) -> dict[str, Any]:
        while "$ref" in node:
            node = definitions[node["$ref"].rsplit("/", 1)[-1]]
        return node

    def walk(node: dict[str, Any], path: str, key: str = "<key>") -> None:
        node = resolve(node)
        for option in node.get("anyOf", ()):
            if option.get("type") != "null":
                walk(option, path, node.get("x-key", key))
        key = node.get("x-key", key)
        if "properties" in node:
            sections[path] = tuple(node["properties"])
            for name, child in node["properties"].items():
                walk(child, f"{path}.{name}" if path else name)
        for child in (*node.get("patternProperties", {}).values(),
                      *([node["additionalProperties"]]
                        if isinstance(node.get("additionalProperties"), dict) else [])):
            walk(child, f"{path}.{key}")
        if isinstance(node.get("items"), dict):
            walk(node["items"], f"{path}[]")

    walk(schema, "")
    return sections
