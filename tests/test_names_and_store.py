"""Names are names (the current directory never shadows a store name), every store entry
point checks names, private locks that time out, no model code run, and pulls that fail
(disk full, Ctrl-C) leave nothing behind. Issue #19, part C."""

from __future__ import annotations

import ast
import errno
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

import openweight
from openweight import InvalidRequestError, OpenWeightError
from openweight import settings as settings_mod
from openweight.cli import main
from openweight.settings import check_model_name, is_path
from openweight.store import ensure_model, model_info, open_engine, pull, remove_model, set_default
from openweight.store import registry as registry_mod
from openweight.store.registry import StoreLockTimeout, locked

from conftest import registry_of

ROOT = Path(__file__).resolve().parent.parent
DEFAULT = "smollm2-135m"


def _shadowing_cwd(tmp_path: Path) -> Path:
    """A working directory holding a folder and a file named like store models."""
    here = tmp_path / "cwd"
    (here / DEFAULT).mkdir(parents=True)
    (here / DEFAULT / "config.json").write_text("{not json")
    (here / "tiny").write_text("not a model")
    return here


def _subprocess_env(store: Path, tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("OPENWEIGHT_BASE_URL", "OPENWEIGHT_API_KEY")}
    env.update(OPENWEIGHT_HOME=str(store), OPENWEIGHT_OFFLINE="1", OPENWEIGHT_KEEP_ALIVE="0",
               LLM_USER_PATH=str(tmp_path / "llm-user"))
    return env


# -- one rule: the spelling makes a path ---------------------------------------------------

@pytest.mark.parametrize("text", ["./m", "../m", "/m", "~/m", "~", ".", "..", "./", "~alice/m",
                                  "~\\m"])
def test_paths_look_like_paths(text: str) -> None:
    assert is_path(text)


@pytest.mark.parametrize("text", [DEFAULT, "tiny", "Qwen/Qwen3-0.6B", ".hidden", "C:\\m",
                                  "m.gguf", "", None])
def test_names_are_not_paths_whatever_exists(text: str | None, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    here = _shadowing_cwd(tmp_path)
    (here / ".hidden").mkdir()
    monkeypatch.chdir(here)
    assert not is_path(text)


@pytest.mark.parametrize("text", ["C:\\m", "c:/m", "\\\\host\\share\\m", ".\\m", "..\\m"])
def test_windows_spellings(text: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(settings_mod, "_WINDOWS", True)
    assert is_path(text)
    monkeypatch.setattr(settings_mod, "_WINDOWS", False)
    assert not is_path(text)


def test_cwd_never_shadows_a_store_name(store: Path, tiny_model: Path, tmp_path: Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    pull(str(tiny_model), name=DEFAULT)
    pull(str(tiny_model), name="tiny")
    monkeypatch.chdir(_shadowing_cwd(tmp_path))
    for name in (DEFAULT, "tiny", None):
        assert ensure_model(name)[1] == tiny_model.resolve()
        assert open_engine(name).path == tiny_model.resolve()
    assert model_info("tiny")["path"] == str(tiny_model.resolve())
    assert model_info(f"./{DEFAULT}")["path"] == str((Path.cwd() / DEFAULT).resolve())
    result = openweight.Client("tiny").chat([{"role": "user", "content": "hi"}], max_tokens=2)
    assert result.usage.completion_tokens == 2


def test_pull_takes_a_folder_only_written_as_a_path(store: Path, tiny_model: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tiny_model.parent)
    with pytest.raises(InvalidRequestError, match=rf"write it as a path: \./{tiny_model.name}"):
        pull(tiny_model.name)
    assert pull(f"./{tiny_model.name}", name="tiny").path == str(tiny_model.resolve())


def test_pull_takes_an_existing_gguf_file_as_it_is_written(
        store: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``openweight pull model.gguf``: no store name or repo id ends in .gguf, so an existing
    file of that name is the file; a missing one is a clear error, not a hub lookup."""
    import openweight.store as store_mod

    converted: list[Path] = []

    def convert(path: Path, built: Path, progress: bool) -> None:
        converted.append(path)
        raise InvalidRequestError("converted: stop here")

    monkeypatch.setattr(store_mod, "convert_gguf", convert)
    monkeypatch.setattr(store_mod, "check_gguf", lambda path: None)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "m.gguf").write_bytes(b"GGUF" + bytes(60))
    with pytest.raises(InvalidRequestError, match="converted: stop here"):
        pull("m.gguf", name="m")
    assert converted == [Path("m.gguf")]
    with pytest.raises(InvalidRequestError, match="does not exist"):
        pull("missing.gguf")


# -- every store entry point checks names ----------------------------------------------------

BAD_NAMES = ["a/b", "Tiny", ".hidden", "a b", "x" * 65, "a\\b", "-x", "gpt-oss:20b"]
ENTRY_POINTS: dict[str, Callable[[str, Path], object]] = {
    "pull --name": lambda bad, model: pull(str(model), name=bad),
    "info": lambda bad, model: model_info(bad),
    "rm": lambda bad, model: remove_model(bad),
    "default": lambda bad, model: set_default(bad),
    "ensure": lambda bad, model: ensure_model(bad),
    "open_engine": lambda bad, model: open_engine(bad),
    "the rule": lambda bad, model: check_model_name(bad),
}


@pytest.mark.parametrize("entry", sorted(ENTRY_POINTS))
@pytest.mark.parametrize("bad", BAD_NAMES)
def test_entry_points_check_names(store: Path, tiny_model: Path, entry: str, bad: str) -> None:
    with pytest.raises(InvalidRequestError, match=r"model name .* is invalid") as caught:
        ENTRY_POINTS[entry](bad, tiny_model)
    assert caught.value.param == "model"
    assert not store.exists() or not (store / "registry.json").exists()


def test_rm_of_a_path_makes_no_lock_outside_the_store(store: Path, tmp_path: Path) -> None:
    for bad in ("../x", "../../escape", "/tmp/x"):
        assert main(["rm", bad]) == 1
    assert not list(tmp_path.rglob("*.lock"))
    with pytest.raises(OpenWeightError, match="cannot name a store lock"), locked("../x"):
        pass


# -- locks: private, and waits that end --------------------------------------------------------

def test_locks_dir_is_private(store: Path, tiny_model: Path) -> None:
    (store / "locks").mkdir(parents=True, mode=0o755)
    os.chmod(store / "locks", 0o755)
    pull(str(tiny_model), name="tiny")
    assert (store / "locks").stat().st_mode & 0o777 == 0o700


def test_foreign_locks_dir_is_refused(store: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (store / "locks").mkdir(parents=True)
    uid = os.getuid()
    monkeypatch.setattr(registry_mod.os, "getuid", lambda: uid + 1)
    with pytest.raises(OpenWeightError, match="not a directory owned by you"):
        remove_model("tiny")


def test_lock_file_in_place_of_dir_is_refused(store: Path) -> None:
    store.mkdir()
    (store / "locks").write_text("")
    with pytest.raises(OpenWeightError, match="not a directory owned by you"):
        remove_model("tiny")


def test_a_held_lock_times_out_naming_its_holder(store: Path, tiny_model: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    pull(str(tiny_model), name="tiny")
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom openweight.store.registry import locked\n"
         "with locked('model-tiny'):\n    print('held', flush=True); sys.stdin.read()"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=dict(os.environ))
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        monkeypatch.setenv("OPENWEIGHT_LOCK_TIMEOUT", "0.3")
        with pytest.raises(StoreLockTimeout, match=rf"held by process {holder.pid} .*try again"):
            remove_model("tiny")
        assert main(["pull", str(tiny_model), "--name", "tiny2"]) == 0  # other names: free
    finally:
        holder.communicate("", timeout=30)
    remove_model("tiny")  # released: no wait
    monkeypatch.setenv("OPENWEIGHT_LOCK_TIMEOUT", "soon")
    with pytest.raises(OpenWeightError, match="OPENWEIGHT_LOCK_TIMEOUT"):
        remove_model("tiny2")


# -- never run a model's own code ------------------------------------------------------------

def _transformers_loads(tree: ast.AST) -> list[ast.Call]:
    return [n for n in ast.walk(tree) if isinstance(n, ast.Call)
            and isinstance(n.func, ast.Attribute)
            and n.func.attr in ("from_pretrained", "from_config")
            and isinstance(n.func.value, ast.Name) and n.func.value.id.startswith("Auto")]


def test_every_auto_load_refuses_remote_code() -> None:
    calls = 0
    for path in sorted((ROOT / "sdk" / "openweight").rglob("*.py")):
        for call in _transformers_loads(ast.parse(path.read_text(encoding="utf-8"))):
            calls += 1
            flag = [k for k in call.keywords if k.arg == "trust_remote_code"]
            assert flag and isinstance(flag[0].value, ast.Constant) and \
                flag[0].value.value is False, f"{path.name}:{call.lineno}"
    assert calls >= 6


def test_info_on_custom_code_never_prompts(store: Path, tmp_path: Path) -> None:
    folder = tmp_path / "custom"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({
        "model_type": "made-up", "architectures": ["MadeUpForCausalLM"],
        "auto_map": {"AutoConfig": "configuration_x.XConfig",
                     "AutoModelForCausalLM": "modeling_x.XForCausalLM"}}))
    (folder / "configuration_x.py").write_text("raise SystemExit('custom code ran')\n")
    done = subprocess.run([sys.executable, "-m", "openweight.cli", "info", "./custom"],
                          cwd=tmp_path, stdin=subprocess.DEVNULL, capture_output=True,
                          text=True, timeout=120, env=_subprocess_env(store, tmp_path))
    assert done.returncode == 0, done.stderr
    assert "Do you wish" not in done.stdout + done.stderr
    info = json.loads(done.stdout)
    assert info["path"] == str(folder.resolve()) and "never runs" in info["memory_estimate"]


# -- a pull that fails or is interrupted leaves nothing ----------------------------------------

def _leftovers(home: Path) -> list[str]:
    out = [str(p.relative_to(home)) for d in ("models", "tmp") if (home / d).exists()
           for p in (home / d).iterdir()]
    if (home / "registry.json").exists():
        out += list(registry_of(home)["models"])  # type: ignore[arg-type]
    return out


@pytest.mark.parametrize("stage", ["convert", "registry"])
@pytest.mark.parametrize("failure", ["disk full", "interrupted"])
def test_failed_pull_leaves_nothing(store: Path, tiny_model: Path, tmp_path: Path,
                                    monkeypatch: pytest.MonkeyPatch, stage: str,
                                    failure: str) -> None:
    import openweight.store as store_mod

    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF" + bytes(60))
    error = (OSError(errno.ENOSPC, "No space left on device") if failure == "disk full"
             else KeyboardInterrupt())

    def convert(source: Path, dest: Path, *, progress: bool) -> None:  # a copy
        shutil.copytree(tiny_model, dest)
        if stage == "convert":
            raise error

    real_write = registry_mod.write_json_atomic

    def write(path: Path, data: object) -> None:
        if stage == "registry" and failing:
            raise error
        real_write(path, data)

    monkeypatch.setattr(store_mod, "convert_gguf", convert)
    monkeypatch.setattr(registry_mod, "write_json_atomic", write)
    failing = True
    if failure == "disk full":
        assert main(["pull", str(gguf), "--name", "m", "-q"]) == 1
    else:
        assert main(["pull", str(gguf), "--name", "m", "-q"]) == 130
    assert _leftovers(store) == []
    with pytest.raises(openweight.ModelNotFoundError):
        ensure_model("m")
    failing = False
    stage = "none"
    info = pull(str(gguf), name="m", progress=False)  # the next pull works
    assert _leftovers(store) == ["models/m", "m"] and Path(info.path or "").is_dir()


def test_disk_full_error_is_one_clear_line(store: Path, tiny_model: Path, tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    import openweight.store as store_mod

    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF" + bytes(60))

    def convert(source: Path, dest: Path, *, progress: bool) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(store_mod, "convert_gguf", convert)
    assert main(["pull", str(gguf), "-q"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("Error: pulling m failed: no space left") and "\n" not in err
    assert "nothing was installed" in err and "OPENWEIGHT_HOME" in err


# -- through the real entry points, in a shadowing working directory --------------------------

def test_llm_and_info_use_the_store_model_whatever_cwd_holds(
        store: Path, tiny_model: Path, tmp_path: Path) -> None:
    pull(str(tiny_model), name=DEFAULT)
    here = _shadowing_cwd(tmp_path)
    env = _subprocess_env(store, tmp_path)
    info = subprocess.run([sys.executable, "-m", "openweight.cli", "info", DEFAULT], cwd=here,
                          capture_output=True, text=True, timeout=120, env=env,
                          stdin=subprocess.DEVNULL)
    assert info.returncode == 0, info.stderr
    assert json.loads(info.stdout)["path"] == str(tiny_model.resolve())
    llm_bin = Path(sys.executable).with_name("llm")
    command = [str(llm_bin)] if llm_bin.exists() else [sys.executable, "-m", "llm"]
    answer = subprocess.run([*command, "-m", "openweight", "-o", "max_tokens", "2", "hi"],
                            cwd=here, capture_output=True, text=True, timeout=300, env=env,
                            stdin=subprocess.DEVNULL)
    assert answer.returncode == 0, answer.stderr
    assert "Error" not in answer.stderr
