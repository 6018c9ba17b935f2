"""Reading a safetensors checkpoint a tensor at a time, with plain reads."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..errors import ModelLoadError

__all__ = ["Safetensors", "Shard"]

# safetensors' dtype names
_DTYPES = {"BF16": "bfloat16", "F16": "float16", "F32": "float32", "F64": "float64",
           "I8": "int8", "U8": "uint8", "I16": "int16", "I32": "int32", "I64": "int64",
           "BOOL": "bool"}


class Shard:
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


class Safetensors:
    """A safetensors checkpoint (one file or shards) as a source of tensors by name."""

    def __init__(self, path: Path) -> None:
        files = sorted(path.glob("*.safetensors"))
        index = path / "model.safetensors.index.json"
        if index.exists():
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            files = sorted({path / file for file in weight_map.values()})
        try:
            shards = [Shard(file) for file in files]
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
