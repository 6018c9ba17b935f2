"""What installing the llm plugin costs every `llm` command.

`llm` imports every plugin on every command, `llm --help` included. This times
`llm --help` and `llm models` in fresh processes two ways, alternating, and
compares medians:

- without plugins: ``LLM_LOAD_PLUGINS=""`` (llm then loads no plugin at all,
  only its built-in default plugins), and
- with only this one: ``LLM_LOAD_PLUGINS=llm-openweight``.

The goal is a ratio of at most 1.10 for both commands.

    python benchmarks/bench_plugin_cost.py [--runs 15] [--check]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

COMMANDS = {"llm --help": ["--help"], "llm models": ["models"]}
WAYS = {"without plugin": "", "with llm-openweight": "llm-openweight"}
LIMIT = 1.10


def llm_command() -> list[str]:
    exe = shutil.which("llm")
    return [exe] if exe else [sys.executable, "-m", "llm"]


def run_once(args: list[str], env: dict[str, str]) -> float:
    start = time.perf_counter()
    subprocess.run(args, env=env, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def loaded_plugins(env: dict[str, str]) -> list[str]:
    out = subprocess.run([*llm_command(), "plugins"], env=env, check=True,
                         capture_output=True, text=True).stdout
    return [p["name"] for p in json.loads(out)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=15, help="timed runs per command and way")
    parser.add_argument("--check", action="store_true",
                        help=f"exit 1 if a ratio is above {LIMIT}")
    args = parser.parse_args(argv)

    base = dict(os.environ)
    with tempfile.TemporaryDirectory() as user_dir:
        base["LLM_USER_PATH"] = user_dir  # a clean llm config; the model store is the user's
        envs = {way: {**base, "LLM_LOAD_PLUGINS": value} for way, value in WAYS.items()}
        plugins = {way: loaded_plugins(env) for way, env in envs.items()}
        assert plugins["without plugin"] == [], plugins
        assert plugins["with llm-openweight"] == ["llm-openweight"], plugins

        llm = llm_command()
        worst = 0.0
        print(f"{args.runs} runs each, alternating; medians in seconds")
        print(f"{'command':<12} {'without':>9} {'with':>9} {'ratio':>7}")
        for label, cmd in COMMANDS.items():
            times: dict[str, list[float]] = {way: [] for way in WAYS}
            for env in envs.values():  # warm the OS file cache first
                run_once([*llm, *cmd], env)
            for _ in range(args.runs):
                for way, env in envs.items():
                    times[way].append(run_once([*llm, *cmd], env))
            without = statistics.median(times["without plugin"])
            with_plugin = statistics.median(times["with llm-openweight"])
            ratio = with_plugin / without
            worst = max(worst, ratio)
            print(f"{label:<12} {without:>9.3f} {with_plugin:>9.3f} {ratio:>7.3f}")
    verdict = "within" if worst <= LIMIT else "OVER"
    print(f"worst ratio {worst:.3f}: {verdict} the {LIMIT:.2f} budget")
    return 1 if args.check and worst > LIMIT else 0


if __name__ == "__main__":
    sys.exit(main())
