"""The CUDA path, checked on a machine with an NVIDIA GPU (run it where one is lent).

    python benchmarks/gpu_check.py

Reports: the device and dtype `auto` picks, whether gpt-oss's MXFP4 weights would stay
packed (and why not), a tiny random gpt-oss running on the GPU through the real loading
path, greedy decode speed of the embedded default on the GPU against the CPU, and the
server's continuous batch on the GPU (transformers' own forward there): 8 concurrent
greedy streams against 1, and how many of the 8 answers equal their answers alone.
Prints one JSON object; exits 1 if CUDA is not available.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))


def decode_speed(client: object, tokens: int = 128) -> float:
    from openweight import Client

    assert isinstance(client, Client)
    messages = [{"role": "user", "content": "Write a long story about a dragon who cooks."}]
    client.chat(messages, max_tokens=4)
    first = end = None
    count = 0
    for chunk in client.stream(messages, max_tokens=tokens, temperature=0):
        now = time.perf_counter()
        if first is None and chunk.text:
            first = now
        end = now
        if chunk.usage:
            count = chunk.usage.completion_tokens
    assert first is not None and end is not None
    return (count - 1) / (end - first)


def batch_speed(device: str, streams: int = 8, tokens: int = 96) -> dict[str, object]:
    """Aggregate tokens/s of 1 and of ``streams`` concurrent requests through the server's
    batch (in process, no HTTP), on ``device``."""
    import threading

    from openweight.backends import collect
    from openweight.local.batching import Batching
    from openweight.local.engine import LocalEngine
    from openweight.options import GenerationOptions
    from openweight.store import ensure_model
    from openweight.types import ChatResult
    from openweight.wire import to_messages

    engine = LocalEngine(ensure_model(None)[1], device=device)
    options = GenerationOptions.from_kwargs({"temperature": 0, "max_tokens": tokens})
    messages = [to_messages([{"role": "user", "content": f"Write a long story about "
                                                          f"animal number {i}."}])
                for i in range(streams)]
    alone = [collect(engine.stream(m, options), "x") for m in messages]
    batch = Batching()
    try:
        def run(count: int) -> tuple[float, dict[int, ChatResult]]:
            out: dict[int, ChatResult] = {}

            def one(i: int) -> None:
                out[i] = collect(engine.stream(messages[i], options, source=batch.source), "x")

            threads = [threading.Thread(target=one, args=(i,)) for i in range(count)]
            start = time.perf_counter()
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            elapsed = time.perf_counter() - start
            return sum(r.usage.completion_tokens for r in out.values()) / elapsed, out

        run(2)  # warm-up
        single, _ = run(1)
        many, answers = run(streams)
        return {"batch_1_stream_tok_s": round(single, 1),
                f"batch_{streams}_streams_tok_s": round(many, 1),
                "batch_ratio": round(many / single, 2),
                "batch_answers_equal_alone": sum(answers[i].text == alone[i].text
                                                 for i in range(streams)),
                "batch_stats": batch.stats()}
    finally:
        batch.close()


def main() -> int:
    import torch

    from openweight import Client
    from openweight.local.resolve import mxfp4_supported, resolve_device, resolve_dtype

    from conftest import build_tiny_gpt_oss

    report: dict[str, object] = {"cuda_available": torch.cuda.is_available()}
    if not torch.cuda.is_available():
        print(json.dumps(report))
        return 1
    device = resolve_device("auto")
    report.update(device=device, gpu=torch.cuda.get_device_name(0),
                  dtype=resolve_dtype("auto", device))
    keep, why = mxfp4_supported(device)
    report.update(mxfp4_kept=keep, mxfp4_reason=why)
    with tempfile.TemporaryDirectory() as tmp:
        path = build_tiny_gpt_oss(Path(tmp) / "tiny-gpt-oss")
        client = Client(str(path))
        result = client.chat([{"role": "user", "content": "hi"}], max_tokens=16,
                             reasoning_effort="low")
        lm = client.backend.loaded  # type: ignore[attr-defined]
        report.update(tiny_gpt_oss_device=str(next(lm.model.parameters()).device),
                      tiny_gpt_oss_tokens=result.usage.completion_tokens)
    report["smollm2_gpu_tok_s"] = round(decode_speed(Client()), 1)
    report["smollm2_cpu_tok_s"] = round(decode_speed(Client(device="cpu")), 1)
    report.update(batch_speed(device))
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
