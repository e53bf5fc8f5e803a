"""`extproc keys ...`: the operator side of the envelope-encrypted keyring.

Separation of duties: `init-kek` is a KEK operation; `add` and `rotate` are provider-key
operations; `rewrap` follows a KEK rotation and needs whichever token may both rewrap with
Transit and read/write the records (kek-admin for Redis records, key-operator for KV).
With Vault/OpenBao Transit each runs with the operator's own token (`--token-env`), so a
KEK admin (policy deploy/vault/kek-admin.hcl) cannot
seal or read provider keys, and a key operator (key-operator.hcl) cannot rotate or
reconfigure the KEK. Secrets are read from standard input or a file, never argv, and
nothing here ever prints one: `list` shows ids, versions, states and fingerprints.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import sys
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from extproc.budgets.ledger import redis_client
from extproc.cli_errors import CliError
from extproc.config import GatewayConfig, load_config
from extproc.credentials.envelope import SealedSecret, rewrap_sealed
from extproc.credentials.kek import TransitKek, init_kek_file
from extproc.credentials.keyring import Keyring, KeyStore
from extproc.credentials.rotation import (
    KeyState,
    canary,
    promote,
    revoke,
    rollback,
)
from extproc.runtime import kek_from_settings, records_from_settings
from extproc.secrets import Secret

__all__ = ["add_keys_commands", "kek_version"]

# A Transit-wrapped DEK is Transit's ciphertext, `vault:v<N>:<base64>` (OpenBao too).
_TRANSIT_WRAPPED = re.compile(rb"^[a-z]+:v([0-9]{1,9}):")


def _config(args: argparse.Namespace) -> GatewayConfig:
    config = load_config(args.config)
    token_env = getattr(args, "token_env", None)
    if token_env and config.secrets.kek is not None and config.secrets.kek.backend == "transit":
        # The operator's own token, not the gateway's.
        from extproc.config import CredentialRef

        kek = replace(config.secrets.kek, token=CredentialRef("token", env=token_env),
                      role_id=None, secret_id=None)
        config = replace(config, secrets=replace(config.secrets, kek=kek))
    if token_env and config.secrets.store.backend == "vault_kv":
        # Records in KV are written with the operator's token too (key-operator policy).
        from extproc.config import CredentialRef

        store = replace(config.secrets.store, token=CredentialRef("token", env=token_env))
        config = replace(config, secrets=replace(config.secrets, store=store))
    return config


def _keyring_credentials(config: GatewayConfig) -> list[tuple[str, str, str]]:
    """(scope, credential, provider) for every keyring credential the config uses."""
    found: list[tuple[str, str, str]] = []
    for provider in config.providers.values():
        for cred in provider.credentials:
            if config.credentials[cred].keyring and ("global", cred) not in [
                    (s, c) for s, c, _ in found]:
                found.append(("global", cred, provider.name))
    for tenant in config.tenants.values():
        for provider_name, creds in tenant.own_credentials.items():
            for cred in creds:
                found.append((f"tenant:{tenant.id}", cred, provider_name))
    return found


def _provider_of(config: GatewayConfig, scope: str, credential: str) -> str:
    for s, c, provider in _keyring_credentials(config):
        if (s, c) == (scope, credential):
            return provider
    raise CliError(f"{credential!r} is not a keyring credential used in scope {scope!r} "
                   "by this config",
                   "`extproc keys list --config FILE` shows the keyring credentials and scopes")


def _open_store(config: GatewayConfig) -> KeyStore:
    """State in Redis, sealed records where `secrets.store` says (as the gateway does)."""
    if config.redis is None:
        raise CliError("the config has no redis section",
                       "the keyring keeps its state in Redis: add redis: {url: ...}")
    client = redis_client(config.redis)
    return KeyStore(client, records_from_settings(config.secrets.store, client))


async def _open_keyring(config: GatewayConfig) -> tuple[Keyring, object]:
    if config.redis is None or config.secrets.kek is None:
        raise CliError("the config needs redis and secrets.kek for keyring operations",
                       "see docs/credentials.md#initial-setup-with-a-file-kek-development-"
                       "single-host")
    store = _open_store(config)
    return Keyring(store, kek_from_settings(config.secrets.kek)), store


def _read_secret(args: argparse.Namespace) -> Secret:
    if args.from_file:
        text = Path(args.from_file).read_text(encoding="utf-8")
    else:
        if sys.stdin.isatty():
            print("paste the provider key, then press Enter:", file=sys.stderr)
        text = sys.stdin.readline()
    value = text.strip()
    if not value:
        raise CliError("no key given", "pipe it on standard input or use --from-file PATH")
    return Secret(value)


def _cmd_init_kek(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    kek = config.secrets.kek
    if kek is None:
        raise CliError("the config has no secrets.kek",
                       "add secrets: {kek: {backend: file, path: kek.key}}; see "
                       "docs/credentials.md")
    if kek.backend != "file" or kek.path is None:
        raise CliError("secrets.kek is not a file KEK",
                       "with Transit the KEK lives in Vault/OpenBao: "
                       "bao write -f transit/keys/asc-kek derived=true")
    target = Path(os.path.normpath(kek.path))  # `dir/../../var/x` reads as `var/x`
    # A fresh clone has no var/ yet (the demo keeps its KEK there): make the directory.
    target.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    path = init_kek_file(target)
    print(f"created KEK file {path} (mode 0600)")
    return 0


async def _add(args: argparse.Namespace) -> int:
    config = _config(args)
    provider = _provider_of(config, args.scope, args.credential)
    secret = _read_secret(args)
    keyring, client = await _open_keyring(config)
    try:
        await _refuse_revoked_material(keyring.store, args.scope, args.credential, secret)
        if isinstance(keyring.kek, TransitKek):
            # A Transit key created without derived=true ignores the context: refuse it.
            await keyring.kek.verify_context_binding()
        version = await keyring.add(args.scope, args.credential, provider, secret)
        state = await keyring.store.state(args.scope, args.credential)
    finally:
        await _close(keyring, client)
    print(f"{args.scope}/{args.credential}@{version}: {state.state_of(version)}, "
          f"fingerprint {secret.fingerprint()}")
    return 0


async def _refuse_revoked_material(store: KeyStore, scope: str, credential: str,
                                   secret: Secret) -> None:
    """A key revoked at the gateway is usually being revoked at the provider too: sealing
    the same material again would quietly bring it back. Compared by fingerprint only."""
    fingerprint = secret.fingerprint()
    state = await store.state(scope, credential)
    for record in await store.records(scope, credential):
        if record.fingerprint == fingerprint and record.version in state.revoked:
            raise CliError(f"this key is {scope}/{credential}@{record.version}, which is "
                           "revoked; refusing to seal it again",
                           "a revoked key stays revoked: get a new key from the provider")


def kek_version(record: SealedSecret) -> str:
    """The KEK version that wrapped `record`'s DEK: `vN` for Transit (what
    `min_decryption_version` is compared with), `-` for a file KEK (it has none)."""
    match = _TRANSIT_WRAPPED.match(record.wrapped_dek)
    return f"v{int(match.group(1))}" if match else "-"


async def _list(args: argparse.Namespace) -> int:
    config = _config(args)
    lines = [f"{'credential':<40} {'version':>7}  {'state':<24} {'fingerprint':<20} "
             f"{'kek':<40} kek-version"]
    for cred_id, ref in config.credentials.items():
        if not ref.keyring:
            source = f"env {ref.env}" if ref.env else f"file {ref.file}"
            lines.append(f"{cred_id:<40} {'-':>7}  {'static (' + source + ')':<24}")
    if config.redis is not None:
        lines += await _keyring_rows(config)
    print("\n".join(lines))  # all or nothing: an unreachable store prints no half table
    return 0


async def _keyring_rows(config: GatewayConfig) -> list[str]:
    store = _open_store(config)
    lines = []
    try:
        for scope, credential, _ in _keyring_credentials(config):
            name = f"{scope}/{credential}"
            state = await store.state(scope, credential)
            records = await store.records(scope, credential)
            if not records:  # configured but never added: the gateway answers 503 for it
                lines.append(f"{name:<40} {'-':>7}  {'no versions (keys add)':<24}")
            for record in records:
                lines.append(f"{name:<40} {record.version:>7}  "
                             f"{state.state_of(record.version):<24} {record.fingerprint:<20} "
                             f"{record.kek_id:<40} {kek_version(record)}")
    finally:
        await store.close()
    return lines


async def _rotate(args: argparse.Namespace) -> int:
    if args.action == "stage":  # staging a version is sealing a new one
        return await _add(args)
    if args.action in ("canary", "revoke"):
        _version(args)  # before any connection: a usage error needs no Redis
    config = _config(args)
    _provider_of(config, args.scope, args.credential)
    store = _open_store(config)
    changes: dict[str, Callable[[KeyState], KeyState]] = {
        "canary": lambda s: canary(s, _version(args), args.percent),
        "promote": promote,
        "rollback": rollback,
        "revoke": lambda s: revoke(s, _version(args)),
    }
    try:
        state = await store.transition(args.scope, args.credential, changes[args.action])
    finally:
        await store.close()
    summary = ", ".join(f"v{v}={state.state_of(v)}" for v in sorted(_versions(state)))
    print(f"{args.scope}/{args.credential}: {args.action} done ({summary})")
    return 0


def _version(args: argparse.Namespace) -> int:
    if args.version is None:
        raise CliError(f"{args.action} needs --version",
                       "`extproc keys list --config FILE` shows the versions")
    version: int = args.version
    return version


def _versions(state: KeyState) -> set[int]:
    named = {state.active, state.canary, state.previous}
    return {v for v in named if v is not None} | set(state.staged) | set(
        state.retiring) | set(state.revoked) | set(state.failed)


async def _rewrap(args: argparse.Namespace) -> int:
    config = _config(args)
    keyring, client = await _open_keyring(config)
    count = 0
    for scope, credential, _ in _keyring_credentials(config):
        for record in await keyring.store.records(scope, credential):
            await keyring.store.put_record(await rewrap_sealed(keyring.kek, record))
            count += 1
    print(f"rewrapped {count} record(s) under the newest KEK version")
    await _close(keyring, client)
    return 0


async def _close(keyring: Keyring, client: object) -> None:
    """The store's connections, and a Transit KEK's HTTP session and worker threads."""
    await client.aclose()  # type: ignore[attr-defined]
    if isinstance(keyring.kek, TransitKek):
        await keyring.kek.close()


def _run(coroutine_factory: Callable[[argparse.Namespace], object]) -> Callable[
        [argparse.Namespace], int]:
    """A command's coroutine run to its exit code; errors go up to `cli.main`, which
    prints each as one `error: ... (hint: ...)` line."""
    def run(args: argparse.Namespace) -> int:
        code: int = asyncio.run(coroutine_factory(args))  # type: ignore[arg-type]
        return code
    return run


def add_keys_commands(key_commands: argparse._SubParsersAction[argparse.ArgumentParser]
                      ) -> None:
    def common(parser: argparse.ArgumentParser, *, credential: bool = True) -> None:
        parser.add_argument("--config", required=True)
        parser.add_argument("--token-env", default=os.environ.get("ASC_OPERATOR_TOKEN_ENV"),
                            help="environment variable holding *your* Vault/OpenBao token "
                                 "(Transit KEK and KV record store; default: the config's)")
        if credential:
            parser.add_argument("credential", help="credential id from the config")
            parser.add_argument("--scope", default="global",
                                help="'global' or 'tenant:<id>' for a tenant's own key")

    init = key_commands.add_parser("init-kek", help="create the file KEK (mode 0600)")
    init.add_argument("--config", required=True)
    init.set_defaults(func=_cmd_init_kek)

    add = key_commands.add_parser("add", help="seal a new provider key version (staged; the "
                                              "first version becomes active)")
    common(add)
    add.add_argument("--from-file", help="read the key from this file instead of stdin")
    add.set_defaults(func=_run(_add))

    listing = key_commands.add_parser("list", help="ids, versions, states, fingerprints")
    common(listing, credential=False)
    listing.set_defaults(func=_run(_list))

    rotate = key_commands.add_parser("rotate", help="move a key version through its lifecycle")
    rotate.add_argument("action", choices=("stage", "canary", "promote", "rollback", "revoke"))
    common(rotate)
    rotate.add_argument("--from-file", help="stage: read the new key from this file, not stdin")
    rotate.add_argument("--version", type=int)
    rotate.add_argument("--percent", type=int, default=10)
    rotate.set_defaults(func=_run(_rotate))

    rewrap = key_commands.add_parser("rewrap", help="rewrap every sealed key under the "
                                                    "newest KEK version (after a KEK rotation)")
    common(rewrap, credential=False)
    rewrap.set_defaults(func=_run(_rewrap))
