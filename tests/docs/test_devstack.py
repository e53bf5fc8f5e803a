"""docs/quickstart.md "Busy ports": a second stack beside the first, as documented.

Before, the recipe kept the config's Redis and emulator ports (so the second stack could
not start beside the first) and shared `var/run` (overwriting the first's envoy.yaml).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

from extproc.devstack import free_port
from tests.docs.ops_harness import REPO, Checkout, commands, running, sh_blocks
from tests.polling import wait_for

QUICKSTART = REPO / "docs" / "quickstart.md"
RECIPE = "**Busy ports, or a second stack beside the first:**"


def recipe_blocks() -> list[str]:
    text = QUICKSTART.read_text(encoding="utf-8")
    section = text[text.index(RECIPE):text.index("## 2. A successful request")]
    return re.findall(r"^```sh\n(.*?)^```", section, re.MULTILINE | re.DOTALL)


def test_a_second_stack_runs_beside_the_first_as_documented(tmp_path: Path) -> None:
    [second], [curl] = (commands(block) for block in recipe_blocks())
    documented = dict(re.findall(r"([A-Z_]+)=(\S+)", second))
    assert documented == {"WORKDIR": "var/run2", "LISTEN_PORT": "20000",
                          "EXTPROC_PORT": "25051", "METRICS_PORT": "29464",
                          "REDIS_PORT": "26379", "EMULATOR_PORT": "28080"}
    assert "127.0.0.1:20000" in curl
    checkout = Checkout(tmp_path / "checkout")
    # The documented ports may be taken on this machine: the same command, free ports.
    ports = {name: str(free_port()) for name in documented if name.endswith("_PORT")}
    for name, port in ports.items():
        second = second.replace(f"{name}={documented[name]}", f"{name}={port}")
    second_curl = curl.replace("127.0.0.1:20000", f"127.0.0.1:{ports['LISTEN_PORT']}")
    [first_run] = commands(sh_blocks(QUICKSTART, "## 1. `make run`")[0])
    assert first_run == "make run"

    with running(checkout, first_run):
        first_bootstrap = (checkout.root / "var/run/envoy.yaml").read_text(encoding="utf-8")
        with running(checkout, second) as stack_two:
            assert f"http://127.0.0.1:{ports['LISTEN_PORT']}" in stack_two.output[0]
            first_curl = checkout.adapt(curl.replace("127.0.0.1:20000", "127.0.0.1:10000"))
            for command in (first_curl, second_curl):
                done = subprocess.run(["bash", "-c", command], cwd=checkout.root,
                                      capture_output=True, text=True, timeout=60, check=True)
                answer = json.loads(done.stdout)
                assert answer["object"] == "chat.completion", done.stdout
            second_dir = checkout.root / "var/run2"
            served = (second_dir / "asc.yaml").read_text(encoding="utf-8")
            assert f"redis://127.0.0.1:{ports['REDIS_PORT']}/0" in served
            assert f"http://127.0.0.1:{ports['EMULATOR_PORT']}" in served
            assert str(checkout.root / "deploy/demo/pepper.txt") in served
            assert sorted(p.name for p in second_dir.glob("*.log")) == sorted([
                "envoy.log", "extproc.log", f"emulator-{ports['EMULATOR_PORT']}.log",
                f"redis-{ports['REDIS_PORT']}.log"])
            # The first stack's files are its own.
            assert (checkout.root / "var/run/envoy.yaml").read_text(
                encoding="utf-8") == first_bootstrap
            assert f"--base-id {ports['LISTEN_PORT']}" not in first_bootstrap


def test_make_run_passes_every_port_and_the_workdir(tmp_path: Path) -> None:
    checkout = Checkout(tmp_path / "checkout")
    done = checkout.run("make -n run WORKDIR=w LISTEN_PORT=1 EXTPROC_PORT=2 METRICS_PORT=3 "
                        "REDIS_PORT=4 EMULATOR_PORT=5 REDIS_PERSIST=0")
    [line] = [x for x in done.stdout.splitlines() if "extproc.devstack" in x]
    assert line.split()[1:] == [
        ".venv/bin/python", "-m", "extproc.devstack", "--config", "deploy/demo/asc.yaml",
        "--workdir", "w", "--listen-port", "1", "--extproc-port", "2", "--metrics-port", "3",
        "--demo-model", "gpt-4o-mini", "--redis-port", "4", "--emulator-port", "5",
        "--no-redis-persist", "--demo-key", "sk-asc-demo-acme-key"]


def _children(pid: int) -> list[int]:
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        found += [int(c) for c in (task / "children").read_text().split()]
    return found


def _gone(pid: int) -> bool:
    """Exited (a zombie waiting for its new parent counts as exited)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return True
    return "\nState:\tZ" in status


def test_a_killed_make_run_leaves_no_process_behind(tmp_path: Path) -> None:
    """`make run`'s processes go with it even when it cannot stop them (SIGKILL, an OOM
    kill, a CI runner's timeout): before, its redis-server, emulator and extproc kept
    running (seen once after tests/docs/test_quickstart.py)."""
    ports = [str(free_port()) for _ in range(5)]
    devstack = subprocess.Popen(
        [sys.executable, "-m", "extproc.devstack", "--config",
         str(REPO / "deploy/demo/asc.yaml"), "--workdir", str(tmp_path / "run"),
         "--listen-port", ports[0], "--extproc-port", ports[1], "--metrics-port", ports[2],
         "--redis-port", ports[3], "--emulator-port", ports[4], "--no-redis-persist"],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    started: list[int] = []
    try:
        assert devstack.stdout is not None
        for line in devstack.stdout:  # bounded: the stack prints this line, or exits
            if line.startswith("Ctrl-C stops"):
                break
        started = _children(devstack.pid)
        assert len(started) == 4  # redis-server, the emulator, extproc, Envoy
        devstack.kill()
        devstack.wait(10)
        assert wait_for(lambda: all(_gone(pid) for pid in started), timeout=30), [
            Path(f"/proc/{pid}/cmdline").read_text() for pid in started if not _gone(pid)]
    finally:
        devstack.kill()
        devstack.wait(10)
        for pid in started:  # what a failed test would otherwise leave running
            if not _gone(pid):
                os.kill(pid, signal.SIGKILL)


def test_free_port_never_gives_a_port_twice() -> None:
    """A stack asks for several ports before its processes bind them; the kernel may offer
    a closed probe's port again at once."""
    ports = [free_port() for _ in range(300)]
    assert len(set(ports)) == 300
