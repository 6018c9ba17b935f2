"""The continuous batch's KV cache: float32 keys and values in pages of a fixed number of
tokens, shared by every request of the batch (``scheduler.py``).

Each layer holds one [slots, kv_heads, head_dim] tensor of keys and one of values, a slot a
token: slot ``s`` of page ``p`` is ``p * page + s``. That is the layout the fast path's
one-call step reads (``step_kernel.DecodeStep``: token stride ``kv_heads * head_dim``, head
stride ``head_dim``), so a decode step reads the cache in place, and a request whose pages
follow each other is read in place by attention too (a slice); one whose pages do not is
gathered by its slots. The free pages are a heap, so a request takes the lowest free ones
and its pages follow each other whenever the pool allows.

A request's page list belongs to the scheduler, which grows it as the request's tokens
grow (``grow``) and hands it back when the request ends (``release``). ``save`` and
``restore`` copy a request's keys out and back in, exactly, when the scheduler has to lend
its pages to others (see ``scheduler.py``).
"""

from __future__ import annotations

import heapq
from typing import Any

__all__ = ["PagedKV"]


class PagedKV:
    """``pages`` pages of ``page`` tokens of float32 keys and values for ``layers`` layers,
    allocated (and zeroed) here: make it on the model thread."""

    def __init__(self, layers: int, kv_heads: int, head_dim: int, pages: int,
                 page: int) -> None:
        import torch

        self.page = page
        self.pages = pages
        shape = (pages * page, kv_heads, head_dim)
        self.keys = [torch.zeros(shape) for _ in range(layers)]
        self.values = [torch.zeros(shape) for _ in range(layers)]
        # attention's views of each layer: [1, kv_heads, slots, head_dim]
        self.views = [(k.permute(1, 0, 2).unsqueeze(0), v.permute(1, 0, 2).unsqueeze(0))
                      for k, v in zip(self.keys, self.values, strict=True)]
        self._free = list(range(pages))  # a heap: the lowest free page first
        self._page_slots: dict[int, Any] = {}

    @property
    def free(self) -> int:
        """Pages no request holds."""
        return len(self._free)

    def room(self, held: list[int]) -> int:
        """Tokens a request holding ``held`` could reach with every free page."""
        return (len(held) + len(self._free)) * self.page

    def grow(self, held: list[int], length: int) -> bool:
        """Add free pages to ``held`` until it holds ``length`` tokens; False, taking none,
        where too few are free."""
        need = -(-length // self.page) - len(held)
        if need > len(self._free):
            return False
        held.extend(heapq.heappop(self._free) for _ in range(max(need, 0)))
        return True

    def release(self, held: list[int]) -> None:
        """Give ``held``'s pages back to the pool (``held`` is emptied)."""
        for page in held:
            heapq.heappush(self._free, page)
        held.clear()

    def slot(self, held: list[int], position: int) -> int:
        """The slot of a request's token at ``position``."""
        return held[position // self.page] * self.page + position % self.page

    def slots(self, held: list[int], start: int, end: int) -> Any:
        """The slots (int64 tensor) of a request's tokens at positions [start, end)."""
        import torch

        first, last = start // self.page, -(-end // self.page)
        parts = [self._slots_of(p) for p in held[first:last]]
        every = parts[0] if len(parts) == 1 else torch.cat(parts)
        return every[start - first * self.page:end - first * self.page]

    def place(self, held: list[int], end: int) -> Any:
        """Where a request's first ``end`` tokens lie: the [start, end) of the slots they
        fill where its pages follow each other (read in place), else their slots (read by
        a gather)."""
        used = held[: -(-end // self.page)]
        if used == list(range(used[0], used[0] + len(used))):
            return (used[0] * self.page, used[0] * self.page + end)
        return self.slots(held, 0, end)

    def save(self, held: list[int], length: int) -> list[Any]:
        """Copies of a request's first ``length`` tokens' keys and values, every layer."""
        index = self.slots(held, 0, length)
        return [t.index_select(0, index) for t in (*self.keys, *self.values)]

    def restore(self, held: list[int], saved: list[Any]) -> None:
        """Put what ``save`` copied back, into the pages ``held`` now has."""
        index = self.slots(held, 0, int(saved[0].shape[0]))
        for t, part in zip((*self.keys, *self.values), saved, strict=True):
            t.index_copy_(0, index, part)

    def _slots_of(self, page: int) -> Any:
        import torch

        slots = self._page_slots.get(page)
        if slots is None:
            slots = torch.arange(page * self.page, (page + 1) * self.page)
            self._page_slots[page] = slots
        return slots
