"""Continuous batching for the server: concurrent requests share each decode step.

``Batching`` keeps one batch per loaded model, started at its first request, of one of two
kinds:

- for the models the fast CPU path takes, our own scheduler (``scheduler.py``): requests
  admitted into slots, long prompts read in chunks, a paged float32 KV cache
  (``paged_kv.py``), each step run through the fast path's layers (``batch_models.py``:
  generated tokens in one call of ours, prompt chunks one operation at a time, attention
  per request), so a greedy answer is the same token for token whether it was decoded
  alone, beside seven others, or on the single-stream path;
- for every other model (GPUs, other architectures, sliding-window layers,
  ``OPENWEIGHT_FAST=0``), transformers' ``ContinuousBatchingManager`` over the model's own
  forward (``cb_compat.py``, the one module that reads transformers' internals, gated on
  the major version it was checked against).

Sampling stays per request either way: each request gets the single-stream path's own
sampler (temperature, top_p, top_k, min_p, repetition penalty and its own seeded generator).

``Batching.source`` is a ``TokenSource`` (see ``engine.py``): requests it cannot batch (a
json_schema, a model the batch cannot hold, a request longer than the batch cache) go to
the engine's ``default_source`` unchanged.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterator, Sized
from typing import Protocol

from ..options import GenerationOptions
from .loader import LoadedModel

__all__ = ["BATCH_ENV", "Batching", "batching_enabled"]

BATCH_ENV = "OPENWEIGHT_BATCH"  # "0" turns batching off
KV_ENV = "OPENWEIGHT_BATCH_KV_MB"  # memory for the batch's KV cache
DEFAULT_KV_MB = 512  # allocated (and touched) when the batch starts
PAGE_SIZE = 512  # tokens per cache page: a request in one page is read in place
MAX_BATCH_TOKENS = 512  # tokens per step: longer prompts are prefilled in chunks
MAX_REQUESTS = 32  # requests decoded together in one step
log = logging.getLogger("openweight.batching")


def batching_enabled() -> bool:
    return os.environ.get(BATCH_ENV, "1").strip().lower() not in ("0", "false", "no", "off")


class _Batch(Protocol):
    """What ``Batching`` asks of a model's batch (``scheduler.Scheduler`` or
    ``cb_compat.ManagerBatch``)."""

    steps: list[int]  # steps run, most requests given a token in one step

    @property
    def requests(self) -> Sized:  # the requests in flight
        ...

    def tokens(self, prompt: list[int], max_new: int, options: GenerationOptions,
               cancel: threading.Event) -> Iterator[int]: ...

    def running(self) -> bool: ...

    def close(self) -> None: ...


class Batching:
    """The continuous batches of one server: one per loaded model, started on first use.

    ``source`` is the ``TokenSource`` a server hands the engine; ``close`` stops them all.
    """

    def __init__(self, kv_bytes: int | None = None) -> None:
        if kv_bytes is None:
            kv_bytes = int(float(os.environ.get(KV_ENV, DEFAULT_KV_MB)) * 2**20)
        self.kv_bytes = kv_bytes
        self._batchers: dict[int, _Batch] = {}
        self._broken: dict[int, str] = {}  # models whose batch failed to start, and why
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
        """Stop every batch; their requests in flight fail with a GenerationError."""
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

    def _batcher(self, lm: LoadedModel) -> _Batch | None:
        """The model's batch, started now if it has none (or its loop died of an error:
        the requests it held got that error, later ones get a new loop)."""
        key = id(lm)
        with self._lock:
            batcher = self._batchers.get(key)
            if batcher is not None and not batcher.running():
                batcher.close()
                batcher = None
            if batcher is None and not self._closed and key not in self._broken:
                try:
                    batcher = _start(lm, self._capacity(lm))
                except Exception as exc:  # an unsupported transformers version, memory
                    log.warning("openweight: continuous batching is off for %s: %s",
                                lm.path.name, exc)
                    self._broken[key] = f"the batch could not start: {exc}"
                    return None
                self._batchers[key] = batcher
            return batcher


def _start(lm: LoadedModel, capacity: int) -> _Batch:
    """A new batch for the model: our scheduler over the fast path's layers, else
    transformers' manager over the model's own forward."""
    sizes = (PAGE_SIZE, MAX_BATCH_TOKENS, MAX_REQUESTS)
    if lm.fast is not None:
        from .scheduler import Scheduler

        return Scheduler(lm, capacity // PAGE_SIZE, *sizes)
    from .cb_compat import ManagerBatch

    return ManagerBatch(lm, capacity, *sizes)


def _model_reason(lm: LoadedModel) -> str | None:
    """Why the batch cannot hold this model (None: it can). The fast path's layers need
    full attention everywhere; transformers' own forward runs over its paged cache, which
    holds full and sliding-window attention layers, under one of the attention kernels
    continuous batching runs (sdpa, eager, flash), on the transformers version
    ``cb_compat`` was checked against."""
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
    from . import cb_compat

    return cb_compat.unsupported_reason() or cb_compat.attention_reason(config, text)


# what transformers' paged cache takes (see _model_reason)
_PAGED_LAYER_TYPES = ("full_attention", "sliding_attention")


def _bytes_per_token(lm: LoadedModel) -> int:
    """Bytes of keys and values one token takes in the batch's cache, all layers together:
    the fast path's are float32; transformers' paged cache holds the model's own dtype and
    counts every layer as a full-attention one (sliding-window layers hold at most their
    window, so a hybrid model's requests take less)."""
    fast = lm.fast
    if fast is not None:
        return int(len(fast.layers) * 2 * fast.kv_heads * fast.head_dim * 4)
    from .cb_compat import bytes_per_token

    return bytes_per_token(lm)
