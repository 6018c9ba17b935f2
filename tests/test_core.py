"""The local generation core on a tiny random model, loaded through the real path."""

from __future__ import annotations

import asyncio
import gc
import os
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

import openweight
from openweight import (
    AsyncClient,
    Client,
    GenerationError,
    InvalidRequestError,
    Message,
    ModelLoadError,
)
from openweight.local import resolve
from openweight.local.decode import IncrementalDecoder, StopMatcher

from conftest import wait_until

HI = [{"role": "user", "content": "hi there"}]


def test_import_is_light() -> None:
    code = ("import sys, openweight, openweight.store, openweight.cli; "
            "heavy = [m for m in ('torch', 'transformers', 'fastapi', 'huggingface_hub') "
            "if m in sys.modules]; print(heavy); sys.exit(1 if heavy else 0)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_greedy_stream_equals_chat(tiny_model: Path) -> None:
    client = Client(str(tiny_model))
    result = client.chat(HI, max_tokens=24, temperature=0)
    chunks = list(client.stream(HI, max_tokens=24, temperature=0))
    assert "".join(c.text for c in chunks) == result.text
    last = chunks[-1]
    assert last.finish_reason == result.finish_reason
    assert last.usage == result.usage
    assert all(c.finish_reason is None for c in chunks[:-1])
    assert result.model == "tiny-llama"


def test_messages_as_dataclasses_and_generate(tiny_model: Path) -> None:
    client = Client(str(tiny_model))
    as_dicts = client.chat(HI, max_tokens=8, temperature=0)
    as_messages = client.chat([Message(role="user", content="hi there")], max_tokens=8,
                              temperature=0)
    assert as_dicts.text == as_messages.text == client.generate("hi there", max_tokens=8,
                                                                temperature=0).text


def test_max_tokens_gives_length_and_exact_usage(tiny_model: Path) -> None:
    client = Client(str(tiny_model))
    prompt_ids = client.backend.encode(openweight.wire.to_messages(HI))  # type: ignore[attr-defined]
    result = client.chat(HI, max_tokens=7, temperature=0)
    assert result.finish_reason == "length"
    assert result.usage.completion_tokens == 7
    assert result.usage.prompt_tokens == len(prompt_ids)
    assert result.usage.total_tokens == len(prompt_ids) + 7


def test_seed_reproducible(tiny_model: Path) -> None:
    client = Client(str(tiny_model))
    a = client.chat(HI, max_tokens=24, temperature=1.0, seed=1234)
    b = client.chat(HI, max_tokens=24, temperature=1.0, seed=1234)
    runs = {client.chat(HI, max_tokens=24, temperature=1.0, seed=s).text for s in range(4)}
    assert a.text == b.text
    assert len(runs) > 1, "different seeds should sample different text"


def test_sampling_options_accepted(tiny_model: Path) -> None:
    result = Client(str(tiny_model)).chat(
        HI, max_tokens=5, temperature=0.7, top_p=0.9, top_k=20, min_p=0.05,
        repetition_penalty=1.2, seed=3,
    )
    assert result.usage.completion_tokens == 5


def test_stop_string_cuts_text_and_is_excluded(tiny_model: Path) -> None:
    client = Client(str(tiny_model))
    full = client.chat(HI, max_tokens=30, temperature=0).text
    stop = full[10:12]
    cut = full.find(stop)
    result = client.chat(HI, max_tokens=30, temperature=0, stop=[stop, "never-there"])
    assert result.finish_reason == "stop"
    assert result.text == full[:cut]
    assert stop not in result.text
    streamed = list(client.stream(HI, max_tokens=30, temperature=0, stop=stop))
    assert "".join(c.text for c in streamed) == result.text
    assert streamed[-1].usage == result.usage
    assert result.usage.completion_tokens < 30


@pytest.mark.parametrize(
    ("option", "value", "needle"),
    [
        ("max_tokens", 0, ">= 1"),
        ("max_tokens", 2.5, "integer"),
        ("max_tokens", True, "integer"),
        ("temperature", -0.1, ">= 0.0"),
        ("temperature", 2.5, "<= 2.0"),
        ("temperature", "hot", "number"),
        ("top_p", 0, "> 0.0"),
        ("top_p", 1.5, "<= 1.0"),
        ("top_k", -1, ">= 0"),
        ("min_p", 1.1, "<= 1.0"),
        ("repetition_penalty", 0, "> 0.0"),
        ("seed", -5, ">= 0"),
        ("stop", 5, "string"),
        ("stop", [""], "empty"),
        ("stop", ["x"] * 17, "at most 16"),
        ("temprature", 1, "unknown option 'temprature'"),
    ],
)
def test_bad_options(tiny_model: Path, option: str, value: object, needle: str) -> None:
    client = Client(str(tiny_model))
    with pytest.raises(InvalidRequestError) as info:
        client.chat(HI, **{option: value})
    assert isinstance(info.value, ValueError)
    assert option in str(info.value) or option == "temprature"
    assert needle in str(info.value)


@pytest.mark.parametrize(
    ("messages", "needle"),
    [
        ("hello", "list"),
        ([], "empty"),
        ([{"role": "wizard", "content": "x"}], "role"),
        ([{"role": "user", "content": 3}], "content"),
        ([42], "must be a dict or a Message"),
    ],
)
def test_bad_messages(tiny_model: Path, messages: object, needle: str) -> None:
    with pytest.raises(InvalidRequestError, match=needle):
        Client(str(tiny_model)).chat(messages)  # type: ignore[arg-type]


def test_bad_device_and_dtype_fail_fast(tiny_model: Path) -> None:
    with pytest.raises(InvalidRequestError, match="device 'tpu'"):
        Client(str(tiny_model), device="tpu")
    with pytest.raises(InvalidRequestError, match="dtype 'int3'"):
        Client(str(tiny_model), dtype="int3")


def test_prompt_too_long_says_both_numbers(short_model: Path) -> None:
    client = Client(str(short_model))
    with pytest.raises(InvalidRequestError) as info:
        client.chat([{"role": "user", "content": "x" * 100}])
    message = str(info.value)
    assert "context window of 32 tokens" in message
    assert "the prompt is 119 tokens" in message


def test_max_tokens_clamped_to_context(short_model: Path) -> None:
    result = Client(str(short_model)).chat([{"role": "user", "content": "hey"}],
                                           max_tokens=500, temperature=0)
    assert result.usage.total_tokens <= 32
    if result.finish_reason == "length":
        assert result.usage.total_tokens == 32


def test_missing_model_dir(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="does not exist"):
        Client(str(tmp_path / "nope")).chat(HI)


@pytest.mark.parametrize(
    ("damage", "needle"),
    [
        (lambda p: (p / "config.json").unlink(), "config.json is missing"),
        (lambda p: (p / "config.json").write_text("{not json"), "config.json is corrupt"),
        (lambda p: (p / "model.safetensors").write_bytes(b"\x00" * 64),
         "model.safetensors is corrupt"),
        (lambda p: (p / "model.safetensors").unlink(), "no *.safetensors"),
        (lambda p: (p / "tokenizer.json").unlink(), "no tokenizer"),
    ],
)
def test_corrupt_model_dir(tiny_model: Path, tmp_path: Path, damage, needle: str) -> None:  # type: ignore[no-untyped-def]
    broken = tmp_path / "broken"
    shutil.copytree(tiny_model, broken)
    damage(broken)
    with pytest.raises(ModelLoadError) as info:
        Client(str(broken)).chat(HI)
    assert needle in str(info.value)


def test_model_cached_per_process(tiny_model: Path) -> None:
    a = Client(str(tiny_model))
    b = Client(str(tiny_model))
    a.chat(HI, max_tokens=1)
    b.chat(HI, max_tokens=1)
    assert a.backend.loaded is b.backend.loaded  # type: ignore[attr-defined]
    # auto resolves by the CPU (bfloat16 on AVX-512, float32 elsewhere): ask for the other one
    auto = a.backend.loaded.dtype  # type: ignore[attr-defined]
    assert auto == resolve.resolve_dtype("auto", "cpu")
    dtype = "bfloat16" if auto == "float32" else "float32"
    other = Client(str(tiny_model), dtype=dtype)
    other.chat(HI, max_tokens=1)
    assert other.backend.loaded is not a.backend.loaded  # type: ignore[attr-defined]
    assert other.backend.loaded.dtype == dtype  # type: ignore[attr-defined]


def test_threads_match_sequential(tiny_model: Path) -> None:
    client = Client(str(tiny_model))
    prompts = [f"question number {i}" for i in range(6)]
    sequential = [client.generate(p, max_tokens=12, temperature=0).text for p in prompts]
    results: dict[int, str] = {}

    def run(i: int) -> None:
        results[i] = client.generate(prompts[i], max_tokens=12, temperature=0).text

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert [results[i] for i in range(len(prompts))] == sequential


@pytest.fixture(params=["fast", "generate"])
def either_path(request: pytest.FixtureRequest, tiny_model: Path,
                monkeypatch: pytest.MonkeyPatch) -> Iterator[Client]:
    """A client on the fast decode path, or on transformers' generate."""
    from openweight.local import unload_all

    if request.param == "generate":
        monkeypatch.setenv("OPENWEIGHT_FAST", "0")
    unload_all()
    client = Client(str(tiny_model))
    assert (client.backend.loaded.fast is None) == (request.param == "generate")  # type: ignore[attr-defined]
    yield client
    unload_all()


def _model_thread_free() -> bool:
    """The model thread takes new work within a second (no generation left running)."""
    from openweight.local import worker

    try:
        worker.submit(lambda: None).result(timeout=1)
    except TimeoutError:
        return False
    return True


def test_closing_stream_stops_generating(either_path: Client) -> None:
    client = either_path
    stream = client.stream(HI, max_tokens=1000, temperature=0)
    first = next(stream)
    assert first.finish_reason is None
    stream.close()
    assert _model_thread_free()
    # the model is free again at once
    assert client.chat(HI, max_tokens=2).usage.completion_tokens == 2


def test_abandoned_stream_stops_generating(either_path: Client) -> None:
    client = either_path
    stream = client.stream(HI, max_tokens=1000, temperature=0)
    next(stream)
    del stream
    gc.collect()
    assert wait_until(_model_thread_free, 10, poll=0.05)


def test_worker_exception_surfaces_as_generation_error(
    tiny_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    client = Client(str(tiny_model))
    model = client.backend.loaded.model  # type: ignore[attr-defined]

    def boom(*args: object, **kwargs: object) -> None:
        raise RuntimeError("simulated CUDA failure")

    monkeypatch.setattr(model, "generate", boom)
    with pytest.raises(GenerationError) as info:
        client.chat(HI, max_tokens=5)
    assert isinstance(info.value.__cause__, RuntimeError)
    with pytest.raises(GenerationError):
        list(client.stream(HI, max_tokens=5))


async def test_async_parity(tiny_model: Path) -> None:
    sync = Client(str(tiny_model)).chat(HI, max_tokens=16, temperature=0)
    client = AsyncClient(str(tiny_model))
    result = await client.chat(HI, max_tokens=16, temperature=0)
    assert result == sync
    chunks = [c async for c in client.stream(HI, max_tokens=16, temperature=0)]
    assert "".join(c.text for c in chunks) == sync.text
    assert chunks[-1].usage == sync.usage
    assert (await client.generate("hi there", max_tokens=16, temperature=0)).text == sync.text


async def test_async_does_not_block_loop(tiny_model: Path) -> None:
    client = AsyncClient(str(tiny_model))
    await client.chat(HI, max_tokens=1)  # load first
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.001)
            ticks += 1

    task = asyncio.create_task(ticker())
    await client.chat(HI, max_tokens=60, temperature=0)
    task.cancel()
    assert ticks > 5


async def test_async_stream_close(tiny_model: Path) -> None:
    client = AsyncClient(str(tiny_model))
    async with client.stream(HI, max_tokens=200, temperature=0) as stream:
        async for _ in stream:
            break
    assert await asyncio.to_thread(_model_thread_free)


async def test_async_bad_option_raises_at_call(tiny_model: Path) -> None:
    with pytest.raises(InvalidRequestError):
        await AsyncClient(str(tiny_model)).chat(HI, temperature=9)


@pytest.mark.parametrize(("capability", "dtype"), [
    ("AVX512", "bfloat16"), ("AVX2", "float32"), ("DEFAULT", "float32"),
    ("SVE256", "float32"), ("NO AVX", "float32"), ("avx512", "bfloat16")])
def test_auto_dtype_for_each_cpu_kind(capability: str, dtype: str) -> None:
    assert resolve.resolve_dtype("auto", "cpu", capability) == dtype
    assert resolve.resolve_dtype(None, "cpu", capability) == dtype
    for explicit in ("float32", "bfloat16", "float16"):  # a dtype asked for is kept
        assert resolve.resolve_dtype(explicit, "cpu", capability) == explicit


@pytest.mark.parametrize("lowered", ["avx2", "default"])
def test_auto_dtype_follows_aten_cpu_capability(lowered: str) -> None:
    """What PyTorch dispatches for decides, also where ATEN_CPU_CAPABILITY lowers it: an
    AVX-512 machine told to use its AVX2 or generic kernels gets float32, like an AVX2 one."""
    code = ("from openweight.local import resolve; "
            "print(resolve.cpu_capability(), resolve.resolve_dtype('auto', 'cpu'))")
    env = {**os.environ, "ATEN_CPU_CAPABILITY": lowered}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                         text=True, timeout=120, check=True).stdout.split()
    assert out[0] in ("AVX2", "DEFAULT") and out[-1] == "float32", out


def test_auto_device_and_dtype() -> None:
    assert resolve.resolve_device("auto") in ("cuda", "mps", "cpu")
    assert resolve.resolve_dtype("float32", "cpu") == "float32"
    assert resolve.resolve_dtype("auto", "cpu") == resolve.resolve_dtype(
        "auto", "cpu", resolve.cpu_capability())
    with pytest.raises(InvalidRequestError, match="torch sees no CUDA"):
        import torch

        if torch.cuda.is_available():
            raise InvalidRequestError("torch sees no CUDA (skipped check on a GPU machine)")
        resolve.resolve_device("cuda")


class _ByteTokenizer:
    """Decodes each token id as one UTF-8 byte, like a byte-level BPE with no merges."""

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return bytes(ids).decode("utf-8", errors="replace")


def test_incremental_decoder_multibyte() -> None:
    text = "naïve café 日本語 🙂!"
    decoder = IncrementalDecoder(_ByteTokenizer())
    pieces = [decoder.add(b) for b in text.encode("utf-8")]
    pieces.append(decoder.flush())
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)


@pytest.mark.parametrize("split", range(1, 12))
def test_stop_matcher_any_boundary(split: int) -> None:
    text = "hello STOP world"
    for stops in (["STOP"], ["STOP", "xyz"], ["world"], ["O"]):
        matcher = StopMatcher(stops)
        out = [matcher.feed(text[i : i + split]) for i in range(0, len(text), split)
               if not matcher.stopped]
        if not matcher.stopped:
            out.append(matcher.flush())
        first = min(text.find(s) for s in stops if s in text)
        assert "".join(out) == text[:first]
        assert matcher.stopped


def test_stop_matcher_holds_back_only_prefixes() -> None:
    matcher = StopMatcher(["END"])
    assert matcher.feed("abc E") == "abc "
    assert matcher.feed("x") == "Ex"
    assert matcher.flush() == ""
