"""Scenario 1: the ext_proc service killed, frozen (slow) or restarted under load.

Envoy fails closed (`failure_mode_allow: false`): while the service is gone or silent,
clients get the gateway's JSON 500 / 504 and no request reaches the provider without a
decision (every provider request carries the deployment's model name and the injected
provider key, which only the service's decision puts there). After a restart, traffic
recovers; the figure is the time from the restart's spawn to the first 200.
Related single-request tests: tests/e2e/test_operations.py (extproc down / silent).
"""

from __future__ import annotations

import json
import os
import signal
import time

from extproc.devstack import Stack
from tests.conftest import ACME_KEY
from tests.polling import wait_for
from tests.reliability.conftest import (
    Load,
    budget_document,
    figure,
    settled,
    start_replicas,
    undecided,
)

MESSAGES = "/v1/messages"
UPSTREAM_MODEL = "gpt-4o-mini-eu"  # acme (zone eu) is served by emu-eu's deployment
BUDGET = {"budgets": [{"scope": "tenant", "window": "month", "limit_usd": 100}]}
FAIL_CLOSED_500 = {"message": "The gateway could not process the request.",
                   "type": "gateway_error"}


def test_extproc_killed_under_load_fails_closed_and_recovers(stack: Stack) -> None:
    _, redis_port = stack.start_redis()
    fleet = start_replicas(stack, budget_document(redis_port, hold_ttl_s=2, acme=BUDGET),
                           redis_port=redis_port, replicas=1,
                           emulator_args=("--latency-ms", "20"))

    with Load(fleet.base_url, clients=4) as load:
        assert wait_for(lambda: load.count(200) >= 20)
        fleet.extprocs[0].kill()
        assert wait_for(lambda: load.count(500) >= 20)
        restarted_at = time.monotonic()
        fleet.restart(0)
        assert wait_for(lambda: any(r.status == 200 and r.started >= restarted_at
                                    for r in list(load.results)), timeout=30)
        recovered_at = min(r.started for r in list(load.results)
                           if r.status == 200 and r.started >= restarted_at)
        assert wait_for(lambda: load.count(200) >= 60)

    statuses = {r.status for r in load.results}
    failed = [json.loads(r.body)["error"] for r in load.results if r.status == 500]
    wrong = undecided(fleet.emulator.requests(), UPSTREAM_MODEL)
    figure("extproc_killed_undecided_provider_requests", len(wrong))
    figure("extproc_killed_fail_closed_answers", len(failed))
    figure("extproc_restart_to_first_200_ms", round((recovered_at - restarted_at) * 1000))

    assert statuses == {200, 500}
    assert all({k: e[k] for k in ("message", "type")} == FAIL_CLOSED_500 for e in failed)
    assert wrong == []
    assert (recovered_at - restarted_at) < 30  # generous; the figure is the measurement
    # Holds of the requests the killed process had in flight: the sweeper returns them.
    assert settled(redis_port)


def test_extproc_frozen_under_load_times_out_closed_and_recovers(stack: Stack) -> None:
    """SIGSTOP is the slowest service: it accepts streams and answers nothing. Envoy's
    message_timeout (500 ms here) answers 504 JSON; SIGCONT and traffic flows again."""
    _, redis_port = stack.start_redis()
    fleet = start_replicas(stack, budget_document(redis_port, hold_ttl_s=2, acme=BUDGET),
                           redis_port=redis_port, replicas=1, message_timeout_ms=500)
    pid = fleet.extprocs[0].popen.pid

    with Load(fleet.base_url, clients=4) as load:
        assert wait_for(lambda: load.count(200) >= 20)
        os.kill(pid, signal.SIGSTOP)
        try:
            assert wait_for(lambda: load.count(504) >= 12, timeout=30)
        finally:
            os.kill(pid, signal.SIGCONT)
        resumed_at = time.monotonic()
        assert wait_for(lambda: any(r.status == 200 and r.started >= resumed_at
                                    for r in list(load.results)), timeout=30)
        recovered_at = min(r.started for r in list(load.results)
                           if r.status == 200 and r.started >= resumed_at)

    timed_out = [json.loads(r.body)["error"] for r in load.results if r.status == 504]
    wrong = undecided(fleet.emulator.requests(), UPSTREAM_MODEL)
    figure("extproc_frozen_undecided_provider_requests", len(wrong))
    figure("extproc_frozen_timeouts_504", len(timed_out))
    figure("extproc_resume_to_first_200_ms", round((recovered_at - resumed_at) * 1000))

    assert {r.status for r in load.results} <= {200, 504}
    assert {e["message"] for e in timed_out} == {"The gateway timed out."}
    assert wrong == []
    assert settled(redis_port)


def test_fail_closed_answers_speak_the_door_dialect(stack: Stack) -> None:
    """Envoy's own replies (the service silent: 504; the service gone: 500) come in the
    Anthropic shape on the Messages door (regression: they were OpenAI-shaped)."""
    _, redis_port = stack.start_redis()
    fleet = start_replicas(stack, budget_document(redis_port), redis_port=redis_port,
                           replicas=1, message_timeout_ms=500)
    anthropic = {"x-api-key": ACME_KEY, "anthropic-version": "2023-06-01"}
    body = {"model": "gpt-4o-mini", "max_tokens": 8,
            "messages": [{"role": "user", "content": "Hello"}]}
    pid = fleet.extprocs[0].popen.pid

    os.kill(pid, signal.SIGSTOP)
    try:
        silent = fleet.client.post(MESSAGES, json=body, headers=anthropic)
    finally:
        os.kill(pid, signal.SIGCONT)
    fleet.extprocs[0].kill()
    gone = fleet.client.post(MESSAGES, json=body, headers=anthropic)
    gone_openai = fleet.chat()

    assert (silent.status_code, silent.json()) == (504, {"type": "error", "error": {
        "type": "api_error", "message": "The gateway timed out."}})
    assert (gone.status_code, gone.json()) == (500, {"type": "error", "error": {
        "type": "api_error", "message": "The gateway could not process the request."}})
    assert gone_openai.status_code == 500
    assert gone_openai.json()["error"]["message"] == "The gateway could not process the request."
    assert gone_openai.json()["error"]["type"] == "gateway_error"
    assert fleet.emulator.requests() == []
