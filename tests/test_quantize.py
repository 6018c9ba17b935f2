"""Weight-only int8/int4 quantisation of the local engine."""

from __future__ import annotations

from pathlib import Path

import pytest

from openweight import Client, InvalidRequestError
from openweight.local.quantize import quantize_model
from openweight.local.resolve import auto_quantize, resolve_quantize, source_bits

HI = [{"role": "user", "content": "hi there"}]


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_quantized_tiny_model_generates(tiny_model: Path, mode: str) -> None:
    client = Client(str(tiny_model), quantize=mode)
    result = client.chat(HI, max_tokens=10, temperature=0)
    assert result.usage.completion_tokens == 10 or result.finish_reason == "stop"
    streamed = "".join(c.text for c in client.stream(HI, max_tokens=10, temperature=0))
    assert streamed == result.text
    lm = client.backend.loaded  # type: ignore[attr-defined]
    assert lm.quantize == mode
    kinds = {type(m).__name__ for m in lm.model.modules()}
    assert "Linear" not in kinds
    assert "Int8Linear" in kinds  # the output layer (and int4's fallback) is int8
    if mode == "int4":
        assert "Int4Linear" in kinds
    plain = Client(str(tiny_model), quantize="none").backend.loaded  # type: ignore[attr-defined]
    assert plain is not lm and plain.quantize == "none"


def test_quantized_logits_stay_close(tiny_model: Path) -> None:
    import torch

    plain = Client(str(tiny_model), dtype="float32").backend.loaded  # type: ignore[attr-defined]
    ids = torch.tensor([[5, 80, 90, 100, 33, 44]])
    with torch.inference_mode():
        ref = plain.model(ids).logits.float()
        for mode, tolerance in (("int8", 0.05), ("int4", 0.5)):
            quant = Client(str(tiny_model), dtype="float32", quantize=mode)
            got = quant.backend.loaded.model(ids).logits.float()  # type: ignore[attr-defined]
            rel = (got - ref).norm() / ref.norm()
            assert rel < tolerance, (mode, float(rel))


@pytest.mark.parametrize(("mode", "tolerance"), [("int8", 0.01), ("int4", 0.1)])
def test_one_layer_matches_its_float_weights(mode: str, tolerance: float) -> None:
    import torch

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(128, 64))
    x = torch.randn(3, 128)
    with torch.inference_mode():
        ref = model(x)
        quantize_model(model, mode, "cpu")
        got = model(x)
    assert type(model[0]).__name__ == ("Int4Linear" if mode == "int4" else "Int8Linear")
    assert got.shape == ref.shape
    assert float((got - ref).norm() / ref.norm()) < tolerance


def test_auto_resolves_by_device_family_and_source(tiny_model: Path, tiny_gpt_oss: Path,
                                                  tmp_path: Path) -> None:
    import json
    import shutil

    for cap in ("AVX512", "AVX2"):  # CPUs whose packed kernels are fast
        assert resolve_quantize(None, "cpu", tiny_model, cap) == "int8"  # full precision
        assert resolve_quantize("AUTO", "cpu", tiny_model, cap) == "int8"
    assert resolve_quantize("none", "cpu", tiny_model) == "none"
    assert resolve_quantize("auto", "cuda", tiny_model) == "none"  # GPUs have the bandwidth
    assert resolve_quantize("auto", "cpu", tiny_gpt_oss) == "none"  # no fast path for it
    four_bit = tmp_path / "from-q4-gguf"
    shutil.copytree(tiny_model, four_bit)
    config = json.loads((four_bit / "config.json").read_text())
    config["openweight_source_bits"] = 4
    (four_bit / "config.json").write_text(json.dumps(config))
    assert source_bits(four_bit) == 4 and source_bits(tiny_model) is None
    assert resolve_quantize(None, "cpu", four_bit, "AVX2") == "int4"
    lm = Client(str(four_bit)).backend.loaded  # type: ignore[attr-defined]
    assert lm.quantize == resolve_quantize(None, "cpu", four_bit)  # this CPU's choice
    with pytest.raises(InvalidRequestError, match="quantize 'int3'") as info:
        resolve_quantize("int3", "cpu", tiny_model)
    assert info.value.param == "quantize"


@pytest.mark.parametrize("cap", ["DEFAULT", "SVE256", "ZVECTOR"])
def test_auto_keeps_to_none_where_packed_kernels_are_slow(
        cap: str, tiny_model: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """On CPUs without the vectorised packed kernels (measured 2-4x slower than none on the
    generic ones; ARM unmeasured), auto is none, unless only the packed form fits."""
    from openweight.local import memory

    assert resolve_quantize("auto", "cpu", tiny_model, cap) == "none"
    assert resolve_quantize("int8", "cpu", tiny_model, cap) == "int8"  # asked for: honoured
    choice, why = auto_quantize("cpu", tiny_model, cap)
    assert choice == "none" and cap in why and "slower" in why
    choice, why = auto_quantize("cpu", tiny_model, "AVX2")
    assert choice == "int8" and "AVX2" in why and "full-precision" in why
    full = memory.estimate_memory(tiny_model, "cpu", "float32", quantize="none").total_bytes
    monkeypatch.setattr(memory, "free_memory", lambda device: full - 1)
    assert resolve_quantize("auto", "cpu", tiny_model, cap) == "int8"


def test_bad_quantize_values(tiny_model: Path) -> None:
    with pytest.raises(InvalidRequestError, match="quantize 'int3'"):
        Client(str(tiny_model), quantize="int3")
    with pytest.raises(InvalidRequestError, match="runs on the CPU"):
        quantize_model(object(), "int8", "cuda")


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["auto", "none", "int8", "int4"])
def test_every_setting_still_answers_paris(smollm2_home: Path, monkeypatch: pytest.MonkeyPatch,
                                           mode: str) -> None:
    monkeypatch.setenv("OPENWEIGHT_HOME", str(smollm2_home))
    result = Client(quantize=mode).chat(
        [{"role": "user", "content": "What is the capital of France?"}], temperature=0,
        max_tokens=24)
    assert "Paris" in result.text
