"""Provider credentials: where the key injected on the provider hop comes from."""

from extproc.credentials.static import ResolvedCredential, StaticKeyProvider

__all__ = ["ResolvedCredential", "StaticKeyProvider"]
