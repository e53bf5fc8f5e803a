"""Where the gRPC service listens: `host:port`, or `unix:/path` for a co-located Envoy.

A sidecar Envoy reaches the service over a Unix socket on a volume both containers
mount: no TCP port to expose or firewall, and file permissions decide who may connect.
The socket is created with mode 0660 (owner and group: put Envoy's user in the
service's group, e.g. a pod's `fsGroup`), never wider, because whoever can connect can
ask for provider keys to be put on requests.

Unix sockets have no SO_REUSEPORT: a second `bind()` on a path fails, and gRPC's own
listener silently unlinks whatever socket is at the path first - it would steal the
address of a live sibling. So `--workers N` gives each worker its own socket
(`worker_socket_paths`) and Envoy spreads streams across them (decision 0091).
A socket file left by a process that died is removed at start; a socket somebody still
answers on, or a path that is not a socket, is never removed: start fails instead.
"""

from __future__ import annotations

import contextlib
import os
import socket
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Final, Protocol

__all__ = [
    "SOCKET_MODE",
    "UNIX_PREFIX",
    "ListenError",
    "bind_listen",
    "creating_socket",
    "remove_stale_socket",
    "unix_path",
    "worker_listen",
    "worker_socket_paths",
]

UNIX_PREFIX: Final = "unix:"
SOCKET_MODE: Final = 0o660
_MAX_SOCKET_PATH: Final = 107
"""sun_path holds 108 bytes with the terminating NUL (Linux)."""


class ListenError(RuntimeError):
    """The listen address cannot be used; the message says why and names no secret."""


class _Server(Protocol):
    def add_insecure_port(self, address: str) -> int: ...


def unix_path(listen: str) -> str | None:
    """The socket path of a `unix:/path` address, None for `host:port`."""
    if not listen.startswith(UNIX_PREFIX):
        return None
    path = listen.removeprefix(UNIX_PREFIX)
    if not path.startswith("/"):
        raise ListenError(f"{listen!r}: a Unix socket address needs an absolute path "
                          "(unix:/run/asc/extproc.sock)")
    return path


def worker_socket_paths(path: str, workers: int) -> list[str]:
    """The socket of each of `workers` workers: `path` itself for one worker, else
    `extproc-0.sock`, `extproc-1.sock`, ... beside it (Envoy lists them all)."""
    if workers <= 1:
        return [path]
    base = Path(path)
    return [str(base.with_name(f"{base.stem}-{index}{base.suffix}")) for index in range(workers)]


def worker_listen(listen: str, index: int, workers: int) -> str:
    """The address worker `index` of `workers` binds: the shared `host:port` (the kernel
    spreads connections with SO_REUSEPORT), or its own Unix socket."""
    path = unix_path(listen)
    if path is None:
        return listen
    return UNIX_PREFIX + worker_socket_paths(path, workers)[index]


def remove_stale_socket(path: str) -> None:
    """Make `path` free for a new socket: remove a socket nobody answers on any more.

    Raises ListenError for a socket that still accepts connections (another live
    service: gRPC would unlink it and steal the address) and for anything that is not a
    socket (never delete an operator's file because of a typo in --listen).
    """
    if len(os.fsencode(path)) > _MAX_SOCKET_PATH:
        raise ListenError(f"Unix socket path {path!r} is longer than {_MAX_SOCKET_PATH} bytes")
    if not Path(path).parent.is_dir():
        raise ListenError(f"directory of Unix socket {path!r} does not exist")
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise ListenError(f"{path!r} exists and is not a socket; refusing to replace it")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(1.0)
        try:
            probe.connect(path)
        except (ConnectionRefusedError, FileNotFoundError):
            pass  # nobody listens: left behind by a process that died
        except OSError as exc:
            raise ListenError(f"cannot check Unix socket {path!r}: {exc.strerror}") from None
        else:
            raise ListenError(f"another process is serving on {path!r}")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


@contextlib.contextmanager
def creating_socket(path: str) -> Iterator[None]:
    """Around the bind of a Unix socket at `path`: a stale socket there is removed first,
    and the new one has mode 0660 from its creation on (umask), not after a window in
    which any local user could connect; the mode is set again once it exists."""
    remove_stale_socket(path)
    previous = os.umask(0o777 & ~SOCKET_MODE)
    try:
        yield
    finally:
        os.umask(previous)
    if Path(path).exists():
        os.chmod(path, SOCKET_MODE)


def bind_listen(server: _Server, listen: str) -> None:
    """Add `listen` to the gRPC server (a Unix socket: see `creating_socket`)."""
    path = unix_path(listen)
    if path is None:
        if server.add_insecure_port(listen) == 0:
            raise ListenError(f"cannot listen on {listen!r}")
        return
    with creating_socket(path):
        bound = server.add_insecure_port(listen)
    if bound == 0 or not Path(path).exists():
        raise ListenError(f"cannot listen on {listen!r}")
