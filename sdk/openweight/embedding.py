"""What an embedding request is, checked in one place for the Client, the server, the
remote backend and the ``llm`` plugin: the inputs (texts, or token ids), ``truncate`` and
``dimensions``.

Nothing here imports torch or httpx.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from .errors import InvalidRequestError

__all__ = ["MAX_EMBED_INPUTS", "EmbedInput", "EmbedRequest", "shorten"]

MAX_EMBED_INPUTS = 2048  # OpenAI's limit on the items of one request

EmbedInput = str | Sequence[str] | Sequence[int] | Sequence[Sequence[int]]
"""One text, several texts, one token-id list, or several token-id lists."""


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _texts_or_ids(value: object, param: str) -> tuple[str, ...] | tuple[tuple[int, ...], ...]:
    if isinstance(value, str):
        value = [value]
    if isinstance(value, bytes | bytearray) or not isinstance(value, Sequence):
        raise InvalidRequestError(f"{param} must be a string, a list of strings or a list of "
                                  f"token ids, not {type(value).__name__}", param=param)
    items = list(value)
    if not items:
        raise InvalidRequestError(f"{param} is an empty list: give at least one text",
                                  param=param)
    if len(items) > MAX_EMBED_INPUTS:
        raise InvalidRequestError(f"{param} has {len(items)} items; one request takes at most "
                                  f"{MAX_EMBED_INPUTS}: split it", param=param)
    if all(_is_int(i) for i in items):  # one list of token ids
        return (tuple(items),)
    if isinstance(items[0], str):  # a list of texts
        for n, text in enumerate(items):
            if not isinstance(text, str):
                raise InvalidRequestError(f"{param}[{n}] is a {type(text).__name__}: in a list "
                                          "of texts every item must be a string", param=param)
            if not text:
                raise InvalidRequestError(f"{param}[{n}] is an empty string: there is nothing "
                                          "to embed", param=param)
        return tuple(items)
    ids: list[tuple[int, ...]] = []
    for n, item in enumerate(items):
        if isinstance(item, str | bytes) or not isinstance(item, Sequence) or \
                not all(_is_int(i) for i in item):
            raise InvalidRequestError(
                f"{param}[{n}] is a {type(item).__name__}: give a list of strings, or of "
                "token-id lists (lists of integers)", param=param)
        if not item:
            raise InvalidRequestError(f"{param}[{n}] is an empty list of token ids",
                                      param=param)
        ids.append(tuple(item))
    return tuple(ids)


@dataclass(frozen=True)
class EmbedRequest:
    """A checked embedding request: ``texts`` or ``token_ids`` (exactly one is non-empty).

    ``truncate``: cut an input longer than the model's window to fit (default: such an
    input is an error that names the limit). ``dimensions``: keep the first N numbers of
    each vector (re-normalised when the model normalises), for models trained for it.
    """

    texts: tuple[str, ...] = ()
    token_ids: tuple[tuple[int, ...], ...] = ()
    truncate: bool = False
    dimensions: int | None = None

    @classmethod
    def build(cls, inputs: object, *, truncate: object = False, dimensions: object = None,
              param: str = "input") -> EmbedRequest:
        """Check what a caller gave (the Client's arguments, a request's JSON)."""
        items = _texts_or_ids(inputs, param)
        if not isinstance(truncate, bool):
            raise InvalidRequestError(f"truncate must be true or false, not {truncate!r}",
                                      param="truncate")
        if dimensions is not None and not (isinstance(dimensions, int) and _is_int(dimensions)
                                           and dimensions >= 1):
            raise InvalidRequestError(f"dimensions must be a positive integer, not "
                                      f"{dimensions!r}", param="dimensions")
        if isinstance(items[0], str):
            return cls(texts=items, truncate=truncate,
                       dimensions=dimensions)
        return cls(token_ids=items, truncate=truncate,
                   dimensions=dimensions)

    def __len__(self) -> int:
        return len(self.texts) or len(self.token_ids)

    def input_json(self) -> list[str] | list[list[int]]:
        """The inputs as an OpenAI request's ``input`` field."""
        if self.texts:
            return list(self.texts)
        return [list(ids) for ids in self.token_ids]

    def check_token_ids(self, vocab_size: int) -> None:
        """Every token id names a token of this model."""
        for n, ids in enumerate(self.token_ids):
            bad = next((i for i in ids if not 0 <= i < vocab_size), None)
            if bad is not None:
                raise InvalidRequestError(f"input[{n}] has token id {bad}, outside this "
                                          f"model's vocabulary (0 to {vocab_size - 1})",
                                          param="input")


def shorten(vectors: list[list[float]], dimensions: int | None, native: int,
            normalized: bool) -> list[list[float]]:
    """The first ``dimensions`` numbers of each vector (re-normalised when the model's
    vectors are unit length); an error when more are asked for than the model makes."""
    if dimensions is None or dimensions == native:
        return vectors
    if dimensions > native:
        raise InvalidRequestError(f"dimensions is {dimensions} but this model's vectors have "
                                  f"{native}; ask for {native} or fewer", param="dimensions")
    out = []
    for vector in vectors:
        cut = vector[:dimensions]
        if normalized:
            norm = math.sqrt(sum(x * x for x in cut)) or 1.0
            cut = [x / norm for x in cut]
        out.append(cut)
    return out

