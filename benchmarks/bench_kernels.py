"""The weight-only matrix products a CPU decode step is made of, one kernel route against
another, at the shapes of real models, with the weights out of cache as in a real decode.

    python benchmarks/bench_kernels.py                       # this CPU's kernels
    ATEN_CPU_CAPABILITY=avx2 FBGEMM_ENABLE_INSTRUCTIONS=AVX2 python benchmarks/bench_kernels.py

Routes: PyTorch's packed int4 kernel (``_weight_int4pack_mm_for_cpu``, what ``quantize=int4``
runs on AVX-512) and int8 kernel (``_weight_int8pack_mm``, ``quantize=int8``), both with bf16
activations; openweight's own products of the same packed tensors (``local/kernels.py``,
what AVX2 CPUs run; built and checked as a load would); float32 and bf16 ``F.linear``
(``quantize=none``); and fbgemm's dynamic int8
product (``quantized::linear_dynamic``: int8 weights per row, activations quantised per
call), a candidate. Each shape's weights are copied until they fill ``--megabytes`` and the
copies are used in turn, so every product reads its weights from memory, as a decode step
does. Prints microseconds per product (1 token, and a 64-token prefill chunk) and the
weight bytes read per second.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import cpu_description

# (name, in, out): SmolLM2-135M's fused gate/up and its output layer, Llama-3.2-1B's fused
# gate/up and down, Llama-3.1-8B's fused gate/up
SHAPES = (("135m gate_up", 576, 3072), ("135m output", 576, 49152),
          ("1b gate_up", 2048, 16384), ("1b down", 8192, 2048), ("8b gate_up", 4096, 28672))


def routes(k: int, n: int) -> dict[str, tuple[int, Callable[[], Any], Callable[[Any, Any], Any]]]:
    """route -> (weight bytes, make one weight copy, product of activations and a copy)."""
    import torch
    import torch.nn.functional as F

    def int4() -> Any:
        q = torch.randint(0, 16, (n, k), dtype=torch.int32)
        return (torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1),
                torch.randn(k // 32, n, 2).bfloat16())

    def int8() -> Any:
        return torch.randint(-127, 128, (n, k), dtype=torch.int8), torch.rand(n).bfloat16()

    def dynamic() -> Any:
        w = torch.randn(n, k)
        scales = (w.abs().amax(1) / 127).double()
        zeros = torch.zeros(n, dtype=torch.long)
        qw = torch.quantize_per_channel(w, scales, zeros, 0, torch.qint8)
        return torch.ops.quantized.linear_prepack(qw, None)

    from openweight.local import kernels

    bf16 = torch.bfloat16
    state = kernels._load()  # ours, called directly: whichever products a load would run
    lib, block, threads = state.lib, state.block, torch.get_num_threads()
    own = {} if lib is None or not block else {
        "int4 (ours)": (n * k // 2 + n * k // 8, int4, lambda x, w: kernels._own_int4(
            lib, x.float(), w[0], w[1], block, threads)),
        "int8 (ours)": (n * k, int8, lambda x, w: kernels._own_int8(lib, x.float(), w[0], w[1],
                                                                    threads)),
    }
    return {**own,
        "int4 (packed)": (n * k // 2 + n * k // 8, int4, lambda x, w: torch.ops.aten
                          ._weight_int4pack_mm_for_cpu(x.to(bf16), w[0], 32, w[1])),
        "int8 (packed)": (n * k, int8, lambda x, w: torch._weight_int8pack_mm(
            x.to(bf16), w[0], w[1])),
        "int8 (fbgemm dynamic)": (n * k, dynamic, lambda x, w: torch.ops.quantized
                                  .linear_dynamic(x, w, True)),
        "bf16 F.linear": (2 * n * k, lambda: torch.randn(n, k).to(bf16),
                          lambda x, w: F.linear(x.to(bf16), w)),
        "float32 F.linear": (4 * n * k, lambda: torch.randn(n, k),
                             lambda x, w: F.linear(x, w)),
    }


def timed(product: Callable[[Any, Any], Any], x: Any, weights: list[Any], calls: int) -> float:
    """Microseconds per product, cycling through the weight copies."""
    for w in weights[:2]:
        product(x, w)
    start = time.perf_counter()
    for i in range(calls):
        product(x, weights[i % len(weights)])
    return (time.perf_counter() - start) / calls * 1e6


def main() -> None:
    import torch

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--megabytes", type=int, default=512,
                        help="weight copies per shape and route (more than the CPU's caches)")
    parser.add_argument("--calls", type=int, default=60)
    args = parser.parse_args()
    threads = torch.get_num_threads()
    from openweight.local import kernels

    os.environ.setdefault("OPENWEIGHT_KERNELS", "own")  # measure ours on any x86 CPU kind
    print(f"CPU: {cpu_description(threads)}; fbgemm instructions: "
          f"{os.environ.get('FBGEMM_ENABLE_INSTRUCTIONS', 'all the CPU has')}; "
          f"openweight's kernels: {kernels.route()}")
    print("| shape (in x out) | route | 1 token (us) | weight GB/s | 64 tokens (us) |")
    print("|---|---|---|---|---|")
    torch.manual_seed(0)
    with torch.inference_mode():
        for name, k, n in SHAPES:
            for route, (nbytes, make, product) in routes(k, n).items():
                copies = max(2, args.megabytes * 2**20 // nbytes)
                weights = [make() for _ in range(min(copies, 64))]
                one = timed(product, torch.randn(1, k), weights, args.calls)
                chunk = timed(product, torch.randn(64, k), weights, max(4, args.calls // 8))
                print(f"| {name} ({k} x {n}) | {route} | {one:.0f} | {nbytes / one / 1e3:.1f} "
                      f"| {chunk:.0f} |", flush=True)
                del weights


if __name__ == "__main__":
    main()
