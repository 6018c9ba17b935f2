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
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from typing import Any

from .kernels import INT4_BLOCK_ROWS, LayerParts, Product, decode_step, int4_mm, int8_mm

__all__ = ["FAST_KV_BYTES", "Attend", "FastCache", "FastModel", "Sampler", "fast_tokens",
           "offset_mask", "unsupported_reason"]

# attend(layer index, queries, keys, values) -> attention output: see _Layer.run
Attend = Callable[[int, Any, Any, Any], Any]

SUPPORTED_TYPES = frozenset({"llama", "qwen2", "qwen3", "mistral"})
CAPACITY_STEP = 256  # KV cache capacity grows in steps of this many positions
FAST_KV_BYTES = 4  # the KV cache is float32, whatever the model's dtype (see above)
# prompt tokens run through the layers at once: a long prompt's activations (and its
# attention scores, which grow with the square of its length) stay bounded, at no cost in
# speed (1B shape, int4, AVX-512, 2 threads, a 1,000-token prefill: 75-78 tok/s in chunks
# of 256, 72-75 whole)
PREFILL_CHUNK = 256
# the packed int4 CPU layout interleaves output rows in blocks (of 64 for AVX-512): a fused
# layer's parts must each fill whole blocks
INT4_BLOCK = max(INT4_BLOCK_ROWS.values())


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


class _Norm:
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


class _Layer:
    def __init__(self, layer: Any, heads: int, kv_heads: int, head_dim: int) -> None:
        attn, mlp = layer.self_attn, layer.mlp
        self.norm1 = _Norm(layer.input_layernorm)
        self.norm2 = _Norm(layer.post_attention_layernorm)
        self.qkv, qkv = _fuse([attn.q_proj, attn.k_proj, attn.v_proj])
        self.o, o = _fuse([attn.o_proj])
        self.gate_up, gate_up = _fuse([mlp.gate_proj, mlp.up_proj])
        self.down, down = _fuse([mlp.down_proj])
        self.scaling = float(attn.scaling)
        q_norm, k_norm = getattr(attn, "q_norm", None), getattr(attn, "k_norm", None)
        self.qk_norm = None if q_norm is None or k_norm is None else (
            _Norm(q_norm), _Norm(k_norm))
        self.split = (heads * head_dim, kv_heads * head_dim, kv_heads * head_dim)
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, head_dim
        qk = self.qk_norm
        # what kernels.decode_step runs a token through (it takes what it can run), its
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


def offset_mask(past: int, count: int) -> Any:
    """Causal mask for ``count`` new tokens after ``past`` cached ones (None where plain
    causal attention does it: one token, or nothing cached)."""
    import torch

    if count == 1 or past == 0:
        return None
    end = past + count
    return torch.arange(end).unsqueeze(0) <= torch.arange(past, end).unsqueeze(1)


def _eps(norm: Any) -> float:
    return float(getattr(norm, "variance_epsilon", getattr(norm, "eps", 1e-6)))


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
        self.layers = [_Layer(layer, self.heads, self.kv_heads, self.head_dim)
                       for layer in inner.layers]
        self.embed = inner.embed_tokens
        self.norm = _Norm(inner.norm)
        self.lm_head = model.get_output_embeddings()
        self.dtype = inner.norm.weight.dtype
        self._rotary = inner.rotary_emb
        self._cos = torch.empty(0, self.head_dim, dtype=self.dtype)
        self._sin = torch.empty(0, self.head_dim, dtype=self.dtype)
        parts = [layer.parts for layer in self.layers]
        # a decode step's layers in one call of ours, where they take every part (see
        # kernels): the single stream's tokens here, the server's batch (batching.py)
        self.step = None if None in parts else decode_step(parts)  # type: ignore[arg-type]

    @property
    def one_call(self) -> bool:
        """Whether a decode step's layers run in one call of ours (kernels.decode_step)."""
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
        last norm (see ``_Layer.run`` for ``attend``). The single-stream forward below and
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


class Sampler:
    """Picks each next token the way ``generate`` would with the same settings."""

    def __init__(self, settings: dict[str, Any], processors: list[Any], seed: int | None,
                 prompt: Sequence[int], max_new: int) -> None:
        import torch
        from transformers.generation.logits_process import (
            MinPLogitsWarper,
            RepetitionPenaltyLogitsProcessor,
            TemperatureLogitsWarper,
            TopKLogitsWarper,
            TopPLogitsWarper,
        )

        self.sample = bool(settings.get("do_sample"))
        steps: list[Any] = []
        penalty = settings.get("repetition_penalty")
        if penalty is not None and penalty != 1.0:
            steps.append(RepetitionPenaltyLogitsProcessor(penalty))
        steps.extend(processors)
        if self.sample:
            temperature = settings.get("temperature")
            if temperature is not None and temperature != 1.0:
                steps.append(TemperatureLogitsWarper(temperature))
            if settings.get("top_k"):
                steps.append(TopKLogitsWarper(int(settings["top_k"])))
            if settings.get("top_p") is not None and settings["top_p"] < 1.0:
                steps.append(TopPLogitsWarper(settings["top_p"]))
            if settings.get("min_p"):
                steps.append(MinPLogitsWarper(settings["min_p"]))
        self.steps = steps
        self.generator = None
        if self.sample:
            self.generator = torch.Generator()
            if seed is not None:
                self.generator.manual_seed(seed)
            else:
                self.generator.seed()
        self.ids = torch.zeros(len(prompt) + max_new, dtype=torch.long)
        self.ids[: len(prompt)] = torch.tensor(list(prompt), dtype=torch.long)
        self.length = len(prompt)

    def pick(self, logits: Any) -> int:
        import torch

        if (self.steps or self.sample) and logits.device.type != "cpu":
            logits = logits.cpu()  # the token history and the generator are on the CPU
        if self.steps:
            logits = logits.float()
            seq = self.ids[: self.length].unsqueeze(0)
            for step in self.steps:
                logits = step(seq, logits)
        if self.sample:
            probs = torch.softmax(logits.float(), dim=-1)
            token = int(torch.multinomial(probs[0], 1, generator=self.generator))
        else:  # max is several times faster than argmax on a CPU
            token = int(logits[0].max(-1).indices)
        if self.length < self.ids.shape[0]:
            self.ids[self.length] = token
            self.length += 1
        return token


def fast_tokens(lm: Any, prompt: list[int], max_new: int, settings: dict[str, Any],
                processors: list[Any], seed: int | None, cancel: Any) -> Iterator[int]:
    """Generated token ids, decoded on the model thread (see ``worker``) one step per job:
    each step queues the next, so other streams' steps interleave, and the decode never
    waits for this consumer (it reads tokens from a queue while the next one is computed).
    The prompt's KV cache is taken from (and, with what was generated, returned to) the
    model's prefix cache."""
    import queue
    import threading

    import torch

    from . import worker

    fast: FastModel = lm.fast
    cache, reused = lm.prefix_cache.take(prompt, kind=FastCache)
    out: queue.SimpleQueue[Any] = queue.SimpleQueue()
    done = threading.Event()  # set once the cache is back in the prefix cache
    generated: list[int] = []
    sampler: Sampler | None = None
    end = object()

    def finish() -> None:
        if cache is not None:
            lm.prefix_cache.put((prompt + generated)[: cache.length], cache)
        out.put(end)
        done.set()

    def step() -> None:
        nonlocal cache, sampler
        try:
            if cancel.is_set():
                finish()
                return
            with torch.inference_mode():
                if sampler is None:
                    if cache is None:
                        cache = fast.new_cache(len(prompt) + max_new)
                    cache.reserve(len(prompt) + max_new)
                    sampler = Sampler(settings, processors, seed, prompt, max_new)
                    token = sampler.pick(fast.forward(prompt[reused:], cache))
                else:
                    token = sampler.pick(fast.decode(generated[-1], cache))
            generated.append(token)
            out.put(token)
            if token in lm.eos_ids or len(generated) >= max_new:
                finish()
            else:
                worker.submit(step)
        except BaseException as exc:  # handed to the consumer, never lost
            out.put(exc)
            finish()

    if worker.on_worker():  # its steps could never run while it waits for them
        raise RuntimeError("fast_tokens cannot be consumed on the model thread")
    if cancel.is_set():
        return
    worker.submit(step)
    try:
        while (item := out.get()) is not end:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        cancel.set()  # the next step ends the chain
        done.wait(timeout=30)
