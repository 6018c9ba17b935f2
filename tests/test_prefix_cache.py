"""Multi-turn prefix caching: the KV cache of a shared prefix is reused, bounded, exact."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from openweight import Client
from openweight.local.prefix_cache import MIN_REUSE, PrefixCache


def _conversation(client: Client, turns: int, **options: Any) -> list[str]:
    history: list[dict[str, str]] = [{"role": "system", "content": "You are a test. " * 4}]
    answers = []
    for i in range(turns):
        history.append({"role": "user", "content": f"question {i}: tell me more"})
        answer = client.chat(history, max_tokens=12, temperature=0, **options).text
        history.append({"role": "assistant", "content": answer})
        answers.append(answer)
    return answers


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_greedy_identical_with_and_without_cache(tiny_model: Path, dtype: str) -> None:
    _check_identical(Client(str(tiny_model), dtype=dtype))


@pytest.mark.slow
def test_greedy_identical_on_the_default_model(smollm2_home: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """The real model on its default settings (int4, the fast path)."""
    monkeypatch.setenv("OPENWEIGHT_HOME", str(smollm2_home))
    _check_identical(Client())


def _check_identical(client: Client) -> None:
    lm = client.backend.loaded  # type: ignore[attr-defined]
    lm.prefix_cache.clear()
    hits_before = lm.prefix_cache.hits
    with_cache = _conversation(client, 4)
    assert lm.prefix_cache.hits - hits_before >= 3, "turns 2-4 reuse the earlier turns"
    assert lm.prefix_cache.reused_tokens > 0
    saved = lm.prefix_cache.max_entries
    lm.prefix_cache.max_entries = 0
    lm.prefix_cache.clear()
    try:
        without = _conversation(client, 4)
    finally:
        lm.prefix_cache.max_entries = saved
    assert with_cache == without


def test_stream_and_cancel_leave_a_usable_cache(tiny_model: Path) -> None:
    client = Client(str(tiny_model), dtype="float32")
    messages = [{"role": "user", "content": "a fairly long opening question " * 3}]
    reference = client.chat(messages, max_tokens=20, temperature=0).text
    stream = client.stream(messages, max_tokens=200, temperature=0)
    next(stream)
    stream.close()  # cancelled mid-way: its cache is kept, cropped on reuse
    assert client.chat(messages, max_tokens=20, temperature=0).text == reference
    assert "".join(c.text for c in client.stream(messages, max_tokens=20,
                                                 temperature=0)) == reference


def test_sliding_window_model_still_correct(tiny_gpt_oss: Path) -> None:
    client = Client(str(tiny_gpt_oss), dtype="float32")
    first = _conversation(client, 3)
    lm = client.backend.loaded  # type: ignore[attr-defined]
    saved = lm.prefix_cache.max_entries
    lm.prefix_cache.max_entries = 0
    lm.prefix_cache.clear()
    try:
        assert _conversation(client, 3) == first
    finally:
        lm.prefix_cache.max_entries = saved


class _FakeCache:
    def __init__(self, n: int) -> None:
        self.n = n

    def get_seq_length(self) -> int:
        return self.n

    def crop(self, tokens_to_remove: int) -> None:
        assert tokens_to_remove < 0
        self.n += tokens_to_remove


def test_lru_is_bounded_by_count_and_tokens() -> None:
    cache = PrefixCache(max_entries=3, max_tokens=250)
    for i in range(5):
        cache.put([i] * 100, _FakeCache(100))
    assert len(cache) == 2 and cache.tokens == 200  # the token budget binds first
    cache = PrefixCache(max_entries=2, max_tokens=10_000)
    for i in range(5):
        cache.put([i] * 50, _FakeCache(50))
    assert len(cache) == 2
    assert cache.take([0] * 50) == (None, 0), "the oldest entries were evicted"


def test_take_crops_to_the_common_prefix() -> None:
    cache = PrefixCache(max_entries=4)
    stored = list(range(100))
    cache.put(stored, _FakeCache(100))
    kv, reused = cache.take(list(range(60)) + [999] * 10)
    assert reused == 60 and kv is not None and kv.get_seq_length() == 60
    assert len(cache) == 0, "a taken cache leaves the LRU (the caller extends it)"
    cache.put(stored, _FakeCache(100))
    kv, reused = cache.take(stored)  # the same prompt: keep one token to compute
    assert reused == 99 and kv.get_seq_length() == 99
    cache.put(stored, _FakeCache(100))
    assert cache.take(list(range(MIN_REUSE - 1)) + [-1] * 50) == (None, 0)
