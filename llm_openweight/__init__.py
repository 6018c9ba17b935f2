"""llm-openweight: open-weight models for `llm`, through the openweight SDK.

Hookimpls only. `llm` imports every plugin on every command (`llm --help`
included), so this module imports nothing heavy: the model classes and the
commands load when their hook is called, and torch only when a model runs.
"""

from __future__ import annotations

from typing import Any

import llm

__all__ = ["register_commands", "register_embedding_models", "register_models"]


@llm.hookimpl
def register_models(register: Any) -> None:
    from .models import register_all

    register_all(register)


@llm.hookimpl
def register_embedding_models(register: Any) -> None:
    from .embeddings import register_all

    register_all(register)


@llm.hookimpl
def register_commands(cli: Any) -> None:
    from .commands import register

    register(cli)
