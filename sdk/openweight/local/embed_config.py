"""How a sentence-transformers model directory turns token states into one vector, read
from its own files (``modules.json``, ``1_Pooling/config.json``,
``sentence_bert_config.json``), never guessed.

A directory is an embedding model when its ``modules.json`` has a Pooling module. The
modules understood: Transformer (the weights), Pooling (mean, cls, max, mean of sqrt
length, last token) and Normalize. Anything else (Dense projections, custom code) is a
clear ``ModelLoadError`` naming it. Nothing here imports torch.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import ModelLoadError

__all__ = ["POOLING_MODES", "EmbedConfig", "is_embedding_dir", "read_embed_config"]

MODULES = "modules.json"
POOLING_MODES = ("mean", "cls", "max", "mean_sqrt_len", "lasttoken")
_ST = "sentence_transformers.models."
_KNOWN = {_ST + "Transformer", _ST + "Pooling", _ST + "Normalize"}


@dataclass(frozen=True)
class EmbedConfig:
    """What the embedder needs from a model directory."""

    weights: Path  # the transformer's directory (config.json, weights, tokenizer)
    pooling: str  # one of POOLING_MODES
    normalize: bool
    max_tokens: int | None  # sentence_bert_config's max_seq_length, when it says
    dimensions: int | None  # the pooling config's word_embedding_dimension


def _json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot read {path.name} of the embedding model at "
                             f"{path.parent}: {exc}") from exc


def _modules(path: Path) -> list[dict[str, Any]] | None:
    """The modules.json entries, or None when the directory has none that parses."""
    try:
        data = json.loads((path / MODULES).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(data, list) or not all(isinstance(m, dict) for m in data):
        return None
    return data


def is_embedding_dir(path: Path) -> bool:
    """Does this model directory describe a sentence-transformers embedding model?"""
    modules = _modules(path)
    return modules is not None and any(
        str(m.get("type", "")).endswith(".Pooling") for m in modules)


def _pooling_mode(config: dict[str, Any], where: Path) -> str:
    """The one pooling the config turns on (``pooling_mode_mean_tokens``: ``mean``)."""
    modes = [k.removeprefix("pooling_mode_").removesuffix("_tokens").removesuffix("_token")
             for k, on in config.items() if k.startswith("pooling_mode_") and on is True]
    if isinstance(config.get("pooling_mode"), str):  # newer configs may name it directly
        modes = [config["pooling_mode"]]
    if len(modes) != 1 or modes[0] not in POOLING_MODES:
        raise ModelLoadError(f"{where} asks for pooling {', '.join(modes) or 'none'}; "
                             f"openweight computes exactly one of {', '.join(POOLING_MODES)}")
    return modes[0]


def read_embed_config(path: Path) -> EmbedConfig:
    """The embedding model's recipe; a ModelLoadError for one openweight cannot follow."""
    modules = _modules(path)
    if modules is None:
        raise ModelLoadError(f"{path} has no readable {MODULES}: it is not a "
                             "sentence-transformers embedding model")
    unknown = [str(m.get("type")) for m in modules if m.get("type") not in _KNOWN]
    if unknown:
        raise ModelLoadError(f"the embedding model at {path} uses {', '.join(unknown)}; "
                             "openweight computes Transformer, Pooling and Normalize modules "
                             "only")
    by_type = {str(m["type"]).rsplit(".", 1)[1]: m for m in modules}
    if "Transformer" not in by_type or "Pooling" not in by_type:
        raise ModelLoadError(f"{path}/{MODULES} needs a Transformer and a Pooling module")
    weights = path / str(by_type["Transformer"].get("path") or "")
    pooling_dir = path / str(by_type["Pooling"].get("path") or "")
    pooling = _json(pooling_dir / "config.json")
    if not isinstance(pooling, dict):
        raise ModelLoadError(f"{pooling_dir}/config.json is not a JSON object")
    bert = weights / "sentence_bert_config.json"
    st_config = _json(bert) if bert.is_file() else {}
    max_tokens = st_config.get("max_seq_length") if isinstance(st_config, dict) else None
    dims = pooling.get("word_embedding_dimension")
    return EmbedConfig(
        weights=weights, pooling=_pooling_mode(pooling, pooling_dir),
        normalize="Normalize" in by_type,
        max_tokens=max_tokens if isinstance(max_tokens, int) and max_tokens > 0 else None,
        dimensions=dims if isinstance(dims, int) and dims > 0 else None)
