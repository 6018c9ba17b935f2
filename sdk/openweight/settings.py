"""The settings a caller gives for a local model and its keep-alive: their names, their
checks and their spellings, in one place.

The Client, the server, the daemon, the loader and the ``llm`` plugin all check device,
dtype, quantize and keep-alive values here, so a bad value reads the same wherever it was
given; and all of them tell a store name from a model directory with ``is_path``. Nothing
here imports torch: what ``auto`` resolves to on this machine is the loader's business
(``local/loader.py``).
"""

from __future__ import annotations

import math
import os
import re

from .errors import InvalidRequestError

__all__ = [
    "DEFAULT_KEEP_ALIVE",
    "DEVICES",
    "DTYPES",
    "KEEP_ALIVE_ENV",
    "MODEL_NAME_RE",
    "QUANTIZE",
    "check_device",
    "check_dtype",
    "check_model_name",
    "check_quantize",
    "is_path",
    "keep_alive_from_json",
    "keep_alive_seconds",
    "keep_alive_to_json",
]

DEVICES = ("auto", "cpu", "cuda", "mps")
DTYPES = ("auto", "bfloat16", "float16", "float32")
QUANTIZE = ("auto", "none", "int8", "int4")
DEFAULT_KEEP_ALIVE = 300.0
KEEP_ALIVE_ENV = "OPENWEIGHT_KEEP_ALIVE"
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_DURATION = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ms|s|m|h|d)")
_NUMBER = re.compile(r"[+-]?(\d+(\.\d*)?|\.\d+)")


def _choice(name: str, value: str | None, choices: tuple[str, ...], hint: str = "") -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise InvalidRequestError(f"{name} must be a string such as {choices[0]!r}, not "
                                  f"{type(value).__name__}", param=name)
    lowered = value.strip().lower()
    if (lowered.split(":")[0] if name == "device" else lowered) not in choices:
        raise InvalidRequestError(f"{name} {value!r} is not supported; use one of "
                                  f"{', '.join(choices)}{hint}", param=name)
    return lowered


def check_device(device: str | None) -> str | None:
    """``device`` lower-cased (``cuda:N`` names one GPU), or None; a bad one raises."""
    return _choice("device", device, DEVICES, " (cuda:N for one GPU)")


def check_dtype(dtype: str | None) -> str | None:
    return _choice("dtype", dtype, DTYPES)


def check_quantize(quantize: str | None) -> str | None:
    return _choice("quantize", quantize, QUANTIZE)


# -- model names and paths ----------------------------------------------------------------
# Names are names: a store name always means the store, whatever the current directory
# holds. A model directory of the caller's is given as a path, written as one.

MODEL_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
_POSIX_PATH = ("/", "./", "../", "~")
_WINDOWS_PATH = re.compile(r"^([A-Za-z]:[\\/]|\\|\.{1,2}\\|~\\)")
_WINDOWS = os.name == "nt"


def is_path(model: str | None) -> bool:
    """Is ``model`` written as a path (``./x``, ``../x``, ``/x``, ``~/x``, ``.``, ``..``;
    on Windows also ``C:\\x``, ``\\\\host\\x``, ``.\\x``), rather than a store name?

    Only the spelling counts, never what exists: a folder named ``smollm2-135m`` in the
    current directory does not shadow the store's model of that name (``./smollm2-135m``
    names the folder).
    """
    if not isinstance(model, str) or not model:
        return False
    if model in (".", "..") or model.startswith(_POSIX_PATH):
        return True
    return _WINDOWS and _WINDOWS_PATH.match(model) is not None


def check_model_name(name: str) -> str:
    """``name`` if it can be a store name, else the one error every store entry point
    raises (pull, info, rm, default, and opening a model)."""
    if isinstance(name, str) and MODEL_NAME_RE.match(name):
        return name
    raise InvalidRequestError(  # never says what exists here: a server's request reaches it
        f"model name {name!r} is invalid: a store name has lower-case letters, digits, '.', "
        "'_' and '-' (at most 64 characters, starting with a letter or digit); a model "
        "directory is written as a path (./DIR, /DIR or ~/DIR)", param="model")


# -- keep-alive durations -----------------------------------------------------------------

def keep_alive_seconds(value: str | float | None = None) -> float:
    """Seconds a keep-alive server stays loaded after its last request.

    ``value`` is seconds (``300``, ``"300"``) or a duration (``"5m"``, ``"1h30m"``,
    ``"90s"``); ``None`` reads ``OPENWEIGHT_KEEP_ALIVE``, else 300. ``0`` turns keep-alive
    off; a negative value keeps the model loaded until ``openweight stop`` (``math.inf``).
    """
    source = "keep_alive"
    if value is None:
        env = os.environ.get(KEEP_ALIVE_ENV, "").strip()
        if not env:
            return DEFAULT_KEEP_ALIVE
        value, source = env, KEEP_ALIVE_ENV
    seconds = _parse_duration(value)
    if seconds is None:
        raise InvalidRequestError(
            f"{source} {value!r} is not a duration: use seconds (300), a duration such as 5m, "
            "90s or 1h30m, 0 to turn keep-alive off, or -1 to keep the model loaded until "
            "`openweight stop`", param="keep_alive")
    return math.inf if seconds < 0 else seconds


def _parse_duration(value: str | float) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return None if math.isnan(value) else float(value)
    if not isinstance(value, str):
        return None
    text = value.strip().lower().replace(" ", "")
    if _NUMBER.fullmatch(text):
        return float(text)
    sign = -1.0 if text.startswith("-") else 1.0
    text = text.lstrip("+-")
    parts = _DURATION.findall(text)
    if not text or "".join(n + u for n, u in parts) != text:
        return None
    return sign * sum(float(n) * _UNITS[u] for n, u in parts)


def keep_alive_to_json(seconds: float) -> float:
    """``math.inf`` (until stopped) is written as -1 in records and queries."""
    return -1.0 if math.isinf(seconds) else seconds


def keep_alive_from_json(raw: object) -> float:
    """A keep-alive read back from a record or a query (anything else: the default)."""
    if not isinstance(raw, int | float) or isinstance(raw, bool) or math.isnan(raw):
        return DEFAULT_KEEP_ALIVE
    return math.inf if raw < 0 else float(raw)
