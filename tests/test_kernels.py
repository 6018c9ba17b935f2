"""The packed products' kernels (local/kernels.py, local/cpu_kernels.c): ours read PyTorch's
packing exactly, on both of its x86 layouts; the choice between ours and PyTorch's, and
every way ours can be unavailable, fall back to PyTorch's with the reason said."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from openweight import Client
from openweight.local import kernels
from openweight.local.cpu import cpu_capability

from conftest import ROOT, use_kernels, wide_model

HI = [{"role": "user", "content": "hi there, how are you?"}]


def _int4_case(tokens: int, rows: int, size: int, seed: int) -> tuple[Any, Any, Any, Any]:
    """x, PyTorch's packing of random codes with their table, and the float weight."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, size, generator=generator)
    codes = torch.randint(0, 16, (rows, size), generator=generator, dtype=torch.int32)
    table = ((torch.rand(size // 32, rows, 2, generator=generator) - 0.5) / 8).to(
        torch.bfloat16)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
    step, zero = (t.float().transpose(0, 1).repeat_interleave(32, 1) for t in table.unbind(-1))
    return x, packed, table, (codes - 8) * step + zero


def _int8_case(tokens: int, rows: int, size: int, seed: int) -> tuple[Any, Any, Any, Any]:
    import torch

    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, size, generator=generator)
    weight = torch.randint(-128, 128, (rows, size), generator=generator, dtype=torch.int8)
    scales = (torch.rand(rows, generator=generator) / 100).to(torch.bfloat16)
    return x, weight, scales, weight.float() * scales.float()[:, None]


def _near(got: Any, want: Any) -> bool:
    """Within float32 sums and int16 activations' rounding (a misread layout is off by the
    products' own size; PyTorch's bfloat16 activations are off by ~4e-3)."""
    return float((got.float() - want).abs().max()) <= 2e-4 * float(want.abs().max())


# token counts that take the one-token path, the four-token blocks and their remainders
TOKENS = (1, 2, 3, 4, 5, 9)


def _check_products(block: int) -> None:
    """Ours against float products of the same packed weights, for shapes of every path
    (int4 where ours read PyTorch's layout on this CPU kind: ``block`` rows, 0 for none)."""
    for tokens in TOKENS:
        for rows, size in ((block, 32), (3 * block, 96), (2 * block, 576)) if block else ():
            x, packed, table, weight = _int4_case(tokens, rows, size, tokens + rows)
            assert _near(kernels.int4_mm(x, packed, table), x @ weight.T), (tokens, rows, size)
        for rows, size in ((8, 16), (13, 37), (64, 576), (100, 100)):  # tails of rows and k
            x, w8, scales, weight = _int8_case(tokens, rows, size, tokens + rows)
            assert _near(kernels.int8_mm(x, w8, scales), x @ weight.T), (tokens, rows, size)


def test_own_kernels_read_pytorchs_packing(monkeypatch: pytest.MonkeyPatch) -> None:
    use_kernels(monkeypatch, "own")
    assert "own kernels" in kernels.route(), kernels.route()
    _check_products(kernels.INT4_BLOCK_ROWS.get(cpu_capability(), 0))
    import torch

    x, packed, table, _ = _int4_case(3, 64, 64, 0)  # other dtypes in, the same dtype out
    assert kernels.int4_mm(x.to(torch.bfloat16), packed, table).dtype == torch.bfloat16


def test_own_kernels_read_the_avx2_layout_too() -> None:
    """PyTorch packs int4 in blocks of 32 rows for its AVX2 kernels (64 for AVX-512): the
    AVX2 kernels run here in a process of their own, on any x86 machine."""
    script = ("from openweight.local import kernels\n"
              "import test_kernels\n"
              "assert 'own kernels on this AVX2 CPU' in kernels.route(), kernels.route()\n"
              "test_kernels._check_products(32)\n")
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "avx2", "OPENWEIGHT_KERNELS": "auto",
           "PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), str(ROOT / "sdk")])}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


def test_pytorchs_kernels_when_asked_or_where_theirs_are_faster(
        monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    x, packed, table, weight = _int4_case(2, 64, 64, 1)
    use_kernels(monkeypatch, "pytorch")
    assert kernels.route() == "PyTorch's packed kernels (OPENWEIGHT_KERNELS=pytorch)"
    theirs = torch.ops.aten._weight_int4pack_mm_for_cpu(x.to(torch.bfloat16), packed, 32, table)
    assert torch.equal(kernels.int4_mm(x, packed, table), theirs.float())
    use_kernels(monkeypatch, "auto")  # AVX-512: PyTorch's products, our one-call step
    real = cpu_capability()
    monkeypatch.setattr(kernels, "cpu_capability", lambda: "AVX512")
    monkeypatch.setitem(kernels.INT4_BLOCK_ROWS, "AVX512", kernels.INT4_BLOCK_ROWS.get(real, 0))
    assert kernels.route() == ("PyTorch's packed kernels for the products (the faster ones "
                               "on AVX512 CPUs); a decode step's layers in one call of "
                               "openweight's own")
    assert kernels._load().lib is not None
    assert torch.equal(kernels.int4_mm(x, packed, table), theirs.float())
    use_kernels(monkeypatch, "auto")
    monkeypatch.setattr(kernels, "cpu_capability", lambda: "SVE256")
    assert kernels.route() == "PyTorch's packed kernels (the faster ones on SVE256 CPUs)"
    use_kernels(monkeypatch, "fastest")
    assert "OPENWEIGHT_KERNELS='fastest' is not one of auto, own, pytorch" in kernels.route()
    assert torch.equal(kernels.int4_mm(x, packed, table), theirs.float())
    assert not _near(theirs, x @ weight.T)  # bfloat16 activations: ours are the closer


def test_no_compiler_or_a_failed_build_falls_back(monkeypatch: pytest.MonkeyPatch,
                                                  tmp_path: Path) -> None:
    monkeypatch.setenv("OPENWEIGHT_KERNEL_DIR", str(tmp_path / "kernels"))
    use_kernels(monkeypatch, "own")
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    route = kernels.route()
    assert route.startswith("PyTorch's packed kernels (ours did not build:"), route
    assert "no-such-cc" in route
    broken = tmp_path / "cc"
    broken.write_text("#!/bin/sh\necho 'cpu_kernels.c:1: error: no AVX2 here' >&2\nexit 1\n")
    broken.chmod(0o755)
    use_kernels(monkeypatch, "own")
    monkeypatch.setenv("CC", str(broken))
    route = kernels.route()
    assert "ours did not build" in route and "no AVX2 here" in route, route
    assert not list((tmp_path / "kernels").iterdir())  # nothing half-built is left
    import torch

    x, w8, scales, _ = _int8_case(3, 24, 64, 2)  # PyTorch's products, as PyTorch computes them
    want = torch._weight_int8pack_mm(x.to(torch.bfloat16), w8, scales).float()
    assert torch.equal(kernels.int8_mm(x, w8, scales), want)


def test_the_build_is_kept_and_checked(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("OPENWEIGHT_KERNEL_DIR", str(tmp_path))
    use_kernels(monkeypatch, "own")
    assert "own kernels" in kernels.route()
    built = list(tmp_path.glob("cpu_kernels-*.so"))
    assert len(built) == 1
    use_kernels(monkeypatch, "own")  # a new process: the kept build, no compiler run

    def no_compiler(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("compiled again")

    monkeypatch.setattr(kernels.subprocess, "run", no_compiler)
    assert "own kernels" in kernels.route()
    # a layout ours would misread (as if PyTorch changed its packing) is caught on first use
    use_kernels(monkeypatch, "own")
    wrong = {name: 2 * rows for name, rows in kernels.INT4_BLOCK_ROWS.items()}
    wrong.setdefault(cpu_capability(), 64)  # the generic kernels' layout, read as blocks
    monkeypatch.setattr(kernels, "INT4_BLOCK_ROWS", wrong)
    route = kernels.route()
    assert route == "PyTorch's packed kernels (ours disagreed with them: its int4 product of " \
                    "1 token(s))", route


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_a_model_answers_the_same_with_either_kernels(tiny_model: Path, mode: str,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Same greedy tokens from ours and PyTorch's (float32 vs bfloat16 activations: the
    tiny model's margins are wide enough), through the engine's fast path."""
    client = Client(str(tiny_model), quantize=mode, dtype="float32")
    answers = {}
    for choice in ("pytorch", "own"):
        use_kernels(monkeypatch, choice)
        answers[choice] = client.chat(HI, max_tokens=12, temperature=0).text
    assert answers["own"] == answers["pytorch"]


@pytest.mark.slow
def test_smollm2_on_the_avx2_kernels_answers_paris(smollm2_home: Path) -> None:
    script = ("from openweight import Client\n"
              "from openweight.local import kernels\n"
              "r = Client().chat([{'role': 'user', 'content': "
              "'What is the capital of France?'}], temperature=0, max_tokens=24)\n"
              "assert 'own kernels on this AVX2 CPU' in kernels.route(), kernels.route()\n"
              "assert 'Paris' in r.text, r.text\n")
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "avx2", "OPENWEIGHT_HOME": str(smollm2_home),
           "OPENWEIGHT_KEEP_ALIVE": "0", "OPENWEIGHT_KERNELS": "auto"}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]


def test_the_loaded_model_says_what_it_runs_with(tiny_model: Path, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """``LoadedModel.summary`` (``openweight ps --json``'s ``loaded``): the resolved
    settings, the kernels and the decode path, the one-call step where ours run."""
    import shutil

    from openweight.local.loader import load_model, unload_all

    wide = tmp_path / "wide"  # layers in whole int4 blocks, the tiny model's tokenizer
    wide_model("llama").save_pretrained(wide)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (tiny_model / name).exists():
            shutil.copy(tiny_model / name, wide / name)
    for choice, decode in (("own", "the fast path, a token's layers in one call of ours"),
                           ("pytorch", "the fast path")):
        use_kernels(monkeypatch, choice)
        if not kernels._load().block:  # the generic kernels' int4 layout: ours cannot read it
            decode = "the fast path"
        unload_all()  # a fresh load: the step is chosen when the fast path is built
        summary = load_model(wide, "cpu", "float32", "int4").summary()
        assert summary == {"device": "cpu", "dtype": "float32", "quantize": "int4",
                           "quantize_reason": "asked for", "kernels": kernels.route(),
                           "decode": decode}
    unload_all()
