"""Continuous batching for the server: concurrent requests share each decode step.

transformers' ``ContinuousBatchingManager`` does the batching: its scheduler admits
requests, splits long prompts into chunks, gives every request pages of a paged KV cache
(reusing the pages of a shared prefix), and streams each request's tokens as they come.
What this module adds is the model it batches over, a thin
``forward(**paged_attention_args)`` run on the model thread (``worker.py``), one of two:

- ``_BatchModel``, for the models the fast CPU path takes, is built from that path's own
  layers (``fast.py``: fused projections, float32 attention). Each row is computed with
  the same operations as the single-stream path: the quantised matrix products are
  row-independent and attention runs per request, so a greedy answer is the same token
  for token whether it was decoded alone, beside seven others, or on the single-stream
  path.
- ``_ModelBatch``, for every other model (GPUs, other architectures, sliding-window
  layers, ``OPENWEIGHT_FAST=0``), runs the transformers model's own forward over the
  paged cache, in the model's dtype and on its device, with the attention the manager
  sets up for it; on a CPU that attention runs per request, as generate runs it.

Sampling stays per request: each request gets the single-stream path's own sampler
(temperature, top_p, top_k, min_p, repetition penalty and its own seeded generator), picked
inside the forward, and hands the manager a one-hot row to take the argmax of.

``Batching.source`` is a ``TokenSource`` (see ``engine.py``): requests it cannot batch (a
json_schema, a model transformers' paged cache cannot hold, a request longer than the
batch cache) go to the engine's ``default_source`` unchanged.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import queue
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

from ..errors import GenerationError
from ..options import GenerationOptions
from . import worker
from .loader import LoadedModel

__all__ = ["BATCH_ENV", "Batching", "batching_enabled"]

BATCH_ENV = "OPENWEIGHT_BATCH"  # "0" turns batching off
KV_ENV = "OPENWEIGHT_BATCH_KV_MB"  # memory for the batch's KV cache
DEFAULT_KV_MB = 512  # allocated (and touched) when the batch starts
PAGE_SIZE = 512  # tokens per cache page: a request in one page is read in place
MAX_BATCH_TOKENS = 512  # tokens per step: longer prompts are prefilled in chunks
MAX_REQUESTS = 32  # requests decoded together in one step
POLL_SECONDS = 0.05
log = logging.getLogger("openweight.batching")


def batching_enabled() -> bool:
    return os.environ.get(BATCH_ENV, "1").strip().lower() not in ("0", "false", "no", "off")


class Batching:
    """The continuous batchers of one server: one per loaded model, started on first use.

    ``source`` is the ``TokenSource`` a server hands the engine; ``close`` stops them all.
    """

    def __init__(self, kv_bytes: int | None = None) -> None:
        if kv_bytes is None:
            kv_bytes = int(float(os.environ.get(KV_ENV, DEFAULT_KV_MB)) * 2**20)
        self.kv_bytes = kv_bytes
        self._batchers: dict[int, _Batcher] = {}
        self._broken: dict[int, str] = {}  # models whose batcher failed to start, and why
        self._lock = threading.Lock()
        self._closed = False
        self.batched = 0  # requests the batch took
        self.single = 0  # requests sent to the single-stream path

    def fallback_reason(self, lm: LoadedModel, prompt_len: int, max_new: int,
                        options: GenerationOptions) -> str | None:
        """Why this request goes to the single-stream path (None: it is batched)."""
        if self._closed:
            return "the server is stopping"
        if "generate" in vars(lm.model):  # a hook (or a test's script) replaces generate
            return "the model's generate is replaced"
        if options.json_schema is not None:
            return "json_schema constrained decoding runs on the single-stream path"
        reason = self._broken.get(id(lm)) or _model_reason(lm)
        if reason is not None:
            return reason
        if prompt_len + max_new > self._capacity(lm):
            return "the request is longer than the batch's KV cache"
        return None

    def source(self, lm: LoadedModel, prompt: list[int], max_new: int,
               options: GenerationOptions, cancel: threading.Event) -> Iterator[int]:
        """A ``TokenSource``: the batch where it can take the request, else the engine's."""
        if self.fallback_reason(lm, len(prompt), max_new, options) is None:
            batcher = self._batcher(lm)
            if batcher is not None:
                self.batched += 1
                return batcher.tokens(prompt, max_new, options, cancel)
        from . import engine

        self.single += 1
        return engine.default_source(lm, prompt, max_new, options, cancel)

    def stats(self) -> dict[str, int]:
        """Requests batched and sent to the single-stream path, requests in the batches
        now, decode steps run and the most requests one step carried."""
        batchers = list(self._batchers.values())
        return {"batched": self.batched, "single": self.single,
                "active": sum(len(b.requests) for b in batchers),
                "steps": sum(b.steps[0] for b in batchers),
                "max_rows": max((b.steps[1] for b in batchers), default=0)}

    def close(self) -> None:
        """Stop every batcher; their requests in flight fail with a GenerationError."""
        with self._lock:
            self._closed = True
            batchers, self._batchers = list(self._batchers.values()), {}
        for batcher in batchers:
            batcher.close()

    def _capacity(self, lm: LoadedModel) -> int:
        """Tokens the batch cache holds: what the KV budget pays for, at least a few pages
        and at most a full context for every request of a step. A longer request runs on
        the single-stream path."""
        pages = self.kv_bytes // (_bytes_per_token(lm) * PAGE_SIZE)
        most = MAX_REQUESTS * -(-lm.context_length // PAGE_SIZE)
        return int(min(max(pages, 4), most) * PAGE_SIZE)

    def _batcher(self, lm: LoadedModel) -> _Batcher | None:
        """The model's batcher, started now if it has none (or its loop died of an error:
        the requests it held got that error, later ones get a new loop)."""
        key = id(lm)
        with self._lock:
            batcher = self._batchers.get(key)
            if batcher is not None and not batcher.running():
                batcher.close()
                batcher = None
            if batcher is None and not self._closed and key not in self._broken:
                try:
                    batcher = _Batcher(lm, self._capacity(lm))
                except Exception as exc:  # an unsupported transformers version, memory
                    log.warning("openweight: continuous batching is off for %s: %s",
                                lm.path.name, exc)
                    self._broken[key] = f"the batch could not start: {exc}"
                    return None
                self._batchers[key] = batcher
            return batcher


def _model_reason(lm: LoadedModel) -> str | None:
    """Why the batch cannot hold this model (None: it can). The fast path's layers need
    full attention everywhere; transformers' own forward runs over its paged cache, which
    holds full and sliding-window attention layers, under one of the attention kernels
    continuous batching runs (sdpa, eager, flash)."""
    config = lm.model.config
    if lm.fast is not None:
        layer_types = getattr(config, "layer_types", None)
        if layer_types and any(t != "full_attention" for t in layer_types):
            return "the model has layers other than full attention"
        if layer_types is None and getattr(config, "sliding_window", None) is not None:
            return "the model uses sliding-window attention"
        return None
    text = config.get_text_config()
    if getattr(config, "is_encoder_decoder", False):
        return "the model is an encoder-decoder"
    if lm.device == "mps":
        from transformers.utils.import_utils import is_torch_greater_or_equal

        if not is_torch_greater_or_equal("2.14", accept_dev=True):
            return "continuous batching on an Apple GPU is slow and memory-hungry before torch 2.14"
    kinds = set(getattr(text, "layer_types", None) or ())
    other = sorted(kinds - set(_PAGED_LAYER_TYPES))
    if other:
        return f"transformers' paged cache does not hold {', '.join(other)} layers"
    window = getattr(text, "sliding_window", None)
    if "sliding_attention" in kinds and not (isinstance(window, int) and window > 0):
        return "the model has sliding-window layers but no window size"
    attention = str(getattr(config, "_attn_implementation", None))
    if attention.startswith(_PER_REQUEST):  # the batch's own, set while a step runs
        return None
    flash = attention.startswith("flash_attention")
    if attention not in _PAGED_ATTENTION and not flash:
        return f"continuous batching does not run {attention!r} attention"
    if getattr(text, "attn_logit_softcapping", None) and not flash:
        return f"transformers' paged {attention} attention does not soft-cap attention logits"
    return None


# what transformers' paged cache and continuous batching take (see _model_reason)
_PAGED_LAYER_TYPES = ("full_attention", "sliding_attention")
_PAGED_ATTENTION = ("sdpa", "eager", "paged|eager")
_PER_REQUEST = "openweight_per_request_"  # see _per_request_attention


def _bytes_per_token(lm: LoadedModel) -> int:
    """Bytes of keys and values one token takes in the batch's cache, all layers together:
    the fast path's are float32; transformers' paged cache holds the model's own dtype and
    counts every layer as a full-attention one (sliding-window layers hold at most their
    window, so a hybrid model's requests take less)."""
    fast = lm.fast
    if fast is not None:
        return int(len(fast.layers) * 2 * fast.kv_heads * fast.head_dim * 4)
    from transformers.generation.continuous_batching.utils import (
        find_head_dim,
        find_num_key_value_heads,
    )

    text = lm.model.config.get_text_config()
    return int(text.num_hidden_layers * 2 * find_num_key_value_heads(text)
               * find_head_dim(text) * lm.model.dtype.itemsize)


@dataclass
class _Request:
    """What the forward needs to pick a request's tokens; the sampler is made on the model
    thread at its first token."""

    settings: dict[str, Any]
    seed: int | None
    prompt: list[int]
    max_new: int
    sampler: Any = None


class _Batcher:
    """One ContinuousBatchingManager over one loaded model, and the routing of its outputs
    to the requests' token streams."""

    def __init__(self, lm: LoadedModel, capacity: int) -> None:
        self.lm = lm
        self.requests: dict[int, _Request] = {}  # by slot, read by the forward
        self.steps = [0, 0]  # steps run, most requests picked in one step
        self._queues: dict[str, queue.SimpleQueue[Any]] = {}
        self._ids = itertools.count(1)
        self._closed = threading.Event()
        self._manager = worker.call(lambda: _start_manager(lm, self.requests, self.steps,
                                                           capacity))
        self._dispatcher = threading.Thread(target=self._dispatch, name="openweight-batch-out",
                                            daemon=True)
        self._dispatcher.start()

    def tokens(self, prompt: list[int], max_new: int, options: GenerationOptions,
               cancel: threading.Event) -> Iterator[int]:
        from .engine import resolved_settings

        slot = next(self._ids) % 2**31
        request_id = f"openweight-{slot}"
        box: queue.SimpleQueue[Any] = queue.SimpleQueue()
        manager = self._manager
        submitted = finished = False
        try:
            if cancel.is_set():
                return
            self._queues[request_id] = box
            self.requests[slot] = _Request(resolved_settings(self.lm, options, max_new),
                                           options.seed, prompt, max_new)
            eos = sorted(self.lm.eos_ids) or [-1]
            if manager.add_request(prompt, request_id=request_id, max_new_tokens=max_new,
                                   streaming=True, eos_token_id=eos,
                                   openweight_slot=slot) is None:  # the loop is stopping
                from . import engine

                yield from engine.default_source(self.lm, prompt, max_new, options, cancel)
                return
            submitted = True
            sent = 0
            while True:
                try:
                    out = box.get(timeout=POLL_SECONDS)
                except queue.Empty:
                    if cancel.is_set():
                        return
                    if not manager.is_running():
                        raise GenerationError(f"the batch loop of {self.lm.path.name} stopped "
                                              "before this answer ended") from None
                    continue
                if out.error is not None:
                    finished = True
                    raise GenerationError(f"generation failed in {self.lm.path.name}: "
                                          f"{out.error}")
                for token in out.generated_tokens[sent:]:
                    sent += 1
                    yield int(token)
                if out.is_finished():
                    finished = True
                    return
                if cancel.is_set():
                    return
        finally:
            self._queues.pop(request_id, None)
            self.requests.pop(slot, None)
            if submitted and not finished:
                manager.cancel_request(request_id)  # frees its pages at the next step

    def running(self) -> bool:
        return not self._closed.is_set() and bool(self._manager.is_running())

    def _dispatch(self) -> None:
        """Route each output of the manager to its request's queue."""
        manager = self._manager
        while not self._closed.is_set():
            out = manager.get_result(timeout=0.1)
            if out is None:
                if not manager.is_running():
                    self._closed.wait(0.1)
                continue
            box = self._queues.get(out.request_id)
            if box is not None:
                box.put(out)

    def close(self) -> None:
        self._closed.set()
        with contextlib.suppress(Exception):
            self._manager.stop(block=True, timeout=10, hard_stop=True)
        self._dispatcher.join(timeout=5)


def _start_manager(lm: LoadedModel, requests: dict[int, _Request], steps: list[int],
                   capacity: int) -> Any:
    """Make and start the manager (on the model thread, so its cache is allocated there and
    its loop thread is a daemon like the model thread)."""
    import torch
    from transformers import GenerationConfig
    from transformers.generation.configuration_utils import ContinuousBatchingConfig

    batch_class = _batch_model_class() if lm.fast is not None else _model_batch_class()
    model = batch_class(lm, requests, steps)
    eos = sorted(lm.eos_ids) or [-1]
    generation = GenerationConfig(do_sample=False, eos_token_id=eos, max_new_tokens=256,
                                  pad_token_id=eos[0])
    config = ContinuousBatchingConfig(
        page_size=PAGE_SIZE, num_blocks=capacity // PAGE_SIZE,
        max_batch_tokens=MAX_BATCH_TOKENS, max_requests_per_batch=MAX_REQUESTS,
        max_blocks_per_request=0, use_async_batching=False, use_cuda_graph=False,
        allow_block_sharing=True, auto_switch_to_flash=False,
    )
    manager = model.init_continuous_batching(generation_config=generation,
                                             continuous_batching_config=config)
    # transformers counts the argument rows of the processors it converts itself; ours is
    # already a per-request processor and needs one row (the request's slot)
    manager.logit_processor.tensors_required = 1
    manager.warmup()  # makes the paged cache and the step's buffers, here
    threads = torch.get_num_threads()
    loop = manager._run_generation_loop

    def run(**kwargs: Any) -> None:
        # The loop thread only does bookkeeping; the forward runs on the model thread.
        # One torch thread here keeps it from starting an OpenMP team of its own (a second
        # team makes GNU OpenMP put the model thread's team to sleep after every operation,
        # see worker.py); then the process-wide default goes back to what it was. (The
        # first call settles this thread's lazy OpenMP set-up, which would otherwise apply
        # the process-wide default at its first large operation.)
        torch.get_num_threads()
        torch.set_num_threads(1)
        worker.call(lambda: torch.set_num_threads(threads))
        loop(**kwargs)

    manager._run_generation_loop = run
    manager.start()
    return manager


_CLASSES: dict[str, Any] = {}


def _batch_model_class() -> Any:
    """``_BatchModel``: the batch over the fast path's layers (see ``_batch_classes``)."""
    return _batch_classes()["fast"]


def _model_batch_class() -> Any:
    """``_ModelBatch``: the batch over transformers' own forward (see ``_batch_classes``)."""
    return _batch_classes()["model"]


def _batch_classes() -> dict[str, Any]:
    """The models the manager batches over, defined on first use so that importing this
    module stays light."""
    if _CLASSES:
        return _CLASSES
    import copy
    import types

    import torch
    import torch.nn.functional as F
    from transformers.generation.continuous_batching import ContinuousMixin
    from transformers.generation.continuous_batching.cb_logits_processors import (
        ContinuousBatchingLogitsProcessor,
    )
    from transformers.generation.logits_process import LogitsProcessorList

    from .fast import Sampler, offset_mask

    class _Slots(ContinuousBatchingLogitsProcessor):  # type: ignore[misc]
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

    class _Rows(ContinuousMixin, torch.nn.Module):  # type: ignore[misc]
        """What both batch models share: transformers' paged-attention forward signature,
        run on the model thread, and each request's token picked by its own sampler, handed
        to the manager as a one-hot row."""

        _supports_flash_attn = False
        _step: Any  # the step, run on the model thread: returns the one-hot rows

        def __init__(self, lm: LoadedModel, requests: dict[int, _Request],
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
            return LogitsProcessorList([_Slots()])

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

    class _ModelBatch(_Rows):
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

        def __init__(self, lm: LoadedModel, requests: dict[int, _Request],
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
                attention = _per_request_attention(attention)
            with torch.inference_mode(), _attention(model.config, attention):
                if self._keeps:
                    logits = model(**batch, logits_to_keep=logits_indices).logits[0]
                else:
                    logits = model(**batch).logits[0, logits_indices]
                return self._picked(logits, logits_processor_args)

    class _BatchModel(_Rows):
        """The batch over the fast path's layers behind transformers' paged-attention
        forward signature."""

        def __init__(self, lm: LoadedModel, requests: dict[int, _Request],
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

        def _views(self, cache: Any, layer: int) -> tuple[Any, Any]:
            """One layer's keys and values in the paged cache as [1, kv_heads, tokens,
            head_dim] views (the cache's own [tokens, kv_heads, head_dim] views, turned)."""
            if self._cache is not cache:
                self._cache, self._views_of = cache, {}
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
            fast = self.fast
            if not fast.one_call:
                return {}
            views = [t for li in range(len(fast.layers)) for t in _layer_views(cache, li)]
            width = fast.kv_heads * fast.head_dim
            if any(t.stride() != (width, fast.head_dim, 1) or t.dtype != torch.float32
                   for t in views):
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

    _CLASSES.update(fast=_BatchModel, model=_ModelBatch)
    return _CLASSES


def _per_request_attention(name: str) -> str:
    """The name of an attention implementation that runs transformers' ``name`` (as
    registered in its ``AttentionInterface``) once per request of a paged batch, registered
    on first use."""
    split = _PER_REQUEST + name.replace("|", "_")
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
