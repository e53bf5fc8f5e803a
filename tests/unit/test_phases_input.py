"""Hostile request bodies in the request-body phase: never a 500."""

from __future__ import annotations

import pytest

from extproc.messages import Continue, Respond
from tests.unit.test_phases import make_processor, request_body, request_headers


def _nested(depth: int) -> bytes:
    return (b'{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}],'
            b'"metadata":' + b"[" * depth + b"]" * depth + b"}")


@pytest.mark.parametrize("depth", [100, 900, 960, 985, 995, 1_000, 1_100, 1_900])  # 4 KiB limit
async def test_any_nesting_depth_is_routed_or_a_400(depth: int) -> None:
    processor = make_processor()
    await processor.handle(request_headers())
    reply = await processor.handle(request_body(_nested(depth)))
    if isinstance(reply, Respond):
        assert (reply.status, processor.error is not None) == (400, True)
        assert b"The request body is nested too deeply." in reply.body
    else:
        assert isinstance(reply, Continue)
        assert reply.body is not None


@pytest.mark.parametrize("raw", [
    b'{"model":"gpt-4o-mini","messages":[{"role":"user","content":"a\\ud800b"}]}',
    b'{"model":"gpt-4o-mini","messages":[{"role":"user","content":"\\udc00"}]}',
    b'{"model":"gpt-4o-mini\\uDBFF","messages":[{"role":"user","content":"hi"}]}',
    b'{"model":"gpt-4o-mini","messages":[{"role":"user","content":"ok"}],"\\ud800":1}',
])
async def test_lone_surrogates_are_a_400(raw: bytes) -> None:
    processor = make_processor()
    await processor.handle(request_headers())
    reply = await processor.handle(request_body(raw))
    assert isinstance(reply, Respond)
    assert reply.status == 400
    assert b"lone surrogate escape" in reply.body


async def test_unknown_model_is_cut_in_message_and_metadata() -> None:
    processor = make_processor()
    await processor.handle(request_headers())
    name = "m" * 3_000
    reply = await processor.handle(request_body(
        {"model": name, "messages": [{"role": "user", "content": "hi"}]}))
    assert isinstance(reply, Respond)
    assert reply.status == 404
    assert reply.metadata is not None
    assert reply.metadata["model"] == "m" * 64 + "..."
    assert processor.model_asked == "m" * 64 + "..."
