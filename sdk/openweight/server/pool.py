"""The models one server serves: local engines, made on first use and kept.

The server pools engines, never Clients: a request can never be sent on to a keep-alive
server or a remote URL by accident, whatever the environment says.
"""

from __future__ import annotations

import re
import threading
from typing import TYPE_CHECKING

from ..errors import ModelNotFoundError

if TYPE_CHECKING:
    from ..local import LocalEmbedder, LocalEngine

    Engine = LocalEngine | LocalEmbedder

__all__ = ["NAME_RE", "ModelPool"]

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")


class ModelPool:
    """One local engine per model name (a ``LocalEngine``, or a ``LocalEmbedder`` for an
    embedding model): the one served by default (``--model``), and any
    model installed in the store that a request names. A request never names a path, and
    never starts a pull unless ``allow_pull`` (then a catalog name not installed yet is
    pulled on first use)."""

    def __init__(self, model: str | None, *, device: str | None = None,
                 dtype: str | None = None, quantize: str | None = None,
                 allow_pull: bool = False) -> None:
        self._device, self._dtype, self._quantize = device, dtype, quantize  # for every model
        self._allow_pull = allow_pull
        self._lock = threading.Lock()
        self.default = self._engine(model)  # resolves the name (pulling the model if needed)
        self.name = self.default.name
        # the engines served, by name: a test (or a tool) may add a scripted one here
        self.engines: dict[str, Engine] = {self.name: self.default}
        if model:
            self.engines[model] = self.default

    def _engine(self, model: str | None) -> Engine:
        from ..store import open_engine

        return open_engine(model, device=self._device, dtype=self._dtype,
                           quantize=self._quantize)

    def warm(self) -> None:
        """Load the default model and run one token, so that the first request is fast and
        a broken model fails here; then forget that token's prompt (the local model's
        prefix cache), so the first request is computed as in a fresh process. A prompt
        whose start was cached computes its rest apart, which can move a knife-edge greedy
        answer: the warm-up's chat preamble once turned SmolLM2's "Paris" into "L'Etoile"
        on every server's first request."""
        from ..embedding import EmbedRequest
        from ..local import LocalEmbedder
        from ..options import GenerationOptions
        from ..types import Message

        if isinstance(self.default, LocalEmbedder):
            self.default.embed(EmbedRequest.build("Hi"))
            return
        self.default.chat([Message(role="user", content="Hi")], GenerationOptions(max_tokens=1))
        self.default.loaded.prefix_cache.clear()

    def loaded(self) -> dict[str, str] | None:
        """What the default model runs with, resolved (``LoadedModel.summary``), loading it
        if it is not loaded yet."""
        return self.default.loaded.summary()

    def chat(self, name: str | None) -> LocalEngine:
        """The chat engine for a request's ``model`` field; an embedding model named there
        is a 400 that says what it is for."""
        from ..local import LocalEmbedder

        engine = self.get(name)
        if isinstance(engine, LocalEmbedder):
            raise engine.no_chat()
        return engine

    def embedder(self, name: str | None) -> Engine:
        """The engine for an embeddings request (a chat model's ``embed`` says it cannot)."""
        return self.get(name)

    def get(self, name: str | None) -> Engine:
        """The engine for a request's ``model`` field (blocking: may load the model, and
        pull it with ``allow_pull``). Anything not served gets the same ModelNotFoundError,
        whatever exists on this machine under that name (no oracle)."""
        if not name:
            return self.default
        engine = self.engines.get(name)
        if engine is not None:
            return engine
        if not NAME_RE.match(name) or not self._servable(name):
            raise ModelNotFoundError(f"unknown model {name[:100]!r}; GET /v1/models lists "
                                     "the models served here")
        with self._lock:
            engine = self.engines.get(name)
            if engine is None:
                engine = self.engines[name] = self._store_engine(name)
            return engine

    def _servable(self, name: str) -> bool:
        """Installed in the store, or (with ``allow_pull``) in its catalog."""
        from ..store import CATALOG, list_models

        if self._allow_pull and name in CATALOG:
            return True
        return any(m.installed and m.name == name for m in list_models())

    def _store_engine(self, name: str) -> Engine:
        """A store model by name: never a path, whatever the working directory holds."""
        from ..local import open_local
        from ..store import ensure_model, packed_cache

        name, path = ensure_model(name)
        return open_local(path, name=name, device=self._device, dtype=self._dtype,
                          quantize=self._quantize, packed_cache=packed_cache())

    def names(self) -> list[str]:
        from ..store import list_models

        names = [self.name]
        names += [m.name for m in list_models() if m.installed and m.name != self.name]
        return names
