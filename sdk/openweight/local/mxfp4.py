"""gpt-oss on a CPU with its MXFP4 experts kept packed.

The hub's gpt-oss checkpoints store each MoE expert as MXFP4: blocks of 32 e2m1 codes
(4 bits: a sign and a value of {0, .5, 1, 1.5, 2, 3, 4, 6}) sharing one e8m0 scale byte
(2^(byte-127)). transformers has kernels for them on CUDA GPUs only; elsewhere it
dequantises every expert to bf16 (about 42 GB for gpt-oss-20b). Here each block is
repacked, as it is read, into PyTorch's packed int4 CPU kernel (``_weight_int4pack_mm_for_cpu``,
groups of 32 with a bf16 scale and offset each: 5 bits a weight, 12 GB of experts for
gpt-oss-20b), and a token computes only the experts its router picked.

The int4 grid is uniform and e2m1's is not, so the repacking is lossy: each block gets
the affine 16-level grid that minimises its squared error (measured on Gaussian weights
quantised to MXFP4: 6.5% relative RMS error in the weights and about 10% in a MoE layer's
output, against MXFP4's own 11% from the original weights; codes within +-3 are exact). An
exact route (look-up-table dequantisation of the routed experts every step, then a bf16
product) measured 66-76 ms a layer per decode token on 2 threads against 4-7 ms for int4
(``benchmarks/bench_mxfp4.py``): it spends its time in PyTorch's gather kernels.

This module is the format and its repacking; the experts module and the loading are
``gpt_oss_packed.py``.
"""

from __future__ import annotations

import functools
from typing import Any

__all__ = ["FP4_VALUES", "GROUP", "PACKED_BITS_PER_WEIGHT", "cpu_packed_mxfp4", "decode_mxfp4",
           "int4_codes", "repack_mxfp4_int4"]

# the e2m1 value of each 4-bit code: bit 3 the sign (transformers' FP4_VALUES, in order)
FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0,
              -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
GROUP = 32  # values per MXFP4 block, and per int4 group: the two coincide
PACKED_BITS_PER_WEIGHT = 4 + 2 * 16 / GROUP  # int4 code + a bf16 scale and offset a group
ROWS_AT_ONCE = 1024  # rows repacked at a time: the working copies stay small


def cpu_packed_mxfp4(config: Any, device: str) -> bool:
    """Whether a model with this config (``config.json``'s dict, or a transformers config)
    loads with its MXFP4 experts packed for the CPU (``load_gpt_oss_packed``): a gpt-oss
    MXFP4 checkpoint on the CPU."""
    config = config if isinstance(config, dict) else config.to_dict()
    quant = config.get("quantization_config") or {}
    method = quant.get("quant_method") if isinstance(quant, dict) else getattr(
        quant, "quant_method", None)
    return (device == "cpu" and str(method).lower().endswith("mxfp4")
            and config.get("model_type") == "gpt_oss")


def decode_mxfp4(blocks: Any, scales: Any, dtype: Any = None) -> Any:
    """The weights of MXFP4 ``blocks`` (uint8 [..., rows, groups, 16], two codes a byte,
    the low nibble first) and ``scales`` (uint8 [..., rows, groups]) as [..., rows,
    groups * 32] in ``dtype`` (default bfloat16): equal, bit for bit, to transformers'
    dequantisation, transposed (it returns [..., in, out])."""
    import torch

    dtype = dtype or torch.bfloat16
    lut = torch.tensor(FP4_VALUES, dtype=torch.float32)
    codes = torch.stack([blocks & 0x0F, blocks >> 4], dim=-1).flatten(-2).long()
    values = lut[codes] * _pow2(scales)[..., None]
    return values.flatten(-2).to(dtype)


# The int4 grids a block may take, in units of its MXFP4 scale: level q (0..15) is
# offset + step * (q - 8). The 32 (step, offset) pairs (every one exact in bf16) are those a
# greedy search picked from all steps k/16 (k = 8..16) and offsets m/8 (|m| <= 16) for the
# least squared error on Gaussian and Laplace weights quantised to MXFP4: 6.39% relative RMS
# error in code units, against 6.35% with all 297 grids at a tenth of the repacking time.
GRIDS = ((0.75, 0.5), (0.5, 0.5), (0.8125, 0.375), (0.6875, -0.625), (0.5, 0.0),
         (0.75, 0.75), (1.0, 1.125), (0.5625, 1.75), (0.5625, -1.125), (0.6875, 1.375),
         (0.875, -0.375), (0.75, 0.0), (0.5, -1.5), (0.5, 2.0), (0.8125, 0.5), (0.625, 1.5),
         (0.625, -0.875), (0.8125, 0.25), (0.6875, -0.75), (0.6875, 1.25), (0.875, -0.5),
         (1.0, 1.0), (0.625, 1.25), (0.625, -0.625), (0.6875, -0.375), (0.8125, 0.625),
         (0.6875, 1.0), (0.5, -2.0), (0.625, -1.0), (0.625, 1.375), (0.625, 1.625),
         (0.75, 0.25))


@functools.cache
def _grids() -> tuple[Any, Any, Any, Any]:
    """(step [grids], offset [grids], the squared error of each code's nearest level
    [grids, 16], that level [grids, 16]) for ``GRIDS``."""
    import torch

    step = torch.tensor([g[0] for g in GRIDS])
    offset = torch.tensor([g[1] for g in GRIDS])
    levels = offset[:, None] + step[:, None] * (torch.arange(16) - 8)  # [grids, 16]
    values = torch.tensor(FP4_VALUES)
    err = (levels[:, None, :] - values[None, :, None]) ** 2  # [grids, code, level]
    best_err, best_q = err.min(dim=-1)
    return step, offset, best_err, best_q.to(torch.int32)


def _pow2(exponent_bytes: Any) -> Any:
    """2^(byte - 127) for e8m0 scale bytes, in float32 (exact, as transformers' ldexp)."""
    import torch

    return torch.ldexp(torch.ones(exponent_bytes.shape), exponent_bytes.to(torch.int32) - 127)


def int4_codes(blocks: Any, scales: Any) -> tuple[Any, Any, Any]:
    """Each MXFP4 block of ``blocks`` [rows, groups, 16] / ``scales`` [rows, groups] on
    its best affine 16-level grid: the int4 levels q [rows, groups * 32] (int32) and, per
    group, the bf16 step and offset [rows, groups] (the value is (q - 8) * step + offset)."""
    import torch

    step, offset, best_err, best_q = _grids()
    rows, groups = scales.shape
    codes = torch.stack([blocks & 0x0F, blocks >> 4], dim=-1).reshape(rows * groups, GROUP)
    codes = codes.long()
    hist = torch.zeros(rows * groups, 16).scatter_add_(1, codes, torch.ones(codes.shape))
    grid = (hist @ best_err.T).argmin(dim=1)  # the grid of least squared error, per block
    q = torch.gather(best_q[grid], 1, codes)
    unit = _pow2(scales.reshape(-1))
    bf16 = torch.bfloat16
    return (q.reshape(rows, groups * GROUP), (step[grid] * unit).to(bf16).reshape(rows, groups),
            (offset[grid] * unit).to(bf16).reshape(rows, groups))


def repack_mxfp4_int4(blocks: Any, scales: Any) -> tuple[Any, Any]:
    """One expert's MXFP4 weight (``blocks`` uint8 [out, in/32, 16], ``scales`` uint8
    [out, in/32]) in the packed int4 CPU layout: the packed codes (uint8 [out, in/2]) and
    the [in/32, out, 2] bfloat16 step/offset table ``_weight_int4pack_mm_for_cpu`` takes,
    ``ROWS_AT_ONCE`` rows at a time."""
    import torch

    packs, tables = [], []
    for b, s in zip(blocks.split(ROWS_AT_ONCE), scales.split(ROWS_AT_ONCE), strict=True):
        q, step, offset = int4_codes(b, s)
        packs.append(torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1))
        tables.append(torch.stack([step, offset], dim=-1).transpose(0, 1))
    return torch.cat(packs), torch.cat(tables, dim=1).contiguous()
