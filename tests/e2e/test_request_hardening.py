"""Hostile and odd input through real Envoy, the real extproc service and the emulator:
provider text that used to stall the event loop, request bodies that used to give 500s."""

from __future__ import annotations

import concurrent.futures
import json
import time

import httpx
import pytest

from tests.conftest import ACME_KEY, CHAT, GLOBEX_KEY, Emulator, Gateway, chat_body
from tests.polling import wait_for


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


MESSAGES = "/v1/messages"
_ANTHROPIC_TYPES = {"invalid_request": "invalid_request_error",
                    "model_not_found": "not_found_error"}


def _post(gateway: Gateway, path: str, payload: bytes) -> httpx.Response:
    headers = {"content-type": "application/json", "authorization": f"Bearer {ACME_KEY}"}
    return gateway.client.post(path, content=payload, headers=headers)


def _expected(path: str, message: str, code: str, param: str | None) -> dict[str, object]:
    if path == MESSAGES:
        return {"type": "error", "error": {"type": _ANTHROPIC_TYPES[code], "message": message}}
    type_ = "invalid_request_error" if code == "invalid_request" else "not_found_error"
    return openai_error(message, type_, code, param)


def _body(path: str, model: str = '"gpt-4o-mini"', content: str = '"Hello"',
          extra: str = "") -> bytes:
    limit = ',"max_tokens":16' if path == MESSAGES else ""
    return (f'{{"model":{model},"messages":[{{"role":"user","content":{content}}}]'
            f"{limit}{extra}}}").encode()


DEEP = 30_000  # fits the test config's 64 KiB body limit; far beyond the parser's stack


@pytest.mark.parametrize("path", [CHAT, MESSAGES])
@pytest.mark.parametrize(("case", "message", "code", "param"), [
    ("nested", "The request body is nested too deeply.", "invalid_request", None),
    ("surrogate-content",
     "The request body contains a lone surrogate escape, which is not valid Unicode.",
     "invalid_request", None),
    ("surrogate-model",
     "The request body contains a lone surrogate escape, which is not valid Unicode.",
     "invalid_request", None),
])
def test_odd_json_is_a_400_in_the_door_dialect(
    gateway: Gateway, emulator_clean: Emulator, path: str, case: str, message: str,
    code: str, param: str | None,
) -> None:
    payload = {
        "nested": _body(path, extra=',"metadata":' + "[" * DEEP + "]" * DEEP),
        "surrogate-content": _body(path, content='"broken \\ud800 half"'),
        "surrogate-model": _body(path, model='"gpt-4o-mini\\udfff"'),
    }[case]
    response = _post(gateway, path, payload)

    assert response.status_code == 400
    assert response.json() == _expected(path, message, code, param)
    assert emulator_clean.requests() == []


def test_paired_surrogate_escapes_are_fine(gateway: Gateway, emulator_clean: Emulator) -> None:
    response = _post(gateway, CHAT, _body(CHAT, content='"smile \\ud83d\\ude00"'))
    assert response.status_code == 200
    [seen] = emulator_clean.requests()
    assert json.loads(seen["body"])["messages"][0]["content"] == "smile \U0001f600"


@pytest.mark.parametrize("path", [CHAT, MESSAGES])
def test_unknown_long_model_name_is_a_404_capped_in_answer_and_log(
    gateway: Gateway, emulator_clean: Emulator, path: str
) -> None:
    name = "no-such-model-" + "z" * 60_000
    response = _post(gateway, path, _body(path, model=json.dumps(name)))

    assert response.status_code == 404
    assert response.json() == _expected(
        path, f"The model '{name[:64]}...' does not exist.", "model_not_found", "model")
    assert emulator_clean.requests() == []
    # The request's log line is written when its stream ends, which may be after the
    # client has the answer: poll for it.
    assert wait_for(lambda: name[:64] + "..." in gateway.extproc.log_text())
    assert name[:65] not in gateway.extproc.log_text()


LEAKY_STREAM_ERROR = ("Overloaded for organization org-AbCd1234xyz, key sk-live-abcdefgh1234: "
                      "Limit 10000, Used 9990")
SCRUBBED_STREAM_ERROR = ("Overloaded for organization [redacted], key [redacted]: "
                         "Limit [redacted], Used [redacted]")


@pytest.mark.parametrize("include_usage", [True, False])
def test_in_stream_provider_error_is_scrubbed(
    gateway: Gateway, emulator_clean: Emulator, include_usage: bool
) -> None:
    emulator_clean.queue_fault(stream_error=LEAKY_STREAM_ERROR)
    body = chat_body(stream=True, stream_options={"include_usage": include_usage})
    with gateway.client.stream("POST", CHAT, json=body,
                               headers={"authorization": f"Bearer {ACME_KEY}"}) as response:
        assert response.status_code == 200
        text = response.read().decode()

    events = [json.loads(line.removeprefix("data: ")) for line in text.splitlines()
              if line.startswith("data: ")]
    assert events[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert events[1:] == [{"error": {"message": SCRUBBED_STREAM_ERROR,
                                     "type": "server_error"}}]
    assert "org-AbCd1234xyz" not in text
