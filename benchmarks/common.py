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
    """The CPU's model name, the kernels PyTorch dispatches on it (``ATEN_CPU_CAPABILITY``
    lowers them: ``avx2`` on an AVX-512 machine gives AVX2 figures) and the thread count."""
    import platform

    import torch

    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f
                         if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return (f"{model}; PyTorch kernels: {torch.backends.cpu.get_cpu_capability()}; "
            f"{threads} threads each")


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
