"""`asc.yaml` -> one immutable, typed `GatewayConfig`.

The file is validated completely before anything uses it: every problem is reported with
its path in the file (and its line), a message and a hint, so an operator fixes them all in
one pass. A running server swaps configs atomically (`runtime.RuntimeHolder`); a reload that
fails validation keeps the old config (see `server.py`).

Three passes, all of whose problems are reported together:

1. YAML: syntax, and duplicate keys at any depth (YAML keeps the last one silently);
2. the document's shape (`extproc.config_schema`, pydantic): fields, types, ranges,
   enums, defaults and the checks local to one object;
3. cross-references (a tenant's model exists, a pin stays in the tenant's zone, a virtual
   key is used once, ...), which compile the validated document into the runtime objects.

When pass 2 finds problems, pass 3 still runs on what is valid: the entries with problems
are left out (and references to them are not reported as unknown).
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import hashlib
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Union, get_args, get_origin
from urllib.parse import urlsplit

import annotated_types
import yaml
from pydantic import BaseModel, TypeAdapter, ValidationError, create_model
from pydantic.fields import FieldInfo

from extproc.budgets.policy import BudgetRule, RateLimits, Scope, TenantBudget, Window
from extproc.config_schema import (
    KEY_HASH_PATTERN,
    MULTIPLE_CHOICES_MODES,
    OUTPUT_LIMIT_FIELDS,
    SUPPORTED_PROVIDER_KINDS,
    AuditSpec,
    AuthSpec,
    BudgetSettings,
    CredentialSpec,
    DeploymentHealthSettings,
    Document,
    FailoverSettings,
    FastPathSettings,
    GuardrailsSpec,
    IdentitySpec,
    KekSpec,
    Limits,
    LoggingSettings,
    MetricsSettings,
    ModelSpec,
    OrgBudgetSpec,
    PriceSpec,
    ProviderSpec,
    RecordStoreSpec,
    RedisSettings,
    RouteSpec,
    Rule,
    SecretRefSpec,
    SecretsSpec,
    TenantBudgetSpec,
    TenantSpec,
    TracingSettings,
    field_paths,
    json_schema,
    kind_of,
)
from extproc.guardrails.settings import GuardrailPolicy, policy_from_spec

__all__ = [
    "KEY_HASH_PATTERN",
    "MULTIPLE_CHOICES_MODES",
    "OUTPUT_LIMIT_FIELDS",
    "SCHEMA",
    "SUPPORTED_PROVIDER_KINDS",
    "AuditSettings",
    "BudgetSettings",
    "ConfigError",
    "ConfigIssue",
    "CredentialRef",
    "Deployment",
    "DeploymentHealthSettings",
    "FailoverSettings",
    "FastPathSettings",
    "GatewayConfig",
    "IdentitySettings",
    "JwtIdentity",
    "KekSettings",
    "Limits",
    "LoggingSettings",
    "MeshIdentity",
    "MetricsConfig",
    "Model",
    "Price",
    "Probe",
    "Provider",
    "RecordStoreSettings",
    "RedisSettings",
    "RoutePolicy",
    "SecretsSettings",
    "Team",
    "Tenant",
    "TenantKey",
    "load_config",
    "parse_config",
]

SCHEMA: Final[dict[str, tuple[str, ...]]] = field_paths(json_schema())
"""Every field the config accepts, by section (generated from `config_schema`)."""


def _default(spec: type[BaseModel], name: str) -> Any:
    """A field's default, as declared once in `config_schema`."""
    return spec.model_fields[name].default


def _shared(spec: BaseModel, runtime: type[Any], *computed: str) -> dict[str, Any]:
    """The fields a runtime dataclass takes from its spec by name (lists become tuples),
    less the `computed` ones: a new field needs its spec field and its runtime attribute,
    nothing in between."""
    names = {f.name for f in dataclasses.fields(runtime)} & set(type(spec).model_fields)
    values = {name: getattr(spec, name) for name in names - set(computed)}
    return {name: tuple(value) if isinstance(value, list) else value
            for name, value in values.items()}


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


# --- runtime objects ---------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class CredentialRef:
    """Where a secret lives; never the secret itself. Exactly one of env / file / keyring."""

    id: str
    env: str | None = None
    file: Path | None = None
    keyring: bool = False
    """Sealed versions in the envelope-encrypted keyring (`extproc keys add`)."""
    weight: int = _default(CredentialSpec, "weight")
    """Share of a provider's traffic among its healthy credentials."""


@dataclass(frozen=True, slots=True)
class KekSettings:
    backend: str
    path: Path | None = None
    url: str | None = None
    mount: str = _default(KekSpec, "mount")
    key: str = _default(KekSpec, "key")
    token: CredentialRef | None = None
    role_id: str | None = None
    secret_id: CredentialRef | None = None


@dataclass(frozen=True, slots=True)
class RecordStoreSettings:
    """Where sealed records live: `redis` (next to their state) or `vault_kv` (KV v2)."""

    backend: str = "redis"
    url: str | None = None
    mount: str = _default(RecordStoreSpec, "mount")
    prefix: str = _default(RecordStoreSpec, "prefix")
    token: CredentialRef | None = None


@dataclass(frozen=True, slots=True)
class SecretsSettings:
    kek: KekSettings | None = None
    store: RecordStoreSettings = field(default_factory=RecordStoreSettings)
    cache_ttl_s: int = _default(SecretsSpec, "cache_ttl_s")
    max_age_s: int = _default(SecretsSpec, "max_age_s")
    state_ttl_s: float = float(_default(SecretsSpec, "state_ttl_s"))
    rollback_after: int = _default(SecretsSpec, "rollback_after")


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
    """Client headers forwarded to this provider on top of its kind's allow-list."""


@dataclass(frozen=True, slots=True)
class Price:
    """Micro-USD per million tokens (1 USD/Mtok == 1 micro-USD per token)."""

    input_micro_per_mtok: int
    output_micro_per_mtok: int
    cached_input_micro_per_mtok: int
    cache_write_micro_per_mtok: int | None = None
    """None: twice the input price (Anthropic bills cache writes at 1.25x or 2x input)."""

    @property
    def cache_write_rate(self) -> int:
        if self.cache_write_micro_per_mtok is not None:
            return self.cache_write_micro_per_mtok
        return 2 * self.input_micro_per_mtok


@dataclass(frozen=True, slots=True)
class Probe:
    """An active health probe of a deployment (`deployments[].probe`)."""

    path: str
    interval_s: int
    timeout_ms: int


@dataclass(frozen=True, slots=True)
class Deployment:
    provider: str
    model: str
    price: Price | None = None
    """This deployment's own price; None: the model's."""
    probe: Probe | None = None


@dataclass(frozen=True, slots=True)
class RoutePolicy:
    """A tenant's routing policy for one model (its `route_policy` with the model's
    `routing.<model>` fields over it). Names are provider names; see `extproc.routing`."""

    pin: str | None = None
    pin_region: str | None = None
    fallbacks: tuple[str, ...] = ()
    weights: Mapping[str, int] = field(default_factory=dict)
    providers: frozenset[str] | None = None
    """Allow-list; None: every provider of the tenant's zone."""
    prefer: str | None = None
    """cost, latency, or None (config order)."""


@dataclass(frozen=True, slots=True)
class Model:
    name: str
    price: Price
    deployments: tuple[Deployment, ...]
    output_limit_field: str | None = None
    """`max_tokens` or `max_completion_tokens` on the wire; None: by model family."""
    kind: str = "chat"
    """chat, or embedding (POST /v1/embeddings only; see `extproc.endpoints`)."""


@dataclass(frozen=True, slots=True)
class TenantKey:
    id: str
    hash: str
    team: str | None = None


@dataclass(frozen=True, slots=True)
class Team:
    """A team or app inside a tenant. Its budgets are `Scope.TEAM` rules in the tenant's
    `TenantBudget` (one Lua call reserves them with the tenant's)."""

    id: str
    models: frozenset[str] | None = None
    """Models the team may use; None: the tenant's."""
    guardrails: GuardrailPolicy | None = None
    """Rules that tighten the tenant's guardrails for this team (extproc.guardrails)."""


@dataclass(frozen=True, slots=True)
class MeshIdentity:
    """A SPIFFE id (or, with `prefix`, every id under a path) that authenticates as a
    tenant on an mTLS listener."""

    spiffe: str
    prefix: bool = False
    team: str | None = None


@dataclass(frozen=True, slots=True)
class JwtIdentity:
    issuer: str
    audiences: tuple[str, ...]
    jwks_file: Path
    tenant_claim: str = "tenant"
    team_claim: str | None = None


@dataclass(frozen=True, slots=True)
class IdentitySettings:
    """Identity sources in order of precedence (docs/tenancy.md)."""

    sources: tuple[str, ...] = ("virtual_key",)
    jwt: JwtIdentity | None = None


@dataclass(frozen=True, slots=True)
class Tenant:
    id: str
    zone: str | None
    keys: tuple[TenantKey, ...]
    models: frozenset[str]
    policies: Mapping[str, RoutePolicy] = field(default_factory=dict)
    """Routing policy by model name; a model without an entry uses `default_policy`."""
    default_policy: RoutePolicy = field(default_factory=RoutePolicy)
    debug: bool = False
    """Answers carry `x-asc-route-reason`."""
    budget: TenantBudget | None = None
    """None when the tenant has no budgets and no rate limits: no Redis call at all."""
    own_credentials: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    """BYOK: provider name -> this tenant's own keyring credentials (scope tenant:<id>)."""
    max_tokens: int | None = None
    """Largest `max_tokens` a request may ask for (also the default when it asks none)."""
    teams: Mapping[str, Team] = field(default_factory=dict)
    mesh_identities: tuple[MeshIdentity, ...] = ()
    guardrails: GuardrailPolicy | None = None
    """Model, parameter, prompt size and PII rules (extproc.guardrails)."""
    responses_store: bool = False
    """POST /v1/responses may keep `store: true` / `previous_response_id` (decision 0112)."""
    audit_capture: bool = False
    """Audit records keep the request/response text, sealed under `tenant:<id>`."""


@dataclass(frozen=True, slots=True)
class AuditSettings:
    """`audit:` compiled: paths resolved against the config file (docs/audit.md)."""

    sinks: tuple[str, ...] = tuple(_default(AuditSpec, "sinks"))
    dir: Path | None = None
    """None: `audit/` under the working directory of the serving process."""
    rotate_bytes: int = _default(AuditSpec, "rotate_bytes")
    rotate_s: int = _default(AuditSpec, "rotate_s")
    fsync: str = _default(AuditSpec, "fsync")
    queue_size: int = _default(AuditSpec, "queue_size")
    batch_records: int = _default(AuditSpec, "batch_records")
    on_failure: str = _default(AuditSpec, "on_failure")
    buffer_records: int = _default(AuditSpec, "buffer_records")
    checkpoint_every: int = _default(AuditSpec, "checkpoint_every")
    checkpoint_interval_s: int = _default(AuditSpec, "checkpoint_interval_s")
    signing_key: Path | None = None
    hmac_key: str = _default(AuditSpec, "hmac_key")
    redis_stream: str = _default(AuditSpec, "redis_stream")
    redis_maxlen: int = _default(AuditSpec, "redis_maxlen")

    @property
    def directory(self) -> Path:
        """`dir`, or `audit/` under the working directory of the running process."""
        return self.dir if self.dir is not None else Path.cwd() / "audit"


OTHER_TENANT_LABEL: Final = "other"
"""The `tenant` label of tenants past `metrics.max_tenant_labels`."""


@dataclass(frozen=True, slots=True)
class MetricsConfig:
    """The tenant label cardinality guard, compiled: which tenant ids may be a label value.

    Every tenant label multiplies the series of each request metric (by provider, region,
    model, status, histogram buckets), so a config with thousands of tenants keeps only the
    first `max_tenant_labels` (file order: the operator chooses who is named); the others
    share `other`. Tenants are known from the config, so there is no first-come choice that
    a reload or a restart would shuffle.
    """

    max_tenant_labels: int = 100
    labelled_tenants: frozenset[str] = frozenset()

    def tenant_label(self, tenant: str) -> str:
        return tenant if tenant in self.labelled_tenants else OTHER_TENANT_LABEL


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
    failover: FailoverSettings = field(default_factory=FailoverSettings)
    deployment_health: DeploymentHealthSettings = field(
        default_factory=DeploymentHealthSettings)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    tracing: TracingSettings | None = None
    identity: IdentitySettings = field(default_factory=IdentitySettings)
    guardrail_profiles: Mapping[str, GuardrailPolicy] = field(default_factory=dict)
    """Guardrails a route names in `filter_metadata.asc.guardrails`."""
    audit: AuditSettings = field(default_factory=AuditSettings)
    digest: str = field(default="", compare=False)
    """SHA-256 of the config file's bytes (hex): the audit record's `config_version`.
    Not compared: two files that compile alike are the same config."""
    fast_path: FastPathSettings = field(default_factory=FastPathSettings)
    logging: LoggingSettings = field(default_factory=LoggingSettings)


# --- entry points ------------------------------------------------------------------------

def load_config(path: str | Path) -> GatewayConfig:
    """Read and validate `path`; raises `ConfigError` listing every problem."""
    source = str(path)
    try:
        data = Path(path).read_bytes()
        text = data.decode("utf-8")
    except OSError as exc:
        raise ConfigError(source, [ConfigIssue("", f"cannot read file: {exc.strerror}")]) from None
    except UnicodeDecodeError:
        raise ConfigError(source, [ConfigIssue("", "cannot read file: not UTF-8")]) from None
    config = parse_config(text.replace("\r\n", "\n").replace("\r", "\n"), source=source,
                          base_dir=Path(path).resolve().parent)
    # The file's own bytes, hashed once per load: the audit record's config version.
    return dataclasses.replace(config, digest=hashlib.sha256(data).hexdigest())


def parse_config(
    text: str, *, source: str = "<string>", base_dir: Path | None = None
) -> GatewayConfig:
    """Validate `text` (relative file references resolve against `base_dir`)."""
    try:
        return _parse(text, source, base_dir or Path.cwd())
    except RecursionError:  # PyYAML and the walks recurse once per nesting level
        raise ConfigError(source, [ConfigIssue(
            "", "nested too deeply", "asc.yaml needs a few levels; look for an unclosed "
            "[ or { or a runaway indentation")]) from None


def _parse(text: str, source: str, base_dir: Path) -> GatewayConfig:
    loader = yaml.SafeLoader(text)
    try:  # one parse: the node tree gives lines and duplicates, and then the data
        root = loader.get_single_node()
        raw = loader.construct_document(root) if root is not None else None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark is not None else None
        issue = ConfigIssue("", f"not valid YAML: {getattr(exc, 'problem', exc)}", "", line)
        raise ConfigError(source, [issue]) from None
    finally:
        loader.dispose()
    lines: dict[str, int] = {}
    issues = _walk_nodes(root, lines) if root is not None else []
    document, shape_issues, partial = _validate(raw, lines)
    issues += shape_issues
    config = None
    if document is not None:
        compiler = _Compiler(document, raw, lines, source, base_dir, partial)
        config = compiler.compile()
        issues += compiler.issues
    if issues or config is None:
        raise ConfigError(source, issues)
    return config


# --- pass 1: YAML lines and duplicate keys -----------------------------------------------

def _join(path: str, key: object) -> str:
    if isinstance(key, int) and not isinstance(key, bool):
        return f"{path}[{key}]"
    return f"{path}.{key}" if path else str(key)


def _walk_nodes(root: yaml.Node, lines: dict[str, int]) -> list[ConfigIssue]:
    """Fill `lines` (dotted path -> 1-based line) and report every duplicate key."""
    issues: list[ConfigIssue] = []

    def walk(node: yaml.Node, path: str) -> None:
        lines.setdefault(path, node.start_mark.line + 1)
        if isinstance(node, yaml.MappingNode):
            first_line: dict[str, int] = {}
            for key_node, value_node in node.value:
                key = str(key_node.value)
                child = _join(path, key)
                line = key_node.start_mark.line + 1
                if key in first_line and key != "<<":
                    issues.append(ConfigIssue(
                        child, f"duplicate key {key!r}",
                        f"first defined at line {first_line[key]}; YAML would keep only "
                        "the last one: merge them or remove one", line))
                first_line.setdefault(key, line)
                lines[child] = line
                walk(value_node, child)
        elif isinstance(node, yaml.SequenceNode):
            for index, item in enumerate(node.value):
                walk(item, _join(path, index))

    walk(root, "")
    return issues


# --- pass 2: the document's shape --------------------------------------------------------

def _optional(annotation: Any) -> Any:
    return annotation | None


_TolerantDocument: Final = create_model(  # type: ignore[call-overload]
    "_TolerantDocument", __base__=Document,
    **{name: (_optional(info.annotation), None)
       for name, info in Document.model_fields.items() if info.is_required()},
)
"""The document with every top-level section optional: what pass 3 runs on when a whole
section had to be left out."""


def _validate(
    raw: object, lines: Mapping[str, int]
) -> tuple[Document | None, list[ConfigIssue], set[tuple[str, Any]]]:
    """The validated document and every problem found. With problems, the document is
    what pass 3 can still check: the parts with problems left out, and the top-level
    entries (providers, models, tenants, ...) that had to go put back with only their
    valid fields (`_partial`), named in the third value."""
    try:
        return Document.model_validate(raw), [], set()
    except ValidationError as exc:
        errors = exc.errors()
    issues = [issue for error in errors for issue in _issues(error, lines)]
    if not isinstance(raw, dict):
        return None, issues, set()
    data: Any = copy.deepcopy(raw)
    removed: set[tuple[int | str, ...]] = set()
    for _ in range(8):  # each round removes at least one entry; a handful suffice
        for loc in sorted({_prune_point(error["loc"]) for error in errors}, key=len,
                          reverse=True):
            _remove(data, loc)
            removed.add(loc)
        try:
            tolerated = typing.cast(Document, _TolerantDocument.model_validate(data))
        except ValidationError as exc:
            errors = exc.errors()
            continue
        partial: set[tuple[str, Any]] = set()
        return _with_partial_entries(tolerated, raw, removed, partial), issues, partial
    return None, issues, set()


def _with_partial_entries(document: Document, raw: dict[Any, Any],
                          removed: set[tuple[int | str, ...]],
                          partial: set[tuple[str, Any]]) -> Document:
    """Put back each removed top-level entry (`tenants.acme`) with the fields that are
    valid on their own, so its cross-references are still checked."""
    sections: dict[str, dict[Any, Any]] = {}
    for loc in sorted(removed, key=str):
        if len(loc) != 2 or not isinstance(loc[0], str):
            continue
        section, name = str(loc[0]), loc[1]
        annotation = _annotation_parts(Document.model_fields[section].annotation)[0]
        entry = _value_at(raw, loc)
        if get_origin(annotation) is not dict or not isinstance(entry, dict):
            continue
        spec = _annotation_parts(get_args(annotation)[1])[0]
        key_type = get_args(annotation)[0]
        if not _valid(key_type, name):
            continue
        sections.setdefault(section, {})[name] = _partial(spec, entry)
        partial.add((section, name))
    for section, partials in sections.items():  # in the file's order
        valid = getattr(document, section) or {}
        sections[section] = {name: partials[name] if name in partials else valid[name]
                             for name in raw[section] if name in partials or name in valid}
    return document.model_copy(update=sections) if sections else document


def _partial(spec: type[BaseModel], raw: dict[Any, Any]) -> BaseModel:
    """`spec` with the fields of `raw` that validate on their own; the others are their
    default, or None for a required field. Only pass 3 sees it (never a runtime object)."""
    values: dict[str, Any] = {}
    for name, info in spec.model_fields.items():
        adapter = _field_adapter(spec, name)
        if name in raw and _valid(adapter, raw[name]):
            values[name] = adapter.validate_python(raw[name], strict=True)
        elif info.is_required():
            values[name] = None
    return spec.model_construct(**values)


@functools.cache
def _field_adapter(spec: type[BaseModel], name: str) -> TypeAdapter[Any]:
    info = spec.model_fields[name]
    annotated: Any = (typing.Annotated[info.annotation, *info.metadata] if info.metadata
                      else info.annotation)
    return TypeAdapter(annotated)


def _valid(kind: Any, value: object) -> bool:
    adapter = kind if isinstance(kind, TypeAdapter) else TypeAdapter(kind)
    try:
        adapter.validate_python(value, strict=True)
    except ValidationError:
        return False
    return True


def _annotation_parts(annotation: Any) -> tuple[Any, list[Any]]:
    """`Annotated[X | None, ...]` -> (X, metadata); `FieldInfo`s inside are flattened."""
    metadata: list[Any] = []
    while True:
        if get_origin(annotation) is typing.Annotated:
            annotation, *extra = get_args(annotation)
            for item in extra:
                metadata.extend(item.metadata if isinstance(item, FieldInfo) else [item])
        elif get_origin(annotation) in (Union, types.UnionType):
            options = [a for a in get_args(annotation) if a is not type(None)]
            if len(options) != 1:
                return annotation, metadata
            annotation = options[0]
        else:
            return annotation, metadata


def _locate(loc: tuple[int | str, ...]) -> tuple[Any, list[Any], type[BaseModel] | None]:
    """The annotation at `loc`, its metadata, and the model that holds the last field."""
    annotation: Any = Document
    metadata: list[Any] = []
    owner: type[BaseModel] | None = None
    for part in loc:
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            info = annotation.model_fields.get(str(part))
            if info is None:
                return None, [], annotation
            owner = annotation
            annotation, metadata = _annotation_parts(info.annotation)
            metadata = [*info.metadata, *metadata]
        elif get_origin(annotation) is dict:
            if part == "[key]":
                annotation, metadata = _annotation_parts(get_args(annotation)[0])
            else:
                annotation, metadata = _annotation_parts(get_args(annotation)[1])
        elif get_origin(annotation) is list:
            annotation, metadata = _annotation_parts(get_args(annotation)[0])
        else:
            return None, [], owner
    return annotation, metadata, owner


def _prune_point(loc: tuple[int | str, ...]) -> tuple[int | str, ...]:
    """What to leave out for a problem at `loc`: the innermost thing around it that can go
    without changing what else means (an unknown key, an optional field, a mapping entry
    such as a provider or a tenant), else its whole top-level section. List items never
    go: the items after them would change index."""
    point = loc[:1]
    annotation: Any = Document
    for depth, part in enumerate(loc):
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            info = annotation.model_fields.get(str(part))
            if info is None:  # an unknown field
                return loc[:depth + 1]
            if not info.is_required():
                point = loc[:depth + 1]
            annotation = _annotation_parts(info.annotation)[0]
        elif get_origin(annotation) is dict and part != "[key]":
            point = loc[:depth + 1]
            annotation = _annotation_parts(get_args(annotation)[1])[0]
        elif get_origin(annotation) is list:
            annotation = _annotation_parts(get_args(annotation)[0])[0]
        else:
            break
    return point


def _remove(data: Any, loc: tuple[int | str, ...]) -> None:
    for part in loc[:-1]:
        try:
            data = data[part]
        except (KeyError, IndexError, TypeError):
            return
    if isinstance(data, dict):
        data.pop(loc[-1], None) if loc else None


def _value_at(raw: object, loc: tuple[int | str, ...]) -> object:
    for part in loc:
        if isinstance(raw, dict) and part in raw:
            raw = raw[part]
            continue
        if not isinstance(raw, list) or not isinstance(part, int) or part >= len(raw):
            return None
        raw = raw[part]
    return raw


_MAPPING_ERRORS: Final = frozenset({"model_type", "dict_type", "model_attributes_type",
                                    "dataclass_type"})
_INT_ERRORS: Final = frozenset({"int_type", "int_from_float", "int_parsing",
                                "greater_than_equal", "less_than_equal", "greater_than",
                                "less_than"})


def _issues(error: Any, lines: Mapping[str, int]) -> list[ConfigIssue]:
    """One pydantic error as the issue(s) an operator reads."""
    loc: tuple[int | str, ...] = tuple(error["loc"])
    kind: str = error["type"]
    value = error.get("input")
    if loc and loc[-1] == "[key]":
        loc = loc[:-1]
    path = ""
    for part in loc:
        path = _join(path, part)
    if kind == "asc":
        found = []
        for sub, message, hint in error["ctx"]["issues"]:
            here = path
            for part in sub:
                here = _join(here, part)
            found.append(ConfigIssue(here, message, hint, lines.get(here)))
        return found
    _, metadata, owner = _locate(tuple(error["loc"]))
    rule = Rule()
    for item in metadata:  # inner rules first; an outer one overrides what it sets
        if isinstance(item, Rule):
            rule = Rule(invalid=item.invalid or rule.invalid,
                        required=item.required or rule.required, hint=item.hint or rule.hint)
    message, hint = str(error["msg"]), ""
    if error["loc"] and error["loc"][-1] == "[key]":
        message = f"invalid name {value!r}"
        hint = "use letters, digits, '_', '.', '-'"
    elif kind == "missing":
        message, hint = rule.required or "is required", rule.hint
    elif kind == "extra_forbidden" and owner is not None:
        message, hint = "unknown field", f"known fields: {', '.join(owner.model_fields)}"
    elif kind == "too_short" and rule.required:
        message, hint = rule.required, rule.hint
    elif kind in ("string_type", "string_too_short"):
        message = f"must be a non-empty string, got {kind_of(value)}"
    elif kind in _MAPPING_ERRORS:
        message = f"must be a mapping, got {kind_of(value)}"
    elif rule.invalid:
        message, hint = rule.invalid.format(value=value, kind=kind_of(value)), rule.hint
    elif kind == "list_type":
        message = f"must be a list, got {kind_of(value)}"
    elif kind == "too_short":
        message = "must not be empty"
    elif kind in _INT_ERRORS:
        low = next((m.ge for m in metadata if isinstance(m, annotated_types.Ge)), None)
        high = next((m.le for m in metadata if isinstance(m, annotated_types.Le)), None)
        message = (f"must be an integer from {low} to {high}"
                   if low is not None and high is not None else "must be an integer")
    elif kind == "literal_error":
        message = f"unknown value {value!r}"
        hint = hint or f"one of: {error['ctx']['expected']}"
    return [ConfigIssue(path, message, hint, lines.get(path))]


# --- pass 3: cross-references, compiled into runtime objects ------------------------------

def _price(spec: PriceSpec) -> Price:
    return Price(input_micro_per_mtok=spec.input_per_mtok,
                 output_micro_per_mtok=spec.output_per_mtok or 0,
                 cached_input_micro_per_mtok=(spec.input_per_mtok
                                              if spec.cached_input_per_mtok is None
                                              else spec.cached_input_per_mtok),
                 cache_write_micro_per_mtok=spec.cache_write_per_mtok)


def _policy(spec: RouteSpec) -> RoutePolicy:
    return RoutePolicy(pin=spec.pin, pin_region=spec.pin_region,
                       fallbacks=tuple(spec.fallbacks or ()),
                       weights=dict(spec.weights or {}),
                       providers=frozenset(spec.providers) if spec.providers else None,
                       prefer=spec.prefer)


_T = typing.TypeVar("_T")


def _metrics_config(spec: MetricsSettings, tenants: Mapping[str, Tenant]) -> MetricsConfig:
    named = frozenset(list(tenants)[:spec.max_tenant_labels])
    return MetricsConfig(max_tenant_labels=spec.max_tenant_labels, labelled_tenants=named)


def _absent_or(value: _T) -> _T | None:
    """A required field of a spec that may be a partial entry (`_partial`): None there."""
    return value


class _Compiler:
    """Checks across sections and builds the runtime objects from a validated document.

    Existence checks use the names written in the file (`raw`), so a reference to an entry
    that pass 2 left out is not reported a second time as unknown.
    """

    def __init__(self, document: Document, raw: object, lines: Mapping[str, int],
                 source: str, base_dir: Path, partial: set[tuple[str, Any]]) -> None:
        self.doc = document
        self.raw = raw if isinstance(raw, dict) else {}
        self.lines = lines
        self.source = source
        self.base_dir = base_dir
        self.issues: list[ConfigIssue] = []
        self.partial = partial
        """Entries put back with only their valid fields: what they imply is not checked."""
        self.unknown_deployments: set[str] = set()
        """Models whose deployments had a problem: nothing can be said about them."""

    def add(self, path: str, message: str, hint: str = "") -> None:
        self.issues.append(ConfigIssue(path, message, hint, self.lines.get(path)))

    def names(self, section: str) -> list[str]:
        """Entry names of a top-level mapping as written in the file."""
        value = self.raw.get(section)
        return [str(name) for name in value] if isinstance(value, dict) else []

    def present(self, *loc: str) -> bool:
        return _value_at(self.raw, loc) is not None

    def compile(self) -> GatewayConfig | None:
        doc = self.doc
        credentials = {cred_id: self.credential(cred_id, spec)
                       for cred_id, spec in (doc.credentials or {}).items()}
        secrets = self.secrets(doc.secrets)
        if any(ref.keyring for cred_id, ref in credentials.items()
               if ("credentials", cred_id) not in self.partial):
            if not self.present("secrets", "kek"):
                self.add("secrets.kek", "keyring credentials need a KEK",
                         "e.g. {backend: file, path: kek.key} (extproc keys init-kek)")
            if not self.present("redis"):
                self.add("redis", "keyring credentials need Redis (key versions and their "
                         "state)", "set redis.url")
        providers = {name: self.provider(name, spec)
                     for name, spec in (doc.providers or {}).items()}
        self.check_clusters(providers)
        models = {name: self.model(name, spec) for name, spec in (doc.models or {}).items()}
        orgs = {org_id: self.rules(spec.budgets or ())
                for org_id, spec in (doc.orgs or {}).items()}
        tenants: dict[str, Tenant] = {}
        seen_hashes: dict[str, str] = {}
        for tenant_id, spec in (doc.tenants or {}).items():
            tenant = self.tenant(tenant_id, spec, models, providers, credentials, orgs,
                                 seen_hashes)
            tenants[tenant_id] = tenant
            if tenant.budget is not None and not self.present("redis"):
                self.add(_join("tenants", tenant_id), "budgets and rate limits need Redis",
                         "set redis.url")
        self.check_workloads(tenants)
        for index, name in enumerate(doc.fast_path.tenants if doc.fast_path else ()):
            if name not in tenants:
                self.add(f"fast_path.tenants[{index}]", f"unknown tenant {name!r}",
                         f"tenants: {', '.join(sorted(tenants))}")
        auth: AuthSpec | None = doc.auth  # (None in a document with its auth left out)
        if auth is None:
            return None
        return GatewayConfig(
            source=self.source,
            pepper=self.secret_ref("pepper", auth.pepper),
            limits=doc.limits or Limits(),
            redis=doc.redis,
            budgets=doc.budgets or BudgetSettings(),
            secrets=secrets,
            credentials=credentials,
            providers=providers,
            models=models,
            tenants=tenants,
            failover=doc.failover or FailoverSettings(),
            deployment_health=doc.deployment_health or DeploymentHealthSettings(),
            metrics=_metrics_config(doc.metrics or MetricsSettings(), tenants),
            tracing=doc.tracing,
            identity=self.identity(doc.identity),
            guardrail_profiles={
                name: self.guardrails(_join("guardrail_profiles", name), spec, models)
                for name, spec in (doc.guardrail_profiles or {}).items()},
            audit=self.audit(doc.audit),
            fast_path=doc.fast_path or FastPathSettings(),
            logging=doc.logging or LoggingSettings(),
        )

    def check_workloads(self, tenants: Mapping[str, Tenant]) -> None:
        """A SPIFFE id (or prefix) names one principal: two tenants claiming the same one
        would make the tenant depend on config order."""
        seen: dict[tuple[str, bool], str] = {}
        for tenant_id, tenant in tenants.items():
            for index, mesh in enumerate(tenant.mesh_identities):
                where = _join(_join(_join("tenants", tenant_id), "mesh_identities"), index)
                owner = seen.setdefault((mesh.spiffe, mesh.prefix), where)
                if owner != where:
                    self.add(_join(where, "spiffe"), f"same SPIFFE id already used by {owner}",
                             "every workload belongs to one tenant")

    def identity(self, spec: IdentitySpec | None) -> IdentitySettings:
        if spec is None:
            return IdentitySettings()
        jwt = None
        if spec.jwt is not None:
            jwt = JwtIdentity(issuer=spec.jwt.issuer, audiences=tuple(spec.jwt.audiences),
                              jwks_file=self.file(spec.jwt.jwks_file),
                              tenant_claim=spec.jwt.tenant_claim,
                              team_claim=spec.jwt.team_claim)
        return IdentitySettings(sources=tuple(spec.sources), jwt=jwt)

    def audit(self, spec: AuditSpec | None) -> AuditSettings:
        if spec is None:
            return AuditSettings()
        if "redis" in spec.sinks and not self.present("redis"):
            self.add("audit.sinks", "the redis sink needs Redis", "set redis.url")
        return AuditSettings(**{
            **_shared(spec, AuditSettings, "dir", "signing_key"),
            "dir": self.file(spec.dir) if spec.dir else None,
            "signing_key": self.file(spec.signing_key) if spec.signing_key else None})

    def file(self, name: str) -> Path:
        """A file reference: relative paths are relative to the config file."""
        path = Path(name)
        return path if path.is_absolute() else self.base_dir / path

    def secret_ref(self, ref_id: str, spec: SecretRefSpec) -> CredentialRef:
        return CredentialRef(ref_id, env=spec.env,
                             file=self.file(spec.file) if spec.file else None)

    def credential(self, cred_id: str, spec: CredentialSpec) -> CredentialRef:
        return CredentialRef(cred_id, env=spec.env,
                             file=self.file(spec.file) if spec.file else None,
                             keyring=bool(spec.keyring), weight=spec.weight)

    def secrets(self, spec: SecretsSpec | None) -> SecretsSettings:
        spec = spec or SecretsSpec()
        kek = None
        if spec.kek is not None:
            k = spec.kek
            kek = KekSettings(
                backend=k.backend, path=self.file(k.path) if k.path else None, url=k.url,
                mount=k.mount, key=k.key,
                token=self.secret_ref("token", k.token) if k.token else None,
                role_id=k.role_id,
                secret_id=self.secret_ref("secret_id", k.secret_id) if k.secret_id else None)
        store = RecordStoreSettings()
        if spec.store is not None and spec.store.backend == "vault_kv":
            s = spec.store
            store = RecordStoreSettings(
                backend=s.backend, url=s.url, mount=s.mount, prefix=s.prefix,
                token=self.secret_ref("token", s.token) if s.token else None)
        return SecretsSettings(kek=kek, store=store, cache_ttl_s=spec.cache_ttl_s,
                               max_age_s=spec.max_age_s, state_ttl_s=float(spec.state_ttl_s),
                               rollback_after=spec.rollback_after)

    def provider(self, name: str, spec: ProviderSpec) -> Provider:
        path = _join("providers", name)
        known = self.names("credentials")
        for index, cred_id in enumerate(spec.credentials):
            if cred_id not in known:
                self.add(_join(_join(path, "credentials"), index),
                         f"unknown credential {cred_id!r}",
                         f"define it under `credentials:` (known: {', '.join(known) or '-'})")
        parts = urlsplit(_absent_or(spec.base_url) or "")
        port = parts.port or (443 if parts.scheme == "https" else 80)
        return Provider(name=name, scheme=parts.scheme, host=parts.hostname or "", port=port,
                        path_prefix=parts.path.rstrip("/"),
                        forward_headers=tuple(dict.fromkeys(spec.forward_headers)),
                        **_shared(spec, Provider, "forward_headers"))

    def check_clusters(self, providers: Mapping[str, Provider]) -> None:
        upstream_of_cluster: dict[str, tuple[str, str, int, str]] = {}
        for provider in providers.values():
            if not _absent_or(provider.cluster) or not provider.host:
                continue  # a partial entry
            upstream = (provider.scheme, provider.host, provider.port, provider.path_prefix)
            if upstream_of_cluster.setdefault(provider.cluster, upstream) != upstream:
                self.add(_join(_join("providers", provider.name), "cluster"),
                         f"cluster {provider.cluster!r} is used by another provider with a "
                         "different base_url", "give each upstream its own Envoy cluster")

    def model(self, name: str, spec: ModelSpec) -> Model:
        path = _join("models", name)
        known = self.names("providers")
        deployments = []
        if _absent_or(spec.deployments) is None:
            self.unknown_deployments.add(name)
        for index, dep in enumerate(_absent_or(spec.deployments) or ()):
            if dep.provider not in known:
                self.add(_join(_join(_join(path, "deployments"), index), "provider"),
                         f"unknown provider {dep.provider!r}",
                         f"known providers: {', '.join(known) or '-'}")
            probe = None if dep.probe is None else Probe(
                path=dep.probe.path, interval_s=dep.probe.interval_s,
                timeout_ms=dep.probe.timeout_ms)
            deployments.append(Deployment(provider=dep.provider, model=dep.model or name,
                                          price=_price(dep.price) if dep.price else None,
                                          probe=probe))
        price = _absent_or(spec.price) or PriceSpec(input_per_mtok=0, output_per_mtok=0)
        return Model(
            name=name,
            price=_price(price),
            deployments=tuple(deployments),
            **_shared(spec, Model, "price", "deployments"))

    def rules(self, specs: typing.Iterable[OrgBudgetSpec | TenantBudgetSpec]
              ) -> tuple[BudgetRule, ...]:
        rules = []
        for spec in specs:
            scope = Scope(spec.scope) if isinstance(spec, TenantBudgetSpec) else Scope.ORG
            subject = (spec.key if scope is Scope.KEY else spec.model
                       if scope is Scope.MODEL else None) if isinstance(
                           spec, TenantBudgetSpec) else None
            rules.append(BudgetRule(scope=scope, window=Window(spec.window),
                                    limit_micro_usd=spec.limit_usd, subject=subject,
                                    period_s=spec.period_s))
        return tuple(rules)

    def tenant(self, tenant_id: str, spec: TenantSpec, models: Mapping[str, Model],
               providers: Mapping[str, Provider], credentials: Mapping[str, CredentialRef],
               orgs: Mapping[str, tuple[BudgetRule, ...]],
               seen_hashes: dict[str, str]) -> Tenant:
        path = _join("tenants", tenant_id)
        if spec.audit is not None and spec.audit.capture and not self.present("secrets", "kek"):
            self.add(_join(_join(path, "audit"), "capture"), "text capture needs a KEK",
                     "set secrets.kek (captured text is sealed with it)")
        keys = _absent_or(spec.keys) or []
        for index, key in enumerate(keys):
            key_path = _join(_join(path, "keys"), index)
            if key.hash in seen_hashes:
                self.add(_join(key_path, "hash"),
                         f"same key already used by {seen_hashes[key.hash]}",
                         "every virtual key must be unique")
            else:
                seen_hashes[key.hash] = key_path
        known_models = self.names("models")
        allowed: set[str] = set()
        for index, name in enumerate(_absent_or(spec.models) or ()):
            if name not in known_models:
                self.add(_join(_join(path, "models"), index), f"unknown model {name!r}",
                         f"known models: {', '.join(known_models) or '-'}")
            allowed.add(name)
        default_policy, policies = self.policies(path, spec, models, providers)
        if spec.zone:
            for name in sorted(allowed & set(models) - self.unknown_deployments):
                zones = [providers[d.provider].zone if d.provider in providers else None
                         for d in models[name].deployments]
                if spec.zone not in zones and None not in zones:
                    self.add(_join(path, "models"),
                             f"model {name!r} has no deployment in zone {spec.zone!r}",
                             "add a deployment in that zone or remove the model from the "
                             "tenant")
        if spec.org is not None and spec.org not in self.names("orgs"):
            self.add(_join(path, "org"), f"unknown org {spec.org!r}", "define it under orgs:")
        own = self.own_credentials(path, spec, credentials)
        rules = orgs.get(spec.org, ()) if spec.org else ()
        rules += self.rules(spec.budgets or ())
        rules += tuple(BudgetRule(scope=Scope.TEAM, window=Window(rule.window),
                                  limit_micro_usd=rule.limit_usd, subject=team_id,
                                  period_s=rule.period_s)
                       for team_id, team in (spec.teams or {}).items()
                       for rule in team.budgets or ())
        rate_limits = RateLimits(rpm=spec.rate_limits.rpm if spec.rate_limits else None,
                                 tpm=spec.rate_limits.tpm if spec.rate_limits else None)
        budget = None
        if rules or rate_limits != RateLimits():
            budget = TenantBudget(
                tenant=tenant_id, org=spec.org, rules=rules, rate_limits=rate_limits,
                fail_open=spec.on_redis_error == "fail_open",
                fail_open_ceiling_micro_usd=spec.fail_open_ceiling_usd or 0)
        teams = {team_id: Team(
                     id=team_id,
                     models=frozenset(team.models) if team.models is not None else None,
                     guardrails=(self.guardrails(_join(_join(_join(path, "teams"), team_id),
                                                       "guardrails"), team.guardrails, models)
                                 if team.guardrails is not None else None))
                 for team_id, team in (spec.teams or {}).items()}
        mesh = tuple(MeshIdentity(spiffe=m.spiffe, prefix=m.match == "prefix", team=m.team)
                     for m in spec.mesh_identities or ())
        return Tenant(id=tenant_id,
                      keys=tuple(TenantKey(id=k.id, hash=k.hash, team=k.team) for k in keys),
                      models=frozenset(allowed & set(models)), policies=policies,
                      default_policy=default_policy, budget=budget,
                      own_credentials=own, teams=teams, mesh_identities=mesh,
                      guardrails=(self.guardrails(_join(path, "guardrails"), spec.guardrails,
                                                  models) if spec.guardrails else None),
                      audit_capture=bool(spec.audit is not None and spec.audit.capture),
                      **_shared(spec, Tenant, "keys", "models", "teams", "mesh_identities",
                                "guardrails"))

    def guardrails(self, path: str, spec: GuardrailsSpec,
                   models: Mapping[str, Model]) -> GuardrailPolicy:
        """A guardrails section; its model lists must name models of `models:`."""
        for kind in ("allow", "deny"):
            names = getattr(spec.models, kind) if spec.models is not None else None
            for index, name in enumerate(names or ()):
                if name not in models:
                    self.add(_join(_join(_join(path, "models"), kind), index),
                             f"unknown model {name!r}",
                             f"known models: {', '.join(models) or '-'}")
        return policy_from_spec(spec)

    def policies(self, path: str, spec: TenantSpec, models: Mapping[str, Model],
                 providers: Mapping[str, Provider]
                 ) -> tuple[RoutePolicy, dict[str, RoutePolicy]]:
        """The tenant's routing policy and its per-model policies (model fields over the
        tenant's). Names must be providers (of the model, for a model's rule); a pin,
        fallback or weight outside the tenant's zone is refused: residency is a hard rule."""
        base = spec.route_policy or RouteSpec()
        if spec.route_policy is not None:
            self.check_policy(_join(path, "route_policy"), base, spec.zone, providers,
                              list(providers), None)
        default = _policy(base)
        policies: dict[str, RoutePolicy] = {}
        for name, route in (spec.routing or {}).items():
            rule_path = _join(_join(path, "routing"), name)
            if name not in self.names("models"):
                self.add(rule_path, f"unknown model {name!r}")
                continue
            if name not in models or name in self.unknown_deployments:
                continue
            merged = base.model_copy(update={f: getattr(route, f)
                                             for f in route.model_fields_set})
            self.check_policy(rule_path, route, spec.zone, providers,
                              [d.provider for d in models[name].deployments], name)
            policies[name] = _policy(merged)
        return default, policies

    def check_policy(self, path: str, rule: RouteSpec, zone: str | None,
                     providers: Mapping[str, Provider], deployed: list[str],
                     model: str | None) -> None:
        named: list[tuple[str, str]] = []
        if rule.pin is not None:
            named.append((_join(path, "pin"), rule.pin))
        named += [(_join(_join(path, "fallbacks"), i), p)
                  for i, p in enumerate(rule.fallbacks or ())]
        named += [(_join(_join(path, "weights"), p), p) for p in (rule.weights or {})]
        for where, name in named:
            if name not in deployed:
                if model is None:
                    self.add(where, f"unknown provider {name!r}",
                             f"known providers: {', '.join(deployed) or '-'}")
                else:
                    self.add(where, f"{name!r} is not a deployment of {model}",
                             f"deployments: {', '.join(deployed)}")
            elif name not in providers:
                pass  # reported at the deployment that names it, or left out in pass 2
            elif zone and providers[name].zone != zone:
                self.add(where, f"{name!r} is outside the tenant's zone {zone!r}",
                         "residency is a hard rule; pin a provider in the tenant's zone")
        for index, name in enumerate(rule.providers or ()):
            if name not in self.names("providers"):
                self.add(_join(_join(path, "providers"), index), f"unknown provider {name!r}")
        if rule.pin_region is not None:
            regions = {p.region for n, p in providers.items() if n in deployed
                       and (not zone or p.zone == zone)}
            if rule.pin_region not in regions:
                self.add(_join(path, "pin_region"),
                         f"no deployment in region {rule.pin_region!r}"
                         + (f" in the tenant's zone {zone!r}" if zone else ""),
                         f"regions: {', '.join(sorted(regions)) or '-'}")

    def own_credentials(self, path: str, spec: TenantSpec,
                        credentials: Mapping[str, CredentialRef]) -> dict[str, tuple[str, ...]]:
        """BYOK: `credentials: {<provider>: [<keyring credential>, ...]}` on a tenant."""
        own: dict[str, tuple[str, ...]] = {}
        base = _join(path, "credentials")
        for provider, ids in (spec.credentials or {}).items():
            here = _join(base, provider)
            if provider not in self.names("providers"):
                self.add(here, f"unknown provider {provider!r}")
                continue
            for index, cred_id in enumerate(ids):
                ref = credentials.get(cred_id)
                if cred_id not in self.names("credentials"):
                    self.add(_join(here, index), f"unknown credential {cred_id!r}")
                elif ref is not None and not ref.keyring:
                    self.add(_join(here, index), f"credential {cred_id!r} is not a keyring "
                             "credential", "a tenant's own key must be sealed for its scope: "
                             "{keyring: true} and `extproc keys add --scope tenant:<id>`")
            own[provider] = tuple(ids)
        return own

