"""gpt-oss on a CPU: its experts as int4 (``PackedGptOssExperts``, repacked from MXFP4 by
``mxfp4.repack_mxfp4_int4``), and loading a checkpoint straight into that form. Imports
torch: the loader imports it only for a gpt-oss model on a CPU."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from ..errors import ModelLoadError
from .kernels import int4_mm
from .mxfp4 import GROUP, repack_mxfp4_int4

__all__ = ["PackedGptOssExperts", "load_gpt_oss_packed"]


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
    for layer in [name for name, m in model.named_modules()
                  if type(m).__name__ == "GptOssExperts"]:
        put(model, layer, PackedGptOssExperts(
            config.num_local_experts, config.hidden_size, config.intermediate_size,
            float(config.swiglu_alpha), float(config.swiglu_limit), torch_dtype))
    return model


def _fill(model: Any, path: Path, torch_dtype: Any, quantize: str) -> None:
    """Every weight of ``model`` (from ``_gpt_oss_model``) read from the checkpoint: first
    the Linear layers packed as ``quantize`` says as each is read and every other weight in
    ``torch_dtype`` (``packed_load``'s fill: their ``dtype`` copies come and go while
    little else is resident), then the experts repacked one at a time."""
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
    for layer, experts in [(n, m) for n, m in model.named_modules()
                           if isinstance(m, PackedGptOssExperts)]:
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
