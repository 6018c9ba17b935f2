"""Continuous batching in `openweight serve`: concurrent requests share decode steps and
each gets exactly what it gets alone (greedy, or sampled with a seed); stop strings,
max_tokens and cancellation stay per request; what the batch cannot take falls back."""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

import openweight
from openweight.local import LocalEngine, collect, unload_all
from openweight.local.batching import Batching
from openweight.local.generation import TokenSource, default_source
from openweight.options import GenerationOptions
from openweight.types import ChatResult
from openweight.wire import to_messages

from conftest import (
    CHATML,
    HANG,
    SPECIALS,
    ServerThread,
    build_family_model,
    build_tiny_model,
    byte_tokenizer,
    use_kernels,
    wait_until,
)

PROMPTS = ["hello", "what is this", "a", "x y z", "tell me a story", "b", "count", "why"]
SCHEMA = {"type": "object", "properties": {"answer": {"enum": ["yes", "no"]}},
          "required": ["answer"]}


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """An empty offline store; no prefix cache on the single-stream path, so that its
    answers depend on nothing but the request (its reuse of a cached prefix can move a
    greedy answer by a rounding step, whatever the batch does)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OPENWEIGHT_HOME", str(tmp_path_factory.mktemp("batch-store")))
        mp.setenv("OPENWEIGHT_OFFLINE", "1")
        mp.setenv("OPENWEIGHT_PREFIX_CACHE", "0")
        mp.setenv("OPENWEIGHT_KEEP_ALIVE", "0")
        mp.delenv("OPENWEIGHT_BASE_URL", raising=False)
        mp.delenv("OPENWEIGHT_API_KEY", raising=False)
        mp.delenv("OPENWEIGHT_BATCH", raising=False)
        unload_all()  # loaded again under these settings
        yield
        unload_all()


@pytest.fixture(scope="module")
def served(tiny_model: Path, env: None) -> Iterator[ServerThread]:
    from openweight.server import create_app

    with ServerThread(create_app(str(tiny_model)), lifespan="on") as server:
        yield server


@pytest.fixture(scope="module")
def url(served: ServerThread) -> str:
    return served.url


@pytest.fixture()
def batching(served: ServerThread) -> Batching:
    batch: Batching = served.app.state.batching
    assert batch is not None
    return batch


def _post(url: str, body: dict[str, Any], path: str = "/v1/chat/completions") -> Any:
    r = httpx.post(url + path, json=body, timeout=HANG)
    assert r.status_code == 200, r.text
    return r.json()


def _stream(url: str, body: dict[str, Any]) -> tuple[str, str | None, int]:
    """Text, finish reason and completion tokens of a streamed chat."""
    text, finish, tokens = [], None, -1
    body = {**body, "stream": True, "stream_options": {"include_usage": True}}
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=HANG) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            assert "error" not in event, event
            if event.get("usage"):
                tokens = event["usage"]["completion_tokens"]
            for choice in event["choices"]:
                text.append(choice["delta"].get("content") or "")
                finish = choice["finish_reason"] or finish
    return "".join(text), finish, tokens


def _ask(url: str, body: dict[str, Any]) -> tuple[str, str | None, int]:
    """The answer to one request, streamed or not as the body says."""
    if body.get("stream"):
        return _stream(url, body)
    out = _post(url, body)
    choice = out["choices"][0]
    return choice["message"]["content"], choice["finish_reason"], \
        out["usage"]["completion_tokens"]


def _together(jobs: list[Callable[[], Any]]) -> list[Any]:
    """Run the jobs at the same moment, one thread each."""
    start = threading.Barrier(len(jobs))

    def run(job: Callable[[], Any]) -> Any:
        start.wait()
        return job()

    with ThreadPoolExecutor(len(jobs)) as pool:
        return list(pool.map(run, jobs))


def _bodies() -> list[dict[str, Any]]:
    """Different prompts, lengths and settings: greedy and seeded sampling, streamed and
    not, a long and a short limit, a repetition penalty."""
    out: list[dict[str, Any]] = []
    for i, prompt in enumerate(PROMPTS):
        body: dict[str, Any] = {"messages": [{"role": "user", "content": prompt}],
                                "max_tokens": (150, 40, 90, 7)[i % 4], "stream": i % 2 == 1}
        if i % 3 == 2:
            body.update(temperature=0.9, top_p=0.9, top_k=40, seed=100 + i)
        else:
            body.update(temperature=0)
        if i == 4:
            body["repetition_penalty"] = 1.3
        out.append(body)
    # a prompt longer than a step's tokens and a cache page: prefilled in chunks, then read
    # back across pages
    out.append({"messages": [{"role": "user", "content": " ".join(PROMPTS) * 12}],
                "temperature": 0, "max_tokens": 60})
    return out


# -- concurrent requests get what they get alone -------------------------------------------

def test_concurrent_answers_equal_answers_alone(url: str, batching: Batching,
                                                tiny_model: Path) -> None:
    bodies = _bodies()
    alone = [_ask(url, body) for body in bodies]
    before = batching.stats()
    together = _together([lambda body=body: _ask(url, body) for body in bodies])
    assert together == alone
    after = batching.stats()
    assert after["batched"] - before["batched"] == len(bodies)
    assert after["max_rows"] >= 4, "the requests were not decoded together"
    for (_, finish, tokens), body in zip(alone, bodies, strict=True):
        assert tokens <= body["max_tokens"]
        assert finish == ("length" if tokens == body["max_tokens"] else "stop")
    # and the single-stream path (in this process, no batch) answers the same
    local = openweight.Client(str(tiny_model))
    for body, (text, finish, tokens) in zip(bodies, alone, strict=True):
        options = {k: v for k, v in body.items() if k not in ("messages", "stream")}
        result = local.chat(body["messages"], **options)
        assert (result.text, result.finish_reason, result.usage.completion_tokens) == \
            (text, finish, tokens)


def test_completions_are_batched_too(url: str, batching: Batching) -> None:
    bodies = [{"prompt": p, "max_tokens": 30 + 10 * i, "temperature": 0}
              for i, p in enumerate(PROMPTS[:4])]
    alone = [_post(url, b, "/v1/completions")["choices"][0]["text"] for b in bodies]
    before = batching.stats()["batched"]
    together = _together([lambda b=b: _post(url, b, "/v1/completions")["choices"][0]["text"]
                          for b in bodies])
    assert together == alone
    assert batching.stats()["batched"] - before == len(bodies)


def test_stop_strings_and_max_tokens_per_request(url: str) -> None:
    base = [{"messages": [{"role": "user", "content": p}], "temperature": 0,
             "max_tokens": 120} for p in PROMPTS[:4]]
    full = [_ask(url, body)[0] for body in base]
    bodies = []
    for i, (body, text) in enumerate(zip(base, full, strict=True)):
        if i % 2 == 0:  # stop at a piece of its own answer
            stop = next((text[j:j + 2] for j in range(5, len(text) - 2)
                         if text[j:j + 2].strip() and text[j:j + 2] not in text[:j]), None)
            assert stop is not None, text
            bodies.append(({**body, "stop": [stop], "stream": i == 2}, stop))
        else:  # a shorter limit
            bodies.append(({**body, "max_tokens": 5 + i, "stream": i == 3}, None))
    got = _together([lambda b=b: _ask(url, b) for b, _ in bodies])
    for (body, stop), text, (answer, finish, tokens) in zip(bodies, full, got, strict=True):
        if stop is not None:
            assert answer == text[: text.index(stop)]
            assert finish == "stop"
        else:
            assert tokens == body["max_tokens"] and finish == "length"
            assert text.startswith(answer)


# -- cancellation ---------------------------------------------------------------------------

def test_a_client_leaving_does_not_disturb_the_others(url: str, batching: Batching) -> None:
    bodies = [{"messages": [{"role": "user", "content": p}], "temperature": 0,
               "max_tokens": 400, "stream": True} for p in PROMPTS[:4]]
    alone = [_ask(url, body) for body in bodies[1:]]
    leaver = {**bodies[0], "max_tokens": 100_000 // 100}  # would run long

    def leave() -> int:
        chunks = 0
        with httpx.stream("POST", url + "/v1/chat/completions", json=leaver, timeout=60) as r:
            for line in r.iter_lines():
                chunks += line.startswith("data: ")
                if chunks == 6:  # hang up mid-way
                    break
        return chunks

    got = _together([leave] + [lambda b=b: _ask(url, b) for b in bodies[1:]])
    assert got[0] == 6
    assert got[1:] == alone
    assert wait_until(lambda: batching.stats()["active"] == 0), \
        "the request that left is still decoded"


def test_sdk_stream_close_cancels(url: str, batching: Batching) -> None:
    remote = openweight.Client(base_url=url, timeout=30)
    stream = remote.stream([{"role": "user", "content": "hello"}], temperature=0,
                           max_tokens=1000)
    next(stream)
    assert batching.stats()["active"] == 1
    stream.close()
    assert wait_until(lambda: batching.stats()["active"] == 0)
    time.sleep(0.2)  # a step that was already running when the request left may finish
    steps = batching.stats()["steps"]
    time.sleep(0.3)
    assert batching.stats()["steps"] == steps, "the batch still decodes for nobody"
    assert remote.chat([{"role": "user", "content": "hi"}], max_tokens=3).usage \
        .completion_tokens == 3


def test_an_error_in_the_batch_reaches_its_requests(url: str, batching: Batching,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    from openweight.local.batch_models import BatchModel

    real_logits = BatchModel.logits
    steps = []

    def failing_step(self: Any, rows: Any) -> Any:
        steps.append(1)
        if len(steps) == 5:
            raise RuntimeError("the GPU caught fire")
        return real_logits(self, rows)

    monkeypatch.setattr(BatchModel, "logits", failing_step)
    body = {"messages": [{"role": "user", "content": "hello"}], "temperature": 0,
            "max_tokens": 50, "stream": True}
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=HANG) as r:
        assert r.status_code == 200
        events = [json.loads(line[6:]) for line in r.iter_lines()
                  if line.startswith("data: ") and line != "data: [DONE]"]
    assert "GPU caught fire" in events[-1]["error"]["message"]  # the last event, no [DONE]
    assert events[-1]["error"]["type"] == "server_error"
    monkeypatch.undo()
    # the next requests get a new batch loop
    got = _together([lambda p=p: _post(url, {"messages": [{"role": "user", "content": p}],
                                             "max_tokens": 4})["usage"]["completion_tokens"]
                     for p in PROMPTS[:3]])
    assert got == [4, 4, 4]


# -- what the batch does not take -------------------------------------------------------------

def test_json_schema_falls_back_beside_batched_requests(url: str, batching: Batching) -> None:
    fmt = {"type": "json_schema", "json_schema": {"name": "out", "schema": SCHEMA}}
    schema_body = {"messages": [{"role": "user", "content": "yes or no?"}],
                   "response_format": fmt, "temperature": 0, "max_tokens": 40}
    plain = [{"messages": [{"role": "user", "content": p}], "temperature": 0,
              "max_tokens": 60} for p in PROMPTS[:3]]
    want_schema = _post(url, schema_body)["choices"][0]["message"]["content"]
    want_plain = [_ask(url, b) for b in plain]
    before = batching.stats()
    got = _together([lambda: _post(url, schema_body)["choices"][0]["message"]["content"]]
                    + [lambda b=b: _ask(url, b) for b in plain])
    after = batching.stats()
    assert got[0] == want_schema
    assert json.loads(got[0])["answer"] in ("yes", "no")
    assert got[1:] == want_plain
    assert after["single"] - before["single"] == 1
    assert after["batched"] - before["batched"] == len(plain)


def test_fallback_reasons(tiny_model: Path, env: None) -> None:
    lm = LocalEngine(tiny_model).loaded
    batch = Batching()
    greedy = GenerationOptions.from_kwargs({"temperature": 0})
    assert batch.fallback_reason(lm, 10, 10, greedy) is None
    schema = GenerationOptions.from_kwargs({"response_format": {
        "type": "json_schema", "json_schema": {"name": "o", "schema": SCHEMA}}})
    assert "json_schema" in str(batch.fallback_reason(lm, 10, 10, schema))
    small = Batching(kv_bytes=1)  # the least cache there is: four pages
    assert "longer" in str(small.fallback_reason(lm, 10, 100_000, greedy))
    batch.close()
    assert "stopping" in str(batch.fallback_reason(lm, 10, 10, greedy))


def test_batching_off(tiny_model: Path, env: None, monkeypatch: pytest.MonkeyPatch) -> None:
    from openweight.server import create_app

    assert create_app(str(tiny_model), preload=False, batching=False).state.batching is None
    monkeypatch.setenv("OPENWEIGHT_BATCH", "0")
    assert create_app(str(tiny_model), preload=False).state.batching is None


# -- the batch over other model families, without HTTP ------------------------------------------

@pytest.mark.parametrize("family", ["qwen3", "llama3"])
def test_other_families_batch_like_they_decode_alone(family: str, env: None,
                                                     family_model: Callable[[str], Path]
                                                     ) -> None:
    engine = LocalEngine(family_model(family))
    batch = Batching()
    messages = [to_messages([{"role": "user", "content": p}]) for p in PROMPTS[:6]]
    options = [GenerationOptions.from_kwargs({"temperature": 0, "max_tokens": 30 + 7 * i,
                                              "thinking": False} if family == "qwen3" else
                                             {"max_tokens": 30 + 7 * i, "seed": i})
               for i in range(6)]  # llama3 samples by default (its generation config)
    try:
        alone = [collect(engine.stream(m, o), "x") for m, o in zip(messages, options,
                                                                     strict=True)]
        together = _together([lambda m=m, o=o: collect(engine.stream(m, o, source=batch.source),
                                                       "x")
                              for m, o in zip(messages, options, strict=True)])
        assert together == alone
        assert batch.stats()["batched"] == 6 and batch.stats()["max_rows"] >= 2
    finally:
        batch.close()


@pytest.mark.parametrize("family", ["qwen3", "llama3"])
def test_decode_steps_run_in_one_call_of_ours(family: str, env: None, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """On our kernels (a float32 model with packed layers: the AVX2 default), the requests
    of a batch step that decode a token run every layer in one call of ours over the paged
    cache, the call a request alone takes for its tokens; prompt chunks in the same step
    run the layers one operation at a time, as alone. So answers are the same alone and
    together, also for requests that arrive while others decode."""
    from openweight.local import kernels, step_kernel
    from openweight.local.batch_models import BatchModel

    use_kernels(monkeypatch, "own")
    steps: list[dict[str, int]] = []  # per batch step: rows in our one call, op by op
    real_logits, real_layers = BatchModel.logits, BatchModel._layers

    def logits(self: Any, rows: Any) -> Any:
        steps.append({"one": 0, "ops": 0})
        return real_logits(self, rows)

    def layers(self: Any, ids: Any, *args: Any) -> Any:
        steps[-1]["ops"] += int(ids.shape[0])
        return real_layers(self, ids, *args)

    monkeypatch.setattr(BatchModel, "logits", logits)
    monkeypatch.setattr(BatchModel, "_layers", layers)
    alone_rows: list[int] = []
    real = step_kernel.DecodeStep.__call__

    def counted(self: Any, x: Any, *args: Any, **kwargs: Any) -> bool:
        if steps and threading.current_thread() is worker_thread[0]:
            steps[-1]["one"] += int(x.shape[0])
        alone_rows.append(int(x.shape[0]))
        return real(self, x, *args, **kwargs)

    monkeypatch.setattr(step_kernel.DecodeStep, "__call__", counted)
    path = build_family_model(tmp_path / family, family, wide=True)
    # int4 where ours read PyTorch's int4 layout on this CPU kind (x86), else int8
    engine = LocalEngine(path, dtype="float32",
                         quantize="int4" if kernels._load().block else "int8")
    assert engine.loaded.fast is not None and engine.loaded.fast.one_call
    from openweight.local import worker

    worker_thread = [worker.call(threading.current_thread)]
    batch = Batching()
    messages = [to_messages([{"role": "user", "content": p}]) for p in PROMPTS[:6]]
    options = [GenerationOptions.from_kwargs({"temperature": 0, "max_tokens": 24 + 5 * i,
                                              "thinking": False} if family == "qwen3" else
                                             {"max_tokens": 24 + 5 * i, "seed": i})
               for i in range(6)]
    try:
        alone = [collect(engine.stream(m, o), "x") for m, o in zip(messages, options,
                                                                     strict=True)]
        assert alone_rows and set(alone_rows) == {1} and not steps
        def ask(i: int) -> Any:
            if i >= 3:  # arrive while the first three decode
                assert wait_until(lambda: len(steps) >= 4, HANG)
            return collect(engine.stream(messages[i], options[i], source=batch.source), "x")

        together = _together([lambda i=i: ask(i) for i in range(6)])
        assert together == alone
        assert max(s["one"] for s in steps) >= 2, "no step decoded several requests at once"
        assert any(s["one"] and s["ops"] for s in steps), "no step mixed prompts and decoding"
    finally:
        batch.close()


# -- models the fast path does not take: transformers' own forward ----------------------------

@pytest.fixture(scope="module")
def nofast_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Llama again, in a directory of its own: loaded under OPENWEIGHT_FAST=0, it
    stays off the fast path in the process's model cache (which keys models by path)."""
    return build_tiny_model(tmp_path_factory.mktemp("nofast") / "tiny-llama")


@pytest.fixture(scope="module")
def sliding_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Mistral whose every layer attends over a sliding window of 16 tokens."""
    import torch
    from transformers import MistralConfig, MistralForCausalLM

    tokenizer = byte_tokenizer(SPECIALS, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                               bos_token="<|endoftext|>",
                               additional_special_tokens=["<|im_start|>"])
    tokenizer.chat_template = CHATML  # type: ignore[attr-defined]
    config = MistralConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,  # type: ignore[arg-type]
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=1024, sliding_window=16,
        eos_token_id=SPECIALS.index("<|im_end|>"),
        bos_token_id=0, pad_token_id=0, initializer_range=0.3,
    )
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("sliding") / "tiny-mistral"
    MistralForCausalLM(config).to(torch.bfloat16).save_pretrained(str(path))
    tokenizer.save_pretrained(str(path))  # type: ignore[attr-defined]
    return path


@pytest.fixture(params=["llama-fast-off", "gpt-oss", "mistral-sliding-window"])
def off_fast(request: pytest.FixtureRequest, env: None, nofast_model: Path,
             tiny_gpt_oss: Path, sliding_model: Path,
             monkeypatch: pytest.MonkeyPatch) -> LocalEngine:
    """A model the batch runs through transformers' own forward: the tiny Llama with the
    fast path turned off (int8 on a CPU, like the fast path's), or one the fast path never
    takes: a tiny gpt-oss (sliding-window and full-attention layers, attention sinks,
    mixture of experts, eager attention; bfloat16, unquantised) or a Mistral with a
    sliding window everywhere (int8). Unquantised, a CPU's product of one row can round
    differently from one of several (see docs/server.md, Concurrent requests): at these sizes in
    bfloat16 it does not, which is what lets the gpt-oss answers be compared exactly."""
    if request.param == "llama-fast-off":
        monkeypatch.setenv("OPENWEIGHT_FAST", "0")
        engine = LocalEngine(nofast_model)
    elif request.param == "gpt-oss":
        engine = LocalEngine(tiny_gpt_oss, dtype="bfloat16")
    else:
        engine = LocalEngine(sliding_model)
    assert engine.loaded.fast is None
    return engine


def _off_fast_requests(engine: LocalEngine) -> list[tuple[Any, GenerationOptions]]:
    """Different prompts and limits: greedy, seeded sampling, a repetition penalty, and a
    prompt longer than any sliding window here and, where the context allows, than a step's
    tokens and a cache page."""
    settings: list[dict[str, Any]] = [
        {"temperature": 0, "max_tokens": 60}, {"temperature": 0, "max_tokens": 25},
        {"temperature": 0.9, "top_p": 0.9, "top_k": 40, "seed": 7, "max_tokens": 45},
        {"temperature": 0, "max_tokens": 8, "repetition_penalty": 1.3},
        {"temperature": 0, "max_tokens": 50},
        # top_k left unset: generate's default (50) applies on every path
        {"temperature": 0.8, "seed": 11, "max_tokens": 30},
        {"temperature": 0, "max_tokens": 70}]
    prompts = PROMPTS[: len(settings)]
    long = " ".join(PROMPTS) * (12 if engine.loaded.context_length > 512 else 4)
    settings.append({"temperature": 0, "max_tokens": 40})
    prompts.append(long)
    return [(to_messages([{"role": "user", "content": p}]), GenerationOptions.from_kwargs(s))
            for p, s in zip(prompts, settings, strict=True)]


def _answer(engine: LocalEngine, messages: Any, options: GenerationOptions,
            source: TokenSource = default_source) -> tuple[ChatResult, list[int]]:
    """The answer and the token ids behind it (a random model's text can hide tokens: a
    harmony parser drops what is not a final message)."""
    tokens: list[int] = []

    def recorded(*args: Any) -> Iterator[int]:
        with contextlib.closing(source(*args)) as inner:  # type: ignore[type-var]
            for token in inner:
                tokens.append(token)
                yield token

    return collect(engine.stream(messages, options, source=recorded), "x"), tokens


def test_models_off_the_fast_path_batch_like_they_decode_alone(off_fast: LocalEngine) -> None:
    from openweight.local.cb_compat import ManagerBatch

    engine, lm = off_fast, off_fast.loaded
    requests = _off_fast_requests(engine)
    batch = Batching()
    try:
        assert batch.fallback_reason(lm, 10, 10, requests[0][1]) is None
        # in-process: the single-stream path, transformers' generate
        single = [_answer(engine, m, o) for m, o in requests]
        alone = [_answer(engine, m, o, batch.source) for m, o in requests]
        together = _together([lambda m=m, o=o: _answer(engine, m, o, batch.source)
                              for m, o in requests])
        assert alone == single
        assert together == alone
        stats = batch.stats()
        assert stats["batched"] == 2 * len(requests) and stats["single"] == 0
        assert stats["max_rows"] >= 4, "the requests were not decoded together"
        assert isinstance(batch._batchers[id(lm)], ManagerBatch)  # transformers' manager
        for (result, tokens), (_, options) in zip(alone, requests, strict=True):
            assert result.usage.completion_tokens == len(tokens) <= options.max_tokens
    finally:
        batch.close()


def test_off_the_fast_path_a_request_cancelled_mid_way_leaves_the_others_intact(
        off_fast: LocalEngine) -> None:
    engine, lm = off_fast, off_fast.loaded
    requests = [(to_messages([{"role": "user", "content": p}]),
                 GenerationOptions.from_kwargs({"temperature": 0, "max_tokens": 80}))
                for p in PROMPTS[:4]]
    batch = Batching()
    try:
        alone = [_answer(engine, m, o, batch.source) for m, o in requests[1:]]

        def leave() -> int:
            # the token source a server's stream reads, left after five of up to 400 tokens
            cancel = threading.Event()
            tokens = batch.source(lm, engine.encode(requests[0][0]), 400, requests[0][1],
                                  cancel)
            got = [next(tokens) for _ in range(5)]
            cancel.set()
            tokens.close()  # type: ignore[attr-defined]
            return len(got)

        got = _together([leave] + [lambda m=m, o=o: _answer(engine, m, o, batch.source)
                                   for m, o in requests[1:]])
        assert got[0] == 5
        assert got[1:] == alone
        assert batch.stats()["max_rows"] >= 2
        assert wait_until(lambda: batch.stats()["active"] == 0), "the cancelled request is decoded"
        time.sleep(0.2)  # a step that was already running when it left may finish
        steps = batch.stats()["steps"]
        time.sleep(0.3)
        assert batch.stats()["steps"] == steps, "the batch still decodes for nobody"
    finally:
        batch.close()


def test_a_server_batches_a_model_off_the_fast_path(nofast_model: Path, env: None,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """Through `openweight serve`: streamed and not, sampled with seeds, and stop strings."""
    from openweight.server import create_app

    monkeypatch.setenv("OPENWEIGHT_FAST", "0")
    app = create_app(str(nofast_model))
    bodies = _bodies()
    with ServerThread(app, lifespan="on") as server:
        alone = [_ask(server.url, body) for body in bodies]
        together = _together([lambda b=b: _ask(server.url, b) for b in bodies])
        # each greedy answer cut by a stop string taken from itself, beside the others
        stops: list[str | None] = [None] * len(bodies)
        for i in (0, 1):  # greedy, up to 150 and 40 tokens
            text = alone[i][0]
            stops[i] = next(text[j:j + 2] for j in range(5, len(text) - 2)
                            if text[j:j + 2].strip() and text[j:j + 2] not in text[:j])
        stopped = _together([lambda b=b, s=s: _ask(server.url, {**b, "stop": [s]} if s else b)
                             for b, s in zip(bodies, stops, strict=True)])
        stats = app.state.batching.stats()
    assert together == alone
    assert stats["batched"] == 3 * len(bodies) and stats["single"] == 0
    assert stats["max_rows"] >= 4, "the requests were not decoded together"
    for answer, stop, got in zip(alone, stops, stopped, strict=True):
        if stop is None:
            assert got == answer
        else:
            assert got[:2] == (answer[0][: answer[0].index(stop)], "stop")


def test_one_attention_call_over_all_requests_as_on_a_gpu(
        off_fast: LocalEngine, monkeypatch: pytest.MonkeyPatch) -> None:
    """The attention an accelerator runs: transformers' one call over every request's keys
    with a block-diagonal mask (a CPU splits it per request). Alone, a request gets the
    single-stream answer; beside others, the call tiles a row's softmax by where its keys
    lie among theirs, which can move a greedy answer by a rounding step, so this asserts
    what that path does keep: every request batched, ended by its own limit or stop."""
    from openweight.local import cb_compat

    monkeypatch.setattr(cb_compat, "per_request_attention", lambda name: name)
    engine = off_fast
    requests = _off_fast_requests(engine)
    batch = Batching()
    try:
        single = [_answer(engine, m, o) for m, o in requests[:3]]
        alone = [_answer(engine, m, o, batch.source) for m, o in requests[:3]]
        assert alone == single
        together = _together([lambda m=m, o=o: _answer(engine, m, o, batch.source)
                              for m, o in requests])
        assert batch.stats()["max_rows"] >= 4
        for (result, tokens), (_, options) in zip(together, requests, strict=True):
            assert result.usage.completion_tokens == len(tokens)
            ended = tokens[-1] in engine.loaded.eos_ids
            assert len(tokens) == options.max_tokens or ended
            assert result.finish_reason == ("stop" if ended else "length")
    finally:
        batch.close()


def test_fallback_reasons_off_the_fast_path(env: None, tiny_gpt_oss: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    import copy
    import types

    from transformers.utils.import_utils import is_torch_greater_or_equal

    from openweight.local.batching import PAGE_SIZE, _bytes_per_token, _model_reason

    lm = LocalEngine(tiny_gpt_oss).loaded
    greedy = GenerationOptions.from_kwargs({"temperature": 0})
    batch = Batching()
    try:
        assert lm.fast is None and batch.fallback_reason(lm, 10, 10, greedy) is None
        schema = GenerationOptions.from_kwargs({"response_format": {
            "type": "json_schema", "json_schema": {"name": "o", "schema": SCHEMA}}})
        assert "json_schema" in str(batch.fallback_reason(lm, 10, 10, schema))
        assert "longer" in str(Batching(kv_bytes=1).fallback_reason(lm, 10, 100_000, greedy))
        with monkeypatch.context() as mp:
            mp.setitem(vars(lm.model), "generate", lambda **kwargs: None)  # undone whole
            assert "generate is replaced" in str(batch.fallback_reason(lm, 10, 10, greedy))
        # the KV cache the capacity is counted in is the one the batch allocates: the
        # model's dtype, every layer's keys and values
        config = lm.model.config
        per_layer = 2 * config.num_key_value_heads * config.head_dim
        assert _bytes_per_token(lm) == config.num_hidden_layers * per_layer * \
            lm.model.dtype.itemsize
        dtype, pages = batch._batcher(lm).cache()  # type: ignore[union-attr]
        assert dtype == lm.model.dtype
        assert pages * PAGE_SIZE == batch._capacity(lm)
    finally:
        batch.close()

    def reason(device: str = "cpu", **changes: Any) -> str | None:
        config = copy.deepcopy(lm.model.config)
        for name, value in changes.items():
            setattr(config, name, value)
        return _model_reason(types.SimpleNamespace(  # type: ignore[arg-type]
            fast=None, device=device, model=types.SimpleNamespace(config=config)))

    assert reason() is None  # sliding-window and full-attention layers, eager attention
    assert "linear_attention" in str(reason(layer_types=["linear_attention",
                                                          "full_attention"]))
    assert "no window size" in str(reason(sliding_window=None))
    assert "flex_attention" in str(reason(_attn_implementation="flex_attention"))
    assert "soft-cap" in str(reason(attn_logit_softcapping=50.0))
    assert reason(device="cuda") is None
    # transformers' internals the manager's batch reads are those of the tested major
    # version: under another, these models run on the single-stream path, saying why
    import transformers

    from openweight.local.cb_compat import TESTED_MAJOR

    assert transformers.__version__.startswith(f"{TESTED_MAJOR}.")
    with monkeypatch.context() as mp:
        mp.setattr(transformers, "__version__", f"{TESTED_MAJOR + 1}.0.0")
        assert f"transformers {TESTED_MAJOR}.x only" in str(reason())
        assert "transformers" in str(Batching().fallback_reason(lm, 10, 10, greedy))
    if not is_torch_greater_or_equal("2.14", accept_dev=True):
        assert "Apple GPU" in str(reason(device="mps"))


# -- our scheduler (models on the fast path), driven without a server -------------------------

GREEDY = GenerationOptions.from_kwargs({"temperature": 0})


@pytest.fixture()
def fast_engine(tiny_model: Path, env: None) -> LocalEngine:
    engine = LocalEngine(tiny_model)
    assert engine.loaded.fast is not None
    return engine


def _prompt(engine: LocalEngine, text: str) -> list[int]:
    return engine.encode(to_messages([{"role": "user", "content": text}]))


def _single(engine: LocalEngine, prompt: list[int], max_new: int) -> list[int]:
    """The single-stream path's greedy tokens."""
    return list(default_source(engine.loaded, prompt, max_new, GREEDY, threading.Event()))


def _steps_seen(monkeypatch: pytest.MonkeyPatch) -> list[list[tuple[int, int, list[int], bool]]]:
    """Every step's rows as the model gets them: (start, end, pages, decoding)."""
    from openweight.local.batch_models import BatchModel

    seen: list[list[tuple[int, int, list[int], bool]]] = []
    real = BatchModel.logits

    def logits(self: Any, rows: Any) -> Any:
        seen.append([(r.start, r.end, list(r.held), r.decoding) for r in rows])
        return real(self, rows)

    monkeypatch.setattr(BatchModel, "logits", logits)
    return seen


def _at_once(scheduler: Any, jobs: list[tuple[list[int], int]]) -> list[Any]:
    """Each job's tokens (or the exception that ended them), all of them queued before the
    batch's first step (the model thread held until then)."""
    from openweight.local import worker

    gate = threading.Event()
    worker.submit(gate.wait)

    def run(prompt: list[int], max_new: int) -> Any:
        try:
            return list(scheduler.tokens(prompt, max_new, GREEDY, threading.Event()))
        except Exception as exc:
            return exc

    with ThreadPoolExecutor(len(jobs)) as pool:
        futures = [pool.submit(run, *job) for job in jobs]
        assert wait_until(lambda: len(scheduler.requests) == len(jobs))
        gate.set()
        return [f.result(timeout=HANG) for f in futures]


def test_a_request_takes_pages_as_it_grows_and_gives_them_back(
        fast_engine: LocalEngine, monkeypatch: pytest.MonkeyPatch) -> None:
    from openweight.local.scheduler import Scheduler

    seen = _steps_seen(monkeypatch)
    scheduler = Scheduler(fast_engine.loaded, pages=8, page=16, max_tokens=64,
                          max_requests=4)
    kv = scheduler.model.kv
    prompt = _prompt(fast_engine, "hello")
    try:
        want = _single(fast_engine, prompt, 60)
        assert list(scheduler.tokens(prompt, 60, GREEDY, threading.Event())) == want
        for (_, end, held, _), in seen:  # one request: a row a step
            assert len(held) == -(-end // 16), "pages were not taken as the tokens grew"
        assert seen[-1][0][1] > 32  # it grew into a third page
        assert kv.free == kv.pages and not scheduler.requests
        # a request left mid-way gives its pages back at the next step, and steps stop
        cancel = threading.Event()
        tokens = scheduler.tokens(prompt, 200, GREEDY, cancel)
        got = [next(tokens) for _ in range(40)]
        assert got == want[:40] and kv.free < kv.pages
        cancel.set()
        tokens.close()  # type: ignore[attr-defined]
        assert not scheduler.requests
        assert wait_until(lambda: kv.free == kv.pages), "the pages of the request that left"
        steps = scheduler.steps[0]
        time.sleep(0.3)
        assert scheduler.steps[0] == steps, "the batch still decodes for nobody"
    finally:
        scheduler.close()


def test_long_prompts_are_read_in_chunks_across_steps(
        fast_engine: LocalEngine, monkeypatch: pytest.MonkeyPatch) -> None:
    """Prompts longer than a step's tokens are read a chunk a step, beside the others'
    decoding; pages taken one by one by requests side by side do not follow each other,
    so keys are read by their slots (gathered, and in the one-call step): the answers are
    the single-stream path's all the same."""
    from openweight.local.scheduler import Scheduler

    seen = _steps_seen(monkeypatch)
    scheduler = Scheduler(fast_engine.loaded, pages=16, page=16, max_tokens=12,
                          max_requests=4)
    prompts = [_prompt(fast_engine, p) for p in ("hello", "what is this", "tell me a story")]
    try:
        want = [_single(fast_engine, p, 50) for p in prompts]
        assert _at_once(scheduler, [(p, 50) for p in prompts]) == want
    finally:
        scheduler.close()
    assert all(sum(e - s for s, e, _, _ in step) <= 12 for step in seen)
    assert any(not d for s, e, _, d in seen[0]), "the first step reads no prompt"
    chunks = [(s, e) for step in seen for s, e, _, d in step if not d]
    assert len(chunks) >= sum(-(-len(p) // 12) for p in prompts)
    assert any({d for *_, d in step} == {True, False} for step in seen), \
        "no step mixed prompts and decoding"
    scattered = [held for step in seen for _, _, held, _ in step
                 if held != list(range(held[0], held[0] + len(held)))]
    assert scattered, "no request's pages were apart"


def test_a_full_page_pool_makes_requests_wait_not_fail(
        fast_engine: LocalEngine, monkeypatch: pytest.MonkeyPatch) -> None:
    """Four pages, three requests that each need all four by their end: they start
    together, then take turns (the youngest steps out, its keys copied aside, and comes
    back when pages free up): each gets its single-stream answer."""
    from openweight.local.scheduler import Scheduler

    seen = _steps_seen(monkeypatch)
    stepped_out = []
    real_step_out = Scheduler._step_out
    monkeypatch.setattr(Scheduler, "_step_out", lambda self, seq: (
        stepped_out.append(seq.done), real_step_out(self, seq)))
    scheduler = Scheduler(fast_engine.loaded, pages=4, page=16, max_tokens=64,
                          max_requests=4)
    kv = scheduler.model.kv
    prompts = [_prompt(fast_engine, p) for p in ("hello", "what is this", "tell me a story")]
    jobs = [(p, 64 - len(p)) for p in prompts]  # the whole pool each, by the last token
    try:
        want = [_single(fast_engine, p, n) for p, n in jobs]
        assert all(len(w) == n for w, (_, n) in zip(want, jobs, strict=True)), "an early end"
        got = _at_once(scheduler, jobs)
        assert got == want
        assert kv.free == kv.pages
    finally:
        scheduler.close()
    assert max(len(step) for step in seen) >= 2, "the requests never ran together"
    assert any(stepped_out), "no request stepped out with its keys"
    assert all(len({p for _, _, held, _ in step for p in held}) <= 4 for step in seen)


def test_a_failing_step_fails_every_request_in_flight(
        fast_engine: LocalEngine, monkeypatch: pytest.MonkeyPatch) -> None:
    from openweight.errors import GenerationError
    from openweight.local.batch_models import BatchModel
    from openweight.local.scheduler import Scheduler

    lm = fast_engine.loaded
    scheduler = Scheduler(lm, pages=8, page=16, max_tokens=64, max_requests=4)
    real = BatchModel.logits
    calls = []

    def logits(self: Any, rows: Any) -> Any:
        calls.append(len(rows))
        if len(calls) == 4:
            raise RuntimeError("the cache caught fire")
        return real(self, rows)

    monkeypatch.setattr(BatchModel, "logits", logits)
    prompts = [_prompt(fast_engine, p) for p in ("hello", "what is this")]
    try:
        got = _at_once(scheduler, [(p, 50) for p in prompts])
        assert calls[:4] == [2, 2, 2, 2]  # both in flight when it failed
        for error in got:
            assert isinstance(error, GenerationError)
            assert "the cache caught fire" in str(error)
            assert isinstance(error.__cause__, RuntimeError)
        assert not scheduler.running()
        assert scheduler.model.kv.free == scheduler.model.kv.pages
        monkeypatch.undo()
        # a request handed to a stopped batch runs on the single-stream path
        assert list(scheduler.tokens(prompts[0], 5, GREEDY, threading.Event())) == \
            _single(fast_engine, prompts[0], 5)
    finally:
        scheduler.close()


# -- lifespan ---------------------------------------------------------------------------------

def test_the_batch_stops_with_the_app(tiny_model: Path, env: None) -> None:
    from openweight.server import create_app

    app = create_app(str(tiny_model), preload=False)
    with ServerThread(app, lifespan="on") as server:
        assert _post(server.url, {"messages": [{"role": "user", "content": "hi"}],
                                  "max_tokens": 3})["usage"]["completion_tokens"] == 3
        batchers = list(app.state.batching._batchers.values())
        assert len(batchers) == 1 and batchers[0].running()
        kv = batchers[0].model.kv  # our scheduler's (the tiny model is on the fast path)
    assert not batchers[0].running()
    assert kv.free == kv.pages


# -- the real default model -------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("fast", ["fast-path", "fast-off"])
def test_smollm2_eight_concurrent_chats(fast: str, smollm2_home: Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """The real default model (int4 on a CPU), batched over the fast path's layers or, with
    OPENWEIGHT_FAST=0, over transformers' own forward."""
    from openweight.server import create_app

    if fast == "fast-off":
        monkeypatch.setenv("OPENWEIGHT_FAST", "0")
    monkeypatch.setenv("OPENWEIGHT_HOME", str(smollm2_home))
    monkeypatch.setenv("OPENWEIGHT_OFFLINE", "1")
    monkeypatch.setenv("OPENWEIGHT_PREFIX_CACHE", "0")
    monkeypatch.setenv("OPENWEIGHT_KEEP_ALIVE", "0")
    monkeypatch.delenv("OPENWEIGHT_BATCH", raising=False)
    questions = ["What is the capital of France?", "Name a primary colour.",
                 "What is 2 + 2?", "Say hello in Spanish.", "What do bees make?",
                 "Name a planet.", "What colour is the sky?", "Who wrote Hamlet?"]
    bodies = [{"messages": [{"role": "user", "content": q}], "temperature": 0,
               "max_tokens": 48, "stream": i % 2 == 0} for i, q in enumerate(questions)]
    unload_all()
    try:
        app = create_app()
        with ServerThread(app, lifespan="on") as server:
            alone = [_ask(server.url, body) for body in bodies]
            together = _together([lambda b=b: _ask(server.url, b) for b in bodies])
            stats = app.state.batching.stats()
            (batcher,) = app.state.batching._batchers.values()
            assert (batcher.lm.fast is None) == (fast == "fast-off")
        assert together == alone
        assert "Paris" in alone[0][0]
        assert stats["max_rows"] >= 4
        local = openweight.Client(keep_alive=0)  # the single-stream path, same answers
        for body, (text, _, _) in zip(bodies, alone, strict=True):
            assert local.chat(body["messages"], temperature=0, max_tokens=48).text == text
    finally:
        unload_all()
