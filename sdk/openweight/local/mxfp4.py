"""gpt-oss on a CPU with its MXFP4 experts kept packed.

The hub's gpt-oss checkpoints store each MoE expert as MXFP4: blocks of 32 e2m1 codes
(4 bits: a sign and a value of {0, .5, 1, 1.5, 2, 3, 4, 6}) sharing one e8m0 scale byte
(2^(byte-127)). transformers has kernels for them on CUDA GPUs only; elsewhere it
dequantises every expert to bf16 (about 42 GB for gpt-oss-20b). Here each block is
repacked, as it is read, into PyTorch's packed int4 CPU kernel (``_weight_int4pack_mm_for_cpu``,
groups of 32 with a bf16 scale and offset each: 5 bits a weight, 12 GB of experts for
gpt-oss-20b), and a token computes only the experts its router picked.

The int4 grid is uniform and e2m1's is not, so the repacking is lossy: each block gets
the affine 16-level grid that minimises its squared error (measured on Gaussian weights
quantised to MXFP4: 6.5% relative RMS error in the weights and about 10% in a MoE layer's
output, against MXFP4's own 11% from the original weights; codes within +-3 are exact). An
exact route (look-up-table dequantisation of the routed experts every step, then a bf16
product) measured 66-76 ms a layer per decode token on 2 threads against 4-7 ms for int4
(``benchmarks/bench_mxfp4.py``): it spends its time in PyTorch's gather kernels.
"""

from __future__ import annotations

import functools
import re
from pathlib import Path
from typing import Any

from ..errors import ModelLoadError
from .kernels import int4_mm

__all__ = ["FP4_VALUES", "GROUP", "PACKED_BITS_PER_WEIGHT", "cpu_packed_mxfp4", "decode_mxfp4",
           "load_gpt_oss_packed", "packed_experts_class", "repack_mxfp4_int4"]

# the e2m1 value of each 4-bit code: bit 3 the sign (transformers' FP4_VALUES, in order)
FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0,
              -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
GROUP = 32  # values per MXFP4 block, and per int4 group: the two coincide
PACKED_BITS_PER_WEIGHT = 4 + 2 * 16 / GROUP  # int4 code + a bf16 scale and offset a group
ROWS_AT_ONCE = 1024  # rows repacked at a time: the working copies stay small


def cpu_packed_mxfp4(config: Any, device: str) -> bool:
    """Whether a model with this config (``config.json``'s dict, or a transformers config)
    loads with its MXFP4 experts packed for the CPU (``load_gpt_oss_packed``): a gpt-oss
    MXFP4 checkpoint on the CPU."""
    config = config if isinstance(config, dict) else config.to_dict()
    quant = config.get("quantization_config") or {}
    method = quant.get("quant_method") if isinstance(quant, dict) else getattr(
        quant, "quant_method", None)
    return (device == "cpu" and str(method).lower().endswith("mxfp4")
            and config.get("model_type") == "gpt_oss")


def decode_mxfp4(blocks: Any, scales: Any, dtype: Any = None) -> Any:
    """The weights of MXFP4 ``blocks`` (uint8 [..., rows, groups, 16], two codes a byte,
    the low nibble first) and ``scales`` (uint8 [..., rows, groups]) as [..., rows,
    groups * 32] in ``dtype`` (default bfloat16): equal, bit for bit, to transformers'
    dequantisation, transposed (it returns [..., in, out])."""
    import torch

    dtype = dtype or torch.bfloat16
    lut = torch.tensor(FP4_VALUES, dtype=torch.float32)
    codes = torch.stack([blocks & 0x0F, blocks >> 4], dim=-1).flatten(-2).long()
    values = lut[codes] * _pow2(scales)[..., None]
    return values.flatten(-2).to(dtype)


# The int4 grids a block may take, in units of its MXFP4 scale: level q (0..15) is
# offset + step * (q - 8). The 32 (step, offset) pairs (every one exact in bf16) are those a
# greedy search picked from all steps k/16 (k = 8..16) and offsets m/8 (|m| <= 16) for the
# least squared error on Gaussian and Laplace weights quantised to MXFP4: 6.39% relative RMS
# error in code units, against 6.35% with all 297 grids at a tenth of the repacking time.
GRIDS = ((0.75, 0.5), (0.5, 0.5), (0.8125, 0.375), (0.6875, -0.625), (0.5, 0.0),
         (0.75, 0.75), (1.0, 1.125), (0.5625, 1.75), (0.5625, -1.125), (0.6875, 1.375),
         (0.875, -0.375), (0.75, 0.0), (0.5, -1.5), (0.5, 2.0), (0.8125, 0.5), (0.625, 1.5),
         (0.625, -0.875), (0.8125, 0.25), (0.6875, -0.75), (0.6875, 1.25), (0.875, -0.5),
         (1.0, 1.0), (0.625, 1.25), (0.625, -0.625), (0.6875, -0.375), (0.8125, 0.625),
         (0.6875, 1.0), (0.5, -2.0), (0.625, -1.0), (0.625, 1.375), (0.625, 1.625),
         (0.75, 0.25))


@functools.cache
def _grids() -> tuple[Any, Any, Any, Any]:
    """(step [grids], offset [grids], the squared error of each code's nearest level
    [grids, 16], that level [grids, 16]) for ``GRIDS``."""
    import torch

    step = torch.tensor([g[0] for g in GRIDS])
    offset = torch.tensor([g[1] for g in GRIDS])
    levels = offset[:, None] + step[:, None] * (torch.arange(16) - 8)  # [grids, 16]
    values = torch.tensor(FP4_VALUES)
    err = (levels[:, None, :] - values[None, :, None]) ** 2  # [grids, code, level]
    best_err, best_q = err.min(dim=-1)
    return step, offset, best_err, best_q.to(torch.int32)


def _pow2(exponent_bytes: Any) -> Any:
    """2^(byte - 127) for e8m0 scale bytes, in float32 (exact, as transformers' ldexp)."""
    import torch

    return torch.ldexp(torch.ones(exponent_bytes.shape), exponent_bytes.to(torch.int32) - 127)


def int4_codes(blocks: Any, scales: Any) -> tuple[Any, Any, Any]:
    """Each MXFP4 block of ``blocks`` [rows, groups, 16] / ``scales`` [rows, groups] on
    its best affine 16-level grid: the int4 levels q [rows, groups * 32] (int32) and, per
    group, the bf16 step and offset [rows, groups] (the value is (q - 8) * step + offset)."""
    import torch

    step, offset, best_err, best_q = _grids()
    rows, groups = scales.shape
    codes = torch.stack([blocks & 0x0F, blocks >> 4], dim=-1).reshape(rows * groups, GROUP)
    codes = codes.long()
    hist = torch.zeros(rows * groups, 16).scatter_add_(1, codes, torch.ones(codes.shape))
    grid = (hist @ best_err.T).argmin(dim=1)  # the grid of least squared error, per block
    q = torch.gather(best_q[grid], 1, codes)
    unit = _pow2(scales.reshape(-1))
    bf16 = torch.bfloat16
    return (q.reshape(rows, groups * GROUP), (step[grid] * unit).to(bf16).reshape(rows, groups),
            (offset[grid] * unit).to(bf16).reshape(rows, groups))


def repack_mxfp4_int4(blocks: Any, scales: Any) -> tuple[Any, Any]:
    """One expert's MXFP4 weight (``blocks`` uint8 [out, in/32, 16], ``scales`` uint8
    [out, in/32]) in the packed int4 CPU layout: the packed codes (uint8 [out, in/2]) and
    the [in/32, out, 2] bfloat16 step/offset table ``_weight_int4pack_mm_for_cpu`` takes,
    ``ROWS_AT_ONCE`` rows at a time."""
    import torch

    packs, tables = [], []
    for b, s in zip(blocks.split(ROWS_AT_ONCE), scales.split(ROWS_AT_ONCE), strict=True):
        q, step, offset = int4_codes(b, s)
        packs.append(torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1))
        tables.append(torch.stack([step, offset], dim=-1).transpose(0, 1))
    return torch.cat(packs), torch.cat(tables, dim=1).contiguous()


@functools.cache
def packed_experts_class() -> Any:
    """The module that stands in for transformers' ``GptOssExperts`` (defined on first use:
    torch is imported lazily)."""
    import torch

    class PackedGptOssExperts(torch.nn.Module):  # type: ignore[misc]
        """gpt-oss's experts with their weights in packed int4 (``repack_mxfp4_int4``):
        the forward of ``GptOssExperts`` (the same arguments, the same clamped SwiGLU),
        computing only the experts the router picked for some token of the batch."""

        def __init__(self, num_experts: int, hidden: int, intermediate: int, alpha: float,
                     limit: float, dtype: Any) -> None:
            super().__init__()
            self.num_experts, self.hidden_size = num_experts, hidden
            self.intermediate_size = intermediate
            self.alpha, self.limit = alpha, limit
            u8, bf16 = torch.uint8, torch.bfloat16
            self.register_buffer("gate_up_packed", torch.empty(num_experts, 2 * intermediate,
                                                               hidden // 2, dtype=u8))
            self.register_buffer("gate_up_table", torch.empty(
                num_experts, hidden // GROUP, 2 * intermediate, 2, dtype=bf16))
            self.register_buffer("down_packed", torch.empty(num_experts, hidden,
                                                            intermediate // 2, dtype=u8))
            self.register_buffer("down_table", torch.empty(
                num_experts, intermediate // GROUP, hidden, 2, dtype=bf16))
            self.gate_up_proj_bias = torch.nn.Parameter(
                torch.zeros(num_experts, 2 * intermediate, dtype=dtype), requires_grad=False)
            self.down_proj_bias = torch.nn.Parameter(
                torch.zeros(num_experts, hidden, dtype=dtype), requires_grad=False)

        def set_expert(self, proj: str, expert: int, blocks: Any, scales: Any) -> None:
            """Repack one expert's MXFP4 ``proj`` (gate_up_proj or down_proj) in place."""
            packed, table = repack_mxfp4_int4(blocks, scales)
            name = proj.removesuffix("_proj")
            getattr(self, f"{name}_packed")[expert].copy_(packed)
            getattr(self, f"{name}_table")[expert].copy_(table)

        def _apply_gate(self, gate_up: Any) -> Any:
            gate, up = gate_up[..., ::2], gate_up[..., 1::2]
            gate = gate.clamp(min=None, max=self.limit)
            up = up.clamp(min=-self.limit, max=self.limit)
            glu = gate * torch.sigmoid(gate * self.alpha)
            return (up + 1) * glu

        def forward(self, hidden_states: Any, router_indices: Any = None,
                    routing_weights: Any = None) -> Any:
            dtype = self.gate_up_proj_bias.dtype
            next_states = torch.zeros_like(hidden_states)
            with torch.no_grad():
                # which tokens (and top-k slots) each expert serves; only experts hit run
                mask = torch.nn.functional.one_hot(router_indices, self.num_experts)
                mask = mask.permute(2, 1, 0)
                hit = torch.greater(mask.sum(dim=(-1, -2)), 0).nonzero().flatten().tolist()
            for e in hit:
                top_k_pos, token_idx = torch.where(mask[e])
                x = hidden_states[token_idx].to(dtype)
                gate_up = int4_mm(x, self.gate_up_packed[e], self.gate_up_table[e])
                gated = self._apply_gate(gate_up + self.gate_up_proj_bias[e])
                out = int4_mm(gated, self.down_packed[e], self.down_table[e])
                out = out + self.down_proj_bias[e]
                out = out * routing_weights[token_idx, top_k_pos, None]
                next_states.index_add_(0, token_idx, out.to(hidden_states.dtype))
            return next_states

    return PackedGptOssExperts


_EXPERTS = re.compile(r"^(?P<layer>.*\.mlp\.experts)\.(?P<proj>gate_up_proj|down_proj)"
                      r"(?P<part>_blocks|_scales|_bias|)$")


def load_gpt_oss_packed(path: Path, dtype: str, quantize: str = "none",
                        cache: Path | None = None) -> Any:
    """The gpt-oss model at ``path`` (an MXFP4 checkpoint) with its experts packed in int4
    (``PackedGptOssExperts``), its Linear layers (attention, output) packed as
    ``quantize`` says and every other weight in ``dtype``, read one tensor at a time: the
    experts' MXFP4 tensors are repacked one expert at a time, never held in ``dtype``, so
    the peak is the packed model plus one layer's MXFP4 tensors.

    With a ``cache`` directory the packed model is kept there (as ``packed_load`` keeps
    the Llama-style families') and read back by later loads: repacking is most of a load,
    minutes for gpt-oss-20b."""
    import torch

    from .packed_cache import cache_file, keep_packed, restore_packed
    from .packed_load import allocator_returns_memory

    torch_dtype = getattr(torch, dtype)
    model = _gpt_oss_model(path, torch_dtype)
    kept = None if cache is None else cache_file(cache, path, dtype, f"mxfp4-{quantize}")
    # every working copy (a Linear layer's dtype weight, a layer's MXFP4 tensors) is
    # returned to the system as it is freed, not left as holes between the packed tensors
    with allocator_returns_memory():
        if kept is not None and kept.exists():
            if restore_packed(model, kept, torch_dtype):
                return model.eval()
            model = _gpt_oss_model(path, torch_dtype)  # maybe partly filled: start again
        _fill(model, path, torch_dtype, quantize)
    if kept is not None:
        keep_packed(model, kept, path)
    return model.eval()


def _gpt_oss_model(path: Path, torch_dtype: Any) -> Any:
    """The weightless gpt-oss model (transformers' MXFP4 quantiser left out: it would
    install its GPU kernels or plan a dequantisation), empty packed experts in place of
    its own."""
    from .module_names import put
    from .packed_load import _empty_model

    model = _empty_model(path, torch_dtype)
    config = model.config
    if getattr(config, "model_type", "") != "gpt_oss":
        raise ModelLoadError(f"{path} is not a gpt-oss model (model_type "
                             f"{getattr(config, 'model_type', None)!r})")
    if config.hidden_size % GROUP or config.intermediate_size % GROUP:
        raise ModelLoadError(f"{path}: hidden and intermediate sizes must be multiples of "
                             f"{GROUP} for MXFP4 experts")
    experts_class = packed_experts_class()
    for layer in [name for name, m in model.named_modules()
                  if type(m).__name__ == "GptOssExperts"]:
        put(model, layer, experts_class(
            config.num_local_experts, config.hidden_size, config.intermediate_size,
            float(config.swiglu_alpha), float(config.swiglu_limit), torch_dtype))
    return model


def _fill(model: Any, path: Path, torch_dtype: Any, quantize: str) -> None:
    """Every weight of ``model`` (from ``_gpt_oss_model``) read from the checkpoint: first
    the Linear layers packed as ``quantize`` says as each is read and every other weight in
    ``torch_dtype`` (``packed_load``'s fill: their ``dtype`` copies come and go while
    little else is resident), then the experts repacked one at a time."""
    import torch

    from .packed_load import _checked
    from .packed_load import _fill as fill_packed
    from .safetensors_source import Safetensors

    source = Safetensors(path)
    own = {name: name for name, param in model.named_parameters() if param.device.type == "meta"}
    fill_packed(model, source, own, torch_dtype, quantize)

    def read(name: str, shape: tuple[int, ...]) -> Any:
        return source.read(_checked(source, name, shape))

    config = model.config
    e, h, i = config.num_local_experts, config.hidden_size, config.intermediate_size
    shapes = {"gate_up_proj": (2 * i, h), "down_proj": (h, i)}
    experts_class = packed_experts_class()
    for layer, experts in [(n, m) for n, m in model.named_modules()
                           if isinstance(m, experts_class)]:
        for proj, (rows, cols) in shapes.items():
            blocks = read(f"{layer}.{proj}_blocks", (e, rows, cols // GROUP, 16))
            scales = read(f"{layer}.{proj}_scales", (e, rows, cols // GROUP))
            if blocks.dtype != torch.uint8 or scales.dtype != torch.uint8:
                raise ModelLoadError(f"tensor {layer}.{proj}_blocks/_scales in {path} "
                                     "is not uint8 MXFP4; pull the model again")
            for expert in range(e):
                experts.set_expert(proj, expert, blocks[expert], scales[expert])
            del blocks, scales
            bias = getattr(experts, f"{proj}_bias")
            bias.data = read(f"{layer}.{proj}_bias", tuple(bias.shape)).to(torch_dtype)
    extra = sorted(n for n in source.names if n not in own and not _EXPERTS.match(n))
    if extra:
        raise ModelLoadError(f"the checkpoint in {path} has tensors this gpt-oss model does "
                             f"not know ({', '.join(extra[:3])}); it does not match its "
                             "config.json")
