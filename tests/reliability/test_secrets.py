"""Scenario 10: canary secrets - tenant virtual keys, provider keys (env and sealed in the
keyring), the KEK and the pepper - grepped across every log (Envoy at debug too), every
replica's metrics, Redis, the provider's recordings, and every response (errors
included). The figure is the number of matches: 0.
Related: tests/e2e/test_secret_leaks.py (Envoy at warn, one process),
tests/e2e/test_credentials.py (the keyring's own leak checks).
"""

from __future__ import annotations

import base64

import httpx
import pytest

from extproc.devstack import Stack
from tests.conftest import (
    ACME_KEY,
    CANARIES,
    CHAT,
    GLOBEX_KEY,
    PROVIDER_KEY_EU,
    PROVIDER_KEY_US,
    chat_body,
)
from tests.e2e.test_credentials import (
    CREDENTIAL,
    canary_key,
    keyring_document,
    prepare,
    redis_dump,
)
from tests.polling import wait_for
from tests.reliability.conftest import figure, start_replicas

MESSAGES = "/v1/messages"


@pytest.mark.parametrize("envoy_level", ["debug", pytest.param("trace", marks=pytest.mark.soak)])
def test_no_canary_secret_anywhere_with_envoy_at_debug(stack: Stack, envoy_level: str) -> None:
    _, redis_port = stack.start_redis()
    sealed = canary_key("sealed")
    ring = prepare(stack, keyring_document(redis_port), redis_port)
    ring.keys.ok("add", CREDENTIAL, secret=sealed)
    kek = (ring.config_dir / "kek.key").read_bytes()
    assert len(kek) == 32
    kek_forms = (kek.hex(), base64.b64encode(kek).decode(), base64.urlsafe_b64encode(kek)
                 .decode().rstrip("="), base64.b64encode(kek).decode().rstrip("="))
    fleet = start_replicas(stack, keyring_document(redis_port), redis_port=redis_port,
                           envoy_log_level=envoy_level)
    response = fleet.emulator.client.put("/_emulator/keys",
                                         json={"keys": [sealed, PROVIDER_KEY_US]})
    assert response.status_code == 204

    calls: list[tuple[str, dict[str, str], bytes | dict[str, object]]] = [
        (CHAT, {"authorization": f"Bearer {ACME_KEY}"}, chat_body()),
        (CHAT, {"authorization": f"Bearer {ACME_KEY}"}, chat_body(stream=True)),
        (CHAT, {"authorization": f"Bearer {GLOBEX_KEY}"}, chat_body()),
        (CHAT, {"authorization": f"Bearer {ACME_KEY}x"}, chat_body()),
        (CHAT, {"authorization": f"Bearer {sealed}"}, chat_body()),
        (CHAT, {"authorization": f"Bearer {PROVIDER_KEY_EU}"}, chat_body()),
        (CHAT, {"authorization": f"Bearer {ACME_KEY}", "x-api-key": PROVIDER_KEY_US},
         chat_body()),
        (CHAT, {"authorization": f"Bearer {ACME_KEY}"}, b"{not json " + ACME_KEY.encode()),
        (MESSAGES, {"x-api-key": ACME_KEY, "anthropic-version": "2023-06-01"},
         {"model": "gpt-4o-mini", "max_tokens": 8,
          "messages": [{"role": "user", "content": "hi"}]}),
        (MESSAGES, {"x-api-key": GLOBEX_KEY + "zz"}, {"model": "x"}),
    ]
    faults = [{"status": 401}, {"status": 500, "html": True}, {"status": 400},
              {"status": 429, "retry_after": 1}, {"reset": True}]
    answers: list[httpx.Response] = []
    with httpx.Client(base_url=fleet.base_url, timeout=15) as client:
        for path, headers, body in calls:
            content = body if isinstance(body, bytes) else httpx.Request(
                "POST", "/", json=body).content
            answers.append(client.post(path, content=content, headers={
                "content-type": "application/json", **headers}))
        for fault in faults:
            fleet.emulator.queue_fault(**fault)
            answers.append(client.post(CHAT, json=chat_body(), headers={
                "authorization": f"Bearer {ACME_KEY}"}))
    assert [a.status_code for a in answers] == [
        200, 200, 200, 401, 401, 401, 200, 400, 200, 401, 502, 502, 400, 429, 503]
    ids = [a.headers["x-asc-request-id"] for a in answers if "x-asc-request-id" in a.headers]
    # Envoy flushes its access log about once a second: wait until it holds every request.
    assert wait_for(lambda: all(i in fleet.envoy.log_text() for i in ids))

    secrets = (*CANARIES, sealed, *kek_forms)
    places = {
        "responses": "\n".join(f"{a.status_code} {a.headers} {a.text}" for a in answers),
        "redis": redis_dump(redis_port),
        "emulator recordings": fleet.emulator.client.get("/_emulator/requests").text,
        "cli": "\n".join(ring.keys.outputs),
        **{f"metrics {port}": httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
           for port in fleet.metrics_ports},
        **{f"log {p.name}": p.log_text() for p in stack.processes},
    }
    found = [(where, secret[:24]) for where, text in places.items()
             for secret in secrets if secret in text]
    found += [(f"raw bytes of log {p.name}", "kek") for p in stack.processes
              if kek in p.log_path.read_bytes()]
    figure("secrets_canary_matches", len(found))
    figure("secrets_places_grepped", f"{len(places)} places, {len(secrets)} canaries,"
           f" {sum(len(t) for t in places.values())} bytes")
    assert found == []
    # The grep read real output: Envoy really logged at debug, the replicas logged records.
    # (Before decision 0130 Envoy's http, router and ext_proc components printed 7 of
    # these canaries at debug: whole header maps, the provider key the service set.)
    assert "[debug]" in fleet.envoy.log_text()
    assert len(fleet.records()) >= len(ids)
