"""The API surface through a real Envoy with the official SDKs: every endpoint against
every backend that serves it (emulator shapes), budgets charged from each endpoint's
real usage (read from the Redis ledger), tenants seeing exactly their models, and the
documented 4xx for pairs a backend cannot serve - with nothing sent to the provider."""

from __future__ import annotations

import base64
import json
import math
import secrets
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import anthropic
import httpx
import openai
import pytest
import redis

from extproc.auth import hash_key
from extproc.devstack import Stack
from extproc.emulator.api_surface import DEFAULT_DIMENSIONS, embedding_vector
from extproc.secrets import Secret
from tests.e2e.config_stack import start_from_config
from tests.polling import wait_for

PEPPER = "sdk-matrix-pepper-" + secrets.token_hex(6)
KEYS = {tenant: f"sk-canary-tenant-{tenant}-" + secrets.token_hex(8)
        for tenant in ("t1", "t2", "t3")}
PROVIDER_KEYS = {kind: f"sk-canary-{kind}-" + secrets.token_hex(8)
                 for kind in ("openai", "anthropic", "azure", "mistral", "compat", "gemini")}
BACKENDS = ("openai", "anthropic", "azure", "mistral", "compat", "gemini")
EMBEDDING_BACKENDS = ("openai", "azure", "mistral", "compat")
REPLY = "Hello from the emulator."
PROMPT = "Hello there"  # 11 characters: 3 prompt tokens in every emulator shape
CHAT_PRICE = {"input_per_mtok": 100, "output_per_mtok": 2000}
EMBEDDING_PRICE = {"input_per_mtok": 50}
CHAT_COST = 3 * 100 + 4 * 2000  # micro-USD for 3 prompt + 4 completion tokens


@dataclass
class Matrix:
    base_url: str
    emulators: dict[str, int]
    redis_port: int
    stack: Stack

    def recorded(self, backend: str) -> list[dict[str, Any]]:
        port = self.emulators[backend if backend in ("mistral", "gemini") else "main"]
        found: list[dict[str, Any]] = httpx.get(
            f"http://127.0.0.1:{port}/_emulator/requests", timeout=5).json()["requests"]
        return found

    def clear(self) -> None:
        for port in self.emulators.values():
            httpx.delete(f"http://127.0.0.1:{port}/_emulator/requests", timeout=5)

    def ledger(self, tenant: str = "t1") -> tuple[int, int]:
        """(spent, held) micro-USD of the tenant's monthly budget."""
        client = redis.Redis(port=self.redis_port, decode_responses=True)
        try:
            for key in client.scan_iter(f"asc:{{t:{tenant}}}:b:tenant:{tenant}:m*"):
                spent, held = client.hmget(key, "spent", "held")
                return int(spent or 0), int(held or 0)
            return 0, 0
        finally:
            client.close()

    def charged(self, before: tuple[int, int]) -> int:
        """What the requests since `before` were charged, once every hold is settled."""
        assert wait_for(lambda: self.ledger()[1] == 0)
        return self.ledger()[0] - before[0]

    def openai(self, tenant: str = "t1") -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.base_url}/v1", api_key=KEYS[tenant],
                             max_retries=0)

    def anthropic(self, tenant: str = "t1") -> anthropic.Anthropic:
        return anthropic.Anthropic(base_url=self.base_url, api_key=KEYS[tenant], max_retries=0)


def _config(main_port: int, mistral_port: int, gemini_port: int,
            redis_port: int) -> dict[str, Any]:
    main, mistral = f"http://127.0.0.1:{main_port}", f"http://127.0.0.1:{mistral_port}"
    kinds = {"openai": ("openai", main), "anthropic": ("anthropic", main),
             "azure": ("azure", main), "mistral": ("mistral", mistral),
             "compat": ("openai_compatible", main),
             "gemini": ("gemini", f"http://127.0.0.1:{gemini_port}")}
    providers = {f"p-{name}": {"kind": kind, "base_url": url, "region": "eu-west-1",
                               "zone": "eu", "cluster": f"c_{name}",
                               "credentials": [f"k-{name}"]}
                 for name, (kind, url) in kinds.items()}
    models: dict[str, Any] = {
        f"m-{name}": {"price": CHAT_PRICE,
                      "deployments": [{"provider": f"p-{name}", "model": f"up-{name}"}]}
        for name in kinds}
    models.update({
        f"e-{name}": {"kind": "embedding", "price": EMBEDDING_PRICE,
                      "deployments": [{"provider": f"p-{name}", "model": f"emb-{name}"}]}
        for name in kinds})

    def tenant(tenant_id: str, names: list[str], **extra: Any) -> dict[str, Any]:
        return {"zone": "eu", "models": names, **extra,
                "keys": [{"id": f"{tenant_id}-key",
                          "hash": hash_key(Secret(PEPPER), KEYS[tenant_id])}]}

    return {
        "version": 1,
        "auth": {"pepper": {"file": "pepper.txt"}},
        "redis": {"url": f"redis://127.0.0.1:{redis_port}/0"},
        "credentials": {f"k-{name}": {"env": f"MATRIX_KEY_{name.upper()}"} for name in kinds},
        "providers": providers,
        "models": models,
        "tenants": {
            "t1": tenant("t1", sorted(models),
                         budgets=[{"scope": "tenant", "window": "month", "limit_usd": 100}]),
            "t2": tenant("t2", ["m-openai", "e-openai"]),
            "t3": tenant("t3", ["m-openai"], responses_store=True),
        },
    }


@pytest.fixture(scope="module")
def matrix(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Matrix]:
    workdir = tmp_path_factory.mktemp("sdk-matrix")
    keys = list(PROVIDER_KEYS.values())
    with Stack(workdir) as stack:
        _, redis_port = stack.start_redis()
        _, main_port = stack.start_emulator(keys)
        _, mistral_port = stack.start_emulator(keys, extra_args=("--shape", "mistral"))
        _, gemini_port = stack.start_emulator(keys, extra_args=("--shape", "gemini"))
        listen_port = start_from_config(
            stack, _config(main_port, mistral_port, gemini_port, redis_port), pepper=PEPPER,
            key_env_prefix="MATRIX_KEY", provider_keys=PROVIDER_KEYS)
        yield Matrix(f"http://127.0.0.1:{listen_port}",
                     {"main": main_port, "mistral": mistral_port, "gemini": gemini_port},
                     redis_port, stack)


def _only_request(matrix: Matrix, backend: str) -> dict[str, Any]:
    """The one request the backend's provider received, checked for its own key."""
    from extproc.emulator.app import key_fingerprint

    [seen] = matrix.recorded(backend)
    auth = {"anthropic": "x-api-key", "azure": "api-key",
            "gemini": "x-goog-api-key"}.get(backend, "authorization")
    prefix = "Bearer " if auth == "authorization" else ""
    assert seen["headers"][auth] == prefix + key_fingerprint(PROVIDER_KEYS[backend])
    others = {"authorization", "x-api-key", "api-key", "x-goog-api-key"} - {auth}
    assert not others & set(seen["headers"])
    return seen


# -- chat, messages -----------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
def test_openai_sdk_chat_is_charged_its_usage(matrix: Matrix, backend: str) -> None:
    matrix.clear()
    before = matrix.ledger()
    completion = matrix.openai().chat.completions.create(
        model=f"m-{backend}", messages=[{"role": "user", "content": PROMPT}])
    assert completion.choices[0].message.content == REPLY
    assert matrix.charged(before) == CHAT_COST
    _only_request(matrix, backend)


@pytest.mark.parametrize("backend", ["anthropic", "openai"])
def test_anthropic_sdk_messages(matrix: Matrix, backend: str) -> None:
    matrix.clear()
    before = matrix.ledger()
    message = matrix.anthropic().messages.create(
        model=f"m-{backend}", max_tokens=64, messages=[{"role": "user", "content": PROMPT}])
    assert message.content[0].text == REPLY  # type: ignore[union-attr]
    assert matrix.charged(before) == CHAT_COST
    _only_request(matrix, backend)


# -- embeddings ---------------------------------------------------------------------------

@pytest.mark.parametrize("backend", EMBEDDING_BACKENDS)
def test_embeddings_batch_base64_is_charged_its_prompt_tokens(
    matrix: Matrix, backend: str,
) -> None:
    matrix.clear()
    before = matrix.ledger()
    # The SDK asks for base64 by itself and decodes it: the vectors prove it passed whole.
    raw = matrix.openai().embeddings.with_raw_response.create(
        model=f"e-{backend}", input=[PROMPT, "abc"])
    result = raw.parse()
    assert [item.index for item in result.data] == [0, 1]
    for item, text in zip(result.data, [PROMPT, "abc"], strict=True):
        expected = struct.unpack(f"<{DEFAULT_DIMENSIONS}f", struct.pack(
            f"<{DEFAULT_DIMENSIONS}f", *embedding_vector(item.index, text, DEFAULT_DIMENSIONS)))
        assert item.embedding == list(expected)
    assert result.usage.prompt_tokens == 3 + 1
    assert matrix.charged(before) == 4 * 50
    assert raw.headers["x-asc-cost-usd"] == "0.000200"
    seen = _only_request(matrix, backend)
    body = json.loads(seen["body"])
    assert body["encoding_format"] == "base64"
    assert body["input"] == [PROMPT, "abc"]
    if backend == "azure":
        assert seen["path"] == "/openai/deployments/emb-azure/embeddings"
        assert "model" not in body
    else:
        assert (seen["path"], body["model"]) == ("/v1/embeddings", f"emb-{backend}")


def test_embeddings_token_arrays_are_held_and_charged_by_count(matrix: Matrix) -> None:
    matrix.clear()
    before = matrix.ledger()
    response = httpx.post(f"{matrix.base_url}/v1/embeddings", timeout=10, json={
        "model": "e-openai", "input": [[1, 2, 3], [4, 5]], "encoding_format": "float"},
        headers={"authorization": f"Bearer {KEYS['t1']}"})
    assert response.status_code == 200
    body = response.json()
    assert body["usage"] == {"prompt_tokens": 5, "total_tokens": 5}
    assert body["data"][1]["embedding"] == embedding_vector(1, "4,5", DEFAULT_DIMENSIONS)
    assert matrix.charged(before) == 5 * 50


@pytest.mark.parametrize(("backend", "name"), [("anthropic", "Anthropic"),
                                               ("gemini", "Gemini")])
def test_embeddings_on_a_backend_without_them_are_refused_and_sent_nowhere(
    matrix: Matrix, backend: str, name: str,
) -> None:
    matrix.clear()
    with pytest.raises(openai.BadRequestError) as caught:
        matrix.openai().embeddings.create(model=f"e-{backend}", input=PROMPT)
    assert caught.value.status_code == 400
    assert caught.value.body == {
        "message": "The endpoint POST /v1/embeddings is not available for the model "
                   f"'e-{backend}': {name} does not serve it.",
        "type": "invalid_request_error", "param": "model", "code": "invalid_request"}
    assert matrix.recorded(backend) == []


def test_a_chat_model_at_the_embeddings_endpoint_is_refused(matrix: Matrix) -> None:
    matrix.clear()
    with pytest.raises(openai.BadRequestError) as caught:
        matrix.openai().embeddings.create(model="m-openai", input=PROMPT)
    assert caught.value.body == {
        "message": "The endpoint POST /v1/embeddings does not serve the chat model "
                   "'m-openai': it is not an embedding model.",
        "type": "invalid_request_error", "param": "model", "code": "invalid_request"}
    assert matrix.recorded("openai") == []


# -- models -------------------------------------------------------------------------------

def test_models_list_is_the_tenants_own(matrix: Matrix) -> None:
    matrix.clear()
    listed = [model.id for model in matrix.openai("t2").models.list()]
    assert listed == ["e-openai", "m-openai"]
    everything = [model.id for model in matrix.openai("t1").models.list()]
    assert everything == sorted([f"m-{b}" for b in BACKENDS] + [f"e-{b}" for b in BACKENDS])
    model = matrix.openai("t2").models.retrieve("m-openai")
    assert (model.id, model.object, model.owned_by) == ("m-openai", "model", "asc")
    with pytest.raises(openai.NotFoundError) as caught:
        matrix.openai("t2").models.retrieve("m-anthropic")  # another tenant's model
    assert caught.value.body == {
        "message": "The model 'm-anthropic' does not exist or you do not have access to it.",
        "type": "not_found_error", "param": "model", "code": "model_not_found"}
    for backend in ("openai", "mistral"):
        assert matrix.recorded(backend) == []


def test_anthropic_sdk_models_list_in_anthropic_shape(matrix: Matrix) -> None:
    page = matrix.anthropic("t2").models.list()
    assert [(m.id, m.type, m.display_name) for m in page.data] == [
        ("e-openai", "model", "e-openai"), ("m-openai", "model", "m-openai")]
    assert (page.first_id, page.last_id, page.has_more) == ("e-openai", "m-openai", False)
    raw = httpx.get(f"{matrix.base_url}/v1/models", timeout=10, headers={
        "x-api-key": KEYS["t2"], "anthropic-version": "2023-06-01"})
    assert raw.json() == {"data": [
        {"type": "model", "id": name, "display_name": name,
         "created_at": "1970-01-01T00:00:00Z"} for name in ("e-openai", "m-openai")],
        "has_more": False, "first_id": "e-openai", "last_id": "m-openai"}


def test_models_without_a_key_is_401(matrix: Matrix) -> None:
    response = httpx.get(f"{matrix.base_url}/v1/models", timeout=10)
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "invalid_api_key"


# -- responses ----------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
def test_responses_plain_is_charged_its_usage(matrix: Matrix, backend: str) -> None:
    matrix.clear()
    before = matrix.ledger()
    response = matrix.openai().responses.create(model=f"m-{backend}", input=PROMPT)
    assert response.output_text == REPLY
    assert response.status == "completed"
    assert response.usage is not None
    assert (response.usage.input_tokens, response.usage.output_tokens) == (3, 4)
    assert matrix.charged(before) == CHAT_COST
    seen = _only_request(matrix, backend)
    expected_path = {"openai": "/v1/responses", "azure": "/openai/v1/responses",
                     "anthropic": "/v1/messages",
                     "gemini": "/v1beta/models/up-gemini:generateContent"}.get(
                         backend, "/v1/chat/completions")
    assert seen["path"] == expected_path
    if backend in ("openai", "azure"):
        assert json.loads(seen["body"])["store"] is False  # forced for this tenant


@pytest.mark.parametrize("backend", BACKENDS)
def test_responses_streamed_is_charged_its_usage(matrix: Matrix, backend: str) -> None:
    matrix.clear()
    before = matrix.ledger()
    pieces, kinds = [], []
    final = None
    for event in matrix.openai().responses.create(model=f"m-{backend}", input=PROMPT,
                                                  stream=True):
        kinds.append(event.type)
        if event.type == "response.output_text.delta":
            pieces.append(event.delta)
        if event.type == "response.completed":
            final = event.response
    assert "".join(pieces) == REPLY
    assert kinds[:2] == ["response.created", "response.in_progress"]
    assert kinds[-1] == "response.completed"
    assert final is not None
    assert final.usage is not None
    assert final.output_text == REPLY
    assert (final.usage.input_tokens, final.usage.output_tokens) == (3, 4)
    assert matrix.charged(before) == CHAT_COST
    _only_request(matrix, backend)


@pytest.mark.parametrize("backend", ["anthropic", "mistral", "openai", "gemini"])
def test_responses_function_tool_call(matrix: Matrix, backend: str) -> None:
    matrix.clear()
    tool = {"type": "function", "name": "get_weather", "description": "Weather for a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                           "required": ["city"]}}
    response = matrix.openai().responses.create(
        model=f"m-{backend}", input="What is the weather in Paris?", tools=[tool])  # type: ignore[list-item]
    [call] = [item for item in response.output if item.type == "function_call"]
    assert (call.name, json.loads(call.arguments)) == ("get_weather", {"city": "Paris"})
    answer = matrix.openai().responses.create(model=f"m-{backend}", tools=[tool], input=[  # type: ignore[list-item]
        {"role": "user", "content": "What is the weather in Paris?"},
        {"type": "function_call", "call_id": call.call_id, "name": call.name,
         "arguments": call.arguments},
        {"type": "function_call_output", "call_id": call.call_id, "output": "Sunny"}])
    assert answer.output_text == REPLY


def test_responses_built_in_tool_on_a_chat_backend_is_refused(matrix: Matrix) -> None:
    matrix.clear()
    with pytest.raises(openai.BadRequestError) as caught:
        matrix.openai().responses.create(model="m-anthropic", input=PROMPT,
                                         tools=[{"type": "web_search"}])
    assert caught.value.body == {
        "message": "The tool type 'web_search' (tools[0]) is not supported by Anthropic: "
                   "built-in tools run only on OpenAI and Azure OpenAI; use function tools.",
        "type": "invalid_request_error", "param": "tools[0].type", "code": "invalid_request"}
    assert matrix.recorded("anthropic") == []


def test_responses_store_is_refused_without_the_tenant_flag(matrix: Matrix) -> None:
    matrix.clear()
    for field, value in (("store", True), ("previous_response_id", "resp_other")):
        with pytest.raises(openai.BadRequestError) as caught:
            matrix.openai().responses.create(model="m-openai", input=PROMPT,
                                             extra_body={field: value})
        assert caught.value.body["param"] == field  # type: ignore[index]
    assert matrix.recorded("openai") == []
    stored = matrix.openai("t3").responses.create(model="m-openai", input=PROMPT, store=True)
    assert stored.output_text == REPLY
    assert json.loads(_only_request(matrix, "openai")["body"])["store"] is True


# -- count_tokens -------------------------------------------------------------------------

def test_count_tokens_by_anthropic_is_passed_through_and_not_charged(matrix: Matrix) -> None:
    matrix.clear()
    before = matrix.ledger()
    counted = matrix.anthropic().messages.count_tokens(
        model="m-anthropic", messages=[{"role": "user", "content": PROMPT}])
    assert counted.input_tokens == 3
    seen = _only_request(matrix, "anthropic")
    assert seen["path"] == "/v1/messages/count_tokens"
    assert json.loads(seen["body"])["model"] == "up-anthropic"
    assert matrix.charged(before) == 0


@pytest.mark.parametrize("backend", ["openai", "mistral", "azure", "gemini"])
def test_count_tokens_elsewhere_is_the_gateways_estimate(matrix: Matrix, backend: str) -> None:
    matrix.clear()
    before = matrix.ledger()
    body = {"model": f"m-{backend}", "messages": [{"role": "user", "content": PROMPT}]}
    raw = json.dumps(body).encode()
    response = httpx.post(f"{matrix.base_url}/v1/messages/count_tokens", content=raw,
                          timeout=10, headers={"x-api-key": KEYS["t1"],
                                               "anthropic-version": "2023-06-01",
                                               "content-type": "application/json"})
    assert response.status_code == 200
    assert response.json() == {"input_tokens": math.ceil(len(raw) / 3)}
    counted = matrix.anthropic().messages.count_tokens(
        model=f"m-{backend}", messages=[{"role": "user", "content": PROMPT}])
    assert counted.input_tokens > 0
    assert matrix.recorded(backend) == []
    assert matrix.charged(before) == 0


def test_unknown_endpoint_is_404_in_the_door_dialect(matrix: Matrix) -> None:
    response = httpx.get(f"{matrix.base_url}/v1/messages", timeout=10,
                         headers={"x-api-key": KEYS["t1"]})
    assert response.status_code == 404
    assert response.json() == {"type": "error", "error": {
        "type": "not_found_error", "message": "Unknown endpoint: GET /v1/messages"}}


def test_base64_embedding_bytes_are_the_providers(matrix: Matrix) -> None:
    response = httpx.post(f"{matrix.base_url}/v1/embeddings", timeout=10, json={
        "model": "e-mistral", "input": "abc", "encoding_format": "base64"},
        headers={"authorization": f"Bearer {KEYS['t1']}"})
    encoded = response.json()["data"][0]["embedding"]
    vector = embedding_vector(0, "abc", DEFAULT_DIMENSIONS)
    assert base64.b64decode(encoded) == struct.pack(f"<{DEFAULT_DIMENSIONS}f", *vector)


def test_no_secret_in_any_log_after_the_matrix(matrix: Matrix) -> None:
    """Last in the file: every endpoint above ran; no process logged a key or the pepper."""
    canaries = [PEPPER, *KEYS.values(), *PROVIDER_KEYS.values()]
    leaks = [(process.name, canary[:14]) for process in matrix.stack.processes
             for canary in canaries if canary in process.log_text()]
    assert leaks == []
    assert any("embeddings" in p.log_text() for p in matrix.stack.processes
               if p.name.startswith("extproc"))
