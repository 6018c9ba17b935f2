"""A Llama-style model's whole single-token decode step in one call of our C kernels."""

from __future__ import annotations

import ctypes
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from .kernels import INT4_GROUP, _load

__all__ = ["DecodeStep", "LayerParts", "Product", "decode_step"]


@dataclass(frozen=True)
class Product:
    """One (fused) matrix product of a layer: ``kind`` int4, int8 (packed as ``quantize``
    packs them), or anything else (not ours to run); ``table`` is int4's scale/zero or
    int8's scales."""

    kind: str
    weight: Any = None
    table: Any = None
    bias: Any = None


@dataclass(frozen=True)
class LayerParts:
    """What one decoder layer's single-token step is made of (``fast_layers.FusedLayer``)."""

    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    scaling: float
    norms: tuple[Any, Any]  # input and post-attention RMSNorm weights, float32 [hidden]
    eps: tuple[float, float]
    qk_norms: tuple[Any, Any] | None  # per-head q and k RMSNorm weights (Qwen3), and eps
    qk_eps: float
    qkv: Product
    o: Product
    gate_up: Product
    down: Product


class _Linear(ctypes.Structure):
    _fields_ = [("kind", ctypes.c_int32), ("rows", ctypes.c_int32), ("cols", ctypes.c_int32),
                ("weight", ctypes.c_void_p), ("table", ctypes.c_void_p),
                ("bias", ctypes.c_void_p)]


class _Layer(ctypes.Structure):
    _fields_ = [*((name, ctypes.c_int32) for name in
                  ("hidden", "heads", "kv_heads", "head_dim", "block_n")),
                *((name, ctypes.c_float) for name in ("eps1", "eps2", "qk_eps", "scaling")),
                *((name, ctypes.c_void_p) for name in ("norm1", "norm2", "q_norm", "k_norm")),
                *((name, _Linear) for name in ("qkv", "o", "gate_up", "down"))]


class DecodeStep:
    """Every layer of a decode step in one call of ours (``ow_decode_layers``), for one
    token or a few (one row each: the next token of the single stream, or of each request in
    the server's batch): the same computation as the fast path's layers, without the ~30
    PyTorch operations a layer that otherwise make up much of a small model's token. A row's
    results are the same whatever rows run beside it. Holds the tensors it points at."""

    def __init__(self, layers: Sequence[LayerParts], block: int) -> None:
        self._held = [layers]
        self._layers = (_Layer * len(layers))(*(_layer(p, block) for p in layers))
        self._hidden, self._head_dim = layers[0].hidden, layers[0].head_dim

    @property
    def active(self) -> bool:
        """Whether ours are still the kernels in use (``OPENWEIGHT_KERNELS`` can change them
        within a process); the step runs only then."""
        return _load().lib is not None

    def __call__(self, x: Any, keys: Sequence[Any], values: Sequence[Any], spans: Any,
                 cos: Any, sin: Any, *, head_stride: int, token_stride: int,
                 reads: Any = None) -> bool:
        """Run every layer over the rows' hidden states ``x`` (float32 [rows, hidden],
        contiguous, updated in place). Each layer's cache (``keys[i]``, ``values[i]``,
        float32) holds slot s of kv head h at ``h * head_stride + s * token_stride``;
        ``spans`` (int64 [rows, 3], contiguous) gives each row's slot to write its key and
        value to, and the first slot and count of those it attends to (its own among them,
        the last), or, with ``reads`` (int64, contiguous: slots), where in ``reads`` its
        slots are listed; ``cos`` and ``sin`` (float32 [rows, head_dim]) are the rows'
        rotary rows. False when ours are no longer the kernels in use
        (``OPENWEIGHT_KERNELS`` changed): nothing was done."""
        import torch

        lib = _load().lib
        if lib is None:
            return False
        count = len(self._layers)
        self._check(x, keys, values, spans, cos, sin, reads)
        key_ptrs = (ctypes.c_void_p * count)(*(k.data_ptr() for k in keys))
        value_ptrs = (ctypes.c_void_p * count)(*(v.data_ptr() for v in values))
        if lib.ow_decode_layers(self._layers, count, x.data_ptr(), x.shape[0], key_ptrs,
                                value_ptrs, head_stride, token_stride, spans.data_ptr(),
                                None if reads is None else reads.data_ptr(), cos.data_ptr(),
                                sin.data_ptr(), torch.get_num_threads()):
            raise MemoryError("no memory for the decode step's scratch")
        return True

    def _check(self, x: Any, keys: Sequence[Any], values: Sequence[Any], spans: Any,
               cos: Any, sin: Any, reads: Any) -> None:
        """The arguments as the C code reads them (it trusts its pointers: a bfloat16 row
        read as float32 would write past its end)."""
        import torch

        rows = int(x.shape[0])
        wants = [(x, torch.float32, (rows, self._hidden), "x"),
                 (spans, torch.int64, (rows, 3), "spans"),
                 (cos, torch.float32, (rows, self._head_dim), "cos"),
                 (sin, torch.float32, (rows, self._head_dim), "sin")]
        if reads is not None:
            wants.append((reads, torch.int64, tuple(reads.shape[:1]), "reads"))
        for tensor, dtype, shape, name in wants:
            if tensor.dtype != dtype or tuple(tensor.shape) != shape \
                    or not tensor.is_contiguous():
                raise ValueError(f"the decode step's {name} must be {dtype} {list(shape)}, "
                                 f"contiguous: got {tensor.dtype} {list(tensor.shape)}")
        if len(keys) != len(self._layers) or len(values) != len(self._layers) or any(
                t.dtype != torch.float32 for t in (*keys, *values)):
            raise ValueError("the decode step needs float32 keys and values for every layer")


def decode_step(layers: Sequence[LayerParts]) -> DecodeStep | None:
    """The single-token step of these layers in one call of ours, or None where ours are
    not the kernels in use or a layer has a part they do not take (a product that is not
    int4 or int8, a tensor that is not float32 or not contiguous)."""
    state = _load()
    lib, block = state.lib, state.block
    if lib is None or not all(_takes(p, block) for p in layers):
        return None
    return DecodeStep(layers, block)


def _takes(parts: LayerParts, block: int) -> bool:
    import torch

    def plain(t: Any, dtype: Any = torch.float32) -> bool:
        return t is None or (t.dtype == dtype and t.is_contiguous())

    def product(p: Product) -> bool:
        if p.kind == "int4":
            rows = int(p.table.shape[1])
            shaped = block > 0 and rows % block == 0 and p.table.dim() == 3
        elif p.kind == "int8":
            shaped = p.weight.dtype == torch.int8 and p.weight.dim() == 2
        else:
            return False
        return shaped and plain(p.table, torch.bfloat16) and plain(p.weight, p.weight.dtype) \
            and plain(p.bias)

    tensors = [*parts.norms, *(parts.qk_norms or ())]
    return (all(map(product, (parts.qkv, parts.o, parts.gate_up, parts.down)))
            and all(plain(t) for t in tensors) and parts.heads % parts.kv_heads == 0)


def _linear(p: Product) -> _Linear:
    if p.kind == "int4":
        rows, cols = int(p.table.shape[1]), int(p.table.shape[0]) * INT4_GROUP
    else:
        rows, cols = int(p.weight.shape[0]), int(p.weight.shape[1])
    return _Linear(4 if p.kind == "int4" else 8, rows, cols, p.weight.data_ptr(),
                   p.table.data_ptr(), None if p.bias is None else p.bias.data_ptr())


def _layer(p: LayerParts, block: int) -> _Layer:
    q_norm, k_norm = p.qk_norms or (None, None)
    return _Layer(p.hidden, p.heads, p.kv_heads, p.head_dim, block, p.eps[0], p.eps[1],
                  p.qk_eps, p.scaling, p.norms[0].data_ptr(), p.norms[1].data_ptr(),
                  None if q_norm is None else q_norm.data_ptr(),
                  None if k_norm is None else k_norm.data_ptr(),
                  _linear(p.qkv), _linear(p.o), _linear(p.gate_up), _linear(p.down))
