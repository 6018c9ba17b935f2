"""Continuous batching of the models the fast CPU path does not take (GPUs, other
architectures, sliding-window layers, ``OPENWEIGHT_FAST=0``), over transformers'
``ContinuousBatchingManager``: its scheduler, its paged cache, the model's own forward.

VERSION-GATED: this is the one module of openweight that reads transformers' private
internals (the manager's ``_run_generation_loop`` and ``logit_processor.tensors_required``,
a model's ``_supports_logits_to_keep``, ``_get_logits_processor`` and ``_supports_flash_attn``
hooks, a config's ``_attn_implementation``, the cache's ``num_blocks``), as transformers
5.x lays them out. ``unsupported_reason`` checks the installed major version at use: on any
other, batching is off for these models (they run on the single-stream path, with the
reason logged) until this module is checked against it. The fast path's batch
(``scheduler.py``) uses none of this.

Sampling stays per request: each request's own sampler (``batch_models.Request``) picks its
token inside the forward, which hands the manager a one-hot row to take the argmax of.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import queue
import threading
import types
from collections.abc import Iterator
from typing import Any, ClassVar

import torch
import transformers
from transformers.generation.continuous_batching import ContinuousMixin
from transformers.generation.continuous_batching.cb_logits_processors import (
    ContinuousBatchingLogitsProcessor,
)
from transformers.generation.logits_process import LogitsProcessorList

from ..errors import GenerationError
from ..options import GenerationOptions
from . import worker
from .batch_models import Request
from .loader import LoadedModel

__all__ = ["PER_REQUEST", "TESTED_MAJOR", "ManagerBatch", "ModelBatch", "attention_reason",
           "bytes_per_token", "per_request_attention", "unsupported_reason"]

TESTED_MAJOR = 5  # the transformers major version whose internals this module reads
PER_REQUEST = "openweight_per_request_"  # see per_request_attention
POLL_SECONDS = 0.05
# what transformers' continuous batching takes (see attention_reason)
_PAGED_ATTENTION = ("sdpa", "eager", "paged|eager")


def unsupported_reason() -> str | None:
    """Why this module cannot run under the installed transformers (None: it can)."""
    version = transformers.__version__
    if version.split(".")[0] != str(TESTED_MAJOR):
        return (f"batching a model off the fast path is tested on transformers "
                f"{TESTED_MAJOR}.x only, not {version}: it runs on the single-stream path")
    return None


def attention_reason(config: Any, text: Any) -> str | None:
    """Why continuous batching cannot run the model's attention (None: it can)."""
    attention = str(getattr(config, "_attn_implementation", None))
    if attention.startswith(PER_REQUEST):  # the batch's own, set while a step runs
        return None
    flash = attention.startswith("flash_attention")
    if attention not in _PAGED_ATTENTION and not flash:
        return f"continuous batching does not run {attention!r} attention"
    if getattr(text, "attn_logit_softcapping", None) and not flash:
        return f"transformers' paged {attention} attention does not soft-cap attention logits"
    return None


def bytes_per_token(lm: LoadedModel) -> int:
    """Bytes of keys and values one token takes in transformers' paged cache: the model's
    own dtype, every layer counted as a full-attention one."""
    from transformers.generation.continuous_batching.utils import (
        find_head_dim,
        find_num_key_value_heads,
    )

    text = lm.model.config.get_text_config()
    return int(text.num_hidden_layers * 2 * find_num_key_value_heads(text)
               * find_head_dim(text) * lm.model.dtype.itemsize)


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


class ModelBatch(ContinuousMixin, torch.nn.Module):  # type: ignore[misc]
    """The batch over the loaded transformers model itself, behind transformers'
    paged-attention forward signature, run on the model thread: its own forward over the
    rows of all the requests, with the manager's paged cache and attention (sdpa stays
    sdpa, eager becomes paged|eager: one call over all the requests' keys, with a
    block-diagonal mask), on the model's device and dtype.

    On a CPU (``split``) that attention runs once per request instead, over the request's
    own keys and its block of the mask, as generate calls it: one call over everyone's
    keys tiles each row's softmax by where its keys happen to lie, which moves a greedy
    answer by a rounding step with what runs beside it. What is left is the matrix
    products': int8 and int4 ones are row-independent, so an answer is then exactly the
    one it gets alone; a bfloat16 or float32 product of one row can round differently
    from one of several."""

    _supports_flash_attn = False

    def __init__(self, lm: LoadedModel, requests: dict[int, Request],
                 steps: list[int]) -> None:
        super().__init__()
        self.lm, self.requests, self.steps = lm, requests, steps
        self.config = copy.deepcopy(lm.model.config)
        self.generation_config = lm.model.generation_config
        self.device = lm.model.device
        self.dtype = lm.model.dtype  # the paged cache's: as generate's cache
        self.split = self.device.type == "cpu"
        self._keeps = bool(lm.model._supports_logits_to_keep())

    def set_attn_implementation(self, attn_implementation: str) -> None:
        self.config._attn_implementation = attn_implementation

    def _supports_logits_to_keep(self) -> bool:
        return True

    def _get_logits_processor(self, generation_config: Any) -> Any:
        return LogitsProcessorList([Slots()])

    def forward(self, **batch: Any) -> Any:
        return worker.call(lambda: self._step(**batch))

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

    def _picked(self, logits: Any, logits_processor_args: Any) -> Any:
        """Each row's token (``logits``: [rows, vocab], one row per request that gets a
        token this step), as the manager's one-hot output."""
        slots = logits_processor_args[0, : logits.shape[0]].tolist()
        tokens = []
        for i, slot in enumerate(slots):
            request = self.requests.get(slot)  # None: cancelled in this step, any will do
            tokens.append(int(logits[i].max(-1).indices) if request is None
                          else request.pick(logits[i:i + 1]))
        self.steps[0] += 1
        self.steps[1] = max(self.steps[1], len(tokens))
        device = logits.device
        onehot = torch.full((1, len(tokens), max(tokens) + 1), float("-inf"), device=device)
        onehot[0, torch.arange(len(tokens), device=device),
               torch.tensor(tokens, device=device)] = 0.0
        return types.SimpleNamespace(logits=onehot)


class ManagerBatch:
    """One ContinuousBatchingManager over one loaded model (``capacity`` tokens of paged
    cache in pages of ``page``), and the routing of its outputs to the requests' token
    streams."""

    def __init__(self, lm: LoadedModel, capacity: int, page: int, max_tokens: int,
                 max_requests: int) -> None:
        self.lm = lm
        self.requests: dict[int, Request] = {}  # by slot, read by the forward
        self.steps = [0, 0]  # steps run, most requests picked in one step
        self._queues: dict[str, queue.SimpleQueue[Any]] = {}
        self._ids = itertools.count(1)
        self._closed = threading.Event()
        sizes = (capacity // page, page, max_tokens, max_requests)
        self._manager = worker.call(lambda: _start_manager(lm, self.requests, self.steps,
                                                           *sizes))
        self._dispatcher = threading.Thread(target=self._dispatch, name="openweight-batch-out",
                                            daemon=True)
        self._dispatcher.start()

    def tokens(self, prompt: list[int], max_new: int, options: GenerationOptions,
               cancel: threading.Event) -> Iterator[int]:
        """A request's generated tokens as the manager streams them."""
        from .engine import default_source, resolved_settings

        slot = next(self._ids) % 2**31
        request_id = f"openweight-{slot}"
        box: queue.SimpleQueue[Any] = queue.SimpleQueue()
        manager = self._manager
        submitted = finished = False
        try:
            if cancel.is_set():
                return
            self._queues[request_id] = box
            self.requests[slot] = Request(resolved_settings(self.lm, options, max_new),
                                          options.seed, prompt, max_new)
            eos = sorted(self.lm.eos_ids) or [-1]
            if manager.add_request(prompt, request_id=request_id, max_new_tokens=max_new,
                                   streaming=True, eos_token_id=eos,
                                   openweight_slot=slot) is None:  # the loop is stopping
                yield from default_source(self.lm, prompt, max_new, options, cancel)
                return
            submitted = True
            sent = 0
            while not cancel.is_set():
                try:
                    out = box.get(timeout=POLL_SECONDS)
                except queue.Empty:
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
        finally:
            self._queues.pop(request_id, None)
            self.requests.pop(slot, None)
            if submitted and not finished:
                manager.cancel_request(request_id)  # frees its pages at the next step

    def running(self) -> bool:
        return not self._closed.is_set() and bool(self._manager.is_running())

    def cache(self) -> tuple[Any, int]:
        """The dtype of the manager's paged cache and how many pages it holds."""
        cache = self._manager.batch_processor.cache
        return cache.dtype, int(cache.num_blocks)

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
                   pages: int, page: int, max_tokens: int, max_requests: int) -> Any:
    """Make and start the manager (on the model thread, so its cache is allocated there and
    its loop thread is a daemon like the model thread)."""
    from transformers import GenerationConfig
    from transformers.generation.configuration_utils import ContinuousBatchingConfig

    model = ModelBatch(lm, requests, steps)
    eos = sorted(lm.eos_ids) or [-1]
    generation = GenerationConfig(do_sample=False, eos_token_id=eos, max_new_tokens=256,
                                  pad_token_id=eos[0])
    config = ContinuousBatchingConfig(
        page_size=page, num_blocks=pages, max_batch_tokens=max_tokens,
        max_requests_per_batch=max_requests, max_blocks_per_request=0,
        use_async_batching=False, use_cuda_graph=False, allow_block_sharing=True,
        auto_switch_to_flash=False,
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


def per_request_attention(name: str) -> str:
    """The name of an attention implementation that runs transformers' ``name`` (as
    registered in its ``AttentionInterface``) once per request of a paged batch, registered
    on first use."""
    split = PER_REQUEST + name.replace("|", "_")
    from transformers import AttentionInterface
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if split in ALL_ATTENTION_FUNCTIONS:
        return split
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
