"""Many clients at once: `openweight serve` against `transformers serve --continuous-batching`.

Both servers run the same model (the default, SmolLM2-135M: ours as `openweight serve`
loads it, transformers' from the converted model directory `openweight info` names) and
get the same requests, alternating within each round:

- one chat stream of up to TOKENS tokens (greedy): the single-stream figure;
- STREAMS such streams sent at once, each a different prompt: aggregate tokens per second
  (all completion tokens over the wall time from the first request to the last token) and
  time to first token of each stream.

Completion tokens are the servers' own counts (``usage`` on the last event). The report
gives medians over the rounds (TTFT median and 90th percentile over all streams of all
rounds) and the ratios the issue sets targets for: ours / transformers at STREAMS streams
(>= 1.0) and ours at STREAMS streams / ours single (>= 4). It is printed and written as
Markdown (default docs/bench/concurrency.md).

    python benchmarks/bench_concurrency.py [--rounds 3] [--streams 8] [--tokens 96]

This machine has 2 shared cores: the report ends with how long tasks waited for a CPU
during the run (above ~25% the figures are not worth keeping).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from common import cpu_description, cpu_stall

MODEL = "smollm2-135m"
PROMPTS = [
    "Write a long story about a dragon who learns to bake bread.",
    "Explain in detail how a bicycle works, part by part.",
    "Describe a walk through a busy market in a city by the sea.",
    "Write a long letter from a lighthouse keeper to an old friend.",
    "Tell me everything you know about the planets of the solar system.",
    "Describe how to plant and care for a vegetable garden, step by step.",
    "Write a long poem about the four seasons.",
    "Explain how bread rises, with as much detail as you can.",
    "Write a story about a robot who wants to become a painter.",
    "Describe a day in the life of a medieval blacksmith.",
    "Explain how rain forms and why it falls.",
    "Write a long dialogue between a cat and a dog about the weather.",
]


@dataclass
class Run:
    tokens: list[int] = field(default_factory=list)
    ttft: list[float] = field(default_factory=list)
    wall: float = 0.0

    @property
    def rate(self) -> float:
        return sum(self.tokens) / self.wall


@dataclass
class Server:
    name: str
    url: str
    model: str
    proc: subprocess.Popen[bytes]
    single: list[Run] = field(default_factory=list)
    multi: list[Run] = field(default_factory=list)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def model_dir() -> str:
    """A directory ``transformers serve`` loads: the store's, or, where the store keeps the
    default as its GGUF file (which transformers serve cannot take), a bfloat16 copy made
    once from it by transformers' own GGUF loading."""
    out = subprocess.run([*openweight_command(), "info", MODEL], capture_output=True,
                         text=True, check=True)
    path = Path(json.loads(out.stdout)["path"])
    if not (path / "model.gguf").exists():
        return str(path)
    converted = Path.home() / ".cache" / "openweight-bench" / f"{MODEL}-transformers"
    if not (converted / "config.json").exists():
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(path, gguf_file="model.gguf",
                                                     dtype=torch.bfloat16)
        model.hf_quantizer = None  # it saves as plain safetensors then
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(converted)
        AutoTokenizer.from_pretrained(path).save_pretrained(converted)
    return str(converted)


def openweight_command() -> list[str]:
    exe = shutil.which("openweight")
    return [exe] if exe else [sys.executable, "-c",
                              "import sys; from openweight.cli import main; "
                              "sys.exit(main(sys.argv[1:]))"]


def start(name: str, cmd: list[str], url: str, model: str, log: Path) -> Server:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OPENWEIGHT_BASE_URL")}
    env["OPENWEIGHT_KEEP_ALIVE"] = "0"
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"{name} exited at start:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return Server(name, url, model, proc)
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise SystemExit(f"{name} did not start in time:\n{log.read_text()[-3000:]}")


def stop(server: Server) -> None:
    if server.proc.poll() is None:
        server.proc.send_signal(signal.SIGINT)
        try:
            server.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.proc.kill()
            server.proc.wait()


async def one_stream(client: httpx.AsyncClient, server: Server, prompt: str,
                     tokens: int) -> tuple[float, float, int]:
    """(start, time to first token, completion tokens) of one greedy chat stream."""
    body = {"model": server.model, "messages": [{"role": "user", "content": prompt}],
            "max_tokens": tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    first = None
    count = -1
    async with client.stream("POST", server.url + "/v1/chat/completions", json=body) as r:
        if r.status_code != 200:
            raise SystemExit(f"{server.name}: HTTP {r.status_code}: {await r.aread()!r}")
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if "error" in event:
                raise SystemExit(f"{server.name}: {event['error']}")
            if first is None and any(c.get("delta", {}).get("content")
                                     for c in event.get("choices", [])):
                first = time.perf_counter() - start
            if event.get("usage"):
                count = int(event["usage"]["completion_tokens"])
    if count < 0:
        raise SystemExit(f"{server.name} sent no usage")
    return start, first if first is not None else time.perf_counter() - start, count


async def streams(server: Server, n: int, tokens: int, offset: int = 0) -> Run:
    """``n`` streams sent at once (different prompts)."""
    limits = httpx.Limits(max_connections=n + 4)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        t0 = time.perf_counter()
        done = await asyncio.gather(*[
            one_stream(client, server, PROMPTS[(offset + i) % len(PROMPTS)], tokens)
            for i in range(n)])
        wall = time.perf_counter() - t0
    return Run(tokens=[c for _, _, c in done], ttft=[f for _, f, _ in done], wall=wall)


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def report(servers: list[Server], args: argparse.Namespace, stall: float | None,
           elapsed: float) -> str:
    ours, peer = servers
    lines = [
        "# Many clients at once: `openweight serve` vs `transformers serve "
        "--continuous-batching`",
        "",
        f"Model: {MODEL} (ours: `openweight serve` defaults; transformers: "
        "`transformers serve --continuous-batching` on the converted model directory). "
        f"{args.streams} concurrent greedy chat streams of up to {args.tokens} tokens, "
        f"different prompts; {args.rounds} rounds alternating the servers; medians.",
        "Command: `python benchmarks/bench_concurrency.py"
        f" --rounds {args.rounds} --streams {args.streams} --tokens {args.tokens}`",
        f"CPU: {cpu_description(os.cpu_count() or 1)} (both servers' default threads).",
        "",
        f"| server | 1 stream tok/s | {args.streams} streams tok/s (aggregate) | "
        f"TTFT median (s) | TTFT p90 (s) | 1-stream TTFT (s) | tokens per stream |",
        "|---|---|---|---|---|---|---|",
    ]
    figures = {}
    for s in servers:
        single = statistics.median(r.rate for r in s.single)
        multi = statistics.median(r.rate for r in s.multi)
        ttft = [t for r in s.multi for t in r.ttft]
        single_ttft = statistics.median(t for r in s.single for t in r.ttft)
        per_stream = statistics.mean(c for r in s.multi for c in r.tokens)
        figures[s.name] = (single, multi)
        lines.append(f"| {s.name} | {single:.1f} | {multi:.1f} | {statistics.median(ttft):.2f} "
                     f"| {pct(ttft, 0.9):.2f} | {single_ttft:.2f} | {per_stream:.0f} |")
    o_single, o_multi = figures[ours.name]
    p_single, p_multi = figures[peer.name]
    lines += [
        "",
        f"- ours / transformers at {args.streams} streams: **{o_multi / p_multi:.2f}x** "
        "(target >= 1.0)",
        f"- ours {args.streams} streams / ours 1 stream: **{o_multi / o_single:.2f}x** "
        "(target >= 4)",
        f"- transformers {args.streams} streams / its 1 stream: {p_multi / p_single:.2f}x",
        f"- ours 1 stream / transformers 1 stream: {o_single / p_single:.2f}x",
        "",
        "Per round (tok/s, 1 stream / many streams): "
        + "; ".join(f"{s.name}: " + ", ".join(f"{a.rate:.0f}/{b.rate:.0f}"
                                              for a, b in zip(s.single, s.multi, strict=True))
                    for s in servers),
    ]
    if stall is not None:
        lines.append(f"\nTasks waited for a CPU {stall:.0f} s over {elapsed:.0f} s of run "
                     f"({100 * stall / elapsed:.0f}%): the machine is shared, figures are noisy.")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--streams", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=96)
    parser.add_argument("--out", default="docs/bench/concurrency.md")
    parser.add_argument("--logs", default=None, help="directory for the servers' logs "
                        "(default: a temporary one)")
    args = parser.parse_args()

    import tempfile

    logs = Path(args.logs or tempfile.mkdtemp(prefix="bench-concurrency-"))
    logs.mkdir(parents=True, exist_ok=True)
    path = model_dir()
    servers: list[Server] = []
    try:
        port = free_port()
        servers.append(start("openweight serve", [*openweight_command(), "serve", "--port",
                                                  str(port)],
                             f"http://127.0.0.1:{port}", MODEL, logs / "openweight.log"))
        port = free_port()
        servers.append(start("transformers serve --continuous-batching",
                             ["transformers", "serve", "--continuous-batching", "--host",
                              "127.0.0.1", "--port", str(port), path],
                             f"http://127.0.0.1:{port}", path, logs / "transformers.log"))
        for s in servers:  # warm up: first requests, the batch machinery
            asyncio.run(streams(s, 1, 16))
            asyncio.run(streams(s, args.streams, 16))
        stall0, t0 = cpu_stall(), time.perf_counter()
        for rnd in range(args.rounds):
            order = servers if rnd % 2 == 0 else servers[::-1]
            for s in order:
                s.single.append(asyncio.run(streams(s, 1, args.tokens, offset=rnd)))
                s.multi.append(asyncio.run(streams(s, args.streams, args.tokens, offset=rnd)))
                print(f"round {rnd + 1}: {s.name}: 1 stream {s.single[-1].rate:.1f} tok/s, "
                      f"{args.streams} streams {s.multi[-1].rate:.1f} tok/s", flush=True)
        elapsed = time.perf_counter() - t0
        stall1 = cpu_stall()
    finally:
        for s in servers:
            stop(s)
    stall = None if stall0 is None or stall1 is None else stall1 - stall0
    text = report(servers, args, stall, elapsed)
    print()
    print(text)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text, encoding="utf-8")
    print(f"written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
