"""What batching can buy on this CPU: the cost of one decode step for 1 to 16 requests.

The continuous batch (`openweight serve`) decodes every active request in one step of the
fast path's layers: the quantised matrix products take all rows at once, attention runs per
request. This script times exactly that on the default model (SmolLM2-135M), in process,
on the model thread, with no server, scheduler or HTTP around it:

- ``step``: one decode step for N requests, each with a PAST-token history in its own
  cache (``FastModel.run_layers`` with a per-request ``attend``, as the batch runs it);
- ``products``: the same step with attention skipped (the matrix products, norms and the
  output layer only): the part batching shares between rows;
- ``one call``: the step as the batch runs it where our own kernels compute the products
  (``FastModel.step``, every layer of every row in one C call, attention included), over
  the same keys; "-" where that step does not run (PyTorch's kernels, a bfloat16 model).

From those it prints the aggregate tokens/s of N requests and its ratio to one request.
``N x step(1) / step(N)`` is the most N streams can give over one stream on this machine,
whatever the scheduling around it: the figure to hold `bench_concurrency.py`'s
"8 streams / 1 stream" against.

Then (``--batch-tokens``, 0 to skip) the same N requests through the server's batch itself
(``Batching.source``, in process: scheduler, paged cache, per-request samplers, token
streams, no HTTP), each a PAST-token prompt decoding up to that many tokens greedily:
``batch ms`` is the wall time per step once every request has its first token, beside
``one call ms``, so their difference is what the scheduling around a step costs.

    python benchmarks/bench_batch_step.py [--past 100] [--steps 60] [--rows 1 2 4 8 16]

Run it alone (2 shared cores); the report ends with how long tasks waited for a CPU.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

from common import cpu_description, cpu_stall


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--past", type=int, default=100, help="tokens each request holds")
    parser.add_argument("--steps", type=int, default=60, help="timed steps per row count")
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    parser.add_argument("--quantize", default="auto", help="auto, none, int8 or int4")
    parser.add_argument("--batch-tokens", type=int, default=64,
                        help="tokens each request decodes through the batch (0: skip)")
    args = parser.parse_args(argv)

    from openweight.local import worker
    from openweight.local.engine import LocalEngine
    from openweight.store import ensure_model

    name, path = ensure_model(None)
    lm = LocalEngine(path, quantize=args.quantize).loaded
    fast = lm.fast
    if fast is None:
        raise SystemExit(f"the fast path does not take {name}: {lm.fast_off_reason}")
    stall = cpu_stall()
    started = time.perf_counter()
    rows: dict[int, tuple[float, float, float | None]] = {}
    for n in args.rows:
        rows[n] = worker.call(lambda n=n: _time_steps(fast, n, args.past, args.steps))
    batch = {n: _time_batch(lm, n, args.past, args.batch_tokens)
             for n in args.rows} if args.batch_tokens else {}
    wall = time.perf_counter() - started

    import torch

    print(f"CPU: {cpu_description(torch.get_num_threads())}")
    print(f"{name} ({lm.quantize}), decode steps with {args.past} tokens of history per "
          f"request, medians of {args.steps} steps")
    print(f"{'requests':>8} {'step ms':>8} {'tok/s':>7} {'x 1 req':>8} "
          f"{'products ms':>12} {'attention ms':>13} {'one call ms':>12} {'tok/s':>7} "
          f"{'x 1 req':>8}")
    one = rows[args.rows[0]][0] / args.rows[0]
    first_call = rows[args.rows[0]][2]
    for n, (step, products, call) in rows.items():
        calls = "-".rjust(12) + "-".rjust(8) + "-".rjust(9) if call is None or not first_call \
            else (f"{call * 1e3:>12.2f} {n / call:>7.0f} "
                  f"{n * first_call / args.rows[0] / call:>8.2f}")
        print(f"{n:>8} {step * 1e3:>8.2f} {n / step:>7.0f} {n * one / step:>8.2f} "
              f"{products * 1e3:>12.2f} {(step - products) * 1e3:>13.2f} {calls}")
    if batch:
        print(f"through the batch (Batching.source, {args.batch_tokens} tokens a request):")
        print(f"{'requests':>8} {'batch ms':>9} {'tok/s':>7} {'x 1 req':>8}")
        for n, per_step in batch.items():
            print(f"{n:>8} {per_step * 1e3:>9.2f} {n / per_step:>7.0f} "
                  f"{n * batch[args.rows[0]] / args.rows[0] / per_step:>8.2f}")
    if stall is not None:
        waited = (cpu_stall() or stall) - stall
        print(f"tasks waited for a CPU {waited:.1f} s over {wall:.1f} s of run "
              f"({100 * waited / wall:.0f}%)")
    return 0


class _Steps:
    """``n`` requests with ``past`` tokens of history each, their keys as in the batch's
    paged cache (one tensor per layer, a page a request): decode steps over them, timed."""

    def __init__(self, fast: Any, n: int, past: int, steps: int) -> None:
        import torch

        self.fast, self.n = fast, n
        caches = [fast.new_cache(past + 2 * steps + 8) for _ in range(n)]
        for i, cache in enumerate(caches):  # each request its own history
            fast.forward([(7 * i + j) % 1000 + 100 for j in range(past)], cache)
        # a step writes all rows' keys at once, then attends per request
        self.cap = caches[0].capacity
        layers = range(len(fast.layers))
        self.keys = [torch.cat([c.k[li] for c in caches], 2) for li in layers]
        self.values = [torch.cat([c.v[li] for c in caches], 2) for li in layers]
        self.lengths = [past] * n
        self.ids = torch.tensor([(11 * r) % 1000 + 100 for r in range(n)])

    def attend(self, li: int, q: Any, k: Any, v: Any) -> Any:
        import torch
        import torch.nn.functional as F

        n, cap, lengths, fast = self.n, self.cap, self.lengths, self.fast
        writes = torch.tensor([r * cap + lengths[r] for r in range(n)])
        self.keys[li].index_copy_(2, writes, k.float().unsqueeze(0))
        self.values[li].index_copy_(2, writes, v.float().unsqueeze(0))
        q = q.float().unsqueeze(0)
        outs = [F.scaled_dot_product_attention(
            q[:, :, r:r + 1], self.keys[li][:, :, r * cap:r * cap + lengths[r] + 1],
            self.values[li][:, :, r * cap:r * cap + lengths[r] + 1],
            scale=fast.layers[li].scaling, enable_gqa=fast.heads != fast.kv_heads)
            for r in range(n)]
        return outs[0] if n == 1 else torch.cat(outs, 2)

    def skip(self, li: int, q: Any, k: Any, v: Any) -> Any:
        import torch

        return torch.zeros(1, self.fast.heads, self.n, self.fast.head_dim)

    def step(self, attention: bool) -> float:
        """One step through the layers (attention per request, or skipped); seconds."""
        import torch

        fast = self.fast
        positions = torch.tensor(self.lengths)
        start = time.perf_counter()
        cos, sin = fast.rope_at(positions)
        x = fast.run_layers(fast.embed(self.ids), cos, sin,
                            self.attend if attention else self.skip)
        fast.logits(x).max(-1)
        elapsed = time.perf_counter() - start
        if attention:
            self.lengths[:] = [length + 1 for length in self.lengths]
        return elapsed

    def one_call(self) -> float:
        """One step in one call of ours over the same keys; seconds."""
        import torch

        fast, cap, lengths, dim = self.fast, self.cap, self.lengths, self.fast.head_dim
        spans = torch.tensor([[r * cap + lengths[r], r * cap, lengths[r] + 1]
                              for r in range(self.n)])
        start = time.perf_counter()
        cos, sin = fast.rope_at(spans[:, 0] - spans[:, 1])
        x = fast.embed(self.ids).float().contiguous()  # the step computes in float32
        fast.step(x, self.keys, self.values, spans, cos.float(), sin.float(),
                  head_stride=self.keys[0].shape[2] * dim, token_stride=dim)
        fast.logits(x.to(fast.dtype)).max(-1)
        elapsed = time.perf_counter() - start
        lengths[:] = [length + 1 for length in lengths]
        return elapsed


def _time_steps(fast: Any, n: int, past: int, steps: int
                ) -> tuple[float, float, float | None]:
    """Median seconds of a decode step for ``n`` requests, with and without attention, and
    in one call of ours (None where it does not run)."""
    import torch

    with torch.inference_mode():
        timer = _Steps(fast, n, past, steps)
        for _ in range(3):
            timer.step(False)
        products = statistics.median(timer.step(False) for _ in range(steps))
        full = statistics.median(timer.step(True) for _ in range(steps))
        call = (statistics.median(timer.one_call() for _ in range(steps))
                if fast.one_call else None)
    return full, products, call


def _time_batch(lm: Any, n: int, past: int, tokens: int) -> float:
    """Seconds per step of ``n`` requests decoding together through the server's batch:
    the wall time from the moment the last of them has its first token to the moment the
    first of them ends, over the steps in between (a token each per step)."""
    import threading

    from openweight.local.batching import Batching
    from openweight.options import GenerationOptions

    batch = Batching()
    greedy = GenerationOptions.from_kwargs({"temperature": 0})
    times: list[list[float]] = [[] for _ in range(n)]  # each request's token times
    start = threading.Barrier(n)

    def run(r: int) -> None:
        prompt = [(7 * r + j) % 1000 + 100 for j in range(past)]
        start.wait()
        for _ in batch.source(lm, prompt, tokens, greedy, threading.Event()):
            times[r].append(time.perf_counter())

    try:
        threads = [threading.Thread(target=run, args=(r,)) for r in range(n)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        batch.close()
    began = max(t[0] for t in times)
    ended = min(t[-1] for t in times)
    steps = max(sum(began < x <= ended for x in t) for t in times)
    return (ended - began) / max(steps, 1)


if __name__ == "__main__":
    raise SystemExit(main())
