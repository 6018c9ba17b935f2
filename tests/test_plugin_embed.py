"""`llm embed`, `embed-multi`, `similar` and `embed-models` with openweight's embedding
models, through llm's own CLI (in process), and the keep-alive path for embeddings."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

import openweight

from plugin_helpers import assert_error, run


@pytest.fixture()
def embed_env(env: Path, tiny_embedder: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The plugin's env (the tiny chat model as ``tiny``) plus the tiny embedding model
    as ``tiny-embed``, made the default embedding model; keep-alive off."""
    openweight.pull(str(tiny_embedder), name="tiny-embed", progress=False)
    openweight.set_default("tiny-embed")
    monkeypatch.setenv("OPENWEIGHT_KEEP_ALIVE", "0")
    return env


def test_embed_models_lists_the_embedding_models_and_chat_does_not(embed_env: Path) -> None:
    listed = run("embed-models").output
    assert "openweight-embed/tiny-embed" in listed
    assert "openweight-embed/all-minilm-l6-v2" in listed
    assert "openweight-embed/tiny\n" not in listed  # a chat model is not an embedding model
    chat = run("models").output
    assert "openweight/tiny-embed" not in chat and "openweight/tiny" in chat


def test_llm_embed_prints_the_vector(embed_env: Path) -> None:
    result = run("embed", "-m", "openweight-embed", "-c", "hello")
    assert result.exit_code == 0, result.output
    vector = json.loads(result.stdout)
    assert len(vector) == 32 and abs(math.hypot(*vector) - 1) < 1e-3
    named = run("embed", "-m", "openweight-embed/tiny-embed", "-c", "hello")
    assert json.loads(named.stdout) == pytest.approx(vector, abs=1e-6)
    expected = openweight.Client(model="tiny-embed").embed("hello").vectors[0]
    assert vector == pytest.approx(expected, abs=1e-6)


def test_embed_multi_and_similar(embed_env: Path, tmp_path: Path) -> None:
    rows = tmp_path / "rows.csv"
    rows.write_text("id,text\n1,cats and dogs\n2,stock markets\n3,dogs and cats\n")
    db = str(tmp_path / "e.db")
    result = run("embed-multi", "docs", str(rows), "-m", "openweight-embed", "-d", db)
    assert result.exit_code == 0, result.output
    similar = run("similar", "docs", "1", "-d", db)
    assert similar.exit_code == 0, similar.output
    ids = [json.loads(line)["id"] for line in similar.output.splitlines()]
    assert sorted(ids) == ["2", "3"]
    files = tmp_path / "files"
    files.mkdir()
    for n in range(40):  # more than one batch of 32
        (files / f"{n}.txt").write_text(f"note number {n}")
    result = run("embed-multi", "notes", "--files", str(files), "*.txt",
                 "-m", "openweight-embed", "-d", db)
    assert result.exit_code == 0, result.output
    import sqlite3

    count = sqlite3.connect(db).execute(
        "select count(*) from embeddings where collection_id = "
        "(select id from collections where name = 'notes')").fetchone()[0]
    assert count == 40


def test_llm_embed_errors_are_clean(embed_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert_error(run("embed", "-m", "openweight-embed", "-c", "x" * 80),
                 "is 80 tokens long", "at most 48", "OPENWEIGHT_EMBED_TRUNCATE")
    monkeypatch.setenv("OPENWEIGHT_EMBED_TRUNCATE", "1")
    assert run("embed", "-m", "openweight-embed", "-c", "x" * 80).exit_code == 0
    monkeypatch.setenv("OPENWEIGHT_EMBED_TRUNCATE", "maybe")
    result = run("embed", "-m", "openweight-embed", "-c", "x")
    assert result.exit_code == 1 and "OPENWEIGHT_EMBED_TRUNCATE='maybe'" in result.output


def test_openweight_models_shows_the_kind(embed_env: Path) -> None:
    table = run("openweight", "models").output.splitlines()
    assert table[0].split()[:2] == ["NAME", "KIND"]
    kinds = {line.split()[0]: line.split()[2 if "(default)" in line else 1]
             for line in table[1:]}
    assert kinds["tiny-embed"] == "embedding" and kinds["tiny"] == "chat"
    assert run("openweight", "default", "--embedding").output == "tiny-embed\n"


@pytest.mark.slow
def test_embed_through_a_keep_alive_server(embed_env: Path, tmp_path: Path) -> None:
    """A fresh `llm embed` with keep-alive on starts a server for the embedding model; the
    next call is answered by it, with the same vector."""
    import os

    env = {**os.environ, "OPENWEIGHT_KEEP_ALIVE": "1m"}
    cmd = [sys.executable, "-c", "from llm.cli import cli; cli()", "embed", "-m",
           "openweight-embed", "-c", "hello"]
    try:
        first = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
        assert first.returncode == 0, first.stderr
        ps = subprocess.run([sys.executable, "-m", "openweight.cli", "ps"], env=env,
                            capture_output=True, text=True, timeout=60)
        assert "tiny-embed" in ps.stdout, ps.stdout + ps.stderr
        second = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
        assert json.loads(second.stdout) == pytest.approx(json.loads(first.stdout), abs=1e-6)
    finally:
        subprocess.run([sys.executable, "-m", "openweight.cli", "stop"], env=env,
                       capture_output=True, timeout=60)
