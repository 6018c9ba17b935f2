"""The lean CPU decode path (local/fast.py): same logits as transformers, shared weights,
offset prefill, sampling, the prefix cache, and the switch that turns it off."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from openweight import Client
from openweight.local.fast import FastCache, FastModel, unsupported_reason
from openweight.local.loader import load_model, unload_all
from openweight.local.quantize import quantize_model

from conftest import use_kernels, wide_model

HI = [{"role": "user", "content": "hi there, how are you?"}]


def _model(arch: str, seed: int = 0) -> Any:
    return wide_model(arch, seed=seed)


def _reference(model: Any, ids: list[int]) -> Any:
    """transformers' own logits for every position."""
    import torch

    with torch.inference_mode():
        return model(torch.tensor([ids])).logits[0].float()


def _close(a: Any, b: Any) -> None:
    scale = float(b.abs().max())
    assert float((a - b).abs().max()) <= 0.03 * scale, (a - b).abs().max()


@pytest.mark.parametrize("mode", ["none", "int8", "int4"])
@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_forward_matches_transformers(arch: str, mode: str,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """The layers one operation at a time, in the model's bfloat16 as transformers runs
    them (PyTorch's kernels: ours would decode in one float32 call, checked below)."""
    import torch

    use_kernels(monkeypatch, "pytorch")
    model = _model(arch)
    quantize_model(model, mode, "cpu")
    ids = torch.randint(0, 300, (40,), generator=torch.Generator().manual_seed(1)).tolist()
    want = _reference(model, ids)
    fast = FastModel(model)
    cache = fast.new_cache(8)  # grows as needed
    with torch.inference_mode():
        _close(fast.forward(ids[:20], cache)[0], want[19])  # prefill from position 0
        _close(fast.forward(ids[20:30], cache)[0], want[29])  # prefill after a cached prefix
        for j in range(30, 40):  # one token at a time
            _close(fast.decode(ids[j], cache)[0], want[j])
    assert cache.get_seq_length() == 40 and cache.capacity >= 40
    # the fused weights are the modules' weights: transformers' forward is unchanged
    assert torch.equal(_reference(model, ids), want)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("mode", ["int8", "int4"])
@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_one_call_decode_step_matches_the_layers(arch: str, mode: str, dtype: str,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """A model with packed layers on our kernels decodes a token in one call of ours
    (step_kernel.decode_step), in float32 whatever the model's dtype: the same logits and KV
    cache as a float32 copy's layers one operation at a time, step after step (GQA, q/k/v
    biases, Qwen3's q/k norms); a bfloat16 model's within its own rounding."""
    import torch

    from openweight.local import kernels

    use_kernels(monkeypatch, "own")
    models = [_model(arch).float(), _model(arch).float() if dtype == "float32" else _model(arch)]
    for model in models:
        quantize_model(model, mode, "cpu")
    reference, fast = FastModel(models[0]), FastModel(models[1])
    if mode == "int4" and not kernels._load().block:  # a layout ours cannot read: no step
        assert fast.step is None
        return
    assert fast.step is not None
    reference.step = None  # the layers one operation at a time
    ids = torch.randint(0, 300, (30,), generator=torch.Generator().manual_seed(2)).tolist()
    want = _reference(models[0], ids)[20:]
    # how far transformers' own forward of this model is from the float32 copy's
    theirs = float((_reference(models[1], ids)[20:] - want).abs().max())
    caches = reference.new_cache(8), fast.new_cache(8)
    ours = 0.0
    with torch.inference_mode():
        reference.forward(ids[:20], caches[0])
        fast.forward(ids[:20], caches[1])
        for j, i in enumerate(ids[20:]):
            layers = reference.decode(i, caches[0])[0]
            got = fast.decode(i, caches[1])[0].float()
            if dtype == "float32":
                assert torch.allclose(got, layers, rtol=0, atol=1e-3 * float(got.abs().max()))
                _close(got, want[j])
            ours = max(ours, float((got - layers).abs().max()), float((got - want[j]).abs().max()))
    # a bfloat16 model's prompt runs in bfloat16: no further off than transformers' own
    # bfloat16 forward (2-3% of the largest logit here), give or take a quarter
    assert ours <= max(0.03 * float(want.abs().max()), 1.25 * theirs), (ours, theirs)
    for a, b in zip((*caches[0].k, *caches[0].v), (*caches[1].k, *caches[1].v), strict=True):
        a, b = a[:, :, :30], b[:, :, :30]
        tolerance = 1e-3 if dtype == "float32" else 0.03
        assert torch.allclose(a, b, rtol=0, atol=tolerance * float(b.abs().max()))
    use_kernels(monkeypatch, "pytorch")  # a step built under ours gives way to PyTorch's
    assert not fast.one_call
    with torch.inference_mode():
        got = fast.decode(ids[0], caches[1])[0].float()
        if dtype == "float32":
            _close(got, reference.decode(ids[0], caches[0])[0])
        assert bool(got.isfinite().all()) and caches[1].length == 31


def test_the_one_call_step_refuses_what_it_would_misread(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The C step trusts its pointers: a wrong dtype or shape is refused before it runs (a
    bfloat16 row read as float32 would write past its end)."""
    import torch

    use_kernels(monkeypatch, "own")
    model = _model("llama")
    quantize_model(model, "int8", "cpu")
    fast = FastModel(model)
    assert fast.step is not None
    cache = fast.new_cache(8)
    strides = {"head_stride": cache.capacity * fast.head_dim, "token_stride": fast.head_dim}
    good = {"x": torch.zeros(1, fast.hidden), "spans": torch.tensor([[0, 0, 1]]),
            "cos": torch.ones(1, fast.head_dim), "sin": torch.zeros(1, fast.head_dim)}
    bad = {"x": torch.zeros(1, fast.hidden, dtype=torch.bfloat16),
           "spans": torch.tensor([[0, 0, 1]], dtype=torch.int32),
           "cos": torch.ones(2, fast.head_dim), "sin": torch.zeros(1, 2 * fast.head_dim)[:, ::2]}
    for name, wrong in bad.items():
        args = {**good, name: wrong}
        with pytest.raises(ValueError, match=f"step's {name} must be"):
            fast.step(args["x"], cache.k, cache.v, args["spans"], args["cos"], args["sin"],
                      **strides)
    with pytest.raises(ValueError, match="float32 keys and values"):
        fast.step(good["x"], cache.k[:1], cache.v, good["spans"], good["cos"], good["sin"],
                  **strides)
    assert fast.step(good["x"], cache.k, cache.v, good["spans"], good["cos"], good["sin"],
                     **strides)


@pytest.mark.parametrize("mode", ["none", "int4"])
def test_a_long_prompt_runs_in_chunks(mode: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A prompt longer than ``PREFILL_CHUNK`` goes through the layers a chunk at a time (and
    after a cached prefix too): the same logits, the cache filled as by one pass."""
    import torch

    from openweight.local import fast as fast_module

    model = _model("llama")
    quantize_model(model, mode, "cpu")
    ids = torch.randint(0, 300, (45,), generator=torch.Generator().manual_seed(2)).tolist()
    want = _reference(model, ids)
    fast = FastModel(model)
    whole = fast.new_cache(8)
    with torch.inference_mode():
        fast.forward(ids, whole)
        monkeypatch.setattr(fast_module, "PREFILL_CHUNK", 8)
        seen: list[int] = []
        real = fast._forward
        monkeypatch.setattr(fast, "_forward", lambda part, c: seen.append(len(part)) or real(
            part, c))
        cache = fast.new_cache(8)
        _close(fast.forward(ids[:21], cache)[0], want[20])  # 8 + 8 + 5
        _close(fast.forward(ids[21:], cache)[0], want[44])  # 8 + 8 + 8 after 21 cached
    assert seen == [8, 8, 5, 8, 8, 8]
    assert cache.get_seq_length() == 45
    for a, b in zip((*cache.k, *cache.v), (*whole.k, *whole.v), strict=True):
        assert torch.allclose(a[:, :, :45], b[:, :, :45], atol=1e-2, rtol=1e-2)


@pytest.mark.parametrize("mode", ["none", "int8", "int4"])
def test_fused_weights_share_memory(mode: str) -> None:
    """The fused products' weights (and int8 scales, int4 scale/zero tables) are the
    modules' own, whose forward still gives what it gave."""
    import torch

    model = _model("llama")
    quantize_model(model, mode, "cpu")
    before = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    attn, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
    x = torch.randn(3, model.config.hidden_size, dtype=model.dtype)
    with torch.inference_mode():
        want = [m(x) for m in (attn.q_proj, attn.k_proj, attn.v_proj, mlp.up_proj)]
    FastModel(model)
    parts = {"none": ["weight"], "int8": ["weight", "scales"],
             "int4": ["weight", "scale_zero"]}[mode]
    for part in parts:
        storage = getattr(attn.q_proj, part).untyped_storage().data_ptr()
        assert getattr(attn.k_proj, part).untyped_storage().data_ptr() == storage
        assert getattr(attn.v_proj, part).untyped_storage().data_ptr() == storage
        assert getattr(mlp.up_proj, part).untyped_storage().data_ptr() == \
            getattr(mlp.gate_proj, part).untyped_storage().data_ptr()
    with torch.inference_mode():
        got = [m(x) for m in (attn.q_proj, attn.k_proj, attn.v_proj, mlp.up_proj)]
    assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))
    seen: dict[int, int] = {}
    for t in model.state_dict().values():
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    assert sum(seen.values()) <= before  # nothing is held twice


def test_cache_crop_and_reserve() -> None:
    import torch

    model = _model("llama")
    fast = FastModel(model)
    ids = list(range(1, 31))
    cache = fast.new_cache(4)
    with torch.inference_mode():
        fast.forward(ids, cache)
        cache.crop(-10)  # forget the last ten positions, then recompute them
        assert cache.get_seq_length() == 20
        again = fast.forward(ids[20:], cache)
        fresh = fast.forward(ids, fast.new_cache(len(ids)))
    _close(again[0], fresh[0])
    cache.crop(5)
    assert cache.get_seq_length() == 5


def test_unsupported_models_and_the_switch(monkeypatch: pytest.MonkeyPatch) -> None:
    model = _model("llama")
    assert unsupported_reason(model, "cpu") is None
    assert "CPU" in str(unsupported_reason(model, "cuda"))
    monkeypatch.setenv("OPENWEIGHT_FAST", "0")
    assert "OPENWEIGHT_FAST" in str(unsupported_reason(model, "cpu"))


def test_engine_uses_it_and_can_do_without(tiny_model: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    unload_all()
    lm = load_model(tiny_model)
    assert lm.fast is not None and lm.fast_off_reason is None
    client = Client(str(tiny_model))
    fast = client.chat(HI, max_tokens=12, temperature=0)
    assert fast.usage.completion_tokens > 0
    monkeypatch.setenv("OPENWEIGHT_FAST", "0")
    unload_all()
    lm = load_model(tiny_model)
    assert lm.fast is None and "OPENWEIGHT_FAST" in str(lm.fast_off_reason)
    slow = Client(str(tiny_model)).chat(HI, max_tokens=12, temperature=0)
    assert slow.usage.completion_tokens > 0
    unload_all()


def test_sampling_settings_are_honoured(tiny_model: Path) -> None:
    client = Client(str(tiny_model))
    greedy = client.chat(HI, max_tokens=16, temperature=0).text
    # top_k=1 keeps only the most likely token: sampling then is greedy
    assert client.chat(HI, max_tokens=16, temperature=1.5, top_k=1, seed=3).text == greedy
    a = client.chat(HI, max_tokens=16, temperature=1.5, seed=7).text
    assert a == client.chat(HI, max_tokens=16, temperature=1.5, seed=7).text
    others = {client.chat(HI, max_tokens=16, temperature=1.5, seed=s).text for s in range(4)}
    assert len(others) > 1  # seeds matter
    penalised = client.chat(HI, max_tokens=16, temperature=0, repetition_penalty=5.0).text
    assert penalised != greedy


def test_prefix_cache_holds_fast_caches(tiny_model: Path) -> None:
    client = Client(str(tiny_model))
    lm = client.backend.loaded  # type: ignore[attr-defined]
    lm.prefix_cache.clear()
    first = client.chat(HI, max_tokens=24, temperature=0)
    history = [*HI, {"role": "assistant", "content": first.text},
               {"role": "user", "content": "and then?"}]
    hits = lm.prefix_cache.hits
    cached = client.chat(history, max_tokens=24, temperature=0).text
    assert lm.prefix_cache.hits == hits + 1
    assert all(isinstance(held, FastCache) for _, held in lm.prefix_cache._entries.values())
    lm.prefix_cache.clear()
    assert client.chat(history, max_tokens=24, temperature=0).text == cached


def test_closing_mid_stream_returns_the_cache(tiny_model: Path) -> None:
    client = Client(str(tiny_model))
    lm = client.backend.loaded  # type: ignore[attr-defined]
    lm.prefix_cache.clear()
    stream = client.stream(HI * 3, max_tokens=200, temperature=0)
    next(iter(stream))
    stream.close()
    assert len(lm.prefix_cache) == 1  # the partial conversation is kept for reuse


def test_model_thread_runs_the_work_and_hands_back_errors() -> None:
    import threading

    from openweight.local import worker

    names = {worker.call(lambda: threading.current_thread().name) for _ in range(3)}
    assert names == {worker.NAME}
    assert worker.call(lambda: worker.call(lambda: 41) + 1) == 42  # nested: runs inline
    with pytest.raises(ZeroDivisionError):
        worker.call(lambda: 1 // 0)
    assert worker.call(lambda: "still alive") == "still alive"


def test_streams_from_many_threads_interleave_and_match(tiny_model: Path) -> None:
    import threading

    client = Client(str(tiny_model))
    prompts = [[{"role": "user", "content": f"story number {i}"}] for i in range(4)]
    alone = [client.chat(p, max_tokens=20, temperature=0).text for p in prompts]
    together: dict[int, str] = {}

    def run(i: int) -> None:
        together[i] = "".join(c.text for c in client.stream(prompts[i], max_tokens=20,
                                                            temperature=0))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert [together[i] for i in range(4)] == alone


def test_an_error_in_a_step_reaches_the_consumer(tiny_model: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    from openweight import GenerationError
    from openweight.local import worker

    client = Client(str(tiny_model))
    lm = client.backend.loaded  # type: ignore[attr-defined]
    real = FastModel.decode
    calls: list[int] = []

    def failing(self: FastModel, token: int, cache: FastCache) -> Any:
        calls.append(1)
        if len(calls) == 2:  # the third token's step
            raise RuntimeError("simulated kernel failure")
        return real(self, token, cache)

    monkeypatch.setattr(FastModel, "decode", failing)
    with pytest.raises(GenerationError, match="simulated kernel failure"):
        client.chat(HI, max_tokens=20, temperature=0)
    monkeypatch.undo()
    assert worker.call(lambda: "free") == "free"
    assert lm.fast is not None
    assert client.chat(HI, max_tokens=3, temperature=0).usage.completion_tokens == 3
