"""Loading a Hugging Face format model directory, once per process."""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import InvalidRequestError, ModelLoadError

__all__ = ["DEVICES", "DTYPES", "LoadedModel", "load_model", "resolve_device", "resolve_dtype"]

DEVICES = ("auto", "cpu", "cuda", "mps")
DTYPES = ("auto", "bfloat16", "float16", "float32")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")


@dataclass
class LoadedModel:
    """A model, its tokenizer and what the decode loop needs to know about them."""

    model: Any
    tokenizer: Any
    path: Path
    device: str
    dtype: str
    context_length: int
    eos_ids: frozenset[int]
    # one generation at a time per model: results never depend on what runs beside them
    lock: threading.Lock = field(default_factory=threading.Lock)


_cache: dict[tuple[str, str, str], LoadedModel] = {}
_cache_lock = threading.Lock()


def resolve_device(device: str | None) -> str:
    """``auto`` picks cuda, then mps, then cpu."""
    device = (device or "auto").lower()
    if device.split(":")[0] not in DEVICES:
        raise InvalidRequestError(
            f"device {device!r} is not supported; use one of {', '.join(DEVICES)}"
        )
    import torch

    if device == "auto":
        if torch.cuda.is_available():
            return "cuda"
        if torch.backends.mps.is_available():
            return "mps"
        return "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise InvalidRequestError("device 'cuda' was asked for but torch sees no CUDA GPU; "
                                  "use device='cpu' or 'auto'")
    if device == "mps" and not torch.backends.mps.is_available():
        raise InvalidRequestError("device 'mps' was asked for but it is not available; "
                                  "use device='cpu' or 'auto'")
    return device


def resolve_dtype(dtype: str | None, device: str) -> str:
    """``auto``: bfloat16 where the device computes it well, else float32."""
    dtype = (dtype or "auto").lower()
    if dtype not in DTYPES:
        raise InvalidRequestError(f"dtype {dtype!r} is not supported; use one of "
                                  f"{', '.join(DTYPES)}")
    if dtype != "auto":
        return dtype
    import torch

    if device.startswith("cuda"):
        return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    if device == "mps":
        return "float16"
    # CPUs with AVX-512 or AMX run bf16 matmuls natively: half the memory traffic of fp32
    return "bfloat16" if torch.backends.cpu.get_cpu_capability() in ("AVX512", "AMX") else "float32"


def check_model_dir(path: Path) -> None:
    """Fail with the name of the file that is missing or corrupt, before torch sees it."""
    if not path.exists():
        raise ModelLoadError(f"model directory {path} does not exist; check the path or "
                             "run `openweight pull` to install a model")
    if not path.is_dir():
        raise ModelLoadError(f"{path} is not a directory; a model is a directory with "
                             "config.json, *.safetensors and tokenizer files")
    config = path / "config.json"
    try:
        json.loads(config.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelLoadError(f"{config} is missing; {path} is not a Hugging Face model "
                             "directory") from None
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"{config} is corrupt ({exc}); pull the model again") from exc
    weights = sorted(path.glob("*.safetensors"))
    if not weights:
        raise ModelLoadError(f"no *.safetensors weights in {path}; pull the model again")
    from safetensors import safe_open

    for w in weights:
        try:
            with safe_open(str(w), framework="pt") as f:
                f.keys()
        except Exception as exc:
            raise ModelLoadError(f"{w} is corrupt ({exc}); pull the model again") from exc
    if not any((path / name).exists() for name in TOKENIZER_FILES):
        raise ModelLoadError(f"no tokenizer in {path} (looked for {', '.join(TOKENIZER_FILES)})")


def _eos_ids(model: Any, tokenizer: Any) -> frozenset[int]:
    ids: set[int] = set()
    for source in (getattr(model, "generation_config", None), model.config):
        eos = getattr(source, "eos_token_id", None)
        if isinstance(eos, int):
            ids.add(eos)
        elif isinstance(eos, (list, tuple)):
            ids.update(int(i) for i in eos)
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    return frozenset(ids)


def _context_length(config: Any, tokenizer: Any) -> int:
    for attr in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    return int(getattr(tokenizer, "model_max_length", 2048))


def load_model(
    path: str | Path, device: str | None = None, dtype: str | None = None
) -> LoadedModel:
    """Load (or reuse) the model at ``path`` on ``device`` in ``dtype``."""
    path = Path(path).expanduser().resolve()
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    key = (str(path), dev, dt)
    with _cache_lock:
        if key in _cache:
            return _cache[key]
        check_model_dir(path)
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(path))
            model = AutoModelForCausalLM.from_pretrained(str(path), dtype=getattr(torch, dt))
            model.to(dev)
            model.eval()
        except Exception as exc:
            raise ModelLoadError(f"could not load the model in {path}: {exc}") from exc
        if getattr(tokenizer, "chat_template", None) is None:
            raise ModelLoadError(f"{path} has no chat template (chat_template.jinja or "
                                 "tokenizer_config.json); it is not a chat model")
        loaded = LoadedModel(
            model=model,
            tokenizer=tokenizer,
            path=path,
            device=dev,
            dtype=dt,
            context_length=_context_length(model.config, tokenizer),
            eos_ids=_eos_ids(model, tokenizer),
        )
        _cache[key] = loaded
        return loaded


def unload_all() -> None:
    """Forget every cached model (tests, and freeing memory)."""
    with _cache_lock:
        _cache.clear()
