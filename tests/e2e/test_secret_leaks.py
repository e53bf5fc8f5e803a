"""Canary secrets (tenant keys, provider keys, pepper) never show up where people look."""

from __future__ import annotations

import json

from tests.conftest import (
    ACME_KEY,
    CANARIES,
    GLOBEX_KEY,
    PROVIDER_KEY_EU,
    Gateway,
    chat_body,
)
from tests.e2e.audit_check import audit_dir, records
from tests.polling import wait_for


def test_no_canary_secret_in_logs_metrics_or_error_bodies(gateway: Gateway) -> None:
    bodies: list[str] = []
    calls = [
        dict(key=ACME_KEY),
        dict(key=ACME_KEY, stream=True),
        dict(key=ACME_KEY + "x"),
        dict(key=PROVIDER_KEY_EU),
        dict(key=ACME_KEY, fault={"status": 401}),
        dict(key=ACME_KEY, fault={"status": 500, "html": True}),
        dict(key=ACME_KEY, fault={"status": 400}),
        dict(key=ACME_KEY, model="gpt-4o"),
        dict(key=ACME_KEY, body=b"{not json"),
        # globex's requests take the fast path on the [fast] gateway (acme's model is
        # renamed at its deployment: the full path on both).
        dict(key=GLOBEX_KEY),
        dict(key=GLOBEX_KEY, stream=True),
        dict(key=GLOBEX_KEY, fault={"status": 401}),
        dict(key=GLOBEX_KEY, fault={"status": 500, "html": True}),
        dict(key=GLOBEX_KEY, fault={"status": 400}),
    ]
    request_ids = []
    for call in calls:
        stream = bool(call.get("stream"))
        body = call.get("body") or chat_body(
            str(call.get("model", "gpt-4o-mini")), stream=stream,
            **({"stream_options": {"include_usage": True}} if stream else {}))
        if "fault" in call:
            gateway.emulator.queue_fault(**call["fault"])  # type: ignore[arg-type]
        response = gateway.chat(body, key=str(call["key"]))  # type: ignore[arg-type]
        bodies.append(response.text)
        bodies.append(str(response.headers))
        request_ids.append(response.headers["x-asc-request-id"])
    # Every request is in Envoy's access log (flushed about once a second) and has its
    # audit record (a fast one comes from Envoy's gRPC access log) before anything is read.
    assert wait_for(lambda: all(rid in gateway.envoy.log_text() for rid in request_ids))
    assert wait_for(lambda: {r.get("request_id") for r in records(audit_dir(gateway))}
                    >= set(request_ids))

    places = {
        "responses": "\n".join(bodies),
        "metrics": gateway.metrics(),
        "emulator recordings": gateway.emulator.client.get("/_emulator/requests").text,
        **{f"log {name}": text for name, text in
           ((p.name, p.log_text()) for p in gateway.stack.processes)},
        "audit records": "\n".join(json.dumps(r) for r in records(audit_dir(gateway))),
    }
    leaks = [(where, canary[:16]) for where, text in places.items()
             for canary in CANARIES if canary in text]
    assert leaks == []
    # The logs are not empty: the check above looked at real output.
    assert "request finished" in places["log extproc"]
    assert '"status": 401' in places["audit records"]
