"""A model's submodules and parameters by dotted name: finding one's name, setting one."""

from __future__ import annotations

from typing import Any

__all__ = ["name_of", "put"]


def name_of(model: Any, module: Any) -> str:
    """The dotted name of ``module`` in ``model``."""
    return str(next(name for name, m in model.named_modules() if m is module))


def put(model: Any, name: str, value: Any) -> None:
    """Set the module or parameter at dotted ``name`` in ``model`` to ``value``."""
    owner_name, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(owner_name) if owner_name else model, leaf, value)
