"""Embeddings: the sentence-transformers recipe, the local embedder, the SDK, the server's
/v1/embeddings, the remote backend, the store and bad input.

Tiny random sentence-transformers directories stand in for real models; their vectors are
checked against sentence-transformers itself. The real all-MiniLM-L6-v2 (the embedded
default, pulled from its PyPI wheel) is in the slow tests.
"""

from __future__ import annotations

import base64
import json
import math
import struct
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

import openweight
from openweight import Client, InvalidRequestError, ModelLoadError
from openweight.embedding import EmbedRequest, shorten
from openweight.local import embedder as embedder_mod
from openweight.local.embed_config import is_embedding_dir, read_embed_config
from openweight.local.embedder import LocalEmbedder
from openweight.wire.embeddings import embedding_result_from_json

from conftest import ServerThread, build_tiny_embedder

TEXTS = ["The cat sat on the mat.", "A quick brown fox", "hi",
         "Text into vectors, compared by angle."]


def cosine(a: list[float], b: list[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b, strict=True))
    return dot / (math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b)))


@pytest.fixture(scope="module")
def embedders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One tiny model per pooling rule (BERT for most, a Qwen3 decoder for last-token)."""
    root = tmp_path_factory.mktemp("embedders")
    out = {}
    for arch, pooling in (("bert", "mean"), ("bert", "cls"), ("bert", "max"),
                          ("bert", "mean_sqrt_len"), ("qwen3", "lasttoken")):
        path = root / f"{arch}-{pooling}"
        path.mkdir()
        out[pooling] = build_tiny_embedder(path, arch=arch, pooling=pooling,
                                           normalize=pooling != "max", max_seq_length=64)
    return out


# -- the recipe, read from the model's own files --------------------------------------------

def test_the_recipe_is_read_from_modules_json(embedders: dict[str, Path],
                                              tiny_model: Path) -> None:
    config = read_embed_config(embedders["lasttoken"])
    assert (config.pooling, config.normalize, config.max_tokens, config.dimensions) == (
        "lasttoken", True, 64, 32)
    assert read_embed_config(embedders["max"]).normalize is False
    assert is_embedding_dir(embedders["mean"]) and not is_embedding_dir(tiny_model)


def test_a_recipe_openweight_cannot_follow_is_named(embedders: dict[str, Path],
                                                   tmp_path: Path) -> None:
    import shutil

    model = tmp_path / "dense"
    shutil.copytree(embedders["mean"], model)
    modules = json.loads((model / "modules.json").read_text())
    modules.append({"idx": 3, "name": "3", "path": "3_Dense",
                    "type": "sentence_transformers.models.Dense"})
    (model / "modules.json").write_text(json.dumps(modules))
    with pytest.raises(ModelLoadError, match=r"models\.Dense"):
        read_embed_config(model)
    (model / "modules.json").write_text(json.dumps(modules[:3]))
    pooling = model / "1_Pooling" / "config.json"
    pooling.write_text(json.dumps({"pooling_mode_weightedmean_tokens": True}))
    with pytest.raises(ModelLoadError, match="weightedmean"):
        read_embed_config(model)


# -- vectors: the same as sentence-transformers' -------------------------------------------

@pytest.mark.parametrize("pooling", ["mean", "cls", "max", "mean_sqrt_len", "lasttoken"])
def test_vectors_equal_sentence_transformers(embedders: dict[str, Path], pooling: str) -> None:
    from sentence_transformers import SentenceTransformer

    path = embedders[pooling]
    expected = SentenceTransformer(str(path), device="cpu").encode(TEXTS, batch_size=2)
    result = LocalEmbedder(path, dtype="float32").embed(EmbedRequest.build(TEXTS))
    assert result.dimensions == 32 and len(result.vectors) == len(TEXTS)
    for mine, theirs in zip(result.vectors, expected.tolist(), strict=True):
        assert cosine(mine, theirs) > 0.99999
        assert max(abs(a - b) for a, b in zip(mine, theirs, strict=True)) < 1e-4
    if pooling != "max":
        assert all(abs(math.hypot(*v) - 1) < 1e-5 for v in result.vectors)


def test_usage_counts_the_tokens_embedded(tiny_embedder: Path) -> None:
    result = LocalEmbedder(tiny_embedder).embed(EmbedRequest.build(["abc", "de"]))
    assert result.usage.prompt_tokens == 5  # one token per byte
    assert result.usage.completion_tokens == 0


def test_token_id_input_is_the_same_as_its_text(tiny_embedder: Path) -> None:
    engine = LocalEmbedder(tiny_embedder, dtype="float32")
    ids = engine.loaded.tokenizer("hello")["input_ids"]
    by_text = engine.embed(EmbedRequest.build("hello")).vectors[0]
    by_ids = engine.embed(EmbedRequest.build(ids)).vectors[0]
    assert by_text == pytest.approx(by_ids, abs=1e-6)


def test_concurrent_requests_are_batched_and_each_gets_its_own_vectors(
        tiny_embedder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    engine = LocalEmbedder(tiny_embedder, dtype="float32")
    alone = {t: engine.embed(EmbedRequest.build(t)).vectors[0] for t in TEXTS}
    calls: list[int] = []
    real = embedder_mod._encode
    gate = threading.Event()

    def slow_encode(lm: Any, seqs: list[list[int]]) -> list[list[float]]:
        calls.append(len(seqs))
        gate.wait(5)  # the first batch waits while the other requests queue up
        return real(lm, seqs)

    monkeypatch.setattr(embedder_mod, "_encode", slow_encode)
    results: dict[int, list[float]] = {}

    def ask(n: int) -> None:
        results[n] = engine.embed(EmbedRequest.build(TEXTS[n % len(TEXTS)])).vectors[0]

    threads = [threading.Thread(target=ask, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    threading.Timer(0.5, gate.set).start()
    for t in threads:
        t.join(10)
    assert len(results) == 8
    for n, vector in results.items():
        assert vector == pytest.approx(alone[TEXTS[n % len(TEXTS)]], abs=1e-5)
    assert sum(calls) == 8 and len(calls) < 8  # fewer forward passes than requests


def test_an_error_in_a_batch_reaches_every_request_and_the_model_recovers(
        tiny_embedder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    engine = LocalEmbedder(tiny_embedder)

    def broken(lm: Any, seqs: list[list[int]]) -> list[list[float]]:
        raise RuntimeError("out of memory")

    monkeypatch.setattr(embedder_mod, "_encode", broken)
    with pytest.raises(RuntimeError, match="out of memory"):
        engine.embed(EmbedRequest.build("x"))
    monkeypatch.undo()
    assert len(engine.embed(EmbedRequest.build("x")).vectors) == 1


# -- long inputs, dimensions, bad input ------------------------------------------------------

def test_an_input_longer_than_the_window_is_an_error_naming_the_limit(
        tiny_embedder: Path) -> None:
    engine = LocalEmbedder(tiny_embedder)
    with pytest.raises(InvalidRequestError, match=r"input\[1\] is 60 tokens long.*at most 48"):
        engine.embed(EmbedRequest.build(["short", "x" * 60]))
    cut = engine.embed(EmbedRequest.build(["x" * 60], truncate=True))
    same = engine.embed(EmbedRequest.build(["x" * 48]))
    assert cut.usage.prompt_tokens == 48
    assert cut.vectors[0] == pytest.approx(same.vectors[0], abs=1e-5)


def test_dimensions_keep_the_first_numbers_renormalised(tiny_embedder: Path) -> None:
    engine = LocalEmbedder(tiny_embedder, dtype="float32")
    full = engine.embed(EmbedRequest.build("hello")).vectors[0]
    short = engine.embed(EmbedRequest.build("hello", dimensions=8))
    assert short.dimensions == 8
    norm = math.sqrt(sum(x * x for x in full[:8]))
    assert short.vectors[0] == pytest.approx([x / norm for x in full[:8]], abs=1e-6)
    with pytest.raises(InvalidRequestError, match="vectors have 32"):
        engine.embed(EmbedRequest.build("hello", dimensions=64))
    assert shorten([[3.0, 4.0, 1.0]], 2, 3, normalized=False) == [[3.0, 4.0]]


@pytest.mark.parametrize(("value", "message"), [
    ([], "empty list"),
    ("", "empty string"),
    (["ok", ""], r"input\[1\] is an empty string"),
    (["ok", 3.5], r"input\[1\] is a float"),
    ([["a"]], r"input\[0\] is a list"),
    ([[1], "a"], r"input\[1\] is a str"),
    ([[1, 2], []], "empty list of token ids"),
    ({"text": "x"}, "not dict"),
    (b"bytes", "not bytes"),
    (["x"] * 2049, "at most 2048"),
])
def test_bad_input_is_named(value: object, message: str) -> None:
    with pytest.raises(InvalidRequestError, match=message) as err:
        EmbedRequest.build(value)
    assert err.value.param == "input"


def test_bad_settings_are_named() -> None:
    with pytest.raises(InvalidRequestError, match="dimensions must be a positive integer"):
        EmbedRequest.build("x", dimensions=0)
    with pytest.raises(InvalidRequestError, match="truncate must be true or false"):
        EmbedRequest.build("x", truncate="yes")


def test_token_ids_out_of_range_are_named(tiny_embedder: Path) -> None:
    engine = LocalEmbedder(tiny_embedder)
    vocab = engine.loaded.vocab_size
    with pytest.raises(InvalidRequestError, match=rf"token id {vocab}, outside.*0 to {vocab - 1}"):
        engine.embed(EmbedRequest.build([[1, 2], [3, vocab]]))
    with pytest.raises(InvalidRequestError, match="token id -1"):
        engine.embed(EmbedRequest.build([5, -1]))


# -- the store and the SDK ----------------------------------------------------------------

@pytest.fixture()
def embed_store(store: Path, tiny_embedder: Path, tiny_model: Path) -> Path:
    openweight.pull(str(tiny_embedder), name="tiny-embed", progress=False)
    openweight.pull(str(tiny_model), name="tiny", progress=False)
    return store


def test_the_store_knows_which_models_embed(embed_store: Path) -> None:
    kinds = {m.name: m.kind for m in openweight.list_models()}
    assert kinds["tiny-embed"] == "embedding" and kinds["tiny"] == "chat"
    assert kinds["all-minilm-l6-v2"] == "embedding" and kinds["smollm2-135m"] == "chat"
    assert openweight.default_embedding_model() == "all-minilm-l6-v2"
    openweight.set_default("tiny-embed")  # an embedding model becomes the embedding default
    assert openweight.default_embedding_model() == "tiny-embed"
    assert openweight.default_model() == "smollm2-135m"
    assert openweight.model_info("tiny-embed")["kind"] == "embedding"


def test_client_embed_uses_the_default_embedding_model(embed_store: Path) -> None:
    openweight.set_default("tiny-embed")
    result = Client().embed(TEXTS)
    assert result.model == "tiny-embed" and len(result.vectors) == 4
    assert Client(model="tiny-embed").embed("hello").vectors == \
        Client().embed(["hello"]).vectors


def test_a_chat_model_asked_to_embed_and_an_embedding_model_asked_to_chat(
        embed_store: Path) -> None:
    with pytest.raises(InvalidRequestError, match=r"tiny is a chat model.*cannot embed"):
        Client(model="tiny").embed("hello")
    with pytest.raises(InvalidRequestError, match="tiny-embed is an embedding model"):
        Client(model="tiny-embed").generate("hello", max_tokens=2)


async def test_async_client_embed(embed_store: Path) -> None:
    result = await openweight.AsyncClient(model="tiny-embed").embed(TEXTS[:2])
    assert result.vectors == Client(model="tiny-embed").embed(TEXTS[:2]).vectors


# -- the server and the remote backend -------------------------------------------------------

@pytest.fixture()
def server(embed_store: Path) -> Iterator[ServerThread]:
    from openweight.server import create_app

    with ServerThread(create_app("tiny-embed")) as running:
        yield running


def test_server_answers_in_openais_shape(server: ServerThread) -> None:
    import openai

    local = Client(model="tiny-embed").embed(TEXTS)
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="none")
    answer = client.embeddings.create(model="tiny-embed", input=TEXTS)  # base64 on the wire
    assert [d.index for d in answer.data] == [0, 1, 2, 3]
    for got, want in zip(answer.data, local.vectors, strict=True):
        assert got.embedding == pytest.approx(want, abs=1e-6)
    assert answer.usage.prompt_tokens == local.usage.prompt_tokens
    plain = httpx.post(server.url + "/v1/embeddings",
                       json={"input": "hello", "encoding_format": "float", "dimensions": 8})
    assert plain.status_code == 200
    body = plain.json()
    assert body["object"] == "list" and body["model"] == "tiny-embed"
    assert len(body["data"][0]["embedding"]) == 8
    packed = httpx.post(server.url + "/v1/embeddings",
                        json={"input": ["hello"], "encoding_format": "base64"}).json()
    raw = base64.b64decode(packed["data"][0]["embedding"])
    assert list(struct.unpack(f"<{len(raw) // 4}f", raw)) == pytest.approx(
        Client(model="tiny-embed").embed("hello").vectors[0], abs=1e-6)


@pytest.mark.parametrize(("body", "param", "message"), [
    ({}, "input", "'input' is required"),
    ({"input": []}, "input", "empty list"),
    ({"input": [1, 99999]}, "input", "outside this model's vocabulary"),
    ({"input": "x", "encoding_format": "hex"}, "encoding_format", "float, base64"),
    ({"input": "x", "dimensions": "8"}, "dimensions", "positive integer"),
    ({"input": "x" * 100}, "input", "at most 48"),
    ({"input": "x", "model": "tiny"}, "model", "chat model"),
])
def test_server_errors_are_openai_shaped(server: ServerThread, body: dict[str, Any],
                                         param: str, message: str) -> None:
    answer = httpx.post(server.url + "/v1/embeddings", json=body)
    assert answer.status_code == 400, answer.text
    error = answer.json()["error"]
    assert message in error["message"] and error["param"] == param


def test_server_refuses_chat_with_an_embedding_model(server: ServerThread) -> None:
    answer = httpx.post(server.url + "/v1/chat/completions",
                        json={"messages": [{"role": "user", "content": "hi"}]})
    assert answer.status_code == 400
    assert "tiny-embed is an embedding model" in answer.json()["error"]["message"]


def test_remote_embed_equals_local(server: ServerThread) -> None:
    remote = Client(base_url=server.url + "/v1", model="tiny-embed")
    local = Client(model="tiny-embed")
    got = remote.embed(TEXTS, dimensions=16)
    for mine, theirs in zip(got.vectors, local.embed(TEXTS, dimensions=16).vectors, strict=True):
        assert mine == pytest.approx(theirs, abs=1e-6)
    assert got.model == "tiny-embed" and got.dimensions == 16
    with pytest.raises(InvalidRequestError, match="at most 48"):
        remote.embed("x" * 100)
    assert len(remote.embed("x" * 100, truncate=True).vectors[0]) == 32


async def test_async_remote_embed(server: ServerThread) -> None:
    client = openweight.AsyncClient(base_url=server.url + "/v1", model="tiny-embed")
    got = await client.embed(["a", "b"])
    assert len(got.vectors) == 2 and got.usage.prompt_tokens == 2


# answers recorded from other servers (trimmed vectors): their shapes, replayed
LLAMA_CPP = {"model": "minilm", "object": "list", "usage": {"prompt_tokens": 7,
             "total_tokens": 7},
             "data": [{"embedding": [0.25, -0.5], "index": 1, "object": "embedding"},
                      {"embedding": [0.5, 0.125], "index": 0, "object": "embedding"}]}
OLLAMA = {"object": "list", "data": [{"object": "embedding", "embedding": [0.1, 0.2],
                                      "index": 0}],
          "model": "all-minilm", "usage": {"prompt_tokens": 2, "total_tokens": 2}}
VLLM_BASE64 = {"id": "embd-1", "object": "list", "created": 1, "model": "Qwen3-Embedding",
               "data": [{"index": 0, "object": "embedding",
                         "embedding": base64.b64encode(struct.pack("<2f", 1.5, -2.0)).decode()}],
               "usage": {"prompt_tokens": 3, "total_tokens": 3, "completion_tokens": 0}}


def test_recorded_answers_of_other_servers_are_read() -> None:
    got = embedding_result_from_json(LLAMA_CPP, "asked", 2)
    assert got.vectors == [[0.5, 0.125], [0.25, -0.5]]  # in input order, not answer order
    assert got.model == "minilm" and got.usage.prompt_tokens == 7
    assert embedding_result_from_json(OLLAMA, "x", 1).vectors == [
        pytest.approx([0.1, 0.2])]
    assert embedding_result_from_json(VLLM_BASE64, "x", 1).vectors == [[1.5, -2.0]]
    for broken in ({"data": []}, {"data": [{"embedding": ["a"]}]}, {"data": "x"},
                   {"data": [{"embedding": "not base64!"}]}):
        with pytest.raises(openweight.RemoteError):
            embedding_result_from_json(broken, "x", 1)


def test_the_remote_backend_sends_openais_request() -> None:
    seen: list[dict[str, Any]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(json.loads(request.content))
        return httpx.Response(200, json=LLAMA_CPP)

    from openweight.remote import RemoteBackend

    backend = RemoteBackend("http://gpu-box:8080/v1", model="minilm",
                            transport=httpx.MockTransport(handler))
    result = backend.embed(EmbedRequest.build(["a", "b"], truncate=True, dimensions=2))
    assert seen == [{"model": "minilm", "input": ["a", "b"], "encoding_format": "float",
                     "dimensions": 2, "truncate": True}]
    assert result.dimensions == 2


# -- the real embedded default ---------------------------------------------------------------

@pytest.mark.slow
def test_the_embedded_default_matches_sentence_transformers(
        smollm2_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from sentence_transformers import SentenceTransformer

    monkeypatch.setenv("OPENWEIGHT_HOME", str(smollm2_home))
    monkeypatch.setenv("OPENWEIGHT_OFFLINE", "1")
    info = openweight.model_info("all-minilm-l6-v2")
    assert info["kind"] == "embedding" and info["source"].startswith("wheel:")
    path = Path(info["path"])
    expected = SentenceTransformer(str(path), device="cpu").encode(TEXTS)
    result = Client().embed(TEXTS)  # the default embedding model, the auto dtype
    assert result.model == "all-minilm-l6-v2" and result.dimensions == 384
    for mine, theirs in zip(result.vectors, expected.tolist(), strict=True):
        assert cosine(mine, theirs) > 0.9999
    similar = Client().embed(["A man is eating food.", "A man is eating a meal.",
                              "The stock market fell sharply."]).vectors
    assert cosine(similar[0], similar[1]) > cosine(similar[0], similar[2]) + 0.3
