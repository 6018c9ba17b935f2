"""The packed weights' matrix products: PyTorch's kernels, or our own where they are faster.

Every int4 and int8 product of a packed Linear layer (``quantize``), of the fast path's
fused layers (``fast``) and of gpt-oss's packed experts (``mxfp4``) runs through
``int4_mm`` and ``int8_mm`` here, so one place decides which kernel runs.

On CPUs whose PyTorch kernels are the slow ones (``cpu.OWN_KERNEL_CPU_CAPABILITIES``),
our own C kernels (``cpu_kernels.c``) run instead: they read the very tensors PyTorch
packed (nothing is repacked or held twice) and compute in float32. They are compiled with
the system's C compiler once per machine, into the user's cache directory, and checked on
first use against products computed from known codes. The int4 products take their
activations as int16 (a scale per group of 32: within 2^-15 of each group's largest, where
PyTorch's kernels round them to bfloat16's 2^-8), so they run on integer multiply-adds,
16 products an instruction, and a row's sums are the same whether it is computed alone or
beside other tokens; where there is no compiler, the
build fails, or the check disagrees (a PyTorch whose packed layout changed), PyTorch's
kernels run and ``route()`` says why. ``OPENWEIGHT_KERNELS`` chooses: ``auto`` (the
default: ours where they are the faster ones), ``own`` (ours on any x86 CPU with AVX2, for
measuring and testing), ``pytorch``.

A decode step's layers can run in one call of ours (``step_kernel.decode_step``, which
loads its library through ``_load`` here): where our products run, and on AVX-512
(``cpu.OWN_STEP_CPU_CAPABILITIES``), where PyTorch's products stay for everything else
(prompts, the output layer) and the step is what makes single tokens fast.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .cpu import OWN_KERNEL_CPU_CAPABILITIES, OWN_STEP_CPU_CAPABILITIES, cpu_capability

__all__ = ["INT4_BLOCK_ROWS", "INT4_GROUP", "KERNEL_CHOICES", "int4_mm", "int8_mm",
           "kernel_dir", "route"]

INT4_GROUP = 32  # weights per int4 group (one scale and zero each)
SOURCE = Path(__file__).with_name("cpu_kernels.c")
FLAGS = ("-O3", "-mavx2", "-mfma", "-fopenmp", "-shared", "-fPIC")
BUILD_TIMEOUT = 120  # seconds
# rows per block of PyTorch's packed int4 CPU layout, by the kind it was packed for
INT4_BLOCK_ROWS = {"AVX512": 64, "AVX2": 32}
KERNEL_CHOICES = ("auto", "own", "pytorch")  # OPENWEIGHT_KERNELS

_lock = threading.Lock()


@dataclass(frozen=True)
class _Kernels:
    """What this process runs, decided once: our library (None: PyTorch's kernels only),
    the int4 layout's block rows it reads (0: none), whether it computes the packed
    products too (or only the one-call decode step), and why."""

    lib: Any
    block: int
    products: bool
    route: str


_state: _Kernels | None = None


def route() -> str:
    """Which kernels compute the packed products and decode steps in this process, and why."""
    return _load().route


def _prepared(x: Any, dtype: Any) -> Any:
    """``x`` in ``dtype`` and contiguous, as the kernels want (no-op calls skipped: each
    costs a dispatch, and a decode step makes hundreds)."""
    if x.dtype != dtype:
        x = x.to(dtype)
    return x if x.is_contiguous() else x.contiguous()


def int4_mm(x: Any, weight: Any, scale_zero: Any) -> Any:
    """``x`` [tokens, in] times a packed int4 weight ([groups, out, 2] bfloat16
    ``scale_zero``, contiguous), in ``x``'s dtype."""
    import torch

    state = _load()
    lib, block = state.lib, state.block
    rows = int(scale_zero.shape[1])
    if lib is None or not state.products or not block or rows % block:
        out = torch.ops.aten._weight_int4pack_mm_for_cpu(
            _prepared(x, torch.bfloat16), weight, INT4_GROUP, scale_zero)
        return out if out.dtype == x.dtype else out.to(x.dtype)
    out = _own_int4(lib, _prepared(x, torch.float32), weight, scale_zero, block,
                    torch.get_num_threads())
    return out if x.dtype == torch.float32 else out.to(x.dtype)


def int8_mm(x: Any, weight: Any, scales: Any) -> Any:
    """``x`` [tokens, in] times a per-row int8 weight [out, in] with bfloat16 ``scales``
    [out], in ``x``'s dtype."""
    import torch

    state = _load()
    lib = state.lib
    if lib is None or not state.products:
        out = torch._weight_int8pack_mm(_prepared(x, scales.dtype), weight, scales)
        return out if out.dtype == x.dtype else out.to(x.dtype)
    out = _own_int8(lib, _prepared(x, torch.float32), weight, scales, torch.get_num_threads())
    return out if x.dtype == torch.float32 else out.to(x.dtype)


def kernel_dir() -> Path:
    """Where the compiled kernels are kept: a per-machine cache, apart from the model
    store (``OPENWEIGHT_KERNEL_DIR`` moves it)."""
    env = os.environ.get("OPENWEIGHT_KERNEL_DIR")
    if env:
        return Path(env).expanduser().absolute()
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("openweight", appauthor=False)) / "kernels"


def _load() -> _Kernels:
    global _state
    if _state is None:
        with _lock:
            if _state is None:
                _state = _open()
    return _state


def _open() -> _Kernels:
    """What runs in this process (see ``_Kernels``), decided once."""
    capability = cpu_capability()
    theirs = "PyTorch's packed kernels"
    choice = os.environ.get("OPENWEIGHT_KERNELS", "auto").strip().lower() or "auto"
    if choice not in KERNEL_CHOICES:
        return _Kernels(None, 0, False, f"{theirs} (OPENWEIGHT_KERNELS={choice!r} is not one "
                                        f"of {', '.join(KERNEL_CHOICES)})")
    if choice == "pytorch":
        return _Kernels(None, 0, False, f"{theirs} (OPENWEIGHT_KERNELS=pytorch)")
    products = choice == "own" or capability in OWN_KERNEL_CPU_CAPABILITIES
    if not products and capability not in OWN_STEP_CPU_CAPABILITIES:
        return _Kernels(None, 0, False, f"{theirs} (the faster ones on {capability} CPUs)")
    try:
        lib = _bind(ctypes.CDLL(str(_build())))
    except (OSError, RuntimeError) as exc:
        return _Kernels(None, 0, False, f"{theirs} (ours did not build: {exc})")
    block = INT4_BLOCK_ROWS.get(capability, 0)
    wrong = _check(lib, block)
    if wrong:
        return _Kernels(None, 0, False, f"{theirs} (ours disagreed with them: {wrong})")
    if not products:
        return _Kernels(lib, block, False, f"{theirs} for the products (the faster ones on "
                        f"{capability} CPUs); a decode step's layers in one call of "
                        "openweight's own")
    why = "OPENWEIGHT_KERNELS=own" if choice == "own" else "PyTorch's are slower there"
    int4 = "" if block else f"; int4 by PyTorch's, whose {capability} layout ours cannot read"
    return _Kernels(lib, block, True,
                    f"openweight's own kernels on this {capability} CPU ({why}{int4})")


def _build() -> Path:
    """The compiled library, built now if this machine has none for this source."""
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not compiler:
        raise RuntimeError("no C compiler (install gcc or clang, or set CC)")
    source = SOURCE.read_bytes()
    key = hashlib.sha256(source + repr((compiler, FLAGS)).encode()).hexdigest()[:16]
    target = kernel_dir() / f"cpu_kernels-{key}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, partial = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        done = subprocess.run([compiler, *FLAGS, "-o", partial, str(SOURCE), "-lm"],
                              capture_output=True, text=True, timeout=BUILD_TIMEOUT)
        if done.returncode:
            lines = (done.stderr or done.stdout).strip().splitlines()
            raise RuntimeError(f"{compiler} failed: {lines[-1] if lines else done.returncode}")
        os.replace(partial, target)  # whole or not at all, whoever builds at once
    except (OSError, subprocess.SubprocessError) as exc:
        raise RuntimeError(f"{compiler} could not run: {exc}") from exc
    finally:
        if os.path.exists(partial):
            os.unlink(partial)
    return target


def _bind(lib: Any) -> Any:
    pointer, size = ctypes.c_void_p, ctypes.c_int64
    lib.ow_int4_mm.argtypes = [pointer] * 4 + [size] * 3 + [ctypes.c_int] * 2
    lib.ow_int4_mm.restype = ctypes.c_int
    lib.ow_int8_mm.argtypes = [pointer] * 4 + [size] * 3 + [ctypes.c_int]
    lib.ow_int8_mm.restype = None
    lib.ow_decode_layers.argtypes = [pointer, ctypes.c_int32, pointer, size] + [pointer] * 2 + [
        size] * 2 + [pointer] * 4 + [ctypes.c_int]
    lib.ow_decode_layers.restype = ctypes.c_int
    return lib


def _check(lib: Any, block: int) -> str | None:
    """Whether ``lib`` reads PyTorch's packing as it is: products of known random codes
    against the same products in float32 (one and five tokens), or what disagreed."""
    import torch

    generator = torch.Generator().manual_seed(0)
    rows, size = 2 * (block or INT4_GROUP), 2 * INT4_GROUP
    x = torch.randn(5, size, generator=generator)
    codes = torch.randint(0, 16, (rows, size), generator=generator, dtype=torch.int32)
    table = (torch.rand(size // INT4_GROUP, rows, 2, generator=generator) - 0.5).to(
        torch.bfloat16)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
    step, zero = (t.float().transpose(0, 1).repeat_interleave(INT4_GROUP, 1)
                  for t in table.unbind(-1))
    int8 = torch.randint(-128, 128, (rows, size), generator=generator, dtype=torch.int8)
    scales = torch.rand(rows, generator=generator).to(torch.bfloat16)
    cases: dict[str, tuple[Any, Callable[[Any], Any]]] = {
        "int4": ((codes - 8) * step + zero,
                 lambda t: _own_int4(lib, t, packed, table, block, 1)),
        "int8": (int8.float() * scales.float()[:, None],
                 lambda t: _own_int8(lib, t, int8, scales, 1))}
    for name, (weight, ours) in cases.items():
        if name == "int4" and not block:
            continue
        for tokens in (x[:1], x):
            want = tokens @ weight.T  # a misread layout is off by the products' own size
            if float((ours(tokens) - want).abs().max()) > 1e-3 * float(want.abs().max()):
                return f"its {name} product of {tokens.shape[0]} token(s)"
    return None


def _own_int4(lib: Any, x: Any, weight: Any, scale_zero: Any, block: int,
              threads: int) -> Any:
    """Our int4 product of float32 ``x`` (contiguous), in float32."""
    import torch

    rows = int(scale_zero.shape[1])
    out = torch.empty(x.shape[0], rows)
    if lib.ow_int4_mm(x.data_ptr(), weight.data_ptr(), scale_zero.data_ptr(), out.data_ptr(),
                      x.shape[0], x.shape[1], rows, threads, block):
        raise MemoryError("no memory for the int4 product's scratch")
    return out


def _own_int8(lib: Any, x: Any, weight: Any, scales: Any, threads: int) -> Any:
    """Our int8 product of float32 ``x`` (contiguous), in float32."""
    import torch

    out = torch.empty(x.shape[0], weight.shape[0])
    lib.ow_int8_mm(x.data_ptr(), weight.data_ptr(), scales.data_ptr(), out.data_ptr(),
                   x.shape[0], x.shape[1], weight.shape[0], threads)
    return out
