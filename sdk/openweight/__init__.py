"""openweight: open-weight language models on your own hardware, or on a server you choose.

Importing this package is cheap: torch and transformers load only when a local
model is first used.
"""

from __future__ import annotations

from .client import AsyncClient, AsyncStream, Client, Stream
from .errors import (
    AuthenticationError,
    GenerationError,
    InvalidRequestError,
    ModelLoadError,
    ModelNotFoundError,
    OpenWeightError,
    RemoteConnectionError,
    RemoteError,
    RemoteStatusError,
    RemoteTimeoutError,
)
from .images import ImagePart, image
from .options import GenerationOptions
from .store import (
    default_embedding_model,
    default_model,
    list_models,
    model_info,
    pull,
    remove_model,
    set_default,
)
from .types import ChatResult, Chunk, EmbeddingResult, Message, ModelInfo, ToolCall, Usage

__version__ = "0.1.0"

__all__ = [
    "AsyncClient",
    "AsyncStream",
    "AuthenticationError",
    "ChatResult",
    "Chunk",
    "Client",
    "EmbeddingResult",
    "GenerationError",
    "GenerationOptions",
    "ImagePart",
    "InvalidRequestError",
    "Message",
    "ModelInfo",
    "ModelLoadError",
    "ModelNotFoundError",
    "OpenWeightError",
    "RemoteConnectionError",
    "RemoteError",
    "RemoteStatusError",
    "RemoteTimeoutError",
    "Stream",
    "ToolCall",
    "Usage",
    "__version__",
    "default_embedding_model",
    "default_model",
    "image",
    "list_models",
    "model_info",
    "pull",
    "remove_model",
    "set_default",
]
