"""Models of real shapes, random weights, openweight against llama.cpp side by side.

    pip install -e ".[bench]" sentencepiece   # llama-cpp-python compiles from source (minutes)
    python benchmarks/bench_scale.py [--shape 1b] [--runs 3] [--work DIR]

No hub is needed: the model is a Llama of the named shape built from a config with random
weights (speed and memory only, never quality) and SmolLM2's tokenizer from the store. llama.cpp
gets it through its own converter (``convert_hf_to_gguf.py``, from llama-cpp-python's source
distribution) and quantiser (Q4_1); openweight pulls that same GGUF (``openweight pull``), as a
user would. Every measurement is a fresh process: pull time and peak, load to first token, peak
memory while answering, decode and prefill tokens/s. Prints medians and the openweight /
llama.cpp ratios, with the CPU, its PyTorch capability and the thread count.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
THREADS = 2
# (hidden, layers, heads, kv heads, ffn, tied): Llama-3.2-1B's and Llama-3.1-8B's dimensions
# (the vocabulary is SmolLM2's 49152, so its tokenizer fits)
SHAPES = {"1b": (2048, 16, 32, 8, 8192, True), "8b": (4096, 32, 32, 8, 14336, False),
          "tiny": (256, 2, 4, 2, 512, True)}
PROMPT = "Write a long, detailed story about a dragon who learns to cook."
LONG = ("Summarise the following notes in one sentence.\n" + " ".join(
    f"Note {i}: the river rose by {i % 7} centimetres near the old mill." for i in range(40)))

PEAK = f"LONG = {LONG!r}\nPROMPT = {PROMPT!r}\n" + r"""
def peak_mb():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
"""

OPENWEIGHT_CHILD = PEAK + r"""
import json, sys, time
t0 = time.perf_counter()
from openweight import Client
client = Client(sys.argv[1], keep_alive=0)
first = None
for chunk in client.stream([{"role": "user", "content": "hi"}], max_tokens=2, temperature=0):
    if first is None and chunk.text:
        first = time.perf_counter() - t0
def run(prompt, n):
    start = time.perf_counter(); got = None; count = 0; prompt_tokens = 0
    for chunk in client.stream([{"role": "user", "content": prompt}], max_tokens=n,
                               temperature=0):
        if got is None and chunk.text:
            got = time.perf_counter()
        if chunk.usage:
            count, prompt_tokens = chunk.usage.completion_tokens, chunk.usage.prompt_tokens
    return start, got or time.perf_counter(), time.perf_counter(), count, prompt_tokens
s, f, e, n, p = run(LONG, 1)
prefill = p / (f - s)
s, f, e, n, p = run(PROMPT, int(sys.argv[2]))
print(json.dumps({"first_token_s": first, "decode": (n - 1) / (e - f), "prefill": prefill,
                  "peak_mb": peak_mb()}))
"""

LLAMA_CHILD = PEAK + r"""
import json, sys, time
t0 = time.perf_counter()
from llama_cpp import Llama
llm = Llama(model_path=sys.argv[1], n_ctx=2048, n_threads=int(sys.argv[3]), verbose=False)
first = None
for part in llm.create_chat_completion([{"role": "user", "content": "hi"}], max_tokens=2,
                                       temperature=0, stream=True):
    if first is None and part["choices"][0]["delta"].get("content"):
        first = time.perf_counter() - t0
def run(prompt, n):
    start = time.perf_counter(); got = None; count = 0
    for part in llm.create_chat_completion([{"role": "user", "content": prompt}],
                                           max_tokens=n, temperature=0, stream=True):
        if part["choices"][0]["delta"].get("content"):
            count += 1
            got = got or time.perf_counter()
    return start, got or time.perf_counter(), time.perf_counter(), count
prompt_tokens = len(llm.tokenize(LONG.encode()))
s, f, e, n = run(LONG, 1)
prefill = prompt_tokens / (f - s)
s, f, e, n = run(PROMPT, int(sys.argv[2]))
print(json.dumps({"first_token_s": first, "decode": (n - 1) / (e - f), "prefill": prefill,
                  "peak_mb": peak_mb()}))
"""


def cpu_description() -> str:
    import torch

    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f
                         if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return (f"{model}; PyTorch kernels: {torch.backends.cpu.get_cpu_capability()}; "
            f"{THREADS} threads each")


def build_model(shape: str, out: Path) -> Path:
    """A random Llama of ``shape`` in bfloat16 with SmolLM2's tokenizer, built one tensor at
    a time (never the whole model in float32)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from openweight.store import ensure_model

    if (out / "config.json").exists():
        return out
    hidden, layers, heads, kv, ffn, tied = SHAPES[shape]
    config = LlamaConfig(vocab_size=49152, hidden_size=hidden, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=kv,
                         intermediate_size=ffn, tie_word_embeddings=tied,
                         max_position_embeddings=8192, bos_token_id=1, eos_token_id=2)
    with torch.device("meta"):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    model = model.to_empty(device="cpu")
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() == 1:
                param.fill_(1.0)
            else:
                param.normal_(0.0, 0.02, generator=gen)
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp))
    _, default = ensure_model("smollm2-135m")
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                 "chat_template.jinja"):
        if (default / name).exists():
            shutil.copy(default / name, tmp / name)
    tmp.rename(out)
    return out


def llama_cpp_source(work: Path) -> Path:
    """llama.cpp's converter, from llama-cpp-python's source distribution."""
    import llama_cpp

    src = work / "llama-cpp-src"
    if not src.exists():
        dl = work / "sdist"
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary",
                        "llama-cpp-python", f"llama-cpp-python=={llama_cpp.__version__}",
                        "-d", str(dl)], check=True, capture_output=True)
        archive = next(dl.glob("llama_cpp_python-*.tar.gz"))
        shutil.unpack_archive(archive, work / "unpacked")
        vendor = next((work / "unpacked").glob("llama_cpp_python-*")) / "vendor" / "llama.cpp"
        vendor.rename(src)
    return src


def to_gguf(model: Path, work: Path) -> Path:
    """The model as an f16 GGUF (llama.cpp's converter), then Q4_1 (its quantiser)."""
    import llama_cpp

    q4 = work / f"{model.name}.Q4_1.gguf"
    if q4.exists():
        return q4
    src = llama_cpp_source(work)
    f16 = work / f"{model.name}.f16.gguf"
    env = {**os.environ, "PYTHONPATH": f"{src / 'gguf-py'}:{src}"}
    subprocess.run([sys.executable, str(src / "convert_hf_to_gguf.py"), str(model),
                    "--outtype", "f16", "--outfile", str(f16)], check=True, env=env,
                   capture_output=True)
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_1
    params.nthread = THREADS
    rc = llama_cpp.llama_model_quantize(str(f16).encode(), str(q4).encode(),
                                        ctypes.byref(params))
    if rc != 0:
        raise SystemExit(f"llama_model_quantize failed ({rc})")
    f16.unlink()
    return q4


def child(code: str, *args: str) -> dict[str, Any]:
    out = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                         env={**os.environ, "OPENWEIGHT_KEEP_ALIVE": "0",
                              "OMP_NUM_THREADS": str(THREADS)}, timeout=3600)
    if out.returncode != 0:
        raise SystemExit(f"child failed:\n{out.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def pull(gguf: Path, name: str, home: Path) -> dict[str, float]:
    """``openweight pull FILE.gguf`` in a fresh process: wall time and peak memory."""
    code = PEAK + (
        "import sys, time\nt = time.perf_counter()\nfrom openweight.store import pull\n"
        "pull(sys.argv[1], name=sys.argv[2], progress=False)\n"
        "import json; print(json.dumps({'pull_s': time.perf_counter() - t, "
        "'pull_peak_mb': peak_mb()}))\n")
    env_home = os.environ.get("OPENWEIGHT_HOME")
    os.environ["OPENWEIGHT_HOME"] = str(home)
    try:
        return child(code, str(gguf), name)
    finally:
        if env_home is None:
            os.environ.pop("OPENWEIGHT_HOME")
        else:
            os.environ["OPENWEIGHT_HOME"] = env_home


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="1b")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--work", type=Path, default=Path.home() / ".cache" / "openweight-bench")
    args = parser.parse_args()
    work = args.work / args.shape
    work.mkdir(parents=True, exist_ok=True)
    print(f"CPU: {cpu_description()}", flush=True)
    t = time.perf_counter()
    model = build_model(args.shape, work / f"llama-{args.shape}")
    gguf = to_gguf(model, work)
    print(f"built {model.name} and {gguf.name} ({gguf.stat().st_size / 1e9:.2f} GB) in "
          f"{time.perf_counter() - t:.0f} s", flush=True)
    home = work / "store"
    shutil.rmtree(home, ignore_errors=True)
    pulled = pull(gguf, f"bench-{args.shape}", home)
    stored = sum(f.stat().st_size for f in (home / "models").rglob("*") if f.is_file())
    print(f"openweight pull: {pulled['pull_s']:.0f} s, peak {pulled['pull_peak_mb']:.0f} MB, "
          f"{stored / 1e9:.2f} GB stored", flush=True)
    os.environ["OPENWEIGHT_HOME"] = str(home)
    ours: list[dict[str, Any]] = []
    theirs: list[dict[str, Any]] = []
    for _ in range(args.runs):  # alternate, fresh processes
        theirs.append(child(LLAMA_CHILD, str(gguf), str(args.tokens), str(THREADS)))
        ours.append(child(OPENWEIGHT_CHILD, f"bench-{args.shape}", str(args.tokens)))
        print(f"  llama.cpp {theirs[-1]}\n  openweight {ours[-1]}", flush=True)
    print(f"\n{args.shape} shape, Q4_1 source, {args.runs} runs, medians "
          f"(openweight quantize=auto):")
    print("| metric | openweight | llama.cpp | ratio |\n|---|---|---|---|")
    for key, label in (("first_token_s", "load to first token (s)"),
                       ("peak_mb", "peak memory (MB)"), ("decode", "decode (tok/s)"),
                       ("prefill", "prefill (tok/s)")):
        a = statistics.median(r[key] for r in ours)
        b = statistics.median(r[key] for r in theirs)
        print(f"| {label} | {a:.2f} | {b:.2f} | {a / b:.2f}x |")


if __name__ == "__main__":
    main()
