"""The grpc.aio ext_proc server: stream loop, health, metrics, reload, workers, drain.

The stream loop only decodes, dispatches to the request's `RequestProcessor` and encodes;
it holds no policy. `finish()` runs in a `finally`, so it also runs when Envoy resets the
stream (client abort, timeout) and the handler is cancelled.

With `--workers N > 1` a supervisor starts N worker processes that all bind the same port
(SO_REUSEPORT, the kernel spreads connections) or, on `--listen unix:PATH`, one socket
each (extproc/listen.py: Unix sockets have no SO_REUSEPORT), serves the merged Prometheus
metrics, and forwards SIGTERM / SIGHUP to the workers. A worker that dies is restarted after an
exponential back-off (a broken config must not fork a process every half second), and
its live gauges leave the merged metrics with it. Each worker holds 1/N of every
`fail_open` ceiling, so a replica as a whole never admits more than the configured one.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import grpc
from envoy.service.accesslog.v3 import als_pb2_grpc
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from prometheus_client import CollectorRegistry

from extproc import envoy, metrics, tracing
from extproc.audit.writer import AuditWriter, open_writer
from extproc.backends import REDIS_FAILURES, describe_redis_failure
from extproc.budgets.ledger import LedgerUnavailable
from extproc.budgets.policy import hash_tag
from extproc.config import ConfigError, ConfigIssue, load_config
from extproc.credentials.kek import KekError
from extproc.credentials.keyring import listen_for_changes
from extproc.deployment_health import ActiveProber
from extproc.failover import FLIGHTS
from extproc.fastdoor import start_door
from extproc.listen import (
    UNIX_PREFIX,
    ListenError,
    bind_listen,
    creating_socket,
    unix_path,
    worker_listen,
)
from extproc.logs import log_event
from extproc.messages import Phase
from extproc.phases import RequestProcessor
from extproc.runtime import Runtime, RuntimeHolder, close_replaced, kek_from_settings
from extproc.secrets import SecretUnavailable
from extproc.upstream import AttemptProcessor
from extproc.usage_log import AccessLogReceiver

if TYPE_CHECKING:
    import aiohttp

__all__ = ["ExternalProcessorService", "RestartBackoff", "ServeOptions", "build_runtime", "serve"]

log = logging.getLogger("extproc.server")

SERVICE_NAME: Final = "envoy.service.ext_proc.v3.ExternalProcessor"
_MAX_MESSAGE_BYTES: Final = (1 << 30) + (1 << 20)
"""A whole buffered body in one message: up to `limits.max_response_bytes` (1 GiB at most)
or `limits.max_body_bytes` plus Envoy's slack; a limit, not an allocation."""
_PHASE_TIMERS: Final = {phase: metrics.PHASE_SECONDS.labels(phase.value) for phase in Phase}


@dataclass(frozen=True, slots=True)
class ServeOptions:
    config_path: Path
    listen: str = "127.0.0.1:50051"
    metrics_listen: str | None = "127.0.0.1:9464"
    workers: int = 1
    drain_seconds: float = 10.0
    log_level: str = "info"
    watch_interval: float = 1.0
    sweep_interval: float = 5.0
    fast_door: str | None = None
    """The fast door's address when the config enables the fast path (`door_address`)."""


def door_address(listen: str, fast_door: str | None) -> str:
    """Where the fast door listens: `fast_door` when given, else beside the gRPC listen
    address - `<socket>.door` for a Unix socket, the next port on the same host for TCP
    (50052 beside 50051: what `extproc envoy render` assumes)."""
    if fast_door:
        return fast_door
    path = unix_path(listen)
    if path is not None:
        return UNIX_PREFIX + path + ".door"
    host, _, port = listen.rpartition(":")
    return f"{host}:{int(port) + 1}"


class ExternalProcessorService(pb_grpc.ExternalProcessorServicer):  # type: ignore[misc]
    def __init__(self, holder: RuntimeHolder, audit: AuditWriter | None = None) -> None:
        self._holder = holder
        self._audit = audit
        self.finishing: set[asyncio.Task[None]] = set()
        """finish() runs as its own task: a cancelled stream handler cannot cut it short."""

    async def Process(
        self, request_iterator: Any, context: grpc.aio.ServicerContext[Any, Any]
    ) -> None:
        if _is_upstream_stage(context):
            await self._attempt(context)
            return
        processor = RequestProcessor(self._holder.current, audit=self._audit)
        try:
            while True:
                request = await context.read()
                if request is grpc.aio.EOF:
                    return
                started = time.perf_counter()
                inbound = envoy.decode(request)
                reply = await processor.handle(inbound)
                response: pb.ProcessingResponse = envoy.encode(inbound.phase, reply)
                _PHASE_TIMERS[inbound.phase].observe(time.perf_counter() - started)
                await context.write(response)
                if processor.fast_path:
                    # The fast door's refusal passed through (recorded by the door):
                    # nothing more of it is this stream's; end the RPC now instead of
                    # waiting for Envoy's half-close.
                    return
        finally:
            if processor.finishes_without_waiting:
                # Nothing to await (no hold to settle, or a fast-path request settled
                # from the access log): run it here, without a task per request. It
                # never suspends, so a cancelled handler cannot cut it short.
                try:
                    await processor.finish()
                except Exception:
                    log.exception("finish failed")
            else:
                task = asyncio.get_running_loop().create_task(processor.finish())
                self.finishing.add(task)
                task.add_done_callback(self._finished)

    async def _attempt(self, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        """An upstream (per-attempt) ext_proc stream: see extproc/upstream.py."""
        processor = AttemptProcessor(self._holder.current, FLIGHTS)
        try:
            while True:
                request = await context.read()
                if request is grpc.aio.EOF:
                    return
                inbound = envoy.decode(request)
                attempt_context = (envoy.attempt_context(request)
                                   if inbound.phase is Phase.REQUEST_HEADERS else {})
                reply = await processor.handle(inbound, attempt_context)
                await context.write(envoy.encode(inbound.phase, reply))
        finally:
            processor.finish()

    def _finished(self, task: asyncio.Task[None]) -> None:
        self.finishing.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("finish failed", exc_info=task.exception())

    async def drain(self, timeout_s: float) -> None:
        if self.finishing:
            await asyncio.wait(set(self.finishing), timeout=timeout_s)


def _is_upstream_stage(context: grpc.aio.ServicerContext[Any, Any]) -> bool:
    metadata = context.invocation_metadata() or ()
    return any(key == envoy.STAGE_HEADER and value == envoy.STAGE_UPSTREAM
               for key, value in metadata)


def build_runtime(config_path: Path, *, workers: int = 1,
                  previous: Runtime | None = None) -> Runtime:
    """The runtime of one worker out of `workers`: raises ConfigError / SecretUnavailable.

    The `fail_open` ceilings are per replica: each of the replica's workers keeps its own
    in-memory tally, so each gets 1/`workers` of every ceiling.
    """
    runtime = Runtime.build(load_config(config_path), previous=previous)
    if runtime.config.tracing is not None:
        try:
            tracing.install(runtime.config.tracing)
        except tracing.TracingUnavailable as exc:
            raise ConfigError(str(config_path), [ConfigIssue("tracing", str(exc))]) from None
    if runtime.budgets is not None:
        runtime.budgets.fail_open_share = max(1, workers)
    return runtime


class ConfigReloader:
    """Loads a new runtime on SIGHUP or file change; a bad file keeps the old runtime."""

    def __init__(self, path: Path, holder: RuntimeHolder, workers: int, *,
                 retire_after_s: float) -> None:
        self._path = path
        self._holder = holder
        self._workers = workers
        self._retire_after_s = retire_after_s
        self._retiring: set[asyncio.Task[None]] = set()
        self._stamp = self._file_stamp()

    def _file_stamp(self) -> tuple[int, int] | None:
        try:
            stat = self._path.stat()
        except OSError:
            return None
        return (stat.st_mtime_ns, stat.st_size)

    def reload(self, reason: str) -> bool:
        self._stamp = self._file_stamp()
        try:
            runtime = build_runtime(self._path, workers=self._workers,
                                    previous=self._holder.current)
        except (ConfigError, SecretUnavailable) as exc:
            return self._failed(reason, str(exc))
        except Exception as exc:  # a bug must not kill the watcher: keep serving the old one
            log.exception("config reload crashed")
            return self._failed(reason, type(exc).__name__)
        previous, self._holder.current = self._holder.current, runtime
        self._retire(previous, runtime)
        metrics.CONFIG_RELOADS.labels("success").inc()
        log_event(log, logging.INFO, "config reloaded", reason=reason, source=str(self._path))
        return True

    def _retire(self, old: Runtime, new: Runtime) -> None:
        """Close what the reload replaced (`close_replaced`) `retire_after_s` later (the
        drain period: what requests still on the old runtime get, as at shutdown). A
        late user of the old Redis client or ledger still works: each opens a connection
        again."""
        loop = asyncio.get_running_loop()

        def close() -> None:
            task = loop.create_task(close_replaced(old, new))
            self._retiring.add(task)
            task.add_done_callback(self._retiring.discard)

        loop.call_later(self._retire_after_s, close)

    def _failed(self, reason: str, error: str) -> bool:
        metrics.CONFIG_RELOADS.labels("failure").inc()
        log_event(log, logging.ERROR, "config reload failed; keeping the previous config",
                  reason=reason, error=error)
        return False

    async def watch(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            if self._file_stamp() != self._stamp:
                self.reload("file changed")


async def _sweep_holds(holder: RuntimeHolder, interval: float) -> None:
    """Return the budget holds of requests that never settled (see budgets/lua/sweep.lua)."""
    while True:
        await asyncio.sleep(interval)
        runtime = holder.current
        if runtime.budgets is None:
            continue
        tags = {hash_tag(t.budget) for t in runtime.config.tenants.values() if t.budget}
        for tag in sorted(tags):
            try:
                swept = await runtime.budgets.sweep(tag)
            except LedgerUnavailable:
                continue  # the breaker makes the remaining tags fail fast while Redis is out
            if swept:
                log_event(log, logging.WARNING, "returned abandoned budget holds",
                          tag=tag, count=swept)


async def _sync_keys(holder: RuntimeHolder) -> None:
    """Follow key rotations published by any replica, and share key pool health; on the
    current runtime's Redis (a reload may have changed it)."""

    def invalidate(scope: str, credential: str) -> None:
        keyring = holder.current.keys.keyring
        if keyring is not None:
            keyring.invalidate(scope, credential)

    listener: asyncio.Task[None] | None = None
    listening_on: Any = None
    try:
        while True:
            runtime = holder.current
            if runtime.redis is not listening_on:
                if listener is not None:
                    listener.cancel()
                listener, listening_on = None, runtime.redis
                if (runtime.redis is not None and runtime.config.redis
                        and not runtime.config.redis.cluster):
                    listener = asyncio.create_task(listen_for_changes(runtime.redis, invalidate))
            await asyncio.sleep(1.0)
            runtime = holder.current
            if runtime.redis is None:
                continue
            try:
                await runtime.keys.pool.sync(runtime.redis)
                await runtime.health.sync(runtime.redis)
            except REDIS_FAILURES as exc:
                log_event(log, logging.WARNING, "key pool health sync failed",
                          error=describe_redis_failure(exc))
    finally:
        if listener is not None:
            listener.cancel()


async def _probe_deployments(holder: RuntimeHolder) -> None:
    """Active deployment probes (`deployments[].probe`), when any is configured."""
    prober = ActiveProber()
    session: aiohttp.ClientSession | None = None
    try:
        while True:
            await asyncio.sleep(1.0)
            runtime = holder.current
            if not any(d.probe for m in runtime.config.models.values() for d in m.deployments):
                continue
            if session is None:
                import aiohttp  # only with probes configured (deployment_health.probe_once)

                session = aiohttp.ClientSession()
            await prober.tick(runtime.config, runtime.health, session)
    finally:
        await prober.close()
        if session is not None:
            await session.close()


def start_metrics(listen: str, registry: CollectorRegistry | None = None) -> None:
    """Serve /metrics on `listen` (HOST:PORT); a port that cannot be bound is an operator
    error naming the option, not a traceback after the gRPC server already started."""
    from prometheus_client import REGISTRY, start_http_server

    host, port = _split_listen(listen)
    try:
        start_http_server(port, addr=host, registry=registry or REGISTRY)
    except OSError as exc:
        raise ListenError(f"cannot serve /metrics on {listen}: {exc.strerror or exc} (pass "
                          "--metrics-listen HOST:PORT with a free port, or --metrics-listen "
                          "'' to turn /metrics off)") from None


def _split_listen(listen: str) -> tuple[str, int]:
    host, _, port = listen.rpartition(":")
    return host.strip("[]") or "127.0.0.1", int(port)


async def _serve_worker(options: ServeOptions, runtime: Runtime, *, supervised: bool) -> None:
    """Serve until SIGTERM. A supervised worker shares its port with its siblings and
    leaves /metrics to the supervisor."""
    holder = RuntimeHolder(runtime)
    # Port sharing only among our own workers: a single process must fail to start on a
    # busy port rather than silently split traffic with whoever holds it.
    server = grpc.aio.server(options=[
        ("grpc.so_reuseport", 1 if supervised else 0),
        # Bodies arrive whole (BUFFERED) and leave translated (see _MAX_MESSAGE_BYTES).
        ("grpc.max_receive_message_length", _MAX_MESSAGE_BYTES),
        ("grpc.max_send_message_length", _MAX_MESSAGE_BYTES),
    ])
    kek = (kek_from_settings(runtime.config.secrets.kek)
           if runtime.config.secrets.kek is not None else None)
    try:
        # The redis sink writes to the current config's Redis (a reload may move it).
        audit = await open_writer(runtime.config, kek=kek, redis=None if runtime.redis is None
                                  else lambda: holder.current.redis or runtime.redis)
    except (OSError, ValueError, LookupError, KekError) as exc:
        # No request is served that could not be recorded.
        log_event(log, logging.ERROR, "cannot start: audit log unavailable",
                  error=str(exc) or type(exc).__name__)
        raise SystemExit(2) from None
    service = ExternalProcessorService(holder, audit)
    pb_grpc.add_ExternalProcessorServicer_to_server(service, server)
    usage_log = AccessLogReceiver(holder, audit)  # fast-path answers (extproc/usage_log.py)
    als_pb2_grpc.add_AccessLogServiceServicer_to_server(usage_log, server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    # /metrics first: a busy metrics port stops the start before the gRPC server runs.
    if not supervised and options.metrics_listen:
        start_metrics(options.metrics_listen)
    door_tasks: set[asyncio.Task[None]] = set()
    door = None
    if runtime.config.fast_path.rendered:  # a busy door stops the start before gRPC does
        door = await _open_door(door_address(options.listen, options.fast_door), holder,
                                audit, door_tasks, shared=supervised)
    bind_listen(server, options.listen)
    await server.start()
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    reloader = ConfigReloader(options.config_path, holder, options.workers,
                              retire_after_s=options.drain_seconds)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    loop.add_signal_handler(signal.SIGHUP, reloader.reload, "SIGHUP")
    watcher = asyncio.create_task(reloader.watch(options.watch_interval))
    sweeper = asyncio.create_task(_sweep_holds(holder, options.sweep_interval))
    key_sync = asyncio.create_task(_sync_keys(holder))
    prober = asyncio.create_task(_probe_deployments(holder))
    log_event(log, logging.INFO, "extproc serving", listen=options.listen, pid=os.getpid(),
              metrics=None if supervised else options.metrics_listen,
              fast_door=(door_address(options.listen, options.fast_door)
                         if door is not None else None))
    await stop.wait()
    log_event(log, logging.INFO, "draining", grace_seconds=options.drain_seconds)
    await health_servicer.enter_graceful_shutdown()
    watcher.cancel()
    sweeper.cancel()
    key_sync.cancel()
    prober.cancel()
    if door is not None:
        door.close()
    await server.stop(options.drain_seconds)
    if door_tasks:
        await asyncio.wait(set(door_tasks), timeout=options.drain_seconds)
    await service.drain(options.drain_seconds)
    await usage_log.drain(options.drain_seconds)
    await audit.close(options.drain_seconds)  # every finished request's record, then the seal
    tracing.shutdown()  # the last batched spans leave before the process does
    log_event(log, logging.INFO, "stopped")


async def _open_door(address: str, holder: RuntimeHolder, audit: AuditWriter,
                     tasks: set[asyncio.Task[None]], *, shared: bool) -> asyncio.Server:
    """Listen for Envoy's fast-path checks (extproc/fastdoor.py); a Unix socket gets mode
    0660 from its creation on, as the gRPC one does."""
    path = unix_path(address)
    try:
        if path is not None:
            with creating_socket(path):
                return await start_door(path, holder, audit, tasks, reuse_port=False)
        if not address.rpartition(":")[2].isdigit():
            raise ListenError(f"fast door {address!r} is not host:port or unix:/path")
        return await start_door(_split_listen(address), holder, audit, tasks,
                                reuse_port=shared)
    except OSError as exc:
        raise ListenError(f"cannot listen on {address!r} (fast door): "
                          f"{os.strerror(exc.errno) if exc.errno else type(exc).__name__}"
                          ) from None


def serve(options: ServeOptions) -> int:
    """Run the service until SIGTERM/SIGINT; returns the process exit code."""
    try:
        unix_path(options.listen)
    except ListenError as exc:
        log_event(log, logging.ERROR, "cannot start: listen address unusable", error=str(exc))
        return 2
    try:
        runtime = build_runtime(options.config_path)
    except (ConfigError, SecretUnavailable) as exc:
        log_event(log, logging.ERROR, "cannot start: invalid config", error=str(exc))
        return 2
    if options.workers <= 1:
        return _run_worker(options, runtime, supervised=False)
    try:
        return _supervise(options)
    except ListenError as exc:
        log_event(log, logging.ERROR, "cannot start: listen address unusable", error=str(exc))
        return 2


def serve_as_worker(options: ServeOptions) -> int:
    """Entry of one worker process started by the supervisor (`options.workers` is the
    number of its siblings plus one)."""
    try:
        runtime = build_runtime(options.config_path, workers=options.workers)
    except (ConfigError, SecretUnavailable) as exc:
        log_event(log, logging.ERROR, "cannot start: invalid config", error=str(exc))
        return 2
    return _run_worker(options, runtime, supervised=True)


def _run_worker(options: ServeOptions, runtime: Runtime, *, supervised: bool) -> int:
    try:
        asyncio.run(_serve_worker(options, runtime, supervised=supervised))
    except ListenError as exc:
        log_event(log, logging.ERROR, "cannot start: listen address unusable", error=str(exc))
        return 2
    return 0


@dataclass
class RestartBackoff:
    """How long the supervisor waits before restarting a worker that exited.

    Doubles from `base_s` up to `cap_s` while the worker keeps dying young; a worker that
    ran at least `healthy_after_s` starts the sequence again. Without it, a config that
    became invalid (caught at worker start) restarts a Python process every poll.
    """

    base_s: float = 0.5
    cap_s: float = 30.0
    healthy_after_s: float = 10.0
    _failures: int = 0

    def delay(self, ran_for_s: float) -> float:
        """The wait before the next start, given how long the exited process ran."""
        if ran_for_s >= self.healthy_after_s:
            self._failures = 0
        wait = min(self.cap_s, self.base_s * 2.0 ** self._failures)
        self._failures += 1
        return wait


@dataclass
class _WorkerSlot:
    process: subprocess.Popen[bytes] | None
    started_at: float
    backoff: RestartBackoff = field(default_factory=RestartBackoff)
    restart_at: float | None = None


_SUPERVISOR_POLL_S: Final = 0.1


def _supervise(options: ServeOptions) -> int:
    """Run `options.workers` worker processes; restart one that dies until told to stop."""
    from prometheus_client import multiprocess

    with tempfile.TemporaryDirectory(prefix="asc-metrics-") as metrics_dir:
        env = dict(os.environ, PROMETHEUS_MULTIPROC_DIR=metrics_dir)
        if options.metrics_listen:  # before any worker starts: a busy port stops it all
            registry = CollectorRegistry()
            collector = multiprocess.MultiProcessCollector
            collector(registry, path=metrics_dir)  # type: ignore[no-untyped-call]
            start_metrics(options.metrics_listen, registry)
        commands = [[sys.executable, "-m", "extproc", "serve", "--worker",
                     "--workers", str(options.workers), "--config", str(options.config_path),
                     "--listen", worker_listen(options.listen, index, options.workers),
                     *(("--fast-door", worker_listen(options.fast_door, index,
                                                     options.workers))
                       if options.fast_door else ()),
                     "--drain-seconds", str(options.drain_seconds),
                     "--log-level", options.log_level]
                    for index in range(options.workers)]
        slots = [_WorkerSlot(subprocess.Popen(command, env=env), time.monotonic())
                 for command in commands]
        stopping = False

        def forward(signum: int, _frame: object) -> None:
            nonlocal stopping
            stopping = stopping or signum != signal.SIGHUP
            for slot in slots:
                if slot.process is not None and slot.process.poll() is None:
                    slot.process.send_signal(
                        signal.SIGTERM if signum == signal.SIGINT else signum)

        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(signum, forward)
        log_event(log, logging.INFO, "supervisor started", workers=options.workers,
                  listen=options.listen, metrics=options.metrics_listen)
        codes: list[int] = []
        while not stopping:
            for slot, command in zip(slots, commands, strict=True):
                _tend(slot, command, env, metrics_dir, stopping=lambda: stopping)
            time.sleep(_SUPERVISOR_POLL_S)
        codes = [slot.process.wait() for slot in slots if slot.process is not None]
    return max(codes, default=0)


def _tend(slot: _WorkerSlot, command: list[str], env: dict[str, str], metrics_dir: str,
          *, stopping: Callable[[], bool]) -> None:
    """Notice a dead worker (schedule its restart, drop its live gauges) or restart it."""
    from prometheus_client import multiprocess

    now = time.monotonic()
    if slot.process is not None:
        code = slot.process.poll()
        if code is None or stopping():
            return
        # Its `asc_credential_state` (livemax) must not outlive it in the merged metrics.
        multiprocess.mark_process_dead(slot.process.pid, metrics_dir)  # type: ignore[no-untyped-call]
        delay = slot.backoff.delay(now - slot.started_at)
        log_event(log, logging.ERROR, "worker exited; restarting it",
                  pid=slot.process.pid, code=code, delay_s=delay)
        slot.process = None
        slot.restart_at = now + delay
    if slot.restart_at is not None and now >= slot.restart_at and not stopping():
        slot.process = subprocess.Popen(command, env=env)
        slot.started_at = now
        slot.restart_at = None
