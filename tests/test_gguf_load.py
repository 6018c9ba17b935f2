"""A GGUF file as the checkpoint: 4-bit blocks repacked as they are, everything else
dequantised a tensor at a time, names and llama.cpp's row order undone."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from openweight import Client, ModelLoadError
from openweight.local import loader, resolve
from openweight.local.gguf_source import FOUR_BIT_TYPES, GgufSource, gguf_groups
from openweight.local.packed_load import _empty_model, load_packed

from conftest import CHATML, SPECIALS, byte_tokenizer

HI = [{"role": "user", "content": "hello"}]


def _random_blocks(kind: str, rows: int, cols: int, seed: int = 0) -> np.ndarray:
    """Random bytes of a ``kind`` tensor whose fp16 fields are finite, positive scales."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    qtype = GGMLQuantizationType[kind]
    block, size = GGML_QUANT_SIZES[qtype]
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, size=(rows * cols // block, size), dtype=np.uint8)
    fp16_fields = {"Q4_0": 1, "Q4_1": 2, "Q4_K": 2}[kind]
    for i in range(fp16_fields):
        values = rng.uniform(0.001, 0.02, size=raw.shape[0]).astype(np.float16)
        if kind == "Q4_1" and i == 1:
            values = -values * 8  # the minimum
        raw[:, 2 * i:2 * i + 2] = values.view(np.uint8).reshape(-1, 2)
    return raw.reshape(rows, -1)


@pytest.mark.parametrize("kind", FOUR_BIT_TYPES)
def test_four_bit_groups_are_the_gguf_weights_exactly(kind: str) -> None:
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    rows, cols = 8, 512
    raw = _random_blocks(kind, rows, cols)
    codes, scale, low = gguf_groups(raw, kind, rows, cols)
    assert codes.dtype == np.uint8 and codes.max() <= 15 and scale.shape == (rows, cols // 32)
    rebuilt = (codes.reshape(rows, -1, 32).astype(np.float32) * scale[..., None]
               + low[..., None]).reshape(rows, cols)
    expected = dequantize(raw, GGMLQuantizationType[kind])
    assert np.array_equal(rebuilt, expected)


def test_int4_layer_from_codes_is_the_kernel_of_those_weights() -> None:
    """The packed layer computes the GGUF's own weights; only its scale and zero are
    rounded to bfloat16, so the product agrees to bf16 rounding, and the codes are kept."""
    import torch

    from openweight.local.quantize import int4_linear_from_codes

    rows, cols = 128, 256
    codes, scale, low = (torch.from_numpy(a) for a in
                         gguf_groups(_random_blocks("Q4_1", rows, cols), "Q4_1", rows, cols))
    weight = (codes.reshape(rows, -1, 32).float() * scale[..., None]
              + low[..., None]).reshape(rows, cols)
    layer = int4_linear_from_codes(codes, scale, low, None)
    x = torch.randn(4, cols)
    got, want = layer(x).float(), x @ weight.T
    assert (got - want).abs().max() <= 0.02 * want.abs().max()
    # each group's errors are centred: the mean error of a weight is far below one step
    eye = layer(torch.eye(cols)).float().T
    step = scale.repeat_interleave(32, dim=1)
    assert ((eye - weight) / step).mean().abs() < 0.01


# -- a tiny Llama written as a GGUF, as llama.cpp's converter lays it out ------------------

def _permute(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's reordering of the query/key rows (``LlamaModel.permute``)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(
        w.shape)


def _tiny_llama() -> Any:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = byte_tokenizer(SPECIALS, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                               bos_token="<|endoftext|>",
                               additional_special_tokens=["<|im_start|>"])
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=128,  # type: ignore[arg-type]
                         intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=512,
                         eos_token_id=SPECIALS.index("<|im_end|>"), bos_token_id=0,
                         pad_token_id=0, tie_word_embeddings=True, initializer_range=0.2)
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval(), tokenizer


def _write_gguf_model(path: Path, kinds: dict[str, str]) -> tuple[Path, dict[str, Any]]:
    """A model directory as ``openweight pull`` of a GGUF makes it, with each 2-D weight
    stored as ``kinds`` says (by a substring of its name; default F32). Returns the
    directory and the weights the GGUF holds, dequantised, under the model's names."""
    import torch
    from gguf import MODEL_ARCH, GGMLQuantizationType, GGUFWriter, get_tensor_name_map
    from gguf.quants import dequantize, quantize

    model, tokenizer = _tiny_llama()
    cfg = model.config
    names = get_tensor_name_map(MODEL_ARCH.LLAMA, cfg.num_hidden_layers)
    path.mkdir(parents=True)
    writer = GGUFWriter(str(path / "model.gguf"), "llama")
    expected: dict[str, Any] = {}
    for hf_name, tensor in model.state_dict().items():
        if hf_name == "lm_head.weight":
            continue  # tied
        base, _, suffix = hf_name.rpartition(".")
        w = tensor.float().numpy()
        if ".q_proj." in hf_name:
            w = _permute(w, cfg.num_attention_heads)
        elif ".k_proj." in hf_name:
            w = _permute(w, cfg.num_key_value_heads)
        kind = next((k for part, k in kinds.items() if part in hf_name and w.ndim == 2), "F32")
        qtype = GGMLQuantizationType[kind]
        data = w if kind == "F32" else quantize(w, qtype)
        writer.add_tensor(f"{names.get_name(base)}.{suffix}", data,
                          raw_dtype=None if kind == "F32" else qtype)
        stored = dequantize(data, qtype) if kind != "F32" else w
        if ".q_proj." in hf_name or ".k_proj." in hf_name:  # undo, as the loader must
            heads = cfg.num_attention_heads if ".q_proj." in hf_name else cfg.num_key_value_heads
            stored = stored.reshape(heads, stored.shape[0] // heads // 2, 2, -1).swapaxes(
                1, 2).reshape(stored.shape)
        expected[hf_name] = torch.from_numpy(np.ascontiguousarray(stored))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    config = cfg.to_dict()
    config.update(openweight_gguf="model.gguf", openweight_source_bits=4)
    (path / "config.json").write_text(json.dumps(config), encoding="utf-8")
    tokenizer.chat_template = CHATML  # type: ignore[attr-defined]
    tokenizer.save_pretrained(str(path))  # type: ignore[attr-defined]
    return path, expected


@pytest.fixture(scope="module")
def gguf_model(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    return _write_gguf_model(tmp_path_factory.mktemp("gguf") / "tiny",
                             {"proj": "Q4_1", "embed": "Q8_0"})


def test_tensors_come_back_under_the_models_names_in_its_row_order(
        gguf_model: tuple[Path, dict[str, Any]]) -> None:
    import torch

    path, expected = gguf_model
    model = _empty_model(path, torch.float32)
    source = GgufSource(path / "model.gguf", model, torch.float32)
    assert source.supported and source.names == set(expected)
    for name, want in expected.items():
        assert torch.equal(source.read(name), want), name
        grid = source.groups(name)
        if source.kind(name) == "Q4_1":
            assert grid is not None
            codes, scale, low = grid
            rebuilt = (codes.reshape(codes.shape[0], -1, 32).float() * scale[..., None]
                       + low[..., None]).reshape(want.shape)
            assert torch.equal(rebuilt, want), name
        else:
            assert grid is None, name


@pytest.mark.parametrize("mode", ["int4", "int8", "none"])
def test_gguf_loads_as_the_model_its_weights_make(
        gguf_model: tuple[Path, dict[str, Any]], mode: str) -> None:
    """Loaded from the GGUF, the model is the same architecture given the GGUF's
    dequantised weights: exactly that, packed the usual way, for none and int8 (which
    packs from those weights); for int4, whose layers keep the GGUF's own 4-bit codes,
    its logits agree with the unpacked model's to the kernel's bf16 rounding."""
    import torch
    from transformers import AutoModelForCausalLM

    from openweight.local.quantize import quantize_model

    path, expected = gguf_model
    reference = AutoModelForCausalLM.from_config(_tiny_llama()[0].config).eval()
    reference.load_state_dict(expected, strict=False)
    reference.tie_weights()
    if mode != "int4":
        quantize_model(reference, mode, "cpu")
    model = load_packed(path, "float32", mode)
    assert model is not None
    kinds = {type(m).__name__ for m in model.modules()}
    assert {"int4": "Int4Linear", "int8": "Int8Linear", "none": "Linear"}[mode] in kinds
    ids = torch.tensor([[5, 80, 90, 100, 33, 7]])
    with torch.inference_mode():
        got, want = model(ids).logits, reference(ids).logits
    if mode != "int4":
        assert torch.equal(got, want)
    else:
        assert (got - want).abs().max() <= 0.05 * want.abs().max()
        assert torch.equal(got.argmax(-1), want.argmax(-1))


@pytest.mark.parametrize("mode", ["int4", "int8"])
def test_four_bit_token_embeddings_stay_four_bit(tmp_path: Path, mode: str,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """A GGUF's Q4_1 token embeddings are kept as codes (0.75 bytes a weight): every row
    looked up is the dequantised row exactly, and the kept packed form restores them as
    they were, without reading the GGUF."""
    import torch

    from openweight.local import gguf_source

    path, expected = _write_gguf_model(tmp_path / "m", {"proj": "Q4_1", "embed": "Q4_1"})
    model = load_packed(path, "float32", mode, tmp_path / "kept")
    assert model is not None
    embed = model.get_input_embeddings()
    assert type(embed).__name__ == "Int4Embedding"
    assert "model.embed_tokens.weight" not in model.state_dict()
    table = expected["model.embed_tokens.weight"]
    ids = torch.arange(table.shape[0])
    assert torch.equal(embed(ids), table)
    assert torch.equal(embed(ids[:256].view(4, -1)), table[:256].view(4, -1, table.shape[1]))
    monkeypatch.setattr(gguf_source, "GgufSource", None)  # a restore reads no GGUF
    again = load_packed(path, "float32", mode, tmp_path / "kept")
    assert again is not None and torch.equal(again.get_input_embeddings()(ids), table)
    x = torch.tensor([[5, 80, 90, 100, 33, 7]])
    with torch.inference_mode():
        assert torch.equal(again(x).logits, model(x).logits)


def test_gguf_model_answers_through_the_client(gguf_model: tuple[Path, dict[str, Any]],
                                               tmp_path: Path) -> None:
    path, _ = gguf_model
    loader.unload_all()
    result = Client(str(path)).chat(HI, max_tokens=4, temperature=0)
    lm = Client(str(path)).backend.loaded  # type: ignore[attr-defined]
    assert lm.quantize == resolve.resolve_quantize("auto", "cpu", path) and lm.fast is not None
    assert resolve.resolve_quantize("auto", "cpu", path, "AVX2") == "int4"
    assert result.usage.completion_tokens >= 1
    loader.unload_all()


def test_gguf_type_the_gguf_package_cannot_read(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    import torch
    from gguf import quants

    path, _ = _write_gguf_model(tmp_path / "m", {"proj": "Q8_0"})

    def unknown(*args: object, **kwargs: object) -> None:
        raise NotImplementedError("no dequantisation for this type")

    monkeypatch.setattr(quants, "dequantize", unknown)
    with pytest.raises(ModelLoadError, match=r"blk\.0\..* is stored as Q8_0"):
        load_packed(path, "float32", "int8")
    del torch


def test_truncated_gguf_weights_name_the_tensor(gguf_model: tuple[Path, dict[str, Any]],
                                                tmp_path: Path) -> None:
    import shutil

    path, _ = gguf_model
    cut = tmp_path / "cut"
    shutil.copytree(path, cut)
    size = (cut / "model.gguf").stat().st_size
    with open(cut / "model.gguf", "r+b") as f:
        f.truncate(size - 1000)
    with pytest.raises(ModelLoadError, match=r"model\.gguf.* truncated"):
        load_packed(cut, "float32", "int4")
