"""Captured text is sealed under the tenant's scope and the request id: it opens with the
KEK it was sealed under, for that record only (real AES-GCM and FileKek, no mocks)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from extproc.audit.capture import (
    MAX_CAPTURE_BYTES,
    Capture,
    CaptureError,
    open_capture,
    seal_capture,
)
from extproc.credentials.kek import FileKek, init_kek_file

SECRET_TEXT = "patient 4711 has condition X"


@pytest.fixture
def kek(tmp_path: Path) -> FileKek:
    return FileKek.load(init_kek_file(tmp_path / "kek.key"))


async def sealed_record(kek: FileKek, request_id: str = "a" * 32) -> dict[str, object]:
    capture = Capture("acme")
    capture.keep_request(json.dumps({"messages": [{"content": SECRET_TEXT}]}).encode())
    capture.keep_response(b'{"choices": [')
    capture.keep_response(b'{"text": "ok"}]}')
    return {"request_id": request_id, "tenant": "acme",
            "capture": await seal_capture(kek, capture, request_id)}


async def test_round_trip_for_the_kek_holder_and_no_plaintext_in_the_record(
        kek: FileKek) -> None:
    record = await sealed_record(kek)
    assert SECRET_TEXT not in json.dumps(record)
    assert record["capture"]["scope"] == "tenant:acme"  # type: ignore[index]
    opened = await open_capture(kek, record)
    assert json.loads(opened["request"]) == {"messages": [{"content": SECRET_TEXT}]}
    assert opened["response"] == '{"choices": [{"text": "ok"}]}'
    assert opened["truncated"] is False
    assert repr(Capture("acme")) == "Capture(tenant='acme', truncated=False)"


async def test_moved_to_another_record_or_tenant_or_kek_does_not_open(
        kek: FileKek, tmp_path: Path) -> None:
    record = await sealed_record(kek)
    moved = {**record, "request_id": "b" * 32}
    with pytest.raises(CaptureError, match=r"cannot open the capture of b{32}: KekError"):
        await open_capture(kek, moved)
    other_tenant = {**record, "tenant": "globex"}
    with pytest.raises(CaptureError, match="scope does not match"):
        await open_capture(kek, other_tenant)
    other_kek = FileKek.load(init_kek_file(tmp_path / "other.key"))
    with pytest.raises(CaptureError, match="sealed under KEK file:sha256:"):
        await open_capture(other_kek, record)


def test_capture_is_bounded_per_direction() -> None:
    capture = Capture("acme")
    capture.keep_request(b"x" * (MAX_CAPTURE_BYTES + 1))
    assert len(capture.request) == MAX_CAPTURE_BYTES
    assert capture.truncated
    capture = Capture("acme")
    for _ in range(3):
        capture.keep_response(b"y" * (MAX_CAPTURE_BYTES // 2))
    assert len(capture.response) == MAX_CAPTURE_BYTES
    assert capture.truncated
