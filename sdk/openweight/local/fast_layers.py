"""The fast path's layers: a decoder layer's products fused, its RMSNorms one layer_norm."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

from .kernels import INT4_BLOCK_ROWS, int4_mm, int8_mm
from .step_kernel import LayerParts, Product

__all__ = ["Attend", "FusedLayer", "FusedNorm"]

# attend(layer index, queries, keys, values) -> attention output: see FusedLayer.run
Attend = Callable[[int, Any, Any, Any], Any]

# the packed int4 CPU layout interleaves output rows in blocks (of 64 for AVX-512): a fused
# layer's parts must each fill whole blocks
INT4_BLOCK = max(INT4_BLOCK_ROWS.values())


def _kind(module: Any) -> str:
    import torch

    kind = getattr(module, "quant_kind", None)
    if kind is not None:
        return str(kind)
    return "linear" if isinstance(module, torch.nn.Linear) else "other"


def _fuse(modules: Sequence[Any]) -> tuple[Callable[[Any], Any], Product]:
    """One matrix product computing ``cat([m(x) for m in modules], -1)``, and what it is
    made of.

    The fused weight is built by concatenation and the modules' weights are pointed at
    slices of it, so memory is not doubled. Mixed or unalignable layers fall back to
    calling the modules one by one.
    """
    import torch
    import torch.nn.functional as F

    kinds = {_kind(m) for m in modules}
    kind = kinds.pop() if len(kinds) == 1 else "mixed"
    rows = [int(m.out_features) for m in modules]
    if kind == "int4" and any(r % INT4_BLOCK for r in rows):
        kind = "mixed"
    if kind in ("mixed", "other"):
        if len(modules) == 1:
            return modules[0], Product(kind)
        return (lambda x: torch.cat([m(x) for m in modules], -1)), Product(kind)

    bias = None
    if any(m.bias is not None for m in modules):
        like = next(m.bias for m in modules if m.bias is not None)
        bias = torch.cat([m.bias.detach() if m.bias is not None else like.new_zeros(r)
                          for m, r in zip(modules, rows, strict=True)])
    def shared(name: str, dim: int = 0) -> Any:
        """The modules' ``name`` tensors joined along ``dim``, each module's now a view of
        its slice (nothing is held twice)."""
        parts = [getattr(m, name).detach() for m in modules]
        fused = torch.cat(parts, dim) if len(parts) > 1 else parts[0]
        start = 0
        for m, r in zip(modules, rows, strict=True):
            view = fused.narrow(dim, start, r)
            setattr(m, name, torch.nn.Parameter(view, requires_grad=False)
                    if isinstance(getattr(m, name), torch.nn.Parameter) else view)
            start += r
        return fused

    weight = shared("weight")
    if kind == "linear":
        return (lambda x: F.linear(x, weight, bias)), Product(kind, weight, None, bias)
    if kind == "int8":
        scales = shared("scales")
        return (lambda x: _biased(int8_mm(x, weight, scales), bias)), Product(
            kind, weight, scales, bias)
    scale_zero = shared("scale_zero", dim=1)  # [groups, rows, 2]: a module's is strided
    return (lambda x: _biased(int4_mm(x, weight, scale_zero), bias)), Product(
        kind, weight, scale_zero, bias)


def _biased(out: Any, bias: Any) -> Any:
    return out if bias is None else out + bias


class FusedNorm:
    """RMSNorm as one fused layer_norm: the layer norm of [x, -x] (mean 0, variance mean(x²))
    is x / rms(x) in its first half. Exact, and half the time of PyTorch's rms_norm on a
    CPU, which runs as eight separate operations."""

    def __init__(self, norm: Any) -> None:
        import torch

        weight = norm.weight.detach()
        self.size = int(weight.shape[0])
        self.weight = torch.cat([weight, weight])
        self.plain = self.weight[: self.size]  # the norm's own weight
        self.eps = _eps(norm)

    def __call__(self, x: Any) -> Any:
        import torch
        import torch.nn.functional as F

        both = torch.cat([x, -x], -1)
        return F.layer_norm(both, (2 * self.size,), self.weight, None, self.eps)[
            ..., : self.size]


class FusedLayer:
    def __init__(self, layer: Any, heads: int, kv_heads: int, head_dim: int) -> None:
        attn, mlp = layer.self_attn, layer.mlp
        self.norm1 = FusedNorm(layer.input_layernorm)
        self.norm2 = FusedNorm(layer.post_attention_layernorm)
        self.qkv, qkv = _fuse([attn.q_proj, attn.k_proj, attn.v_proj])
        self.o, o = _fuse([attn.o_proj])
        self.gate_up, gate_up = _fuse([mlp.gate_proj, mlp.up_proj])
        self.down, down = _fuse([mlp.down_proj])
        self.scaling = float(attn.scaling)
        q_norm, k_norm = getattr(attn, "q_norm", None), getattr(attn, "k_norm", None)
        self.qk_norm = None if q_norm is None or k_norm is None else (
            FusedNorm(q_norm), FusedNorm(k_norm))
        self.split = (heads * head_dim, kv_heads * head_dim, kv_heads * head_dim)
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, head_dim
        qk = self.qk_norm
        # what step_kernel.decode_step runs a token through (it takes what it can run), its
        # vectors in float32 (copies, a few KB a layer, where the model is bfloat16)
        self.parts = LayerParts(
            self.norm1.size, heads, kv_heads, head_dim, self.scaling,
            (self.norm1.plain.float(), self.norm2.plain.float()),
            (self.norm1.eps, self.norm2.eps),
            None if qk is None else (qk[0].plain.float(), qk[1].plain.float()),
            0.0 if qk is None else qk[0].eps, *map(_float_bias, (qkv, o, gate_up, down)),
        ) if qk is None or qk[0].eps == qk[1].eps else None

    def heads_of(self, qkv: Any, cos: Any, sin: Any) -> tuple[Any, Any, Any]:
        """Queries and keys (normed where the model norms them, rotated) and values, each
        [heads, tokens, head_dim], from the fused q/k/v product of ``tokens`` rows."""
        count, heads, kv, dim = qkv.shape[0], self.heads, self.kv_heads, self.head_dim
        half = dim // 2
        if self.qk_norm is None:
            qk = qkv[:, : (heads + kv) * dim].view(count, heads + kv, dim).transpose(0, 1)
            qk = qk * cos + qk.roll(half, -1) * sin  # roll: [x2, x1]; sin carries the sign
            q, k = qk[:heads], qk[heads:]
        else:
            q_norm, k_norm = self.qk_norm
            q_raw, k_raw, _ = qkv.split(self.split, -1)
            q = q_norm(q_raw.view(count, heads, dim)).transpose(0, 1)
            k = k_norm(k_raw.view(count, kv, dim)).transpose(0, 1)
            q = q * cos + q.roll(half, -1) * sin
            k = k * cos + k.roll(half, -1) * sin
        v = qkv[:, (heads + kv) * dim:].view(count, kv, dim).transpose(0, 1)
        return q, k, v

    def run(self, x: Any, cos: Any, sin: Any, attend: Attend, index: int) -> Any:
        """This layer over the rows ``x`` ([tokens, hidden], each at the position ``cos``
        and ``sin`` were taken at). ``attend(index, q, k, v)`` stores the rows' keys and
        values and returns their attention, [1, heads, tokens, head_dim] in float32."""
        import torch.nn.functional as F

        count = x.shape[0]
        q, k, v = self.heads_of(self.qkv(self.norm1(x)), cos, sin)
        o = attend(index, q, k, v)
        # [1, heads, count, dim] -> [count, heads * dim] (a view when count is 1)
        width = self.heads * self.head_dim
        o = o.view(1, width) if count == 1 else o[0].transpose(0, 1).reshape(count, width)
        x = x + self.o(o.to(x.dtype))
        gate, up = self.gate_up(self.norm2(x)).chunk(2, -1)
        return x + self.down(F.silu(gate) * up)


def _float_bias(product: Product) -> Product:
    return product if product.bias is None else replace(product, bias=product.bias.float())


def _eps(norm: Any) -> float:
    return float(getattr(norm, "variance_epsilon", getattr(norm, "eps", 1e-6)))
