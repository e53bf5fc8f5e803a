"""The emulator's embeddings, Responses and count_tokens endpoints
(`extproc.emulator.api_surface`): what they refuse like the real APIs, and the exact
counts budgets are asserted against."""

from __future__ import annotations

import base64
import struct
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from extproc.emulator import EmulatorConfig, make_app
from extproc.emulator.api_surface import DEFAULT_DIMENSIONS, embedding_vector
from extproc.emulator.app import SHAPES, shapes_named

KEY = "sk-emu-surface-key"
BEARER = {"Authorization": f"Bearer {KEY}"}
Client = TestClient[web.Request, web.Application]


@pytest.fixture
async def make_client() -> AsyncIterator[Callable[..., Any]]:
    clients: list[Client] = []

    async def factory(*names: str) -> Client:
        shapes = shapes_named(names) if names else SHAPES
        client: Client = TestClient(TestServer(make_app(
            EmulatorConfig(keys=frozenset({KEY})), shapes)))
        await client.start_server()
        clients.append(client)
        return client

    yield factory
    for client in clients:
        await client.close()


async def test_openai_embeddings_count_and_encode(make_client: Callable[..., Any]) -> None:
    client = await make_client()
    resp = await client.post("/v1/embeddings", headers=BEARER, json={
        "model": "e", "input": ["Hello there", [1, 2, 3]], "encoding_format": "base64",
        "dimensions": 4})
    body = await resp.json()
    assert resp.status == 200
    assert body["usage"] == {"prompt_tokens": 3 + 3, "total_tokens": 6}
    assert base64.b64decode(body["data"][0]["embedding"]) == struct.pack(
        "<4f", *embedding_vector(0, "Hello there", 4))
    assert body["data"][1]["index"] == 1


async def test_mistral_embeddings_refuse_token_ids(make_client: Callable[..., Any]) -> None:
    client = await make_client("mistral")
    refused = await client.post("/v1/embeddings", headers=BEARER,
                                json={"model": "e", "input": [[1, 2]]})
    assert refused.status == 422
    ok = await client.post("/v1/embeddings", headers=BEARER,
                           json={"model": "e", "input": "abcd", "output_dimension": 2})
    body = await ok.json()
    assert body["usage"] == {"prompt_tokens": 1, "total_tokens": 1, "completion_tokens": 0}
    assert len(body["data"][0]["embedding"]) == 2


async def test_azure_embeddings_need_an_api_version(make_client: Callable[..., Any]) -> None:
    client = await make_client()
    path = "/openai/deployments/emb/embeddings"
    missing = await client.post(path, headers={"api-key": KEY}, json={"input": "a"})
    assert missing.status == 404
    ok = await client.post(path + "?api-version=2024-10-21", headers={"api-key": KEY},
                           json={"input": "a"})
    body = await ok.json()
    assert (body["model"], len(body["data"][0]["embedding"])) == ("emb", DEFAULT_DIMENSIONS)


async def test_responses_refuse_what_the_real_api_refuses(
        make_client: Callable[..., Any]) -> None:
    client = await make_client()
    cases = [({"model": "m"}, 400, "input"),
             ({"model": "m", "input": "x", "frobnicate": 1}, 400, "frobnicate"),
             ({"model": "m", "input": "x", "previous_response_id": "resp_1"}, 404,
              "previous_response_id"),
             ({"model": "m", "input": "x", "max_output_tokens": 4}, 400, "max_output_tokens")]
    for payload, status, param in cases:
        resp = await client.post("/v1/responses", headers=BEARER, json=payload)
        assert (resp.status, (await resp.json())["error"]["param"]) == (status, param)


async def test_responses_cut_by_max_output_tokens(make_client: Callable[..., Any]) -> None:
    client = await make_client()
    resp = await client.post("/v1/responses", headers=BEARER, json={
        "model": "m", "instructions": "abcd", "input": [
            {"role": "user", "content": [{"type": "input_text", "text": "abcdefgh"}]}],
        "max_output_tokens": 16})
    body = await resp.json()
    assert (body["status"], body["usage"]["input_tokens"], body["usage"]["output_tokens"]) == (
        "completed", 3, 4)
    assert body["store"] is True  # the API's default when the client sends none


async def test_count_tokens_counts_like_messages(make_client: Callable[..., Any]) -> None:
    client = await make_client()
    headers = {"x-api-key": KEY, "anthropic-version": "2023-06-01"}
    resp = await client.post("/v1/messages/count_tokens", headers=headers, json={
        "model": "c", "system": "abcd", "messages": [{"role": "user", "content": "Hello there"}]})
    assert (resp.status, await resp.json()) == (200, {"input_tokens": 4})
    bad = await client.post("/v1/messages/count_tokens", headers=headers,
                            json={"model": "c", "messages": []})
    assert bad.status == 400
