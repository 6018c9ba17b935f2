"""Packed models kept between loads: where each is kept, writing it, reading it back, forgetting."""

from __future__ import annotations

import json
import os
from contextlib import suppress
from pathlib import Path
from typing import Any

from ..errors import ModelLoadError
from .module_names import name_of, put
from .safetensors_source import Shard

__all__ = ["CACHE_FORMAT", "cache_file", "forget_kept", "keep_packed", "restore_packed"]

CACHE_FORMAT = 4  # 2: int8 scales in bfloat16 whatever the dtype; 3: int4 zeros centred;
# 4: a GGUF's 4-bit token embeddings kept 4-bit


def cache_file(root: Path, path: Path, dtype: str, quantize: str) -> Path:
    """Where the packed form of the model at ``path`` is kept, named by everything that
    decides its bytes: the checkpoint (its files' names, sizes and times), the dtype, the
    quantisation, and the torch version and CPU kernels (the int4 layout is theirs)."""
    import hashlib

    import torch

    from .cpu import cpu_capability

    path = path.resolve()
    files = sorted([*path.glob("*.safetensors"), *path.glob("*.gguf"), path / "config.json"])
    parts = [CACHE_FORMAT, str(path), dtype, quantize, torch.__version__, cpu_capability(),
             *[(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files]]
    key = hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:20]
    return root / f"{path.name}-{quantize}-{dtype}-{key}.safetensors"


def restore_packed(model: Any, kept: Path, torch_dtype: Any) -> bool:
    """Fill the empty ``model`` from its kept packed form: every Linear layer rebuilt as it
    was packed, every other parameter and buffer of its state read in (a module's own
    packed buffers too, such as gpt-oss's experts). False (model untouched, or only partly
    filled and to be filled again) when the file does not fit it."""
    import torch

    from .quantize import EMBEDDING_PARTS, restore_embedding, restore_linear

    try:
        shard = Shard(kept)
        embed = name_of(model, model.get_input_embeddings())
        kept_embed = {part: f"{embed}.{part}" for part in EMBEDDING_PARTS}
        if set(kept_embed.values()) <= set(shard.tensors):  # kept 4-bit
            put(model, embed, restore_embedding(
                {part: shard.read(name) for part, name in kept_embed.items()}, torch_dtype))
        linears = [name for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
        parts = ("weight", "bias", "scales", "scale_zero")
        packed = {f"{name}.{part}" for name in linears for part in parts}
        packed |= set(kept_embed.values())
        state = set(model.state_dict()) - packed
        if not state <= set(shard.tensors) <= state | packed:
            return False
        for name in linears:
            tensors = {part: shard.read(f"{name}.{part}") for part in parts
                       if f"{name}.{part}" in shard.tensors}
            if tensors.keys() & {"scales", "scale_zero"}:
                put(model, name, restore_linear(tensors))
            else:  # kept unpacked
                for part, value in tensors.items():
                    put(model, f"{name}.{part}", torch.nn.Parameter(
                        value.to(torch_dtype), requires_grad=False))
        params = {name for name, _ in model.named_parameters()}
        for name in sorted(state):
            value = shard.read(name)
            put(model, name, torch.nn.Parameter(value.to(torch_dtype), requires_grad=False)
                 if name in params else value)
    except (OSError, ValueError, KeyError, ModelLoadError):
        return False  # unreadable or not this model's: packed again and rewritten
    return True


def keep_packed(model: Any, kept: Path, path: Path) -> None:
    """Write the packed model to ``kept`` (whole, or nothing: a temp file renamed into
    place), replacing what was kept for an older state of the same checkpoint. A cache
    that cannot be written is skipped: it only saves time."""
    from safetensors.torch import save_file

    tmp = kept.with_name(f".{kept.name}.{os.getpid()}.tmp")
    try:
        kept.parent.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp),
                  metadata={"source": str(path.resolve()), "format": str(CACHE_FORMAT)})
        os.replace(tmp, kept)
        forget_kept(kept.parent, path, keep=kept)
    except OSError:
        with suppress(OSError):
            tmp.unlink()


def forget_kept(root: Path, path: Path, keep: Path | None = None) -> None:
    """Delete what ``root`` keeps for the model at ``path``; with ``keep``, only the other
    files for its quantisation and dtype (older states of the checkpoint)."""
    source = str(path.resolve())
    prefix = f"{path.resolve().name}-" if keep is None else keep.name.rsplit("-", 1)[0] + "-"
    for old in root.glob(f"{prefix}*.safetensors"):
        if old != keep and _kept_source(old) == source:
            old.unlink(missing_ok=True)


def _kept_source(file: Path) -> str | None:
    try:
        with open(file, "rb") as f:
            header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
        source = header.get("__metadata__", {}).get("source")
        return source if isinstance(source, str) else None
    except (OSError, ValueError):
        return None
