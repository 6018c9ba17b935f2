"""gpt-oss with its MXFP4 experts kept packed on the CPU (local/mxfp4.py and
gpt_oss_packed.py), on tiny models.

The CPU route refits each MXFP4 block to an int4 grid, which is lossy: a checkpoint whose
codes all lie within +-3 (``exact_codes=True``) sits on a grid exactly and must give the
dequantised reference's tokens; full-range codes are held to the documented error bound.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from openweight import Client, ModelLoadError
from openweight.local import loader, memory, resolve
from openweight.local.gpt_oss_packed import PackedGptOssExperts, load_gpt_oss_packed
from openweight.local.mxfp4 import PACKED_BITS_PER_WEIGHT, decode_mxfp4, int4_codes

from conftest import build_tiny_gpt_oss

HIDDEN = INTER = 64
EXPERTS = 4
HI = [{"role": "user", "content": "Hi"}]
# the documented bound: the int4 refit's relative RMS error against the exact weights
# (measured 6.5% on Gaussian weights quantised to MXFP4; see benchmarks/bench_mxfp4.py)
REFIT_ERROR_BOUND = 0.075


def random_mxfp4(gen: torch.Generator, *shape: int, exact_codes: bool = False,
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Blocks (uint8 [..., rows, groups, 16]) and scales (uint8 [..., rows, groups]) of
    random MXFP4 weights of ``shape`` [..., rows, cols] (scale bytes 119-122: weights of a
    sane size); ``exact_codes``: magnitudes up to 3 only (codes 0-5, 8-13)."""
    *lead, rows, cols = shape
    codes = torch.randint(0, 16, (*lead, rows, cols), generator=gen, dtype=torch.uint8)
    if exact_codes:
        codes = (codes & 8) | ((codes & 7) % 6)
    pairs = codes.reshape(*lead, rows, cols // 32, 16, 2)
    blocks = pairs[..., 0] | (pairs[..., 1] << 4)
    scales = torch.randint(119, 123, (*lead, rows, cols // 32), generator=gen,
                           dtype=torch.uint8)
    return blocks, scales


def build_tiny_mxfp4_gpt_oss(path: Path, *, seed: int = 0, exact_codes: bool = True) -> Path:
    """A random 2-layer gpt-oss (4 experts, hidden and intermediate 64) whose experts are
    stored as the hub stores them: ``*_blocks``/``*_scales`` uint8, biases bf16, and a
    ``quantization_config`` of ``{"quant_method": "mxfp4"}``."""
    from safetensors.torch import load_file, save_file

    build_tiny_gpt_oss(path, seed=seed, width=HIDDEN, head_dim=16)
    (saved,) = path.glob("*.safetensors")
    state = load_file(str(saved))
    gen = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    for name, value in state.items():
        if name.endswith(("experts.gate_up_proj", "experts.down_proj")):
            rows = value.shape[2]  # stored [E, in, out]; MXFP4 is [E, out, in/32, 16]
            blocks, scales = random_mxfp4(gen, EXPERTS, rows, value.shape[1],
                                          exact_codes=exact_codes)
            tensors[f"{name}_blocks"], tensors[f"{name}_scales"] = blocks, scales
        else:
            tensors[name] = value.contiguous()
    for old in path.glob("*.safetensors"):
        old.unlink()
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((path / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "mxfp4"}
    (path / "config.json").write_text(json.dumps(cfg))
    return path


@pytest.fixture(scope="module")
def mxfp4_gpt_oss(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_mxfp4_gpt_oss(tmp_path_factory.mktemp("mxfp4") / "tiny-mxfp4")


def _reference(path: Path) -> Any:
    """transformers' own CPU route: the experts dequantised to bf16."""
    from transformers import AutoModelForCausalLM, Mxfp4Config

    return AutoModelForCausalLM.from_pretrained(
        str(path), dtype=torch.bfloat16,
        quantization_config=Mxfp4Config(dequantize=True)).eval()


def test_decode_equals_transformers_dequantisation() -> None:
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    gen = torch.Generator().manual_seed(1)
    blocks = torch.randint(0, 256, (3, 48, 4, 16), generator=gen, dtype=torch.uint8)
    scales = torch.randint(100, 140, (3, 48, 4), generator=gen, dtype=torch.uint8)
    theirs = convert_moe_packed_tensors(blocks, scales, dtype=torch.bfloat16)  # [E, in, out]
    ours = decode_mxfp4(blocks, scales)  # [E, out, in]
    assert ours.dtype == torch.bfloat16
    assert torch.equal(ours.transpose(-1, -2).view(torch.int16), theirs.view(torch.int16))


def _refit(blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    q, step, offset = int4_codes(blocks, scales)
    rows = q.shape[0]
    return ((q.float() - 8).reshape(rows, -1, 32) * step.float()[..., None]
            + offset.float()[..., None]).reshape(rows, -1)


def test_int4_refit_error_bound() -> None:
    """Gaussian weights quantised to MXFP4 (the OCP rule), refitted: within the bound."""
    torch.manual_seed(0)
    w = torch.randn(256, 512).reshape(256, 16, 32)
    exponent = (torch.floor(torch.log2(w.abs().amax(-1))) - 2).to(torch.int32)
    x = w / torch.ldexp(torch.ones(exponent.shape), exponent)[..., None]
    grid = torch.tensor([0, 0.5, 1, 1.5, 2, 3, 4, 6])
    codes = ((x.abs()[..., None] - grid).abs().argmin(-1) + 8 * (x < 0)).to(torch.uint8)
    pairs = codes.reshape(256, 16, 16, 2)
    blocks, scales = pairs[..., 0] | (pairs[..., 1] << 4), (exponent + 127).to(torch.uint8)
    exact = decode_mxfp4(blocks, scales, torch.float32)
    err = float((_refit(blocks, scales) - exact).norm() / exact.norm())
    assert 0.03 < err < REFIT_ERROR_BOUND
    gen = torch.Generator().manual_seed(2)  # codes within +-3 sit on an int4 grid exactly
    blocks, scales = random_mxfp4(gen, 64, 128, exact_codes=True)
    assert torch.equal(_refit(blocks, scales), decode_mxfp4(blocks, scales, torch.float32))


def test_packed_experts_layer_matches_formula() -> None:
    """One packed layer against transformers' GptOssExperts math on the refitted weights."""
    gen = torch.Generator().manual_seed(3)
    experts = PackedGptOssExperts(EXPERTS, HIDDEN, INTER, 1.702, 7.0, torch.bfloat16)
    weights = {}
    for proj, (rows, cols) in {"gate_up_proj": (2 * INTER, HIDDEN),
                               "down_proj": (HIDDEN, INTER)}.items():
        blocks, scales = random_mxfp4(gen, EXPERTS, rows, cols)
        for e in range(EXPERTS):
            experts.set_expert(proj, e, blocks[e], scales[e])
        weights[proj] = torch.stack([_refit(blocks[e], scales[e]) for e in range(EXPERTS)])
    x = torch.randn(5, HIDDEN, generator=gen).bfloat16()
    idx = torch.tensor([[0, 1], [2, 3], [1, 2], [0, 3], [3, 1]])
    wts = torch.softmax(torch.randn(5, 2, generator=gen), -1).bfloat16()
    out = experts(x, idx, wts).float()
    want = torch.zeros(5, HIDDEN)
    for t in range(5):
        for k in range(2):
            e = int(idx[t, k])
            gu = x[t].float() @ weights["gate_up_proj"][e].T
            gate, up = gu[::2].clamp(max=7.0), gu[1::2].clamp(-7.0, 7.0)
            h = (up + 1) * gate * torch.sigmoid(gate * 1.702)
            want[t] += float(wts[t, k]) * (h @ weights["down_proj"][e].T)
    assert float((out - want).norm() / want.norm()) < 0.02  # bf16 activations


def test_packed_model_matches_dequantised_reference(mxfp4_gpt_oss: Path) -> None:
    packed = load_gpt_oss_packed(mxfp4_gpt_oss, "bfloat16")
    reference = _reference(mxfp4_gpt_oss)
    ids = torch.tensor([[5, 70, 80, 90, 33, 44]])
    with torch.inference_mode():
        a = packed(ids).logits.float()
        b = reference(ids).logits.float()
        # bf16 rounding of the activations, summed in another order: 2% of the logits' range
        assert (a - b).abs().max() <= 0.02 * b.abs().max()
        kwargs: dict[str, Any] = {"max_new_tokens": 16, "do_sample": False, "min_new_tokens": 16}
        got = packed.generate(ids, **kwargs)
        want = reference.generate(ids, **kwargs)
    assert got.shape[1] == ids.shape[1] + 16
    assert torch.equal(got, want)


def test_loaded_model_never_holds_the_experts_in_bf16(mxfp4_gpt_oss: Path) -> None:
    model = load_gpt_oss_packed(mxfp4_gpt_oss, "bfloat16")
    full = {(EXPERTS, HIDDEN, 2 * INTER), (EXPERTS, 2 * INTER, HIDDEN),
            (EXPERTS, INTER, HIDDEN), (EXPERTS, HIDDEN, INTER)}
    for name, t in model.state_dict().items():
        assert not (t.is_floating_point() and tuple(t.shape) in full), name
        assert t.device.type == "cpu", name
    layer = model.model.layers[0].mlp.experts
    assert type(layer).__name__ == "PackedGptOssExperts"
    assert layer.gate_up_packed.dtype == torch.uint8
    assert layer.gate_up_packed.shape == (EXPERTS, 2 * INTER, HIDDEN // 2)


def test_load_model_on_cpu_answers(mxfp4_gpt_oss: Path, capsys: pytest.CaptureFixture[str],
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    loader.unload_all()
    monkeypatch.setattr(loader, "_notified", set())
    client = Client(str(mxfp4_gpt_oss), device="cpu")
    result = client.chat(HI, max_tokens=8, temperature=0)
    assert result.usage.completion_tokens >= 1
    loaded = client.backend.loaded  # type: ignore[attr-defined]
    assert type(loaded.model.model.layers[1].mlp.experts).__name__ == "PackedGptOssExperts"
    assert loaded.harmony_ids is not None
    assert "repacking" in capsys.readouterr().err
    loader.unload_all()


def _rewrite(src: Path, dest: Path, change: Any) -> Path:
    """A copy of the checkpoint at ``src`` with its tensors passed through ``change``."""
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dest)
    tensors = load_file(str(dest / "model.safetensors"))
    change(tensors)
    save_file(tensors, str(dest / "model.safetensors"), metadata={"format": "pt"})
    return dest


def test_wrong_shape_blocks_name_the_tensor(mxfp4_gpt_oss: Path, tmp_path: Path) -> None:
    name = "model.layers.1.mlp.experts.down_proj_blocks"

    def shrink(tensors: dict[str, torch.Tensor]) -> None:
        tensors[name] = tensors[name][:, :-1].contiguous()

    bad = _rewrite(mxfp4_gpt_oss, tmp_path / "bad", shrink)
    with pytest.raises(ModelLoadError, match=name):
        load_gpt_oss_packed(bad, "bfloat16")


def test_truncated_checkpoint_names_the_tensor(mxfp4_gpt_oss: Path, tmp_path: Path) -> None:
    import shutil

    bad = tmp_path / "truncated"
    shutil.copytree(mxfp4_gpt_oss, bad)
    weights = bad / "model.safetensors"
    with open(weights, "rb") as f:
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
    header.pop("__metadata__", None)
    name = max(header, key=lambda n: header[n]["data_offsets"][1])  # the last tensor stored
    begin, end = header[name]["data_offsets"]
    start = weights.stat().st_size - end
    with open(weights, "r+b") as f:
        f.truncate(start + (begin + end) // 2)
    with pytest.raises(ModelLoadError, match=name.replace(".", r"\.")):
        load_gpt_oss_packed(bad, "bfloat16")


def test_memory_estimate_counts_packed_experts(mxfp4_gpt_oss: Path) -> None:
    est = memory.estimate_memory(mxfp4_gpt_oss, "cpu", "bfloat16")
    expert_weights = 2 * EXPERTS * 3 * HIDDEN * INTER  # layers x experts x (gate_up + down)
    rest = est.parameters - expert_weights
    reading = int(EXPERTS * 2 * INTER * HIDDEN * memory.MXFP4_BYTES_PER_PARAM)
    assert est.weights_bytes == int(expert_weights * PACKED_BITS_PER_WEIGHT / 8 + rest * 2
                                    + reading)
    assert est.weights_bytes < est.parameters * 2  # below the dequantised bf16 model
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(mxfp4_gpt_oss))
    assert memory.cpu_packed_mxfp4(config, "cpu")
    assert not memory.cpu_packed_mxfp4(config, "cuda")


@pytest.mark.parametrize("quantize", ["none", "int8"])
def test_packed_form_is_kept_and_read_back(mxfp4_gpt_oss: Path, tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch,
                                           quantize: str) -> None:
    from openweight.local import gpt_oss_packed

    first = load_gpt_oss_packed(mxfp4_gpt_oss, "bfloat16", quantize, cache=tmp_path)
    (kept,) = tmp_path.glob(f"*-mxfp4-{quantize}-bfloat16-*.safetensors")
    linear = type(first.lm_head).__name__
    assert linear == {"none": "Linear", "int8": "Int8Linear"}[quantize]

    def no_repacking(*args: object) -> None:
        raise AssertionError("the kept form was not used")

    monkeypatch.setattr(gpt_oss_packed, "_fill", no_repacking)
    again = load_gpt_oss_packed(mxfp4_gpt_oss, "bfloat16", quantize, cache=tmp_path)
    assert type(again.lm_head).__name__ == linear
    assert again.state_dict().keys() == first.state_dict().keys()
    for name, value in first.state_dict().items():
        assert torch.equal(again.state_dict()[name], value), name
    monkeypatch.undo()
    kept.write_bytes(b"not safetensors")  # a broken kept file: repacked and rewritten
    third = load_gpt_oss_packed(mxfp4_gpt_oss, "bfloat16", quantize, cache=tmp_path)
    assert torch.equal(third.model.layers[0].mlp.experts.down_packed,
                       first.model.layers[0].mlp.experts.down_packed)
    assert kept.stat().st_size > 1000


def test_auto_packs_attention_and_output_int8_on_cpu(mxfp4_gpt_oss: Path) -> None:
    """auto: experts int4 (packed apart), the Linear layers int8; the estimate follows."""
    from transformers import AutoConfig, AutoModelForCausalLM

    assert resolve.resolve_quantize("auto", "cpu", mxfp4_gpt_oss) == "int8"
    assert resolve.resolve_quantize("auto", "cuda", mxfp4_gpt_oss) == "none"
    loader.unload_all()
    lm = loader.load_model(mxfp4_gpt_oss, "cpu", "bfloat16")
    kinds = {type(m).__name__ for m in lm.model.modules()}
    assert {"PackedGptOssExperts", "Int8Linear"} <= kinds and "Linear" not in kinds
    loader.unload_all()
    with torch.device("meta"):
        meta = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(str(mxfp4_gpt_oss)))
    linear = sum(m.weight.numel() for m in meta.modules() if isinstance(m, torch.nn.Linear))
    full = memory.estimate_memory(mxfp4_gpt_oss, "cpu", "bfloat16", quantize="none")
    packed = memory.estimate_memory(mxfp4_gpt_oss, "cpu", "bfloat16", quantize="int8")
    assert full.weights_bytes - packed.weights_bytes == linear  # 2 bytes a weight -> 1
