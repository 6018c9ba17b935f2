"""OpenAI's ``/v1/embeddings`` JSON <-> ``EmbedRequest`` / ``EmbeddingResult``: the
server reads requests and writes answers here, the remote backend writes requests and
reads answers here.

``encoding_format: "base64"`` is OpenAI's: each vector's float32 numbers, little-endian,
base64-encoded. ``truncate`` is an extension (a bool): OpenAI's API has none.
"""

from __future__ import annotations

import base64
import math
import struct
from collections.abc import Mapping
from typing import Any

from ..embedding import EmbedRequest
from ..errors import InvalidRequestError, RemoteError
from ..types import EmbeddingResult, Usage
from .answers import usage_from_json

__all__ = [
    "ENCODING_FORMATS",
    "embed_body",
    "embed_request_from_json",
    "embedding_answer_json",
    "embedding_result_from_json",
]

ENCODING_FORMATS = ("float", "base64")


def embed_request_from_json(body: Mapping[str, Any]) -> tuple[EmbedRequest, str]:
    """The checked request and its encoding format (``float`` or ``base64``)."""
    if "input" not in body:
        raise InvalidRequestError("'input' is required: a string, a list of strings or a "
                                  "list of token ids", param="input")
    fmt = body.get("encoding_format")
    fmt = "float" if fmt is None else fmt
    if fmt not in ENCODING_FORMATS:
        raise InvalidRequestError(f"encoding_format must be one of {', '.join(ENCODING_FORMATS)}"
                                  f", not {fmt!r}", param="encoding_format")
    user = body.get("user")
    if user is not None and not isinstance(user, str):
        raise InvalidRequestError("user must be a string", param="user")
    truncate = body.get("truncate")
    request = EmbedRequest.build(body["input"], truncate=False if truncate is None else truncate,
                                 dimensions=body.get("dimensions"))
    return request, str(fmt)


def _encode(vector: list[float], fmt: str) -> list[float] | str:
    if fmt == "base64":
        return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode("ascii")
    return vector


def embedding_answer_json(result: EmbeddingResult, fmt: str = "float") -> dict[str, Any]:
    """The answer in OpenAI's shape."""
    return {
        "object": "list",
        "data": [{"object": "embedding", "index": n, "embedding": _encode(v, fmt)}
                 for n, v in enumerate(result.vectors)],
        "model": result.model,
        "usage": {"prompt_tokens": result.usage.prompt_tokens,
                  "total_tokens": result.usage.prompt_tokens},
    }


def embed_body(model: str | None, request: EmbedRequest) -> dict[str, Any]:
    """The request body the remote backend sends."""
    body: dict[str, Any] = {"input": request.input_json(), "encoding_format": "float"}
    if model is not None:
        body["model"] = model
    if request.dimensions is not None:
        body["dimensions"] = request.dimensions
    if request.truncate:
        body["truncate"] = True
    return body


def _vector(value: object) -> list[float]:
    if isinstance(value, str):  # a server that answers base64 whatever was asked
        try:
            raw = base64.b64decode(value, validate=True)
        except ValueError as exc:
            raise RemoteError(f"the server sent an embedding that is not base64: {exc}"
                              ) from exc
        if len(raw) % 4:
            raise RemoteError("the server sent a base64 embedding whose length is not a "
                              "whole number of float32 values")
        return list(struct.unpack(f"<{len(raw) // 4}f", raw))
    if not isinstance(value, list) or not value or not all(
            isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)
            for x in value):
        raise RemoteError("the server sent an embedding that is not a list of numbers")
    return [float(x) for x in value]


def embedding_result_from_json(data: object, model: str, count: int) -> EmbeddingResult:
    """The vectors of an answer (in input order, whatever order ``data`` lists them in);
    a RemoteError for an answer that is not one vector per input."""
    items = data.get("data") if isinstance(data, Mapping) else None
    if not isinstance(items, list) or len(items) != count or \
            not all(isinstance(i, Mapping) for i in items):
        raise RemoteError(f"the server's answer is not a list of {count} embeddings")
    indexed = sorted(items, key=lambda i: i.get("index") if isinstance(i.get("index"), int)
                     else 0)
    vectors = [_vector(i.get("embedding")) for i in indexed]
    if len({len(v) for v in vectors}) != 1:
        raise RemoteError("the server's embeddings do not all have the same length")
    assert isinstance(data, Mapping)
    usage = usage_from_json(data.get("usage")) or Usage(0, 0)
    name = data.get("model")
    return EmbeddingResult(vectors=vectors, model=name if isinstance(name, str) and name
                           else model, dimensions=len(vectors[0]),
                           usage=Usage(usage.prompt_tokens, 0))
