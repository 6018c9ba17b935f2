"""The fast path's token source: a request's tokens, decoded step by step on the model thread."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from .fast import FastCache, FastModel
from .sampler import Sampler

__all__ = ["fast_tokens"]

_END = object()  # put on the queue after the last token


def fast_tokens(lm: Any, prompt: list[int], max_new: int, settings: dict[str, Any],
                processors: list[Any], seed: int | None, cancel: Any) -> Iterator[int]:
    """Generated token ids, decoded on the model thread (see ``worker``) one step per job:
    each step queues the next, so other streams' steps interleave, and the decode never
    waits for this consumer (it reads tokens from a queue while the next one is computed).
    The prompt's KV cache is taken from (and, with what was generated, returned to) the
    model's prefix cache."""
    from . import worker

    steps = _Steps(lm, prompt, max_new, (settings, processors, seed), cancel)
    if worker.on_worker():  # its steps could never run while it waits for them
        raise RuntimeError("fast_tokens cannot be consumed on the model thread")
    if cancel.is_set():
        return
    worker.submit(steps.step)
    yield from steps.tokens()


class _Steps:
    """One request's decode: each step (a job on the model thread) computes a token, hands
    it to the consumer's queue and queues the next step; the last one returns the KV cache
    to the model's prefix cache. ``sampling`` is the ``Sampler``'s settings, processors and
    seed."""

    def __init__(self, lm: Any, prompt: list[int], max_new: int,
                 sampling: tuple[dict[str, Any], list[Any], int | None], cancel: Any) -> None:
        import queue
        import threading

        self.lm, self.prompt, self.max_new = lm, prompt, max_new
        self.sampling, self.cancel = sampling, cancel
        self.fast: FastModel = lm.fast
        self.cache, self.reused = lm.prefix_cache.take(prompt, kind=FastCache)
        self.out: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self.done = threading.Event()  # set once the cache is back in the prefix cache
        self.generated: list[int] = []
        self.sampler: Sampler | None = None

    def tokens(self) -> Iterator[int]:
        """The tokens the steps hand over, as they come (an error they met is raised here);
        closing it cancels the steps and waits for the cache to go back."""
        try:
            while (item := self.out.get()) is not _END:
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            self.cancel.set()  # the next step ends the chain
            self.done.wait(timeout=30)

    def step(self) -> None:
        """One token (the first one runs the prompt), then the next step or the end."""
        from . import worker

        try:
            if self.cancel.is_set():
                self._finish()
                return
            token = self._next()
            self.generated.append(token)
            self.out.put(token)
            if token in self.lm.eos_ids or len(self.generated) >= self.max_new:
                self._finish()
            else:
                worker.submit(self.step)
        except BaseException as exc:  # handed to the consumer, never lost
            self.out.put(exc)
            self._finish()

    def _next(self) -> int:
        import torch

        with torch.inference_mode():
            if self.sampler is None:
                return self._first()
            return self.sampler.pick(self.fast.decode(self.generated[-1], self.cache))

    def _first(self) -> int:
        """The prompt run after what the prefix cache held, and the first token."""
        total = len(self.prompt) + self.max_new
        if self.cache is None:
            self.cache = self.fast.new_cache(total)
        self.cache.reserve(total)
        settings, processors, seed = self.sampling
        self.sampler = Sampler(settings, processors, seed, self.prompt, self.max_new)
        return self.sampler.pick(self.fast.forward(self.prompt[self.reused:], self.cache))

    def _finish(self) -> None:
        if self.cache is not None:
            self.lm.prefix_cache.put((self.prompt + self.generated)[: self.cache.length],
                                     self.cache)
        self.out.put(_END)
        self.done.set()
