"""The CPU as PyTorch sees it: one place for the rules that depend on its kind."""

from __future__ import annotations

__all__ = ["BF16_CPU_CAPABILITIES", "OWN_KERNEL_CPU_CAPABILITIES", "OWN_STEP_CPU_CAPABILITIES",
           "PACKED_CPU_CAPABILITIES", "cpu_capability"]

# PyTorch's CPU kernels compute bf16 natively in their AVX-512 build (bf16, VNNI); its AVX2
# and generic (DEFAULT) builds convert every bf16 value to float32 and back. ARM builds
# (SVE256, or DEFAULT for NEON) are unmeasured here and stay on float32.
BF16_CPU_CAPABILITIES = frozenset({"AVX512"})
# Where PyTorch's packed int8/int4 CPU kernels beat plain float products. Measured decode,
# SmolLM2-135M, 2 threads, on an AVX-512 machine running each kind's kernels
# (ATEN_CPU_CAPABILITY): AVX-512 int4 43, none 26.5 tok/s; AVX2 int4 37, int8 36, none 18;
# the generic kernels (DEFAULT, what PyTorch dispatches with no vector unit it knows) int4
# 5.1, int8 10.7, none 18.8. ARM (DEFAULT with NEON, SVE256) is unmeasured: there
# quantize=auto keeps to none, never slower than itself.
PACKED_CPU_CAPABILITIES = frozenset({"AVX512", "AVX2"})
# Where our own packed products (kernels.py, cpu_kernels.c) replace PyTorch's. Measured,
# `bench_kernels.py`, 2 threads, AVX-512 EPYC running each kind's PyTorch kernels, weights out
# of cache: on AVX2 our int4 product is 2.7-3.3x faster for one token (1B shape 2048x16384:
# 654 vs 1,958 us) and 1.4-1.7x for 64. On AVX-512 the two are even for one token (0.86-1.08x)
# and PyTorch's (bf16 dot products) 1.3-1.5x faster for 64, so PyTorch's stay there.
OWN_KERNEL_CPU_CAPABILITIES = frozenset({"AVX2"})
# Where a decode step's layers run in one call of ours (step_kernel.decode_step) by default:
# where our products run, and on AVX-512, where the step (its products ours, in float32)
# replaces ~30 PyTorch operations a layer for single tokens while prompts keep PyTorch's
# products. Measured, bench_speed.py, SmolLM2-135M, 2 threads: see docs/performance.md.
OWN_STEP_CPU_CAPABILITIES = frozenset({"AVX2", "AVX512"})


def cpu_capability() -> str:
    """The instruction set PyTorch dispatches its CPU kernels for: ``AVX512``, ``AVX2``,
    ``SVE256``, ``DEFAULT``, ... (``ATEN_CPU_CAPABILITY`` lowers it, e.g. to ``avx2``)."""
    import torch

    return str(torch.backends.cpu.get_cpu_capability())
