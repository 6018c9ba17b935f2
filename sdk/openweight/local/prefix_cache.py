"""Reuse of the KV cache of a shared prompt prefix (multi-turn chats, repeated system prompts).

Each entry holds the KV cache of a token sequence (the last prompt plus what was
generated). A new prompt takes the entry with the longest common prefix, crops it to that
prefix and prefills only the rest. Entries are evicted least recently used first, bounded
by count and by total tokens held.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from typing import Any

__all__ = ["MIN_REUSE", "PrefixCache"]

MIN_REUSE = 16  # tokens: below this a reused cache is not worth its bookkeeping
DEFAULT_ENTRIES = 4
DEFAULT_TOKENS = 32_768


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class PrefixCache:
    """A small LRU of KV caches keyed by the token ids they hold (thread-safe)."""

    def __init__(self, max_entries: int | None = None, max_tokens: int = DEFAULT_TOKENS) -> None:
        if max_entries is None:
            max_entries = int(os.environ.get("OPENWEIGHT_PREFIX_CACHE", DEFAULT_ENTRIES))
        self.max_entries = max_entries
        self.max_tokens = max_tokens
        self._entries: OrderedDict[int, tuple[list[int], Any]] = OrderedDict()
        self._next = 0
        self._lock = threading.Lock()
        self.hits = 0
        self.reused_tokens = 0

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def tokens(self) -> int:
        return sum(len(ids) for ids, _ in self._entries.values())

    def take(self, prompt: list[int], kind: type | None = None) -> tuple[Any | None, int]:
        """The cache sharing the longest prefix with ``prompt`` (removed from the LRU: the
        caller extends it), cropped to that prefix, and how many tokens it covers. ``kind``
        limits the search to caches of that class (each decode path reads its own)."""
        with self._lock:
            best, best_len = None, 0
            for key, (ids, held) in self._entries.items():
                if kind is not None and not isinstance(held, kind):
                    continue
                n = _common_prefix(ids, prompt)
                if n > best_len:
                    best, best_len = key, n
            reuse = min(best_len, len(prompt) - 1)  # at least one token must be computed
            if best is None or reuse < MIN_REUSE:
                return None, 0
            ids, cache = self._entries.pop(best)
        try:
            extra = cache.get_seq_length() - reuse
            if extra > 0:
                cache.crop(-extra)
        except (RuntimeError, ValueError):  # e.g. a sliding-window layer past its window
            return None, 0
        self.hits += 1
        self.reused_tokens += reuse
        return cache, reuse

    def put(self, ids: list[int], cache: Any) -> None:
        """Keep ``cache``, which holds the KV of ``ids``; evict to stay within bounds."""
        if self.max_entries <= 0 or len(ids) < MIN_REUSE:
            return
        with self._lock:
            self._entries[self._next] = (ids, cache)
            self._next += 1
            while self._entries and (len(self._entries) > self.max_entries
                                     or self.tokens > self.max_tokens):
                self._entries.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
