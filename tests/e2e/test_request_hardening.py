"""Hostile and odd input through real Envoy, the real extproc service and the emulator:
provider text that used to stall the event loop, request bodies that used to give 500s."""

from __future__ import annotations

import concurrent.futures
import time

from tests.conftest import ACME_KEY, GLOBEX_KEY, Emulator, Gateway, chat_body


def openai_error(
    message: str, type_: str, code: str, param: str | None = None
) -> dict[str, object]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def _wait_recorded(emulator: Emulator, count: int) -> None:
    """Poll (bounded) until the emulator recorded `count` requests."""
    for _ in range(500):
        if len(emulator.requests()) >= count:
            return
        time.sleep(0.01)
    raise AssertionError(f"the emulator never recorded {count} request(s)")


def test_provider_echoing_a_huge_field_is_answered_quickly_and_blocks_no_one(
    gateway: Gateway, emulator_clean: Emulator
) -> None:
    # A provider 400 echoing a 1 MiB unknown field name: scrubbing it used to take hours.
    field = "x" * (1 << 20)
    emulator_clean.queue_fault(status=400,
                               message=f"Unrecognized request argument supplied: {field}")
    started = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        hostile = pool.submit(gateway.chat, chat_body(), key=ACME_KEY)
        _wait_recorded(emulator_clean, 1)  # the fault is taken: the next call is normal
        other = pool.submit(gateway.chat, chat_body(), key=GLOBEX_KEY)
        hostile_response, other_response = hostile.result(), other.result()
    elapsed = time.monotonic() - started

    assert hostile_response.status_code == 400
    assert hostile_response.json() == openai_error(
        "Unrecognized request argument supplied: ...", "invalid_request_error",
        "invalid_request")
    assert other_response.status_code == 200
    assert other_response.headers["x-asc-provider"] == "emu-us"
    assert elapsed < 5.0  # one generous bound: the unfixed scrub ran for hours
