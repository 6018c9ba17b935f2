"""Weight-only quantisation of a model's Linear layers: int8 (per channel) or int4 (grouped).

Uses PyTorch's own packed-weight CPU kernels (``_weight_int8pack_mm`` and
``_weight_int4pack_mm_for_cpu``, the kernels gpt-fast and torchao use on CPU): decode on a
CPU is bound by reading the weights, so fewer bytes per weight is more tokens per second.
"""

from __future__ import annotations

from typing import Any

from ..errors import InvalidRequestError

__all__ = ["INT4_GROUP", "QUANTIZE", "quantize_model"]

QUANTIZE = ("auto", "none", "int8", "int4")
INT4_GROUP = 32


def _int8_linear(linear: Any, dtype: Any) -> Any:
    import torch

    class Int8Linear(torch.nn.Module):  # type: ignore[misc]
        quant_kind = "int8"

        def __init__(self) -> None:
            super().__init__()
            w = linear.weight.detach().float()
            scales = w.abs().amax(dim=1).clamp(min=1e-8) / 127
            self.register_buffer("weight", (w / scales[:, None]).round().clamp(-128, 127)
                                 .to(torch.int8).contiguous())
            self.register_buffer("scales", scales.to(dtype))
            self.bias = linear.bias
            self.out_features = linear.out_features

        def forward(self, x: Any) -> Any:
            flat = x.reshape(-1, x.shape[-1]).to(self.scales.dtype).contiguous()
            out = torch._weight_int8pack_mm(flat, self.weight, self.scales)
            if self.bias is not None:
                out = out + self.bias
            return out.reshape(*x.shape[:-1], self.out_features).to(x.dtype)

    return Int8Linear()


def _int4_linear(linear: Any) -> Any:
    import torch

    n, k = linear.weight.shape
    groups = k // INT4_GROUP

    class Int4Linear(torch.nn.Module):  # type: ignore[misc]
        quant_kind = "int4"

        def __init__(self) -> None:
            super().__init__()
            w = linear.weight.detach().float().reshape(n, groups, INT4_GROUP)
            low, high = w.amin(-1, keepdim=True), w.amax(-1, keepdim=True)
            scale = (high - low).clamp(min=1e-8) / 15
            q = ((w - low) / scale).round().clamp(0, 15).to(torch.int32).reshape(n, k)
            zero = low + scale * 8  # the kernel computes (q - 8) * scale + zero
            scale_zero = torch.cat([scale, zero], dim=-1).transpose(0, 1).contiguous()
            self.register_buffer("weight", torch.ops.aten._convert_weight_to_int4pack_for_cpu(
                q, 1))
            self.register_buffer("scale_zero", scale_zero.to(torch.bfloat16))
            self.bias = linear.bias
            self.out_features = n

        def forward(self, x: Any) -> Any:
            flat = x.reshape(-1, x.shape[-1]).to(torch.bfloat16).contiguous()
            out = torch.ops.aten._weight_int4pack_mm_for_cpu(flat, self.weight, INT4_GROUP,
                                                             self.scale_zero)
            if self.bias is not None:
                out = out + self.bias
            return out.reshape(*x.shape[:-1], self.out_features).to(x.dtype)

    return Int4Linear()


def quantize_model(model: Any, mode: str, device: str) -> int:
    """Replace every Linear layer in place; returns how many were quantised."""
    if mode == "none":
        return 0
    if mode not in QUANTIZE or mode == "auto":  # auto is resolved by the loader
        raise InvalidRequestError(f"quantize {mode!r} is not supported; use one of "
                                  f"{', '.join(QUANTIZE)}")
    if device != "cpu":
        raise InvalidRequestError(f"quantize={mode} runs on the CPU; on {device} use "
                                  "quantize='none' (GPUs have the memory bandwidth for bf16)")
    import torch

    dtype = next(model.parameters()).dtype
    get_output = getattr(model, "get_output_embeddings", None)
    output = get_output() if get_output is not None else None
    targets = [(name, module) for name, module in model.named_modules()
               if isinstance(module, torch.nn.Linear)]
    for name, linear in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        k = linear.in_features
        # the output layer stays int8 under int4: its errors land straight on the logits
        output_layer = linear is output
        if (mode == "int4" and not output_layer and k % INT4_GROUP == 0
                and linear.out_features % 16 == 0):
            new = _int4_linear(linear)
        else:  # int8, and int4's fallback for shapes the packed kernel does not take
            new = _int8_linear(linear, dtype)
        setattr(parent, child, new)
    return len(targets)
