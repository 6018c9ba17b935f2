"""What a load resolves to for this machine and model: the device, the dtype and the
quantisation (``auto`` made concrete, with the reason), from the model's config alone."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..errors import InvalidRequestError
from ..settings import check_device, check_dtype, check_quantize
from .cpu import BF16_CPU_CAPABILITIES, PACKED_CPU_CAPABILITIES, cpu_capability

__all__ = ["auto_quantize", "model_config", "mxfp4_supported", "quant_method",
           "quantize_and_reason", "resolve_device", "resolve_dtype", "resolve_quantize",
           "source_bits"]


def resolve_device(device: str | None) -> str:
    """``auto`` picks cuda, then mps, then cpu."""
    device = check_device(device) or "auto"
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


def resolve_dtype(dtype: str | None, device: str, capability: str | None = None) -> str:
    """``auto``: bfloat16 where the device computes it well, else float32. ``capability``
    stands in for this CPU's (``cpu_capability()``), to decide for another kind of CPU."""
    dtype = check_dtype(dtype) or "auto"
    if dtype != "auto":
        return dtype
    import torch

    if device.startswith("cuda"):
        return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    if device == "mps":
        return "float16"
    # half the memory traffic of fp32 where the kernels compute it natively
    cap = (capability or cpu_capability()).upper()
    return "bfloat16" if cap in BF16_CPU_CAPABILITIES else "float32"


def model_config(path: Path) -> dict[str, Any]:
    """The model directory's config.json (check_model_dir has checked that it parses)."""
    config: dict[str, Any] = json.loads((path / "config.json").read_text(encoding="utf-8"))
    return config


def source_bits(path: Path) -> int | None:
    """Bits per weight of the file the model was converted from (a GGUF's quantisation,
    recorded by ``openweight pull``), or None when it came as full-precision weights."""
    config = model_config(path)
    value = config.get("openweight_source_bits")
    return int(value) if isinstance(value, int | float) else None


def resolve_quantize(quantize: str | None, device: str, path: Path,
                     capability: str | None = None) -> str:
    """``quantize`` checked, with ``auto`` (the default) resolved by ``auto_quantize``."""
    return quantize_and_reason(quantize, device, path, capability)[0]


def quantize_and_reason(quantize: str | None, device: str, path: Path,
                        capability: str | None = None) -> tuple[str, str]:
    """``resolve_quantize``'s choice and why (``auto_quantize``'s reason, or "asked for")."""
    quant = check_quantize(quantize) or "auto"
    return (quant, "asked for") if quant != "auto" else auto_quantize(device, path, capability)


def auto_quantize(device: str, path: Path, capability: str | None = None) -> tuple[str, str]:
    """What ``quantize=auto`` picks for the model at ``path`` on ``device``, and why: on a
    CPU whose packed kernels are fast (``PACKED_CPU_CAPABILITIES``), Llama-style models get
    int4 when their weights came from a 4-bit GGUF (nothing more is lost) and int8
    otherwise; on other CPUs none, unless only the packed form fits in memory. gpt-oss's
    attention and output layers are int8 beside its packed MXFP4 experts on every CPU
    (memory decides there). Elsewhere none. ``capability`` stands in for this CPU's."""
    from .fast import SUPPORTED_TYPES
    from .mxfp4 import cpu_packed_mxfp4

    config = model_config(path)
    if cpu_packed_mxfp4(config, device):
        return "int8", ("gpt-oss on a CPU: its MXFP4 experts are packed to int4 and its "
                        "attention and output layers to int8, to fit in memory")
    if device != "cpu":
        return "none", f"on {device} the weights stay unpacked (the GPU has the bandwidth)"
    kind = config.get("model_type")
    if kind not in SUPPORTED_TYPES:
        return "none", f"model type {kind!r} has no packed CPU path"
    bits = source_bits(path)
    packed, why = ("int4", f"its weights came from a {bits}-bit GGUF: int4 keeps them as they "
                   "are") if bits is not None and bits <= 4 else (
        "int8", "from full-precision weights int8 per row loses least")
    cap = (capability or cpu_capability()).upper()
    if cap in PACKED_CPU_CAPABILITIES:
        return packed, f"{cap} CPU, whose packed kernels are fast; {why}"
    from .memory import estimate_memory

    dtype = resolve_dtype("auto", device, cap)
    if estimate_memory(path, device, dtype, quantize="none").fits:
        return "none", (f"{cap} CPU: PyTorch's packed kernels are slower than plain products "
                        "here (or unmeasured), and the model fits unpacked")
    return packed, (f"{cap} CPU: PyTorch's packed kernels are slow here, but only the packed "
                    f"form fits in memory; {why}")


def quant_method(config: dict[str, Any]) -> str | None:
    quant = config.get("quantization_config") or {}
    return quant.get("quant_method") if isinstance(quant, dict) else None


def mxfp4_supported(device: str) -> tuple[bool, str]:
    """Whether gpt-oss's MXFP4 weights can stay packed on ``device``, and if not, why."""
    if not device.startswith("cuda"):
        return False, f"MXFP4 kernels run on CUDA GPUs, not on {device}"
    import torch
    from transformers.utils import is_kernels_available, is_triton_available

    if torch.cuda.get_device_capability() < (7, 5):
        return False, "MXFP4 needs a GPU of compute capability 7.5 or newer"
    if not is_triton_available("3.4.0"):
        return False, "MXFP4 needs triton >= 3.4 (pip install triton)"
    if not is_kernels_available():
        return False, "MXFP4 needs the kernels package (pip install kernels)"
    return True, "MXFP4 kernels available"
