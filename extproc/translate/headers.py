"""Which client request headers reach a provider, and which provider response headers
reach the client.

Request: only an allow-list per provider kind (`FORWARDED_REQUEST_HEADERS`), plus what a
provider's config adds (`providers.<name>.forward_headers`). Everything else a client
sends is removed: test hooks (`x-emulator-*`), an upstream gateway's headers, beta
switches (`anthropic-beta`) that enable features the gateway cannot price, client
fingerprints (`user-agent`, `x-stainless-*`) and the client's address
(`x-forwarded-for`). The gateway's own upstream headers (auth, `anthropic-version`,
`content-length`) are set by the translator and `phases.py`. Pseudo-headers, `host`,
`transfer-encoding`, `x-forwarded-proto` and `x-request-id` (both set by Envoy at the
edge) are Envoy's to manage and never touched. Client-sent `x-envoy-*` headers are
removed too (the ext_proc filter has `mutation_rules.allow_envoy: true` for that); the
router adds its own (`x-envoy-attempt-count`, ...) after the gateway's decision.

Response: the provider account's identity and limits stay with the gateway: `openai-
organization`, `openai-project`, `anthropic-organization-id`, and every
`x-ratelimit-*` / `anthropic-ratelimit-*` header (they describe the shared account, not
the client's budget; the gateway sets its own `x-ratelimit-*` for budget tenants).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Final

from extproc.translate.types import Backend

__all__ = [
    "ACCOUNT_HEADERS",
    "ACCOUNT_PREFIXES",
    "FORWARDED_REQUEST_HEADERS",
    "provider_account_headers",
    "unforwarded_request_headers",
]

_COMMON: Final = frozenset({"accept", "content-type"})
FORWARDED_REQUEST_HEADERS: Final[Mapping[Backend, frozenset[str]]] = {
    Backend.OPENAI: _COMMON,
    Backend.OPENAI_COMPATIBLE: _COMMON,
    Backend.MISTRAL: _COMMON,
    Backend.AZURE: _COMMON,
    Backend.ANTHROPIC: _COMMON,
    Backend.GEMINI: _COMMON,
}
"""Client headers every provider of a kind receives (lower case)."""
_ENVOY_OWNED: Final = frozenset({
    "host", "content-length", "transfer-encoding",
    # Envoy sets both at the edge (use_remote_address). Without x-forwarded-proto the
    # router finds no route after the route cache is cleared (404 NR, measured):
    # docs/decisions/0040-request-header-allow-list.md.
    "x-forwarded-proto", "x-request-id",
})
ACCOUNT_HEADERS: Final = frozenset({
    "openai-organization", "openai-project", "anthropic-organization-id"})
"""Provider response headers that describe its account, with the `ACCOUNT_PREFIXES`
families: never the client's (ext_proc removes them on the full path, Envoy's
`asc.fast_answer_headers` filter on the fast one)."""
ACCOUNT_PREFIXES: Final = ("x-ratelimit-", "anthropic-ratelimit-")


def unforwarded_request_headers(names: Iterable[str], backend: Backend,
                                extra: Iterable[str] = ()) -> list[str]:
    """The client request headers (lower-case `names`) to remove before the provider."""
    allowed = FORWARDED_REQUEST_HEADERS[backend].union(extra)
    return [name for name in names
            if name not in allowed and name not in _ENVOY_OWNED
            and not name.startswith(":")]


def provider_account_headers(names: Iterable[str]) -> list[str]:
    """The provider response headers (lower-case `names`) that describe its account."""
    return [name for name in names
            if name in ACCOUNT_HEADERS or name.startswith(ACCOUNT_PREFIXES)]
