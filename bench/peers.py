"""The peers measured in the same run as the gateway: LiteLLM proxy and Portkey gateway.

Each forwards the same OpenAI chat body to the same emulator on loopback. Neither is a
project dependency: `make bench` installs LiteLLM into its own venv (bench/.venv-litellm,
pinned in bench/requirements-litellm.txt) and Portkey with `npm install --prefix bench`
(pinned in bench/package.json). A peer that is not installed, or fails to start, is
skipped with the reason printed; the gateway rows are still measured.

- LiteLLM proxy: `litellm --config`, one model entry `openai/<model>` with `api_base` at
  the emulator, a master key (the client's Authorization, checked without a database),
  no database, no callbacks, the local model cost map (no fetch at start-up), 1 and 2
  workers (`--num_workers`).
- Portkey gateway (open-source, Node): `build/start-server.js --port=<p> --headless` with
  NODE_ENV=production; routed per request by `x-portkey-provider: openai` and
  `x-portkey-custom-host: http://127.0.0.1:<emulator>/v1` (loopback is in its default
  trusted custom hosts); the client's Authorization is the provider key (Portkey's
  open-source gateway has no virtual keys of its own).
"""

from __future__ import annotations

import secrets
import shutil
from pathlib import Path
from typing import Final

import yaml
from stack import MODEL, PROVIDER_KEY_ENV, BenchStack, Target

from extproc.devstack import LOOPBACK, ManagedProcess, Stack, free_port, wait_for_port

__all__ = ["LITELLM", "PORTKEY", "litellm_name", "start_litellm", "start_portkey"]

BENCH_DIR: Final = Path(__file__).resolve().parent
LITELLM_VENV: Final = BENCH_DIR / ".venv-litellm"
PORTKEY_SERVER: Final = (BENCH_DIR / "node_modules" / "@portkey-ai" / "gateway" / "build"
                         / "start-server.js")
LITELLM: Final = "litellm"
PORTKEY: Final = "portkey"
START_TIMEOUT_S: Final = 240.0
"""LiteLLM imports for tens of seconds on a busy 2-core machine."""


def litellm_name(workers: int) -> str:
    return f"{LITELLM}-{workers}w"


def _drop(stack: Stack, process: ManagedProcess) -> None:
    """Stop a peer that failed to start and forget it: the run goes on without it."""
    process.stop()
    if process in stack.processes:
        stack.processes.remove(process)


def _last_line(exc: BaseException) -> str:
    lines = [line for line in str(exc).splitlines() if line.strip()]
    return lines[0][:300] if lines else type(exc).__name__


def start_litellm(bench: BenchStack, *, workers: int) -> None:
    """LiteLLM proxy with `workers` workers, added to `bench` as `litellm-<n>w`."""
    name = litellm_name(workers)
    binary = LITELLM_VENV / "bin" / "litellm"
    if not binary.exists():
        bench.skip(name, f"{binary.relative_to(BENCH_DIR.parent)} missing (`make bench` "
                         "installs it)")
        return
    stack: Stack = bench.stack
    master_key = "sk-litellm-bench-" + secrets.token_hex(16)
    config = {
        "model_list": [{
            "model_name": MODEL,
            "litellm_params": {
                "model": f"openai/{MODEL}",
                "api_base": f"http://{LOOPBACK}:{bench.emulator_port}/v1",
                "api_key": f"os.environ/{PROVIDER_KEY_ENV}",
            },
        }],
        "litellm_settings": {"callbacks": [], "success_callback": [], "failure_callback": [],
                             "telemetry": False, "set_verbose": False},
        "general_settings": {"master_key": master_key, "disable_spend_logs": True},
    }
    config_path = stack.workdir / f"{name}.yaml"
    config_path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    port = free_port()
    env = {k: v for k, v in stack.env.items() if k != "DATABASE_URL"}
    env.update(LITELLM_LOCAL_MODEL_COST_MAP="True", LITELLM_LOG="ERROR", PYTHONUNBUFFERED="1",
               LITELLM_MODE="PRODUCTION", NO_DOCS="True", DISABLE_ADMIN_UI="True",
               LITELLM_DONT_SHOW_FEEDBACK_BOX="True")
    env.pop("PYTHONPATH", None)
    process = stack.spawn(name, [str(binary), "--config", str(config_path), "--host",
                                 LOOPBACK, "--port", str(port), "--num_workers",
                                 str(workers)], env=env)
    try:
        wait_for_port(port, process=process, timeout=START_TIMEOUT_S)
    except (RuntimeError, TimeoutError) as exc:
        _drop(stack, process)
        bench.skip(name, f"did not start: {_last_line(exc)}")
        return
    emulator = bench.targets["direct"].pids["emulator"]
    bench.add(Target(name, port, master_key, {"peer": process.popen.pid,
                                              "emulator": emulator},
                     note=f"LiteLLM proxy, {workers} worker(s), no DB, no callbacks"))


def start_portkey(bench: BenchStack) -> None:
    """Portkey's open-source gateway under node, added to `bench` as `portkey`."""
    node = shutil.which("node")
    if node is None or not PORTKEY_SERVER.exists():
        missing = "node" if node is None else str(PORTKEY_SERVER.relative_to(BENCH_DIR.parent))
        bench.skip(PORTKEY, f"{missing} missing (`make bench` runs npm install --prefix bench)")
        return
    stack: Stack = bench.stack
    port = free_port()
    env = dict(stack.env, NODE_ENV="production", ENVIRONMENT="production")
    process = stack.spawn(PORTKEY, [node, str(PORTKEY_SERVER), f"--port={port}",
                                    "--headless"], env=env)
    try:
        wait_for_port(port, process=process, timeout=START_TIMEOUT_S)
    except (RuntimeError, TimeoutError) as exc:
        _drop(stack, process)
        bench.skip(PORTKEY, f"did not start: {_last_line(exc)}")
        return
    emulator = bench.targets["direct"].pids["emulator"]
    bench.add(Target(PORTKEY, port, bench.provider_key,
                     {"peer": process.popen.pid, "emulator": emulator},
                     headers={"x-portkey-provider": "openai",
                              "x-portkey-custom-host":
                                  f"http://{LOOPBACK}:{bench.emulator_port}/v1"},
                     note="Portkey gateway (node), provider openai, custom host"))


