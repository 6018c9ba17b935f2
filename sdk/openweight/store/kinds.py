"""Which models chat (``chat``; ``vision``: chat that takes images too) and which make
vectors (``embedding``), and the default of each."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import OpenWeightError
from .catalog import CATALOG, DEFAULT_EMBEDDING_MODEL, DEFAULT_MODEL
from .registry import read_registry

__all__ = ["KINDS", "checked_kind", "default_embedding_model", "defaults_of",
           "embedding_model_names", "kind_of"]


def default_embedding_model() -> str:
    """The model ``embed`` uses when none is named: an embedding model made the default
    with `openweight default`, else all-minilm-l6-v2."""
    value = read_registry().get("default_embedding")
    return value if isinstance(value, str) else DEFAULT_EMBEDDING_MODEL


KINDS = ("chat", "vision", "embedding")


def defaults_of(registry: dict[str, Any]) -> dict[str, str]:
    """The default model of each kind, from one registry read (vision models are chat
    models, and share the chat default)."""
    chat = registry.get("default") or DEFAULT_MODEL
    return {"chat": chat, "vision": chat,
            "embedding": registry.get("default_embedding") or DEFAULT_EMBEDDING_MODEL}


def kind_of(name: str, rec: dict[str, Any] | None) -> str:
    """``chat``, ``vision`` or ``embedding``: as recorded at pull, else as the catalog
    says."""
    entry = CATALOG.get(name)
    kind = (rec or {}).get("kind") or (entry.kind if entry else None)
    return kind if kind in KINDS else "chat"


def embedding_model_names() -> list[str]:
    """Installed embedding models, then catalog ones not installed (one registry read)."""
    try:
        installed = read_registry()["models"]
    except OpenWeightError:
        installed = {}  # a broken registry must not break every llm command
    names = sorted(n for n, r in installed.items() if kind_of(n, r) == "embedding")
    return names + [e.name for e in CATALOG.values()
                    if e.kind == "embedding" and e.name not in installed]


def checked_kind(path: Path) -> str:
    """``embedding`` for a sentence-transformers directory whose recipe openweight can
    follow (else a ModelLoadError before anything is registered), ``vision`` for a model
    with an image processor, otherwise ``chat``."""
    from ..local.embed_config import is_embedding_dir, read_embed_config
    from ..local.vision import is_vision_dir

    if is_embedding_dir(path):
        read_embed_config(path)
        return "embedding"
    return "vision" if is_vision_dir(path) else "chat"
