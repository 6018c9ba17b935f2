"""The in-process transformers engine (imports torch only when a model is used)."""

from __future__ import annotations

from ..backends import collect  # the one join of a stream, for callers of the engine
from .engine import LocalEngine
from .loader import load_model, unload_all

__all__ = ["LocalEngine", "collect", "load_model", "unload_all"]
