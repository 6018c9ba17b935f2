"""llm embedding models: ``openweight-embed`` (the store's default embedding model) and
``openweight-embed/NAME`` for every installed or catalog embedding model.

They go through the same cached SDK clients as the chat models (``models.client_for``):
local by default, kept loaded by a keep-alive server (OPENWEIGHT_KEEP_ALIVE, else 5m),
or a remote server (OPENWEIGHT_BASE_URL, `llm openweight remote`). llm's ``embed``
commands take no model options, so truncation of over-long inputs is switched on with
OPENWEIGHT_EMBED_TRUNCATE=1.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator

import llm
from llm.models import EmbeddingModel

import openweight

from .config import read_config
from .models import KEY_ALIAS, KEY_ENV_VAR, OpenWeightModelError, client_for, sdk_errors

__all__ = ["EMBED_PREFIX", "TRUNCATE_ENV", "OpenWeightEmbedding", "register_all"]

EMBED_PREFIX = "openweight-embed"
TRUNCATE_ENV = "OPENWEIGHT_EMBED_TRUNCATE"
BATCH_SIZE = 32


def _truncate() -> bool:
    value = os.environ.get(TRUNCATE_ENV, "").strip().lower()
    if value in ("", "0", "false", "no", "off"):
        return False
    if value in ("1", "true", "yes", "on"):
        return True
    raise OpenWeightModelError(f"{TRUNCATE_ENV}={value!r}: use 1 (cut over-long inputs to the "
                         "model's window) or 0 (an over-long input is an error)")


class OpenWeightEmbedding(EmbeddingModel):
    """An openweight embedding model, for ``llm embed``, ``embed-multi`` and ``similar``."""

    batch_size = BATCH_SIZE
    supports_text = True
    supports_binary = False
    key_env_var = KEY_ENV_VAR

    def __init__(self, name: str | None) -> None:
        self.name = name
        self.model_id = EMBED_PREFIX if name is None else f"{EMBED_PREFIX}/{name}"

    def get_key(self, explicit_key: str | None = None) -> str | None:
        """The API key of a remote server, if any: local models need none."""
        if explicit_key:
            return explicit_key
        stored = llm.get_key(alias=KEY_ALIAS, env=KEY_ENV_VAR)
        return stored if isinstance(stored, str) else None

    def embed_batch(self, items: Iterable[str | bytes], *,
                    key: str | None = None) -> Iterator[list[float]]:
        texts = [i if isinstance(i, str) else i.decode("utf-8", errors="replace")
                 for i in items]
        if not texts:
            return
        remote = os.environ.get("OPENWEIGHT_BASE_URL") or read_config().get("remote") or None
        name = self.name
        with sdk_errors():
            if name is None and remote is None:
                name = openweight.default_embedding_model()
            client = client_for(name, remote=remote, key=key)
            result = client.embed(texts, truncate=_truncate())
        yield from result.vectors


def register_all(register: Callable[..., None]) -> None:
    """Register the embedding models; cheap: one read of the store's registry file."""
    from openweight.store import embedding_model_names

    register(OpenWeightEmbedding(None))
    for name in embedding_model_names():
        register(OpenWeightEmbedding(name))
