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
