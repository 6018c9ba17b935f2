"""What a step of the continuous batch (``scheduler.py``) computes: ``BatchModel`` runs the
rows of several requests through the fast path's layers over the batch's paged KV cache
(``paged_kv.py``), and ``Request`` picks each request's tokens with its own sampler.

Each row is computed with the same operations as on the single-stream path
(``fast.FastModel``): a generated token runs every layer in one call of ours
(``FastModel.step``, ``step_kernel.DecodeStep``) where that step runs, its keys read by their
slots; prompt tokens run the layers one operation at a time, attention per request. The
quantised matrix products are row-independent and attention reads only the request's own
keys, so a greedy answer is the same token for token whether it was decoded alone, beside
seven others, or on the single-stream path. Imported when a batch starts (it imports
torch), so that importing ``batching`` stays light."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from ..errors import GenerationError
from .fast import FastModel, offset_mask
from .loader import LoadedModel
from .paged_kv import PagedKV
from .sampler import Sampler

__all__ = ["BatchModel", "Request", "Row"]


@dataclass
class Request:
    """What a step needs to pick a request's tokens; the sampler (the single-stream path's,
    with the request's own seeded generator) is made on the model thread at its first
    token."""

    settings: dict[str, Any]
    seed: int | None
    prompt: list[int]
    max_new: int
    sampler: Any = None

    def pick(self, logits: Any) -> int:
        """The next token from ``logits`` ([1, vocab])."""
        if self.sampler is None:
            self.sampler = Sampler(self.settings, [], self.seed, self.prompt, self.max_new)
        return int(self.sampler.pick(logits))


@dataclass
class Row:
    """One request's tokens in a step: ``tokens`` at positions from ``start``, its keys and
    values in the pages ``held``; ``decoding``: a generated token (not prompt); ``keep``:
    the step returns the logits of its last token."""

    held: list[int]
    start: int
    tokens: list[int]
    decoding: bool
    keep: bool
    end: int = field(init=False)

    def __post_init__(self) -> None:
        self.end = self.start + len(self.tokens)


class BatchModel:
    """The fast path's layers over a batch step's rows, with the batch's KV cache (``kv``,
    ``pages`` pages of ``page`` tokens, allocated here: make it on the model thread)."""

    def __init__(self, lm: LoadedModel, pages: int, page: int) -> None:
        fast = lm.fast
        assert fast is not None, "the batch's own step needs the fast path's layers"
        self.fast: FastModel = fast
        self.kv = PagedKV(len(fast.layers), fast.kv_heads, fast.head_dim, pages, page)

    def logits(self, rows: Sequence[Row]) -> Any:
        """The logits ([kept rows, vocab], in order) of the last token of each row kept:
        the rows' keys and values are written to their pages on the way. The rows decoding
        a token run in one call of ours, as a request alone decodes; the others (prompt
        chunks) the layers one operation at a time, as alone."""
        fast = self.fast
        with torch.inference_mode():
            ids = torch.tensor([t for r in rows for t in r.tokens])
            pos = torch.tensor([p for r in rows for p in range(r.start, r.end)])
            offsets = [0]
            for r in rows:
                offsets.append(offsets[-1] + len(r.tokens))
            keep = [offsets[i + 1] - 1 for i, r in enumerate(rows) if r.keep]
            one = [i for i, r in enumerate(rows) if r.decoding] if fast.one_call else []
            if not one:
                return fast.logits(self._layers(ids, pos, rows)[keep])
            x = fast.embed(ids).float().contiguous()
            if len(one) == len(rows):  # every row decodes a token: one row each
                x = self._one_call(x, pos, rows)
            else:
                flat = [offsets[i] for i in one]  # a decoding row is one token
                x[flat] = self._one_call(x[flat], pos[flat], [rows[i] for i in one])
                chosen = set(one)
                rest = [i for i in range(len(rows)) if i not in chosen]
                at = [j for i in rest for j in range(offsets[i], offsets[i + 1])]
                x[at] = self._layers(ids[at], pos[at], [rows[i] for i in rest]).float()
            return fast.logits(x[keep].to(fast.dtype))  # (exact: from bf16 or float32)

    def _layers(self, ids: Any, pos: Any, rows: Sequence[Row]) -> Any:
        """The final hidden states of these rows' tokens (``ids`` at ``pos``), the layers
        run one operation at a time, attention per request over its own keys (read in
        place where its pages follow each other, else gathered by their slots)."""
        fast, kv = self.fast, self.kv
        spans = []  # each request's rows, where its keys lie, its mask
        at = 0
        for r in rows:
            n = r.end - r.start
            spans.append((at, at + n, kv.place(r.held, r.end), offset_mask(r.start, n)))
            at += n
        writes = torch.cat([kv.slots(r.held, r.start, r.end) for r in rows])
        gqa = fast.heads != fast.kv_heads

        def attend(li: int, q: Any, k: Any, v: Any) -> Any:
            k_all, v_all = kv.views[li]
            k_all.index_copy_(2, writes, k.float().unsqueeze(0))
            v_all.index_copy_(2, writes, v.float().unsqueeze(0))
            q = q.float().unsqueeze(0)
            scale = fast.layers[li].scaling
            outs = []
            for start, end, place, mask in spans:
                keys, values = _keys_at(place, k_all, v_all)
                outs.append(F.scaled_dot_product_attention(
                    q[:, :, start:end], keys, values, attn_mask=mask,
                    is_causal=end - start > 1 and mask is None, scale=scale, enable_gqa=gqa))
            return outs[0] if len(outs) == 1 else torch.cat(outs, 2)

        cos, sin = fast.rope_at(pos)
        return fast.run_layers(fast.embed(ids), cos, sin, attend)

    def _one_call(self, x: Any, pos: Any, rows: Sequence[Row]) -> Any:
        """The final hidden states of these decoding rows (embedded ``x``, float32, a row
        each), by the fast path's one-call step over the paged cache in place, each row's
        keys read by their slots: the very computation a request alone gets for its
        tokens."""
        fast, kv = self.fast, self.kv
        reads = torch.cat([kv.slots(r.held, 0, r.end) for r in rows])
        spans, at = [], 0
        for r in rows:  # (slot to write, where its slots start in reads, how many)
            spans.append((kv.slot(r.held, r.start), at, r.end))
            at += r.end
        x = x.contiguous()
        cos, sin = fast.rope_at(pos)
        assert fast.step is not None
        if not fast.step(x, kv.keys, kv.values, torch.tensor(spans, dtype=torch.int64),
                         cos.float(), sin.float(), head_stride=fast.head_dim,
                         token_stride=fast.kv_heads * fast.head_dim, reads=reads):
            raise GenerationError("the kernels changed while the batch ran")
        return x


def _keys_at(place: Any, k_all: Any, v_all: Any) -> tuple[Any, Any]:
    """One request's keys and values (see ``PagedKV.place``): a slice or a gather."""
    if isinstance(place, tuple):
        return k_all[:, :, place[0]:place[1]], v_all[:, :, place[0]:place[1]]
    return k_all.index_select(2, place), v_all.index_select(2, place)
