"""A GGUF file as the source of a model's weights, read one tensor at a time.

``openweight pull FILE.gguf`` keeps the GGUF file itself in the store (with the config and
tokenizer transformers reads from it); the packed loader (``packed_load``) reads each
tensor from it here. Weights stored on a 4-bit grid of 32-value groups (Q4_0, Q4_1 and
Q4_K: ``code * scale + low`` per group) are handed over as their codes, scales and
offsets, so an int4 load keeps them as they are, with no float detour; every other tensor
is dequantised by the ``gguf`` package a slice of rows at a time, straight into the
model's dtype.

Tensor names and llama.cpp's reordering of the query and key rows are undone with
transformers' own GGUF maps, so a tensor here is the one ``from_pretrained(gguf_file=...)``
would load.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import ModelLoadError

__all__ = ["FOUR_BIT_TYPES", "GGUF_MAGIC", "GgufSource", "gguf_groups", "has_gguf_magic"]

FOUR_BIT_TYPES = ("Q4_0", "Q4_1", "Q4_K")
GGUF_MAGIC = b"GGUF"
ROWS_AT_ONCE = 1024  # rows dequantised at a time: the float32 working copy stays small


def has_gguf_magic(path: Path) -> bool:
    """Whether the file starts as a GGUF file does (``OSError`` if it cannot be read)."""
    with open(path, "rb") as f:
        return f.read(4) == GGUF_MAGIC


def gguf_groups(raw: Any, kind: str, rows: int, cols: int) -> tuple[Any, Any, Any]:
    """The codes [rows, cols] (uint8, 0..15) and per-32-group scale and offset
    [rows, cols / 32] (float32) of ``raw``, the bytes of a ``kind`` tensor (one of
    ``FOUR_BIT_TYPES``): the weight is exactly ``codes * scale + low``, as the ``gguf``
    package dequantises it."""
    import numpy as np

    if kind == "Q4_K":
        from gguf.quants import Q4_K

        blocks = raw.reshape(-1, 144)  # 256 values: d, dmin, 12 bytes of scales, 128 of codes
        d = blocks[:, 0:2].copy().view(np.float16).astype(np.float32)
        dmin = blocks[:, 2:4].copy().view(np.float16).astype(np.float32)
        sc, mn = Q4_K.get_scale_min(blocks[:, 4:16])
        scale = d * sc.astype(np.float32)  # [blocks, 8]: a scale per 32 values
        low = -(dmin * mn.astype(np.float32))
        qs = blocks[:, 16:].reshape(-1, 4, 1, 32) >> np.array([0, 4], np.uint8).reshape(1, 1, 2, 1)
    else:
        size = 18 if kind == "Q4_0" else 20  # fp16 scale (and fp16 minimum), 16 code bytes
        blocks = raw.reshape(-1, size)
        scale = blocks[:, 0:2].copy().view(np.float16).astype(np.float32)
        low = (scale * -8 if kind == "Q4_0"
               else blocks[:, 2:4].copy().view(np.float16).astype(np.float32))
        qs = blocks[:, size - 16:].reshape(-1, 1, 1, 16) >> np.array([0, 4], np.uint8).reshape(
            1, 1, 2, 1)
    codes = (qs & np.uint8(0x0F)).reshape(rows, cols)
    groups = cols // 32
    return codes, scale.reshape(rows, groups), low.reshape(rows, groups)


class GgufSource:
    """The tensors of ``file`` under the names of ``model`` (an empty model of the GGUF's
    architecture), read one at a time; ``dtype`` is the dtype float tensors come in."""

    def __init__(self, file: Path, model: Any, dtype: Any) -> None:
        from gguf import GGUFReader
        from transformers.modeling_gguf_pytorch_utils import (
            TENSOR_PROCESSORS,
            LlamaTensorProcessor,
            TensorProcessor,
            get_gguf_hf_weights_map,
        )

        self.file, self.dtype = file, dtype
        try:
            reader = GGUFReader(str(file))
            arch_field = reader.fields["general.architecture"]
            arch = bytes(arch_field.parts[arch_field.data[0]]).decode()
        except (OSError, ValueError, KeyError, IndexError) as exc:
            raise ModelLoadError(f"{file} is truncated or is not a GGUF file ({exc}); pull "
                                 "the model again") from exc
        processor_class = TENSOR_PROCESSORS.get(arch, TensorProcessor)
        # only processors that rename tensors or reorder whole rows are understood here
        self.supported = processor_class in (TensorProcessor, LlamaTensorProcessor)
        self.tensors: dict[str, Any] = {}
        if not self.supported:
            return
        self._processor = processor_class(config=model.config.to_dict())
        try:
            names = get_gguf_hf_weights_map(model, self._processor)
        except NotImplementedError:
            self.supported = False
            return
        for tensor in reader.tensors:
            if tensor.name in names:
                self.tensors[names[tensor.name]] = tensor
        self._names = {hf: t.name for hf, t in self.tensors.items()}

    @property
    def names(self) -> set[str]:
        return set(self.tensors)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(int(n) for n in reversed(self.tensors[name].shape))

    def kind(self, name: str) -> str:
        return str(self.tensors[name].tensor_type.name)

    def where(self, name: str) -> str:
        return f"{self._names[name]} in {self.file.name}"

    def _raw(self, name: str) -> Any:
        """The tensor's bytes, read with plain reads (a mapped file's touched pages would
        count against the process until it ends)."""
        import numpy as np

        tensor = self.tensors[name]
        raw = np.empty(int(tensor.n_bytes), dtype=np.uint8)
        with open(self.file, "rb") as f:
            f.seek(int(tensor.data_offset))
            got = f.readinto(raw.data)
        if got != raw.size:
            raise ModelLoadError(f"{self.file} is truncated: tensor {self._names[name]} ends "
                                 f"at byte {int(tensor.data_offset) + raw.size} but the file "
                                 f"has {self.file.stat().st_size}; pull the model again")
        return raw

    def _row_order(self, name: str) -> Any:
        """Which GGUF row each of the model's rows is (llama.cpp reorders the rows of the
        query and key projections), found by passing the row numbers through
        transformers' own GGUF tensor processor."""
        import numpy as np

        rows = self.shape(name)[0]
        index = np.arange(rows, dtype=np.float64).reshape(rows, 1)
        order = self._processor.process(weights=index, name=self._names[name]).weights
        return np.asarray(order).reshape(rows).astype(np.int64)

    def read(self, name: str) -> Any:
        """The tensor in ``dtype``, dequantised ``ROWS_AT_ONCE`` rows at a time."""
        import numpy as np
        import torch
        from gguf.quants import dequantize

        tensor, shape = self.tensors[name], self.shape(name)
        raw = self._raw(name)
        out = torch.empty(shape, dtype=self.dtype)
        flat = out.view(shape[0], -1)
        rows = raw.reshape(flat.shape[0], -1)
        try:
            for at in range(0, rows.shape[0], ROWS_AT_ONCE):
                part = dequantize(rows[at:at + ROWS_AT_ONCE], tensor.tensor_type)
                part = np.ascontiguousarray(part, dtype=np.float32)
                flat[at:at + ROWS_AT_ONCE] = torch.from_numpy(part).view(-1, flat.shape[1])
        except NotImplementedError as exc:
            raise ModelLoadError(f"tensor {self.where(name)} is stored as {self.kind(name)}, "
                                 "which this version of the gguf package cannot dequantise; "
                                 "upgrade it (pip install -U gguf) or use a GGUF of another "
                                 "quantisation (Q4_K_M, Q4_1, Q8_0)") from exc
        if len(shape) == 2:
            order = self._row_order(name)
            if not np.array_equal(order, np.arange(shape[0])):
                out = out[torch.from_numpy(order)]
        return out

    def groups(self, name: str) -> tuple[Any, Any, Any] | None:
        """``gguf_groups`` of a 2-D tensor on a 4-bit grid, rows in the model's order, as
        torch tensors; None for any other tensor."""
        import torch

        shape = self.shape(name)
        if self.kind(name) not in FOUR_BIT_TYPES or len(shape) != 2 or shape[1] % 32:
            return None
        codes, scale, low = gguf_groups(self._raw(name), self.kind(name), *shape)
        order = torch.from_numpy(self._row_order(name))
        return (torch.from_numpy(codes)[order], torch.from_numpy(scale)[order],
                torch.from_numpy(low)[order])
