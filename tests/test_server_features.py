"""`openweight serve` with tools, structured output and reasoning, over real HTTP.

One server on a loopback port serves the tiny model (its default) and, by name from a
temp store, scripted tiny models of each format: Qwen3 (``<tool_call>`` tags, think tags),
Llama 3 (JSON calls), gpt-oss (harmony) and an R1 distill. A scripted model's ``generate``
emits fixed token ids and records the prompt it was given, so the tests see what the chat
template made of each request. The SDK's remote client and the official ``openai`` client
read the answers back.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import pytest

import openweight
from openweight import GenerationOptions, InvalidRequestError, Message, ToolCall
from openweight import remote as remote_mod

from conftest import WEATHER, ServerThread, scripted_generate, token_ids
from fake_openai import SSE_HEADERS, Body, FakeServer, chunk, resp, sse

ASK = [{"role": "user", "content": "Weather in Paris?"}]
HI = [{"role": "user", "content": "What is 2+2?"}]
PARIS = {"city": "Paris"}
RESULT = "18C and sunny"

# a tool call in each format, and the reasoning that comes with it
CALLS: dict[str, list[str]] = {
    "qwen3": ["<think>", "I should call the tool.", "</think>", "\n\n",
              '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>',
              "<|im_end|>"],
    "llama3": ['{"name": "get_weather", "parameters": {"city": "Paris"}}', "<|eom_id|>"],
    "gptoss": ["<|channel|>", "analysis", "<|message|>", "Need weather.", "<|end|>", "<|start|>",
               "assistant", "<|channel|>", "commentary to=functions.get_weather ",
               "<|constrain|>", "json", "<|message|>", '{"city": "Paris"}', "<|call|>"],
}
CALL_REASONING = {"qwen3": "I should call the tool.", "llama3": None, "gptoss": "Need weather."}
# the answer once the tool result is in, and how each template shows the call and the result
ANSWERS: dict[str, list[str]] = {
    "qwen3": ["<think>", "Got it.", "</think>", "\n\nIt is 18C.", "<|im_end|>"],
    "llama3": ["It is 18C.", "<|eot_id|>"],
    "gptoss": ["<|channel|>", "final", "<|message|>", "It is 18C.", "<|return|>"],
}
SHOWN: dict[str, tuple[str, str]] = {
    "qwen3": ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n',
              f"<tool_response>\n{RESULT}\n</tool_response>"),
    "llama3": ('{"name": "get_weather", "parameters": {"city": "Paris"}}',
               f"ipython<|end_header_id|>\n\n{RESULT}<|eot_id|>"),
    "gptoss": ('to=functions.get_weather <|constrain|>json<|message|>{"city": "Paris"}<|call|>',
               f"<|channel|>commentary<|message|>{RESULT}<|end|>"),
}
FAMILIES = sorted(CALLS)

ANALYSIS, FINAL = "2+2 is 4 ✓", "It is 4."
HARMONY = ["<|channel|>", "analysis", "<|message|>", ANALYSIS, "<|end|>", "<|start|>",
           "assistant", "<|channel|>", "final", "<|message|>", FINAL, "<|return|>"]
REASON, ANSWER = "Sum: 4 ✓", "Four."
THINK = ["<think>", f"\n{REASON}\n", "</think>", f"\n\n{ANSWER}", "<|im_end|>"]

SCHEMA = {
    "type": "object",
    "properties": {"answer": {"enum": ["yes", "no"]},
                   "n": {"type": "integer", "minimum": 0, "maximum": 99},
                   "word": {"type": "string", "maxLength": 8}},
    "required": ["answer", "n", "word"],
}
FMT = {"type": "json_schema", "json_schema": {"name": "out", "schema": SCHEMA}}
NOT_SCHEMA = {"type": "json_schema", "json_schema": {"name": "out", "schema": {
    "type": "object", "properties": {"a": {"not": {"type": "string"}}}}}}


# -- the server and its scripted models -----------------------------------------------------

@pytest.fixture(scope="module")
def served(tiny_model: Path, tiny_gpt_oss: Path, family_model: Callable[[str], Path],
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    """The tiny model by default; qwen3, llama3, r1 and gptoss by name from a temp store."""
    from openweight.server import create_app

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OPENWEIGHT_HOME", str(tmp_path_factory.mktemp("features-store")))
        mp.setenv("OPENWEIGHT_OFFLINE", "1")
        mp.delenv("OPENWEIGHT_BASE_URL", raising=False)
        mp.delenv("OPENWEIGHT_API_KEY", raising=False)
        for name in ("qwen3", "llama3", "r1"):
            openweight.pull(str(family_model(name)), name=name, progress=False)
        openweight.pull(str(tiny_gpt_oss), name="gptoss", progress=False)
        with ServerThread(create_app(str(tiny_model))) as server:
            yield server


@pytest.fixture(scope="module")
def url(served: ServerThread) -> str:
    return served.url


_ids = token_ids


def script(served: ServerThread, monkeypatch: pytest.MonkeyPatch, model: str | None,
           parts: list[str]) -> list[str]:
    """Make the served ``model`` answer ``parts``; returns the prompts it is given."""
    lm = served.app.state.pool.get(model).loaded
    generate = scripted_generate(_ids(lm.tokenizer, parts))
    prompts: list[str] = []

    def recording(**kwargs: Any) -> None:
        prompts.append(lm.tokenizer.decode(kwargs["input_ids"][0]))
        generate(**kwargs)

    monkeypatch.setattr(lm.model, "generate", recording)
    return prompts


def n_tokens(served: ServerThread, model: str, parts: list[str]) -> int:
    return len(_ids(served.app.state.pool.get(model).loaded.tokenizer, parts))


def post(url: str, body: dict[str, Any], path: str = "/v1/chat/completions") -> httpx.Response:
    return httpx.post(url + path, json=body, timeout=30)


def events(url: str, body: dict[str, Any]) -> list[Any]:
    """The data of each SSE event of a streamed request (``[DONE]`` as a string)."""
    out: list[Any] = []
    with httpx.stream("POST", url + "/v1/chat/completions", json={**body, "stream": True},
                      timeout=30) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if line.startswith("data: "):
                data = line[len("data: "):]
                out.append(data if data == "[DONE]" else json.loads(data))
    return out


def joined(evs: list[Any], key: str) -> str:
    return "".join(e["choices"][0]["delta"].get(key) or "" for e in evs
                   if isinstance(e, dict) and e.get("choices"))


def finishes(evs: list[Any]) -> list[str | None]:
    return [e["choices"][0]["finish_reason"] for e in evs if isinstance(e, dict) and e["choices"]]


# -- tools: every call format, on the wire and through both clients ------------------------

@pytest.mark.parametrize("family", FAMILIES)
def test_tool_calls_on_the_wire(served: ServerThread, url: str,
                                monkeypatch: pytest.MonkeyPatch, family: str) -> None:
    script(served, monkeypatch, family, CALLS[family])
    body = {"model": family, "messages": ASK, "tools": [WEATHER]}
    r = post(url, body)
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    message = choice["message"]
    assert message["content"] is None  # as OpenAI answers a call with no text
    assert message.get("reasoning_content") == CALL_REASONING[family]
    (call,) = message["tool_calls"]
    assert set(call) == {"id", "type", "function"} and call["type"] == "function"
    assert call["id"].startswith("call_") and call["function"]["name"] == "get_weather"
    assert isinstance(call["function"]["arguments"], str)  # a JSON string, as OpenAI sends
    assert json.loads(call["function"]["arguments"]) == PARIS

    evs = events(url, body)
    assert evs[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert evs[-1] == "[DONE]"
    deltas = [e["choices"][0]["delta"] for e in evs[:-1]]
    assert [d["tool_calls"] for d in deltas if "tool_calls" in d] == [[{"index": 0, **call}]]
    assert finishes(evs) == [None] * (len(evs) - 2) + ["tool_calls"]
    assert deltas[-1] == {}  # the finish comes in its own event, as OpenAI sends it
    assert joined(evs, "content") == ""
    assert joined(evs, "reasoning_content") == (CALL_REASONING[family] or "")


@pytest.mark.parametrize("family", FAMILIES)
async def test_clients_parse_tool_calls(served: ServerThread, url: str,
                                        monkeypatch: pytest.MonkeyPatch, family: str) -> None:
    import openai

    script(served, monkeypatch, family, CALLS[family])
    remote = openweight.Client(base_url=url, model=family, timeout=30)
    result = remote.chat(ASK, tools=[WEATHER])
    assert result.finish_reason == "tool_calls" and result.text == ""
    (call,) = result.tool_calls
    assert (call.name, dict(call.arguments)) == ("get_weather", PARIS)
    assert call.id.startswith("call_")
    assert result.reasoning == CALL_REASONING[family]
    streamed = list(remote.stream(ASK, tools=[WEATHER]))
    assert streamed[-1].tool_calls == (call,) and streamed[-1].finish_reason == "tool_calls"
    aremote = openweight.AsyncClient(base_url=url, model=family, timeout=30)
    assert (await aremote.chat(ASK, tools=[WEATHER])).tool_calls == (call,)

    with openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0) as oc:
        r = oc.chat.completions.create(model=family, messages=ASK,  # type: ignore[arg-type]
                                       tools=[WEATHER])  # type: ignore[list-item]
        assert r.choices[0].finish_reason == "tool_calls"
        (oc_call,) = r.choices[0].message.tool_calls or []
        assert oc_call.id == call.id and oc_call.type == "function"
        assert oc_call.function.name == "get_weather"
        assert json.loads(oc_call.function.arguments) == PARIS
        # the client's own stream accumulator puts the deltas back together
        with oc.chat.completions.stream(model=family, messages=ASK,  # type: ignore[arg-type]
                                        tools=[WEATHER]) as s:  # type: ignore[list-item]
            final = s.get_final_completion()
        assert final.choices[0].finish_reason == "tool_calls"
        (acc,) = final.choices[0].message.tool_calls or []
        assert (acc.id, acc.function.name, json.loads(acc.function.arguments)) == (
            call.id, "get_weather", PARIS)


@pytest.mark.parametrize("family", FAMILIES)
def test_tool_round_trip_openai(served: ServerThread, url: str,
                                monkeypatch: pytest.MonkeyPatch, family: str) -> None:
    """Call, run the tool, send its result: the template shows both to the model."""
    import openai

    with openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0) as oc:
        script(served, monkeypatch, family, CALLS[family])
        first = oc.chat.completions.create(model=family, messages=ASK,  # type: ignore[arg-type]
                                           tools=[WEATHER])  # type: ignore[list-item]
        called = first.choices[0].message
        assert called.tool_calls
        prompts = script(served, monkeypatch, family, ANSWERS[family])
        history = [*ASK, called.model_dump(exclude_none=True),
                   {"role": "tool", "tool_call_id": called.tool_calls[0].id, "content": RESULT}]
        second = oc.chat.completions.create(model=family,
                                            messages=history,  # type: ignore[arg-type]
                                            tools=[WEATHER])  # type: ignore[list-item]
    assert second.choices[0].message.content == "It is 18C."
    assert second.choices[0].finish_reason == "stop"
    (prompt,) = prompts
    call_shown, result_shown = SHOWN[family]
    assert call_shown in prompt and result_shown in prompt
    assert prompt.index(call_shown) < prompt.index(result_shown)


def test_tool_round_trip_sdk(served: ServerThread, url: str,
                             monkeypatch: pytest.MonkeyPatch) -> None:
    """The SDK sends the call back with its reasoning, which the current turn keeps."""
    remote = openweight.Client(base_url=url, model="qwen3", timeout=30)
    script(served, monkeypatch, "qwen3", CALLS["qwen3"])
    result = remote.chat(ASK, tools=[WEATHER])
    prompts = script(served, monkeypatch, "qwen3", ANSWERS["qwen3"])
    called = Message(role="assistant", content=result.text, reasoning=result.reasoning,
                     tool_calls=result.tool_calls)
    history: list[Message | dict[str, str]] = [
        *ASK, called, Message(role="tool", content=RESULT, tool_call_id=result.tool_calls[0].id)]
    answer = remote.chat(history, tools=[WEATHER])
    assert (answer.text, answer.reasoning, answer.finish_reason) == (
        "It is 18C.", "Got it.", "stop")
    (prompt,) = prompts
    assert "<think>\nI should call the tool.\n</think>" in prompt
    assert all(shown in prompt for shown in SHOWN["qwen3"])


def test_tool_choice_none_offers_no_tools(served: ServerThread, url: str,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    prompts = script(served, monkeypatch, "qwen3", ["Sunny.", "<|im_end|>"])
    r = post(url, {"model": "qwen3", "messages": ASK, "tools": [WEATHER], "tool_choice": "none",
                   "parallel_tool_calls": False})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"] == {"role": "assistant", "content": "Sunny."}
    assert "get_weather" not in prompts[0]
    post(url, {"model": "qwen3", "messages": ASK, "tools": [WEATHER], "tool_choice": "auto"})
    assert "get_weather" in prompts[1]


# -- structured output ----------------------------------------------------------------------

def test_json_schema_through_the_server(url: str, tiny_model: Path) -> None:
    valid = 0
    for seed in range(4):
        body = {"messages": ASK, "response_format": FMT, "temperature": 1.0, "seed": seed,
                "max_tokens": 80}
        r = post(url, body)
        assert r.status_code == 200, r.text
        choice = r.json()["choices"][0]
        if choice["finish_reason"] == "stop":
            jsonschema.validate(json.loads(choice["message"]["content"]), SCHEMA)
            valid += 1
        if seed == 0:  # streamed, the same document
            assert joined(events(url, body), "content") == choice["message"]["content"]
    assert valid >= 1, "no seed finished a document"


async def test_json_schema_through_the_sdk_remote(url: str, tiny_model: Path) -> None:
    local = openweight.Client(str(tiny_model))
    remote = openweight.Client(base_url=url, timeout=30)
    for seed in (0, 1):
        want = local.chat(ASK, response_format=FMT, temperature=1.0, seed=seed, max_tokens=80)
        assert remote.chat(ASK, response_format=FMT, temperature=1.0, seed=seed,
                           max_tokens=80) == want
        if want.finish_reason == "stop":
            jsonschema.validate(json.loads(want.text), SCHEMA)
    aremote = openweight.AsyncClient(base_url=url, timeout=30)
    doc = await aremote.chat(ASK, response_format={"type": "json_object"}, temperature=0,
                             max_tokens=80)
    if doc.finish_reason == "stop":
        assert isinstance(json.loads(doc.text), dict)
    else:
        assert doc.text.startswith("{")


def test_unsupported_schema_is_400_before_generation(served: ServerThread, url: str,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    prompts = script(served, monkeypatch, None, ["never"])
    for stream in (False, True):
        r = post(url, {"messages": ASK, "response_format": NOT_SCHEMA, "stream": stream})
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        assert err["param"] == "response_format" and err["type"] == "invalid_request_error"
        assert "cannot be enforced" in err["message"] and "not" in err["message"]
    remote = openweight.Client(base_url=url, timeout=30)
    with pytest.raises(InvalidRequestError, match="cannot be enforced"):
        remote.chat(ASK, response_format=NOT_SCHEMA)
    assert prompts == [], "generation never started"


# -- bad requests: 400 in OpenAI's shape, naming the field --------------------------------

BAD: list[tuple[dict[str, Any], str, str]] = [
    ({"tools": "get_weather"}, "tools", "list of function specs"),
    ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools",
     "invalid name"),
    ({"tools": [WEATHER, WEATHER]}, "tools", "twice"),
    ({"tools": [WEATHER], "tool_choice": "required"}, "tool_choice", "'auto' or 'none'"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {
        "name": "get_weather"}}}, "tool_choice", "'auto' or 'none'"),
    ({"response_format": {"type": "xml"}}, "response_format", "json_schema"),
    ({"response_format": {"type": "json_schema"}}, "response_format", "schema"),
    ({"parallel_tool_calls": "yes"}, "parallel_tool_calls", "true or false"),
    ({"tools": [WEATHER]}, "tools", "cannot call tools"),  # the tiny model's template
    ({"reasoning_effort": "high"}, "reasoning_effort", "no reasoning-effort control"),
    ({"thinking": True}, "thinking", "no thinking switch"),
    ({"model": "qwen3", "reasoning_effort": "low"}, "reasoning_effort", "not supported"),
    ({"model": "r1", "thinking": False}, "thinking", "no thinking switch"),
    ({"model": "r1", "chat_template_kwargs": {"enable_thinking": False}}, "thinking",
     "no thinking switch"),
    ({"model": "qwen3", "thinking": "yes"}, "thinking", "true or false"),
    ({"model": "gptoss", "thinking": False}, "thinking", "reasoning_effort"),
    ({"model": "gptoss", "reasoning_effort": "extreme"}, "reasoning_effort", "low, medium"),
]


@pytest.mark.parametrize(("extra", "param", "needle"), BAD)
def test_bad_requests(url: str, extra: dict[str, Any], param: str, needle: str) -> None:
    for stream in (False, True):
        r = post(url, {"messages": HI, "max_tokens": 4, "stream": stream, **extra})
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"}
        assert err["param"] == param and needle in err["message"], err


def test_completions_reject_chat_options(url: str) -> None:
    r = post(url, {"prompt": "Once", "reasoning_effort": "low"}, "/v1/completions")
    assert r.status_code == 400
    assert r.json()["error"]["param"] == "reasoning_effort"
    assert "chat only" in r.json()["error"]["message"]


# -- reasoning: reasoning_content, never a header, tag or special token in content ---------

def _check_parts(content: str, reasoning: str, final: str, thought: str,
                 leaks: tuple[str, ...]) -> None:
    for piece in (content, reasoning):
        assert not any(leak in piece for leak in leaks), (content, reasoning)
    assert final.startswith(content) and thought.startswith(reasoning), (content, reasoning)


def test_harmony_reasoning_at_every_cut(served: ServerThread, url: str,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    script(served, monkeypatch, "gptoss", HARMONY)
    leaks = ("<|", "|>", "analysis", "assistant", "final", "channel")
    body: dict[str, Any] = {"model": "gptoss", "messages": HI}
    message = post(url, body).json()["choices"][0]["message"]
    assert message == {"role": "assistant", "content": FINAL, "reasoning_content": ANALYSIS}
    evs = events(url, body)
    assert (joined(evs, "content"), joined(evs, "reasoning_content")) == (FINAL, ANALYSIS)
    first_text = next(i for i, e in enumerate(evs) if e["choices"][0]["delta"].get("content"))
    assert not any(e["choices"][0]["delta"].get("reasoning_content") for e in evs[first_text:-1])
    total = n_tokens(served, "gptoss", HARMONY)
    for n in range(1, total + 1):
        cut = {**body, "max_tokens": n}
        data = post(url, cut).json()
        choice = data["choices"][0]
        _check_parts(choice["message"]["content"],
                     choice["message"].get("reasoning_content", ""), FINAL, ANALYSIS, leaks)
        assert choice["finish_reason"] == ("stop" if n == total else "length")
        assert data["usage"]["completion_tokens"] == n
        evs = events(url, cut)
        _check_parts(joined(evs, "content"), joined(evs, "reasoning_content"), FINAL, ANALYSIS,
                     leaks)
        assert joined(evs, "content") == choice["message"]["content"]


def test_think_tags_at_every_cut(served: ServerThread, url: str,
                                 monkeypatch: pytest.MonkeyPatch) -> None:
    script(served, monkeypatch, "qwen3", THINK)
    leaks = ("<think", "think>", "<|im_end|>", "<|")
    body: dict[str, Any] = {"model": "qwen3", "messages": HI}
    message = post(url, body).json()["choices"][0]["message"]
    assert message == {"role": "assistant", "content": ANSWER,
                       "reasoning_content": REASON + "\n"}
    total = n_tokens(served, "qwen3", THINK)
    for n in range(1, total + 1):
        evs = events(url, {**body, "max_tokens": n})
        _check_parts(joined(evs, "content"), joined(evs, "reasoning_content"), ANSWER,
                     REASON + "\n", leaks)
        assert finishes(evs)[-1] == ("stop" if n == total else "length")


async def test_reasoning_through_the_clients(served: ServerThread, url: str,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    import openai

    script(served, monkeypatch, "gptoss", HARMONY)
    remote = openweight.Client(base_url=url, model="gptoss", timeout=30)
    result = remote.chat(HI)
    assert (result.text, result.reasoning, result.finish_reason) == (FINAL, ANALYSIS, "stop")
    chunks = list(remote.stream(HI))
    assert "".join(c.reasoning for c in chunks) == ANALYSIS
    aremote = openweight.AsyncClient(base_url=url, model="gptoss", timeout=30)
    async with aremote.stream(HI) as stream:
        assert "".join([c.text async for c in stream]) == FINAL
    with openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0) as oc:
        r = oc.chat.completions.create(model="gptoss", messages=HI)  # type: ignore[arg-type]
        assert r.choices[0].message.content == FINAL
        assert r.choices[0].message.reasoning_content == ANALYSIS  # type: ignore[attr-defined]


def test_reasoning_effort_reaches_gpt_oss(served: ServerThread, url: str,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    import openai

    prompts = script(served, monkeypatch, "gptoss", HARMONY)
    assert post(url, {"model": "gptoss", "messages": HI,
                      "reasoning_effort": "high"}).status_code == 200
    openweight.Client(base_url=url, model="gptoss").chat(HI, reasoning_effort="low")
    with openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0) as oc:
        oc.chat.completions.create(model="gptoss", messages=HI,  # type: ignore[call-overload]
                                   reasoning_effort="medium")
    assert ["Reasoning: high" in prompts[0], "Reasoning: low" in prompts[1],
            "Reasoning: medium" in prompts[2]] == [True, True, True]
    with pytest.raises(InvalidRequestError, match="reasoning_effort"):
        openweight.Client(base_url=url).chat(HI, reasoning_effort="high")  # the tiny Llama


def test_thinking_switch_for_qwen3(served: ServerThread, url: str,
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    import openai

    prompts = script(served, monkeypatch, "qwen3", [ANSWER, "<|im_end|>"])
    off = "<think>\n\n</think>\n\n"
    r = post(url, {"model": "qwen3", "messages": HI, "thinking": False})
    assert r.json()["choices"][0]["message"] == {"role": "assistant", "content": ANSWER}
    post(url, {"model": "qwen3", "messages": HI,
               "chat_template_kwargs": {"enable_thinking": False}})
    post(url, {"model": "qwen3", "messages": HI, "thinking": True})
    openweight.Client(base_url=url, model="qwen3").chat(HI, thinking=False)
    with openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0) as oc:
        oc.chat.completions.create(model="qwen3", messages=HI,  # type: ignore[arg-type]
                                   extra_body={"chat_template_kwargs": {"enable_thinking": False}})
    assert [p.endswith(off) for p in prompts] == [True, True, False, True, True]
    with pytest.raises(InvalidRequestError, match="no thinking switch"):
        openweight.Client(base_url=url, model="r1").chat(HI, thinking=True)


# -- raw completions through the public client ---------------------------------------------

async def test_complete_local_and_remote(url: str, tiny_model: Path) -> None:
    local = openweight.Client(str(tiny_model))
    want = local.complete("Once upon a time", max_tokens=8, temperature=0)
    assert want.finish_reason == "length" and want.usage.completion_tokens == 8
    raw = post(url, {"prompt": "Once upon a time", "max_tokens": 8, "temperature": 0},
               "/v1/completions").json()
    assert raw["choices"][0]["text"] == want.text
    remote = openweight.Client(base_url=url, timeout=30)
    assert remote.complete("Once upon a time", max_tokens=8, temperature=0) == want
    chunks = list(remote.stream_complete("Once upon a time", max_tokens=8, temperature=0))
    assert "".join(c.text for c in chunks) == want.text and chunks[-1].usage == want.usage
    aremote = openweight.AsyncClient(base_url=url, timeout=30)
    assert await aremote.complete("Once upon a time", max_tokens=8, temperature=0) == want
    alocal = openweight.AsyncClient(str(tiny_model))
    async with alocal.stream_complete("Once upon a time", max_tokens=8, temperature=0) as s:
        assert "".join([c.text async for c in s]) == want.text
    with pytest.raises(InvalidRequestError, match="tools applies to chat only"):
        local.complete("Once", tools=[WEATHER])
    with pytest.raises(InvalidRequestError, match="prompt must be a string"):
        local.complete(["Once"])  # type: ignore[arg-type]


def test_remote_complete_without_a_completions_api() -> None:
    fake = FakeServer(resp(404, {"error": {"message": "Not Found"}}))
    with pytest.raises(InvalidRequestError, match="has no completions API"):
        fake.backend().complete("Once", GenerationOptions())
    assert [r.url.path for r in fake.requests] == ["/v1/completions"]


# -- the remote backend against what other servers send ------------------------------------

def test_tools_and_response_format_are_sent() -> None:
    fake = FakeServer(resp(200, headers=SSE_HEADERS, content=sse(chunk({}, "stop"))))
    opts = GenerationOptions.from_kwargs({"tools": [WEATHER], "tool_choice": "auto",
                                          "response_format": FMT})
    list(fake.backend().stream([Message(role="user", content="hi")], opts))
    body = fake.bodies[0]
    assert (body["tools"], body["tool_choice"], body["response_format"]) == (
        [WEATHER], "auto", FMT)


def test_tool_call_fragments_of_several_servers() -> None:
    body = sse(
        # two calls interleaved by index; one server repeats the name in each fragment
        chunk({"tool_calls": [{"index": 0, "id": "a", "type": "function",
                               "function": {"name": "get_weather", "arguments": '{"ci'}}]}),
        chunk({"tool_calls": [{"index": 1, "id": "b", "type": "function",
                               "function": {"name": "get_time", "arguments": ""}}]}),
        chunk({"tool_calls": [{"index": 0, "function": {"name": "get_weather",
                                                        "arguments": 'ty": "Paris"}'}}]}),
        chunk({"tool_calls": [{"index": 1, "function": {"arguments": "{}"}}]}),
        chunk({}, "tool_calls"))
    (last,) = list(FakeServer(resp(200, headers=SSE_HEADERS, content=body)).backend()
                   .stream([Message(role="user", content="hi")], GenerationOptions()))
    assert last.tool_calls == (ToolCall(id="a", name="get_weather", arguments=PARIS),
                               ToolCall(id="b", name="get_time", arguments={}))
    assert last.finish_reason == "tool_calls"


@pytest.mark.parametrize("index", [{}, {"index": 0}], ids=["no-index", "index-0"])
def test_ollama_calls_share_an_index(index: dict[str, int]) -> None:
    """Ollama: no index (older) or index 0 for every call; a new id starts a new call."""
    def call(call_id: str, args: Any) -> dict[str, Any]:
        fn = {"arguments": args} if not call_id else {"name": "get_weather", "arguments": args}
        return {**index, **({"id": call_id} if call_id else {}), "function": fn}

    body = sse(
        chunk({"role": "assistant", "content": "", "tool_calls": [call("call_x", PARIS)]}),
        chunk({"tool_calls": [call("call_y", '{"city": ')]}),
        chunk({"tool_calls": [call("", '"Oslo"}')]}),  # a fragment of the latest call
        chunk({}, "stop"))
    (last,) = list(FakeServer(resp(200, headers=SSE_HEADERS, content=body)).backend()
                   .stream([Message(role="user", content="hi")], GenerationOptions()))
    assert [(c.id, c.name, dict(c.arguments)) for c in last.tool_calls] == [
        ("call_x", "get_weather", PARIS), ("call_y", "get_weather", {"city": "Oslo"})]
    assert last.finish_reason == "tool_calls"


async def test_async_stream_aclose_closes_the_response(monkeypatch: pytest.MonkeyPatch) -> None:
    """AsyncClient's stream: aclose() reaches the HTTP response at once, not at GC time."""
    body = Body([sse(chunk({"content": w}), done=False) for w in "abcd"])
    fake = FakeServer(lambda r: httpx.Response(200, headers=SSE_HEADERS, stream=body))
    for name in ("RemoteBackend", "AsyncRemoteBackend"):
        monkeypatch.setattr(remote_mod, name, functools.partial(
            getattr(remote_mod, name), transport=httpx.MockTransport(fake)))
    client = openweight.AsyncClient(base_url="http://gpu-box:8000/v1", model="m")
    stream = client.stream([{"role": "user", "content": "hi"}])
    assert (await stream.__anext__()).text == "a"
    await stream.aclose()
    assert body.closed
