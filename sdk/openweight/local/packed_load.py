"""Loading a Llama-style checkpoint straight into its quantised form, one tensor at a time.

transformers' ``from_pretrained`` materialises every weight in the model's dtype and the
quantiser packs them afterwards, so the peak is the whole model in that dtype (float32 on
CPUs without AVX-512 kernels: 4 bytes a weight where int4 keeps about 0.6). Here the model
is built without weights (accelerate's empty init; buffers such as the rotary tables are
kept), every Linear layer is packed from its checkpoint tensor as that tensor is read, and
every other tensor is copied in: the peak is the packed model plus one tensor.

The checkpoint is safetensors files, or the GGUF file ``openweight pull`` kept
(``gguf_source``: 4-bit blocks become int4 layers as they are). Only checkpoints whose
tensor names and shapes are the model's own, one for one, take this path (what
``save_pretrained`` and ``openweight pull`` write for Llama, Qwen2/3 and Mistral); any
other layout loads the usual way.

Safetensors files are read by ``safetensors_source``; the packed form is kept between loads
by ``packed_cache``.
"""

from __future__ import annotations

import ctypes
import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ..errors import ModelLoadError
from .module_names import name_of, put
from .packed_cache import cache_file, keep_packed, restore_packed
from .safetensors_source import Safetensors

__all__ = ["allocator_returns_memory", "gguf_file", "load_packed", "loads_packed"]


def loads_packed(config: dict[str, Any], device: str, quantize: str) -> bool:
    """Whether a model with this ``config.json`` loads here: on the CPU, a model the fast
    path's families cover, not already quantised by its checkpoint, either quantised or
    kept as a GGUF file (whose weights are dequantised here a tensor at a time too)."""
    from .fast import SUPPORTED_TYPES

    return (device == "cpu"
            and (quantize in ("int8", "int4") or bool(config.get("openweight_gguf")))
            and config.get("model_type") in SUPPORTED_TYPES
            and not config.get("quantization_config"))


def _source(path: Path, model: Any, dtype: Any) -> Any:
    """The model's checkpoint as a tensor source: the GGUF file ``openweight pull`` kept,
    or the safetensors files; None for a GGUF whose architecture is not understood."""
    gguf = gguf_file(path)
    if gguf is None:
        return Safetensors(path)
    from .gguf_source import GgufSource

    source = GgufSource(gguf, model, dtype)
    return source if source.supported else None


def gguf_file(path: Path) -> Path | None:
    """The GGUF file a model directory holds its weights in (``openweight pull`` of a
    .gguf file keeps it as it is), or None for a safetensors model."""
    config = path / "config.json"
    try:
        name = json.loads(config.read_text(encoding="utf-8")).get("openweight_gguf")
    except (OSError, ValueError):
        return None
    return path / name if isinstance(name, str) and name else None


def _empty_model(path: Path, dtype: Any) -> Any:
    """The model with its parameters on the meta device (no memory), buffers real."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    config = AutoConfig.from_pretrained(str(path), trust_remote_code=False)
    if hasattr(config, "quantization_config"):  # loaded here, not by transformers' quantiser
        del config.quantization_config
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=False)
    if (path / "generation_config.json").exists():
        model.generation_config = GenerationConfig.from_pretrained(str(path))
    return model


def _sources(model: Any, files: set[str]) -> dict[str, str] | None:
    """Parameter name -> checkpoint tensor name for every parameter, or None when the
    checkpoint's names are not the model's own (a tied output layer reads the embedding)."""
    wanted = {name for name, _ in model.named_parameters(remove_duplicate=False)}
    sources = {name: name for name in wanted if name in files}
    missing = wanted - sources.keys()
    output, embed = model.get_output_embeddings(), model.get_input_embeddings()
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    if tied and output is not None and embed is not None:
        out_name = name_of(model, output) + ".weight"
        embed_name = name_of(model, embed) + ".weight"
        if out_name in missing and embed_name in files:
            sources[out_name] = embed_name
            missing.discard(out_name)
    if missing or set(files) - set(sources.values()):
        return None
    return sources


M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter
MIB = 1 << 20
_returning = 0  # how many loads are inside allocator_returns_memory (they nest)
_returning_lock = threading.Lock()


@contextmanager
def allocator_returns_memory() -> Iterator[None]:
    """While loading, glibc serves every block over 1 MiB from its own mapping, so the
    working copies of one tensor go back to the system when freed rather than leaving holes
    between the packed tensors (measured: a fifth of the peak on a 100M-parameter model, and
    150 MB of a 1B model's 1.1 GB once the fast path has fused its layers). Afterwards the
    threshold is the 32 MiB glibc's own adjustment reaches after any large free, and the
    freed heap is returned. Nested uses change nothing; other C libraries: nothing changes."""
    global _returning
    try:
        libc = ctypes.CDLL(None)
        mallopt, trim = libc.mallopt, libc.malloc_trim
    except (OSError, AttributeError):
        yield
        return
    with _returning_lock:
        _returning += 1
        if _returning == 1:
            mallopt(M_MMAP_THRESHOLD, MIB)
    try:
        yield
    finally:
        with _returning_lock:
            _returning -= 1
            if _returning == 0:
                mallopt(M_MMAP_THRESHOLD, 32 * MIB)
                trim(0)


def load_packed(path: Path, dtype: str, quantize: str,
                cache: Path | None = None) -> Any | None:
    """The model at ``path`` with its Linear layers packed as ``quantize`` (int8 or int4;
    or none, for a GGUF) and every other weight in ``dtype``, read one tensor at a time;
    None when the checkpoint's layout is not the model's own (load it the usual way then).

    With a ``cache`` directory, the packed model is kept there after the first load and
    later loads read it back instead of packing again (packing is most of a load: 11 of
    15 s for a 1B model)."""
    import torch

    torch_dtype = getattr(torch, dtype)
    model = _empty_model(path, torch_dtype)
    kept = None if cache is None or quantize == "none" else cache_file(cache, path, dtype,
                                                                        quantize)
    with allocator_returns_memory():
        if kept is not None and kept.exists():
            if restore_packed(model, kept, torch_dtype):
                return model.eval()
            model = _empty_model(path, torch_dtype)  # maybe partly filled: start again
        source = _source(path, model, torch_dtype)
        sources = None if source is None else _sources(model, source.names)
        if sources is None:
            return None
        _fill(model, source, sources, torch_dtype, quantize)
    if kept is not None:
        keep_packed(model, kept, path)
    return model.eval()


def _checked(source: Any, name: str, shape: tuple[int, ...]) -> str:
    """``name``, once ``source`` is found to hold it in ``shape``."""
    if name not in source.names:
        raise ModelLoadError(f"tensor {name} is missing from the checkpoint; pull the model "
                             "again")
    stored = tuple(source.shape(name))
    if stored != shape:
        raise ModelLoadError(
            f"tensor {source.where(name)} has shape {stored} but the model's config wants "
            f"{shape}; the checkpoint does not match its config.json: pull the model again")
    return name


def _fill(model: Any, source: Any, sources: dict[str, str], torch_dtype: Any,
          quantize: str) -> None:
    """Every parameter of the empty ``model`` read from ``source``: Linear layers packed
    (int4 layers from weights already on a 4-bit grid keep it), or in ``torch_dtype`` for
    ``quantize="none"``."""
    import torch

    from .quantize import (
        int4_embedding_from_codes,
        int4_linear_from_codes,
        pack_linear,
        packs_as_int4,
    )

    def check(name: str, like: Any) -> str:
        """The checkpoint's name for parameter ``name``, once its shape is checked."""
        return _checked(source, sources[name], tuple(like.shape))

    def param(name: str, like: Any) -> Any:
        value = source.read(check(name, like)).to(torch_dtype)
        return torch.nn.Parameter(value, requires_grad=False)

    output = model.get_output_embeddings()
    linears = [(name, module) for name, module in model.named_modules()
               if isinstance(module, torch.nn.Linear)] if quantize != "none" else []
    for name, linear in linears:  # packed from the stored dtype, rounded as in dtype
        found = check(f"{name}.weight", linear.weight)
        bias = None if linear.bias is None else param(f"{name}.bias", linear.bias)
        grid = source.groups(found) if packs_as_int4(
            quantize, tuple(linear.weight.shape), linear is output) else None
        if grid is not None:
            codes, scale, low = grid
            put(model, name, int4_linear_from_codes(codes, scale, low, bias))
        else:
            put(model, name, pack_linear(source.read(found), bias, quantize, torch_dtype,
                                          output_layer=linear is output))
        del grid
    embed = model.get_input_embeddings()
    if quantize != "none" and embed is not None and embed.weight.device.type == "meta":
        name = name_of(model, embed)
        table = source.groups(check(f"{name}.weight", embed.weight))
        if table is not None:  # a GGUF's 4-bit token embeddings stay 4-bit
            codes, scale, low = table
            put(model, name, int4_embedding_from_codes(codes, scale, low, torch_dtype))
        del table
    for name, value in list(model.named_parameters()):
        if value.device.type == "meta":  # not a packed layer's bias, read above
            put(model, name, param(name, value))
    if quantize == "none":
        model.tie_weights()  # a tied output layer shares the embedding again
