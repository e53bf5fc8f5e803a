"""Envelope-encrypted provider keys through real Envoy, extproc, emulator and redis-server.

Every test runs on its own private stack with a file KEK, and drives the keyring the way
an operator does: `extproc keys init-kek|add|list|rotate` (in-process, the secret on
standard input), while clients talk to Envoy and the emulator checks which provider key
reached it (its recordings show only `key_fingerprint(key)`).
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import os
import re
import stat
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from extproc import cli
from extproc.credentials.kek import init_kek_file
from extproc.devstack import Stack
from extproc.emulator.app import key_fingerprint
from extproc.secrets import Secret
from tests.conftest import (
    ACME_KEY,
    CANARIES,
    CHAT,
    GLOBEX_KEY,
    PROVIDER_KEY_US,
    Gateway,
    chat_body,
    gateway_config,
    provider_env,
    start_gateway,
    write_config,
)
from tests.polling import wait_for

CREDENTIAL = "ring-eu"
VERSIONS_KEY = f"asc:cred:{{global/{CREDENTIAL}}}:versions"
UNAVAILABLE = {"error": {"message": "No usable credential for the selected provider.",
                         "type": "service_unavailable", "param": None,
                         "code": "gateway_unavailable"}}
REJECTED = {"error": {"message": "The provider rejected the gateway's credential.",
                      "type": "upstream_error", "param": None, "code": "provider_error"}}
FOLLOW_BOUND_S = 10.0
"""A generous bound for the gateway to follow a key change (DESIGN §3 says about a second,
by pub/sub or `state_ttl_s`): the tests pace themselves by what the gateway serves, and
this only turns a gateway that never follows into a failure instead of a hang."""


def canary_key(name: str) -> str:
    return f"sk-canary-ring-{name}-" + os.urandom(12).hex()


# -- the `extproc keys` CLI, in-process ------------------------------------------------


@dataclass
class CliResult:
    code: int
    out: str
    err: str


@dataclass
class KeysCli:
    """`extproc keys ...` for one config; remembers every output for the leak checks."""

    config: Path
    outputs: list[str] = field(default_factory=list)

    def __call__(self, *args: str, secret: str | None = None) -> CliResult:
        out, err = io.StringIO(), io.StringIO()
        saved_stdin = sys.stdin
        sys.stdin = io.StringIO("" if secret is None else secret + "\n")
        try:
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                try:
                    code = cli.main(["keys", *args, "--config", str(self.config)])
                except SystemExit as exc:  # argparse, or a `raise SystemExit(message)`
                    if isinstance(exc.code, int):
                        code = exc.code
                    else:
                        code = 1
                        err.write(str(exc.code))
        finally:
            sys.stdin = saved_stdin
        result = CliResult(code, out.getvalue(), err.getvalue())
        self.outputs.extend((result.out, result.err))
        return result

    def ok(self, *args: str, secret: str | None = None) -> str:
        result = self(*args, secret=secret)
        assert result.code == 0, result
        return result.out


def list_rows(output: str) -> dict[tuple[str, int], tuple[str, str, str]]:
    """`keys list` rows of keyring records: (scope/credential, version) -> (state,
    fingerprint, kek id)."""
    rows = {}
    for line in output.splitlines()[1:]:
        match = _ROW.match(line)
        if match:
            rows[(match["name"], int(match["version"]))] = (
                match["state"], match["fingerprint"], match["kek"])
    return rows


_ROW = re.compile(r"^(?P<name>\S+)\s+(?P<version>\d+)  (?P<state>\S.*?)\s+"
                  r"(?P<fingerprint>sha256:[0-9a-f]{12})\s+(?P<kek>\S+)\s+(?:v\d+|-)$")


# -- stacks -----------------------------------------------------------------------------


def keyring_document(redis_port: int, *, secrets: dict[str, Any] | None = None,
                     change: Callable[[dict[str, Any]], None] | None = None
                     ) -> Callable[[int], dict[str, Any]]:
    """The tests' gateway config with provider emu-eu on keyring credential `ring-eu`."""

    def document(emulator_port: int) -> dict[str, Any]:
        doc = gateway_config(emulator_port)
        doc["redis"] = {"url": f"redis://127.0.0.1:{redis_port}/0", "timeout_ms": 500}
        doc["secrets"] = {"kek": {"backend": "file", "path": "kek.key"}, **(secrets or {})}
        doc["credentials"] = {CREDENTIAL: {"keyring": True},
                              "emu-us-1": {"env": "TEST_PROVIDER_KEY_US"}}
        doc["providers"]["emu-eu"]["credentials"] = [CREDENTIAL]
        if change is not None:
            change(doc)
        return doc

    return document


@dataclass
class KeyringStack:
    stack: Stack
    redis_port: int
    keys: KeysCli
    document: Callable[[int], dict[str, Any]]
    gateway: Gateway | None = None

    @property
    def config_dir(self) -> Path:
        return self.stack.workdir / "config"

    def start(self) -> Gateway:
        self.gateway = start_gateway(self.stack, self.config_dir, document=self.document)
        return self.gateway

    def redis(self) -> redis.Redis:
        return redis.Redis(port=self.redis_port, decode_responses=True)


def prepare(stack: Stack, document: Callable[[int], dict[str, Any]],
            redis_port: int) -> KeyringStack:
    """Config on disk (the emulator port is filled in by `start`) and a new file KEK."""
    config = write_config(stack.workdir / "config", document(1))
    keys = KeysCli(config)
    created = keys.ok("init-kek")
    kek = stack.workdir / "config" / "kek.key"
    assert created == f"created KEK file {kek} (mode 0600)\n"
    assert stat.S_IMODE(kek.stat().st_mode) == 0o600
    return KeyringStack(stack, redis_port, keys, document)


@pytest.fixture
def redis_port(stack: Stack) -> int:
    return stack.start_redis()[1]


def accept_keys(gateway: Gateway, *keys: str) -> None:
    response = gateway.emulator.client.put("/_emulator/keys", json={"keys": list(keys)})
    assert response.status_code == 204, response.text


def seen_keys(records: Iterable[dict[str, Any]]) -> list[str]:
    return [r["headers"].get("authorization", "") for r in records]


def bearer(key: str) -> str:
    return f"Bearer {key_fingerprint(key)}"


def metric_value(text: str, name: str, **labels: str) -> float:
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        metric, _, value = line.rpartition(" ")
        if metric == (f"{name}{{{want}}}" if want else name):
            return float(value)
    return 0.0


def redis_dump(port: int) -> str:
    """Every value in Redis, as text: for 'the plaintext is never in Redis'."""
    client = redis.Redis(port=port, decode_responses=True)
    parts = []
    for key in client.scan_iter("*"):
        kind = client.type(key)
        if kind == "hash":
            parts.append(json.dumps(client.hgetall(key)))
        elif kind == "string":
            parts.append(str(client.get(key)))
        parts.append(key)
    client.close()
    return "\n".join(parts)


def leaks(gateway: Gateway, secrets: Iterable[str], *, metrics_port: int | None = None,
          **more: str) -> list[tuple[str, str]]:
    metrics = httpx.get(f"http://127.0.0.1:{metrics_port or gateway.metrics_port}/metrics",
                        timeout=5).text
    assert "asc_" in metrics
    places = {
        "metrics": metrics,
        **{f"log {p.name}": p.log_text() for p in gateway.stack.processes},
        **more,
    }
    return [(where, secret[:20]) for where, text in places.items()
            for secret in (*secrets, *CANARIES) if secret in text]


def log_events(gateway: Gateway, message: str) -> list[dict[str, Any]]:
    events = []
    for process in gateway.stack.processes:
        if not process.name.startswith("extproc"):
            continue
        for line in process.log_text().splitlines():
            with contextlib.suppress(ValueError):
                event = json.loads(line)
                if isinstance(event, dict) and event.get("msg") == message:
                    events.append(event)
    return events


def access_logged(gateway: Gateway, *responses: httpx.Response) -> None:
    """Wait until Envoy's access log (flushed about once a second) holds these requests,
    so that a leak check reads every line they caused."""
    ids = [r.headers["x-asc-request-id"] for r in responses]
    assert wait_for(lambda: all(i in gateway.envoy.log_text() for i in ids)), ids


# -- a bounded background load ---------------------------------------------------------


@dataclass(frozen=True)
class Sample:
    sent: float
    status: int
    credential: str | None
    body: str
    done: float
    """When the answer was complete (epoch seconds, like `sent`)."""


class Load:
    """`threads` clients, each at `rate` requests/s, for `duration` seconds at most."""

    def __init__(self, base_url: str, *, threads: int = 4, rate: float = 25.0,
                 duration: float = 15.0) -> None:
        self._base_url = base_url
        self._rate = rate
        self._duration = duration
        self._lock = threading.Lock()
        self.samples: list[Sample] = []
        self._threads = [threading.Thread(target=self._run, daemon=True)
                         for _ in range(threads)]

    def __enter__(self) -> Load:
        for thread in self._threads:
            thread.start()
        return self

    def wait_for(self, condition: Callable[[list[Sample]], bool],
                 timeout: float = 30.0) -> int:
        """Poll until `condition(samples so far, in completion order)` holds; return how
        many samples there were then. Paces the test by the load's progress, not a clock."""
        deadline = time.monotonic() + timeout
        while True:
            with self._lock:
                samples = list(self.samples)
            if condition(samples):
                return len(samples)
            assert time.monotonic() < deadline, f"load condition not met ({len(samples)})"
            time.sleep(0.02)

    def __exit__(self, *_: object) -> None:
        for thread in self._threads:
            thread.join(self._duration + 20)
        assert not any(t.is_alive() for t in self._threads)

    def _run(self) -> None:
        body = json.dumps(chat_body()).encode()
        headers = {"content-type": "application/json", "authorization": f"Bearer {ACME_KEY}"}
        start = time.monotonic()
        with httpx.Client(base_url=self._base_url, timeout=10) as client:
            for i in range(int(self._rate * self._duration)):
                pause = start + i / self._rate - time.monotonic()
                if pause > 0:
                    time.sleep(pause)
                sent = time.time()
                try:
                    response = client.post(CHAT, content=body, headers=headers)
                    sample = Sample(sent, response.status_code,
                                    response.headers.get("x-asc-credential"), response.text,
                                    time.time())
                except httpx.HTTPError as exc:
                    sample = Sample(sent, -1, None, type(exc).__name__, time.time())
                with self._lock:
                    self.samples.append(sample)


# -- 1. keyring basics ---------------------------------------------------------------------


@pytest.mark.both_paths
def test_file_kek_keyring_serves_the_sealed_key_and_never_leaks_it(
        stack: Stack, redis_port: int) -> None:
    provider_key = canary_key("v1")
    ring = prepare(stack, keyring_document(redis_port), redis_port)
    added = ring.keys.ok("add", CREDENTIAL, secret=provider_key)
    fingerprint = Secret(provider_key).fingerprint()
    assert added == f"global/{CREDENTIAL}@1: active, fingerprint {fingerprint}\n"
    gateway = ring.start()
    accept_keys(gateway, provider_key, PROVIDER_KEY_US)

    response = gateway.chat()
    assert response.status_code == 200, response.text
    assert response.headers["x-asc-credential"] == f"{CREDENTIAL}@1"
    assert response.headers["x-asc-provider"] == "emu-eu"
    [record] = gateway.emulator.requests()
    assert record["headers"]["authorization"] == bearer(provider_key)
    # The static credential of the other provider still works next to the keyring.
    other = gateway.chat(key=GLOBEX_KEY)
    assert other.status_code == 200, other.text
    assert other.headers["x-asc-credential"] == "emu-us-1@1"
    assert seen_keys(gateway.emulator.requests())[1] == bearer(PROVIDER_KEY_US)

    listing = ring.keys.ok("list")
    kek_id = list_rows(listing)[(f"global/{CREDENTIAL}", 1)][2]
    assert list_rows(listing) == {(f"global/{CREDENTIAL}", 1): ("active", fingerprint, kek_id)}
    assert kek_id.startswith("file:sha256:")
    assert "emu-us-1" in listing
    assert "static (env TEST_PROVIDER_KEY_US)" in listing

    # The sealed record is what Redis holds: no plaintext, the fingerprint, the KEK id.
    stored = json.loads(ring.redis().hget(VERSIONS_KEY, "1") or "{}")
    assert (stored["format"], stored["kek_id"], stored["fingerprint"]) == (1, kek_id,
                                                                           fingerprint)
    access_logged(gateway, response, other)
    found = leaks(gateway, [provider_key],
                  responses="\n".join(f"{r.text}\n{r.headers}" for r in (response, other)),
                  cli="\n".join(ring.keys.outputs),
                  redis=redis_dump(redis_port),
                  emulator=gateway.emulator.client.get("/_emulator/requests").text)
    assert found == []
    assert log_events(gateway, "request finished")[0]["credential"] == f"{CREDENTIAL}@1"


# -- 2. rotation drill under load --------------------------------------------------------


def test_rotation_drill_under_load_has_no_client_errors_and_drops_the_revoked_key(
        stack: Stack, redis_port: int) -> None:
    v1, v2 = canary_key("v1"), canary_key("v2")
    ring = prepare(stack, keyring_document(redis_port), redis_port)
    ring.keys.ok("add", CREDENTIAL, secret=v1)
    gateway = ring.start()
    accept_keys(gateway, v1)
    assert gateway.chat().status_code == 200  # warm: the key is unwrapped and cached

    marks: dict[str, float] = {}
    with Load(gateway.base_url, threads=4, rate=25.0, duration=15.0) as load:
        load.wait_for(lambda samples: len(samples) >= 100)
        assert ring.keys.ok("add", CREDENTIAL, secret=v2) == (
            f"global/{CREDENTIAL}@2: staged, fingerprint {Secret(v2).fingerprint()}\n")
        accept_keys(gateway, v1, v2)  # the new key is valid at the provider first
        marks["canary"] = time.time()
        ring.keys.ok("rotate", "canary", CREDENTIAL, "--version", "2", "--percent", "30")
        # The gateway serves the canary once a v2 answer comes back; then let 150 more
        # requests through.
        canary_seen = load.wait_for(lambda samples: any(
            s.credential == f"{CREDENTIAL}@2" for s in samples), timeout=FOLLOW_BOUND_S)
        load.wait_for(lambda samples: len(samples) >= canary_seen + 150)
        marks["promote"] = time.time()
        assert ring.keys.ok("rotate", "promote", CREDENTIAL) == (
            f"global/{CREDENTIAL}: promote done (v1=retiring, v2=active)\n")
        # The gateway follows the promote once 40 answers in a row are v2: only then
        # may v1 be revoked (in-flight requests finish on the key they started with).
        promote_seen = load.wait_for(lambda samples: len(samples) >= 40 and all(
            s.credential == f"{CREDENTIAL}@2" for s in samples[-40:]), timeout=FOLLOW_BOUND_S)
        marks["promote_seen"] = load.samples[promote_seen - 1].done
        assert ring.keys.ok("rotate", "revoke", CREDENTIAL, "--version", "1") == (
            f"global/{CREDENTIAL}: revoke done (v1=revoked, v2=active)\n")
        marks["revoke"] = time.time()
        accept_keys(gateway, v2)  # ... and the old one is revoked at the provider
        load.wait_for(lambda samples: len(samples) >= promote_seen + 200)

    samples = load.samples
    assert len(samples) == 4 * int(25.0 * 15.0)
    assert Counter(s.status for s in samples) == {200: len(samples)}
    served = Counter(s.credential for s in samples)
    assert set(served) == {f"{CREDENTIAL}@1", f"{CREDENTIAL}@2"}
    # What must hold, by cause and effect rather than by the clock: answers completed
    # before the canary command are v1; between the first v2 and the promote about 30 %
    # are v2 (the canary share, by request id); once the gateway followed the promote,
    # no request (sent later) gets v1 again.
    assert {s.credential for s in samples if s.done < marks["canary"]} == {f"{CREDENTIAL}@1"}
    in_canary = [s.credential for s in samples[canary_seen:] if s.done < marks["promote"]]
    share = in_canary.count(f"{CREDENTIAL}@2") / len(in_canary)
    assert len(in_canary) >= 140
    assert 0.15 < share < 0.45, share
    assert {s.credential for s in samples
            if s.sent > marks["promote_seen"]} == {f"{CREDENTIAL}@2"}

    records = gateway.emulator.requests()
    assert len(records) == len(samples) + 1
    # The revoked key reaches the provider never again, and a retiring version took no
    # new request once the gateway followed the promote.
    after_revoke = [r for r in records if r["ts"] > marks["revoke"]]
    assert len(after_revoke) >= 100
    assert set(seen_keys(after_revoke)) == {bearer(v2)}
    assert bearer(v1) not in seen_keys(r for r in records if r["ts"] > marks["promote_seen"])
    assert set(seen_keys(records)) == {bearer(v1), bearer(v2)}
    rows = list_rows(ring.keys.ok("list"))
    assert [rows[(f"global/{CREDENTIAL}", v)][0] for v in (1, 2)] == ["revoked", "active"]
    assert leaks(gateway, [v1, v2], cli="\n".join(ring.keys.outputs),
                 responses="\n".join(s.body for s in samples[:50])) == []


# -- 3. canary rollback ------------------------------------------------------------------


def test_a_canary_the_provider_rejects_is_rolled_back_automatically(
        stack: Stack, redis_port: int) -> None:
    # rollback_after is 2 here (the default is 3): the configured bound is the one that
    # counts. Canary answers never reach the credential's breaker (see BUG 1 in
    # test_credentials_regressions.py).
    rollback_after = 2
    v1, v2 = canary_key("v1"), canary_key("v2")
    # Failover off: the canary's refusals reach the client (with failover on they are
    # retried on the active version: tests/e2e/test_failover_canary.py).
    ring = prepare(stack, keyring_document(
        redis_port, secrets={"rollback_after": rollback_after},
        change=lambda doc: doc.update(failover={"max_attempts": 1})), redis_port)
    ring.keys.ok("add", CREDENTIAL, secret=v1)
    gateway = ring.start()
    accept_keys(gateway, v1)  # v2 was never valid at the provider
    assert gateway.chat().status_code == 200
    ring.keys.ok("add", CREDENTIAL, secret=v2)
    ring.keys.ok("rotate", "canary", CREDENTIAL, "--version", "2", "--percent", "50")
    # No wait for the gateway to see the canary: requests before it do are v1 and 200,
    # and the loop below runs until the rollback is done.

    responses: list[httpx.Response] = []
    failed: list[int] = []
    for i in range(200):  # until 30 requests after the last failure (about 35 in all)
        responses.append(gateway.chat())
        if responses[-1].status_code != 200:
            failed.append(i)
        if i - (failed[-1] if failed else 0) >= 30 and len(failed) >= rollback_after:
            break

    assert len(failed) == rollback_after, [r.status_code for r in responses]
    for i in failed:
        assert responses[i].status_code == 502
        assert responses[i].json() == REJECTED
        assert responses[i].headers["x-asc-credential"] == f"{CREDENTIAL}@2"
    after = responses[failed[-1] + 1:]
    assert len(after) == 30
    assert {(r.status_code, r.headers["x-asc-credential"]) for r in after} == {
        (200, f"{CREDENTIAL}@1")}
    assert seen_keys(gateway.emulator.requests()).count(bearer(v2)) == rollback_after

    rows = list_rows(ring.keys.ok("list"))
    assert rows[(f"global/{CREDENTIAL}", 1)][0] == "active"
    assert rows[(f"global/{CREDENTIAL}", 2)][0] == "staged(failed canary)"
    metrics = gateway.metrics()
    assert metric_value(metrics, "asc_credential_rollbacks_total", credential=CREDENTIAL) == 1
    [event] = log_events(gateway, "canary rolled back after provider auth failures")
    assert (event["credential"], event["failures"]) == (f"{CREDENTIAL}@2", rollback_after)
    assert leaks(gateway, [v1, v2], cli="\n".join(ring.keys.outputs),
                 responses="\n".join(r.text for r in responses)) == []


# -- 4. tampered record, wrong KEK ------------------------------------------------------------


def _flip_ciphertext_byte(record_json: str) -> str:
    record = json.loads(record_json)
    ciphertext = bytearray(base64.b64decode(record["ciphertext"]))
    ciphertext[len(ciphertext) // 2] ^= 0x01
    record["ciphertext"] = base64.b64encode(bytes(ciphertext)).decode()
    return json.dumps(record)


def test_tampered_record_and_wrong_kek_fail_closed_with_nothing_sent(
        stack: Stack, redis_port: int) -> None:
    provider_key = canary_key("v1")
    ring = prepare(stack, keyring_document(redis_port), redis_port)
    ring.keys.ok("add", CREDENTIAL, secret=provider_key)
    client = ring.redis()
    original = client.hget(VERSIONS_KEY, "1")
    assert original is not None
    client.hset(VERSIONS_KEY, "1", _flip_ciphertext_byte(original))
    gateway = ring.start()  # a fresh extproc: nothing cached yet
    accept_keys(gateway, provider_key)
    bodies = []

    tampered = gateway.chat()
    bodies.append(tampered.text)
    assert tampered.status_code == 503
    assert tampered.json() == UNAVAILABLE
    assert "x-asc-credential" not in tampered.headers
    assert gateway.emulator.requests() == []
    [event] = log_events(gateway, "provider credential unavailable")
    assert event["reason"] == (f"credential global/{CREDENTIAL}@1: cannot open "
                               f"global/emu-eu/{CREDENTIAL}@1: ciphertext authentication "
                               "failed (tampered ciphertext or nonce, or record moved)")

    # A truncated record (cut JSON) fails the same way.
    client.hset(VERSIONS_KEY, "1", original[: len(original) // 2])
    truncated = gateway.chat()
    bodies.append(truncated.text)
    assert (truncated.status_code, truncated.json()) == (503, UNAVAILABLE)
    assert gateway.emulator.requests() == []

    # Put the record back: it serves again (failures are not cached).
    client.hset(VERSIONS_KEY, "1", original)
    restored = gateway.chat()
    assert (restored.status_code, restored.headers["x-asc-credential"]) == (
        200, f"{CREDENTIAL}@1")
    assert seen_keys(gateway.emulator.requests()) == [bearer(provider_key)]

    # Another 0600 KEK in place of the right one, and a restarted extproc.
    kek = ring.config_dir / "kek.key"
    other = init_kek_file(ring.config_dir / "other-kek.key")
    os.replace(other, kek)
    gateway.extproc.stop()
    env = dict(stack.env, **provider_env())
    restarted, _, restarted_metrics = stack.start_extproc(
        gateway.config_path, port=gateway.extproc_port, env=env, name="extproc-wrong-kek")
    assert wait_for(lambda: gateway.chat().status_code == 503)
    wrong_kek = gateway.chat()
    bodies.append(wrong_kek.text)
    assert wrong_kek.json() == UNAVAILABLE
    assert len(gateway.emulator.requests()) == 1  # still only the one before
    reasons = [e["reason"] for e in log_events(gateway, "provider credential unavailable")]
    assert "sealed under KEK file:sha256:" in reasons[-1]
    assert "but this gateway holds KEK file:sha256:" in reasons[-1]

    assert leaks(gateway, [provider_key], metrics_port=restarted_metrics,
                 responses="\n".join(bodies), cli="\n".join(ring.keys.outputs)) == []

    # A KEK file others may read: extproc refuses to start at all.
    restarted.stop()
    kek.chmod(0o644)
    with pytest.raises(RuntimeError, match="exited early"):
        stack.start_extproc(gateway.config_path, env=env, name="extproc-0644")
    assert f"KEK file {kek} has mode 0644; it must be 0600" in stack.processes[-1].log_text()


# -- 5. BYOK ------------------------------------------------------------------------------------


def test_a_tenant_own_key_is_used_only_for_it_and_still_budgeted(
        stack: Stack, redis_port: int) -> None:
    global_key, acme_key = canary_key("global"), canary_key("acme-own")

    def byok(doc: dict[str, Any]) -> None:
        doc["credentials"]["acme-own"] = {"keyring": True}
        doc["tenants"]["acme"]["credentials"] = {"emu-eu": ["acme-own"]}
        doc["tenants"]["acme"]["budgets"] = [
            {"scope": "tenant", "window": "month", "limit_usd": 10}]
        # globex on the same provider, with the global key
        doc["tenants"]["globex"].update(zone="eu", models=["gpt-4o-mini"])

    ring = prepare(stack, keyring_document(redis_port, change=byok), redis_port)
    ring.keys.ok("add", CREDENTIAL, secret=global_key)
    assert ring.keys.ok("add", "acme-own", "--scope", "tenant:acme", secret=acme_key) == (
        f"tenant:acme/acme-own@1: active, fingerprint {Secret(acme_key).fingerprint()}\n")
    # The tenant's credential is not a global one: refused, nothing sealed.
    refused = ring.keys("add", "acme-own", secret=acme_key)
    assert refused.code == 2
    assert "'acme-own' is not a keyring credential used in scope 'global'" in refused.err
    gateway = ring.start()
    accept_keys(gateway, global_key, acme_key)

    acme = gateway.chat()
    globex = gateway.chat(key=GLOBEX_KEY)
    assert (acme.status_code, acme.headers["x-asc-credential"]) == (200, "acme-own@1")
    assert (globex.status_code, globex.headers["x-asc-credential"]) == (200, f"{CREDENTIAL}@1")
    assert acme.headers["x-asc-provider"] == globex.headers["x-asc-provider"] == "emu-eu"
    assert seen_keys(gateway.emulator.requests()) == [bearer(acme_key), bearer(global_key)]

    # Still budgeted: the tenant's month counter was charged what the response says.
    charged = round(float(acme.headers["x-asc-cost-usd"]) * 1_000_000)
    assert charged > 0

    def month_spent() -> int:
        client = ring.redis()
        keys = list(client.scan_iter("asc:{t:acme}:b:tenant:acme:m*"))
        return sum(int(client.hget(k, "spent") or 0) for k in keys)

    assert wait_for(lambda: month_spent() == charged), month_spent()
    # ... and audited with its own credential label (each line is written once its
    # request's finish() ran, which may be after the client has its answer).
    def finished_lines() -> dict[str, dict[str, Any]]:
        return {e["tenant"]: e for e in log_events(gateway, "request finished")}

    assert wait_for(lambda: {"acme", "globex"} <= finished_lines().keys())
    finished = finished_lines()
    assert finished["acme"]["credential"] == "acme-own@1"
    assert finished["acme"]["charged_micro_usd"] == charged
    assert finished["globex"]["credential"] == f"{CREDENTIAL}@1"

    rows = list_rows(ring.keys.ok("list"))
    assert set(rows) == {(f"global/{CREDENTIAL}", 1), ("tenant:acme/acme-own", 1)}
    access_logged(gateway, acme, globex)
    assert leaks(gateway, [global_key, acme_key], cli="\n".join(ring.keys.outputs),
                 redis=redis_dump(redis_port),
                 responses=f"{acme.text}{acme.headers}{globex.text}{globex.headers}") == []
