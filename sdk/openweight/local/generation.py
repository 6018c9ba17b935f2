"""How a local model's tokens are generated: a ``TokenSource`` yields token ids for a
prompt. ``default_source`` picks the fast CPU path where it runs, else transformers'
``generate`` on the model thread; the server's batch is another source (batching.py)."""

from __future__ import annotations

import contextlib
import queue
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from typing import Any

from ..errors import GenerationError
from ..options import GenerationOptions
from . import worker
from .loader import LoadedModel

__all__ = ["TokenSource", "default_source", "generate_source", "inputs_source",
           "resolved_settings", "sampling_settings"]

_DONE = object()

TokenSource = Callable[[LoadedModel, list[int], int, GenerationOptions, threading.Event],
                       Iterator[int]]
"""Yields the token ids generated after ``prompt``: (model, prompt ids, max new tokens,
options, cancel event). It stops by itself after max_new tokens or an end-of-sequence id,
promptly once the event is set, and frees what it holds when closed."""

POLL_SECONDS = 0.5


class _QueueStreamer:
    """A transformers streamer that hands each new token id to the consumer's queue."""

    def __init__(self, out: queue.Queue[object]) -> None:
        self._out = out
        self._prompt_seen = False
        self.generated: list[int] = []

    def put(self, value: Any) -> None:
        if not self._prompt_seen:  # generate() first puts the prompt
            self._prompt_seen = True
            return
        for token in value.reshape(-1).tolist():
            self.generated.append(int(token))
            self._out.put(int(token))

    def end(self) -> None:
        pass


class _Cancelled:
    """A stopping criterion that ends generation once the consumer is gone or satisfied."""

    def __init__(self, event: threading.Event) -> None:
        self._event = event

    def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
        import torch

        return torch.full((input_ids.shape[0],), self._event.is_set(), dtype=torch.bool,
                          device=input_ids.device)


def sampling_settings(lm: LoadedModel, options: GenerationOptions,
                      max_new: int) -> dict[str, Any]:
    """``generate`` keyword arguments for these options: greedy or sampling and its knobs,
    end-of-sequence and padding ids."""
    config = lm.model.generation_config
    kwargs: dict[str, Any] = {
        "max_new_tokens": max_new,
        "min_new_tokens": 0,
        "eos_token_id": sorted(lm.eos_ids) or None,
        "pad_token_id": lm.tokenizer.pad_token_id
        if lm.tokenizer.pad_token_id is not None
        else (min(lm.eos_ids) if lm.eos_ids else 0),
    }
    if options.temperature == 0.0 or (options.temperature is None and not config.do_sample):
        kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None, min_p=None)
    else:
        kwargs.update(do_sample=True)
        for name in ("temperature", "top_p", "top_k", "min_p"):
            value = getattr(options, name)
            if value is not None:
                kwargs[name] = value
        if options.top_k == 0:
            kwargs["top_k"] = None
    if options.repetition_penalty is not None:
        kwargs["repetition_penalty"] = options.repetition_penalty
    return kwargs


def _constraints(lm: LoadedModel, options: GenerationOptions) -> list[Any]:
    if options.json_schema is None:
        return []
    from .constrain import SchemaConstraint, compile_schema

    return [SchemaConstraint(lm, compile_schema(lm, options.json_schema))]


def default_source(lm: LoadedModel, prompt: list[int], max_new: int,
                   options: GenerationOptions, cancel: threading.Event) -> Iterator[int]:
    """The fast CPU path where the model takes it; otherwise transformers' ``generate``.
    A ``generate`` set on the model instance (a hook, a test's scripted generate) wins."""
    if lm.fast is not None and "generate" not in vars(lm.model):
        return _fast_source(lm, prompt, max_new, options, cancel)
    return generate_source(lm, prompt, max_new, options, cancel)


# what ``generate`` samples with when neither the request nor the model's generation
# config sets a knob (transformers' GenerationConfig defaults): the fast path and the batch
# apply the same, so a seeded answer does not depend on the path that decoded it
GENERATE_DEFAULTS: dict[str, Any] = {"temperature": 1.0, "top_k": 50, "top_p": 1.0}


def resolved_settings(lm: LoadedModel, options: GenerationOptions,
                      max_new: int) -> dict[str, Any]:
    """``sampling_settings`` with the knobs left unset filled from the model's generation
    config, as ``generate`` fills them (the fast path has no ``generate`` to do it)."""
    settings = sampling_settings(lm, options, max_new)
    config = lm.model.generation_config
    if settings.get("do_sample"):
        for name in ("temperature", "top_p", "top_k", "min_p"):
            value = getattr(config, name, None)
            settings.setdefault(name, GENERATE_DEFAULTS.get(name) if value is None else value)
    settings.setdefault("repetition_penalty", getattr(config, "repetition_penalty", None))
    return settings


def _fast_source(lm: LoadedModel, prompt: list[int], max_new: int,
                 options: GenerationOptions, cancel: threading.Event) -> Iterator[int]:
    from .fast_stream import fast_tokens

    return fast_tokens(lm, prompt, max_new, resolved_settings(lm, options, max_new),
                       _constraints(lm, options), options.seed, cancel)


def _run_generate(lm: LoadedModel, prompt: list[int], options: GenerationOptions,
                  cancel: threading.Event, tokens: queue.Queue[object],
                  kwargs: dict[str, Any], inputs: dict[str, Any] | None = None) -> None:
    """The model-thread job: ``generate`` with the prefix cache, tokens into ``tokens``;
    with ``inputs`` (a vision prompt: ids and pixels), ``generate`` on those, uncached."""
    import torch
    from transformers import Cache

    try:
        with lm.lock, torch.inference_mode():
            if cancel.is_set():
                return
            if options.seed is not None:
                torch.manual_seed(options.seed)
            if inputs is not None:
                lm.model.generate(**inputs, streamer=_QueueStreamer(tokens),
                                  stopping_criteria=[_Cancelled(cancel)], **kwargs)
                return
            cache, _reused = lm.prefix_cache.take(prompt, kind=Cache)
            if cache is None:
                from transformers import DynamicCache

                cache = DynamicCache(config=lm.model.config)
            ids = torch.tensor([prompt], device=lm.device)
            streamer = _QueueStreamer(tokens)
            lm.model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                streamer=streamer,
                stopping_criteria=[_Cancelled(cancel)],
                cache=cache,
                **kwargs,
            )
            # the cache now holds the prompt and all but the last generated token
            held = (prompt + streamer.generated)[: cache.get_seq_length()]
            lm.prefix_cache.put(held, cache)
    except BaseException as exc:  # handed to the consumer, never lost
        tokens.put(exc)
    finally:
        tokens.put(_DONE)


def _drain(lm: LoadedModel, tokens: queue.Queue[object], job: Future[None],
           cancel: threading.Event) -> Iterator[int]:
    """The consumer's side: tokens as the job makes them; closing stops the job."""
    try:
        while True:
            try:
                item = tokens.get(timeout=POLL_SECONDS)
            except queue.Empty:
                if job.done() and tokens.empty():
                    raise GenerationError("the generation job ended without a "
                                          "result") from None
                continue
            if item is _DONE:
                return
            if isinstance(item, BaseException):
                raise GenerationError(f"generation failed in {lm.path.name}: "
                                      f"{item}") from item
            assert isinstance(item, int)
            yield item
    finally:
        cancel.set()  # generate() stops at its next token
        with contextlib.suppress(Exception):
            job.result(timeout=30)


def generate_source(lm: LoadedModel, prompt: list[int], max_new: int,
                    options: GenerationOptions, cancel: threading.Event,
                    inputs: dict[str, Any] | None = None) -> Iterator[int]:
    """transformers' ``generate`` on the model thread, streaming through a queue (on
    ``inputs`` where the model takes more than ids: see ``inputs_source``)."""
    tokens: queue.Queue[object] = queue.Queue()
    kwargs = sampling_settings(lm, options, max_new)
    processors = _constraints(lm, options)
    if processors:
        kwargs["logits_processor"] = processors

    def generated() -> Iterator[int]:
        job = worker.submit(lambda: _run_generate(lm, prompt, options, cancel, tokens, kwargs,
                                                  inputs))
        yield from _drain(lm, tokens, job, cancel)

    return generated()


def inputs_source(inputs: dict[str, Any]) -> TokenSource:
    """A source for a prompt the model takes as more than token ids (a vision model's
    pixels beside its ids): ``generate`` on the model thread, no prefix cache."""

    def source(lm: LoadedModel, prompt: list[int], max_new: int, options: GenerationOptions,
               cancel: threading.Event) -> Iterator[int]:
        return generate_source(lm, prompt, max_new, options, cancel, inputs)

    return source
