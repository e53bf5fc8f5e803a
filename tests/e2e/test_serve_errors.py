"""`extproc serve` on a busy /metrics port: one clear error line and exit 2, before the
gRPC server (or any worker) starts; no traceback, no "Event loop is closed" noise."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest

from extproc.devstack import free_port
from tests.conftest import gateway_config, provider_env, write_config


def serve(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """`extproc serve --config CONFIG ARGS...` until it exits (60 s at most)."""
    return subprocess.run(
        [sys.executable, "-m", "extproc", "serve", "--config", str(config), *args],
        capture_output=True, text=True, timeout=60, check=False,
        env={**provider_env(), "PATH": "/usr/bin:/bin"}, cwd=config.parent)


@pytest.mark.parametrize("workers", [1, 2])
def test_a_busy_metrics_port_is_one_error_line_and_exit_2(tmp_path: Path, workers: int) -> None:
    config = write_config(tmp_path / "config", gateway_config(free_port()))
    grpc_port = free_port()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        done = serve(config, "--listen", f"127.0.0.1:{grpc_port}",
                     "--metrics-listen", f"127.0.0.1:{busy}", "--workers", str(workers))
    assert done.returncode == 2, done.stderr[-2000:]
    assert f"cannot serve /metrics on 127.0.0.1:{busy}: Address already in use" in done.stderr
    assert "--metrics-listen HOST:PORT with a free port" in done.stderr
    assert "Traceback" not in done.stderr
    assert "Event loop is closed" not in done.stderr
    assert "extproc serving" not in done.stderr  # the gRPC server never started


def test_a_busy_fast_door_port_is_one_error_line_and_exit_2(tmp_path: Path) -> None:
    document = gateway_config(free_port())
    document["fast_path"] = {"enabled": True}
    config = write_config(tmp_path / "config", document)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        done = serve(config, "--listen", f"127.0.0.1:{free_port()}", "--metrics-listen", "",
                     "--fast-door", f"127.0.0.1:{busy}")
    assert done.returncode == 2, done.stderr[-2000:]
    assert '"msg":"cannot start: listen address unusable"' in done.stderr
    assert (f"cannot listen on '127.0.0.1:{busy}' (fast door): Address already in use"
            in done.stderr)
    assert "Traceback" not in done.stderr
    assert "extproc serving" not in done.stderr
