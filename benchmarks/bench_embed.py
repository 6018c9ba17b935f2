"""Embeddings: all-MiniLM-L6-v2 through openweight, next to sentence-transformers and llama.cpp.

The same N sentences (deterministic, of mixed length: made from the words of README.md and
docs/*.md) go through every way, on the same machine in the same run:

- equality: openweight's vectors against sentence-transformers' for the same model
  directory (the store's): the minimum and mean cosine over the sentences;
- in one process: ``SentenceTransformer(path, device="cpu").encode(sentences,
  batch_size=32)`` against ``openweight.Client(model=..., keep_alive=0).embed(sentences)``
  (one call; both sort by length and batch 32 at a time): one warm-up each (the vectors
  compared), then RUNS timed runs alternating; medians, sentences per second;
- servers under CLIENTS concurrent clients: ``openweight serve --model all-minilm-l6-v2``
  against llama.cpp's server through llama-cpp-python (``python -m llama_cpp.server
  --embedding true``, as many threads as torch uses) on an f16 GGUF made by llama.cpp's own
  converter (from llama-cpp-python's source distribution; extracted and converted once into
  ~/.cache/openweight-bench/). Each client thread sends its share of the sentences as
  requests of REQUEST_SIZE sentences to /v1/embeddings; the wall time for all of them,
  after a warm-up request from each client; medians over RUNS rounds, alternating. The
  cosines of the servers' vectors against sentence-transformers' are printed too
  (llama.cpp's vectors are not unit length; a cosine does not care).

Targets: min cosine openweight vs sentence-transformers >= 0.9999; openweight /
sentence-transformers in one process >= 1.2x; openweight serve / llama.cpp server >= 1.0x.

    python benchmarks/bench_embed.py [--runs 3] [--sentences 1000] [--home STORE]
        [--llama-python PY] [--skip-server] [--clients 8] [--request-size 8] [--check]

PY (default: ~/.cache/openweight-bench/venv/bin/python where it exists, else this Python)
is a Python with ``llama-cpp-python[server]`` installed. The model is pulled into STORE
(default: a temporary store). This machine has 2 shared cores: run it alone. The report
ends with how long tasks waited for a CPU during the run; above 25% the numbers are not
worth keeping.
"""

from __future__ import annotations

import argparse
import os
import random
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from common import cpu_description, cpu_stall, llama_cpp_build

MODEL = "all-minilm-l6-v2"
LLAMA_CPP_PYTHON = "llama-cpp-python==0.3.36"
CACHE = Path.home() / ".cache" / "openweight-bench"
ROOT = Path(__file__).resolve().parent.parent
ST, OW = "sentence-transformers", "openweight"
OW_SERVE, LLAMA = "openweight serve", "llama.cpp server"
WAYS = [ST, OW, OW_SERVE, LLAMA]
TARGETS = [(OW, ST, 1.2), (OW_SERVE, LLAMA, 1.0)]
MIN_COSINE = 0.9999
MAX_WORDS = 150  # well inside the model's window
WINDOW = 256  # tokens: sentence-transformers' max_seq_length for this model


@dataclass
class Results:
    """Each way's wall times and first vectors, the sentences' lengths, CPU contention."""

    times: dict[str, list[float]] = field(default_factory=lambda: {w: [] for w in WAYS})
    vectors: dict[str, np.ndarray] = field(default_factory=dict)
    tokens: list[int] = field(default_factory=list)
    stall_share: float | None = None


@dataclass
class Server:
    name: str
    url: str
    proc: subprocess.Popen[bytes]
    log: Path


def make_sentences(n: int) -> list[str]:
    """``n`` sentences, the same every run for the same docs: runs of consecutive words of
    README.md and docs/*.md, 3 to MAX_WORDS words long, most of them short (median ~12)."""
    paths = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    text = " ".join(p.read_text(encoding="utf-8") for p in paths if p.exists())
    words = [w for w in re.findall(r"[A-Za-z]+(?:'[a-z]+)?", text) if len(w) <= 14]
    rng = random.Random(0)
    out = []
    for _ in range(n):
        if rng.random() < 0.1:
            count = rng.randint(40, MAX_WORDS)
        else:
            count = min(MAX_WORDS, max(3, round(rng.lognormvariate(2.5, 0.6))))
        start = rng.randrange(len(words) - count)
        sentence = " ".join(words[start:start + count])
        out.append(sentence[0].upper() + sentence[1:] + ".")
    return out


def run_checked(cmd: list[str], what: str, **kwargs: Any) -> None:
    done = subprocess.run(cmd, capture_output=True, text=True, stdin=subprocess.DEVNULL,
                          check=False, **kwargs)
    if done.returncode != 0:
        raise SystemExit(f"{what} failed:\n{(done.stderr or done.stdout)[-3000:]}")


def model_path(home: Path) -> Path:
    """The model's sentence-transformers directory in the store at ``home`` (pulled once)."""
    os.environ["OPENWEIGHT_HOME"] = str(home)
    import openweight

    if not openweight.model_info(MODEL)["installed"]:
        print(f"pulling {MODEL} into the store (once)...", file=sys.stderr, flush=True)
        openweight.pull(MODEL, progress=False)
    return Path(openweight.model_info(MODEL)["path"])


def llama_cpp_source() -> Path:
    """llama.cpp's converter (convert_hf_to_gguf.py, its conversion package and gguf-py) from
    llama-cpp-python's source distribution, extracted once into the cache: its vendor dir."""
    dest = CACHE / f"llama-cpp-python-{LLAMA_CPP_PYTHON.split('==')[1]}"
    vendor = dest / "vendor" / "llama.cpp"
    if (vendor / "convert_hf_to_gguf.py").exists():
        return vendor
    CACHE.mkdir(parents=True, exist_ok=True)
    print(f"fetching {LLAMA_CPP_PYTHON}'s source for its converter (once)...", file=sys.stderr,
          flush=True)
    with tempfile.TemporaryDirectory(dir=CACHE) as tmp_name:
        tmp = Path(tmp_name)
        run_checked([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary",
                     "llama-cpp-python", "--disable-pip-version-check", "--quiet",
                     "-d", str(tmp / "sdist"), LLAMA_CPP_PYTHON], "pip download (sdist)")
        keep = ("convert_hf_to_gguf.py", "conversion/", "gguf-py/")
        safe = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
        with tarfile.open(next((tmp / "sdist").glob("*.tar.gz"))) as tf:
            members = [m for m in tf.getmembers()
                       if m.name.partition("/vendor/llama.cpp/")[2].startswith(keep)]
            tf.extractall(tmp / "x", members=members, **safe)  # type: ignore[arg-type]
        shutil.rmtree(dest, ignore_errors=True)
        next((tmp / "x").iterdir()).rename(dest)
    return vendor


def converter_env(vendor: Path) -> dict[str, str]:
    """The environment llama.cpp's converter runs in: its gguf-py and, when this Python lacks
    sentencepiece (which it imports whatever the tokenizer), a cache folder holding it."""
    deps = CACHE / f"convert-deps-py{sys.version_info[0]}{sys.version_info[1]}"
    has_sp = subprocess.run([sys.executable, "-c", "import sentencepiece"],
                            capture_output=True, check=False).returncode == 0
    if not has_sp and not (deps / "sentencepiece").exists():
        run_checked([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps",
                     "--disable-pip-version-check", "--target", str(deps), "sentencepiece"],
                    "pip install sentencepiece")
    path = [vendor / "gguf-py", vendor, deps]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(str(p) for p in path)}


def make_gguf(model_dir: Path) -> Path:
    """An f16 GGUF of the model made by llama.cpp's converter, once (cached). sentencepiece,
    which the converter imports whatever the tokenizer, goes into a cache folder put on its
    PYTHONPATH when this Python lacks it: nothing is installed."""
    out = CACHE / "minilm-f16.gguf"
    if out.exists():
        return out
    vendor = llama_cpp_source()
    env = converter_env(vendor)
    print("converting the model to GGUF with llama.cpp's converter (once)...",
          file=sys.stderr, flush=True)
    part = out.with_name(out.name + ".part")
    run_checked([sys.executable, "convert_hf_to_gguf.py", str(model_dir), "--outtype", "f16",
                 "--outfile", str(part)], "convert_hf_to_gguf.py", cwd=vendor, env=env)
    part.replace(out)
    return out


def in_process(path: Path, sentences: list[str], runs: int, res: Results) -> None:
    """sentence-transformers and openweight's Client, alternating, in this process."""
    from sentence_transformers import SentenceTransformer

    import openweight

    st = SentenceTransformer(str(path), device="cpu")
    res.tokens = [len(ids) for ids in st.tokenizer(sentences)["input_ids"]]
    client = openweight.Client(model=MODEL, keep_alive=0)
    ways: dict[str, Callable[[], Any]] = {
        ST: lambda: st.encode(sentences, batch_size=32),
        OW: lambda: client.embed(sentences, truncate=True).vectors,
    }
    for name, embed in ways.items():  # warm-up: the vectors compared
        res.vectors[name] = np.asarray(embed(), dtype=np.float32)
    for i in range(runs):
        for name in list(ways) if i % 2 == 0 else list(ways)[::-1]:
            start = time.perf_counter()
            ways[name]()
            res.times[name].append(time.perf_counter() - start)
            print(f"run {i + 1}/{runs}: {name}: {len(sentences) / res.times[name][-1]:.1f} "
                  "sentences/s", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def openweight_command() -> list[str]:
    exe = shutil.which("openweight")
    return [exe] if exe else [sys.executable, "-c",
                              "import sys; from openweight.cli import main; "
                              "sys.exit(main(sys.argv[1:]))"]


def start(name: str, cmd: list[str], ready: str, env: dict[str, str], logs: Path) -> Server:
    """Start a server and wait until GET ``ready`` answers 200 (the model is loaded)."""
    port = free_port()
    log = logs / f"{name.split()[0]}.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([*cmd, "--port", str(port)], stdout=out,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
    server = Server(name, f"http://127.0.0.1:{port}", proc, log)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"{name} exited at start:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(server.url + ready, timeout=2, trust_env=False).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    stop(server)
    raise SystemExit(f"{name} did not start in time:\n{log.read_text()[-3000:]}")


def stop(server: Server) -> None:
    if server.proc.poll() is None:
        server.proc.send_signal(signal.SIGINT)
        try:
            server.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.proc.kill()
            server.proc.wait()


def load(url: str, sentences: list[str], clients: int, size: int) -> tuple[float, np.ndarray]:
    """``clients`` threads send the sentences as requests of ``size`` to /v1/embeddings (the
    requests dealt out in turn); the wall time for all of them and the vectors, in order."""
    requests = [list(range(i, min(i + size, len(sentences))))
                for i in range(0, len(sentences), size)]
    out: list[Any] = [None] * len(sentences)
    errors: list[str] = []
    barrier = threading.Barrier(clients + 1)

    def client(share: list[list[int]]) -> None:
        with httpx.Client(base_url=url, timeout=600, trust_env=False) as http:
            barrier.wait()
            for idx in share:
                r = http.post("/v1/embeddings", json={"input": [sentences[i] for i in idx],
                                                      "model": MODEL})
                if r.status_code != 200:
                    errors.append(f"{r.status_code}: {r.text[:500]}")
                    return
                for item in r.json()["data"]:
                    out[idx[item["index"]]] = item["embedding"]

    threads = [threading.Thread(target=client, args=(requests[t::clients],))
               for t in range(clients)]
    for t in threads:
        t.start()
    barrier.wait()
    start_time = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start_time
    if errors or any(v is None for v in out):
        raise SystemExit(f"{url}/v1/embeddings failed: {errors[:1] or 'vectors missing'}")
    return wall, np.asarray(out, dtype=np.float32)


def servers(args: argparse.Namespace, home: Path, gguf: Path, sentences: list[str],
            threads: int, res: Results) -> None:
    """Both servers up at once, each measured under load in turn; stopped at the end."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("OPENWEIGHT_BASE_URL", "OPENWEIGHT_API_KEY")}
    env.update(OPENWEIGHT_HOME=str(home), OPENWEIGHT_KEEP_ALIVE="0", OPENWEIGHT_OFFLINE="1")
    llama = [args.llama_python, "-m", "llama_cpp.server", "--model", str(gguf),
             "--embedding", "true", "--n_threads", str(threads), "--n_threads_batch",
             str(threads), "--host", "127.0.0.1", "--verbose", "false"]
    running: list[Server] = []
    with tempfile.TemporaryDirectory(prefix="bench-embed-logs-") as logs:
        try:
            running.append(start(OW_SERVE, [*openweight_command(), "serve", "--model", MODEL],
                                 "/health", env, Path(logs)))
            running.append(start(LLAMA, llama, "/v1/models", env, Path(logs)))
            warm = sentences[:args.clients * args.request_size]
            for s in running:  # warm-up: one request from each client
                load(s.url, warm, args.clients, args.request_size)
            for i in range(args.runs):
                for s in running if i % 2 == 0 else running[::-1]:
                    wall, vectors = load(s.url, sentences, args.clients, args.request_size)
                    res.times[s.name].append(wall)
                    res.vectors.setdefault(s.name, vectors)
                    print(f"round {i + 1}/{args.runs}: {s.name}: "
                          f"{len(sentences) / wall:.1f} sentences/s", file=sys.stderr,
                          flush=True)
        finally:
            for s in running:
                stop(s)


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def report(args: argparse.Namespace, sentences: list[str], res: Results) -> bool:
    """Print the figures and the ratios; True if a target was missed."""
    words = [len(s.split()) for s in sentences]
    print(f"\n{len(sentences)} sentences: {min(words)} to {max(words)} words (median "
          f"{statistics.median(words):.0f}), {min(res.tokens)} to {max(res.tokens)} tokens")
    if max(res.tokens) > WINDOW:
        print(f"  {sum(t > WINDOW for t in res.tokens)} over the model's {WINDOW}-token window: "
              "cut by sentence-transformers and openweight (truncate=True), not by llama.cpp")
    print(f"{args.runs} runs, medians" + ("" if args.skip_server else f"; servers: "
          f"{args.clients} clients, {args.request_size} sentences a request"))
    med = {w: statistics.median(t) for w, t in res.times.items() if t}
    print(f"{'way':<24} {'median s':>9} {'sentences/s':>12}")
    for way, seconds in med.items():
        print(f"{way:<24} {seconds:>9.3f} {len(sentences) / seconds:>12.1f}")
    missed = False
    print(f"\ncosine against {ST} (target: min >= {MIN_COSINE}):")
    for way, vectors in res.vectors.items():
        if way != ST:
            cos = cosines(vectors, res.vectors[ST])
            norm = float(np.linalg.norm(vectors, axis=1).mean())
            missed |= way == OW and float(cos.min()) < MIN_COSINE
            print(f"  {way:<22} min {cos.min():.6f}  mean {cos.mean():.6f}  "
                  f"(mean vector length {norm:.3f})")
    if res.stall_share is not None:
        share = res.stall_share
        print(f"CPU contention: tasks waited for a CPU {share:.0%} of the run's wall time"
              + ("  (the machine was busy: rerun when it is quiet)" if share > 0.25 else ""))
    print("\nratios (sentences/s):")
    for way, base, target in TARGETS:
        if way in med and base in med:
            ratio = med[base] / med[way]
            missed |= ratio < target
            print(f"  {way + ' / ' + base:<40} {ratio:5.2f}x  target >= {target}x  "
                  f"{'ok' if ratio >= target else 'under'}")
    return missed


def default_llama_python() -> str:
    venv = CACHE / "venv" / "bin" / "python"
    return str(venv) if venv.exists() else sys.executable


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3, help="timed runs of each way")
    parser.add_argument("--sentences", type=int, default=1000)
    parser.add_argument("--home", help=f"an openweight store ({MODEL} is pulled into it "
                        "when missing; default: a temporary one)")
    parser.add_argument("--llama-python", default=default_llama_python(),
                        help="a Python with llama-cpp-python[server] (default: the bench "
                        "venv under ~/.cache/openweight-bench where it exists)")
    parser.add_argument("--skip-server", action="store_true", help="in one process only")
    parser.add_argument("--clients", type=int, default=8, help="concurrent server clients")
    parser.add_argument("--request-size", type=int, default=8, help="sentences a request")
    parser.add_argument("--check", action="store_true", help="exit 1 if a target is missed")
    args = parser.parse_args(argv)
    import torch

    threads = os.cpu_count() or 1
    torch.set_num_threads(threads)
    print(f"CPU: {cpu_description(threads)}")
    if not args.skip_server:
        print(f"llama.cpp built for: {llama_cpp_build(args.llama_python)}")
    res = Results()
    sentences = make_sentences(args.sentences)
    with tempfile.TemporaryDirectory(prefix="bench-embed-") as tmp:
        home = Path(args.home) if args.home else Path(tmp) / "store"
        path = model_path(home)
        gguf = None if args.skip_server else make_gguf(path)
        stall, started = cpu_stall(), time.perf_counter()
        in_process(path, sentences, args.runs, res)
        if gguf is not None:
            servers(args, home, gguf, sentences, threads, res)
        end_stall, wall = cpu_stall(), time.perf_counter() - started
    if stall is not None and end_stall is not None:
        res.stall_share = (end_stall - stall) / wall
    missed = report(args, sentences, res)
    return 1 if args.check and missed else 0


if __name__ == "__main__":
    sys.exit(main())
