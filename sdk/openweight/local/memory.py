"""Will it fit? An estimate of a model's memory before loading it, from its config alone."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import ModelLoadError
from .fast import FAST_KV_BYTES, SUPPORTED_TYPES
from .mxfp4 import cpu_packed_mxfp4

__all__ = ["PLANNING_CONTEXT", "MemoryEstimate", "check_fits", "cpu_packed_mxfp4",
           "estimate_memory", "free_memory"]

PLANNING_CONTEXT = 8192  # tokens of KV cache planned for (or the model's window, if smaller)
OVERHEAD = 1.10  # activations, allocator slack
MXFP4_BYTES_PER_PARAM = 4.25 / 8
_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
_GB = 1e9


@dataclass(frozen=True)
class MemoryEstimate:
    parameters: int
    weights_bytes: int
    kv_cache_bytes: int
    context: int
    device: str
    dtype: str
    free_bytes: int | None
    quantize: str = "none"

    @property
    def total_bytes(self) -> int:
        return int((self.weights_bytes + self.kv_cache_bytes) * OVERHEAD)

    @property
    def fits(self) -> bool:
        return self.free_bytes is None or self.total_bytes <= self.free_bytes

    def as_dict(self) -> dict[str, Any]:
        return {
            "parameters": self.parameters,
            "weights_gb": round(self.weights_bytes / _GB, 3),
            "kv_cache_gb": round(self.kv_cache_bytes / _GB, 3),
            "kv_cache_context": self.context,
            "total_gb": round(self.total_bytes / _GB, 3),
            "free_gb": None if self.free_bytes is None else round(self.free_bytes / _GB, 3),
            "device": self.device,
            "dtype": self.dtype,
            "quantize": self.quantize,
            "fits": self.fits,
        }


def free_memory(device: str) -> int | None:
    """Bytes free on ``device`` now (None if unknown)."""
    if device.startswith("cuda"):
        import torch

        free, _total = torch.cuda.mem_get_info(torch.device(device))
        return int(free)
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return None


def _count_parameters(config: Any) -> tuple[int, int, int]:
    """(all parameters, those in MoE experts, the weights of Linear layers), counted on a
    weightless meta-device model."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=False)
    total = experts = 0
    for name, p in model.named_parameters():
        total += p.numel()
        if ".experts." in name:
            experts += p.numel()
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    return total, experts, linear


def _packed_bytes(config: Any, bytes_per: int, quantize: str) -> int:
    """Bytes of a model loaded by ``packed_load``: each Linear layer packed as ``quantize``
    packs it (scales included; in the dtype for none), every other parameter in the dtype, plus the
    largest single tensor, read in the dtype while it is packed."""
    import torch
    from transformers import AutoModelForCausalLM

    from .quantize import INT4_GROUP, packs_as_int4

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=False)
    output = model.get_output_embeddings()
    total = largest = 0
    for module in model.modules():
        if not isinstance(module, torch.nn.Linear):  # its own weights stay in dtype
            own = sum(p.numel() for p in module.parameters(recurse=False)) * bytes_per
            total, largest = total + own, max(largest, own)
            continue
        rows, cols = module.weight.shape  # a tied output layer: packed apart from the embedding
        largest = max(largest, rows * cols * bytes_per)
        if quantize == "none":  # a GGUF read into dtype a tensor at a time
            total += rows * cols * bytes_per
        elif packs_as_int4(quantize, (rows, cols), module is output):
            total += rows * cols // 2 + rows * (cols // INT4_GROUP) * 2 * 2  # bf16 scale+zero
        else:
            total += rows * cols + rows * 2  # int8, one bf16 scale a row
        if module.bias is not None:
            total += module.bias.numel() * bytes_per
    return total + largest


def _kv_bytes(config: Any, context: int, bytes_per: int) -> int:
    layers = int(getattr(config, "num_hidden_layers", 0) or 0)
    heads = int(getattr(config, "num_attention_heads", 1) or 1)
    kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // heads)
    window = getattr(config, "sliding_window", None)
    types = getattr(config, "layer_types", None) or ["full_attention"] * layers
    total = 0
    for kind in types[:layers]:
        tokens = min(context, window) if kind == "sliding_attention" and window else context
        total += 2 * kv_heads * head_dim * tokens * bytes_per
    return total


def _cpu_mxfp4_bytes(config: Any, params: int, linear: int, bytes_per: int,
                     quantize: str) -> int:
    """Bytes of gpt-oss with its experts' weights in packed int4 (``PACKED_BITS_PER_WEIGHT``),
    its Linear layers (attention, output) int8 where ``quantize`` says so, their biases
    and every other parameter in the dtype, plus what loading holds at once: one layer's
    MXFP4 gate_up tensors as read."""
    from .mxfp4 import PACKED_BITS_PER_WEIGHT

    layers, experts = int(config.num_hidden_layers), int(config.num_local_experts)
    hidden, inter = int(config.hidden_size), int(config.intermediate_size)
    weights = layers * experts * 3 * hidden * inter  # gate_up [2I, H] and down [H, I]
    reading = int(experts * 2 * inter * hidden * MXFP4_BYTES_PER_PARAM)
    linear_bytes = linear * (1 if quantize in ("int8", "int4") else bytes_per)
    return int(weights * PACKED_BITS_PER_WEIGHT / 8 + linear_bytes
               + (params - weights - linear) * bytes_per + reading)


def estimate_memory(path: Path, device: str, dtype: str, *, keep_mxfp4: bool = False,
                    context: int | None = None, quantize: str = "none") -> MemoryEstimate:
    """Parameters x bytes per parameter, plus the KV cache for ``context`` tokens."""
    from transformers import AutoConfig

    from .packed_load import loads_packed

    config = AutoConfig.from_pretrained(str(path), trust_remote_code=False)
    params, expert_params, linear = _count_parameters(config)
    bytes_per = _BYTES[dtype]
    if keep_mxfp4:
        weights = int(expert_params * MXFP4_BYTES_PER_PARAM + (params - expert_params) * bytes_per)
    elif cpu_packed_mxfp4(config, device):  # experts repacked to int4 as they are read
        weights = _cpu_mxfp4_bytes(config, params, linear, bytes_per, quantize)
    elif loads_packed(config.to_dict(), device, quantize):  # packed as it is read
        weights = _packed_bytes(config, bytes_per, quantize)
    else:  # the whole model in dtype (then packed, where quantize asks for it)
        weights = params * bytes_per
    window = int(getattr(config, "max_position_embeddings", PLANNING_CONTEXT) or PLANNING_CONTEXT)
    ctx = min(context or PLANNING_CONTEXT, window)
    kv_bytes = FAST_KV_BYTES if device == "cpu" and config.model_type in SUPPORTED_TYPES \
        else bytes_per  # the CPU fast path keeps its KV cache in float32
    return MemoryEstimate(params, weights, _kv_bytes(config, ctx, kv_bytes), ctx, device,
                          dtype, free_memory(device), quantize)


def check_fits(estimate: MemoryEstimate, name: str) -> None:
    """Refuse, with both numbers and what would help, a model that cannot fit."""
    if estimate.fits:
        return
    assert estimate.free_bytes is not None
    raise ModelLoadError(
        f"{name} needs about {estimate.total_bytes / _GB:.1f} GB on {estimate.device} "
        f"({estimate.parameters / 1e9:.2f}B parameters in {estimate.dtype}: "
        f"{estimate.weights_bytes / _GB:.1f} GB, plus {estimate.kv_cache_bytes / _GB:.1f} GB of "
        f"KV cache for {estimate.context} tokens) but only "
        f"{estimate.free_bytes / _GB:.1f} GB is free. Try another device (device='cuda'), "
        "a smaller dtype (dtype='bfloat16'), a quantized or smaller model, or a remote "
        "server (base_url=...)"
    )
