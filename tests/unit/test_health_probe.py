"""`python -m extproc.health_probe` / `extproc health` without a service: the probe's
failure path (the serving path runs against a real service in tests/deploy)."""

from __future__ import annotations

from pathlib import Path

import pytest

from extproc import cli, health_probe


def test_no_service_on_the_socket_is_unhealthy(tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    socket = tmp_path / "missing.sock"
    assert health_probe.main(["--socket", str(socket)]) == 1
    out, err = capsys.readouterr()
    assert (out, err) == ("", f"unix:{socket}: no answer (UNAVAILABLE)\n")


def test_cli_command_is_the_same_check(tmp_path: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    socket = tmp_path / "missing.sock"
    assert cli.main(["health", "--socket", str(socket), "--timeout", "1"]) == 1
    assert capsys.readouterr().err == f"unix:{socket}: no answer (UNAVAILABLE)\n"


def test_socket_and_target_exclude_each_other(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        health_probe.main(["--socket", "/x.sock", "--target", "127.0.0.1:1"])
    assert exited.value.code == 2
    assert "not allowed with argument" in capsys.readouterr().err


def test_default_socket_is_the_pods() -> None:
    assert health_probe.DEFAULT_SOCKET == "/run/asc/extproc.sock"
