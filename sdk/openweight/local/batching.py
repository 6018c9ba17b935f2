"""Continuous batching for the server: concurrent requests share each decode step.

transformers' ``ContinuousBatchingManager`` does the batching: its scheduler admits
requests, splits long prompts into chunks, gives every request pages of a paged KV cache
(reusing the pages of a shared prefix), and streams each request's tokens as they come.
What this module adds is the model it batches over (``batch_models.py``), a thin
``forward(**paged_attention_args)`` run on the model thread (``worker.py``), one of two:

- ``BatchModel``, for the models the fast CPU path takes, is built from that path's own
  layers (``fast.py``: fused projections, float32 attention). Each row is computed with
  the same operations as the single-stream path: the quantised matrix products are
  row-independent and attention runs per request, so a greedy answer is the same token
  for token whether it was decoded alone, beside seven others, or on the single-stream
  path.
- ``ModelBatch``, for every other model (GPUs, other architectures, sliding-window
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
from typing import TYPE_CHECKING, Any

from ..errors import GenerationError
from ..options import GenerationOptions
from . import worker
from .loader import LoadedModel

if TYPE_CHECKING:
    from .batch_models import Request

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
    from .batch_models import PER_REQUEST

    if attention.startswith(PER_REQUEST):  # the batch's own, set while a step runs
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


class _Batcher:
    """One ContinuousBatchingManager over one loaded model, and the routing of its outputs
    to the requests' token streams."""

    def __init__(self, lm: LoadedModel, capacity: int) -> None:
        self.lm = lm
        self.requests: dict[int, Request] = {}  # by slot, read by the forward
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
            from .batch_models import Request

            self.requests[slot] = Request(resolved_settings(self.lm, options, max_new),
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


def _start_manager(lm: LoadedModel, requests: dict[int, Request], steps: list[int],
                   capacity: int) -> Any:
    """Make and start the manager (on the model thread, so its cache is allocated there and
    its loop thread is a daemon like the model thread)."""
    import torch
    from transformers import GenerationConfig
    from transformers.generation.configuration_utils import ContinuousBatchingConfig

    from .batch_models import BatchModel, ModelBatch

    batch_class = BatchModel if lm.fast is not None else ModelBatch
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
