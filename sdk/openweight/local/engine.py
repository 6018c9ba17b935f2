"""The local engine: chat formatting, a generation worker thread and the streamed decode."""

from __future__ import annotations

import contextlib
import queue
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from ..backends import ChunkStream, SyncBackend
from ..errors import GenerationError, InvalidRequestError, OpenWeightError
from ..options import DEFAULT_MAX_TOKENS, GenerationOptions
from ..types import Chunk, FinishReason, Message, ModelInfo, Usage
from . import worker
from .decode import StopMatcher
from .loader import LoadedModel, load_model
from .parsers import Delta, JsonCallParser, OutputParser, PlainParser
from .thinking import (
    CALL_OPEN,
    THINK_CLOSE,
    THINK_OPEN,
    ThinkParser,
    starts_inside_think,
    think_token_ids,
)

__all__ = ["LocalEngine", "TokenSource", "default_source", "generate_source",
           "resolved_settings", "sampling_settings"]

_DONE = object()

TokenSource = Callable[[LoadedModel, list[int], int, GenerationOptions, threading.Event],
                       Iterator[int]]
"""Yields the token ids generated after ``prompt``: (model, prompt ids, max new tokens,
options, cancel event). It stops by itself after max_new tokens or an end-of-sequence id,
promptly once the event is set, and frees what it holds when closed."""

POLL_SECONDS = 0.5


class _QueueStreamer:
    """A transformers streamer that hands each new token id to the consumer's queue."""

    def __init__(self, out: queue.Queue[object]) -> None:
        self._out = out
        self._prompt_seen = False
        self.generated: list[int] = []

    def put(self, value: Any) -> None:
        if not self._prompt_seen:  # generate() first puts the prompt
            self._prompt_seen = True
            return
        for token in value.reshape(-1).tolist():
            self.generated.append(int(token))
            self._out.put(int(token))

    def end(self) -> None:
        pass


class _Cancelled:
    """A stopping criterion that ends generation once the consumer is gone or satisfied."""

    def __init__(self, event: threading.Event) -> None:
        self._event = event

    def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
        import torch

        return torch.full((input_ids.shape[0],), self._event.is_set(), dtype=torch.bool,
                          device=input_ids.device)


class LocalEngine(SyncBackend):
    """Runs one model directory in this process (a ``SyncBackend``)."""

    def __init__(self, path: str | Path, *, name: str | None = None, device: str | None = None,
                 dtype: str | None = None, quantize: str | None = None,
                 packed_cache: Path | None = None) -> None:
        self.path = Path(path)
        self.name = name or self.path.name
        self._device = device
        self._dtype = dtype
        self._quantize = quantize
        self._packed_cache = packed_cache
        self._loaded: LoadedModel | None = None

    @property
    def loaded(self) -> LoadedModel:
        """The model, loaded on first use and shared through the process-wide cache."""
        if self._loaded is None:
            path, device, dtype, quantize = self.path, self._device, self._dtype, self._quantize
            cache = self._packed_cache
            self._loaded = worker.call(lambda: load_model(path, device, dtype, quantize, cache))
        return self._loaded

    @property
    def is_harmony(self) -> bool:
        return self.loaded.harmony_ids is not None

    def _template_messages(self, messages: Sequence[Message]) -> list[dict[str, Any]]:
        """Messages as template dicts. Reasoning is kept only for the current turn (a tool-call
        chain after the last user message); earlier turns' reasoning is dropped, as gpt-oss's
        harmony and the think-tag families (Qwen3, DeepSeek-R1) expect."""
        last_user = max((i for i, m in enumerate(messages) if m.role == "user"), default=-1)
        out = []
        for i, m in enumerate(messages):
            d = m.to_dict()
            reasoning = d.pop("reasoning_content", None)
            if reasoning and i > last_user:
                d["thinking"] = d["reasoning_content"] = reasoning
            if m.role == "assistant" and i < last_user and THINK_CLOSE in m.content:
                d["content"] = m.content.rsplit(THINK_CLOSE, 1)[1].lstrip("\n")
            out.append(d)
        return out

    def format(self, messages: Sequence[Message], options: GenerationOptions | None = None) -> str:
        """The prompt text the model's chat template makes of the conversation and options."""
        lm = self.loaded
        opts = options or GenerationOptions()
        extra: dict[str, Any] = {}
        template = lm.tokenizer.chat_template or ""
        if opts.active_tools:
            if "tools" not in template:
                raise InvalidRequestError(
                    f"{self.name} cannot call tools: its chat template takes no tool "
                    "definitions; use a model whose template does (gpt-oss, Qwen, Llama 3.x, "
                    "Hermes-style)", param="tools"
                )
            extra["tools"] = list(opts.active_tools)
        schema = opts.json_schema
        if schema is not None:
            from .constrain import schema_instruction

            messages = _with_system(messages, schema_instruction(schema))
        if opts.reasoning_effort is not None:
            if lm.harmony_ids is None:
                raise InvalidRequestError(
                    f"option reasoning_effort is not supported by {self.name}: it has no "
                    "reasoning-effort control (gpt-oss models do); remove the option",
                    param="reasoning_effort",
                )
            extra["reasoning_effort"] = opts.reasoning_effort
        if opts.thinking is not None:
            if lm.harmony_ids is not None:
                raise InvalidRequestError(f"{self.name} always reasons; control how much with "
                                          "reasoning_effort (low, medium, high), not thinking",
                                          param="thinking")
            if "enable_thinking" not in template:
                raise InvalidRequestError(f"option thinking is not supported by {self.name}: "
                                          "its chat template has no thinking switch",
                                          param="thinking")
            extra["enable_thinking"] = opts.thinking
        try:
            return str(lm.tokenizer.apply_chat_template(
                self._template_messages(messages), add_generation_prompt=True, tokenize=False,
                **extra,
            ))
        except Exception as exc:
            raise InvalidRequestError(f"the chat template of {self.name} rejected these "
                                      f"messages: {exc}", param="messages") from exc

    def tokenize(self, prompt: str) -> list[int]:
        return list(self.loaded.tokenizer(prompt, add_special_tokens=False)["input_ids"])

    def encode(self, messages: Sequence[Message],
               options: GenerationOptions | None = None) -> list[int]:
        """Token ids of the conversation formatted by the model's chat template."""
        return self.tokenize(self.format(messages, options))

    def models(self) -> list[ModelInfo]:
        return [ModelInfo(name=self.name, installed=True, path=str(self.path))]

    def stream(self, messages: Sequence[Message], options: GenerationOptions, *,
               source: TokenSource | None = None) -> ChunkStream:
        """Validate now, then return a stream of chunks (close it to stop generating).
        ``source`` replaces how tokens are generated (see ``TokenSource``)."""
        lm = self.loaded
        text = self.format(messages, options)
        return self._start(self.tokenize(text), options, self._parser(lm, text, options),
                           source=source)

    def complete(self, prompt: str, options: GenerationOptions, *,
                 source: TokenSource | None = None) -> ChunkStream:
        """Continue raw text, with no chat template (the legacy completions API)."""
        ids = list(self.loaded.tokenizer(prompt)["input_ids"])
        if not prompt or not ids:
            raise InvalidRequestError("the prompt is empty; give some text to continue",
                                      param="prompt")
        return self._start(ids, options, PlainParser(self.loaded.tokenizer), field="prompt",
                           source=source)

    def _start(self, prompt: list[int], options: GenerationOptions, parser: OutputParser,
               field: str = "messages", source: TokenSource | None = None) -> ChunkStream:
        lm = self.loaded
        room = lm.context_length - len(prompt)
        if room <= 0:
            raise InvalidRequestError(
                f"the prompt is {len(prompt)} tokens but {self.name} has a context window of "
                f"{lm.context_length} tokens; shorten the conversation", param=field
            )
        max_new = min(options.max_tokens or DEFAULT_MAX_TOKENS, room)
        return self._generate(lm, prompt, max_new, options, parser, source)

    def _parser(self, lm: LoadedModel, prompt: str, options: GenerationOptions) -> OutputParser:
        """The output format of this model family: harmony, tags, JSON calls, or plain."""
        if options.json_schema is not None:  # the grammar makes the whole output one JSON value
            return PlainParser(lm.tokenizer)
        template = lm.tokenizer.chat_template or ""
        tools = bool(options.active_tools)
        if lm.harmony_ids is not None:
            from ..harmony import HarmonyParser

            return HarmonyParser(lm.tokenizer, lm.harmony_ids)
        tags_for_calls = tools and CALL_OPEN in template
        if tags_for_calls or think_token_ids(lm.tokenizer) is not None or THINK_OPEN in template:
            return ThinkParser(lm.tokenizer, inside=starts_inside_think(prompt),
                               tool_calls=tags_for_calls)
        if tools:
            return JsonCallParser(lm.tokenizer)
        return PlainParser(lm.tokenizer)

    def _generate(self, lm: LoadedModel, prompt: list[int], max_new: int,
                  options: GenerationOptions, parser: OutputParser | None = None,
                  source: TokenSource | None = None) -> ChunkStream:
        cancel = threading.Event()
        if options.json_schema is not None:  # validate now, not at the first token
            from .constrain import compile_schema

            compile_schema(lm, options.json_schema)
        parser = parser or PlainParser(lm.tokenizer)
        tokens = (source or default_source)(lm, prompt, max_new, options, cancel)

        def chunks() -> Iterator[Chunk]:
            stops = StopMatcher(options.stop)
            count = 0
            finish: FinishReason = "length"
            try:
                deltas: list[Delta] = []
                for token in tokens:
                    count += 1
                    deltas = parser.feed(token)
                    if token in lm.eos_ids:
                        finish = "stop"
                    if finish == "stop" or count >= max_new:
                        deltas += parser.flush()
                    chunk = _to_chunk(deltas, stops)
                    if chunk is not None:
                        yield chunk
                    if stops.stopped:
                        finish = "stop"
                    if finish == "stop" or count >= max_new:
                        break
                else:
                    chunk = _to_chunk(parser.flush(), stops)
                    if chunk is not None:
                        yield chunk
                tail = "" if stops.stopped else stops.flush()
                if tail:
                    yield Chunk(text=tail)
                if stops.stopped:
                    finish = "stop"
                if parser.tool_calls and not stops.stopped:
                    finish = "tool_calls"
                yield Chunk(tool_calls=tuple(parser.tool_calls), finish_reason=finish,
                            usage=Usage(prompt_tokens=len(prompt), completion_tokens=count))
            except OpenWeightError:
                raise
            except Exception as exc:
                raise GenerationError(f"generation failed in {self.name}: {exc}") from exc
            finally:
                cancel.set()
                close = getattr(tokens, "close", None)
                if close is not None:
                    close()

        return ChunkStream(chunks(), on_close=cancel.set)


def sampling_settings(lm: LoadedModel, options: GenerationOptions,
                      max_new: int) -> dict[str, Any]:
    """``generate`` keyword arguments for these options: greedy or sampling and its knobs,
    end-of-sequence and padding ids."""
    config = lm.model.generation_config
    kwargs: dict[str, Any] = {
        "max_new_tokens": max_new,
        "min_new_tokens": 0,
        "eos_token_id": sorted(lm.eos_ids) or None,
        "pad_token_id": lm.tokenizer.pad_token_id
        if lm.tokenizer.pad_token_id is not None
        else (min(lm.eos_ids) if lm.eos_ids else 0),
    }
    if options.temperature == 0.0 or (options.temperature is None and not config.do_sample):
        kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None, min_p=None)
    else:
        kwargs.update(do_sample=True)
        for name in ("temperature", "top_p", "top_k", "min_p"):
            value = getattr(options, name)
            if value is not None:
                kwargs[name] = value
        if options.top_k == 0:
            kwargs["top_k"] = None
    if options.repetition_penalty is not None:
        kwargs["repetition_penalty"] = options.repetition_penalty
    return kwargs


def _constraints(lm: LoadedModel, options: GenerationOptions) -> list[Any]:
    if options.json_schema is None:
        return []
    from .constrain import SchemaConstraint, compile_schema

    return [SchemaConstraint(lm, compile_schema(lm, options.json_schema))]


def default_source(lm: LoadedModel, prompt: list[int], max_new: int,
                   options: GenerationOptions, cancel: threading.Event) -> Iterator[int]:
    """The fast CPU path where the model takes it; otherwise transformers' ``generate``.
    A ``generate`` set on the model instance (a hook, a test's scripted generate) wins."""
    if lm.fast is not None and "generate" not in vars(lm.model):
        return _fast_source(lm, prompt, max_new, options, cancel)
    return generate_source(lm, prompt, max_new, options, cancel)


# what ``generate`` samples with when neither the request nor the model's generation
# config sets a knob (transformers' GenerationConfig defaults): the fast path and the batch
# apply the same, so a seeded answer does not depend on the path that decoded it
GENERATE_DEFAULTS: dict[str, Any] = {"temperature": 1.0, "top_k": 50, "top_p": 1.0}


def resolved_settings(lm: LoadedModel, options: GenerationOptions,
                      max_new: int) -> dict[str, Any]:
    """``sampling_settings`` with the knobs left unset filled from the model's generation
    config, as ``generate`` fills them (the fast path has no ``generate`` to do it)."""
    settings = sampling_settings(lm, options, max_new)
    config = lm.model.generation_config
    if settings.get("do_sample"):
        for name in ("temperature", "top_p", "top_k", "min_p"):
            value = getattr(config, name, None)
            settings.setdefault(name, GENERATE_DEFAULTS.get(name) if value is None else value)
    settings.setdefault("repetition_penalty", getattr(config, "repetition_penalty", None))
    return settings


def _fast_source(lm: LoadedModel, prompt: list[int], max_new: int,
                 options: GenerationOptions, cancel: threading.Event) -> Iterator[int]:
    from .fast import fast_tokens

    return fast_tokens(lm, prompt, max_new, resolved_settings(lm, options, max_new),
                       _constraints(lm, options), options.seed, cancel)


def generate_source(lm: LoadedModel, prompt: list[int], max_new: int,
                    options: GenerationOptions, cancel: threading.Event) -> Iterator[int]:
    """transformers' ``generate`` on the model thread, streaming through a queue."""
    import torch
    from transformers import Cache

    tokens: queue.Queue[object] = queue.Queue()
    kwargs = sampling_settings(lm, options, max_new)
    processors = _constraints(lm, options)
    if processors:
        kwargs["logits_processor"] = processors

    def work() -> None:
        try:
            with lm.lock, torch.inference_mode():
                if cancel.is_set():
                    return
                if options.seed is not None:
                    torch.manual_seed(options.seed)
                cache, _reused = lm.prefix_cache.take(prompt, kind=Cache)
                if cache is None:
                    from transformers import DynamicCache

                    cache = DynamicCache(config=lm.model.config)
                ids = torch.tensor([prompt], device=lm.device)
                streamer = _QueueStreamer(tokens)
                lm.model.generate(
                    input_ids=ids,
                    attention_mask=torch.ones_like(ids),
                    streamer=streamer,
                    stopping_criteria=[_Cancelled(cancel)],
                    cache=cache,
                    **kwargs,
                )
                # the cache now holds the prompt and all but the last generated token
                held = (prompt + streamer.generated)[: cache.get_seq_length()]
                lm.prefix_cache.put(held, cache)
        except BaseException as exc:  # handed to the consumer, never lost
            tokens.put(exc)
        finally:
            tokens.put(_DONE)

    def generated() -> Iterator[int]:
        job = worker.submit(work)
        try:
            while True:
                try:
                    item = tokens.get(timeout=POLL_SECONDS)
                except queue.Empty:
                    if job.done() and tokens.empty():
                        raise GenerationError("the generation job ended without a "
                                              "result") from None
                    continue
                if item is _DONE:
                    return
                if isinstance(item, BaseException):
                    raise GenerationError(f"generation failed in {lm.path.name}: "
                                          f"{item}") from item
                assert isinstance(item, int)
                yield item
        finally:
            cancel.set()  # generate() stops at its next token
            with contextlib.suppress(Exception):
                job.result(timeout=30)

    return generated()


def _with_system(messages: Sequence[Message], instruction: str) -> list[Message]:
    """Add an instruction to the system message (or start the conversation with one)."""
    out = list(messages)
    if out and out[0].role == "system":
        out[0] = Message("system", f"{out[0].content}\n\n{instruction}")
    else:
        out.insert(0, Message("system", instruction))
    return out


def _to_chunk(deltas: list[Delta], stops: StopMatcher) -> Chunk | None:
    """Merge deltas into one chunk; stop strings apply to the answer text only."""
    if stops.stopped:
        return None
    text = "".join(stops.feed(piece) for kind, piece in deltas
                   if kind == "text" and not stops.stopped)
    reasoning = "".join(piece for kind, piece in deltas if kind == "reasoning")
    return Chunk(text=text, reasoning=reasoning) if text or reasoning else None
