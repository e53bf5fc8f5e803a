"""`/metrics` after a known traffic mix, merged by the supervisor of `serve --workers 2`;
fallbacks and budget gauges after real failovers.

Real Envoy, real worker processes, the emulator. Envoy opens one connection per request to
the extproc cluster, so the kernel spreads the requests over both workers (SO_REUSEPORT
hashes each new connection: 16 requests all on one worker is a 1 in 32768 chance); the
counts and token sums on the supervisor's /metrics must be exactly those of every request, whichever
worker served it.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from extproc.devstack import Stack
from tests.conftest import GLOBEX_KEY, Gateway, chat_body, gateway_config, start_gateway
from tests.e2e.test_failover import _start
from tests.e2e.test_workers import _one_stream_per_connection, worker_pids
from tests.polling import wait_for

Labels = frozenset[tuple[str, str]]


def parse(text: str) -> dict[str, dict[Labels, float]]:
    """Every sample of a /metrics text: name -> labels -> value."""
    found: dict[str, dict[Labels, float]] = defaultdict(dict)
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[sample.name][frozenset(sample.labels.items())] = sample.value
    return found


def samples(gateway: Gateway) -> dict[str, dict[Labels, float]]:
    """Every sample of the supervisor's merged /metrics."""
    return parse(gateway.metrics())


def value(found: dict[str, dict[Labels, float]], name: str, **labels: str) -> float:
    return found[name].get(frozenset(labels.items()), 0.0)


def one_tenant_labelled(emulator_port: int) -> dict[str, Any]:
    """The test config with only its first tenant (acme) named in metrics."""
    document = gateway_config(emulator_port)
    document["metrics"] = {"max_tenant_labels": 1}
    return document


def streamed_usage(response: httpx.Response) -> dict[str, int]:
    """The usage chunk of an OpenAI stream the client asked usage for."""
    for line in response.text.splitlines():
        if line.startswith("data: {"):
            event = json.loads(line[len("data: "):])
            if event.get("usage"):
                usage: dict[str, int] = event["usage"]
                return usage
    raise AssertionError(f"no usage in the stream: {response.text!r}")


@pytest.mark.both_paths
def test_traffic_mix_is_counted_exactly_across_two_workers(stack: Stack) -> None:
    gateway = start_gateway(stack, stack.workdir / "config", workers=2,
                            document=one_tenant_labelled,
                            edit_bootstrap=_one_stream_per_connection)
    assert wait_for(lambda: len(worker_pids(gateway)) == 2, timeout=30)

    usages: list[dict[str, int]] = []
    for index in range(8):  # acme (eu zone): emu-eu
        answer = gateway.chat(chat_body(messages=[
            {"role": "user", "content": "Hello there " + "word " * index}]))
        assert answer.status_code == 200, answer.text
        usages.append(answer.json()["usage"])
    for _ in range(2):
        answer = gateway.chat(chat_body(stream=True, stream_options={"include_usage": True}))
        assert answer.status_code == 200, answer.text
        usages.append(streamed_usage(answer))
    other = [gateway.chat(chat_body(), key=GLOBEX_KEY) for _ in range(2)]  # us zone: emu-us
    assert [answer.status_code for answer in other] == [200, 200]
    denied = [gateway.chat(chat_body(), key="sk-not-a-key").status_code,
              gateway.chat(chat_body("gpt-4o")).status_code,
              gateway.chat(chat_body("no-such-model")).status_code]
    assert denied == [401, 403, 404]
    gateway.emulator.queue_fault(status=500, count=1)
    assert gateway.chat(chat_body()).status_code == 502

    acme = {"tenant": "acme", "provider": "emu-eu", "region": "eu-west-1",
            "model": "gpt-4o-mini"}
    unrouted = {"provider": "-", "region": "-", "model": "-"}
    # finish() runs after the client has its answer: wait until all 16 are counted.
    assert wait_for(lambda: sum(samples(gateway)["asc_requests_total"].values()) == 16,
                    timeout=10)
    found = samples(gateway)
    assert {labels: count for labels, count in found["asc_requests_total"].items()} == {
        frozenset({**acme, "status": "200"}.items()): 10.0,
        frozenset({**acme, "status": "502"}.items()): 1.0,
        frozenset({"tenant": "other", "provider": "emu-us", "region": "us-east-1",
                   "model": "gpt-4o-mini", "status": "200"}.items()): 2.0,
        frozenset({"tenant": "-", **unrouted, "status": "401"}.items()): 1.0,
        frozenset({"tenant": "acme", **unrouted, "status": "403"}.items()): 1.0,
        frozenset({"tenant": "acme", **unrouted, "status": "404"}.items()): 1.0,
    }
    assert {labels: count for labels, count in found["asc_policy_denials_total"].items()} == {
        frozenset({"tenant": "-", "reason": "invalid_api_key"}.items()): 1.0,
        frozenset({"tenant": "acme", "reason": "model_not_allowed"}.items()): 1.0,
        frozenset({"tenant": "acme", "reason": "model_not_found"}.items()): 1.0,
    }
    assert value(found, "gen_ai_client_token_usage_total", **acme, token_type="input") == sum(
        usage["prompt_tokens"] for usage in usages)
    assert value(found, "gen_ai_client_token_usage_total", **acme, token_type="output") == sum(
        usage["completion_tokens"] for usage in usages)
    assert value(found, "gen_ai_server_request_duration_seconds_count", **acme) == 11
    # Streams with two output tokens or more, and nothing else.
    assert sum(usage["completion_tokens"] > 1 for usage in usages[8:]) == 2
    assert value(found, "gen_ai_server_time_per_output_token_seconds_count", **acme) == 2
    assert sum(found["gen_ai_server_time_per_output_token_seconds_count"].values()) == 2


def test_fallbacks_and_budget_remaining_on_a_real_failover(tmp_path: Path) -> None:
    """Zone eu of tests/e2e/test_failover.py: oai-eu, then anth-eu; a daily budget of
    USD 100 on the tenant, so every request reserves and settles on a real Redis."""
    with Stack(tmp_path / "stack") as stack:
        fo = _start(stack, tmp_path)
        with fo.client:
            assert fo.chat().status_code == 200
            fo.emulators["oai-eu"].queue_fault(status=503)
            assert fo.chat().headers["x-asc-provider"] == "anth-eu"
            fo.emulators["oai-eu"].queue_fault(reset=True)
            assert fo.chat().headers["x-asc-provider"] == "anth-eu"
            metrics_url = f"http://127.0.0.1:{fo.metrics_port}/metrics"

            def found() -> dict[str, dict[Labels, float]]:
                return parse(httpx.get(metrics_url, timeout=5).text)

            assert wait_for(lambda: sum(found()["asc_requests_total"].values()) == 3,
                            timeout=10)
            metrics = found()
    moved = {"tenant": "acme", "model": "gpt-4o-mini", "from_provider": "oai-eu",
             "to_provider": "anth-eu"}
    assert metrics["asc_fallbacks_total"] == {
        frozenset({**moved, "reason": "status_503"}.items()): 1.0,
        frozenset({**moved, "reason": "reset"}.items()): 1.0,
    }
    spent = sum(metrics["asc_budget_spent_micro_usd_total"].values())
    assert spent > 0
    window = {"tenant": "acme", "scope": "tenant", "window": "day"}
    assert value(metrics, "asc_budget_limit_usd", **window) == 100.0
    # Requests one after the other: what the ledger had left is the limit less every charge.
    assert value(metrics, "asc_budget_remaining_usd", **window) == pytest.approx(
        100 - spent / 1_000_000, abs=1e-9)
