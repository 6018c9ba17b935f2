"""Images in messages: what one is (``ImagePart``), how a caller gives one (bytes, a path,
a data URL or an http(s) URL: ``image``), and the limits that keep a bad one harmless:
the accepted formats (checked by their first bytes, not by a name), a size cap, a count
cap per request, and a pixel cap checked from the header before any pixel is decoded (a
decompression bomb is refused, never expanded).

Pillow and httpx are imported only to decode and to fetch.
"""

from __future__ import annotations

import base64
import binascii
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import InvalidRequestError

__all__ = [
    "ACCEPTED_TYPES",
    "MAX_IMAGES",
    "MAX_IMAGE_BYTES",
    "MAX_PIXELS",
    "ImagePart",
    "decode_image",
    "fetch_image",
    "image",
    "image_from_url",
]

ACCEPTED_TYPES = ("image/png", "image/jpeg", "image/webp", "image/gif")
MAX_IMAGE_BYTES = 20 * 1024 * 1024
MAX_IMAGES = 8  # per request
MAX_PIXELS = 7680 * 4320  # an 8K frame
FETCH_SECONDS = 15.0


@dataclass(frozen=True)
class ImagePart:
    """An image in a message: its bytes and media type, or (not fetched yet) an http(s)
    URL. Build one with ``openweight.image(source)``."""

    data: bytes = b""
    media_type: str = ""
    url: str | None = None

    def data_url(self) -> str:
        """The image as OpenAI's ``image_url``: a data URL, or the http(s) URL as given."""
        if self.url is not None:
            return self.url
        return f"data:{self.media_type};base64,{base64.b64encode(self.data).decode('ascii')}"

    def __repr__(self) -> str:  # never the bytes
        if self.url is not None:
            return f"ImagePart(url={self.url[:80]!r})"
        return f"ImagePart({self.media_type}, {len(self.data)} bytes)"


def _sniff(data: bytes, where: str) -> str:
    """The media type of an image's bytes, from their magic number."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "image/png"
    if data.startswith(b"\xff\xd8\xff"):
        return "image/jpeg"
    if data.startswith((b"GIF87a", b"GIF89a")):
        return "image/gif"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    raise InvalidRequestError(f"{where} is not an image openweight takes: it is none of "
                              f"{', '.join(ACCEPTED_TYPES)} (checked by its first bytes)",
                              param="messages")


def _too_big(where: str, size: int) -> InvalidRequestError:
    return InvalidRequestError(f"{where} is {size / 1e6:.1f} MB; an image may be at most "
                               f"{MAX_IMAGE_BYTES // (1024 * 1024)} MB: make it smaller",
                               param="messages")


def _checked(data: bytes, where: str) -> ImagePart:
    if not data:
        raise InvalidRequestError(f"{where} is empty", param="messages")
    if len(data) > MAX_IMAGE_BYTES:
        raise _too_big(where, len(data))
    return ImagePart(data=data, media_type=_sniff(data, where))


def image_from_url(url: str, where: str = "the image") -> ImagePart:
    """A ``data:`` URL decoded now; an http(s) URL kept to be fetched where it is used."""
    if url.startswith(("http://", "https://")):
        return ImagePart(url=url)
    if not url.startswith("data:"):
        raise InvalidRequestError(f"{where} has URL {url[:40]!r}: give a data URL "
                                  "(data:image/png;base64,...) or an http(s) URL",
                                  param="messages")
    head, _, payload = url.partition(",")
    if not head.endswith(";base64"):
        raise InvalidRequestError(f"{where} is a data URL without ';base64'", param="messages")
    if len(payload) > MAX_IMAGE_BYTES * 4 // 3 + 4:
        raise _too_big(where, len(payload) * 3 // 4)
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise InvalidRequestError(f"{where} is a data URL whose base64 is broken: {exc}",
                                  param="messages") from exc
    return _checked(data, where)


def image(source: bytes | str | os.PathLike[str]) -> ImagePart:
    """An image for a message: its bytes, a file's path, a data URL or an http(s) URL."""
    if isinstance(source, bytes | bytearray):
        return _checked(bytes(source), "the image")
    if isinstance(source, str) and (source.startswith("data:") or "://" in source):
        return image_from_url(source)
    if not isinstance(source, str | os.PathLike):
        raise InvalidRequestError(f"an image is bytes, a path or a URL, not "
                                  f"{type(source).__name__}", param="messages")
    path = Path(source).expanduser()
    try:
        size = path.stat().st_size
        if size > MAX_IMAGE_BYTES:
            raise _too_big(str(path), size)
        data = path.read_bytes()
    except OSError as exc:
        raise InvalidRequestError(f"cannot read the image {path}: {exc.strerror or exc}",
                                  param="messages") from exc
    return _checked(data, str(path))


def fetch_image(part: ImagePart, where: str = "the image") -> ImagePart:
    """An http(s) image's bytes, fetched within the size and time limits."""
    if part.url is None:
        return part
    import httpx

    try:
        with httpx.stream("GET", part.url, timeout=FETCH_SECONDS, follow_redirects=True) as got:
            got.raise_for_status()
            data = bytearray()
            for block in got.iter_bytes():
                data += block
                if len(data) > MAX_IMAGE_BYTES:
                    break
    except httpx.HTTPError as exc:
        raise InvalidRequestError(f"{where}: fetching {part.url[:80]} failed: {exc}",
                                  param="messages") from exc
    return _checked(bytes(data), f"{where} ({part.url[:80]})")


def decode_image(part: ImagePart, where: str = "the image") -> Any:
    """The image as an RGB Pillow image; its size is checked from the header first."""
    import io

    from PIL import Image, UnidentifiedImageError

    part = fetch_image(part, where)
    try:
        with Image.open(io.BytesIO(part.data)) as img:
            width, height = img.size
            if width * height > MAX_PIXELS:
                raise InvalidRequestError(
                    f"{where} is {width}x{height} pixels; at most {MAX_PIXELS:,} pixels are "
                    "taken (an 8K frame): scale it down", param="messages")
            img.load()
            return img.convert("RGB")
    except InvalidRequestError:
        raise
    except Image.DecompressionBombError as exc:  # Pillow's own guard, from the header too
        raise InvalidRequestError(f"{where} has far more pixels than the {MAX_PIXELS:,} "
                                  f"taken ({exc}); scale it down", param="messages") from exc
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise InvalidRequestError(f"{where} cannot be decoded ({exc}); the file may be "
                                  "truncated or not the format it claims", param="messages"
                                  ) from exc
