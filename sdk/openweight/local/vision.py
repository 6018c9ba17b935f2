"""Vision-language models: a model directory whose config has a ``vision_config`` and
whose processor files say how images become its inputs (SmolVLM, Qwen2.5-VL, Gemma 3,
LLaVA...). They load with transformers' ``AutoModelForImageTextToText`` and
``AutoProcessor`` and generate with ``generate`` (no fast path, no quantisation); the
chat template, the answer parsing and the stop rules are the engine's, as for text.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

from ..errors import ModelLoadError
from ..images import ImagePart, decode_image
from ..logs import quiet_libraries
from .loader import LoadedModel, context_length, eos_ids

__all__ = ["PROCESSOR_FILES", "is_vision_dir", "load_vision", "vision_inputs"]

PROCESSOR_FILES = ("processor_config.json", "preprocessor_config.json")


def is_vision_dir(path: Path) -> bool:
    """Does this model directory hold a model that takes images?"""
    try:
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and "vision_config" in config and any(
        (path / name).is_file() for name in PROCESSOR_FILES)


_cache: dict[tuple[str, str, str], LoadedModel] = {}
_cache_lock = threading.Lock()


def load_vision(path: Path, device: str | None = None, dtype: str | None = None) -> LoadedModel:
    """The model (loaded once per process and settings), its processor and what the decode
    loop needs to know about them."""
    from .resolve import resolve_device, resolve_dtype

    path = Path(path).expanduser().resolve()
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    key = (str(path), dev, dt)
    with _cache_lock:
        if key not in _cache:
            _cache[key] = _load(path, dev, dt)
        return _cache[key]


def _load(path: Path, device: str, dtype: str) -> LoadedModel:
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    quiet_libraries()
    try:
        processor = AutoProcessor.from_pretrained(str(path), trust_remote_code=False)
    except (ImportError, AttributeError) as exc:  # a processor built on torchvision
        raise ModelLoadError(f"the image processor of {path.name} cannot be built here "
                             f"({exc}); it needs torchvision: install the build that matches "
                             "your torch (pytorch.org)") from exc
    try:
        model = AutoModelForImageTextToText.from_pretrained(
            str(path), dtype=getattr(torch, dtype), trust_remote_code=False)
    except Exception as exc:
        raise ModelLoadError(f"could not load the vision model in {path}: {exc}") from exc
    model = model.to(device).eval()
    tokenizer = processor.tokenizer
    if getattr(tokenizer, "chat_template", None) is None:
        tokenizer.chat_template = getattr(processor, "chat_template", None)
    if tokenizer.chat_template is None:
        raise ModelLoadError(f"{path} has no chat template; it is not a chat model")
    return LoadedModel(
        model=model, tokenizer=tokenizer, path=path, device=device, dtype=dtype,
        context_length=context_length(model.config.get_text_config(), tokenizer),
        eos_ids=eos_ids(model, tokenizer), quantize="none",
        quantize_reason="a vision model runs as stored",
        model_type=str(getattr(model.config, "model_type", "")),
        fast_off_reason="a vision model: transformers' generate", processor=processor)


def vision_inputs(lm: LoadedModel, text: str, images: list[ImagePart]) -> dict[str, Any]:
    """The model's inputs for a formatted prompt and its images, in order: token ids with
    the image tokens the processor inserts, and pixel values."""
    import torch

    pictures = [decode_image(p, f"image {n + 1}") for n, p in enumerate(images)]
    inputs = lm.processor(text=[text], images=[pictures] if pictures else None,
                          add_special_tokens=False, return_tensors="pt")
    out: dict[str, Any] = {}
    for name, value in inputs.items():
        if isinstance(value, torch.Tensor):
            value = value.to(lm.device)
            if value.is_floating_point():
                value = value.to(lm.model.dtype)
        out[name] = value
    return out
