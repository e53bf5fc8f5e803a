"""Failover inside a residency zone, on a real Envoy with one emulator per provider x
region (each accepting only its own key), faults switched through the control API.

Zone eu: `oai-eu` (OpenAI, primary), `anth-eu` (Anthropic, fallback), `oai-eu2` (third,
beyond `failover.max_attempts`).
Zone us: `oai-us` (OpenAI); it must never receive a byte from the eu tenant.
"""

from __future__ import annotations

import contextlib
import json
import secrets
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
import yaml

from extproc.auth import hash_key
from extproc.config import load_config
from extproc.devstack import ManagedProcess, Stack, free_port
from extproc.envoy_bootstrap import EnvoyPorts, render_bootstrap
from extproc.money import cost_micro_usd
from extproc.secrets import Secret
from tests.conftest import PEPPER, Emulator, envoy_admin, provider_fingerprint, write_config
from tests.e2e.audit_check import assert_one_record
from tests.polling import wait_for
from tests.reliability.conftest import _replica_cluster, all_healthy

TENANT_KEY = "sk-canary-tenant-fo-" + secrets.token_hex(8)
KEYS = {name: f"sk-canary-provider-{name}-" + secrets.token_hex(8)
        for name in ("oai-eu", "anth-eu", "oai-eu2", "oai-us")}
KINDS = {"oai-eu": "openai", "anth-eu": "anthropic", "oai-eu2": "openai", "oai-us": "openai"}
ZONES = {"oai-eu": "eu", "anth-eu": "eu", "oai-eu2": "eu", "oai-us": "us"}
MAX_ATTEMPTS = 2
"""Fewer than the three eu deployments: the bound, not the zone's size, ends a request."""
FIRST_BYTE_TIMEOUT_MS = 1500
STREAM_PACE_MS = 300


def _document(ports: dict[str, int], redis_port: int, *, outlier_errors: int = 1000,
              retry_budget: tuple[int, int] = (20, 100)) -> dict[str, Any]:
    pepper = Secret(PEPPER)
    return {
        "version": 1,
        "auth": {"pepper": {"file": "pepper.txt"}},
        "redis": {"url": f"redis://127.0.0.1:{redis_port}/0"},
        # The routing policy's deployment breakers would move the choice away from a
        # primary these tests fail on purpose; Envoy's failover is what is tested here.
        "deployment_health": {"failures": 1000},
        "failover": {"max_attempts": MAX_ATTEMPTS,
                     "first_byte_timeout_ms": FIRST_BYTE_TIMEOUT_MS,
                     # Faults here are deliberate and many: keep every deployment in play
                     # (unless a test is about ejection).
                     "outlier_consecutive_errors": outlier_errors,
                     "outlier_ejection_s": 1,
                     # (percent, always allowed): tests that are not about the budget run
                     # concurrent failovers without hitting it.
                     "retry_budget_percent": retry_budget[0],
                     "min_retry_concurrency": retry_budget[1]},
        "credentials": {f"{name}-1": {"env": f"FO_KEY_{name.replace('-', '_').upper()}"}
                        for name in KEYS},
        "providers": {
            name: {"kind": KINDS[name], "base_url": f"http://127.0.0.1:{ports[name]}",
                   "region": f"{ZONES[name]}-{name}", "zone": ZONES[name],
                   "cluster": name.replace("-", "_"), "credentials": [f"{name}-1"]}
            for name in KEYS
        },
        "models": {"gpt-4o-mini": {
            "price": {"input_per_mtok": 0.15, "output_per_mtok": 0.6},
            # us first in config order: residency, not order, keeps eu traffic in eu.
            "deployments": [{"provider": "oai-us", "model": "gpt-4o-mini-us"},
                            {"provider": "oai-eu", "model": "gpt-4o-mini-eu"},
                            {"provider": "anth-eu", "model": "claude-haiku-eu"},
                            {"provider": "oai-eu2", "model": "gpt-4o-mini-eu2"}],
        }},
        "tenants": {"acme": {"zone": "eu",
                             "keys": [{"id": "acme-fo", "hash": hash_key(pepper, TENANT_KEY)}],
                             "models": ["gpt-4o-mini"],
                             # A budget: every request reserves and settles.
                             "budgets": [{"scope": "tenant", "window": "day",
                                          "limit_usd": 100}]}},
    }


@dataclass
class FailoverStack:
    stack: Stack
    emulators: dict[str, Emulator]
    extproc: ManagedProcess
    listen_port: int
    client: httpx.Client
    admin_socket: Path
    metrics_port: int = 0
    redis_port: int = 0

    def clear(self) -> None:
        for emulator in self.emulators.values():
            emulator.clear()

    def chat(self, path: str = "/v1/chat/completions", *,
             headers: dict[str, str] | None = None, **extra: Any) -> httpx.Response:
        body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Hi"}],
                **extra}
        if path == "/v1/messages":
            body.setdefault("max_tokens", 64)
        return self.client.post(path, json=body, headers={
            "authorization": f"Bearer {TENANT_KEY}", **(headers or {})})

    def finished(self, request_id: str) -> dict[str, Any]:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            for line in self.extproc.log_text().splitlines():
                with contextlib.suppress(ValueError):
                    event = json.loads(line)
                    if (isinstance(event, dict) and event.get("msg") == "request finished"
                            and event.get("request_id") == request_id):
                        return event
            time.sleep(0.05)
        raise AssertionError(f"no record for {request_id}")


def _start(stack: Stack, workdir: Path, *, workers: int = 1, outlier_errors: int = 1000,
           retry_budget: tuple[int, int] = (20, 100),
           edit: Callable[[dict[str, Any]], None] | None = None,
           replicas: int = 1) -> FailoverStack:
    emulators: dict[str, Emulator] = {}
    for name, key in KEYS.items():
        # oai-eu paces its stream, so that its first chunk surely reaches the client
        # before a mid-stream fault strikes.
        extra = ("--chunk-delay-ms", str(STREAM_PACE_MS)) if name == "oai-eu" else ()
        process, port = stack.start_emulator([key], extra_args=extra)
        emulators[name] = Emulator(port, process)
    _, redis_port = stack.start_redis()
    document = _document({n: e.port for n, e in emulators.items()}, redis_port,
                         outlier_errors=outlier_errors, retry_budget=retry_budget)
    if edit is not None:
        edit(document)
    config_path: Path = write_config(workdir / "config", document)
    env = dict(stack.env, **{f"FO_KEY_{n.replace('-', '_').upper()}": k
                             for n, k in KEYS.items()})
    extproc, extproc_port, metrics_port = stack.start_extproc(config_path, env=env,
                                                              workers=workers)
    listen_port, admin_socket = free_port(), stack.admin_socket()
    ports = EnvoyPorts(listen_port=listen_port, admin_socket=str(admin_socket),
                       extproc_port=extproc_port)
    bootstrap = render_bootstrap(load_config(config_path), ports)
    if replicas > 1:  # one Envoy balancing ext_proc streams over several processes
        extra_ports = [stack.start_extproc(config_path, env=env, name=f"extproc-{index}")[1]
                       for index in range(1, replicas)]
        _replica_cluster([extproc_port, *extra_ports])(bootstrap)
    stack.start_envoy(yaml.safe_dump(bootstrap, sort_keys=False),
                      listen_port=listen_port, admin_socket=admin_socket)
    if replicas > 1:  # Envoy's first health checks pass before streams reach every one
        assert wait_for(lambda: all_healthy(stack, admin_socket, replicas), timeout=20)
    client = httpx.Client(base_url=f"http://127.0.0.1:{listen_port}", timeout=30)
    return FailoverStack(stack, emulators, extproc, listen_port, client, admin_socket,
                         metrics_port, redis_port)


@pytest.fixture(scope="module")
def fo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FailoverStack]:
    workdir = tmp_path_factory.mktemp("failover")
    with Stack(workdir) as stack:
        started = _start(stack, workdir)
        with started.client:
            yield started


@pytest.fixture
def clean(fo: FailoverStack) -> FailoverStack:
    fo.clear()
    return fo


def _auth_of(record: dict[str, Any]) -> str:
    headers = record["headers"]
    return str(headers.get("authorization") or headers.get("x-api-key") or "")


def _assert_own_keys(fo: FailoverStack) -> None:
    """Each provider saw only its own key, and only its own key header."""
    for name, emulator in fo.emulators.items():
        for record in emulator.requests():
            fingerprint = provider_fingerprint(KEYS[name])
            if KINDS[name] == "anthropic":
                assert record["headers"]["x-api-key"] == fingerprint
                assert "authorization" not in record["headers"]
            else:
                assert record["headers"]["authorization"] == f"Bearer {fingerprint}"
                assert "x-api-key" not in record["headers"]


@pytest.mark.parametrize("fault", [{"status": 503}, {"reset": True},
                                   {"delay_ms": 4 * FIRST_BYTE_TIMEOUT_MS}],
                         ids=["503", "reset", "stall"])
def test_primary_fails_request_succeeds_on_anthropic_fallback(
        clean: FailoverStack, fault: dict[str, Any]) -> None:
    clean.emulators["oai-eu"].queue_fault(**fault)
    response = clean.chat()
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["object"] == "chat.completion"  # the client's own dialect
    assert response.headers["x-asc-provider"] == "anth-eu"
    assert response.headers["x-asc-region"] == "eu-anth-eu"
    (anthropic_call,) = clean.emulators["anth-eu"].requests()
    assert anthropic_call["path"] == "/v1/messages"
    sent = json.loads(anthropic_call["body"])
    assert sent["model"] == "claude-haiku-eu"
    assert "anthropic-version" in anthropic_call["headers"]
    assert len(clean.emulators["oai-eu"].requests()) == 1
    assert clean.emulators["oai-us"].requests() == []
    assert clean.emulators["oai-eu2"].requests() == []
    _assert_own_keys(clean)
    record = clean.finished(response.headers["x-asc-request-id"])
    attempts = record["attempts"]
    assert [(a["attempt"], a["provider"], a["region"]) for a in attempts] == [
        (1, "oai-eu", "eu-oai-eu"), (2, "anth-eu", "eu-anth-eu")]
    expected_left = {"503": "status 503", "reset": "reset", "stall": "timeout"}
    assert attempts[0]["left"] == expected_left[
        "503" if "status" in fault else "reset" if "reset" in fault else "stall"]
    assert attempts[1]["status"] == 200
    assert attempts[1]["left"] is None
    assert all(isinstance(a["latency_ms"], float) for a in attempts)
    assert record["provider"] == "anth-eu"
    assert record["status"] == 200
    audit = assert_one_record(
        clean, response.headers["x-asc-request-id"], status=200, route__provider="anth-eu",
        model_served="claude-haiku-eu", credential="anth-eu-1@1", front_door="openai")
    assert [(a["attempt"], a["provider"], a["cluster"], a["status"] == 200, a["left"])
            for a in audit["attempts"]] == [
        (1, "oai-eu", "oai_eu", False, attempts[0]["left"]), (2, "anth-eu", "anth_eu", True, None)]
    assert audit["route"]["served_reason"].endswith("; served by anth-eu (attempt 2)")


def test_streamed_fallback_speaks_the_clients_dialect(clean: FailoverStack) -> None:
    clean.emulators["oai-eu"].queue_fault(status=529)
    with clean.client.stream("POST", "/v1/chat/completions", json={
            "model": "gpt-4o-mini", "stream": True,
            "messages": [{"role": "user", "content": "Hi"}]},
            headers={"authorization": f"Bearer {TENANT_KEY}"}) as response:
        text = response.read().decode()
    assert response.status_code == 200
    assert response.headers["x-asc-provider"] == "anth-eu"
    events = [line[6:] for line in text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    assert json.loads(events[0])["object"] == "chat.completion.chunk"
    (call,) = clean.emulators["anth-eu"].requests()
    assert json.loads(call["body"])["stream"] is True
    _assert_own_keys(clean)


def test_every_eu_deployment_down_gives_503_json_and_us_gets_nothing(
        clean: FailoverStack) -> None:
    for name in ("oai-eu", "anth-eu", "oai-eu2"):
        clean.emulators[name].queue_fault(status=503, count=10)
    # A client cannot raise the bound: its own retry headers are removed (0040).
    response = clean.chat(headers={"x-envoy-max-retries": "5", "x-envoy-retry-on": "5xx"})
    assert response.status_code == 503
    error = response.json()["error"]
    assert error["message"] == (
        "Every deployment of model 'gpt-4o-mini' in residency zone 'eu' failed "
        f"({MAX_ATTEMPTS} attempts); no deployment outside the zone was tried.")
    assert clean.emulators["oai-us"].requests() == []
    assert len(clean.emulators["oai-eu"].requests()) == 1
    assert len(clean.emulators["anth-eu"].requests()) == 1
    assert clean.emulators["oai-eu2"].requests() == []  # bounded: no retry storm
    record = clean.finished(response.headers["x-asc-request-id"])
    assert len(record["attempts"]) == MAX_ATTEMPTS
    assert {a["provider"] for a in record["attempts"]} == {"oai-eu", "anth-eu"}
    audit = assert_one_record(clean, response.headers["x-asc-request-id"], status=503,
                              error="gateway_unavailable")
    assert [a["provider"] for a in audit["attempts"]] == [
        a["provider"] for a in record["attempts"]]


def test_anthropic_front_door_gets_its_dialect_back(clean: FailoverStack) -> None:
    clean.emulators["oai-eu"].queue_fault(status=500)
    response = clean.chat("/v1/messages")
    assert response.status_code == 200, response.text
    assert response.json()["type"] == "message"
    assert response.headers["x-asc-provider"] == "anth-eu"
    _assert_own_keys(clean)


def _stream(fo: FailoverStack, path: str) -> tuple[httpx.Response, str, Exception | None]:
    body: dict[str, Any] = {"model": "gpt-4o-mini", "stream": True,
                            "messages": [{"role": "user", "content": "Hi"}]}
    if path == "/v1/messages":
        body["max_tokens"] = 64
    chunks: list[bytes] = []
    failure: Exception | None = None
    with fo.client.stream("POST", path, json=body,
                          headers={"authorization": f"Bearer {TENANT_KEY}"}) as response:
        try:
            chunks.extend(response.iter_bytes())
        except httpx.HTTPError as exc:
            failure = exc
    return response, b"".join(chunks).decode(), failure


def _streamed_cost(record: dict[str, Any]) -> int:
    """What a cut stream is charged: the prompt estimate and the deltas that were seen,
    at gpt-4o-mini's price (0.15 / 0.60 USD per Mtok), each part rounded up."""
    assert record["estimated_input_tokens"] > 0
    return (cost_micro_usd(record["estimated_input_tokens"], 150_000)
            + cost_micro_usd(record["streamed_tokens"], 600_000))


def test_stream_reset_after_first_byte_is_not_a_silent_200(clean: FailoverStack) -> None:
    """After the first byte no failover is possible. (Before it, a reset is retried even
    after the provider's headers: measured, Envoy fails over while the router-level
    ext_proc still holds the first chunk.) A provider reset mid-stream: Envoy
    resets the client's stream (measured: HTTP/1.1 ends without its last chunk), so the
    client sees a transport error, never a complete 200; the record is charged what was
    streamed (prompt estimate + deltas seen)."""
    clean.emulators["oai-eu"].queue_fault(reset_after_chunks=2)
    response, text, failure = _stream(clean, "/v1/chat/completions")
    assert response.status_code == 200
    assert text.startswith('data: {"id":"chatcmpl-emu-')  # the first chunk got through
    assert isinstance(failure, httpx.RemoteProtocolError), (text, failure)
    assert "[DONE]" not in text
    assert clean.emulators["anth-eu"].requests() == []
    record = clean.finished(response.headers["x-asc-request-id"])
    assert record["aborted"] is True
    assert record["streamed_tokens"] == 1
    assert len(record["attempts"]) == 1
    assert record["charged_micro_usd"] == _streamed_cost(record)


@pytest.mark.parametrize(("path", "expected"), [
    ("/v1/chat/completions",
     'data: {"error": {"message": "The provider ended the stream before it was complete; '
     'the answer is cut short.", "type": "server_error", "param": null, '
     '"code": "stream_interrupted"}}\n\n'),
    ("/v1/messages",
     'event: error\ndata: {"type": "error", "error": {"type": "api_error", "message": '
     '"The provider ended the stream before it was complete; the answer is cut short."}}'
     '\n\n'),
], ids=["openai", "anthropic"])
def test_stream_ended_early_gets_an_error_event(clean: FailoverStack, path: str,
                                                expected: str) -> None:
    """A provider that ends its stream cleanly but early (no [DONE] / message_stop) must
    not look like a complete answer: the client gets an error event in its dialect."""
    clean.emulators["oai-eu"].queue_fault(end_after_chunks=2)
    response, text, failure = _stream(clean, path)
    assert response.status_code == 200
    assert failure is None
    assert text.endswith(expected), text
    record = clean.finished(response.headers["x-asc-request-id"])
    assert record["stream_truncated"] is True
    assert record["streamed_tokens"] == 1
    assert record["charged_micro_usd"] == _streamed_cost(record)


def test_failover_with_two_extproc_workers(tmp_path: Path) -> None:
    """Both ext_proc streams of a request (router level and per attempt) reach the same
    worker process: Envoy sends them over its one connection per worker thread to the
    extproc cluster. Measured with 2 Envoy threads and 2 extproc workers."""
    with Stack(tmp_path / "stack") as stack:
        two = _start(stack, tmp_path, workers=2)
        with two.client:
            two.emulators["oai-eu"].queue_fault(status=503, count=40)

            def one_client(_: int) -> list[tuple[int, str | None]]:
                answers = []
                for _ in range(10):  # a new connection each time: both Envoy threads
                    with httpx.Client(base_url=two.client.base_url, timeout=30) as client:
                        response = client.post(
                            "/v1/chat/completions",
                            json={"model": "gpt-4o-mini",
                                  "messages": [{"role": "user", "content": "Hi"}]},
                            headers={"authorization": f"Bearer {TENANT_KEY}"})
                    answers.append((response.status_code, response.headers.get("x-asc-provider")))
                return answers

            with ThreadPoolExecutor(4) as pool:
                answers = [a for batch in pool.map(one_client, range(4)) for a in batch]
    assert answers == [(200, "anth-eu")] * 40


def test_failover_when_attempt_streams_reach_other_processes(tmp_path: Path) -> None:
    """One Envoy balancing ext_proc streams over three processes (round robin): a
    fallback attempt landing where the request's Flight is not is rebuilt from the
    forwarded metadata and the client's body (decision 0135), with the fallback's own
    key, path and dialect; the client sees neither the difference nor `x-asc-attempt`."""
    with Stack(tmp_path / "stack") as stack:
        three = _start(stack, tmp_path, replicas=3)
        with three.client:
            three.emulators["oai-eu"].queue_fault(status=503, count=12)
            responses = [three.chat(max_tokens=7) for _ in range(12)]
            ids = {r.headers.get("x-asc-request-id") for r in responses}

            def records() -> list[dict[str, Any]]:
                found = []
                for process in stack.processes:
                    if process.name.startswith("extproc"):
                        for line in process.log_text().splitlines():
                            with contextlib.suppress(ValueError):
                                event = json.loads(line)
                                if (isinstance(event, dict)
                                        and event.get("msg") == "request finished"
                                        and event.get("request_id") in ids):
                                    found.append(event)
                return found

            assert wait_for(lambda: len(records()) == 12, timeout=10)
            logs = "".join(p.log_text() for p in stack.processes
                           if p.name.startswith("extproc"))
            finished = records()
            assert [(r.status_code, r.headers.get("x-asc-provider"),
                     r.headers.get("x-asc-credential")) for r in responses] == [
                (200, "anth-eu", "anth-eu-1@1")] * 12
            assert not any("x-asc-attempt" in r.headers for r in responses)
            assert all(r.json()["object"] == "chat.completion" for r in responses)
            calls = three.emulators["anth-eu"].requests()
            assert len(calls) == 12
            for call in calls:
                assert call["path"] == "/v1/messages"
                sent = json.loads(call["body"])
                assert (sent["model"], sent["max_tokens"]) == ("claude-haiku-eu", 7)
                assert sent["messages"] == [{"role": "user", "content": "Hi"}]
            assert len(three.emulators["oai-eu"].requests()) == 12
            assert three.emulators["oai-us"].requests() == []
            assert three.emulators["oai-eu2"].requests() == []
            _assert_own_keys(three)
            assert len(finished) == 12
            for record in finished:
                first, second = record["attempts"]
                assert (first["attempt"], first["provider"]) == (1, "oai-eu")
                assert first["left"] in ("status 503", "retried")  # retried: made elsewhere
                assert (second["attempt"], second["provider"], second["status"],
                        second["left"], second["credential"]) == (
                    2, "anth-eu", 200, None, "anth-eu-1@1")
                assert record["provider"] == "anth-eu"
            assert "could not be retried" not in logs


def test_ejected_primary_traffic_goes_to_the_fallback_and_comes_back(tmp_path: Path) -> None:
    """Outlier detection ejects a failing deployment: attempt 1 then lands on the fallback
    directly (no failed attempt first) and must be read as the fallback's answer (an
    Anthropic body translated back, its name in the headers). Once the primary is healthy
    and its ejection (1 s here) is over, it serves again."""
    with Stack(tmp_path / "stack") as stack:
        ejecting = _start(stack, tmp_path, outlier_errors=2)
        with ejecting.client:
            ejecting.emulators["oai-eu"].queue_fault(status=503, count=2)
            for _ in range(2):
                assert ejecting.chat().headers["x-asc-provider"] == "anth-eu"
            ejected = ejecting.chat()
            assert ejected.status_code == 200
            assert ejected.json()["object"] == "chat.completion"
            assert ejected.headers["x-asc-provider"] == "anth-eu"
            record = ejecting.finished(ejected.headers["x-asc-request-id"])
            assert [(a["attempt"], a["provider"], a["status"]) for a in record["attempts"]] \
                == [(1, "anth-eu", 200)]
            assert len(ejecting.emulators["oai-eu"].requests()) == 2
            deadline = time.monotonic() + 15
            while ejecting.chat().headers["x-asc-provider"] != "oai-eu":
                assert time.monotonic() < deadline, "the primary never got traffic back"
                time.sleep(0.1)


def test_rate_limited_everywhere_gives_the_client_the_retry_after(clean: FailoverStack) -> None:
    """A 429 deployment is not retried within the request (each deployment once); when
    every attempt was refused the client learns when to come back."""
    clean.emulators["oai-eu"].queue_fault(status=429, retry_after=7)
    clean.emulators["anth-eu"].queue_fault(status=429, retry_after=9)
    response = clean.chat()
    assert response.status_code == 503
    assert response.headers["retry-after"] == "9"  # the last attempt's
    assert len(clean.emulators["oai-eu"].requests()) == 1
    assert len(clean.emulators["anth-eu"].requests()) == 1
    record = clean.finished(response.headers["x-asc-request-id"])
    assert [a["left"] for a in record["attempts"]] == ["status 429", "status 429"]


def test_retry_budget_refuses_retries_beyond_it(tmp_path: Path) -> None:
    """With a retry budget of 0 % and no retries always allowed, Envoy refuses the retry
    (its `upstream_rq_retry_overflow` counts it): the client gets the primary's error
    after one attempt, and the fallback receives nothing."""
    with Stack(tmp_path / "stack") as stack:
        tight = _start(stack, tmp_path, retry_budget=(0, 0))
        with tight.client:
            tight.emulators["oai-eu"].queue_fault(status=503)
            response = tight.chat()
            stats = envoy_admin(tight.admin_socket, "GET",
                                "/stats?filter=asc_failover.gpt-4o-mini.oai-eu.upstream_rq_retry")
        assert response.status_code == 502
        assert response.json()["error"]["type"] == "upstream_error"
        assert tight.emulators["anth-eu"].requests() == []
        record = tight.finished(response.headers["x-asc-request-id"])
        assert [a["left"] for a in record["attempts"]] == ["status 503"]
    counters = dict(line.split(": ") for line in stats.text.splitlines())
    assert counters["cluster.asc_failover.gpt-4o-mini.oai-eu.upstream_rq_retry_overflow"] == "1"
    assert counters["cluster.asc_failover.gpt-4o-mini.oai-eu.upstream_rq_retry"] == "0"


def test_refused_connection_fails_over(tmp_path: Path) -> None:
    """The primary's emulator is stopped: its port refuses connections."""
    with Stack(tmp_path / "stack") as stack:
        down = _start(stack, tmp_path)
        with down.client:
            down.emulators["oai-eu"].process.stop()
            response = down.chat()
            assert response.status_code == 200, response.text
            assert response.headers["x-asc-provider"] == "anth-eu"
            record = down.finished(response.headers["x-asc-request-id"])
    # Envoy runs upstream filters only once connected: the refused attempt is known by
    # the gap in the attempt numbers.
    assert [(a["attempt"], a["provider"], a["status"], a["left"])
            for a in record["attempts"]] == [
        (1, "oai-eu", None, "connect failure"), (2, "anth-eu", 200, None)]


def test_every_eu_deployment_refusing_connections_gives_the_zone_503(tmp_path: Path) -> None:
    """No provider answers at all (Envoy's own 503): still the zone's JSON 503, in the
    client's dialect, and the us emulator received nothing."""
    with Stack(tmp_path / "stack") as stack:
        down = _start(stack, tmp_path)
        with down.client:
            for name in ("oai-eu", "anth-eu", "oai-eu2"):
                down.emulators[name].process.stop()
            response = down.chat("/v1/messages")
            assert down.emulators["oai-us"].requests() == []
    assert response.status_code == 503
    assert response.json() == {"type": "error", "error": {
        "type": "overloaded_error",
        "message": "Every deployment of model 'gpt-4o-mini' in residency zone 'eu' failed; "
                   "no deployment outside the zone was tried."}}


def test_a_fallback_the_routing_policy_does_not_allow_is_never_tried(tmp_path: Path) -> None:
    """The tenant's allow-list leaves out anth-eu, the next level of the config-order
    cluster after the primary: the request goes to the cluster of its routing decision's
    order (oai-eu, then oai-eu2; decision 0067), so the retry skips the disallowed
    provider instead of ending the request."""
    def allow_openai_only(document: dict[str, Any]) -> None:
        document["tenants"]["acme"]["route_policy"] = {"providers": ["oai-eu", "oai-eu2"]}

    with Stack(tmp_path / "stack") as stack:
        narrow = _start(stack, tmp_path, edit=allow_openai_only)
        with narrow.client:
            narrow.emulators["oai-eu"].queue_fault(status=503)
            response = narrow.chat()
            assert narrow.emulators["anth-eu"].requests() == []
            assert narrow.emulators["oai-us"].requests() == []
            assert len(narrow.emulators["oai-eu2"].requests()) == 1
            record = narrow.finished(response.headers["x-asc-request-id"])
    assert response.status_code == 200, response.text
    assert response.headers["x-asc-provider"] == "oai-eu2"
    assert [(a["attempt"], a["provider"], a["status"]) for a in record["attempts"]] == [
        (1, "oai-eu", 503), (2, "oai-eu2", 200)]


def test_attempts_follow_the_listed_fallback_order(tmp_path: Path) -> None:
    """The tenant lists oai-eu2 before anth-eu (config order is the reverse), with three
    attempts: the primary and oai-eu2 fail, anth-eu answers; the us emulator gets
    nothing."""
    def eu2_first(document: dict[str, Any]) -> None:
        document["failover"]["max_attempts"] = 3
        document["tenants"]["acme"]["route_policy"] = {"fallbacks": ["oai-eu2", "anth-eu"]}

    with Stack(tmp_path / "stack") as stack:
        ordered = _start(stack, tmp_path, edit=eu2_first)
        with ordered.client:
            ordered.emulators["oai-eu"].queue_fault(status=503)
            ordered.emulators["oai-eu2"].queue_fault(reset=True)
            response = ordered.chat()
            assert ordered.emulators["oai-us"].requests() == []
            record = ordered.finished(response.headers["x-asc-request-id"])
    assert response.status_code == 200, response.text
    assert response.headers["x-asc-provider"] == "anth-eu"
    assert [(a["attempt"], a["provider"], a["left"]) for a in record["attempts"]] == [
        (1, "oai-eu", "status 503"), (2, "oai-eu2", "reset"), (3, "anth-eu", None)]


def _deployment_states(fo: FailoverStack) -> dict[str, str]:
    """`asc_deployment_state` as exported: deployment -> the state whose gauge is 1."""
    text = httpx.get(f"http://127.0.0.1:{fo.metrics_port}/metrics", timeout=5).text
    states: dict[str, str] = {}
    for line in text.splitlines():
        if line.startswith("asc_deployment_state{") and line.endswith(" 1.0"):
            labels = dict(part.split("=", 1) for part in line[line.index("{") + 1:
                                                              line.index("}")].split(","))
            states[labels["deployment"].strip('"')] = labels["state"].strip('"')
    return states


def test_each_attempt_feeds_the_breaker_of_the_deployment_it_hit(tmp_path: Path) -> None:
    """Decision 0066. oai-eu (the choice) and anth-eu (its first fallback) both answer
    503 twice; oai-eu2 answers. The clients get 200 both times, yet each failing
    deployment's breaker opens from the attempts Envoy's retries made at it (anth-eu was
    never the routing choice), oai-eu2's 200s close no one else's breaker, the opens
    reach the shared Redis hash, and the next request is routed to oai-eu2 directly."""
    def three_attempts_two_failures(document: dict[str, Any]) -> None:
        document["failover"]["max_attempts"] = 3
        document["deployment_health"] = {"failures": 2, "cooldown_s": 300}

    with Stack(tmp_path / "stack") as stack:
        fo = _start(stack, tmp_path, edit=three_attempts_two_failures)
        with fo.client:
            fo.emulators["oai-eu"].queue_fault(status=503, count=2)
            fo.emulators["anth-eu"].queue_fault(status=503, count=2)
            for _ in range(2):
                response = fo.chat()
                assert response.status_code == 200, response.text
                assert response.headers["x-asc-provider"] == "oai-eu2"
                record = fo.finished(response.headers["x-asc-request-id"])
                assert [(a["provider"], a["status"]) for a in record["attempts"]] == [
                    ("oai-eu", 503), ("anth-eu", 503), ("oai-eu2", 200)]
            assert _deployment_states(fo) == {"oai-eu/gpt-4o-mini-eu": "open",
                                              "anth-eu/claude-haiku-eu": "open",
                                              "oai-eu2/gpt-4o-mini-eu2": "closed"}
            shared = redis.Redis(host="127.0.0.1", port=fo.redis_port)
            deadline = time.monotonic() + 10
            while set(shared.hgetall("asc:deploy:health")) != {
                    b"oai-eu/gpt-4o-mini-eu", b"anth-eu/claude-haiku-eu"}:
                assert time.monotonic() < deadline, shared.hgetall("asc:deploy:health")
                time.sleep(0.1)
            routed = fo.chat()
            assert routed.status_code == 200
            assert routed.headers["x-asc-provider"] == "oai-eu2"
            record = fo.finished(routed.headers["x-asc-request-id"])
            assert record["attempts"] is None  # no fallback left in the zone: plain path
            assert len(fo.emulators["oai-eu"].requests()) == 2
            assert len(fo.emulators["anth-eu"].requests()) == 2
            assert fo.emulators["oai-us"].requests() == []



@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
def test_responses_fail_over_from_passthrough_to_translation(clean: FailoverStack,
                                                             stream: bool) -> None:
    """The Responses API passes through to OpenAI and is translated for Anthropic: a
    failover between them answers in the Responses shape, from the fallback's usage."""
    clean.emulators["oai-eu"].queue_fault(status=503)
    response = clean.client.post("/v1/responses", json={
        "model": "gpt-4o-mini", "input": "Hi", "stream": stream},
        headers={"authorization": f"Bearer {TENANT_KEY}"})
    assert response.status_code == 200, response.text
    assert response.headers["x-asc-provider"] == "anth-eu"
    if stream:
        kinds = [json.loads(line[6:])["type"] for line in response.text.splitlines()
                 if line.startswith("data: ")]
        assert (kinds[0], kinds[-1]) == ("response.created", "response.completed")
    else:
        body = response.json()
        assert (body["object"], body["status"]) == ("response", "completed")
        assert body["output"][0]["content"][0]["text"] == "Hello from the emulator."
    [first] = clean.emulators["oai-eu"].requests()
    assert first["path"] == "/v1/responses"
    (call,) = clean.emulators["anth-eu"].requests()
    assert call["path"] == "/v1/messages"
    assert json.loads(call["body"])["model"] == "claude-haiku-eu"
    _assert_own_keys(clean)
