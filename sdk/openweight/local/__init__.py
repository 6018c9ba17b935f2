"""The in-process transformers engine (imports torch only when a model is used)."""

from __future__ import annotations

from pathlib import Path

from ..backends import collect  # the one join of a stream, for callers of the engine
from .embed_config import is_embedding_dir
from .embedder import LocalEmbedder
from .engine import LocalEngine
from .loader import load_model
from .loader import unload_all as _unload_chat_models

__all__ = ["LocalEmbedder", "LocalEngine", "collect", "load_model", "open_local", "unload_all"]


def open_local(path: Path, *, name: str, device: str | None = None, dtype: str | None = None,
               quantize: str | None = None,
               packed_cache: Path | None = None) -> LocalEngine | LocalEmbedder:
    """The engine for a model directory: a ``LocalEmbedder`` for a sentence-transformers
    embedding model (``quantize`` does not apply to it), else a ``LocalEngine``."""
    if is_embedding_dir(path):
        return LocalEmbedder(path, name=name, device=device, dtype=dtype)
    return LocalEngine(path, name=name, device=device, dtype=dtype, quantize=quantize,
                       packed_cache=packed_cache)


def unload_all() -> None:
    """Forget every cached model of this process: chat, vision and embedding models."""
    from . import embedder, vision

    _unload_chat_models()
    for cache, lock in ((vision._cache, vision._cache_lock),
                        (embedder._cache, embedder._cache_lock)):
        with lock:
            cache.clear()
