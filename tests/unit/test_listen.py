"""Listen addresses (`extproc serve --listen host:port | unix:/path`): worker sockets, the
stale-socket rule and the socket's mode, with a real grpc.aio server on a real socket."""

from __future__ import annotations

import asyncio
import os
import socket
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from extproc.listen import (
    SOCKET_MODE,
    ListenError,
    bind_listen,
    remove_stale_socket,
    unix_path,
    worker_listen,
    worker_socket_paths,
)


@pytest.fixture
def socket_dir() -> Iterator[Path]:
    """A short private directory: a socket path must fit in 107 bytes."""
    with tempfile.TemporaryDirectory(prefix="asc-") as directory:
        yield Path(directory)


def test_unix_path() -> None:
    assert unix_path("unix:/run/asc/extproc.sock") == "/run/asc/extproc.sock"
    assert unix_path("127.0.0.1:50051") is None
    assert unix_path("[::1]:50051") is None
    with pytest.raises(ListenError, match="needs an absolute path"):
        unix_path("unix:extproc.sock")


def test_one_socket_per_worker() -> None:
    assert worker_socket_paths("/run/asc/extproc.sock", 1) == ["/run/asc/extproc.sock"]
    assert worker_socket_paths("/run/asc/extproc.sock", 3) == [
        "/run/asc/extproc-0.sock", "/run/asc/extproc-1.sock", "/run/asc/extproc-2.sock"]
    assert worker_listen("unix:/run/asc/extproc.sock", 1, 2) == "unix:/run/asc/extproc-1.sock"
    assert worker_listen("unix:/run/asc/extproc.sock", 0, 1) == "unix:/run/asc/extproc.sock"
    # TCP workers share the port (SO_REUSEPORT).
    assert worker_listen("127.0.0.1:50051", 1, 2) == "127.0.0.1:50051"


def test_a_missing_path_is_free(socket_dir: Path) -> None:
    remove_stale_socket(str(socket_dir / "extproc.sock"))
    assert list(socket_dir.iterdir()) == []


def test_a_stale_socket_is_removed(socket_dir: Path) -> None:
    path = socket_dir / "extproc.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as dead:
        dead.bind(str(path))  # bound, never listening: what a killed process leaves
    assert stat.S_ISSOCK(path.lstat().st_mode)
    remove_stale_socket(str(path))
    assert not path.exists()


def test_a_live_socket_is_not_taken_over(socket_dir: Path) -> None:
    path = socket_dir / "extproc.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as live:
        live.bind(str(path))
        live.listen(1)
        with pytest.raises(ListenError, match="another process is serving on"):
            remove_stale_socket(str(path))
    assert stat.S_ISSOCK(path.lstat().st_mode)


def test_a_file_that_is_not_a_socket_is_never_removed(socket_dir: Path) -> None:
    path = socket_dir / "asc.yaml"
    path.write_text("version: 1\n", encoding="utf-8")
    with pytest.raises(ListenError, match="exists and is not a socket; refusing to replace it"):
        remove_stale_socket(str(path))
    assert path.read_text(encoding="utf-8") == "version: 1\n"


def test_a_missing_directory_or_a_long_path_is_refused(socket_dir: Path) -> None:
    with pytest.raises(ListenError, match=r"directory of Unix socket .* does not exist"):
        remove_stale_socket(str(socket_dir / "missing" / "extproc.sock"))
    with pytest.raises(ListenError, match="longer than 107 bytes"):
        remove_stale_socket("/" + "a" * 120 + ".sock")


async def _serve_and_check(listen: str, modes: list[int] | None = None) -> int:
    """Serve gRPC health on `listen`, call it once; `modes` gets the socket's mode."""
    server = grpc.aio.server()
    servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    bind_listen(server, listen)
    path = unix_path(listen)
    if modes is not None and path is not None:
        modes.append(stat.S_IMODE(os.stat(path).st_mode))
    await server.start()
    try:
        async with grpc.aio.insecure_channel(listen) as channel:
            reply = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=5)
        status: int = reply.status
        return status
    finally:
        await server.stop(0)


def test_grpc_serves_on_the_socket_with_mode_0660(socket_dir: Path) -> None:
    path = socket_dir / "extproc.sock"
    modes: list[int] = []
    previous = os.umask(0)  # the widest umask: the socket must still be 0660
    try:
        status = asyncio.run(_serve_and_check(f"unix:{path}", modes))
        umask_after = os.umask(0)
    finally:
        os.umask(previous)
    assert modes == [SOCKET_MODE] == [0o660]
    assert status == health_pb2.HealthCheckResponse.SERVING
    assert umask_after == 0  # bind_listen put the process umask back
    assert not path.exists()  # gRPC removes its socket on stop


def test_bind_replaces_a_stale_socket_and_refuses_a_live_one(socket_dir: Path) -> None:
    path = socket_dir / "extproc.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as dead:
        dead.bind(str(path))
    assert asyncio.run(_serve_and_check(f"unix:{path}")) == (
        health_pb2.HealthCheckResponse.SERVING)

    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as live:
        live.bind(str(path))
        live.listen(1)
        with pytest.raises(ListenError, match="another process is serving on"):
            asyncio.run(_serve_and_check(f"unix:{path}"))
        assert path.exists()  # gRPC alone would have unlinked it and taken the address
