"""Models of real shapes, random weights, openweight against llama.cpp side by side.

    pip install -e ".[bench]" sentencepiece   # llama-cpp-python compiles from source (minutes)
    python benchmarks/bench_scale.py [--shape 1b] [--runs 3] [--work DIR]
    python benchmarks/bench_scale.py --shape gpt-oss-20b [--runs 1]   # ~13 GB, 30-40 min

No hub is needed: the model is a Llama of the named shape built from a config with random
weights (speed and memory only, never quality) and SmolLM2's tokenizer from the store. llama.cpp
gets it through its own converter (``convert_hf_to_gguf.py``, from llama-cpp-python's source
distribution) and quantiser (Q4_1); openweight pulls that same GGUF (``openweight pull``), as a
user would. Every measurement is a fresh process: pull time and peak, load to first token, peak
memory while answering, decode and prefill tokens/s. Prints medians and the openweight /
llama.cpp ratios, with the CPU, its PyTorch capability and the thread count.

The ``gpt-oss-*`` shapes are written the way the hub ships gpt-oss (``GptOssForCausalLM``, experts
in MXFP4, the rest bf16, sharded safetensors with an index, ``quantization_config`` mxfp4), one
shard at a time so the build never holds the model; the tokenizer is SmolLM2's with the harmony
special tokens and a minimal harmony chat template (the vocabulary stays gpt-oss's 201,088: the
rows past the tokenizer's ids have a zero output projection, so greedy answers stay decodable).
llama.cpp converts the checkpoint (MXFP4 experts passed through, the rest f16); openweight loads
the directory itself (its CPU loader repacks the experts to int4 as it reads them). Random
weights write no harmony framing, so openweight streams no text until the end: load, prefill and
decode are timed from whole answers (1 token, then ``--tokens``) with the usage token counts.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "benchmarks"))
from common import cpu_description, llama_cpp_build  # noqa: E402
from harmony_template import HARMONY_SPECIALS, HARMONY_TEMPLATE  # noqa: E402

THREADS = 2
LLAMA_PYTHON = [sys.executable]  # the Python whose llama_cpp is the peer (--llama-python)
# (hidden, layers, heads, kv heads, ffn, tied): Llama-3.2-1B's and Llama-3.1-8B's dimensions
# (the vocabulary is SmolLM2's 49152, so its tokenizer fits)
SHAPES = {"1b": (2048, 16, 32, 8, 8192, True), "8b": (4096, 32, 32, 8, 14336, False),
          "tiny": (256, 2, 4, 2, 512, True)}
# gpt-oss: GptOssConfig's defaults are the 120b's except for these (gpt-oss-20b: 24 layers, 32
# experts; hidden and intermediate 2880, 64/8 heads of 64, top-4, window 128 on every other
# layer, vocabulary 201088, yarn rope); the tiny one keeps the structure and the vocabulary
GPT_OSS_SHAPES: dict[str, dict[str, Any]] = {
    "gpt-oss-20b": {"num_hidden_layers": 24, "num_local_experts": 32},
    "gpt-oss-tiny": {"num_hidden_layers": 2, "num_local_experts": 4, "num_experts_per_tok": 2,
                     "hidden_size": 128, "intermediate_size": 128, "num_attention_heads": 4,
                     "num_key_value_heads": 2, "head_dim": 32},
}
GPT_OSS_VOCAB = 201088
SHARD_BYTES = 3_000_000_000  # safetensors shards of the gpt-oss checkpoints: ~3 GB at most
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


# gpt-oss: whole answers timed (random weights write no harmony framing, so openweight streams
# no text before the end); the 1-token and the N-token answers differ in their first word, so
# neither engine's prefix cache serves one from the other
WHOLE = r"""
def timed(prompt, n):
    start = time.perf_counter()
    prompt_tokens, tokens = answer(prompt, n)
    return time.perf_counter() - start, prompt_tokens, tokens
def report(first):
    took, prompt_tokens, _ = timed(LONG, 1)
    one, _, _ = timed("1 " + PROMPT, 1)
    many, _, n = timed("2 " + PROMPT, int(sys.argv[2]))
    print(json.dumps({"first_token_s": first, "prefill": prompt_tokens / took,
                      "decode": (n - 1) / (many - one) if n > 1 else float("nan"),
                      "tokens": n, "peak_mb": peak_mb()}))
"""

OPENWEIGHT_GPT_OSS_CHILD = PEAK + r"""
import json, sys, time
t0 = time.perf_counter()
from openweight import Client
client = Client(sys.argv[1], keep_alive=0)
def answer(prompt, n):
    usage = None
    for chunk in client.stream([{"role": "user", "content": prompt}], max_tokens=n,
                               temperature=0):
        usage = chunk.usage or usage
    return usage.prompt_tokens, usage.completion_tokens
""" + WHOLE + r"""
answer("hi", 1)
report(time.perf_counter() - t0)
"""

LLAMA_GPT_OSS_CHILD = PEAK + r"""
import json, sys, time
t0 = time.perf_counter()
from llama_cpp import Llama
llm = Llama(model_path=sys.argv[1], n_ctx=2048, n_threads=int(sys.argv[3]), verbose=False)
def answer(prompt, n):
    out = llm.create_chat_completion([{"role": "user", "content": prompt}], max_tokens=n,
                                     temperature=0)
    return out["usage"]["prompt_tokens"], out["usage"]["completion_tokens"]
""" + WHOLE + r"""
answer("hi", 1)
report(time.perf_counter() - t0)
"""

def build_model(shape: str, out: Path) -> Path:
    """A random Llama of ``shape`` in bfloat16 with SmolLM2's tokenizer, written a shard at
    a time (never the whole model in memory: an 8B one is 16 GB)."""
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
        model = LlamaForCausalLM(config)
    units = _units(model, lambda name, shape: [
        (name, shape, "ones" if len(shape) == 1 else "normal")])
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    gen = torch.Generator().manual_seed(0)
    _write_shards(tmp, units, lambda name, tshape, kind: _random(tshape, kind, gen))
    _write_config(tmp, config, "LlamaForCausalLM")
    _, default = ensure_model("smollm2-135m")
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                 "chat_template.jinja"):
        if (default / name).exists():
            shutil.copy(default / name, tmp / name)
    tmp.rename(out)
    return out


Unit = list[tuple[str, tuple[int, ...], str]]  # a layer's tensors: (name, shape, kind)


def _units(model: Any, describe: Any) -> list[Unit]:
    """The checkpoint's tensors, grouped so a shard never splits a layer: the embedding,
    each layer, then the final norm and output projection. ``describe(name, shape)`` gives
    the tensors a parameter of the (meta-device) ``model`` is stored as."""
    units: list[Unit] = [[]]
    layer = None
    for name, param in model.named_parameters():
        this = name.split(".")[2] if name.startswith("model.layers.") else None
        if this != layer:
            units.append([])
            layer = this
        units[-1] += describe(name, tuple(param.shape))
    return [unit for unit in units if unit]


def _random(shape: tuple[int, ...], kind: str, gen: Any) -> Any:
    """A random tensor of ``kind``: MXFP4 ``blocks`` (random codes) and ``scales`` (e8m0
    bytes 118-121), norm weights (``ones``), or bf16 from a small ``normal``."""
    import torch

    if kind == "blocks":
        return torch.randint(0, 256, shape, dtype=torch.uint8, generator=gen)
    if kind == "scales":
        return torch.randint(118, 122, shape, dtype=torch.uint8, generator=gen)
    if kind == "ones":
        return torch.ones(shape, dtype=torch.bfloat16)
    return torch.empty(shape, dtype=torch.bfloat16).normal_(0.0, 0.02, generator=gen)


def _write_shards(out: Path, units: list[Unit], make: Any) -> None:
    """Sharded safetensors (``SHARD_BYTES`` at most, whole units) with their index, each
    tensor ``make(name, shape, kind)``, written a shard at a time."""
    from safetensors.torch import save_file

    shards: list[Unit] = [[]]
    size = 0
    for unit in units:
        nbytes = sum(2 * _numel(shape) if kind in ("normal", "ones") else _numel(shape)
                     for _, shape, kind in unit)
        if shards[-1] and size + nbytes > SHARD_BYTES:
            shards.append([])
            size = 0
        shards[-1] += unit
        size += nbytes
    weight_map: dict[str, str] = {}
    total = 0
    for n, shard in enumerate(shards, 1):
        file = f"model-{n:05d}-of-{len(shards):05d}.safetensors"
        tensors = {}
        for name, tshape, kind in shard:
            tensors[name] = t = make(name, tshape, kind)
            weight_map[name] = file
            total += t.numel() * t.element_size()
        save_file(tensors, str(out / file), metadata={"format": "pt"})
        del tensors
    (out / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))


def _write_config(out: Path, config: Any, architecture: str, **extra: Any) -> None:
    """``config.json`` as the hub has it: the architecture named, the dtype bf16."""
    config.save_pretrained(str(out))
    data = json.loads((out / "config.json").read_text())
    data["architectures"] = [architecture]
    data["dtype"] = data["torch_dtype"] = "bfloat16"
    data.update(extra)
    (out / "config.json").write_text(json.dumps(data, indent=2))


def _gpt_oss_tokenizer(out: Path) -> Any:
    """SmolLM2's tokenizer (from the store) with the harmony special tokens and template."""
    from transformers import AutoTokenizer

    from openweight.store import ensure_model

    _, default = ensure_model("smollm2-135m")
    tokenizer = AutoTokenizer.from_pretrained(str(default))
    tokenizer.add_special_tokens({"additional_special_tokens": HARMONY_SPECIALS[1:]})
    tokenizer.chat_template = HARMONY_TEMPLATE
    tokenizer.eos_token = "<|return|>"
    tokenizer.pad_token = "<|endoftext|>"
    tokenizer.save_pretrained(str(out))
    return tokenizer


def _gpt_oss_units(config: Any) -> list[Unit]:
    """gpt-oss's tensors by layer (``_units``), the experts' in the hub's MXFP4 layout."""
    import torch
    from transformers import GptOssForCausalLM

    with torch.device("meta"):
        model = GptOssForCausalLM(config)
    e, h, i = config.num_local_experts, config.hidden_size, config.intermediate_size
    mxfp4 = {"gate_up_proj": (e, 2 * i, h // 32), "down_proj": (e, h, i // 32)}

    def describe(name: str, shape: tuple[int, ...]) -> Unit:
        proj = name.split(".")[-1]
        if ".mlp.experts." in name and proj in mxfp4:
            return [(f"{name}_blocks", (*mxfp4[proj], 16), "blocks"),
                    (f"{name}_scales", mxfp4[proj], "scales")]
        return [(name, shape, "ones" if name.endswith("norm.weight") else "normal")]

    return _units(model, describe)


def build_gpt_oss(shape: str, out: Path) -> Path:
    """A random gpt-oss of ``shape`` as the hub ships it: experts in MXFP4 (random codes,
    e8m0 scale bytes 118-121), everything else bf16 from a small normal, sharded safetensors
    with an index, written one shard at a time (never the whole model in memory)."""
    import torch
    from transformers import GptOssConfig

    if (out / "config.json").exists():
        return out
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    tokenizer = _gpt_oss_tokenizer(tmp)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in HARMONY_SPECIALS}
    config = GptOssConfig(vocab_size=GPT_OSS_VOCAB, **GPT_OSS_SHAPES[shape],
                          eos_token_id=[ids["<|return|>"], ids["<|call|>"]],
                          pad_token_id=ids["<|endoftext|>"], bos_token_id=ids["<|endoftext|>"])
    gen = torch.Generator().manual_seed(0)

    def make(name: str, tshape: tuple[int, ...], kind: str) -> Any:
        t = _random(tshape, kind, gen)
        if name == "lm_head.weight":  # ids past the tokenizer's are never the argmax
            t[len(tokenizer):] = 0
        return t

    _write_shards(tmp, _gpt_oss_units(config), make)
    _write_config(tmp, config, "GptOssForCausalLM", quantization_config={
        # as gpt-oss-20b's config.json has it
        "modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router",
                                   "model.embed_tokens", "lm_head"],
        "quant_method": "mxfp4"})
    tmp.rename(out)
    return out


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


# llama.cpp's quantiser, run by the peer's interpreter (``--llama-python``: this one needs
# no llama-cpp-python of its own): argv source, destination, ftype, threads
QUANTISE = """
import ctypes, sys, llama_cpp
params = llama_cpp.llama_model_quantize_default_params()
params.ftype = int(sys.argv[3]); params.nthread = int(sys.argv[4])
sys.exit(llama_cpp.llama_model_quantize(sys.argv[1].encode(), sys.argv[2].encode(),
                                        ctypes.byref(params)))
"""
Q4_1_FTYPE = 3  # llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_1


def llama_cpp_version() -> str:
    out = subprocess.run([LLAMA_PYTHON[0], "-c", "import llama_cpp; print(llama_cpp.__version__)"],
                         check=True, capture_output=True, text=True)
    return out.stdout.strip()


def llama_cpp_source(work: Path) -> Path:
    """llama.cpp's converter, from llama-cpp-python's source distribution."""
    src = work / "llama-cpp-src"
    # another shape's copy (same llama-cpp-python) serves as well
    src = next((p for p in work.parent.glob("*/llama-cpp-src")
                if (p / "convert_hf_to_gguf.py").exists()), src)
    if not src.exists():
        dl = work / "sdist"
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary",
                        "llama-cpp-python", f"llama-cpp-python=={llama_cpp_version()}",
                        "-d", str(dl)], check=True, capture_output=True)
        archive = next(dl.glob("llama_cpp_python-*.tar.gz"))
        shutil.unpack_archive(archive, work / "unpacked")
        vendor = next((work / "unpacked").glob("llama_cpp_python-*")) / "vendor" / "llama.cpp"
        vendor.rename(src)
    return src


def to_gguf(model: Path, work: Path) -> Path:
    """The model as an f16 GGUF (llama.cpp's converter), then Q4_1 (its quantiser)."""
    q4 = work / f"{model.name}.Q4_1.gguf"
    if q4.exists():
        return q4
    src = llama_cpp_source(work)
    f16 = work / f"{model.name}.f16.gguf"
    env = {**os.environ, "PYTHONPATH": f"{src / 'gguf-py'}:{src}"}
    subprocess.run([sys.executable, str(src / "convert_hf_to_gguf.py"), str(model),
                    "--outtype", "f16", "--outfile", str(f16)], check=True, env=env,
                   capture_output=True)
    done = subprocess.run([LLAMA_PYTHON[0], "-c", QUANTISE, str(f16), str(q4),
                           str(Q4_1_FTYPE), str(THREADS)], capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"llama_model_quantize failed ({done.returncode}):\n"
                         f"{done.stderr[-3000:]}")
    f16.unlink()
    return q4


def gpt_oss_gguf(model: Path, work: Path) -> Path:
    """The gpt-oss checkpoint through llama.cpp's converter: the MXFP4 experts pass through as
    MXFP4, everything else f16 (openweight keeps it bf16)."""
    gguf = work / f"{model.name}.f16.gguf"
    if gguf.exists():
        return gguf
    src = llama_cpp_source(work)
    env = {**os.environ, "PYTHONPATH": f"{src / 'gguf-py'}:{src}"}
    tmp = gguf.with_name(gguf.name + ".partial")
    out = subprocess.run([sys.executable, str(src / "convert_hf_to_gguf.py"), str(model),
                          "--outtype", "f16", "--outfile", str(tmp)], env=env,
                         capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"convert_hf_to_gguf.py failed:\n{out.stderr[-3000:]}")
    tmp.rename(gguf)
    return gguf


def child(code: str, *args: str, python: str = sys.executable) -> dict[str, Any]:
    out = subprocess.run([python, "-c", code, *args], capture_output=True, text=True,
                         env={**os.environ, "OPENWEIGHT_KEEP_ALIVE": "0",
                              "OMP_NUM_THREADS": str(THREADS)}, timeout=3600)
    if out.returncode != 0:
        raise SystemExit(f"child failed:\n{out.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def pull(gguf: Path, name: str, home: Path) -> dict[str, float]:
    """``openweight pull FILE.gguf`` (or a model directory) in a fresh process: wall time
    and peak memory."""
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


def estimate(name: str) -> str:
    """What ``openweight info NAME`` estimates the bench model needs (the store is
    ``OPENWEIGHT_HOME``), to set beside the measured peaks."""
    from openweight.local.memory import estimate_memory
    from openweight.local.resolve import resolve_dtype, resolve_quantize
    from openweight.store import ensure_model

    _, path = ensure_model(name)
    quantize, dtype = resolve_quantize("auto", "cpu", path), resolve_dtype("auto", "cpu")
    short = estimate_memory(path, "cpu", dtype, quantize=quantize, context=1024)
    full = estimate_memory(path, "cpu", dtype, quantize=quantize)
    return (f"openweight's estimate ({quantize}, {dtype}): weights {short.weights_bytes / MB:.0f}"
            f" MB; with the KV cache and slack: {short.total_bytes / MB:.0f} MB for 1,024 "
            f"tokens (the bench's answers fit in them), {full.total_bytes / MB:.0f} MB for "
            f"{full.context}")


MB = 1 << 20  # the peaks are VmHWM in KiB / 1024


def report(title: str, ours: list[dict[str, Any]], theirs: list[dict[str, Any]],
           keys: tuple[tuple[str, str], ...]) -> None:
    """openweight's first load apart (it packs and keeps the packed form), then the medians
    of the later runs (which read the kept form) against llama.cpp's, and the ratios."""
    first = ours[0]
    print(f"\nopenweight's first load (packing, keeping the packed form): "
          f"{first['first_token_s']:.0f} s to the first token, peak {first['peak_mb']:.0f} MB; "
          "later runs read the kept form")
    ours = ours[1:] or ours
    print(f"{title}, medians:")
    print("| metric | openweight | llama.cpp | ratio |\n|---|---|---|---|")
    for key, label in keys:
        a = statistics.median(r[key] for r in ours)
        b = statistics.median(r[key] for r in theirs)
        print(f"| {label} | {a:.2f} | {b:.2f} | {a / b:.2f}x |")


KEYS = (("first_token_s", "load to first token (s)"), ("peak_mb", "peak memory (MB)"),
        ("decode", "decode (tok/s)"), ("prefill", "prefill (tok/s)"))


def bench_gpt_oss(shape: str, work: Path, runs: int, tokens: int) -> None:
    """Build the checkpoint, convert it for llama.cpp, then alternate fresh processes: llama.cpp
    on the GGUF, openweight on the checkpoint directory (registered in place in a bench store)."""
    t = time.perf_counter()
    model = build_gpt_oss(shape, work / shape)
    size = sum(f.stat().st_size for f in model.glob("*.safetensors"))
    print(f"built {model.name} ({size / 1e9:.2f} GB of safetensors) in "
          f"{time.perf_counter() - t:.0f} s", flush=True)
    t = time.perf_counter()
    gguf = gpt_oss_gguf(model, work)
    print(f"converted to {gguf.name} ({gguf.stat().st_size / 1e9:.2f} GB) in "
          f"{time.perf_counter() - t:.0f} s", flush=True)
    os.environ["OPENWEIGHT_HOME"] = str(work / "store")
    home = work / "store"  # registered in place: the store keeps its packed form
    shutil.rmtree(home, ignore_errors=True)
    pull(model, f"bench-{shape}", home)
    os.environ["OPENWEIGHT_HOME"] = str(home)
    ours: list[dict[str, Any]] = []
    theirs: list[dict[str, Any]] = []
    for _ in range(runs):  # alternate, fresh processes
        theirs.append(child(LLAMA_GPT_OSS_CHILD, str(gguf), str(tokens), str(THREADS),
                                  python=LLAMA_PYTHON[0]))
        print(f"  llama.cpp {theirs[-1]}", flush=True)
        ours.append(child(OPENWEIGHT_GPT_OSS_CHILD, f"bench-{shape}", str(tokens)))
        print(f"  openweight {ours[-1]}", flush=True)
    print(estimate(f"bench-{shape}"))
    report(f"{shape} shape, MXFP4 experts (openweight: the checkpoint, experts repacked to int4, "
           f"rest bf16; llama.cpp: MXFP4 + f16 GGUF), {runs} runs", ours, theirs,
           (*KEYS, ("tokens", "tokens decoded")))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=sorted(SHAPES) + sorted(GPT_OSS_SHAPES),
                        default="1b")
    parser.add_argument("--runs", type=int, default=None,
                        help="fresh-process runs of each engine (3; 2 for gpt-oss shapes, "
                        "whose first openweight run repacks the experts)")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--llama-python", default=sys.executable,
                        help="the Python whose llama-cpp-python is the peer (e.g. a venv's, "
                        "built for AVX2: see docs/development.md)")
    parser.add_argument("--work", type=Path, default=Path.home() / ".cache" / "openweight-bench")
    args = parser.parse_args()
    LLAMA_PYTHON[0] = args.llama_python
    work = args.work / args.shape
    work.mkdir(parents=True, exist_ok=True)
    print(f"CPU: {cpu_description(THREADS)}; llama.cpp built for "
          f"{llama_cpp_build(LLAMA_PYTHON[0])}", flush=True)
    if args.shape in GPT_OSS_SHAPES:
        bench_gpt_oss(args.shape, work, args.runs or 2, args.tokens)
        return
    args.runs = args.runs or 3
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
        theirs.append(child(LLAMA_CHILD, str(gguf), str(args.tokens), str(THREADS),
                                  python=LLAMA_PYTHON[0]))
        ours.append(child(OPENWEIGHT_CHILD, f"bench-{args.shape}", str(args.tokens)))
        print(f"  llama.cpp {theirs[-1]}\n  openweight {ours[-1]}", flush=True)
    print(estimate(f"bench-{args.shape}"))
    report(f"{args.shape} shape, Q4_1 source, {args.runs} runs (openweight quantize=auto)",
           ours, theirs, KEYS)


if __name__ == "__main__":
    main()
