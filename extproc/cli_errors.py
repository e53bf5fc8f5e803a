"""One shape for every `extproc` command-line error: a single `error: ... (hint: ...)` line
on standard error and exit code 2.

Operators script these commands, so a failure must be one line a script can grep and a
person can act on; a Python traceback or a multi-line dump is neither. `describe` turns the
exceptions the commands can meet into that line; all of their messages are already safe
to show (they name operations, paths and HTTP statuses, never a secret).
"""

from __future__ import annotations

import sys
from typing import Final

from extproc.config import ConfigError
from extproc.credentials.envelope import EnvelopeError
from extproc.credentials.kek import KekError
from extproc.credentials.keyring import StoreUnavailable
from extproc.credentials.rotation import RotationError
from extproc.secrets import SecretUnavailable

__all__ = ["EXIT_ERROR", "CliError", "describe", "report"]

EXIT_ERROR: Final = 2

_POLICY_HINTS: Final = {
    "add": "sealing needs a key-operator token (policy deploy/vault/key-operator.hcl): "
           "--token-env VAR naming the variable that holds it",
    "rotate": "sealing needs a key-operator token (policy deploy/vault/key-operator.hcl): "
              "--token-env VAR naming the variable that holds it",
    "rewrap": "rewrap needs a kek-admin token (policy deploy/vault/kek-admin.hcl) for records "
              "in Redis, a key-operator token (deploy/vault/key-operator.hcl) for records in "
              "Vault KV: --token-env VAR",
    "list": "listing KV records needs a key-operator or gateway token "
            "(deploy/vault/key-operator.hcl or gateway.hcl): --token-env VAR",
}


class CliError(Exception):
    """A command cannot do what was asked; `hint` says what to do instead."""

    def __init__(self, message: str, hint: str) -> None:
        super().__init__(message)
        self.hint = hint


def _config_error(exc: ConfigError) -> CliError:
    first = exc.issues[0] if exc.issues else None
    if first is not None and not first.path and first.message.startswith("cannot read"):
        return CliError(f"config {exc.source}: {first.message}", "check the --config path")
    where = f"{first.path or '<document>'}: {first.message}" if first else "invalid"
    more = f" and {len(exc.issues) - 1} more" if len(exc.issues) > 1 else ""
    return CliError(f"config {exc.source} is invalid ({where}{more})",
                    f"`extproc check-config {exc.source}` lists every problem with its line")


def _denied(message: str, status: int | None) -> bool:
    return status == 403 or "HTTP 403" in message


def describe(exc: BaseException, command: str = "") -> CliError | None:
    """The one-line form of an error a command met, or None for an exception that is no
    operator error (a bug: its traceback is worth more). `command` (`add`, `rewrap`,
    ...) picks the hint for a refused Vault/OpenBao call."""
    if isinstance(exc, CliError):
        return exc
    if isinstance(exc, ConfigError):
        return _config_error(exc)
    message = " ".join(str(exc).split()) or type(exc).__name__
    if isinstance(exc, KekError):
        if _denied(message, exc.status):
            return CliError(message, _POLICY_HINTS.get(command, "use a token whose policy "
                                                       "allows this (deploy/vault/*.hcl)"))
        if exc.operation == "file KEK init" and "already exists" in message:
            return CliError(message, "the existing KEK seals every key in the keyring: keep "
                                     "it; to start over, move it away and `keys add` again")
        if exc.transient:
            return CliError(message, "is Vault/OpenBao reachable at secrets.kek.url?")
        return CliError(message, "see docs/credentials.md")
    if isinstance(exc, StoreUnavailable):
        if _denied(message, None):
            return CliError(message, _POLICY_HINTS.get(command, "use a token whose policy "
                                                       "allows this (deploy/vault/*.hcl)"))
        return CliError(message, "is Redis (redis.url) or the record store reachable?")
    if isinstance(exc, SecretUnavailable):
        return CliError(message, "set the variable or create the file the config names")
    if isinstance(exc, RotationError):
        return CliError(message, "`extproc keys list --config FILE` shows each version's state")
    if isinstance(exc, EnvelopeError):
        return CliError(message, "the record is damaged or sealed elsewhere; see "
                                 "docs/credentials.md#envelope-encryption")
    if isinstance(exc, OSError):
        name = f" {exc.filename}" if exc.filename else ""
        return CliError(f"cannot read{name}: {exc.strerror or type(exc).__name__}",
                        "check the path and its permissions")
    return None


def report(error: CliError) -> int:
    """Print `error` as its one line on standard error; the exit code to use."""
    print(f"error: {error} (hint: {error.hint})", file=sys.stderr)
    return EXIT_ERROR
