"""Loading a Hugging Face format model directory, once per process."""

from __future__ import annotations

import json
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import InvalidRequestError, ModelLoadError
from .prefix_cache import PrefixCache
from .resolve import (
    model_config,
    mxfp4_supported,
    quant_method,
    quantize_and_reason,
    resolve_device,
    resolve_dtype,
)

__all__ = ["LoadedModel", "check_model_dir", "context_length", "eos_ids", "load_model",
           "unload_all"]

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
    quantize: str = "none"
    quantize_reason: str = ""  # why quantize is what it is (auto's reason, or "asked for")
    model_type: str = ""
    harmony_ids: dict[str, int] | None = None
    prefix_cache: PrefixCache = field(default_factory=PrefixCache)
    # the lean CPU decode path (local/fast.py), or None where the model cannot take it
    fast: Any = None
    fast_off_reason: str | None = None
    processor: Any = None  # a vision model's processor (images and text into inputs)

    def summary(self) -> dict[str, str]:
        """What this model runs with, resolved, and why: its device, dtype and quantize
        (with auto's reason), the packed products' kernels, and the decode path."""
        from .kernels import route

        info = {"device": self.device, "dtype": self.dtype, "quantize": self.quantize,
                "quantize_reason": self.quantize_reason}
        if self.device == "cpu" and self.quantize != "none":
            info["kernels"] = route()
        if self.fast is None:
            info["decode"] = f"transformers' generate ({self.fast_off_reason})"
        else:
            info["decode"] = ("the fast path, a token's layers in one call of ours"
                              if self.fast.one_call else "the fast path")
        return info
    # one generation at a time per model: results never depend on what runs beside them
    lock: threading.Lock = field(default_factory=threading.Lock)


_cache: dict[tuple[str, str, str, str], LoadedModel] = {}
_cache_lock = threading.Lock()


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
    from .packed_load import gguf_file

    gguf = gguf_file(path)
    if gguf is not None:
        _check_gguf_weights(gguf)
    weights = sorted(path.glob("*.safetensors"))
    if not weights and gguf is None:
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


def _check_gguf_weights(gguf: Path) -> None:
    from .gguf_source import has_gguf_magic

    try:
        ok = has_gguf_magic(gguf)
    except OSError as exc:
        raise ModelLoadError(f"the model's weights {gguf} cannot be read ({exc}); pull the "
                             "model again") from exc
    if not ok:
        raise ModelLoadError(f"the model's weights {gguf} are not a GGUF file; pull the "
                             "model again")


END_OF_TURN = ("<|eot_id|>", "<|eom_id|>", "<|im_end|>")  # Llama 3.x, ChatML


def eos_ids(model: Any, tokenizer: Any) -> frozenset[int]:
    """Every token that ends the assistant's turn: the generation config's, the tokenizer's,
    and the well-known end-of-turn tokens the vocabulary has."""
    ids: set[int] = set()
    vocab = tokenizer.get_vocab()
    if "<|channel|>" not in vocab:  # in harmony, an end-of-message token is not the end
        ids.update(int(vocab[t]) for t in END_OF_TURN if t in vocab)
    for source in (getattr(model, "generation_config", None), model.config):
        eos = getattr(source, "eos_token_id", None)
        if isinstance(eos, int):
            ids.add(eos)
        elif isinstance(eos, (list, tuple)):
            ids.update(int(i) for i in eos)
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    return frozenset(ids)


def context_length(config: Any, tokenizer: Any) -> int:
    for attr in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    return int(getattr(tokenizer, "model_max_length", 2048))


_notified: set[str] = set()


def _notify_once(message: str) -> None:
    if message not in _notified:
        _notified.add(message)
        print(message, file=sys.stderr, flush=True)


def _harmony_ids(config: Any, tokenizer: Any) -> dict[str, int] | None:
    """gpt-oss models, and any whose tokenizer carries every harmony special token."""
    from ..harmony import harmony_token_ids

    ids = harmony_token_ids(tokenizer)
    if getattr(config, "model_type", "") == "gpt_oss" and ids is None:
        raise ModelLoadError("this gpt-oss model's tokenizer lacks the harmony special tokens")
    return ids


def _mxfp4_plan(config: dict[str, Any], path: Path, dev: str,
                dt: str) -> tuple[bool, dict[str, Any]]:
    """How an MXFP4 checkpoint (gpt-oss) is read here: kept packed (True), repacked to int4
    as it is read (the CPU), or dequantised (the extra ``from_pretrained`` arguments)."""
    from .mxfp4 import cpu_packed_mxfp4

    extra: dict[str, Any] = {}
    if quant_method(config) != "mxfp4":
        return False, extra
    keep_mxfp4, why = mxfp4_supported(dev)
    if cpu_packed_mxfp4(config, dev):  # repacked to int4 as they are read
        _notify_once(f"openweight: {why}; repacking {path.name}'s MXFP4 experts to "
                     "int4 for the CPU (5 bits a weight, a small rounding error: "
                     "see docs/sdk.md, gpt-oss on a CPU)")
    elif not keep_mxfp4:
        from transformers import Mxfp4Config

        extra["quantization_config"] = Mxfp4Config(dequantize=True)
        _notify_once(f"openweight: {why}; dequantising {path.name}'s MXFP4 weights to "
                     f"{dt} (about 4x the memory of MXFP4)")
    return keep_mxfp4, extra


def load_model(
    path: str | Path, device: str | None = None, dtype: str | None = None,
    quantize: str | None = None, packed_cache: Path | None = None,
) -> LoadedModel:
    """Load (or reuse) the model at ``path`` on ``device`` in ``dtype``, maybe quantised
    (``packed_cache``: a directory where a quantised model's packed form is kept between
    loads, see ``packed_load``)."""
    from .fast import FastModel, unsupported_reason
    from .packed_load import allocator_returns_memory

    path = Path(path).expanduser().resolve()
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    check_model_dir(path)
    quant, quant_reason = quantize_and_reason(quantize, dev, path)
    key = (str(path), dev, dt, quant)
    with _cache_lock:
        if key in _cache:
            return _cache[key]
        from transformers import AutoTokenizer

        from ..logs import quiet_libraries
        from .memory import check_fits, estimate_memory

        quiet_libraries()
        config = model_config(path)
        keep_mxfp4, extra = _mxfp4_plan(config, path, dev, dt)
        check_fits(estimate_memory(path, dev, dt, keep_mxfp4=keep_mxfp4, quantize=quant),
                   path.name)
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(path), trust_remote_code=False)
            with allocator_returns_memory():  # the fast path's fused copies free memory too
                model = _weights(path, dev, dt, quant, config, packed_cache, extra)
                fast_off_reason = unsupported_reason(model, dev)
                fast = FastModel(model) if fast_off_reason is None else None
        except (InvalidRequestError, ModelLoadError):
            raise
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
            context_length=context_length(model.config, tokenizer),
            eos_ids=eos_ids(model, tokenizer),
            quantize=quant,
            quantize_reason=quant_reason,
            model_type=str(getattr(model.config, "model_type", "")),
            harmony_ids=_harmony_ids(model.config, tokenizer),
            fast=fast,
            fast_off_reason=fast_off_reason,
        )
        _cache[key] = loaded
        return loaded


def _weights(path: Path, dev: str, dt: str, quant: str, config: dict[str, Any],
             packed_cache: Path | None, extra: dict[str, Any]) -> Any:
    """The model with its weights, on ``dev`` in ``dt``, quantised as ``quant`` says: read
    straight into its packed form where ``packed_load`` (or, for gpt-oss's MXFP4 experts on
    a CPU, ``mxfp4``) can, else the whole model in ``dt`` through transformers (``extra``:
    its further arguments), then packed."""
    import torch
    from transformers import AutoModelForCausalLM

    from .mxfp4 import cpu_packed_mxfp4
    from .packed_load import gguf_file, load_packed, loads_packed
    from .quantize import quantize_model

    model = load_packed(path, dt, quant, packed_cache) if loads_packed(
        config, dev, quant) else None
    if model is None and cpu_packed_mxfp4(config, dev):  # gpt-oss on a CPU
        from .gpt_oss_packed import load_gpt_oss_packed

        model = load_gpt_oss_packed(path, dt, quant, packed_cache)
    if model is None:  # the whole model in dtype, then packed
        gguf = gguf_file(path)
        if gguf is not None:
            extra["gguf_file"] = gguf.name
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=getattr(torch, dt),
                                                     trust_remote_code=False, **extra)
        model.to(dev)
        model.eval()
        quantize_model(model, quant, dev)
    return model


def unload_all() -> None:
    """Forget every cached model (tests, and freeing memory)."""
    with _cache_lock:
        _cache.clear()
