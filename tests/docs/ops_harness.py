"""Run documented operator commands as written, against real processes.

A `Checkout` is a throw-away directory that looks like the repository to the commands in
the docs: `Makefile`, `pyproject.toml`, `.venv` (links to the real ones) and a copy of
`deploy/`, with the demo configs' loopback ports (Redis 16379, emulator 18080) moved to
free ones so that a test never meets a stack someone runs on the default ports. Commands
run with that directory as the working directory; the only other change to a command
is the Envoy port (10000) of a curl and the `make run` port variables, which are the
documented way to choose ports.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from extproc.devstack import free_port

_WITH_DEFAULT_SIGINT = ("import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); "
                        "os.execvp(sys.argv[1], sys.argv[1:])")
"""Runs its arguments with SIGINT at its default (an ignored signal stays ignored across
exec, and bash cannot reset one it was started with)."""

__all__ = ["REPO", "Checkout", "RunningStack", "sh_blocks"]

REPO = Path(__file__).resolve().parents[2]
_FENCE = re.compile(r"^```sh\n(.*?)^```", re.MULTILINE | re.DOTALL)


def sh_blocks(markdown: Path, heading: str) -> list[str]:
    """The ```sh blocks of the section `heading` (up to the next heading of any level)."""
    text = markdown.read_text(encoding="utf-8")
    start = text.index(f"\n{heading}\n")
    following = re.search(r"^#{1,6} ", text[start + len(heading) + 2:], re.MULTILINE)
    end = start + len(heading) + 2 + following.start() if following else len(text)
    return [block for block in _FENCE.findall(text[start:end])]


def commands(block: str) -> list[str]:
    """Shell commands of a block: continuation lines joined, comments and blanks dropped."""
    joined = block.replace("\\\n", " ")
    return [line.strip() for line in joined.splitlines()
            if line.strip() and not line.strip().startswith("#")]


def _free_port_pair() -> int:
    """A port whose next port is free too (an OpenBao dev server uses both)."""
    for _ in range(50):
        port = free_port()
        with contextlib.suppress(OSError), socket.socket() as probe:
            probe.bind(("127.0.0.1", port + 1))
            return port
    raise RuntimeError("no free pair of adjacent loopback ports")


@dataclass
class RunningStack:
    """A `make run` in the background; `stop()` is Ctrl-C (SIGINT to its group)."""

    popen: subprocess.Popen[str]
    output: list[str] = field(default_factory=list)

    def stop(self) -> int:
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.popen.pid, signal.SIGINT)
            try:
                self.popen.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.popen.pid, signal.SIGKILL)
                self.popen.wait(10)
        if self.popen.stdout is not None:
            self.output.append(self.popen.stdout.read())
        return self.popen.returncode


@dataclass
class Checkout:
    root: Path
    redis_port: int = field(default_factory=free_port)
    emulator_port: int = field(default_factory=free_port)
    listen_port: int = field(default_factory=free_port)
    extproc_port: int = field(default_factory=free_port)
    metrics_port: int = field(default_factory=free_port)
    bao_port: int = field(default_factory=lambda: _free_port_pair())

    def __post_init__(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        for name in ("Makefile", "pyproject.toml", ".venv"):
            (self.root / name).symlink_to(REPO / name)
        shutil.copytree(REPO / "deploy", self.root / "deploy")
        for config in (self.root / "deploy" / "demo").glob("*.yaml"):
            text = config.read_text(encoding="utf-8")
            text = text.replace("127.0.0.1:16379", f"127.0.0.1:{self.redis_port}")
            text = text.replace("127.0.0.1:18080", f"127.0.0.1:{self.emulator_port}")
            text = text.replace("127.0.0.1:8200", f"127.0.0.1:{self.bao_port}")
            config.write_text(text, encoding="utf-8")

    @property
    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("BAO_", "VAULT_"))}
        env.pop("MAKEFLAGS", None)
        env.pop("MFLAGS", None)
        return env

    def adapt(self, command: str) -> str:
        """The documented command with this checkout's ports. `make install` only asks
        make whether the shared .venv is up to date (`make -q`): a real install from here
        would point the repository's editable install at this temporary directory."""
        if command == "make install":
            return "make -q install"
        command = command.replace("127.0.0.1:10000", f"127.0.0.1:{self.listen_port}")
        command = command.replace("redis-16379", f"redis-{self.redis_port}")
        if command.startswith("make run"):
            for name, port in (("LISTEN_PORT", self.listen_port),
                               ("EXTPROC_PORT", self.extproc_port),
                               ("METRICS_PORT", self.metrics_port)):
                if f"{name}=" not in command:  # a documented choice stays
                    command += f" {name}={port}"
        if command.startswith("make openbao"):
            command += f" BAO_PORT={self.bao_port}"
        if command.startswith(("make run", "make openbao")):
            command += " -o .venv/.installed"  # never reinstall the shared .venv from here
        return command

    def run(self, command: str, *, check: bool = True,
            timeout: float = 120) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(["bash", "-o", "pipefail", "-c", self.adapt(command)],
                              cwd=self.root, env=self.env, capture_output=True, text=True,
                              timeout=timeout, check=False)
        if check and done.returncode != 0:
            raise AssertionError(f"{command!r} exited {done.returncode}:\n{done.stdout}\n"
                                 f"{done.stderr}")
        return done

    def start(self, command: str, *, timeout: float = 90) -> RunningStack:
        """Start a `make run ...` and return once it prints that the stack is up."""
        # As from a terminal: Ctrl-C at its default. A suite started in the background
        # (`make test &`) inherits SIGINT ignored, and make then never sees the Ctrl-C.
        popen = subprocess.Popen([sys.executable, "-c", _WITH_DEFAULT_SIGINT, "bash", "-c",
                                  self.adapt(command)], cwd=self.root,
                                 env=self.env, stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, text=True, start_new_session=True)
        stack = RunningStack(popen)
        assert popen.stdout is not None
        deadline = time.monotonic() + timeout
        lines: list[str] = []
        try:
            for line in popen.stdout:
                lines.append(line)
                if line.startswith("Ctrl-C stops"):
                    stack.output.append("".join(lines))
                    return stack
                if time.monotonic() > deadline:
                    break
        except BaseException:
            stack.stop()
            raise
        stack.stop()
        raise AssertionError(f"{command!r} did not come up:\n{''.join(lines)}"
                             f"{''.join(stack.output)}\n{self.logs()}")

    def logs(self, workdir: str = "var/run") -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-2000:]}"
                         for p in sorted((self.root / workdir).glob("*.log")))


@contextlib.contextmanager
def running(checkout: Checkout, command: str) -> Iterator[RunningStack]:
    stack = checkout.start(command)
    try:
        yield stack
    finally:
        stack.stop()
