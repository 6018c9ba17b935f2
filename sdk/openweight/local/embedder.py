"""The in-process embedding engine: a sentence-transformers model directory (see
``embed_config.py``) turned into vectors, the way sentence-transformers computes them.

- Inputs are tokenised in the caller's thread, so a bad or too-long input fails its own
  request only. An input longer than the model's window is an error naming the limit,
  unless the request asks to ``truncate``.
- Concurrent requests are batched: the first caller to find the model idle computes every
  request queued meanwhile (its own included), sorted by length so that a batch pads
  little; the others wait for their vectors.
- On a CPU that computes bfloat16 natively (``resolve_dtype``), the products run in
  bfloat16 (autocast) over float32 weights: vectors within 1e-4 of float32's cosine.

torch and transformers are imported on first use.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..backends import ChunkStream, SyncBackend
from ..embedding import EmbedRequest, shorten
from ..errors import InvalidRequestError, ModelLoadError
from ..logs import quiet_libraries
from ..options import GenerationOptions
from ..types import EmbeddingResult, Message, ModelInfo, Usage
from .embed_config import EmbedConfig, read_embed_config

__all__ = ["BATCH_SIZE", "LoadedEmbedder", "LocalEmbedder", "load_embedder"]

BATCH_SIZE = 32  # sequences per forward pass
BATCH_TOKENS = 16_384  # padded tokens per forward pass (long inputs go fewer at a time)
PAD_SHARE = 0.75  # a batch takes sequences at least this share of its longest one's length
BIG_WEIGHTS = 2_000_000_000  # bytes: above this, weights load in the compute dtype


@dataclass
class _Job:
    """One request's token ids, waiting for its vectors."""

    ids: list[list[int]]
    vectors: list[list[float]] | None = None
    error: BaseException | None = None
    done: threading.Event = field(default_factory=threading.Event)


@dataclass
class LoadedEmbedder:
    """An embedding model in memory."""

    model: Any
    tokenizer: Any
    config: EmbedConfig
    device: str
    dtype: str  # what the products compute in
    max_tokens: int
    vocab_size: int
    dimensions: int
    lock: threading.Lock = field(default_factory=threading.Lock)  # held while computing
    queue: list[_Job] = field(default_factory=list)  # requests waiting for the model
    queue_lock: threading.Lock = field(default_factory=threading.Lock)
    # a fast tokenizer's truncation setting is shared state: one caller at a time
    tokenizer_lock: threading.Lock = field(default_factory=threading.Lock)

    def vectors(self, ids: list[list[int]]) -> list[list[float]]:
        """The vectors of these token-id sequences, computed with whatever else is queued."""
        job = _Job(ids)
        with self.queue_lock:
            self.queue.append(job)
        self._drain()
        job.done.wait()
        if job.error is not None:
            raise job.error
        assert job.vectors is not None
        return job.vectors

    def _drain(self) -> None:
        """Compute every queued request if no other thread is (then that one does)."""
        if not self.lock.acquire(blocking=False):
            return
        try:
            while True:
                with self.queue_lock:
                    jobs, self.queue = self.queue, []
                if not jobs:
                    return
                try:
                    vectors = _encode(self, [seq for job in jobs for seq in job.ids])
                except BaseException as exc:  # every waiting request hears of it
                    for job in jobs:
                        job.error = exc
                        job.done.set()
                    raise
                start = 0
                for job in jobs:
                    job.vectors = vectors[start:start + len(job.ids)]
                    start += len(job.ids)
                    job.done.set()
        finally:
            self.lock.release()
            with self.queue_lock:
                left = bool(self.queue)
            if left:  # queued after our last look: computed by us, or by whoever holds it
                self._drain()

    def summary(self) -> dict[str, str]:
        return {"device": self.device, "dtype": self.dtype, "kind": "embedding",
                "pooling": self.config.pooling, "max_tokens": str(self.max_tokens),
                "dimensions": str(self.dimensions)}


_cache: dict[tuple[str, str, str], LoadedEmbedder] = {}
_cache_lock = threading.Lock()


def _window(model_config: Any, tokenizer: Any, config: EmbedConfig) -> int:
    """The longest input, in tokens: the model's own setting, else what its positions
    and its tokenizer allow."""
    if config.max_tokens:
        return config.max_tokens
    limits = [getattr(model_config, "max_position_embeddings", None),
              getattr(tokenizer, "model_max_length", None)]
    found = [int(x) for x in limits if isinstance(x, int) and 0 < x < 10_000_000]
    return min(found) if found else 512


def load_embedder(path: Path, device: str | None = None,
                  dtype: str | None = None) -> LoadedEmbedder:
    """Load (once per process and settings) the embedding model at ``path``."""
    from .resolve import resolve_device, resolve_dtype

    config = read_embed_config(path)
    resolved_device = resolve_device(device or "auto")
    compute = resolve_dtype(dtype, resolved_device)
    key = (str(path.resolve()), resolved_device, compute)
    with _cache_lock:
        if key not in _cache:
            _cache[key] = _load(config, resolved_device, compute)
        return _cache[key]


def _load(config: EmbedConfig, device: str, compute: str) -> LoadedEmbedder:
    import torch
    from transformers import AutoModel, AutoTokenizer

    quiet_libraries()
    size = sum(p.stat().st_size for p in config.weights.glob("*.safetensors"))
    stored = compute if size > BIG_WEIGHTS else "float32"
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(config.weights), trust_remote_code=False)
        model = AutoModel.from_pretrained(str(config.weights), dtype=getattr(torch, stored),
                                          trust_remote_code=False)
    except Exception as exc:
        raise ModelLoadError(f"cannot load the embedding model at {config.weights}: {exc}"
                             ) from exc
    model = model.to(device).eval()
    hidden = int(getattr(model.config, "hidden_size", 0) or 0)
    return LoadedEmbedder(model=model, tokenizer=tokenizer, config=config, device=device,
                          dtype=compute, max_tokens=_window(model.config, tokenizer, config),
                          vocab_size=int(model.config.vocab_size),
                          dimensions=config.dimensions or hidden)


class LocalEmbedder(SyncBackend):
    """Runs one embedding model directory in this process (a ``SyncBackend`` whose chat
    methods say that it does not chat)."""

    def __init__(self, path: str | Path, *, name: str | None = None,
                 device: str | None = None, dtype: str | None = None) -> None:
        self.path = Path(path)
        self.name = name or self.path.name
        self._device, self._dtype = device, dtype
        self._loaded: LoadedEmbedder | None = None

    @property
    def loaded(self) -> LoadedEmbedder:
        if self._loaded is None:
            self._loaded = load_embedder(self.path, self._device, self._dtype)
        return self._loaded

    def models(self) -> list[ModelInfo]:
        return [ModelInfo(name=self.name, installed=True, path=str(self.path),
                          kind="embedding")]

    def no_chat(self) -> InvalidRequestError:
        return InvalidRequestError(
            f"{self.name} is an embedding model: it makes vectors, it cannot chat or "
            "complete text. Use it with embed (Client.embed, `llm embed`, POST "
            "/v1/embeddings), or choose a chat model", param="model")

    def stream(self, messages: Sequence[Message], options: GenerationOptions) -> ChunkStream:
        raise self.no_chat()

    def complete(self, prompt: str, options: GenerationOptions) -> ChunkStream:
        raise self.no_chat()

    def embed(self, request: EmbedRequest) -> EmbeddingResult:
        lm = self.loaded
        ids = self._token_ids(lm, request)
        vectors = shorten(lm.vectors(ids), request.dimensions, lm.dimensions, lm.config.normalize)
        used = sum(len(i) for i in ids)
        return EmbeddingResult(vectors=vectors, model=self.name,
                               dimensions=len(vectors[0]), usage=Usage(used, 0))

    def _token_ids(self, lm: LoadedEmbedder, request: EmbedRequest) -> list[list[int]]:
        """Each input's token ids, checked against the model's window and vocabulary."""
        limit = lm.max_tokens
        if request.token_ids:
            request.check_token_ids(lm.vocab_size)
            ids = [list(i) for i in request.token_ids]
        else:
            with lm.tokenizer_lock:
                ids = lm.tokenizer(list(request.texts), truncation=request.truncate,
                                   max_length=limit if request.truncate else None,
                                   verbose=False)["input_ids"]
        empty = next((n for n, seq in enumerate(ids) if not seq), None)
        if empty is not None:
            raise InvalidRequestError(f"input[{empty}] has no tokens for this model: there "
                                      "is nothing to embed", param="input")
        if request.truncate:
            return [i[:limit] for i in ids]
        for n, seq in enumerate(ids):
            if len(seq) > limit:
                raise InvalidRequestError(
                    f"input[{n}] is {len(seq)} tokens long; {self.name} takes at most {limit}. "
                    "Shorten it, or ask for truncation (truncate=True, \"truncate\": true, "
                    "OPENWEIGHT_EMBED_TRUNCATE=1 for `llm embed`)", param="input")
        return ids


def _batches(order: list[int], lengths: list[int]) -> list[list[int]]:
    """Indices in length order, cut into batches of at most BATCH_SIZE sequences and
    BATCH_TOKENS padded tokens, each of lengths within PAD_SHARE of its longest: a few
    requests' worth of mixed lengths pads little too (a CPU's products cost by the rows,
    whatever the number of sequences)."""
    out: list[list[int]] = []
    for i in order:
        longest = lengths[out[-1][0]] if out else 0
        if out and len(out[-1]) < BATCH_SIZE and lengths[i] >= PAD_SHARE * longest and \
                (len(out[-1]) + 1) * longest <= BATCH_TOKENS:
            out[-1].append(i)
        else:
            out.append([i])
    return out


def _encode(lm: LoadedEmbedder, seqs: list[list[int]]) -> list[list[float]]:
    """Vectors of token-id sequences, longest first, in their given order."""
    import torch

    lengths = [len(s) for s in seqs]
    order = sorted(range(len(seqs)), key=lambda i: -lengths[i])
    out: list[list[float]] = [[] for _ in seqs]
    pad = lm.tokenizer.pad_token_id or 0
    autocast = lm.dtype != "float32" and next(lm.model.parameters()).dtype == torch.float32
    with torch.inference_mode(), torch.autocast(lm.device.split(":")[0],
                                                dtype=getattr(torch, lm.dtype),
                                                enabled=autocast):
        for batch in _batches(order, lengths):
            width = lengths[batch[0]]
            ids = torch.full((len(batch), width), pad, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for row, i in enumerate(batch):
                ids[row, :lengths[i]] = torch.tensor(seqs[i])
                mask[row, :lengths[i]] = 1
            ids, mask = ids.to(lm.device), mask.to(lm.device)
            states = lm.model(input_ids=ids, attention_mask=mask).last_hidden_state.float()
            pooled = _pool(states, mask, lm.config.pooling)
            if lm.config.normalize:
                pooled = torch.nn.functional.normalize(pooled, p=2.0, dim=-1)
            for row, vector in zip(batch, pooled.cpu().tolist(), strict=True):
                out[row] = vector
    return out


def _pool(states: Any, mask: Any, mode: str) -> Any:
    """One vector per sequence from its token states (right-padded), as
    sentence-transformers' Pooling module computes it."""
    import torch

    weights = mask.unsqueeze(-1).to(states.dtype)
    if mode == "cls":
        return states[:, 0]
    if mode == "lasttoken":
        last = mask.sum(dim=1) - 1
        return states[torch.arange(states.shape[0], device=states.device), last]
    if mode == "max":
        return states.masked_fill(weights == 0, -1e9).max(dim=1).values
    total = (states * weights).sum(dim=1)
    count = weights.sum(dim=1).clamp(min=1e-9)
    return total / (count.sqrt() if mode == "mean_sqrt_len" else count)
