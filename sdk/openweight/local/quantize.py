"""Weight-only quantisation of a model's Linear layers: int8 (per channel) or int4 (grouped).

Packs weights as PyTorch's own packed-weight CPU kernels take them (``_weight_int8pack_mm``
and ``_weight_int4pack_mm_for_cpu``, the kernels gpt-fast and torchao use on CPU); the
products run through ``kernels`` (PyTorch's kernels, or ours where they are faster). Decode
on a CPU is bound by reading the weights, so fewer bytes per weight is more tokens a second.
"""

from __future__ import annotations

import functools
from typing import Any

from ..errors import InvalidRequestError
from ..settings import check_quantize
from .kernels import INT4_GROUP, int4_mm, int8_mm

__all__ = ["EMBEDDING_PARTS", "INT4_GROUP", "int4_embedding_from_codes",
           "int4_linear_from_codes", "pack_linear", "packs_as_int4", "quantize_model",
           "restore_embedding", "restore_linear"]

ROWS_AT_ONCE = 1024  # rows packed at a time: the float32 working copy stays small (a
# multiple of 64, the packed int4 layout's row block, so packed slices concatenate)


def _int8_pack(weight: Any, dtype: Any) -> tuple[Any, Any]:
    """Per-row int8 weights of ``weight`` taken in ``dtype``, ``ROWS_AT_ONCE`` rows at a
    time, and their scales in bfloat16: the kernel computes in its scales' dtype, and with
    float32 it is 10-15x slower on every CPU kind measured (AVX-512, AVX2: 400 vs 32 us for
    576x1536, 8.5 vs 0.9 ms for 2048x8192), so float32 models compute these products in
    bfloat16 too, as the int4 kernel always does."""
    import torch

    packs, scales = [], []
    for rows in weight.detach().split(ROWS_AT_ONCE):
        w = rows.to(dtype).float()
        scale = w.abs().amax(dim=1).clamp(min=1e-8) / 127
        packs.append((w / scale[:, None]).round().clamp(-128, 127).to(torch.int8))
        scales.append(scale.to(torch.bfloat16))
    return torch.cat(packs).contiguous(), torch.cat(scales)


def _int4_pack(weight: Any, dtype: Any) -> tuple[Any, Any]:
    """PyTorch's packed int4 CPU layout (groups of 32 with a scale and offset each) of
    ``weight`` taken in ``dtype``, and its [groups, rows, 2] bfloat16 scale/zero table,
    ``ROWS_AT_ONCE`` rows at a time."""
    import torch

    k = int(weight.shape[1])
    groups = k // INT4_GROUP
    packs, tables = [], []
    for rows in weight.detach().split(ROWS_AT_ONCE):
        w = rows.to(dtype).float().reshape(rows.shape[0], groups, INT4_GROUP)
        low, high = w.amin(-1, keepdim=True), w.amax(-1, keepdim=True)
        scale = (high - low).clamp(min=1e-8) / 15
        q = ((w - low) / scale).round().clamp(0, 15).reshape(rows.shape[0], k)
        packed, table = _int4_block(q, scale.squeeze(-1), low.squeeze(-1))
        packs.append(packed)
        tables.append(table)
    return torch.cat(packs), torch.cat(tables, dim=1).contiguous()


def _int4_block(codes: Any, scale: Any, low: Any) -> tuple[Any, Any]:
    """One row block in the kernel's layout: ``codes`` [rows, k] in 0..15 stand for
    ``codes * scale + low`` with ``scale`` and ``low`` [rows, k / 32] a group; the kernel
    computes ``(q - 8) * scale + zero`` with both in bfloat16."""
    import torch

    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32), 1)
    return packed, _bf16_table(codes, scale.float(), low.float())


def _bf16_table(codes: Any, scale: Any, low: Any) -> Any:
    """The [groups, rows, 2] bfloat16 (scale, zero) table for fixed ``codes``: of the
    bfloat16 scales within two steps of ``scale``, and for each the zeros within one step
    of its best, the pair with the least squared error over the group. (Rounding the two
    apart costs 5% more error over SmolLM2's Q4_1 layers, and tips its greedy answers
    away from those of its unquantised weights.)"""
    import torch

    bf16, i16 = torch.bfloat16, torch.int16
    q = codes.float().reshape(*scale.shape, -1) - 8
    count, q_sum, q_squares = q.shape[-1], q.sum(-1), (q * q).sum(-1)
    centre = low + 8 * scale  # the exact zero: weight = q * scale + centre

    def step(x: Any, ulps: int) -> Any:  # x rounded to bfloat16, moved ``ulps`` steps
        return (x.to(bf16).view(i16) + ulps).view(bf16).float()

    best = (torch.full_like(scale, float("inf")), scale, low)
    for s_ulps in (0, -1, 1, -2, 2):
        s = step(scale, s_ulps)
        ds = s - scale  # each weight is off by q * ds + dz: the sum of squares from sums
        for z_ulps in (0, -1, 1):
            z = step(centre - ds * q_sum / count, z_ulps)
            dz = z - centre
            err = ds * ds * q_squares + 2 * ds * dz * q_sum + count * dz * dz
            better = err < best[0]  # NaN (a step past the finite range) never is
            best = (torch.where(better, err, best[0]), torch.where(better, s, best[1]),
                    torch.where(better, z, best[2]))
    return torch.stack([best[1], best[2]], dim=-1).transpose(0, 1).to(bf16)


def int4_linear_from_codes(codes: Any, scale: Any, low: Any, bias: Any) -> Any:
    """The int4 module for weights already on a 4-bit grid (a GGUF's Q4_0/Q4_1/Q4_K
    blocks): ``codes`` [out, in] (0..15) times ``scale`` plus ``low`` ([out, in / 32] each)
    is the weight, repacked as it is: the codes are kept, the scale and offset are rounded
    to bfloat16 (the only dtype the kernel computes quickly)."""
    import torch

    _, int4_linear = _module_classes()
    packs, tables = [], []
    for at in range(0, int(codes.shape[0]), ROWS_AT_ONCE):
        rows = slice(at, at + ROWS_AT_ONCE)
        packed, table = _int4_block(codes[rows], scale[rows], low[rows])
        packs.append(packed)
        tables.append(table)
    return int4_linear(torch.cat(packs), torch.cat(tables, dim=1).contiguous(), bias)


EMBEDDING_PARTS = ("codes", "scale", "low")  # an Int4Embedding's saved tensors


def int4_embedding_from_codes(codes: Any, scale: Any, low: Any, dtype: Any) -> Any:
    """The embedding table of weights on a 4-bit grid (a GGUF's Q4_0/Q4_1/Q4_K token
    embeddings: ``codes`` [vocab, dim] 0..15 times ``scale`` plus ``low``, [vocab, dim / 32]
    each) kept on it: codes two to a byte, scale and offset in float32, so a row looked up
    is exactly the dequantised row in ``dtype``, at 0.75 bytes a weight (bf16: 2)."""
    import torch

    codes = codes.to(torch.uint8)
    packed = (codes[:, 0::2] | (codes[:, 1::2] << 4)).contiguous()
    return restore_embedding({"codes": packed, "scale": scale.float().contiguous(),
                              "low": low.float().contiguous()}, dtype)


def restore_embedding(tensors: dict[str, Any], dtype: Any) -> Any:
    """The embedding module again from its saved tensors (``EMBEDDING_PARTS``)."""
    return _embedding_class()(tensors["codes"], tensors["scale"], tensors["low"], dtype)


@functools.cache
def _embedding_class() -> Any:
    import torch

    class Int4Embedding(torch.nn.Module):  # type: ignore[misc]
        """An embedding table as 4-bit codes with a float32 scale and offset per 32
        values (``int4_embedding_from_codes``): only the rows looked up are expanded."""

        def __init__(self, codes: Any, scale: Any, low: Any, dtype: Any) -> None:
            super().__init__()
            self.register_buffer("codes", codes)
            self.register_buffer("scale", scale)
            self.register_buffer("low", low)
            self.out_dtype = dtype
            self.num_embeddings = int(codes.shape[0])
            self.embedding_dim = 2 * int(codes.shape[1])

        def forward(self, ids: Any) -> Any:
            packed = self.codes[ids]
            q = torch.stack([packed & 15, packed >> 4], -1).reshape(
                *ids.shape, -1, INT4_GROUP).float()
            rows = q * self.scale[ids].unsqueeze(-1) + self.low[ids].unsqueeze(-1)
            return rows.reshape(*ids.shape, self.embedding_dim).to(self.out_dtype)

    return Int4Embedding


@functools.cache
def _module_classes() -> tuple[Any, Any]:
    """The packed Linear modules (defined once, on first use: torch is imported lazily).
    They hold only their packed tensors: nothing keeps the float weights alive."""
    import torch

    class Int8Linear(torch.nn.Module):  # type: ignore[misc]
        quant_kind = "int8"

        def __init__(self, weight: Any, scales: Any, bias: Any) -> None:
            super().__init__()
            self.register_buffer("weight", weight)
            self.register_buffer("scales", scales)
            self.bias = bias
            self.out_features = int(weight.shape[0])

        def forward(self, x: Any) -> Any:
            out = int8_mm(x.reshape(-1, x.shape[-1]), self.weight, self.scales)
            if self.bias is not None:
                out = out + self.bias
            return out.reshape(*x.shape[:-1], self.out_features).to(x.dtype)

    class Int4Linear(torch.nn.Module):  # type: ignore[misc]
        quant_kind = "int4"

        def __init__(self, weight: Any, scale_zero: Any, bias: Any) -> None:
            super().__init__()
            self.register_buffer("weight", weight)
            self.register_buffer("scale_zero", scale_zero)
            self.bias = bias
            self.out_features = int(scale_zero.shape[1])

        def forward(self, x: Any) -> Any:
            # the fast path leaves a fused layer's modules a strided view of its table
            out = int4_mm(x.reshape(-1, x.shape[-1]), self.weight,
                          self.scale_zero.contiguous())
            if self.bias is not None:
                out = out + self.bias
            return out.reshape(*x.shape[:-1], self.out_features).to(x.dtype)

    return Int8Linear, Int4Linear


def restore_linear(tensors: dict[str, Any]) -> Any:
    """A packed module again from its saved tensors (``state_dict`` of one built by
    ``pack_linear``: ``weight`` with ``scales`` (int8) or ``scale_zero`` (int4), maybe
    ``bias``)."""
    import torch

    int8_linear, int4_linear = _module_classes()
    bias = tensors.get("bias")
    bias = None if bias is None else torch.nn.Parameter(bias, requires_grad=False)
    if "scale_zero" in tensors:
        return int4_linear(tensors["weight"], tensors["scale_zero"], bias)
    return int8_linear(tensors["weight"], tensors["scales"], bias)


def packs_as_int4(mode: str, shape: tuple[int, int], output_layer: bool) -> bool:
    """Whether a Linear of ``shape`` (out, in) becomes int4 under ``mode``: the output
    layer stays int8 (its errors land straight on the logits), as do shapes the packed
    kernel does not take."""
    out_features, in_features = shape
    return (mode == "int4" and not output_layer and in_features % INT4_GROUP == 0
            and out_features % 16 == 0)


def pack_linear(weight: Any, bias: Any, mode: str, dtype: Any, output_layer: bool) -> Any:
    """The packed module computing ``x @ weight.T + bias`` under ``mode`` (int8 or int4),
    from ``weight`` as rounded to ``dtype`` (whatever dtype it comes in); the product runs
    with bfloat16 activations and returns ``x``'s dtype."""
    int8_linear, int4_linear = _module_classes()
    if packs_as_int4(mode, tuple(weight.shape), output_layer):
        return int4_linear(*_int4_pack(weight, dtype), bias)
    return int8_linear(*_int8_pack(weight, dtype), bias)


def quantize_model(model: Any, mode: str, device: str) -> int:
    """Replace every Linear layer in place; returns how many were quantised."""
    if mode == "none":
        return 0
    if check_quantize(mode) == "auto":  # the loader resolves auto before this
        raise InvalidRequestError("quantize_model takes a resolved mode, not 'auto'")
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
        setattr(parent, child, pack_linear(linear.weight, linear.bias, mode, dtype,
                                           output_layer=linear is output))
    return len(targets)
