"""`POST /v1/responses` through the official `openai` client's `client.responses.create`,
whole and streamed, against the scripted models of test_server_features: gpt-oss
(harmony: reasoning, a function call, its output, a final answer), a think-tag model
(Qwen3) and a plain one."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import jsonschema
import openai
import pytest
from test_server_features import ANSWERS, CALLS, REASON, SCHEMA, SHOWN, THINK, script, served

from conftest import WEATHER, ServerThread

__all__ = ["served"]  # the module-scoped server fixture, shared

TOOL = {"type": "function", "name": "get_weather", "description": "The weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                       "required": ["city"]}}
ASK = "Weather in Paris?"


_clients: list[openai.OpenAI] = []


def client(served: ServerThread) -> openai.OpenAI:
    """An official client for this server, closed at the end of the module (its
    connections would otherwise be left to the garbage collector)."""
    made = openai.OpenAI(base_url=served.url + "/v1", api_key="none", max_retries=0)
    _clients.append(made)
    return made


@pytest.fixture(scope="module", autouse=True)
def _close_clients() -> Iterator[None]:
    yield
    while _clients:
        _clients.pop().close()


def test_a_plain_answer_whole(served: ServerThread) -> None:
    resp = client(served).responses.create(model="qwen3", input="What is 2+2?",
                                           max_output_tokens=4)
    assert resp.object == "response" and resp.model == "qwen3"
    assert resp.status in ("completed", "incomplete")
    assert resp.output[-1].type == "message" and isinstance(resp.output_text, str)
    assert resp.usage is not None and resp.usage.input_tokens > 0
    assert resp.usage.output_tokens <= 4


def test_gpt_oss_reasoning_a_function_call_its_output_and_the_answer(
        served: ServerThread, monkeypatch: pytest.MonkeyPatch) -> None:
    api = client(served)
    script(served, monkeypatch, "gptoss", CALLS["gptoss"])
    first = api.responses.create(model="gptoss", input=ASK, tools=[TOOL])  # type: ignore[list-item]
    kinds = [item.type for item in first.output]
    assert kinds == ["reasoning", "function_call"]
    reasoning, call = first.output
    assert reasoning.content[0].text == "Need weather."  # type: ignore[union-attr,index]
    assert call.name == "get_weather" and json.loads(call.arguments) == {"city": "Paris"}  # type: ignore[union-attr]
    assert first.usage is not None and first.usage.output_tokens_details.reasoning_tokens > 0
    prompts = script(served, monkeypatch, "gptoss", ANSWERS["gptoss"])
    follow: list[Any] = [{"role": "user", "content": ASK},
                         *[item.model_dump(exclude_none=True) for item in first.output],
                         {"type": "function_call_output", "call_id": call.call_id,  # type: ignore[union-attr]
                          "output": "18C and sunny"}]
    second = api.responses.create(model="gptoss", input=follow, tools=[TOOL])  # type: ignore[list-item]
    assert second.output_text == "It is 18C." and second.status == "completed"
    shown_call, shown_result = SHOWN["gptoss"]
    assert shown_call in prompts[-1] and shown_result in prompts[-1]


def test_a_think_tag_model_streams_typed_events(served: ServerThread,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    script(served, monkeypatch, "qwen3", THINK)
    with client(served).responses.create(model="qwen3", input="2+2?", stream=True) as stream:
        events = list(stream)
    kinds = [e.type for e in events]
    assert kinds[:2] == ["response.created", "response.in_progress"]
    assert kinds[-1] == "response.completed"
    assert [e.sequence_number for e in events] == list(range(len(events)))
    reasoning = "".join(e.delta for e in events if e.type == "response.reasoning_text.delta")
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert reasoning.strip() == REASON and text.strip() == "Four."
    final = events[-1].response  # type: ignore[union-attr]
    assert [i.type for i in final.output] == ["reasoning", "message"]
    assert final.output_text.strip() == "Four."
    added = [e for e in events if e.type == "response.output_item.added"]
    assert [e.output_index for e in added] == [0, 1]


def test_a_function_call_streams(served: ServerThread, monkeypatch: pytest.MonkeyPatch) -> None:
    script(served, monkeypatch, "qwen3", CALLS["qwen3"])
    with client(served).responses.create(model="qwen3", input=ASK, tools=[TOOL],  # type: ignore[list-item]
                                         stream=True) as stream:
        events = list(stream)
    done = [e for e in events if e.type == "response.function_call_arguments.done"]
    assert len(done) == 1 and json.loads(done[0].arguments) == {"city": "Paris"}
    items = [e.item for e in events if e.type == "response.output_item.done"]  # type: ignore[union-attr]
    assert items[-1].type == "function_call" and items[-1].name == "get_weather"


def test_structured_output_and_a_cut_answer(served: ServerThread) -> None:
    api = client(served)
    resp = api.responses.create(model=None, input="Answer as JSON",  # type: ignore[arg-type]
                                max_output_tokens=60, text={"format": {
                                    "type": "json_schema", "name": "out", "schema": SCHEMA}})
    jsonschema.validate(json.loads(resp.output_text), SCHEMA)
    cut = api.responses.create(model=None, input="Tell me a story", max_output_tokens=2)  # type: ignore[arg-type]
    assert cut.status == "incomplete"
    assert cut.incomplete_details is not None
    assert cut.incomplete_details.reason == "max_output_tokens"


@pytest.mark.parametrize(("body", "param", "message"), [
    ({"input": [{"type": "web_search_call"}]}, "input", "takes message, reasoning"),
    ({"input": "x", "tools": [{"type": "web_search"}]}, "tools", "function tools only"),
    ({"input": "x", "previous_response_id": "resp_1"}, "previous_response_id",
     "--responses-store"),
    ({}, "input", "'input' is required"),
    ({"input": [{"type": "function_call", "name": "f"}]}, "input", "without a name, call_id"),
    ({"input": "x", "max_output_tokens": 0}, "max_output_tokens", "max_tokens"),
    ({"input": [{"role": "user", "content": [{"type": "input_audio"}]}]}, "input",
     "not an input_text"),
])
def test_malformed_requests_are_openai_shaped_400s(served: ServerThread, body: dict[str, Any],
                                                   param: str, message: str) -> None:
    answer = httpx.post(served.url + "/v1/responses", json=body, timeout=30)
    assert answer.status_code == 400, answer.text
    error = answer.json()["error"]
    assert error["param"] == param and message in error["message"]
    if body:  # the official client sends the same, and raises its BadRequestError
        with pytest.raises(openai.BadRequestError):
            client(served).responses.create(**{"model": "qwen3", **body})


def test_previous_response_id_with_a_bounded_store(
        served: ServerThread, monkeypatch: pytest.MonkeyPatch) -> None:
    from openweight.server import create_app

    with ServerThread(create_app("qwen3", responses_store=2)) as server, \
            openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0) as api:
        script(server, monkeypatch, "qwen3", CALLS["qwen3"])
        first = api.responses.create(model="qwen3", input=ASK, tools=[TOOL])  # type: ignore[list-item]
        assert first.store is True
        call = first.output[-1]
        prompts = script(server, monkeypatch, "qwen3", ANSWERS["qwen3"])
        second = api.responses.create(
            model="qwen3", previous_response_id=first.id, tools=[TOOL],  # type: ignore[list-item]
            input=[{"type": "function_call_output", "call_id": call.call_id,  # type: ignore[union-attr]
                    "output": "18C and sunny"}])
        assert second.output_text.strip() == "It is 18C."
        assert ASK in prompts[-1] and "18C and sunny" in prompts[-1]
        for _ in range(2):  # two more responses evict the first (the store keeps 2)
            api.responses.create(model="qwen3", input="hi", max_output_tokens=1)
        with pytest.raises(openai.BadRequestError, match="evicted"):
            api.responses.create(model="qwen3", previous_response_id=first.id, input="again")
        unstored = api.responses.create(model="qwen3", input="hi", max_output_tokens=1,
                                        store=False)
        assert unstored.store is False


# -- the SDK's remote backend, speaking the Responses API ----------------------------------

def test_the_sdk_speaks_responses_to_a_server(served: ServerThread,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    import openweight

    remote = openweight.Client(base_url=served.url + "/v1", model="gptoss", api="responses")
    script(served, monkeypatch, "gptoss", CALLS["gptoss"])
    ask = [{"role": "user", "content": ASK}]
    first = remote.chat(ask, tools=[WEATHER])
    assert first.finish_reason == "tool_calls" and first.reasoning == "Need weather."
    [call] = first.tool_calls
    assert call.name == "get_weather" and dict(call.arguments) == {"city": "Paris"}
    prompts = script(served, monkeypatch, "gptoss", ANSWERS["gptoss"])
    follow = [*ask, {"role": "assistant", "content": "", "reasoning": first.reasoning,
                     "tool_calls": [{"id": call.id, "type": "function", "function": {
                         "name": call.name, "arguments": json.dumps(dict(call.arguments))}}]},
              {"role": "tool", "tool_call_id": call.id, "content": "18C and sunny"}]
    chunks = list(remote.stream(follow, tools=[WEATHER]))
    assert "".join(c.text for c in chunks) == "It is 18C."
    assert chunks[-1].finish_reason == "stop" and chunks[-1].usage is not None
    assert SHOWN["gptoss"][1] in prompts[-1]
    with pytest.raises(openweight.InvalidRequestError, match="seed has no field"):
        remote.chat(ask, seed=3)
    with pytest.raises(openweight.InvalidRequestError, match="api='soap'"):
        openweight.Client(base_url=served.url + "/v1", api="soap")


# trimmed from what another Responses server (OpenAI's shape) sent: a reasoning summary,
# a message, extra fields this client does not know
RECORDED = {"id": "resp_67", "object": "response", "created_at": 1, "status": "completed",
            "model": "gpt-oss-20b", "output": [
                {"type": "reasoning", "id": "rs_1", "summary": [
                    {"type": "summary_text", "text": "User greets."}], "encrypted_content": None},
                {"type": "message", "id": "msg_1", "role": "assistant", "status": "completed",
                 "content": [{"type": "output_text", "text": "Hello!", "annotations": []}]}],
            "usage": {"input_tokens": 12, "output_tokens": 9, "total_tokens": 21,
                      "output_tokens_details": {"reasoning_tokens": 4}},
            "service_tier": "default", "truncation": "disabled"}
RECORDED_STREAM = [
    {"type": "response.created", "sequence_number": 0, "response": {"status": "in_progress"}},
    {"type": "response.reasoning_summary_text.delta", "sequence_number": 1, "delta": "Hm."},
    {"type": "response.output_text.delta", "sequence_number": 2, "delta": "Hel"},
    {"type": "response.output_text.delta", "sequence_number": 3, "delta": "lo!"},
    {"type": "response.output_item.done", "sequence_number": 4, "item": {
        "type": "function_call", "call_id": "call_9", "name": "f", "arguments": "{\"x\": 1}"}},
    {"type": "response.completed", "sequence_number": 5, "response": {
        "status": "completed", "usage": {"input_tokens": 5, "output_tokens": 3}}},
]


def test_recorded_answers_of_another_responses_server_replay() -> None:
    from openweight import GenerationOptions, Message
    from openweight.remote import RemoteBackend

    def handler(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        assert request.url.path == "/v1/responses" and body["store"] is False
        if body["stream"]:
            text = "".join(f"event: {e['type']}\ndata: {json.dumps(e)}\n\n"
                           for e in RECORDED_STREAM)
            return httpx.Response(200, text=text, headers={"content-type": "text/event-stream"})
        return httpx.Response(200, json=RECORDED)

    backend = RemoteBackend("http://gpu-box:8000/v1", model="gpt-oss-20b", api="responses",
                            transport=httpx.MockTransport(handler))
    hi = [Message(role="user", content="Hi")]
    whole = backend.chat(hi, GenerationOptions())
    assert (whole.text, whole.reasoning, whole.usage.completion_tokens) == ("Hello!",
                                                                           "User greets.", 9)
    chunks = list(backend.stream(hi, GenerationOptions()))
    assert "".join(c.text for c in chunks) == "Hello!"
    assert "".join(c.reasoning for c in chunks) == "Hm."
    last = chunks[-1]
    assert last.finish_reason == "tool_calls" and last.tool_calls[0].arguments == {"x": 1}
    assert last.usage is not None and last.usage.prompt_tokens == 5


def test_an_error_after_the_stream_started_is_an_error_event(
        served: ServerThread, monkeypatch: pytest.MonkeyPatch) -> None:
    lm = served.app.state.pool.get("qwen3").loaded

    def broken(**kwargs: Any) -> None:
        raise RuntimeError("the model fell over")

    monkeypatch.setattr(lm.model, "generate", broken)
    events: list[dict[str, Any]] = []
    with httpx.stream("POST", served.url + "/v1/responses", timeout=30,
                      json={"model": "qwen3", "input": "hi", "stream": True}) as answer:
        assert answer.status_code == 200
        for line in answer.iter_lines():
            if line.startswith("data: "):
                events.append(json.loads(line[len("data: "):]))
    assert [e["type"] for e in events][:2] == ["response.created", "response.in_progress"]
    assert events[-1]["type"] == "error" and "fell over" in events[-1]["message"]
