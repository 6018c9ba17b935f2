"""The models the continuous batch (``batching.py``) runs its steps over, behind
transformers' paged-attention forward signature: ``BatchModel`` over the fast path's layers,
``ModelBatch`` over the transformers model's own forward. Imported when a batch starts (it
imports torch and transformers' continuous batching), so that importing ``batching`` stays
light; it imports nothing from ``batching``."""

from __future__ import annotations

import contextlib
import copy
import types
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from transformers.generation.continuous_batching import ContinuousMixin
from transformers.generation.continuous_batching.cb_logits_processors import (
    ContinuousBatchingLogitsProcessor,
)
from transformers.generation.logits_process import LogitsProcessorList

from ..errors import GenerationError
from . import worker
from .fast import Sampler, offset_mask
from .loader import LoadedModel

__all__ = ["PER_REQUEST", "BatchModel", "ModelBatch", "Request", "per_request_attention"]

PER_REQUEST = "openweight_per_request_"  # see per_request_attention


@dataclass
class Request:
    """What the forward needs to pick a request's tokens; the sampler is made on the model
    thread at its first token."""

    settings: dict[str, Any]
    seed: int | None
    prompt: list[int]
    max_new: int
    sampler: Any = None


class Slots(ContinuousBatchingLogitsProcessor):  # type: ignore[misc]
    """Carries each row's request slot into the step (the forward picks the tokens)."""

    supported_kwargs: ClassVar[dict[str, type]] = {"openweight_slot": int}
    ignored_kwargs: ClassVar[tuple[str, ...]] = ()

    def fill_defaults(self, int32_tensor: Any) -> None:
        int32_tensor.fill_(-1)

    def prepare_tensor_args(self, requests_with_new_token: list[Any]) -> Any:
        return torch.tensor([r.state.logit_processor_kwargs.get("openweight_slot", -1)
                             for r in requests_with_new_token], dtype=torch.int32)

    def __call__(self, scores: Any, tensor_arg: Any) -> Any:
        return scores  # already one-hot: the forward picked each row's token


class Rows(ContinuousMixin, torch.nn.Module):  # type: ignore[misc]
    """What both batch models share: transformers' paged-attention forward signature,
    run on the model thread, and each request's token picked by its own sampler, handed
    to the manager as a one-hot row."""

    _supports_flash_attn = False
    _step: Any  # the step, run on the model thread: returns the one-hot rows

    def __init__(self, lm: LoadedModel, requests: dict[int, Request],
                 steps: list[int]) -> None:
        super().__init__()
        self.lm = lm
        self.requests = requests
        self.steps = steps
        self.config = copy.deepcopy(lm.model.config)
        self.generation_config = lm.model.generation_config

    def set_attn_implementation(self, attn_implementation: str) -> None:
        self.config._attn_implementation = attn_implementation

    def _supports_logits_to_keep(self) -> bool:
        return True

    def _get_logits_processor(self, generation_config: Any) -> Any:
        return LogitsProcessorList([Slots()])

    def forward(self, **batch: Any) -> Any:
        return worker.call(lambda: self._step(**batch))

    def _picked(self, logits: Any, logits_processor_args: Any) -> Any:
        """Each row's token (``logits``: [rows, vocab], one row per request that gets a
        token this step), as the manager's one-hot output."""
        slots = logits_processor_args[0, : logits.shape[0]].tolist()
        tokens = [self._pick(slot, logits[i:i + 1]) for i, slot in enumerate(slots)]
        self.steps[0] += 1
        self.steps[1] = max(self.steps[1], len(tokens))
        device = logits.device
        onehot = torch.full((1, len(tokens), max(tokens) + 1), float("-inf"), device=device)
        onehot[0, torch.arange(len(tokens), device=device),
               torch.tensor(tokens, device=device)] = 0.0
        return types.SimpleNamespace(logits=onehot)

    def _pick(self, slot: int, logits: Any) -> int:
        request = self.requests.get(slot)
        if request is None:  # cancelled while in this step: any token will do
            return int(logits[0].max(-1).indices)
        if request.sampler is None:
            request.sampler = Sampler(request.settings, [], request.seed,
                                       request.prompt, request.max_new)
        return int(request.sampler.pick(logits))


class ModelBatch(Rows):
    """The batch over the loaded transformers model itself, for the models the fast path
    does not take (GPUs, other architectures, sliding-window layers, OPENWEIGHT_FAST=0):
    its own forward over the rows of all the requests, with transformers' paged cache and
    the attention the manager sets up for it (sdpa stays sdpa, eager becomes
    paged|eager: one call over all the requests' keys, with a block-diagonal mask), on
    the model's device and dtype.

    On a CPU (``split``) that attention runs once per request instead, over the request's
    own keys and its block of the mask, as generate calls it: one call over everyone's
    keys tiles each row's softmax by where its keys happen to lie, which moves a greedy
    answer by a rounding step with what runs beside it. What is left is the matrix
    products': int8 and int4 ones are row-independent, so an answer is then exactly the
    one it gets alone; a bfloat16 or float32 product of one row can round differently
    from one of several."""

    def __init__(self, lm: LoadedModel, requests: dict[int, Request],
                 steps: list[int]) -> None:
        super().__init__(lm, requests, steps)
        self.device = lm.model.device
        self.dtype = lm.model.dtype  # the paged cache's: as generate's cache
        self.split = self.device.type == "cpu"
        self._keeps = bool(lm.model._supports_logits_to_keep())

    def _step(self, *, logits_indices: Any, logits_processor_args: Any,
              logits_to_keep: Any = None, **batch: Any) -> Any:
        model = self.lm.model
        attention = self.config._attn_implementation
        if self.split and not attention.startswith("flash"):  # flash is per request
            attention = per_request_attention(attention)
        with torch.inference_mode(), _attention(model.config, attention):
            if self._keeps:
                logits = model(**batch, logits_to_keep=logits_indices).logits[0]
            else:
                logits = model(**batch).logits[0, logits_indices]
            return self._picked(logits, logits_processor_args)


class BatchModel(Rows):
    """The batch over the fast path's layers behind transformers' paged-attention
    forward signature."""

    def __init__(self, lm: LoadedModel, requests: dict[int, Request],
                 steps: list[int]) -> None:
        super().__init__(lm, requests, steps)
        self.fast = lm.fast
        # attention reads the cache per request (by cu_seq_lens, as flash attention
        # does), so the manager needs no dense masks: a "flash" name tells it so
        self.config._attn_implementation = "openweight_flash_varlen"
        self.device = torch.device("cpu")
        self.dtype = torch.float32  # the KV cache's: float32, as on the single-stream path
        self._cache: Any = None
        self._views_of: dict[int, tuple[Any, Any]] = {}
        self._steppable = False  # the cache's layout is the one the one-call step reads

    def _see(self, cache: Any) -> None:
        """Take ``cache`` as the batch's (the manager makes it once): its views and
        whether the one-call step can read it are worked out once, not every step."""
        if self._cache is cache:
            return
        self._cache, self._views_of = cache, {}
        fast = self.fast
        width = fast.kv_heads * fast.head_dim
        self._steppable = all(
            t.stride() == (width, fast.head_dim, 1) and t.dtype == torch.float32
            for li in range(len(fast.layers)) for t in _layer_views(cache, li))

    def _views(self, cache: Any, layer: int) -> tuple[Any, Any]:
        """One layer's keys and values in the paged cache as [1, kv_heads, tokens,
        head_dim] views (the cache's own [tokens, kv_heads, head_dim] views, turned)."""
        self._see(cache)
        views = self._views_of.get(layer)
        if views is None:
            views = tuple(t.permute(1, 0, 2).unsqueeze(0) for t in _layer_views(cache, layer))
            self._views_of[layer] = views
        return views

    def _step(self, *, input_ids: Any, position_ids: Any, cu_seq_lens_q: Any,
              cu_seq_lens_k: Any, logits_to_keep: Any, logits_processor_args: Any,
              cache: Any, read_index: Any, write_index: Any, max_length_k: Any,
              **_: Any) -> Any:
        with torch.inference_mode():
            keep = logits_to_keep.long()
            slots = logits_processor_args[0, : keep.shape[0]].tolist()
            # each kept row's request's prompt length: which rows are generated tokens
            prompts = {row: len(self.requests[slot].prompt)
                       for row, slot in zip(keep.tolist(), slots, strict=True)
                       if slot in self.requests}
            logits = self._logits(input_ids[0].long(), position_ids[0].long(),
                                  cu_seq_lens_q.tolist(),
                                  next(iter(cu_seq_lens_k.values())).tolist(),
                                  keep, cache,
                                  {"cu_seq_lens_k": cu_seq_lens_k,
                                   "max_length_k": max_length_k,
                                   "read_index": read_index, "write_index": write_index},
                                  prompts)
            return self._picked(logits, logits_processor_args)

    def _logits(self, ids: Any, pos: Any, cu_q: list[int], cu_k: list[int], keep: Any,
                cache: Any, cache_args: dict[str, Any], prompts: dict[int, int]) -> Any:
        """The fast path's layers (``FastModel.run_layers``, as its single-stream forward
        runs them) over the concatenated rows of several requests: every per-row
        operation is the same; attention reads and writes the paged cache per request."""
        fast = self.fast
        spans = []  # (first row, end row, first key, end key, mask)
        for i in range(len(cu_q) - 1):
            start, end, k0, k1 = cu_q[i], cu_q[i + 1], cu_k[i], cu_k[i + 1]
            n, past = end - start, (k1 - k0) - (end - start)
            if n <= 0:
                continue
            spans.append((start, end, k0, k1, offset_mask(past, n)))
        reads = cache_args["read_index"][0]
        places = _key_places(cache, reads, spans)
        writes = cache_args["write_index"][0]
        decoding = {} if places is None else self._decoding(
            spans, places, reads, writes, cache, pos, prompts)
        if places is None or not decoding:
            return fast.logits(self._layers(ids, pos, spans, places, writes, cache,
                                            cache_args)[keep])
        # the requests decoding a token: in one call of ours, as a request alone decodes;
        # the others (prompt chunks): the layers one operation at a time, as alone
        one = [spans[i][0] for i in decoding]
        x = fast.embed(ids).float().contiguous()
        x[one] = self._one_call(x[one], pos[one], list(decoding.values()), reads, cache)
        rest = [i for i in range(len(spans)) if i not in decoding]
        if rest:
            rows = [r for i in rest for r in range(spans[i][0], spans[i][1])]
            moved, at = [], 0
            for i in rest:
                start, end, k0, k1, mask = spans[i]
                moved.append((at, at + end - start, k0, k1, mask))
                at += end - start
            x[rows] = self._layers(ids[rows], pos[rows], moved,
                                   [places[i] for i in rest], writes[rows], cache,
                                   cache_args).float()  # (exact: from bf16 or float32)
        return fast.logits(x[keep].to(fast.dtype))

    def _layers(self, ids: Any, pos: Any, spans: list[Any], places: list[Any] | None,
                writes: Any, cache: Any, cache_args: dict[str, Any]) -> Any:
        """The final hidden states of these rows, the layers run one operation at a
        time, attention per request (``spans``: each request's rows, keys and mask;
        ``places``: where its keys lie, see ``_key_places``; ``writes``: each row's
        slot)."""
        fast = self.fast
        heads, kv = fast.heads, fast.kv_heads
        gqa = heads != kv

        def attend(li: int, q: Any, k: Any, v: Any) -> Any:
            k, v, q = k.float().unsqueeze(0), v.float().unsqueeze(0), q.float().unsqueeze(0)
            if places is None:  # read back through the cache's index (a copy)
                keys, values = cache.update(k, v, li, dict(cache_args))
                kv_of = [(keys[:, :, k0:k1], values[:, :, k0:k1])
                         for _, _, k0, k1, _ in spans]
            else:  # write, then read each request's keys: in place, or gathered
                k_all, v_all = self._views(cache, li)
                k_all.index_copy_(2, writes, k)
                v_all.index_copy_(2, writes, v)
                kv_of = [_keys_at(place, k_all, v_all, k, v, start, end)
                         for (start, end, _, _, _), place in zip(spans, places,
                                                                 strict=True)]
            scale = fast.layers[li].scaling
            outs = [F.scaled_dot_product_attention(
                q[:, :, start:end], keys, values, attn_mask=mask,
                is_causal=end - start > 1 and mask is None, scale=scale, enable_gqa=gqa,
            ) for (start, end, _, _, mask), (keys, values) in zip(spans, kv_of, strict=True)]
            return outs[0] if len(outs) == 1 else torch.cat(outs, 2)

        cos, sin = fast.rope_at(pos)
        return fast.run_layers(fast.embed(ids), cos, sin, attend)

    def _decoding(self, spans: list[Any], places: list[Any], reads: Any, writes: Any,
                  cache: Any, pos: Any, prompts: dict[int, int]
                  ) -> dict[int, tuple[int, int, int]]:
        """The requests of the step the one-call step takes (by their index in
        ``spans``), each with its row's (slot to write, where its key slots start in
        ``reads``, how many): those whose one row is a generated token (at a position
        past its prompt: ``prompts`` maps a kept row to its request's prompt length;
        prompts run one operation at a time, as alone, see ``FastModel.decode``), the
        new key's slot the last read, where our kernels run and the cache is float32 in
        the layout the step reads. Empty where none."""
        self._see(cache)
        if not self.fast.one_call or not self._steppable:
            return {}
        positions = pos.tolist()
        candidates = [i for i, (start, end, _, _, _) in enumerate(spans)
                      if end - start == 1 and places[i] is not None
                      and start in prompts and positions[start] >= prompts[start]]
        if not candidates:
            return {}
        slots = writes.tolist()
        last = reads[[spans[i][3] - 1 for i in candidates]].tolist()
        out = {}
        for i, read in zip(candidates, last, strict=True):
            start, _, k0, k1, _ = spans[i]
            if read == slots[start]:
                out[i] = (slots[start], k0, k1 - k0)
        return out

    def _one_call(self, x: Any, pos: Any, rows: list[tuple[int, int, int]], reads: Any,
                  cache: Any) -> Any:
        """The final hidden states of these decoding rows (embedded ``x``, float32), by
        the fast path's one-call step (``kernels.DecodeStep``) over the paged cache in
        place, each row's keys read by their slots: the very computation a request alone
        gets for its tokens."""
        fast = self.fast
        views = [_layer_views(cache, li) for li in range(len(fast.layers))]
        x = x.contiguous()
        cos, sin = fast.rope_at(pos)
        if not fast.step(x, [k for k, _ in views], [v for _, v in views],
                         torch.tensor(rows, dtype=torch.int64), cos.float(), sin.float(),
                         head_stride=fast.head_dim,
                         token_stride=fast.kv_heads * fast.head_dim,
                         reads=reads.to(torch.int64).contiguous()):
            raise GenerationError("the kernels changed while the batch ran")
        return x


def _layer_views(cache: Any, layer: int) -> tuple[Any, Any]:
    """The [tokens, kv_heads, head_dim] key and value views of one layer of the paged
    cache (what its index-based update reads from)."""
    return cache.layer_to_allocator[layer]._kv_token_views[layer]  # type: ignore[no-any-return]


def _key_places(cache: Any, read_index: Any, spans: list[Any]) -> list[Any] | None:
    """Per request, where its keys lie in the layer views: the [start, end) of a run
    in one page, read in place, or the tensor of their slots (across pages: read by a
    gather); None for a request whose keys are all this step's when the step reads
    none back. None for the whole step where the views are not to be had (another
    transformers layout: the cache's own copying read is used then)."""
    if read_index.numel() == 0:
        return [None] * len(spans)
    try:
        _layer_views(cache, 0)
    except (AttributeError, KeyError):
        return None
    ends = read_index[[i for _, _, k0, k1, _ in spans for i in (k0, k1 - 1)]].tolist()
    out: list[Any] = []
    for (_, _, k0, k1, _), first, last in zip(spans, ends[::2], ends[1::2], strict=True):
        out.append((first, last + 1) if last - first == k1 - k0 - 1
                   else read_index[k0:k1].to(torch.int64))
    return out


def _keys_at(place: Any, k_all: Any, v_all: Any, k: Any, v: Any, start: int,
             end: int) -> tuple[Any, Any]:
    """One request's keys and values (see ``_key_places``; ``k``, ``v``: this step's)."""
    if place is None:
        return k[:, :, start:end], v[:, :, start:end]
    if isinstance(place, tuple):
        return k_all[:, :, place[0]:place[1]], v_all[:, :, place[0]:place[1]]
    return k_all.index_select(2, place), v_all.index_select(2, place)


def per_request_attention(name: str) -> str:
    """The name of an attention implementation that runs transformers' ``name`` (as
    registered in its ``AttentionInterface``) once per request of a paged batch, registered
    on first use."""
    split = PER_REQUEST + name.replace("|", "_")
    from transformers import AttentionInterface
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if split in ALL_ATTENTION_FUNCTIONS:
        return split
    import torch

    base = ALL_ATTENTION_FUNCTIONS[name]
    sdpa = name == "sdpa"

    def attend(module: Any, query: Any, key: Any, value: Any, attention_mask: Any,
               **kwargs: Any) -> tuple[Any, None]:
        # query [1, heads, rows, dim]; key and value [1, kv_heads, keys, dim], each
        # request's keys after the previous one's (as the cache read them back); the mask
        # [1, 1, rows, keys] is block-diagonal: each request's block is its own mask
        cu_q = kwargs["cu_seq_lens_q"].tolist()
        cu_k = kwargs["cu_seq_lens_k"].tolist()
        outs = []
        for q0, q1, k0, k1 in zip(cu_q, cu_q[1:], cu_k, cu_k[1:], strict=False):
            if q1 <= q0:
                continue
            mask = None if attention_mask is None else attention_mask[..., q0:q1, k0:k1]
            if sdpa and q1 - q0 == 1:
                # one new token sees every key it reads (a window holds no more): no mask,
                # as generate decodes (sdpa then takes another, differently rounding,
                # route for grouped heads). Prompt chunks keep theirs whichever chunk
                # they are, so where a prompt is cut does not change how it is computed.
                mask = None
            outs.append(base(module, query[:, :, q0:q1], key[:, :, k0:k1],
                             value[:, :, k0:k1], mask, **kwargs)[0])
        return (outs[0] if len(outs) == 1 else torch.cat(outs, 1)), None

    AttentionInterface.register(split, attend)
    return split


@contextlib.contextmanager
def _attention(config: Any, implementation: str) -> Iterator[None]:
    """The model's attention implementation set to the batch's for one step. The model is
    shared with the single-stream path, whose steps run on the same thread, never inside
    this one."""
    before = config._attn_implementation
    if before == implementation:
        yield
        return
    config._attn_implementation = implementation
    try:
        yield
    finally:
        config._attn_implementation = before
