"""Images in: the image limits, a vision model in the SDK, the plugin (`llm -a`), the
server's image_url parts and the remote backend, on a tiny random Gemma 3 with its real
processor class (see conftest.build_tiny_vision)."""

from __future__ import annotations

import base64
import io
import json
import os
import struct
import subprocess
import sys
import threading
import zlib
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest

import openweight
from openweight import Client, InvalidRequestError, image
from openweight import images as images_mod
from openweight.local import LocalEngine

from conftest import ServerThread
from plugin_helpers import Spy, run

# each family's image token, and how many of them one image becomes in its prompt
FAMILIES = {"gemma3": ("tiny_vision", "<image_soft_token>", 4),
            "smolvlm": ("tiny_smolvlm", "<image>", 4 * 5)}  # 4 tiles and the whole image


def png(width: int = 64, height: int = 48, colour: tuple[int, int, int] = (255, 0, 0)) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (width, height), colour).save(buf, "PNG")
    return buf.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width`` x ``height`` pixels (a decompression bomb's
    shape): the signature and an IHDR chunk, no pixels."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data)))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2,
                                                                0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))


def data_url(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


def ask(picture: object, text: str = "What colour is this?") -> list[dict[str, Any]]:
    return [{"role": "user", "content": [picture, {"type": "text", "text": text}]}]


# -- what an image is, and its limits --------------------------------------------------------

def test_an_image_from_bytes_a_path_a_data_url_or_a_url(tmp_path: Path) -> None:
    data = png()
    path = tmp_path / "red.png"
    path.write_bytes(data)
    assert image(data).media_type == "image/png"
    assert image(path).data == data and image(str(path)).data == data
    assert image(data_url(data)).data == data
    remote = image("https://example.com/cat.jpg")
    assert remote.url == "https://example.com/cat.jpg" and remote.data == b""
    assert image(data).data_url() == data_url(data)
    assert "bytes" in repr(image(data)) and "base64" not in repr(image(data))


@pytest.mark.parametrize(("source", "message"), [
    (b"%PDF-1.7 not an image", "none of image/png, image/jpeg, image/webp, image/gif"),
    (b"", "is empty"),
    ("data:image/png;base64,!!!", "base64 is broken"),
    ("data:image/png,rawbytes", "without ';base64'"),
    ("ftp://host/x.png", "give a data URL"),
    (Path("/nonexistent/x.png"), "cannot read the image"),
    (3, "bytes, a path or a URL"),
])
def test_a_bad_image_is_named(source: object, message: str) -> None:
    with pytest.raises(InvalidRequestError, match=message):
        image(source)  # type: ignore[arg-type]


def test_size_and_pixel_caps(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(images_mod, "MAX_IMAGE_BYTES", 100)
    with pytest.raises(InvalidRequestError, match="an image may be at most"):
        image(png())
    monkeypatch.undo()
    bomb = image(png_header_only(100_000, 100_000))  # 10 gigapixels, never expanded
    with pytest.raises(InvalidRequestError, match="far more pixels than"):
        images_mod.decode_image(bomb)
    large = image(png_header_only(8000, 8000))  # under Pillow's guard, over ours
    with pytest.raises(InvalidRequestError, match="8000x8000 pixels"):
        images_mod.decode_image(large)
    truncated = image(png()[:60])
    with pytest.raises(InvalidRequestError, match="cannot be decoded"):
        images_mod.decode_image(truncated)


def test_message_parts_keep_their_order_and_a_count_cap() -> None:
    from openweight.wire import message_to_json, to_messages

    red = image(png())
    [message] = to_messages([{"role": "user", "content": [
        {"type": "text", "text": "A "}, {"type": "image_url", "image_url": {"url": data_url(
            png())}}, red, {"type": "text", "text": "B"}]}])
    assert message.content == "A B" and len(message.images) == 2
    assert [p["type"] for p in message.content_parts()] == ["text", "image", "image", "text"]
    sent = message_to_json(message)["content"]
    assert [p["type"] for p in sent] == ["text", "image_url", "image_url", "text"]
    assert sent[1]["image_url"]["url"].startswith("data:image/png;base64,")
    with pytest.raises(InvalidRequestError, match="at most 8"):
        to_messages([{"role": "user", "content": [red] * 9}])
    with pytest.raises(InvalidRequestError, match=r"content\[0\] is not a text or image_url"):
        to_messages([{"role": "user", "content": [{"type": "audio"}]}])


# -- a vision model in the SDK ---------------------------------------------------------------

@pytest.fixture(params=sorted(FAMILIES))
def spy(request: pytest.FixtureRequest) -> Iterator[tuple[LocalEngine, list[dict[str, Any]]]]:
    """A tiny vision model's engine (each family), its generate recording its inputs."""
    fixture, token, count = FAMILIES[request.param]
    engine = LocalEngine(request.getfixturevalue(fixture), name="tiny-vision")
    engine.image_token, engine.per_image = token, count  # type: ignore[attr-defined]
    model = engine.loaded.model
    seen: list[dict[str, Any]] = []
    real = type(model).generate

    def generate(**kwargs: Any) -> Any:
        seen.append(kwargs)
        return real(model, **kwargs)

    model.generate = generate
    yield engine, seen
    del model.generate


def image_tokens(engine: Any, call: dict[str, Any]) -> int:
    token = engine.loaded.tokenizer.convert_tokens_to_ids(engine.image_token)
    return int((call["input_ids"] == token).sum())


def test_an_image_reaches_the_model_as_pixels_and_image_tokens(spy: Any) -> None:
    engine, seen = spy
    client = Client(model=str(engine.path), keep_alive=0)
    client._backend = engine  # the engine whose generate is watched
    result = client.chat(ask(image(png())), max_tokens=3, temperature=0)
    assert result.usage.completion_tokens >= 1
    assert tuple(seen[-1]["pixel_values"].shape)[-3:] == (3, 32, 32)
    assert image_tokens(engine, seen[-1]) == engine.per_image
    text_only = client.chat([{"role": "user", "content": "Hi"}], max_tokens=2)
    assert "pixel_values" not in seen[-1] and text_only.usage.prompt_tokens > 0
    blue = client.chat(ask(image(png(colour=(0, 0, 255)))), max_tokens=3, temperature=0)
    assert blue.usage.prompt_tokens == result.usage.prompt_tokens


def test_a_conversation_resends_the_image_of_turn_one(spy: Any) -> None:
    engine, seen = spy
    first = engine.chat(openweight.wire.to_messages(ask(image(png()))),
                        openweight.GenerationOptions(max_tokens=2))
    turn2 = openweight.wire.to_messages([*ask(image(png())),
                                         {"role": "assistant", "content": first.text},
                                         {"role": "user", "content": "And its shape?"}])
    engine.chat(turn2, openweight.GenerationOptions(max_tokens=2))
    assert image_tokens(engine, seen[-1]) == engine.per_image
    assert seen[-1]["pixel_values"].shape[0] == 1


def test_a_text_only_model_refuses_an_image_before_loading(tiny_model: Path) -> None:
    engine = LocalEngine(tiny_model, name="tiny")
    with pytest.raises(InvalidRequestError, match="tiny takes no images"):
        engine.chat(openweight.wire.to_messages(ask(image(png()))),
                    openweight.GenerationOptions(max_tokens=2))
    assert engine._loaded is None


def test_the_store_knows_vision_models(store: Path, tiny_vision: Path,
                                       tiny_smolvlm: Path) -> None:
    openweight.pull(str(tiny_vision), name="tiny-vision", progress=False)
    openweight.pull(str(tiny_smolvlm), name="tiny-smolvlm", progress=False)
    kinds = {m.name: m.kind for m in openweight.list_models()}
    assert kinds["tiny-vision"] == kinds["tiny-smolvlm"] == "vision"
    assert kinds["smolvlm-256m"] == "vision"
    assert kinds["smollm2-135m"] == "chat"


# -- the server and the remote backend -------------------------------------------------------

class _Images(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = png()
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture()
def image_host() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Images)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/red.png"
    server.shutdown()
    server.server_close()


def _chat(url: str, picture_url: str) -> httpx.Response:
    return httpx.post(url + "/v1/chat/completions", timeout=60, json={
        "max_tokens": 2, "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": picture_url}},
            {"type": "text", "text": "What is it?"}]}]})


def test_server_takes_data_urls_and_fetches_urls_only_when_allowed(
        store: Path, tiny_vision: Path, image_host: str) -> None:
    from openweight.server import create_app

    model = str(tiny_vision)
    with ServerThread(create_app(model, preload=False)) as server:
        assert _chat(server.url, data_url(png())).status_code == 200
        refused = _chat(server.url, image_host)
        assert refused.status_code == 400 and "--allow-image-urls" in refused.text
        bad = _chat(server.url, "data:image/png;base64," + base64.b64encode(b"GIF8").decode())
        assert bad.status_code == 400 and "none of image/png" in bad.text
        remote = Client(base_url=server.url + "/v1")
        answer = remote.chat(ask(image(png())), max_tokens=2)
        assert answer.usage.prompt_tokens > 4
    with ServerThread(create_app(model, preload=False, allow_image_urls=True)) as server:
        assert _chat(server.url, image_host).status_code == 200


def test_a_text_only_model_behind_the_server_says_so(env: Path) -> None:
    from openweight.server import create_app

    with ServerThread(create_app("tiny", preload=False)) as server:
        answer = _chat(server.url, data_url(png()))
    assert answer.status_code == 400 and "tiny takes no images" in answer.text


# -- the llm plugin ----------------------------------------------------------------------------

def test_llm_attachments(env: Path, tiny_vision: Path, tmp_path: Path) -> None:
    openweight.pull(str(tiny_vision), name="tiny-vision", progress=False)
    picture = tmp_path / "red.png"
    picture.write_bytes(png())
    refused = run("-m", "openweight/tiny", "-a", str(picture), "what is it?")
    assert refused.exit_code == 1 and "attachments" in refused.output.lower()
    environ = {**os.environ, "OPENWEIGHT_KEEP_ALIVE": "0"}
    done = subprocess.run(
        [sys.executable, "-c", "from llm.cli import cli; cli()", "-m", "openweight/tiny-vision",
         "-a", str(picture), "what is it?", "-o", "max_tokens", "3"],
        env=environ, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    logs = subprocess.run(
        [sys.executable, "-c", "from llm.cli import cli; cli()", "logs", "--json", "-n", "1"],
        env=environ, capture_output=True, text=True, timeout=60)
    [entry] = json.loads(logs.stdout)
    assert entry["attachments"] and entry["attachments"][0]["type"] == "image/png"


def test_llm_resends_the_image_of_turn_one(env: Path, tiny_vision: Path, tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    openweight.pull(str(tiny_vision), name="tiny-vision", progress=False)
    monkeypatch.setenv("OPENWEIGHT_KEEP_ALIVE", "0")
    spy = Spy(monkeypatch)
    picture = tmp_path / "red.png"
    picture.write_bytes(png())
    first = run("-m", "openweight/tiny-vision", "-a", str(picture), "what is it?",
                "-o", "max_tokens", "2")
    assert first.exit_code == 0, first.output
    second = run("-c", "and its shape?", "-o", "max_tokens", "2")
    assert second.exit_code == 0, second.output
    messages = spy.calls[-1][0]
    assert [m["role"] for m in messages] == ["user", "assistant", "user"]
    parts = messages[0]["content"]
    assert isinstance(parts[0], openweight.ImagePart) and parts[0].data == png()
    assert parts[1] == {"type": "text", "text": "what is it?"}


@pytest.mark.slow
def test_llm_attachments_through_a_keep_alive_server(env: Path, tiny_vision: Path,
                                                     tmp_path: Path) -> None:
    """With keep-alive on, the image travels to the background server as a data URL."""
    openweight.pull(str(tiny_vision), name="tiny-vision", progress=False)
    picture = tmp_path / "red.png"
    picture.write_bytes(png())
    environ = {**os.environ, "OPENWEIGHT_KEEP_ALIVE": "1m"}
    llm_cli = [sys.executable, "-c", "from llm.cli import cli; cli()"]
    try:
        for _ in range(2):  # the first starts the server, the second finds it
            done = subprocess.run([*llm_cli, "-m", "openweight/tiny-vision", "-a", str(picture),
                                   "what is it?", "-o", "max_tokens", "2"],
                                  env=environ, capture_output=True, text=True, timeout=300)
            assert done.returncode == 0, done.stderr[-2000:]
        ps = subprocess.run([sys.executable, "-m", "openweight.cli", "ps"], env=environ,
                            capture_output=True, text=True, timeout=60)
        assert "tiny-vision" in ps.stdout
    finally:
        subprocess.run([sys.executable, "-m", "openweight.cli", "stop"], env=environ,
                       capture_output=True, timeout=60)
