"""Structured output: decoding constrained by a JSON schema with llguidance.

At each step llguidance computes which tokens keep the output a valid prefix of some
document the schema accepts; every other token's logit is set to -inf. The output
therefore always parses and validates (unless max_tokens cuts it short).
"""

from __future__ import annotations

import json
import threading
from typing import TYPE_CHECKING, Any

from ..errors import InvalidRequestError
from .loader import LoadedModel

if TYPE_CHECKING:
    from llguidance._lib import JsonCompileOptions

__all__ = ["SchemaConstraint", "compile_schema", "schema_instruction"]

_tokenizers: dict[int, Any] = {}
_tokenizers_lock = threading.Lock()
# compact JSON: a small model cannot wander off into endless whitespace
_JSON_OPTIONS: JsonCompileOptions = {"whitespace_flexible": False}


def _ll_tokenizer(lm: LoadedModel) -> Any:
    """The llguidance view of the model's tokenizer (about a second to build; cached)."""
    import llguidance.hf

    with _tokenizers_lock:
        key = id(lm)
        if key not in _tokenizers:
            _tokenizers[key] = llguidance.hf.from_tokenizer(
                lm.tokenizer, n_vocab=len(lm.tokenizer), eos_token=sorted(lm.eos_ids)
            )
        return _tokenizers[key]


def closed_objects(schema: Any) -> Any:
    """The schema with ``additionalProperties: false`` wherever an object lists its properties
    and says nothing about others (as OpenAI's strict mode requires). Every output still
    validates against the original schema; small models just can't pad it with stray keys."""
    if isinstance(schema, list):
        return [closed_objects(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: closed_objects(v) if k not in ("enum", "const", "default", "examples") else v
           for k, v in schema.items()}
    if "properties" in out and "additionalProperties" not in out:
        out["additionalProperties"] = False
    return out


def compile_schema(lm: LoadedModel, schema: dict[str, Any]) -> str:
    """The grammar for ``schema``; an unsupported construct is an error before generation."""
    from llguidance import LLMatcher

    try:
        grammar = LLMatcher.grammar_from_json_schema(json.dumps(closed_objects(schema)),
                                                     defaults=_JSON_OPTIONS)
    except (ValueError, TypeError) as exc:
        raise InvalidRequestError(f"the JSON schema is not valid JSON: {exc}",
                                  param="response_format") from exc
    is_error, messages = LLMatcher.validate_grammar_with_warnings(grammar, _ll_tokenizer(lm))
    if is_error:
        raise InvalidRequestError(f"this JSON schema cannot be enforced: {messages[0]}; "
                                  "simplify the schema (see llguidance's supported keywords)",
                                  param="response_format")
    return grammar


def schema_instruction(schema: dict[str, Any]) -> str:
    """Told to the model too: constrained decoding keeps it valid, this keeps it sensible."""
    return ("Reply with only a JSON value that follows this JSON schema:\n"
            + json.dumps(schema, ensure_ascii=False))


class SchemaConstraint:
    """A transformers logits processor that masks every token the grammar forbids."""

    def __init__(self, lm: LoadedModel, grammar: str) -> None:
        from llguidance import LLMatcher

        self._matcher = LLMatcher(_ll_tokenizer(lm), grammar, log_level=0)
        self._prompt_len: int | None = None

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        import numpy as np
        import torch
        from llguidance.numpy import allocate_token_bitmask, fill_next_token_bitmask

        if self._prompt_len is None:
            self._prompt_len = int(input_ids.shape[1])
        elif not self._matcher.consume_token(int(input_ids[0, -1])):
            raise RuntimeError(f"constrained decoding failed: {self._matcher.get_error()}")
        vocab = scores.shape[-1]
        mask = allocate_token_bitmask(1, vocab)
        fill_next_token_bitmask(self._matcher, mask)
        allowed = np.unpackbits(mask.view(np.uint8), bitorder="little")[:vocab].astype(bool)
        blocked = torch.from_numpy(~allowed).to(scores.device)
        return scores.masked_fill(blocked.unsqueeze(0), float("-inf"))
