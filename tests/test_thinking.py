"""Think-tag reasoning (Qwen3, DeepSeek-R1 distills), the thinking switch, and Llama 3.x."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from openweight import Client, InvalidRequestError
from openweight.local.generation import resolved_settings, sampling_settings
from openweight.local.thinking import ThinkParser
from openweight.options import GenerationOptions
from openweight.store import CATALOG
from openweight.wire import to_messages

from conftest import scripted_generate, token_ids

HI = [{"role": "user", "content": "Why is the sky blue?"}]
REASON = "Rayleigh scattering — short λ scatter more ✓"
ANSWER = "Because blue light scatters most. 🙂"


def _client(family_model: Callable[[str], Path], family: str) -> Client:
    return Client(str(family_model(family)))


def _tok(client: Client) -> Any:
    return client.backend.loaded.tokenizer  # type: ignore[attr-defined]


_ids = token_ids


def _script(client: Client, monkeypatch: pytest.MonkeyPatch, tokens: list[int]) -> None:
    model = client.backend.loaded.model  # type: ignore[attr-defined]
    monkeypatch.setattr(model, "generate", scripted_generate(tokens))


def test_qwen3_think_block_is_reasoning(family_model: Callable[[str], Path],
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    client = _client(family_model, "qwen3")
    tok = _tok(client)
    script = _ids(tok, ["<think>", "\n" + REASON + "\n", "</think>", "\n\n" + ANSWER, "<|im_end|>"])
    _script(client, monkeypatch, script)
    result = client.chat(HI)
    assert result.reasoning == REASON + "\n"
    assert result.text == ANSWER
    assert result.finish_reason == "stop"
    chunks = list(client.stream(HI))
    assert "".join(c.text for c in chunks) == ANSWER
    assert "".join(c.reasoning for c in chunks) == REASON + "\n"
    # every cut: never a tag in the text or the reasoning, always a prefix of the right part
    for n in range(1, len(script) + 1):
        cut = client.chat(HI, max_tokens=n)
        assert "think>" not in cut.text and "think>" not in (cut.reasoning or "")
        assert ANSWER.startswith(cut.text)
        assert (REASON + "\n").startswith(cut.reasoning or "")


def test_r1_template_opens_think_in_the_prompt(family_model: Callable[[str], Path],
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    client = _client(family_model, "r1")
    tok = _tok(client)
    assert client.backend.format(to_messages(HI)).endswith("<think>\n")  # type: ignore[attr-defined]
    script = _ids(tok, [REASON, "</think>", "\n\n" + ANSWER, "<｜end▁of▁sentence｜>"])
    _script(client, monkeypatch, script)
    result = client.chat(HI)
    assert (result.reasoning, result.text) == (REASON, ANSWER)


@pytest.mark.parametrize("step", [1, 2, 3, 5, 7])
def test_tags_split_across_tokens(tiny_model: Path, step: int) -> None:
    """A tokenizer without think tokens: the tags arrive in pieces, at every boundary."""
    tok = Client(str(tiny_model)).backend.loaded.tokenizer  # type: ignore[attr-defined]
    text = f"<think>{REASON}</think>{ANSWER}"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    for start in range(step):
        parser = ThinkParser(tok, inside=False)
        deltas = []
        pieces = [ids[:start]] + [ids[i:i + step] for i in range(start, len(ids), step)]
        for piece in pieces:
            for token in piece:
                deltas += parser.feed(token)
        deltas += parser.flush()
        assert "".join(p for k, p in deltas if k == "reasoning") == REASON
        assert "".join(p for k, p in deltas if k == "text") == ANSWER


def test_thinking_switch(family_model: Callable[[str], Path], tiny_gpt_oss: Path) -> None:
    qwen = _client(family_model, "qwen3").backend
    off = qwen.format(to_messages(HI), GenerationOptions(thinking=False))  # type: ignore[attr-defined]
    on = qwen.format(to_messages(HI), GenerationOptions(thinking=True))  # type: ignore[attr-defined]
    assert off.endswith("<think>\n\n</think>\n\n") and not on.endswith("</think>\n\n")
    with pytest.raises(InvalidRequestError, match="no thinking switch"):
        _client(family_model, "r1").chat(HI, thinking=False)
    with pytest.raises(InvalidRequestError, match="no thinking switch"):
        _client(family_model, "llama3").chat(HI, thinking=True)
    with pytest.raises(InvalidRequestError, match="reasoning_effort"):
        Client(str(tiny_gpt_oss)).chat(HI, thinking=False)
    with pytest.raises(InvalidRequestError, match="true or false"):
        _client(family_model, "qwen3").chat(HI, thinking="yes")


def test_thinking_off_output_is_all_text(family_model: Callable[[str], Path],
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    client = _client(family_model, "qwen3")
    _script(client, monkeypatch, _ids(_tok(client), [ANSWER, "<|im_end|>"]))
    result = client.chat(HI, thinking=False)
    assert result.text == ANSWER and result.reasoning is None


def test_history_drops_earlier_reasoning(family_model: Callable[[str], Path]) -> None:
    engine = _client(family_model, "qwen3").backend
    prompt = engine.format(to_messages([  # type: ignore[attr-defined]
        {"role": "user", "content": "q1"},
        {"role": "assistant", "content": "a1", "reasoning_content": "OLD-REASONING"},
        {"role": "user", "content": "q2"},
        {"role": "assistant", "content": "<think>RAW-OLD</think>\n\na2"},
        {"role": "user", "content": "q3"},
    ]))
    assert "OLD-REASONING" not in prompt and "RAW-OLD" not in prompt
    assert "a1" in prompt and "a2" in prompt


def test_llama3_end_of_turn_tokens(family_model: Callable[[str], Path],
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    client = _client(family_model, "llama3")
    tok = _tok(client)
    eos = client.backend.loaded.eos_ids  # type: ignore[attr-defined]
    vocab = tok.get_vocab()
    assert {vocab["<|eot_id|>"], vocab["<|eom_id|>"], vocab["<|end_of_text|>"]} <= eos
    for end in ("<|eot_id|>", "<|eom_id|>"):
        _script(client, monkeypatch, _ids(tok, [ANSWER, end, "never reached"]))
        result = client.chat(HI)
        assert result.text == ANSWER and result.finish_reason == "stop"
        assert result.usage.completion_tokens == len(_ids(tok, [ANSWER])) + 1


def test_llama3_generation_defaults_respected(family_model: Callable[[str], Path]) -> None:
    client = _client(family_model, "llama3")
    engine = client.backend
    lm = engine.loaded  # type: ignore[attr-defined]
    unset = sampling_settings(lm, GenerationOptions(), 8)
    assert unset["do_sample"] is True and "temperature" not in unset  # the config's 0.6 applies
    assert resolved_settings(lm, GenerationOptions(), 8)["temperature"] == 0.6
    assert resolved_settings(lm, GenerationOptions(temperature=0.9), 8)["temperature"] == 0.9
    # knobs neither the request nor the config sets: generate's defaults, on every path
    assert resolved_settings(lm, GenerationOptions(), 8)["top_k"] == 50
    assert resolved_settings(lm, GenerationOptions(top_k=0), 8)["top_k"] is None
    assert resolved_settings(lm, GenerationOptions(top_k=7), 8)["top_k"] == 7
    greedy = sampling_settings(lm, GenerationOptions(temperature=0), 8)
    assert greedy["do_sample"] is False
    a = client.chat(HI, max_tokens=12, seed=5)
    b = client.chat(HI, max_tokens=12, seed=5)
    assert a.text == b.text


def test_catalog_has_the_families() -> None:
    families = {e.name: e.family for e in CATALOG.values()}
    assert families["deepseek-r1-distill-qwen-1.5b"] == "deepseek-r1"
    assert families["qwen3-0.6b"] == families["qwen3-4b"] == "qwen3"
    assert {families[n] for n in ("llama3.2-1b", "llama3.2-3b", "llama3.1-8b")} == {"llama3"}
    assert CATALOG["llama3.1-8b"].hub_id == "meta-llama/Llama-3.1-8B-Instruct"
