"""The local engine: chat formatting, a generation worker thread and the streamed decode."""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from ..backends import ChunkStream, SyncBackend
from ..errors import GenerationError, InvalidRequestError, OpenWeightError
from ..options import DEFAULT_MAX_TOKENS, GenerationOptions
from ..types import Chunk, FinishReason, Message, ModelInfo, Usage
from . import worker
from .decode import StopMatcher
from .generation import (
    TokenSource,
    default_source,
    generate_source,
    inputs_source,
    resolved_settings,
    sampling_settings,
)
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
from .vision import is_vision_dir, load_vision, vision_inputs

__all__ = ["LocalEngine", "TokenSource", "default_source", "generate_source",
           "resolved_settings", "sampling_settings"]

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
            if is_vision_dir(path):  # transformers' vision classes, as stored
                self._loaded = worker.call(lambda: load_vision(path, device, dtype))
            else:
                self._loaded = worker.call(lambda: load_model(path, device, dtype, quantize,
                                                              cache))
        return self._loaded

    @property
    def is_harmony(self) -> bool:
        return self.loaded.harmony_ids is not None

    def _template_messages(self, messages: Sequence[Message]) -> list[dict[str, Any]]:
        """Messages as template dicts. Reasoning is kept only for the current turn (a tool-call
        chain after the last user message); earlier turns' reasoning is dropped, as gpt-oss's
        harmony and the think-tag families (Qwen3, DeepSeek-R1) expect."""
        last_user = max((i for i, m in enumerate(messages) if m.role == "user"), default=-1)
        parts = self.loaded.processor is not None  # a vision template reads lists of parts
        out = []
        for i, m in enumerate(messages):
            d = m.to_dict()
            if parts:
                d["content"] = m.content_parts()
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
        ``source`` replaces how tokens are generated (see ``TokenSource``); a vision
        model's prompt with its pixels always goes through ``generate``."""
        images = [image for m in messages for image in m.images]
        if images and not is_vision_dir(self.path):  # before anything loads
            raise InvalidRequestError(
                f"{self.name} takes no images: it is a text-only model. Use a vision model "
                "(`openweight models` shows which take images), or send text only",
                param="messages")
        lm = self.loaded
        text = self.format(messages, options)
        if lm.processor is None:
            return self._start(self.tokenize(text), options, self._parser(lm, text, options),
                               source=source)
        inputs = vision_inputs(lm, text, images)
        return self._start(inputs["input_ids"][0].tolist(), options,
                           self._parser(lm, text, options), source=inputs_source(inputs))

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
