"""A container for secret strings that refuses to show them.

Provider keys, tenant keys and peppers travel as `Secret`; only the code that puts a key
on the wire calls `reveal()`. `repr`, `str` and f-strings print `Secret(***)`, so a secret
that slips into a log line, exception or test assertion message stays hidden.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from extproc.config import CredentialRef

__all__ = ["Secret", "SecretUnavailable", "resolve_secret"]


class Secret:
    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def fingerprint(self) -> str:
        """A short, non-reversible identifier, safe for `keys list` and audit."""
        return "sha256:" + hashlib.sha256(self._value.encode()).hexdigest()[:12]

    def __repr__(self) -> str:
        return "Secret(***)"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]

    def __reduce__(self) -> tuple[object, ...]:
        raise TypeError("Secret cannot be pickled")


class SecretUnavailable(Exception):
    """A secret reference cannot be resolved; the message names the ref, never a value."""


def resolve_secret(ref: CredentialRef, environ: dict[str, str] | None = None) -> Secret:
    """Read the secret `ref` points at (environment variable or file, a trailing newline
    cut from either)."""
    env = os.environ if environ is None else environ
    if ref.env is not None:
        # Cut like a file's: a Kubernetes Secret made `--from-file` carries the file's
        # newline, which would silently change every key hash made with the pepper.
        value = env.get(ref.env, "").rstrip("\r\n")
        if not value:
            raise SecretUnavailable(f"secret {ref.id!r}: environment variable {ref.env} is not set")
        return Secret(value)
    if ref.file is not None:
        try:
            value = Path(ref.file).read_text(encoding="utf-8").rstrip("\r\n")
        except OSError as exc:
            raise SecretUnavailable(
                f"secret {ref.id!r}: cannot read {ref.file}: {exc.strerror}"
            ) from None
        if not value:
            raise SecretUnavailable(f"secret {ref.id!r}: file {ref.file} is empty")
        return Secret(value)
    raise SecretUnavailable(f"secret {ref.id!r}: no source configured")
