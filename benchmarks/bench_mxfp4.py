"""gpt-oss's MXFP4 experts on a CPU: each kernel route through ONE gpt-oss-20b-shaped MoE
layer (32 experts, top-4, hidden 2880, intermediate 2880, biases, the clamped SwiGLU), for
one decode token and for a 64-token prefill, with each route's error against the exact
dequantisation. Random weights: Gaussian, quantised to MXFP4 as the OCP spec does.

    python benchmarks/bench_mxfp4.py [--repeat 7] [--tokens 64]
    ATEN_CPU_CAPABILITY=avx2 python benchmarks/bench_mxfp4.py   # PyTorch's AVX2 kernels

Routes:
  bf16        the experts dequantised to bf16 (transformers' CPU path: ~42 GB for 20b)
  lut-exact   MXFP4 kept (4.25 bits); each routed expert decoded per step with a
              (scale byte, code byte) -> two bf16 look-up table, then a bf16 product: exact
  int4        each MXFP4 block refitted to its best affine int4 grid (5 bits a weight),
              PyTorch's packed int4 kernel: lossy (openweight's CPU route)
"""

from __future__ import annotations

import argparse
import functools
import os
import platform
import statistics
import time
from dataclasses import dataclass
from typing import Any

E, TOP_K, HIDDEN, INTER = 32, 4, 2880, 2880
ALPHA, LIMIT = 1.702, 7.0


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def to_mxfp4(w: Any) -> tuple[Any, Any]:
    """OCP MX quantisation of ``w`` [rows, k]: a block's scale is 2^(floor(log2(amax)) - 2),
    its codes the nearest e2m1 values (clamped at 6)."""
    import torch

    rows, k = w.shape
    b = w.reshape(rows, k // 32, 32).float()
    amax = b.abs().amax(-1).clamp(min=1e-30)
    e = (torch.floor(torch.log2(amax)) - 2).to(torch.int32)
    x = b / torch.ldexp(torch.ones(e.shape), e)[..., None]
    grid = torch.tensor([0, 0.5, 1, 1.5, 2, 3, 4, 6])
    code = (x.abs()[..., None] - grid).abs().argmin(-1) + 8 * (x < 0)
    code = code.to(torch.uint8).reshape(rows, k // 32, 16, 2)
    return code[..., 0] | (code[..., 1] << 4), (e + 127).to(torch.uint8)


def gate(gate_up: Any) -> Any:
    import torch

    g, u = gate_up[..., ::2].clamp(max=LIMIT), gate_up[..., 1::2].clamp(-LIMIT, LIMIT)
    return (u + 1) * (g * torch.sigmoid(g * ALPHA))


def moe(x: Any, idx: Any, wts: Any, expert: Any) -> Any:
    """transformers' non-grouped loop: only the experts some token was routed to."""
    import torch

    out = torch.zeros_like(x)
    mask = torch.nn.functional.one_hot(idx, E).permute(2, 1, 0)
    for e in torch.greater(mask.sum(dim=(-1, -2)), 0).nonzero().flatten().tolist():
        pos, tok = torch.where(mask[e])
        y = expert(e, x[tok])
        out.index_add_(0, tok, (y * wts[tok, pos, None]).to(x.dtype))
    return out


def lut_table() -> Any:
    """int32 [256 * 256]: (scale byte << 8 | code byte) -> the byte's two values as bf16
    (the low nibble's in the low half: little-endian, as the weights' order wants)."""
    import torch

    from openweight.local.mxfp4 import FP4_VALUES

    s = torch.arange(256).repeat_interleave(256)
    b = torch.arange(256).repeat(256)
    unit = torch.ldexp(torch.ones(s.shape), s - 127)
    lut = torch.tensor(FP4_VALUES)
    pair = torch.stack([lut[b & 15] * unit, lut[b >> 4] * unit], -1).to(torch.bfloat16)
    return pair.view(torch.int32).reshape(-1)


def timed(fn: Any, repeat: int) -> float:
    fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


SHAPES = {"gate_up_proj": (2 * INTER, HIDDEN), "down_proj": (HIDDEN, INTER)}


@dataclass
class Layer:
    """One layer's experts: MXFP4 (blocks, scales) per expert, biases, exact bf16 weights."""

    mx: dict[str, list[tuple[Any, Any]]]
    bias: dict[str, Any]
    exact: dict[str, Any]


def build_layer() -> Layer:
    """Gaussian weights quantised to MXFP4, and their exact dequantisation (the reference)."""
    import torch

    from openweight.local.mxfp4 import decode_mxfp4

    mx: dict[str, list[tuple[Any, Any]]] = {p: [] for p in SHAPES}
    for proj, (rows, cols) in SHAPES.items():
        for _ in range(E):
            mx[proj].append(to_mxfp4(torch.randn(rows, cols) * 0.02))
    bias = {"gate_up_proj": torch.randn(E, 2 * INTER).bfloat16() * 0.02,
            "down_proj": torch.randn(E, HIDDEN).bfloat16() * 0.02}
    exact = {p: torch.stack([decode_mxfp4(b, s) for b, s in mx[p]]) for p in SHAPES}
    return Layer(mx, bias, exact)


def int4_module(layer: Layer) -> tuple[Any, float]:
    """Our int4 experts module for the layer, and the seconds its repacking took."""
    import torch

    from openweight.local.gpt_oss_packed import PackedGptOssExperts

    module = PackedGptOssExperts(E, HIDDEN, INTER, ALPHA, LIMIT, torch.bfloat16)
    start = time.perf_counter()
    for proj in SHAPES:
        for e, (b, s) in enumerate(layer.mx[proj]):
            module.set_expert(proj, e, b, s)
        getattr(module, f"{proj}_bias").data = layer.bias[proj]
    return module, time.perf_counter() - start


def int4_error(layer: Layer) -> float:
    """The int4 weights' relative RMS error against exact dequantisation, on a few experts."""
    from openweight.local.mxfp4 import int4_codes

    err_num = err_den = 0.0
    for proj in SHAPES:
        for e in range(4):
            q, step, off = int4_codes(*layer.mx[proj][e])
            rows = q.shape[0]
            w = ((q.float() - 8).reshape(rows, -1, 32) * step.float()[..., None]
                 + off.float()[..., None]).reshape(rows, -1)
            ref = layer.exact[proj][e].float()
            err_num += float((w - ref).pow(2).sum())
            err_den += float(ref.pow(2).sum())
    return float((err_num / err_den) ** 0.5)


def routes(layer: Layer, module: Any) -> dict[str, Any]:
    """Each way of computing the layer's experts: (x, indices, weights) -> output."""
    import torch

    table = lut_table()
    mx, bias, exact = layer.mx, layer.bias, layer.exact

    def lut_weight(proj: str, e: int) -> Any:
        b, s = mx[proj][e]
        idx = b.to(torch.int32) | (s.to(torch.int32) << 8)[..., None]
        return table.index_select(0, idx.reshape(-1)).view(torch.bfloat16).reshape(
            b.shape[0], -1)

    def bf16_expert(e: int, x: Any) -> Any:
        h = gate(torch.nn.functional.linear(x, exact["gate_up_proj"][e],
                                            bias["gate_up_proj"][e]))
        return torch.nn.functional.linear(h, exact["down_proj"][e], bias["down_proj"][e])

    def lut_expert(e: int, x: Any) -> Any:
        h = gate(torch.nn.functional.linear(x, lut_weight("gate_up_proj", e),
                                            bias["gate_up_proj"][e]))
        return torch.nn.functional.linear(h, lut_weight("down_proj", e), bias["down_proj"][e])

    assert torch.equal(lut_weight("down_proj", 3), exact["down_proj"][3])  # exact, bit for bit
    return {
        "bf16": lambda x, i, w: moe(x, i, w, bf16_expert),
        "lut-exact": lambda x, i, w: moe(x, i, w, lut_expert),
        "int4": lambda x, i, w: module(x, i, w),
    }


def inputs(n: int) -> tuple[Any, Any, Any]:
    """``n`` tokens' hidden states, their top-k experts and routing weights."""
    import torch

    x = torch.randn(n, HIDDEN).bfloat16()
    logits = torch.randn(n, E)
    top, idx = torch.topk(logits, TOP_K, dim=-1)
    return x, idx, torch.softmax(top, dim=1).bfloat16()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--tokens", type=int, default=64, help="prefill length")
    args = parser.parse_args()
    import torch

    torch.manual_seed(0)
    print(f"cpu: {cpu_model()}; torch {torch.__version__}, capability "
          f"{torch.backends.cpu.get_cpu_capability()}, {torch.get_num_threads()} threads, "
          f"ATEN_CPU_CAPABILITY={os.environ.get('ATEN_CPU_CAPABILITY', '(unset)')}")
    print("building one layer's experts (Gaussian weights -> MXFP4) ...", flush=True)
    layer = build_layer()
    module, repack_s = int4_module(layer)
    error = int4_error(layer)
    print(f"int4 repack: {repack_s:.1f} s for the layer ({repack_s / E:.2f} s an expert)")
    ways = routes(layer, module)
    print(f"\nint4 weights: relative RMS error vs exact dequantisation {error:.4f}")
    for label, n in (("decode, 1 token", 1), (f"prefill, {args.tokens} tokens", args.tokens)):
        x, idx, wts = inputs(n)
        with torch.inference_mode():
            ref = ways["bf16"](x, idx, wts).float()
            print(f"\n{label}:  route        ms/layer   ms/layer/token   output rel. RMS error")
            for name, fn in ways.items():
                ms = timed(functools.partial(fn, x, idx, wts), args.repeat)
                out = fn(x, idx, wts).float()
                err = float((out - ref).norm() / ref.norm())
                print(f"{'':>17}{name:<12} {ms:9.2f} {ms / n:14.2f}   {err:.4f}")
    print("\nreference: llama.cpp decodes gpt-oss-20b at ~3.1 tok/s on 2 threads "
          "(~13 ms per layer per token, attention included)")


if __name__ == "__main__":
    main()
