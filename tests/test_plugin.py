"""The llm plugin, through llm's own CLI and Python API, offline.

Tiny random models answer with random text: these tests compare runs and paths
with each other and check token counts and finish reasons, never the words.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, ClassVar

import llm
import pytest

import openweight
from llm_openweight import models as plugin_models
from openweight import Chunk, Usage
from openweight.local import engine as local_engine

from plugin_helpers import GREEDY, TINY, Spy, assert_error, logged, run

# -- registration -----------------------------------------------------------------------


def test_models_listed_with_install_state(env: Path) -> None:
    result = run("models")
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert "OpenWeight: openweight/tiny (installed)" in lines
    assert "OpenWeight: openweight/smollm2-135m (in the catalog: pulled on first use)" in lines
    assert "OpenWeight: openweight (the default model, now smollm2-135m)" in lines
    for name, entry in openweight.store.CATALOG.items():
        shown = f"OpenWeight: openweight/{name} (in the catalog: pulled on first use)" in lines
        assert shown == (entry.kind != "embedding")  # those are openweight-embed/NAME
    installed = run("models", "-q", "installed").output.splitlines()
    assert [line for line in installed if "openweight" in line] == [
        "OpenWeight: openweight/tiny (installed)"]
    # every model has an async twin
    async_ids = {m.model_id for m in llm.get_async_models()}
    assert {"openweight", TINY} <= async_ids


def test_models_options_show_descriptions_and_bounds(env: Path) -> None:
    result = run("models", "--options", "-m", TINY)
    assert result.exit_code == 0, result.output
    out = " ".join(result.output.split())
    for name, spec in openweight.options.OPTION_SPECS.items():
        assert f"{name}: {spec.kind.__name__}" in out
        assert spec.description.split()[0] in out
        assert (spec.bounds_text() if spec.kind is not bool else "true or false") in out
    for name in ("stop: str, array", "device: str", "dtype: str", "quantize: str",
                 "remote: str"):
        assert name in out
    assert "streaming" in out and "async" in out and "OPENWEIGHT_API_KEY" in out
    assert "schemas" in out and "tools" in out


def test_options_match_the_sdk_specs() -> None:
    fields = plugin_models.options_class().model_fields
    assert set(openweight.options.OPTION_SPECS) <= set(fields)
    assert set(fields) - set(openweight.options.OPTION_SPECS) == {
        "stop", "device", "dtype", "quantize", "remote", "keep_alive"}


def test_import_and_registration_load_no_torch(env: Path) -> None:
    code = (
        "import sys, llm, llm_openweight\n"
        "from llm.plugins import load_plugins, pm\n"
        "load_plugins()\n"
        "if not pm.is_registered(llm_openweight): pm.register(llm_openweight, name='ow')\n"
        "heavy = lambda: [m for m in ('torch', 'transformers') if m in sys.modules]\n"
        "assert heavy() == [], heavy()\n"
        "ids = [m.model_id for m in llm.get_models()]\n"
        "assert 'openweight/tiny' in ids, ids\n"
        "from llm_openweight.models import options_class\n"
        "assert options_class.cache_info().currsize == 0  # built only when needed\n"
        "import llm.cli\n"
        "assert heavy() == [], heavy()\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_broken_registry_does_not_break_llm(env: Path, store: Path) -> None:
    (store / "registry.json").write_text("{not json")
    result = run("models")
    assert result.exit_code == 0, result.output
    assert "openweight/smollm2-135m" in result.output
    assert_error(run("-m", "openweight/smollm2-135m", "hi"), "registry")


# -- prompting ------------------------------------------------------------------------------


def test_prompt_stream_and_no_stream_agree(env: Path) -> None:
    streamed = run("-m", TINY, "hello", *GREEDY)
    assert streamed.exit_code == 0, streamed.output
    plain = run("-m", TINY, "hello", "--no-stream", *GREEDY)
    assert plain.exit_code == 0, plain.output
    assert streamed.stdout == plain.stdout
    model = llm.get_model(TINY)
    assert model.can_stream
    chunks = list(model.prompt("hello", temperature=0, max_tokens=6))
    assert "".join(chunks) + "\n" == streamed.stdout


def test_response_json_usage_and_logs(env: Path) -> None:
    result = run("-m", TINY, "hello", *GREEDY, "-u")
    assert result.exit_code == 0, result.output
    assert "Token usage:" in result.stderr
    (row,) = logged(env)
    info = row["response_json"]
    assert info["model"] == "tiny"
    assert info["finish_reason"] in ("stop", "length")
    usage = info["usage"]
    assert row["input_tokens"] == usage["prompt_tokens"] > 0
    assert row["output_tokens"] == usage["completion_tokens"]
    assert 1 <= usage["completion_tokens"] <= 6
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    if usage["completion_tokens"] > 1:
        assert info["tokens_per_second"] > 0
    assert info["duration_s"] >= info["time_to_first_token_s"] >= 0
    assert info["remote"] is None
    assert row["model"] == TINY


def test_max_tokens_gives_length(env: Path) -> None:
    response = llm.get_model(TINY).prompt("hello", max_tokens=1, temperature=0)
    response.text()
    assert response.output_tokens == 1
    assert response.response_json is not None
    assert response.response_json["finish_reason"] in ("length", "stop")


def test_system_prompt_reaches_the_model(env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spy = Spy(monkeypatch)
    with_system = run("-m", TINY, "hello", "-s", "be brief", *GREEDY)
    assert with_system.exit_code == 0, with_system.output
    messages, _ = spy.calls[-1]
    assert messages == [{"role": "system", "content": "be brief"},
                        {"role": "user", "content": "hello"}]
    # the system prompt changes the token count the model saw
    (row,) = logged(env)
    bare = llm.get_model(TINY).prompt("hello", temperature=0, max_tokens=1)
    bare.text()
    assert row["input_tokens"] > (bare.input_tokens or 0)


def test_every_option_passes_through(env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spy = Spy(monkeypatch)
    args = ["-o", "max_tokens", "4", "-o", "temperature", "0.7", "-o", "top_p", "0.9",
            "-o", "top_k", "20", "-o", "min_p", "0.05", "-o", "repetition_penalty", "1.1",
            "-o", "seed", "7", "-o", "stop", "zz", "-o", "device", "cpu",
            "-o", "dtype", "float32", "-o", "quantize", "int8"]
    first = run("-m", TINY, "hello", *args)
    assert first.exit_code == 0, first.output
    _, options = spy.calls[-1]
    assert options == {"max_tokens": 4, "temperature": 0.7, "top_p": 0.9, "top_k": 20,
                       "min_p": 0.05, "repetition_penalty": 1.1, "seed": 7, "stop": "zz"}
    assert spy.inits[-1] == {"model": "tiny", "base_url": None, "api_key": None,
                             "device": "cpu", "dtype": "float32", "quantize": "int8",
                             "keep_alive": 0}  # in this process: never via keep-alive
    again = run("-m", TINY, "hello", *args)  # same seed, same sample
    assert again.stdout == first.stdout
    assert len(spy.inits) == 1  # the client (and its loaded model) was reused


def test_stop_as_a_list_from_python(env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spy = Spy(monkeypatch)
    llm.get_model(TINY).prompt("hi", stop=["a", "b"], max_tokens=3).text()
    assert spy.calls[-1][1]["stop"] == ["a", "b"]


BAD_OPTIONS = [
    ("max_tokens", "0"), ("max_tokens", "1.5"), ("max_tokens", "many"),
    ("max_tokens", "1000001"),
    ("temperature", "-0.1"), ("temperature", "2.5"), ("temperature", "nan"),
    ("temperature", "hot"),
    ("top_p", "0"), ("top_p", "1.5"),
    ("top_k", "-1"), ("top_k", "100001"), ("top_k", "2.5"),
    ("min_p", "-0.5"), ("min_p", "1.5"),
    ("repetition_penalty", "0"), ("repetition_penalty", "10.5"),
    ("seed", "-1"), ("seed", "x"), ("seed", str(2**63)),
    ("stop", ""),
    ("device", "tpu"), ("dtype", "int3"),
    ("remote", "ftp://host/v1"), ("remote", "localhost:8000"),
    ("no_such_option", "1"),
] + [(name, "no-such-choice") for name, spec in openweight.options.OPTION_SPECS.items()
     if spec.choices or spec.kind is bool]


@pytest.mark.parametrize(("name", "value"), BAD_OPTIONS)
def test_bad_option_values_give_a_clean_error(env: Path, name: str, value: str) -> None:
    result = run("-m", TINY, "hello", "-o", name, value)
    assert_error(result, name)
    assert logged(env) == []


def test_bad_option_in_python_is_a_value_error(env: Path) -> None:
    with pytest.raises(ValueError, match="temperature"):
        llm.get_model(TINY).prompt("hi", temperature=9)


def test_unknown_model_name(env: Path) -> None:
    assert_error(run("-m", "openweight/no-such-model", "hi"), "Unknown model")
    with pytest.raises(llm.UnknownModelError):
        llm.get_model("openweight/no-such-model")


def test_catalog_model_not_installed_offline(env: Path) -> None:
    assert_error(run("-m", "openweight/qwen3-0.6b", "hi"), "not installed", "offline")


def test_prompt_too_long_is_one_line(env: Path, store: Path, short_model: Path) -> None:
    openweight.pull(str(short_model), name="short", progress=False)
    result = run("-m", "openweight/short", "word " * 40)
    assert_error(result, "context window")
    assert result.stderr.strip().count("\n") == 0
    with pytest.raises(ValueError, match="context window") as info:
        llm.get_model("openweight/short").prompt("word " * 40).text()
    assert isinstance(info.value, llm.ModelError)
    assert isinstance(info.value.__cause__, openweight.InvalidRequestError)


def test_sdk_errors_become_model_errors(env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(self: Any, messages: Any, **options: Any) -> Any:
        raise openweight.GenerationError("the engine fell over; try again")

    monkeypatch.setattr(openweight.Client, "stream", broken)
    with pytest.raises(llm.ModelError, match="fell over") as info:
        llm.get_model(TINY).prompt("hi").text()
    assert not isinstance(info.value, ValueError)
    assert_error(run("-m", TINY, "hi"), "fell over")
    # llm chat does not catch model errors itself: still no traceback
    assert_error(run("chat", "-m", TINY, input="hi\nquit\n"), "fell over")


def test_default_model_follows_the_store(env: Path) -> None:
    assert run("openweight", "default", "tiny").exit_code == 0
    result = run("-m", "openweight", "hello", *GREEDY)
    assert result.exit_code == 0, result.output
    assert result.stdout == run("-m", TINY, "hello", *GREEDY).stdout
    first = logged(env)[0]
    assert first["model"] == "openweight"
    assert first["resolved_model"] == TINY
    assert "now tiny" in run("models").output


# -- conversations --------------------------------------------------------------------------


def test_chat_keeps_history_and_loads_once(env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spy = Spy(monkeypatch)
    loads: list[Any] = []
    real_load = local_engine.load_model

    def counting_load(*args: Any, **kwargs: Any) -> Any:
        loads.append(args)
        return real_load(*args, **kwargs)

    monkeypatch.setattr(local_engine, "load_model", counting_load)
    result = run("chat", "-m", TINY, "-s", "terse", "-o", "max_tokens", "3",
                 "-o", "temperature", "0", input="one\ntwo\nthree\nquit\n")
    assert result.exit_code == 0, result.output
    assert [len(messages) for messages, _ in spy.calls] == [2, 4, 6]
    last = spy.calls[-1][0]
    assert [m["role"] for m in last] == ["system", "user", "assistant", "user", "assistant",
                                         "user"]
    assert [m["content"] for m in last if m["role"] == "user"] == ["one", "two", "three"]
    rows = logged(env)
    assert [m["content"] for m in last if m["role"] == "assistant"] == [
        r["response"] for r in rows[:2]]
    assert len({r["conversation_id"] for r in rows}) == 1
    assert len(spy.inits) == 1 and len(loads) == 1  # loaded once, for all three turns


def test_continue_sends_the_earlier_turns(env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spy = Spy(monkeypatch)
    first = run("-m", TINY, "first question", *GREEDY)
    assert first.exit_code == 0, first.output
    second = run("-c", "second question", *GREEDY)
    assert second.exit_code == 0, second.output
    messages, _ = spy.calls[-1]
    assert messages == [
        {"role": "user", "content": "first question"},
        {"role": "assistant", "content": first.stdout[:-1]},
        {"role": "user", "content": "second question"},
    ]
    rows = logged(env)
    assert rows[0]["conversation_id"] == rows[1]["conversation_id"]
    assert rows[1]["input_tokens"] > rows[0]["input_tokens"]


def test_get_model_reuses_the_loaded_client(env: Path) -> None:
    llm.get_model(TINY).prompt("a", max_tokens=2).text()
    client = next(iter(plugin_models._clients.values()))
    llm.get_model(TINY).prompt("b", max_tokens=2).text()
    assert list(plugin_models._clients.values()) == [client]


# -- async ------------------------------------------------------------------------------------


async def test_async_model_matches_sync(env: Path) -> None:
    sync = llm.get_model(TINY).prompt("hello", temperature=0, max_tokens=8)
    text = sync.text()
    model = llm.get_async_model(TINY)
    response = model.prompt("hello", temperature=0, max_tokens=8)
    assert await response.text() == text
    assert (await response.usage()).output == sync.usage().output
    assert response.response_json is not None and sync.response_json is not None
    assert response.response_json["finish_reason"] == sync.response_json["finish_reason"]
    streamed = [c async for c in model.prompt("hello", temperature=0, max_tokens=8)]
    assert "".join(streamed) == text


def test_async_cli_matches_sync(env: Path) -> None:
    sync = run("-m", TINY, "hello", *GREEDY)
    asynchronous = run("-m", TINY, "hello", "--async", *GREEDY)
    assert asynchronous.exit_code == 0, asynchronous.output
    assert asynchronous.stdout == sync.stdout


# -- reasoning, remote: scripted clients -----------------------------------------------------

SCRIPT = [Chunk(reasoning="Let me think. "), Chunk(reasoning="Two plus two."),
          Chunk(text="It is "), Chunk(text="4."),
          Chunk(finish_reason="stop", usage=Usage(prompt_tokens=7, completion_tokens=9))]


class FakeClient:
    """Yields SCRIPT; records how it was built and what it was sent."""

    made: ClassVar[list[dict[str, Any]]] = []
    sent: ClassVar[list[list[dict[str, Any]]]] = []
    options: ClassVar[list[dict[str, Any]]] = []
    keep_alive_url = None

    def __init__(self, model: str | None = None, **kwargs: Any) -> None:
        self.made.append({"model": model, **kwargs})
        self.model = model or "server-default"

    def stream(self, messages: Any, **options: Any) -> openweight.Stream:
        self.sent.append(list(messages))
        self.options.append(options)
        return openweight.Stream(iter(SCRIPT))


class FakeAsyncClient(FakeClient):
    def stream(self, messages: Any, **options: Any) -> openweight.AsyncStream:  # type: ignore[override]
        self.sent.append(list(messages))

        async def chunks() -> AsyncIterator[Chunk]:
            for chunk in SCRIPT:
                yield chunk

        return openweight.AsyncStream(chunks())


@pytest.fixture()
def fake(env: Path, monkeypatch: pytest.MonkeyPatch) -> type[FakeClient]:
    monkeypatch.setattr(FakeClient, "made", [])
    monkeypatch.setattr(FakeClient, "sent", [])
    monkeypatch.setattr(FakeClient, "options", [])
    monkeypatch.setattr(openweight, "Client", FakeClient)
    monkeypatch.setattr(openweight, "AsyncClient", FakeAsyncClient)
    return FakeClient


@pytest.mark.parametrize("mode", [[], ["--async"], ["--no-stream"]])
def test_reasoning_shown_and_hidden(fake: type[FakeClient], env: Path,
                                    mode: list[str]) -> None:
    shown = run("-m", TINY, "2+2?", *mode)
    assert shown.exit_code == 0, shown.output
    assert shown.stdout == "It is 4.\n"
    if "--no-stream" not in mode:  # llm prints reasoning only while streaming
        assert "Let me think. Two plus two." in shown.stderr
    hidden = run("-m", TINY, "2+2?", "-R", *mode)
    assert hidden.exit_code == 0, hidden.output
    assert hidden.stdout == "It is 4.\n"
    assert "think" not in hidden.stderr
    assert [r["reasoning"] for r in logged(env)] == ["Let me think. Two plus two."] * 2


def test_reasoning_is_kept_as_a_part(fake: type[FakeClient]) -> None:
    response = llm.get_model(TINY).prompt("2+2?")
    assert response.text() == "It is 4."
    (message,) = response.messages()
    kinds = [type(p).__name__ for p in message.parts]
    assert kinds == ["ReasoningPart", "TextPart"]
    assert response.input_tokens == 7 and response.output_tokens == 9
    # the next turn hands the reasoning back with the answer
    response.reply("and 3+3?").text()
    assert fake.sent[-1][1] == {"role": "assistant", "content": "It is 4.",
                                "reasoning": "Let me think. Two plus two."}


def test_choice_and_switch_options_pass_through(fake: type[FakeClient]) -> None:
    for name, spec in openweight.options.OPTION_SPECS.items():
        if spec.choices:
            result = run("-m", TINY, "hi", "-o", name, spec.choices[-1].upper())
            assert result.exit_code == 0, result.output
            assert fake.options[-1] == {name: spec.choices[-1]}
        elif spec.kind is bool:
            for given, value in (("false", False), ("on", True)):
                result = run("-m", TINY, "hi", "-o", name, given)
                assert result.exit_code == 0, result.output
                assert fake.options[-1] == {name: value}


def test_remote_option_passes_base_url(fake: type[FakeClient], env: Path) -> None:
    result = run("-m", TINY, "hi", "-o", "remote", "http://gpu-box:8000/v1/")
    assert result.exit_code == 0, result.output
    assert fake.made[-1] == {"model": "tiny", "base_url": "http://gpu-box:8000/v1",
                             "api_key": None, "device": None, "dtype": None,
                             "quantize": None}
    info = logged(env)[-1]["response_json"]
    assert info["remote"] == "http://gpu-box:8000/v1"
    # the key: `llm keys set openweight`, or --key, or OPENWEIGHT_API_KEY
    assert run("keys", "set", "openweight", "--value", "stored-key").exit_code == 0
    run("-m", TINY, "hi", "-o", "remote", "http://gpu-box:8000/v1")
    assert fake.made[-1]["api_key"] == "stored-key"
    run("-m", TINY, "hi", "-o", "remote", "http://gpu-box:8000/v1", "--key", "explicit")
    assert fake.made[-1]["api_key"] == "explicit"
    # `openweight` on a remote lets the server pick its model
    run("-m", "openweight", "hi", "-o", "remote", "http://gpu-box:8000/v1")
    assert fake.made[-1]["model"] is None
    assert logged(env)[-1]["resolved_model"] == "openweight/server-default"


def test_env_key_and_local_needs_no_key(fake: type[FakeClient],
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    assert run("-m", TINY, "hi").exit_code == 0  # no key anywhere: fine locally
    assert fake.made[-1]["api_key"] is None and fake.made[-1]["base_url"] is None
    monkeypatch.setenv("OPENWEIGHT_API_KEY", "env-key")
    run("-m", TINY, "hi", "-o", "remote", "http://h:1/v1")
    assert fake.made[-1]["api_key"] == "env-key"
    run("-m", TINY, "hi")
    assert len(fake.made) == 2  # the local client was reused: it never got a key


def test_remote_command_sets_the_default(fake: type[FakeClient], env: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    assert "local" in run("openweight", "remote").output
    result = run("openweight", "remote", "http://gpu-box:8000/v1")
    assert result.exit_code == 0, result.output
    assert json.loads((env / "openweight.json").read_text()) == {
        "remote": "http://gpu-box:8000/v1"}
    assert run("openweight", "remote").stdout == "http://gpu-box:8000/v1\n"
    run("-m", TINY, "hi")
    assert fake.made[-1]["base_url"] == "http://gpu-box:8000/v1"
    run("-m", TINY, "hi", "-o", "remote", "http://other:1/v1")  # the option wins
    assert fake.made[-1]["base_url"] == "http://other:1/v1"
    monkeypatch.setenv("OPENWEIGHT_BASE_URL", "http://env:2/v1")  # so does the variable
    run("-m", TINY, "hi")
    assert fake.made[-1]["base_url"] == "http://env:2/v1"
    monkeypatch.delenv("OPENWEIGHT_BASE_URL")
    assert run("openweight", "remote", "--off").exit_code == 0
    run("-m", TINY, "hi")
    assert fake.made[-1]["base_url"] is None
    assert_error(run("openweight", "remote", "not-a-url"), "not a base URL")
    assert run("openweight", "remote", "http://x:1/v1", "--off").exit_code == 2


def test_auth_error_says_how_to_set_the_key(fake: type[FakeClient],
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    def refused(self: Any, messages: Any, **options: Any) -> Any:
        raise openweight.AuthenticationError("the server refused the API key")

    monkeypatch.setattr(FakeClient, "stream", refused)
    result = run("-m", TINY, "hi", "-o", "remote", "http://h:1/v1")
    assert_error(result, "refused the API key", "llm keys set openweight")


def test_unreachable_remote_is_a_clean_error(env: Path) -> None:
    pytest.importorskip("openweight.remote")
    import socket

    with socket.socket() as s:  # a loopback port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    result = run("-m", TINY, "hi", "-o", "remote", f"http://127.0.0.1:{port}/v1")
    assert_error(result)
    assert result.stderr.strip().count("\n") == 0


# -- llm openweight ... ----------------------------------------------------------------------


def direct(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """What the `openweight` console command prints for the same arguments."""
    from openweight.cli import main

    try:
        code = main(list(argv))
    except SystemExit as exc:
        code = int(exc.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("argv", [
    ["models"], ["models", "--json"], ["info", "tiny"], ["default"], ["info", "nope"],
    ["rm", "nope"], ["pull"], ["models", "--bogus"], ["models", "-h"],
])
def test_commands_match_the_console_command(env: Path, capsys: pytest.CaptureFixture[str],
                                            argv: list[str]) -> None:
    result = run("openweight", *argv)
    code, out, err = direct(capsys, *argv)
    # free memory is read at each call: it moves whenever anything else on the machine runs
    free = re.compile(r'"free_gb": [0-9.]+')
    assert (result.exit_code, free.sub("", result.stdout), result.stderr) == (
        code, free.sub("", out), err)
    assert "Traceback" not in result.output
    if code == 1:
        assert err.startswith("Error: ") and err.count("\n") == 1


def test_commands_pull_default_rm(env: Path, tiny_model: Path, store: Path) -> None:
    result = run("openweight", "pull", str(tiny_model), "--name", "tiny2", "-q")
    assert result.exit_code == 0, result.output
    assert "tiny2 installed" in result.stdout
    assert "openweight/tiny2 (installed)" in run("models").output
    assert run("openweight", "default", "tiny2").stdout == "tiny2\n"
    assert run("openweight", "default").stdout == "tiny2\n"
    info = json.loads(run("openweight", "info").stdout)
    assert info["name"] == "tiny2" and info["installed"] is True
    assert run("openweight", "rm", "tiny2").stdout == "removed tiny2\n"
    assert "openweight/tiny2" not in run("models").output
    assert tiny_model.is_dir()  # registered in place: the files stay
    assert_error(run("openweight", "rm", "tiny2"), "not installed")


def test_openweight_help_lists_the_commands(env: Path) -> None:
    result = run("openweight", "--help")
    assert result.exit_code == 0
    for name in ("models", "pull", "rm", "default", "info", "remote", "ps", "stop"):
        assert f"  {name} " in result.output


# -- the real default model ---------------------------------------------------------------------


@pytest.mark.slow
def test_embedded_default_knows_paris(smollm2_home: Path, tmp_path: Path,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENWEIGHT_HOME", str(smollm2_home))
    monkeypatch.setenv("OPENWEIGHT_OFFLINE", "1")
    monkeypatch.setenv("LLM_USER_PATH", str(tmp_path / "llm-user"))
    monkeypatch.delenv("OPENWEIGHT_BASE_URL", raising=False)
    plugin_models.clear_clients()
    result = run("-m", "openweight", "What is the capital of France?", "-o", "temperature",
                 "0", "-o", "max_tokens", "24")
    assert result.exit_code == 0, result.output
    assert "Paris" in result.stdout
