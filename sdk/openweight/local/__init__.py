"""The in-process transformers engine (imports torch only when a model is used)."""

from __future__ import annotations

from .engine import LocalEngine, collect
from .loader import load_model, unload_all

__all__ = ["LocalEngine", "collect", "load_model", "unload_all"]
