"""Property-based fuzzing of `openweight serve` (issue #19): valid requests with fields
dropped, retyped, nested deep, made huge or unicode-broken, and arbitrary JSON, posted over
real HTTP to /v1/chat/completions and /v1/completions. No answer is a 5xx, every error is
OpenAI-shaped, and a valid request still works afterwards. A scripted engine answers, so a
few hundred requests take seconds."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from openweight.server import create_app
from openweight.types import Chunk, Usage

from conftest import ServerThread

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}}}}
VALID_CHAT: dict[str, Any] = {
    "model": "scripted",
    "messages": [{"role": "system", "content": "be brief"},
                 {"role": "user", "content": [{"type": "text", "text": "hi"}]},
                 {"role": "assistant", "content": None, "tool_calls": [
                     {"id": "c1", "type": "function",
                      "function": {"name": "get_weather", "arguments": "{\"city\": \"x\"}"}}]},
                 {"role": "tool", "tool_call_id": "c1", "content": "sunny"}],
    "max_tokens": 8, "temperature": 0.5, "top_p": 0.9, "seed": 1, "stop": ["\n\n"],
    "stream": False, "stream_options": {"include_usage": True}, "tools": [TOOL],
    "tool_choice": "auto", "response_format": {"type": "json_object"}, "n": 1,
}
VALID_COMPLETION: dict[str, Any] = {
    "model": "scripted", "prompt": "Once upon", "max_tokens": 8, "temperature": 0,
    "stop": ["."], "stream": False, "seed": 3,
}


class Scripted:
    name = "scripted"

    def _chunks(self) -> Iterator[Chunk]:
        yield Chunk(text="ok")
        yield Chunk(finish_reason="stop", usage=Usage(1, 1))

    def stream(self, messages: Any, options: Any, **_: Any) -> Iterator[Chunk]:
        return self._chunks()

    def complete(self, prompt: str, options: Any, **_: Any) -> Iterator[Chunk]:
        return self._chunks()


@pytest.fixture(scope="module")
def client(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory,
           ) -> Iterator[httpx.Client]:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OPENWEIGHT_HOME", str(tmp_path_factory.mktemp("fuzz-store")))
        mp.setenv("OPENWEIGHT_OFFLINE", "1")
        app = create_app(str(tiny_model), preload=False)
        app.state.pool.engines["scripted"] = app.state.pool.default = Scripted()
        with ServerThread(app) as s, httpx.Client(base_url=s.url, timeout=30) as c:
            yield c


# -- what a field may become -----------------------------------------------------------------

BROKEN_TEXT = st.sampled_from(["\ud800", "a\udfffb", "\x00", "\u202e", "\U0010ffff", "é" * 3])
SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(), st.integers(min_value=10**300),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=20), BROKEN_TEXT)
JSON_VALUES = st.recursive(
    SCALARS, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                     st.dictionaries(st.text(max_size=8), inner, max_size=4)),
    max_leaves=12)


def _nest(value: Any, depth: int) -> Any:
    for i in range(depth):
        value = [value] if i % 2 else {"x": value}
    return value


@st.composite
def mutated(draw: st.DrawFn, valid: dict[str, Any]) -> Any:
    """A valid body with one or more of its fields (top level or inside a message)
    dropped, retyped, nested, made huge or unicode-broken; sometimes any JSON at all."""
    if draw(st.integers(0, 9)) == 0:
        return draw(JSON_VALUES)
    body = json.loads(json.dumps(valid))
    for _ in range(draw(st.integers(1, 3))):
        target = body
        if "messages" in body and isinstance(body["messages"], list) and body["messages"] \
                and draw(st.booleans()):
            target = draw(st.sampled_from(body["messages"]))
            if not isinstance(target, dict):
                continue
        keys = sorted(target) or ["x"]
        key = draw(st.sampled_from([*keys, draw(st.text(max_size=6))]))
        how = draw(st.sampled_from(["drop", "retype", "nest", "huge", "broken"]))
        if how == "drop":
            target.pop(key, None)
        elif how == "retype":
            target[key] = draw(JSON_VALUES)
        elif how == "nest":
            target[key] = _nest(target.get(key), draw(st.sampled_from([2, 40, 65, 500])))
        elif how == "huge":
            target[key] = draw(st.sampled_from(["x" * 200_000, ["x"] * 5000, 10**4000]))
        else:
            target[key] = draw(BROKEN_TEXT)
    return body


def _encode(body: Any) -> bytes:
    try:
        return json.dumps(body).encode()
    except (ValueError, RecursionError):  # 10**4000 has too many digits for json.dumps
        return b'{"max_tokens": ' + b"9" * 5000 + b"}"


def _check(client: httpx.Client, path: str, body: Any) -> None:
    r = client.post(path, content=_encode(body), headers={"Content-Type": "application/json"})
    assert r.status_code < 500, (body if len(r.request.content) < 2000 else "...", r.text)
    if r.status_code >= 400:
        err = r.json()["error"]
        assert {"message", "type", "param", "code"} <= set(err) and err["message"]
    elif r.headers["content-type"].startswith("text/event-stream"):
        assert "data: [DONE]" in r.text, r.text


FUZZ = settings(max_examples=100, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.function_scoped_fixture])


@FUZZ
@given(body=mutated(VALID_CHAT))
def test_fuzz_chat(client: httpx.Client, body: Any) -> None:
    _check(client, CHAT, body)


@FUZZ
@given(body=mutated(VALID_COMPLETION))
def test_fuzz_completions(client: httpx.Client, body: Any) -> None:
    _check(client, COMPLETIONS, body)


def test_valid_requests_work_after_fuzzing(client: httpx.Client) -> None:
    r = client.post(CHAT, json=VALID_CHAT)
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == "ok"
    r = client.post(COMPLETIONS, json=VALID_COMPLETION)
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == "ok"
    r = client.post(CHAT, json={**VALID_CHAT, "stream": True})
    assert r.text.endswith("data: [DONE]\n\n")
