"""The plugin's saved settings (the default remote server), kept in llm's user dir."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import llm

__all__ = ["CONFIG_FILE", "read_config", "write_config"]

CONFIG_FILE = "openweight.json"


def _config_path() -> Path:
    user_dir: Path = llm.user_dir()  # type: ignore[no-untyped-call]
    return user_dir / CONFIG_FILE


def read_config() -> dict[str, Any]:
    """The plugin's settings (``{"remote": URL}``); an absent or broken file is empty."""
    try:
        data = json.loads(_config_path().read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def write_config(data: dict[str, Any]) -> None:
    _config_path().write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
