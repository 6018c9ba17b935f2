"""Helpers the benchmark scripts share (run them as `python benchmarks/NAME.py`)."""

from __future__ import annotations


def cpu_stall() -> float | None:
    """Seconds that runnable tasks have waited for a CPU, machine-wide (Linux PSI)."""
    try:
        with open("/proc/pressure/cpu") as f:
            some = f.readline().split()
    except OSError:
        return None
    return int(some[-1].split("=")[1]) / 1e6


def cpu_description(threads: int) -> str:
    """The CPU's model name, the kernels PyTorch dispatches on it, oneDNN's limit and the
    thread count. AVX2 figures on an AVX-512 machine need both switches:
    ``ATEN_CPU_CAPABILITY=avx2`` lowers PyTorch's own kernels, ``ONEDNN_MAX_CPU_ISA=AVX2``
    the oneDNN kernels its bfloat16 and float32 products go through (oneDNN picks its own:
    without it, bfloat16 products still run AVX-512's bfloat16 instructions, measured 4x
    faster for 8 rows than on AVX2)."""
    import os
    import platform

    import torch

    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f
                         if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    capability = torch.backends.cpu.get_cpu_capability()
    isa = os.environ.get("ONEDNN_MAX_CPU_ISA")
    if isa:
        onednn = f"; oneDNN up to {isa}"
    elif os.environ.get("ATEN_CPU_CAPABILITY"):
        onednn = "; oneDNN unrestricted (set ONEDNN_MAX_CPU_ISA too for a lower CPU kind)"
    else:
        onednn = ""
    return f"{model}; PyTorch kernels: {capability}{onednn}; {threads} threads each"


def llama_cpp_build(python: str) -> str:
    """The instruction sets the llama.cpp that ``python`` imports was built for (build an
    AVX2 one on an AVX-512 machine with ``CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX512=OFF"``
    in a separate venv)."""
    import subprocess

    out = subprocess.run([python, "-c", "import llama_cpp; print(llama_cpp."
                          "llama_print_system_info().decode())"],
                         capture_output=True, text=True, check=False)
    flags = [part.split("=")[0].strip() for part in out.stdout.split("|")
             if part.strip().endswith("= 1")]
    wanted = [f for f in flags if f.startswith(("AVX", "NEON", "SVE", "SME", "ARM", "FMA"))]
    return ", ".join(wanted) or out.stdout.strip() or out.stderr.strip()[-200:]
