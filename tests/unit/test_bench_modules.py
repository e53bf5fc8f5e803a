"""The bench's own logic (bench/*.py, issue 14 item 4): what its numbers are built from.

The bench itself is run by `make bench`, not by the suite; these pin the parts a wrong
refactor would silently break: the results file keeps its history, wrk's line is parsed
exactly, the open-loop client sends every scheduled request to a real emulator, and the
ratios to a peer use the peer's best variant.
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"
if str(BENCH) not in sys.path:
    sys.path.insert(0, str(BENCH))

from cpu import SpeedProbe  # noqa: E402
from envoy_instructions import callgrind_total  # noqa: E402
from load import OpenLoopResult, parse_wrk_output, run_open_loop  # noqa: E402
from measure import Level, Run, median_run, rotated  # noqa: E402
from report import (  # noqa: E402
    is_peer,
    ratios_table,
    rounds_section,
    targets_table,
    write_results,
)
from stack import (  # noqa: E402
    BODY,
    CHAT_PATH,
    DIRECT,
    GATEWAY,
    fastpath_document,
    gateway_document,
)

from extproc.config_schema import Document  # noqa: E402
from extproc.devstack import Stack  # noqa: E402

HEADER = ("# Benchmark results\n\nWritten by `bench/run.py` (`make bench`); newest run first. "
          "Regenerate rather than edit by hand.\n\n")

WRK_OUT = ("Running 2s test\nBENCH_RESULT requests=300 duration_us=2000000 bytes=9 connect=0 "
           "read=1 write=0 status=2 timeout=0 p50_us=1500 p90_us=2000 p99_us=4000 "
           "p999_us=9000 mean_us=1700.5 max_us=12000\nNon-2xx or 3xx responses: 3\n")


def _run(target: str, requests: int, cpu: dict[str, float],
         calibration_ms: float | None = None) -> Run:
    wrk = parse_wrk_output(WRK_OUT.replace("requests=300", f"requests={requests}"), 0)
    return Run(target, 16, wrk, cpu, 1.0, calibration_ms=calibration_ms)


def test_write_results_puts_the_run_on_top_and_keeps_everything_below(tmp_path: Path) -> None:
    path = tmp_path / "RESULTS.md"
    older = ("## Hand-written notes\n\ntext\n\n<!-- bench-run -->\n## Run old\n\n| a |\n\n"
             "<!-- bench-extra:streaming -->\n## Streaming\n")
    path.write_text(HEADER + older, encoding="utf-8")

    write_results(path, "<!-- bench-run -->\n## Run new\n")

    assert path.read_text(encoding="utf-8") == (
        HEADER + "<!-- bench-run -->\n## Run new\n\n" + older)


def test_wrk_line_is_parsed_exactly() -> None:
    result = parse_wrk_output(WRK_OUT, 0)

    assert (result.requests, result.duration_s, result.rps) == (300, 2.0, 150.0)
    assert (result.p50_ms, result.p99_ms, result.p999_ms) == (1.5, 4.0, 9.0)
    assert result.status_errors == 3  # the larger of the two counters
    assert result.error_text() == "non-2xx/3xx=3, read=1"
    # wrk counts no timeout when nothing at all came back: the run must still say so.
    nothing = parse_wrk_output(WRK_OUT.replace("requests=300", "requests=0")
                               .replace("read=1", "read=0").replace(" 3\n", " 0\n")
                               .replace("status=2", "status=0"), 0)
    assert (nothing.error_count, nothing.error_text()) == (0, "no request completed")


def test_open_loop_result_percentiles_and_rate() -> None:
    result = OpenLoopResult(100.0, 2.0, tuple(float(v) for v in range(1, 201)), 0, 0, 200)

    assert (result.percentile(50), result.percentile(99), result.percentile(99.9)) == (
        100.0, 198.0, 200.0)
    assert (result.achieved_rps, result.rate_held) == (100.0, True)
    assert OpenLoopResult(100.0, 2.0, (1.0,) * 180, 0, 0, 200).rate_held is False


def test_open_loop_client_sends_every_scheduled_request(tmp_path: Path) -> None:
    key = "sk-emu-bench-unit"
    with Stack(tmp_path) as stack:
        _, port = stack.start_emulator([key])
        result = run_open_loop(port, rate=40, duration_s=1, key=key, path=CHAT_PATH,
                               body=BODY)
        wrong_key = run_open_loop(port, rate=10, duration_s=1, key="sk-emu-wrong",
                                  path=CHAT_PATH, body=BODY)

    assert (result.scheduled, result.requests, result.non_2xx, result.failed) == (40, 40, 0, 0)
    assert (wrong_key.requests, wrong_key.non_2xx, wrong_key.error_text()) == (
        10, 10, "non-2xx=10")


def test_ratios_use_each_peer_and_the_cpu_of_every_process_but_wrk() -> None:
    level = Level(16, {
        DIRECT: _run(DIRECT, 1000, {"envoy": 0.1, "wrk": 0.5}),
        GATEWAY: _run(GATEWAY, 600, {"extproc": 0.3, "envoy": 0.12, "wrk": 0.5}),
        "litellm-1w": _run("litellm-1w", 60, {"peer": 0.42, "wrk": 0.1}),
        "portkey": _run("portkey", 200, {"peer": 0.5, "wrk": 0.1}),
    })

    rows = ratios_table([level])
    targets = targets_table([level])

    assert rows[0] == ("| c | gateway row | rps / litellm-1w | rps / portkey "
                       "| CPU/req litellm-1w / gateway row | CPU/req portkey / gateway row |")
    # rps 300 vs 30 and 100; CPU/request 700 µs vs 7,000 and 2,500 µs.
    assert rows[2] == "| 16 | gateway | 10.00 | 3.00 | 10.00 | 3.57 |"
    assert targets[3] == ("| 16 | gateway | 300 | 1.50 | 4.00 | +0.00 | 0.60 | 500 | 200 "
                          "| — | — | 700 | non-2xx/3xx=3, read=1 |")
    assert [is_peer(name) for name in level.by_target] == [False, False, True, True]


def test_fastpath_row_is_switched_on_or_says_why_not(tmp_path: Path) -> None:
    """Before the fast path's setting lands the row is skipped with this reason; after,
    the bench config turns it on and still validates."""
    document = gateway_document(tmp_path, emulator_port=1, redis_port=2, pepper="p" * 64,
                                tenant_key="sk-asc-bench-unit")

    fast, reason = fastpath_document(document)

    if "fast_path" in Document.model_fields:
        assert fast is not None
        assert (fast["fast_path"], reason) == ({"enabled": True}, "")
        Document.model_validate(fast)
    else:
        assert (fast, reason) == (None, "the gateway config has no `fast_path` setting yet "
                                         "(issue 14 item 1 not merged)")


def test_rounds_rotate_and_the_median_round_is_reported_whole() -> None:
    names = [DIRECT, GATEWAY, "portkey"]
    slow, median, fast = (_run(GATEWAY, n, {"extproc": 0.3, "envoy": 0.1}, pace)
                          for n, pace in ((400, 1.5), (600, 1.0), (800, 0.9)))
    level = Level(16, {GATEWAY: median_run([fast, slow, median])})

    rows = rounds_section([level], {(16, GATEWAY): [fast, slow, median]})

    assert [rotated(names, index) for index in range(4)] == [
        [DIRECT, GATEWAY, "portkey"], [GATEWAY, "portkey", DIRECT],
        ["portkey", DIRECT, GATEWAY], [DIRECT, GATEWAY, "portkey"]]
    assert median_run([fast, slow]) is slow  # the lower middle of an even count
    # rps 200 / 300 / 400 (2 s runs); extproc 0.3 s over 800 / 400 / 600 requests.
    assert rows[6] == ("| 16 | gateway | round 3 | 400 / 200 / 300 | 375 / 750 / 500 "
                       "| 125 / 250 / 167 | n/a / n/a / n/a | 0.90 / 1.50 / 1.00 |")
    assert rounds_section([level], {(16, GATEWAY): [median]}) == []  # one round: no table


def test_speed_probe_samples_the_pace_while_a_run_waits() -> None:
    with SpeedProbe(interval_s=0.01) as probe:
        deadline = time.monotonic() + 10
        while len(probe.samples) < 3 and time.monotonic() < deadline:
            time.sleep(0.01)

    assert len(probe.samples) >= 3
    assert probe.median_ms() == statistics.median(probe.samples)
    assert all(sample > 0 for sample in probe.samples)


def test_the_callgrind_dump_total_is_read_exactly() -> None:
    dump = ("version: 1\ncreator: callgrind-3.19.0\npid: 42\ncmd: envoy -c x.yaml\n"
            "events: Ir\nfn=(1) main\n0 12\nsummary: 167599200\ntotals: 167599200\n")

    assert callgrind_total(dump) == 167_599_200
    with pytest.raises(ValueError, match="no totals line"):
        callgrind_total("events: Ir\nfn=(1) main\n0 12\n")
