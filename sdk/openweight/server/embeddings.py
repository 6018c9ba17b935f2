"""``POST /v1/embeddings``: OpenAI's shape, over the pool's embedding models.

Requests that arrive together are computed together: the embedder batches whatever is
queued while it runs (``local/embedder.py``).
"""

# no `from __future__ import annotations`: FastAPI reads the handler's annotations
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from ..wire import model_from_json
from ..wire.embeddings import embed_request_from_json, embedding_answer_json
from .guards import read_json
from .limits import ServerLimits
from .pool import ModelPool

if TYPE_CHECKING:
    from fastapi import APIRouter

__all__ = ["add_embeddings_route"]

InThread = Callable[..., Awaitable[Any]]


def add_embeddings_route(v1: "APIRouter", pool: ModelPool, in_thread: InThread,
                         limits: ServerLimits) -> None:
    from fastapi import Request
    from fastapi.responses import JSONResponse

    async def embeddings(request: Request) -> JSONResponse:
        body = await read_json(request, limits)
        embed_request, fmt = embed_request_from_json(body)
        backend = await in_thread(pool.embedder, model_from_json(body))
        result = await in_thread(backend.embed, embed_request)
        # a JSONResponse as it is: FastAPI's encoder would walk every float of every vector
        return JSONResponse(embedding_answer_json(result, fmt))

    v1.add_api_route("/embeddings", embeddings, methods=["POST"])
