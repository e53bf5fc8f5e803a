"""Provider credentials: where the key injected on the provider hop comes from."""

from extproc.credentials.static import KeyProvider, ResolvedCredential, StaticKeyProvider

__all__ = ["KeyProvider", "ResolvedCredential", "StaticKeyProvider"]
