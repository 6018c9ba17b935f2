"""A lean decode loop for Llama-style models on the CPU (Llama, Qwen2, Qwen3, Mistral).

transformers' ``generate`` spends most of a small model's token in Python and in many small
operations. This path runs the same weights (the model's own modules, quantised or not)
with far fewer operations per token:

- q/k/v and gate/up projections are fused into one matrix product each (the fused weights
  share memory with the model's modules, so nothing is stored twice);
- rotary embeddings are applied to queries and keys in one step;
- attention runs in float32 on a float32 KV cache: PyTorch's bfloat16 attention on a CPU is
  several times slower than float32 at decode sizes;
- prefill computes logits for the last position only.

The model object is untouched: ``generate``, continuous batching and every other user of
the model still work on it. ``OPENWEIGHT_FAST=0`` turns this path off.

The layers are built in ``fast_layers``; a request's tokens come from ``fast_stream``, each
picked by ``sampler``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from .fast_layers import Attend, FusedLayer, FusedNorm
from .step_kernel import decode_step

__all__ = ["FAST_KV_BYTES", "FastCache", "FastModel", "offset_mask", "unsupported_reason"]

SUPPORTED_TYPES = frozenset({"llama", "qwen2", "qwen3", "mistral"})
CAPACITY_STEP = 256  # KV cache capacity grows in steps of this many positions
FAST_KV_BYTES = 4  # the KV cache is float32, whatever the model's dtype (see above)
# prompt tokens run through the layers at once: a long prompt's activations (and its
# attention scores, which grow with the square of its length) stay bounded, at no cost in
# speed (1B shape, int4, AVX-512, 2 threads, a 1,000-token prefill: 75-78 tok/s in chunks
# of 256, 72-75 whole)
PREFILL_CHUNK = 256


def unsupported_reason(model: Any, device: str) -> str | None:
    """Why this model cannot take the fast path (None: it can)."""
    if os.environ.get("OPENWEIGHT_FAST", "1").strip().lower() in ("0", "false", "no", "off"):
        return "turned off by OPENWEIGHT_FAST=0"
    if device != "cpu":
        return f"the fast path is for the CPU, not {device}"
    config = model.config
    kind = getattr(config, "model_type", "")
    if kind not in SUPPORTED_TYPES:
        return f"model type {kind!r} is not one of {', '.join(sorted(SUPPORTED_TYPES))}"
    if getattr(config, "hidden_act", "silu") != "silu":
        return f"activation {config.hidden_act!r} is not silu"
    if getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True):
        return "sliding-window attention"
    inner = getattr(model, "model", None)
    if inner is None or not hasattr(inner, "layers") or not hasattr(inner, "rotary_emb"):
        return "unexpected module layout"
    for layer in inner.layers:
        attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
        if attn is None or mlp is None or not all(
            hasattr(attn, n) for n in ("q_proj", "k_proj", "v_proj", "o_proj", "scaling")
        ) or not all(hasattr(mlp, n) for n in ("gate_proj", "up_proj", "down_proj")):
            return "unexpected module layout"
    return None


class FastCache:
    """One request's KV cache: float32 keys and values, one [1, kv_heads, capacity, head_dim]
    tensor per layer.

    ``get_seq_length`` and ``crop`` match transformers' cache API, so the prefix cache can
    hold these too.
    """

    def __init__(self, layers: int, kv_heads: int, head_dim: int, capacity: int) -> None:
        self._shape = (1, kv_heads, _round(capacity), head_dim)
        self.k = self._alloc(layers)
        self.v = self._alloc(layers)
        self.length = 0

    def _alloc(self, layers: int) -> list[Any]:
        import torch

        return [torch.zeros(self._shape) for _ in range(layers)]

    @property
    def capacity(self) -> int:
        return self._shape[2]

    @property
    def nbytes(self) -> int:
        return sum(int(t.numel() * t.element_size()) for t in (*self.k, *self.v))

    def get_seq_length(self) -> int:
        return self.length

    def crop(self, n: int) -> None:
        """Keep the first ``n`` positions (``n < 0``: drop the last ``-n``)."""
        self.length = max(0, self.length + n) if n < 0 else min(n, self.length)

    def reserve(self, total: int) -> None:
        """Make room for ``total`` positions, keeping what is held."""
        if total <= self.capacity:
            return
        old_k, old_v, held = self.k, self.v, self.length
        self._shape = (*self._shape[:2], _round(total), self._shape[3])
        self.k, self.v = self._alloc(len(old_k)), self._alloc(len(old_v))
        for new, old in zip((*self.k, *self.v), (*old_k, *old_v), strict=True):
            new[:, :, :held] = old[:, :, :held]


def _round(n: int) -> int:
    return max(CAPACITY_STEP, -(-n // CAPACITY_STEP) * CAPACITY_STEP)


def offset_mask(past: int, count: int) -> Any:
    """Causal mask for ``count`` new tokens after ``past`` cached ones (None where plain
    causal attention does it: one token, or nothing cached)."""
    import torch

    if count == 1 or past == 0:
        return None
    end = past + count
    return torch.arange(end).unsqueeze(0) <= torch.arange(past, end).unsqueeze(1)


class FastModel:
    """The fast decode path over one loaded transformers model."""

    def __init__(self, model: Any) -> None:
        import torch

        config = model.config
        inner = model.model
        self.model = model
        self.heads = int(config.num_attention_heads)
        self.kv_heads = int(getattr(config, "num_key_value_heads", None) or self.heads)
        self.head_dim = int(getattr(config, "head_dim", None)
                            or config.hidden_size // config.num_attention_heads)
        self.hidden = int(config.hidden_size)
        self.layers = [FusedLayer(layer, self.heads, self.kv_heads, self.head_dim)
                       for layer in inner.layers]
        self.embed = inner.embed_tokens
        self.norm = FusedNorm(inner.norm)
        self.lm_head = model.get_output_embeddings()
        self.dtype = inner.norm.weight.dtype
        self._rotary = inner.rotary_emb
        self._cos = torch.empty(0, self.head_dim, dtype=self.dtype)
        self._sin = torch.empty(0, self.head_dim, dtype=self.dtype)
        parts = [layer.parts for layer in self.layers]
        # a decode step's layers in one call of ours, where they take every part (see
        # step_kernel): the single stream's tokens here, the server's batch (batching.py)
        self.step = None if None in parts else decode_step(parts)  # type: ignore[arg-type]

    @property
    def one_call(self) -> bool:
        """Whether a decode step's layers run in one call of ours (step_kernel.decode_step)."""
        return self.step is not None and self.step.active

    def new_cache(self, capacity: int) -> FastCache:
        return FastCache(len(self.layers), self.kv_heads, self.head_dim, capacity)

    def rope(self, start: int, end: int) -> tuple[Any, Any]:
        """cos and sign-folded sin for positions [start, end), from the model's own rotary
        module (so every rope scaling it knows applies)."""
        import torch

        if end > self._cos.shape[0]:
            size = _round(max(end, 2 * self._cos.shape[0]))
            positions = torch.arange(size).unsqueeze(0)
            probe = torch.empty(1, dtype=torch.float32)
            cos, sin = self._rotary(probe, positions)
            half = self.head_dim // 2
            sign = torch.cat([-torch.ones(half), torch.ones(self.head_dim - half)])
            self._cos = cos[0].to(self.dtype)
            self._sin = (sin[0] * sign).to(self.dtype)
        return self._cos[start:end], self._sin[start:end]

    def rope_at(self, positions: Any) -> tuple[Any, Any]:
        """cos and sign-folded sin at each of ``positions`` (a tensor of ints)."""
        cos, sin = self.rope(0, int(positions.max()) + 1)
        return cos[positions], sin[positions]

    def run_layers(self, x: Any, cos: Any, sin: Any, attend: Attend) -> Any:
        """Every layer over the embedded rows ``x``: the final hidden states, before the
        last norm (see ``FusedLayer.run`` for ``attend``). The single-stream forward below and
        the server's batch (``batching.py``) both run the model through here."""
        for index, layer in enumerate(self.layers):
            x = layer.run(x, cos, sin, attend, index)
        return x

    def logits(self, x: Any) -> Any:
        """The logits of the hidden-state rows ``x``."""
        return self.lm_head(self.norm(x))

    def forward(self, ids: Sequence[int], cache: FastCache) -> Any:
        """Run prompt tokens ``ids`` after what ``cache`` holds, ``PREFILL_CHUNK`` at a
        time, the layers one operation at a time; returns the logits of the last one."""
        cache.reserve(cache.length + len(ids))
        for start in range(0, len(ids) - PREFILL_CHUNK, PREFILL_CHUNK):
            self._forward(ids[start:start + PREFILL_CHUNK], cache)
        return self._forward(ids[len(ids) - 1 - (len(ids) - 1) % PREFILL_CHUNK:], cache)

    def decode(self, token: int, cache: FastCache) -> Any:
        """Run a generated token after what ``cache`` holds: in one call of ours where the
        step runs (``step``), else as ``forward``. Prompts always run the layers one
        operation at a time and generated tokens in one call where there is one, here and
        in the server's batch, so a token is computed the same way wherever it runs (a
        prompt's last token included, when a cached prefix leaves only it to run)."""
        import torch

        if self.step is None:
            return self._forward([token], cache)
        pos = cache.length
        cache.reserve(pos + 1)
        cos, sin = self.rope(pos, pos + 1)
        x = self.embed(torch.tensor([token])).float().contiguous()
        if not self.step(x, cache.k, cache.v, torch.tensor([[pos, 0, pos + 1]]), cos.float(),
                         sin.float(), head_stride=cache.capacity * self.head_dim,
                         token_stride=self.head_dim):
            return self._forward([token], cache)  # the kernels changed: PyTorch's now
        cache.length = pos + 1
        return self.logits(x.to(self.dtype))

    def _forward(self, ids: Sequence[int], cache: FastCache) -> Any:
        import torch
        import torch.nn.functional as F

        pos, count = cache.length, len(ids)
        end = pos + count
        cache.reserve(end)
        cos, sin = self.rope(pos, end)
        mask = offset_mask(pos, count)
        gqa = self.heads != self.kv_heads

        def attend(i: int, q: Any, k: Any, v: Any) -> Any:
            keys, values = cache.k[i], cache.v[i]
            keys.narrow(2, pos, count).copy_(k)
            values.narrow(2, pos, count).copy_(v)
            return F.scaled_dot_product_attention(
                q.float().unsqueeze(0), keys.narrow(2, 0, end), values.narrow(2, 0, end),
                attn_mask=mask, is_causal=count > 1 and mask is None,
                scale=self.layers[i].scaling, enable_gqa=gqa)

        x = self.run_layers(self.embed(torch.tensor(ids)), cos, sin, attend)
        cache.length = end
        return self.logits(x[-1:])
