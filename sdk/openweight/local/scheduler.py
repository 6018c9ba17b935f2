"""The continuous batch of a model the fast CPU path takes: our own scheduler.

Requests wait in a queue and are admitted into slots (up to ``max_requests``); every step
takes one token from each request that decodes and a chunk of each prompt still to be read
(up to ``max_tokens`` tokens a step in all), runs them through the fast path's layers at
once (``batch_models.BatchModel``), picks each request's next token with its own sampler
and streams it to the request's iterator. Keys and values live in a paged float32 cache
(``paged_kv.PagedKV``): a request takes pages as its tokens grow and gives them back when it
ends or leaves.

Every step is a job on the model thread (``worker.py``: all torch work runs there, see the
OpenMP pitfall it describes) that queues the next step while there is work, so the
single-stream path's jobs interleave with the batch's steps; the consumers' threads only
wait on their queues. A request that cannot get pages waits: new requests are admitted only
where the pool has pages for their whole prompt, and if no request can take a step (each
needs a page and none is free), the youngest steps out, its keys copied aside, and comes
back first when pages free up, its keys copied back: its answer does not change.

If a step fails, every request in flight gets the error (as a ``GenerationError``) and the
scheduler stops; ``batching.Batching`` starts a new one for later requests.
"""

from __future__ import annotations

import queue
import threading
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from ..errors import GenerationError
from ..options import GenerationOptions
from . import worker
from .batch_models import BatchModel, Request, Row
from .loader import LoadedModel

__all__ = ["Scheduler"]

POLL_SECONDS = 0.05  # how often a waiting consumer looks at its cancel event
_END = object()  # a request's last item: its answer ended


@dataclass(eq=False)
class _Seq:
    """One request in the batch: its tokens so far and where its keys are."""

    request: Request
    ids: list[int]  # the prompt, then each token generated
    out: queue.SimpleQueue[Any] = field(default_factory=queue.SimpleQueue)
    held: list[int] = field(default_factory=list)  # its pages
    done: int = 0  # tokens whose keys are in the cache
    saved: list[Any] | None = None  # its keys while it stepped out
    left: bool = False  # its consumer left: dropped at the next step

    @property
    def decoding(self) -> bool:
        return self.done >= len(self.request.prompt)


class Scheduler:
    """The continuous batch over one loaded model on the fast path: ``pages`` pages of
    ``page`` tokens of KV cache, at most ``max_tokens`` tokens and ``max_requests``
    requests a step."""

    def __init__(self, lm: LoadedModel, pages: int, page: int, max_tokens: int,
                 max_requests: int) -> None:
        self.lm = lm
        self.max_tokens, self.max_requests = max_tokens, max_requests
        self.requests: dict[int, _Seq] = {}  # in flight, by id: the "active" count
        self.steps = [0, 0]  # steps run, most requests given a token in one step
        self.error: BaseException | None = None  # what stopped the batch
        self.model = worker.call(lambda: BatchModel(lm, pages, page))  # its cache there
        self._waiting: deque[_Seq] = deque()
        self._slots: list[_Seq] = []  # admitted, oldest first
        self._eos = frozenset(lm.eos_ids)
        self._lock = threading.Lock()
        self._busy = False  # a step is queued or running
        self._idle = threading.Event()
        self._idle.set()
        self._closed = False

    def tokens(self, prompt: list[int], max_new: int, options: GenerationOptions,
               cancel: threading.Event) -> Iterator[int]:
        """A request's generated tokens, as the batch picks them (a ``TokenSource``'s
        iterator: leaving it, or setting ``cancel``, takes the request out)."""
        from .engine import default_source, resolved_settings

        if cancel.is_set():
            return
        request = Request(resolved_settings(self.lm, options, max_new), options.seed,
                          prompt, max_new)
        seq = _Seq(request, list(prompt))
        if not prompt or not self._add(seq):  # the batch is stopping: the single stream
            yield from default_source(self.lm, prompt, max_new, options, cancel)
            return
        try:
            while (item := self._next(seq, cancel)) is not _END:
                if isinstance(item, BaseException):
                    raise GenerationError(f"generation failed in {self.lm.path.name}: "
                                          f"{item}") from item
                yield item
        finally:
            seq.left = True  # its pages go back at the next step
            self.requests.pop(id(seq), None)

    def running(self) -> bool:
        return not self._closed and self.error is None

    def close(self, timeout: float = 10) -> None:
        """Stop: the requests in flight fail with a GenerationError."""
        with self._lock:
            self._closed = True
            self._wake()  # the next step sees it closed and ends them
        self._idle.wait(timeout)

    def _next(self, seq: _Seq, cancel: threading.Event) -> Any:
        """The request's next item (a token, an exception or ``_END``)."""
        while not cancel.is_set():
            try:
                return seq.out.get(timeout=POLL_SECONDS)
            except queue.Empty:
                continue
        return _END

    def _add(self, seq: _Seq) -> bool:
        with self._lock:
            if not self.running():
                return False
            self.requests[id(seq)] = seq
            self._waiting.append(seq)
            self._wake()
        return True

    def _wake(self) -> None:
        """Queue a step unless one is queued or running (the lock held)."""
        if not self._busy:
            self._busy = True
            self._idle.clear()
            worker.submit(self._step)

    def _step(self) -> None:
        """One step of the batch, on the model thread; it queues the next while there is
        work, and ends every request in flight once the batch stops."""
        try:
            if self.running():
                rows, seqs = self._plan()
                if rows:
                    self._pick(rows, seqs, self.model.logits(rows))
                elif self._slots or self._waiting:
                    raise RuntimeError("the batch could schedule none of its requests")
        except BaseException as exc:  # handed to every request in flight
            self.error = exc
        with self._lock:
            live = self.running()
            self._busy = live and bool(self._slots or self._waiting)
            ended = [] if live else [*self._slots, *self._waiting]
            if not live:
                self._slots, self._waiting = [], deque()
        error = self.error or GenerationError("the batch stopped: the server is stopping")
        for seq in ended:
            self.model.kv.release(seq.held)
            seq.out.put(error)
        if self._busy:
            worker.submit(self._step)
        else:
            self._idle.set()

    def _plan(self) -> tuple[list[Row], list[_Seq]]:
        """The rows of the next step (one per request that takes a step) and their
        requests."""
        kv = self.model.kv
        # 1. the requests whose consumer left go: their pages back to the pool
        for seq in [s for s in self._slots if s.left]:
            kv.release(seq.held)
            self._slots.remove(seq)
        with self._lock:
            self._waiting = deque(s for s in self._waiting if not s.left)
        # 2. decoding requests a token each, then prompts a chunk each, while tokens last
        rows, seqs, budget, starved = [], [], self.max_tokens, False
        for seq in sorted(self._slots, key=lambda s: not s.decoding):
            row = self._row(seq, budget) if budget else None
            if row is not None:
                rows.append(row)
                seqs.append(seq)
                budget -= len(row.tokens)
            starved |= row is None and budget > 0  # it needs a page none is free for
        # 3. waiting requests into free slots, while there are tokens and pages enough
        while budget and not starved and len(self._slots) < self.max_requests \
                and self._waiting and self._fits(self._waiting[0]):
            with self._lock:
                seq = self._waiting.popleft()
            self._slots.append(seq)
            row = self._row(seq, budget)
            assert row is not None  # it fits
            rows.append(row)
            seqs.append(seq)
            budget -= len(row.tokens)
        # 4. no request could take a step: the youngest steps out, and the others go on
        if not rows and len(self._slots) > 1:
            self._step_out(self._slots[-1])
            return self._plan()
        return rows, seqs

    def _row(self, seq: _Seq, budget: int) -> Row | None:
        """The request's tokens for this step, its pages grown to hold them: its next
        token, or as much of its prompt as ``budget`` and the pages allow. None where it
        can have no page."""
        kv = self.model.kv
        prompt = len(seq.request.prompt)
        count = 1 if seq.decoding else min(prompt - seq.done, budget,
                                           kv.room(seq.held) - seq.done)
        if count <= 0 or not kv.grow(seq.held, seq.done + count):
            return None
        end = seq.done + count
        return Row(seq.held, seq.done, seq.ids[seq.done:end], seq.decoding,
                   keep=end == len(seq.ids))

    def _fits(self, seq: _Seq) -> bool:
        """Whether a waiting request can come in: free pages for its whole prompt and a
        token (or, back from stepping out, for its keys and a token), which a request that
        stepped out gets back now."""
        kv = self.model.kv
        if kv.room(seq.held) < max(len(seq.request.prompt), seq.done) + 1:
            return False
        if seq.saved is not None:
            kv.grow(seq.held, seq.done)
            kv.restore(seq.held, seq.saved)
            seq.saved = None
        return True

    def _step_out(self, seq: _Seq) -> None:
        """Lend a request's pages to the others: its keys copied aside, first in the
        queue."""
        kv = self.model.kv
        if seq.done:
            seq.saved = kv.save(seq.held, seq.done)
        kv.release(seq.held)
        self._slots.remove(seq)
        with self._lock:
            self._waiting.appendleft(seq)

    def _pick(self, rows: list[Row], seqs: list[_Seq], logits: Any) -> None:
        """Each kept row's request's next token, by its own sampler: streamed to it, and
        the request ended at its end-of-sequence token or its limit."""
        kept = 0
        for row, seq in zip(rows, seqs, strict=True):
            seq.done = row.end
            if not row.keep:
                continue
            token = seq.request.pick(logits[kept:kept + 1])
            kept += 1
            seq.ids.append(token)
            seq.out.put(token)
            if token in self._eos or len(seq.ids) - len(seq.request.prompt) \
                    >= seq.request.max_new:
                self.model.kv.release(seq.held)
                self._slots.remove(seq)
                seq.out.put(_END)
        self.steps[0] += 1
        self.steps[1] = max(self.steps[1], kept)
