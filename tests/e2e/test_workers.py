"""`extproc serve --workers N`: the supervisor's restarts, merged metrics and the fail-open
ceiling, on real worker processes behind a real Envoy."""

from __future__ import annotations

import json
import os
import signal
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from extproc.devstack import Stack
from tests.conftest import Gateway, chat_body, start_gateway
from tests.e2e.audit_check import assert_one_record
from tests.e2e.test_budgets import budget_config
from tests.polling import wait_for


def log_records(gateway: Gateway, message: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in gateway.extproc.log_text().splitlines()
            if f'"msg":"{message}"' in line]


def worker_pids(gateway: Gateway) -> list[int]:
    return [record["pid"] for record in log_records(gateway, "extproc serving")]


def credential_states(gateway: Gateway, credential: str) -> dict[str, float]:
    """`asc_credential_state` of one credential in the supervisor's merged metrics."""
    states: dict[str, float] = {}
    for family in text_string_to_metric_families(gateway.metrics()):
        for sample in family.samples:
            if (sample.name == "asc_credential_state"
                    and sample.labels["credential"] == credential):
                states[sample.labels["state"]] = sample.value
    return states


def test_dead_workers_credential_state_leaves_the_merged_metrics(stack: Stack) -> None:
    gateway = start_gateway(stack, stack.workdir / "config", workers=2)
    assert wait_for(lambda: len(worker_pids(gateway)) == 2, timeout=30)
    gateway.emulator.queue_fault(status=401, count=1000)
    # 12 requests over 2 workers: one of them sees at least 3 x 401 and opens the key.
    for _ in range(12):
        gateway.chat(chat_body())
    assert credential_states(gateway, "global/emu-eu-1")["open"] == 1

    gateway.emulator.clear()
    first = worker_pids(gateway)
    for pid in first:
        os.kill(pid, signal.SIGKILL)
    assert wait_for(lambda: len(set(worker_pids(gateway)) - set(first)) == 2, timeout=30)
    statuses = [gateway.chat(chat_body()).status_code for _ in range(4)]

    assert statuses == [200] * 4
    # Only the restarted workers' view remains: the key is closed, not open.
    assert credential_states(gateway, "global/emu-eu-1") == {
        "closed": 1, "degraded": 0, "open": 0, "half_open": 0}


def test_a_worker_failing_on_its_config_is_restarted_with_backoff(stack: Stack) -> None:
    gateway = start_gateway(stack, stack.workdir / "config", workers=2)
    assert wait_for(lambda: len(worker_pids(gateway)) == 2, timeout=30)
    good = gateway.config_path.read_text(encoding="utf-8")
    gateway.config_path.write_text(good + "\nunknown_section: {}\n", encoding="utf-8")

    os.kill(worker_pids(gateway)[0], signal.SIGKILL)
    assert wait_for(lambda: len(log_records(gateway, "worker exited; restarting it")) >= 4,
                    timeout=30)
    restarts = log_records(gateway, "worker exited; restarting it")[:4]
    assert [(r["code"], r["delay_s"]) for r in restarts] == [
        (-9, 0.5), (2, 1.0), (2, 2.0), (2, 4.0)]
    assert len(log_records(gateway, "cannot start: invalid config")) >= 3

    # Once the file is good again, the next restart serves; the other worker never stopped.
    gateway.config_path.write_text(good, encoding="utf-8")
    assert wait_for(lambda: len(worker_pids(gateway)) == 3, timeout=30)
    assert [gateway.chat(chat_body()).status_code for _ in range(4)] == [200] * 4


def _one_stream_per_connection(bootstrap: dict[str, Any]) -> None:
    """Envoy opens a new connection to extproc for every request, so the kernel spreads
    requests over both workers instead of pinning Envoy's one or two connections."""
    [cluster] = [c for c in bootstrap["static_resources"]["clusters"]
                 if c["name"] == "asc_extproc"]
    options = cluster["typed_extension_protocol_options"][
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"]
    options["common_http_protocol_options"] = {"max_requests_per_connection": 1}


def test_fail_open_ceiling_is_per_replica_across_workers(stack: Stack) -> None:
    redis_process, redis_port = stack.start_redis()
    gateway = start_gateway(stack, stack.workdir / "config", workers=2,
                            edit_bootstrap=_one_stream_per_connection,
                            document=budget_config(
                                redis_port, on_redis_error="fail_open",
                                fail_open_ceiling_usd=0.05,
                                budgets=[{"scope": "tenant", "window": "month",
                                          "limit_usd": 1}]))
    redis_process.stop()

    # A call holds 19,300 micro-USD (33 prompt tokens estimated + max_tokens 8) and costs
    # 8,300. Each worker keeps 25,000 of the 50,000 ceiling: one call each (19,300, then
    # 8,300 + 19,300 > 25,000). With the whole ceiling per worker each would admit 4.
    responses = [gateway.chat(chat_body(max_tokens=8)) for _ in range(30)]
    statuses = [response.status_code for response in responses]

    assert statuses.count(200) == 2
    assert statuses.count(503) == 28
    # One audit record per request across both workers, each worker its own writer.
    served = [assert_one_record(gateway, r.headers["x-asc-request-id"], status=r.status_code)
              for r in responses]
    assert len({record["writer"] for record in served if record["status"] == 200}) == 2
