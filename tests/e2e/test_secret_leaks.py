"""Canary secrets (tenant keys, provider keys, pepper) never show up where people look."""

from __future__ import annotations

import json
import time

from tests.conftest import (
    ACME_KEY,
    CANARIES,
    PROVIDER_KEY_EU,
    Gateway,
    chat_body,
)
from tests.e2e.audit_check import audit_dir, records


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
    ]
    for call in calls:
        body = call.get("body") or chat_body(str(call.get("model", "gpt-4o-mini")),
                                              stream=bool(call.get("stream")))
        if "fault" in call:
            gateway.emulator.queue_fault(**call["fault"])  # type: ignore[arg-type]
        response = gateway.chat(body, key=str(call["key"]))  # type: ignore[arg-type]
        bodies.append(response.text)
        bodies.append(str(response.headers))
    time.sleep(1.5)  # Envoy flushes its access log about once a second

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
