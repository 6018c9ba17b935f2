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
"""

from __future__ import annotations

import ctypes
import json
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

from ..errors import ModelLoadError

__all__ = ["allocator_returns_memory", "cache_file", "forget_kept", "gguf_file", "load_packed",
           "loads_packed"]


def loads_packed(config: dict[str, Any], device: str, quantize: str) -> bool:
    """Whether a model with this ``config.json`` loads here: on the CPU, a model the fast
    path's families cover, not already quantised by its checkpoint, either quantised or
    kept as a GGUF file (whose weights are dequantised here a tensor at a time too)."""
    from .fast import SUPPORTED_TYPES

    return (device == "cpu"
            and (quantize in ("int8", "int4") or bool(config.get("openweight_gguf")))
            and config.get("model_type") in SUPPORTED_TYPES
            and not config.get("quantization_config"))


# safetensors' dtype names
_DTYPES = {"BF16": "bfloat16", "F16": "float16", "F32": "float32", "F64": "float64",
           "I8": "int8", "U8": "uint8", "I16": "int16", "I32": "int32", "I64": "int64",
           "BOOL": "bool"}


class _Shard:
    """One safetensors file read a tensor at a time with plain reads. (safetensors' own
    reader maps the file, and every page it touched counts against the process until the
    file is closed: the whole checkpoint, by the end of a load.)"""

    def __init__(self, file: Path) -> None:
        self.file = file
        with open(file, "rb") as f:
            size = int.from_bytes(f.read(8), "little")
            if size > file.stat().st_size - 8:  # not safetensors: don't read "size" bytes
                raise ValueError(f"{file.name} is not a safetensors file (its header "
                                 "length is past its end)")
            header = json.loads(f.read(size))
        header.pop("__metadata__", None)
        self.tensors: dict[str, dict[str, Any]] = header
        self.start = 8 + size

    def read(self, name: str) -> Any:
        import torch

        info = self.tensors[name]
        begin, end = info["data_offsets"]
        out = torch.empty(info["shape"], dtype=getattr(torch, _DTYPES[info["dtype"]]))
        raw = out.view(-1).view(torch.uint8).numpy() if out.numel() else bytearray()
        with open(self.file, "rb") as f:
            f.seek(self.start + begin)
            got = f.readinto(raw)
        if got != end - begin:
            raise ModelLoadError(f"{self.file} is truncated: tensor {name} ends at byte "
                                 f"{self.start + end} but the file has "
                                 f"{self.file.stat().st_size}; pull the model again")
        return out


class _Safetensors:
    """A safetensors checkpoint (one file or shards) as a source of tensors by name."""

    def __init__(self, path: Path) -> None:
        files = sorted(path.glob("*.safetensors"))
        index = path / "model.safetensors.index.json"
        if index.exists():
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            files = sorted({path / file for file in weight_map.values()})
        try:
            shards = [_Shard(file) for file in files]
        except (OSError, ValueError, KeyError) as exc:
            raise ModelLoadError(f"cannot read the safetensors header of a file in {path} "
                                 f"({exc}); pull the model again") from exc
        self.shards = {name: shard for shard in shards for name in shard.tensors}
        self.names = set(self.shards)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.shards[name].tensors[name]["shape"])

    def where(self, name: str) -> str:
        return f"{name} in {self.shards[name].file.name}"

    def read(self, name: str) -> Any:
        """The tensor in the dtype it is stored in."""
        return self.shards[name].read(name)

    def groups(self, name: str) -> None:
        """Safetensors weights are never on a 4-bit grid already."""
        return None


def _source(path: Path, model: Any, dtype: Any) -> Any:
    """The model's checkpoint as a tensor source: the GGUF file ``openweight pull`` kept,
    or the safetensors files; None for a GGUF whose architecture is not understood."""
    gguf = gguf_file(path)
    if gguf is None:
        return _Safetensors(path)
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

    config = AutoConfig.from_pretrained(str(path))
    if hasattr(config, "quantization_config"):  # loaded here, not by transformers' quantiser
        del config.quantization_config
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
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
        out_name = _name_of(model, output) + ".weight"
        embed_name = _name_of(model, embed) + ".weight"
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
            if _restore(model, kept, torch_dtype):
                return model.eval()
            model = _empty_model(path, torch_dtype)  # maybe partly filled: start again
        source = _source(path, model, torch_dtype)
        sources = None if source is None else _sources(model, source.names)
        if sources is None:
            return None
        _fill(model, source, sources, torch_dtype, quantize)
    if kept is not None:
        _keep(model, kept, path)
    return model.eval()


# -- the packed cache ----------------------------------------------------------------------

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


def _restore(model: Any, kept: Path, torch_dtype: Any) -> bool:
    """Fill the empty ``model`` from its kept packed form: every Linear layer rebuilt as it
    was packed, every other parameter and buffer of its state read in (a module's own
    packed buffers too, such as gpt-oss's experts). False (model untouched, or only partly
    filled and to be filled again) when the file does not fit it."""
    import torch

    from .quantize import EMBEDDING_PARTS, restore_embedding, restore_linear

    try:
        shard = _Shard(kept)
        embed = _name_of(model, model.get_input_embeddings())
        kept_embed = {part: f"{embed}.{part}" for part in EMBEDDING_PARTS}
        if set(kept_embed.values()) <= set(shard.tensors):  # kept 4-bit
            _put(model, embed, restore_embedding(
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
                _put(model, name, restore_linear(tensors))
            else:  # kept unpacked
                for part, value in tensors.items():
                    _put(model, f"{name}.{part}", torch.nn.Parameter(
                        value.to(torch_dtype), requires_grad=False))
        params = {name for name, _ in model.named_parameters()}
        for name in sorted(state):
            value = shard.read(name)
            _put(model, name, torch.nn.Parameter(value.to(torch_dtype), requires_grad=False)
                 if name in params else value)
    except (OSError, ValueError, KeyError, ModelLoadError):
        return False  # unreadable or not this model's: packed again and rewritten
    return True


def _keep(model: Any, kept: Path, path: Path) -> None:
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


def _name_of(model: Any, module: Any) -> str:
    """The dotted name of ``module`` in ``model``."""
    return str(next(name for name, m in model.named_modules() if m is module))


def _put(model: Any, name: str, value: Any) -> None:
    """Set the module or parameter at dotted ``name`` in ``model`` to ``value``."""
    owner_name, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(owner_name) if owner_name else model, leaf, value)


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
            _put(model, name, int4_linear_from_codes(codes, scale, low, bias))
        else:
            _put(model, name, pack_linear(source.read(found), bias, quantize, torch_dtype,
                                          output_layer=linear is output))
        del grid
    embed = model.get_input_embeddings()
    if quantize != "none" and embed is not None and embed.weight.device.type == "meta":
        name = _name_of(model, embed)
        table = source.groups(check(f"{name}.weight", embed.weight))
        if table is not None:  # a GGUF's 4-bit token embeddings stay 4-bit
            codes, scale, low = table
            _put(model, name, int4_embedding_from_codes(codes, scale, low, torch_dtype))
        del table
    for name, value in list(model.named_parameters()):
        if value.device.type == "meta":  # not a packed layer's bias, read above
            _put(model, name, param(name, value))
    if quantize == "none":
        model.tie_weights()  # a tied output layer shares the embedding again
