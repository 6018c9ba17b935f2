"""gpt-oss: harmony parsing, reasoning, reasoning_effort, history, memory checks."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

import pytest

from openweight import Client, InvalidRequestError, ModelLoadError
from openweight.cli import main
from openweight.harmony import HarmonyParser, harmony_token_ids
from openweight.local import memory, resolve
from openweight.options import GenerationOptions
from openweight.wire import to_messages

from conftest import scripted_generate

HI = [{"role": "user", "content": "What is 2+2?"}]
ANALYSIS = "User asks 2+2. Easy: 4 — café ✓."
FINAL = "2 + 2 = 4 🙂"


def _tokens(tok: Any, parts: list[str]) -> list[int]:
    """Token ids for a harmony transcript: special tokens atomic, text byte by byte."""
    out: list[int] = []
    for part in parts:
        if part.startswith("<|") and part.endswith("|>"):
            out.append(tok.convert_tokens_to_ids(part))
        else:
            out.extend(tok(part, add_special_tokens=False)["input_ids"])
    return out


def answer_script(tok: Any) -> list[int]:
    return _tokens(tok, ["<|channel|>", "analysis", "<|message|>", ANALYSIS, "<|end|>",
                         "<|start|>", "assistant", "<|channel|>", "final", "<|message|>", FINAL,
                         "<|return|>"])


def call_script(tok: Any) -> list[int]:
    return _tokens(tok, ["<|channel|>", "analysis", "<|message|>", "Need weather.", "<|end|>",
                         "<|start|>", "assistant", "<|channel|>",
                         "commentary to=functions.get_weather ", "<|constrain|>", "json",
                         "<|message|>", '{"city": "Paris"}', "<|call|>"])


@pytest.fixture()
def gpt_client(tiny_gpt_oss: Path) -> Client:
    return Client(str(tiny_gpt_oss))


def _script(client: Client, monkeypatch: pytest.MonkeyPatch, tokens: list[int]) -> None:
    model = client.backend.loaded.model  # type: ignore[attr-defined]
    monkeypatch.setattr(model, "generate", scripted_generate(tokens))


def _tok(client: Client) -> Any:
    return client.backend.loaded.tokenizer  # type: ignore[attr-defined]


def test_token_ids_come_from_the_tokenizer(gpt_client: Client, tiny_model: Path) -> None:
    ids = harmony_token_ids(_tok(gpt_client))
    assert ids is not None and ids["<|message|>"] == _tok(gpt_client).convert_tokens_to_ids(
        "<|message|>")
    assert harmony_token_ids(Client(str(tiny_model)).backend.loaded.tokenizer) is None  # type: ignore[attr-defined]


def test_analysis_then_final(gpt_client: Client, monkeypatch: pytest.MonkeyPatch) -> None:
    _script(gpt_client, monkeypatch, answer_script(_tok(gpt_client)))
    result = gpt_client.chat(HI)
    assert result.reasoning == ANALYSIS
    assert result.text == FINAL
    assert result.finish_reason == "stop"
    chunks = list(gpt_client.stream(HI))
    assert "".join(c.text for c in chunks) == FINAL
    assert "".join(c.reasoning for c in chunks) == ANALYSIS
    # reasoning arrives before the text, piece by piece
    first_text = next(i for i, c in enumerate(chunks) if c.text)
    assert all(not c.reasoning for c in chunks[first_text:])
    assert sum(1 for c in chunks if c.reasoning) > 5


def test_no_header_or_special_token_leaks_at_any_cut(
    gpt_client: Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    script = answer_script(_tok(gpt_client))
    _script(gpt_client, monkeypatch, script)
    for n in range(1, len(script) + 1):
        chunks = list(gpt_client.stream(HI, max_tokens=n))
        text = "".join(c.text for c in chunks)
        reasoning = "".join(c.reasoning for c in chunks)
        for piece in (text, reasoning):
            assert "<|" not in piece and "|>" not in piece
            assert "analysis" not in piece and "assistant" not in piece
        assert FINAL.startswith(text) and ANALYSIS.startswith(reasoning)
        assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == n


def test_tool_call(gpt_client: Client, monkeypatch: pytest.MonkeyPatch) -> None:
    _script(gpt_client, monkeypatch, call_script(_tok(gpt_client)))
    result = gpt_client.chat(HI)
    assert result.finish_reason == "tool_calls"
    assert result.text == ""
    assert result.reasoning == "Need weather."
    (call,) = result.tool_calls
    assert call.name == "get_weather" and dict(call.arguments) == {"city": "Paris"}
    again = gpt_client.chat(HI)
    assert again.tool_calls[0].id == call.id, "ids are stable"
    streamed = list(gpt_client.stream(HI))
    assert streamed[-1].tool_calls == result.tool_calls
    assert streamed[-1].finish_reason == "tool_calls"


def test_malformed_call_is_not_a_crash(gpt_client: Client) -> None:
    tok = _tok(gpt_client)
    parser = HarmonyParser(tok, harmony_token_ids(tok))  # type: ignore[arg-type]
    script = _tokens(tok, ["<|channel|>", "commentary to=functions.f ", "<|message|>",
                           "{not json", "<|call|>"])
    deltas = [d for t in script for d in parser.feed(t)] + parser.flush()
    assert parser.tool_calls == [] and parser.malformed_calls == ["functions.f: {not json"]
    assert deltas == [("text", "{not json")], "a malformed call comes back as text"


def test_commentary_preamble_is_text(gpt_client: Client) -> None:
    tok = _tok(gpt_client)
    parser = HarmonyParser(tok, harmony_token_ids(tok))  # type: ignore[arg-type]
    script = _tokens(tok, ["<|channel|>", "commentary", "<|message|>", "Checking…", "<|end|>"])
    deltas = [d for t in script for d in parser.feed(t)] + parser.flush()
    assert "".join(p for k, p in deltas if k == "text") == "Checking…"


def test_reasoning_effort_reaches_the_template(gpt_client: Client) -> None:
    engine = gpt_client.backend
    tok = _tok(gpt_client)
    for effort in ("low", "medium", "high"):
        ids = engine.encode(to_messages(HI), GenerationOptions(reasoning_effort=effort))  # type: ignore[attr-defined]
        assert f"Reasoning: {effort}" in tok.decode(ids)


def test_reasoning_effort_validation(gpt_client: Client, tiny_model: Path) -> None:
    with pytest.raises(InvalidRequestError, match=r"reasoning_effort='extreme'.*low, medium, high"):
        gpt_client.chat(HI, reasoning_effort="extreme")
    with pytest.raises(InvalidRequestError, match="no reasoning-effort control"):
        Client(str(tiny_model)).chat(HI, reasoning_effort="high")


def test_history_drops_earlier_analysis(gpt_client: Client) -> None:
    engine = gpt_client.backend
    tok = _tok(gpt_client)
    finished = to_messages([
        {"role": "user", "content": "q1"},
        {"role": "assistant", "content": "a1", "reasoning_content": "SECRET-THOUGHT"},
        {"role": "user", "content": "q2"},
    ])
    prompt = tok.decode(engine.encode(finished))  # type: ignore[attr-defined]
    assert "SECRET-THOUGHT" not in prompt and "a1" in prompt
    in_turn = to_messages([
        {"role": "user", "content": "q1"},
        {"role": "assistant", "content": "", "reasoning_content": "KEEP-THOUGHT"},
    ])
    assert "KEEP-THOUGHT" in tok.decode(engine.encode(in_turn))  # type: ignore[attr-defined]


def test_random_tiny_gpt_oss_never_leaks(gpt_client: Client) -> None:
    for seed in range(3):
        result = gpt_client.chat(HI, max_tokens=80, temperature=1.0, seed=seed)
        assert "<|" not in result.text and "<|" not in (result.reasoning or "")
        assert result.usage.completion_tokens <= 80


def _huge_model(src: Path, dest: Path) -> Path:
    shutil.copytree(src, dest)
    config = json.loads((dest / "config.json").read_text())
    config.update(hidden_size=65536, intermediate_size=262144, num_hidden_layers=8,
                  num_attention_heads=64, num_key_value_heads=8, head_dim=1024)
    (dest / "config.json").write_text(json.dumps(config))
    return dest


def test_memory_check_refuses_what_cannot_fit(tiny_model: Path, tmp_path: Path) -> None:
    huge = _huge_model(tiny_model, tmp_path / "huge")
    started = time.monotonic()
    with pytest.raises(ModelLoadError) as info:
        Client(str(huge)).chat(HI)
    assert time.monotonic() - started < 30
    message = str(info.value)
    assert "needs about" in message and "GB is free" in message
    assert "device" in message and "smaller model" in message


def test_memory_estimate_numbers(tiny_model: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    est = memory.estimate_memory(tiny_model, "cpu", "bfloat16")
    # 2 layers of a 32-wide model with a tied 264-token embedding: a few thousand parameters
    assert 10_000 < est.parameters < 100_000
    assert est.weights_bytes == est.parameters * 2
    # layers x (k,v) x heads x dim x ctx x 4 bytes: the CPU fast path's cache is float32
    assert est.kv_cache_bytes == 2 * 2 * 2 * 8 * 1024 * 4
    monkeypatch.setattr(memory, "free_memory", lambda device: 1000)
    small = memory.estimate_memory(tiny_model, "cpu", "bfloat16")
    assert not small.fits
    with pytest.raises(ModelLoadError, match=r"only 0\.0 GB is free"):
        memory.check_fits(small, "tiny")


def test_sliding_window_layers_cap_kv(tiny_gpt_oss: Path) -> None:
    est = memory.estimate_memory(tiny_gpt_oss, "cpu", "bfloat16")
    per_token_layer = 2 * 2 * 8 * 2  # (k,v) x kv heads x head dim x bytes
    assert est.kv_cache_bytes == per_token_layer * (16 + 512)  # one sliding, one full layer


def test_mxfp4_plan_on_cpu() -> None:
    keep, why = resolve.mxfp4_supported("cpu")
    assert keep is False and "CUDA" in why


def test_info_shows_estimate(store: Path, tiny_gpt_oss: Path,
                             capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["pull", str(tiny_gpt_oss), "--name", "gptoss", "-q"]) == 0
    capsys.readouterr()
    assert main(["info", "gptoss"]) == 0
    info = json.loads(capsys.readouterr().out)
    estimate = info["memory_estimate"]
    assert estimate["fits"] is True and estimate["parameters"] > 0
    assert estimate["kv_cache_context"] == 512
