"""The model's ``-o`` options: every SDK option with its bounds, and the plugin's own
(device, dtype, quantize, remote, keep_alive), checked where the SDK checks them."""

from __future__ import annotations

import functools
from typing import Any
from urllib.parse import urlsplit

import llm
from pydantic import Field, ValidationInfo, create_model, field_validator

from openweight.options import OPTION_SPECS, GenerationOptions
from openweight.settings import (
    DEVICES,
    DTYPES,
    QUANTIZE,
    check_device,
    check_dtype,
    check_quantize,
    keep_alive_seconds,
)

__all__ = ["CLIENT_ONLY", "LazyOptions", "check_remote_option", "check_url", "options_class"]


# -- options -------------------------------------------------------------------------------
# Built on first use, not at import: `llm models` and every other model's prompt run
# register_models, and none of them needs this pydantic class.


def _spec_field(name: str) -> tuple[Any, Any]:
    """A pydantic field for one of the SDK's options, with its bounds and help text."""
    spec = OPTION_SPECS[name]
    if spec.kind is bool:
        return bool | None, Field(None, description=f"{spec.description} (true or false)")
    description = f"{spec.description} ({spec.bounds_text()})"
    if spec.choices:
        return str | None, Field(None, description=description)
    kind: Any = int | None if spec.kind is int else float | None
    return kind, Field(None, ge=spec.ge, gt=spec.gt, le=spec.le,
                       allow_inf_nan=None if spec.kind is int else False,
                       description=description)


def check_url(value: str) -> str:
    value = value.strip()
    if not value.startswith(("http://", "https://")) or len(value) <= len("https://"):
        raise ValueError(f"{value!r} is not a base URL; give one like http://HOST:8000/v1")
    return value.rstrip("/")


def check_remote_option(value: str) -> str:
    """``-o remote``: a base URL without a user name or password, because llm saves the
    options of every prompt in its logs database (and `llm logs` shows them)."""
    value = check_url(value)
    if "@" in urlsplit(value).netloc:
        raise ValueError(
            "-o remote must not hold a user name or password: llm saves options in its "
            "logs database. Give the server's API key with `llm keys set openweight`, --key "
            "or OPENWEIGHT_API_KEY; or, for a server behind a password, set the URL with it "
            "in OPENWEIGHT_BASE_URL or `llm openweight remote URL`")
    return value


@functools.cache
def options_class() -> type[llm.Options]:
    """The model's ``Options``: every SDK option (bounds from OPTION_SPECS) plus our own."""
    class Checks(llm.Options):
        @field_validator("*", check_fields=False)
        @classmethod
        def _sdk_checks(cls, value: Any, info: ValidationInfo) -> Any:
            """Choices and stop strings: the SDK's own check (a ValueError), normalised."""
            name = info.field_name or ""
            spec = OPTION_SPECS.get(name)
            if value is not None and (name == "stop" or (spec and spec.choices)):
                checked = GenerationOptions.from_kwargs({name: value})
                if spec is not None:
                    value = getattr(checked, spec.name)
            return value

        @field_validator("device", "dtype", "quantize", check_fields=False)
        @classmethod
        def _local(cls, value: str | None, info: ValidationInfo) -> str | None:
            check = {"device": check_device, "dtype": check_dtype, "quantize": check_quantize}
            return check[info.field_name or ""](value)  # an InvalidRequestError: a ValueError

        @field_validator("remote", check_fields=False)
        @classmethod
        def _remote(cls, value: str | None) -> str | None:
            return check_remote_option(value) if value is not None else None

        @field_validator("keep_alive", check_fields=False)
        @classmethod
        def _keep_alive(cls, value: str | float | None) -> str | float | None:
            if value is not None:
                keep_alive_seconds(value)  # an InvalidRequestError: a ValueError
            return value

    options: type[llm.Options] = create_model(  # type: ignore[call-overload]
        "OpenWeightOptions",
        __base__=Checks,
        **{name: _spec_field(name) for name in OPTION_SPECS},
        stop=(str | list[str] | None, Field(
            None, description="Stop when the output contains this string (or any of a list)")),
        device=(str | None, Field(
            None, description=f"Where to run a local model: {', '.join(DEVICES)} or cuda:N")),
        dtype=(str | None, Field(
            None, description=f"Weight dtype of a local model: {', '.join(DTYPES)}")),
        quantize=(str | None, Field(
            None, description="Weight-only quantisation of a local model on the CPU: "
            f"{', '.join(QUANTIZE)} (default auto: int4 for 4-bit GGUF sources, else int8 "
            "on a CPU, none on a GPU)")),
        remote=(str | None, Field(
            None, description="Base URL of an OpenAI-compatible server to use instead of this "
            "machine, e.g. http://HOST:8000/v1 (default: `llm openweight remote`)")),
        keep_alive=(str | float | None, Field(
            None, description="Keep a local model loaded in a background server for this long "
            "after the call, for the next calls: seconds or a duration (300, 5m, 1h30m); 0: off, "
            "load it in this process; -1: until `llm openweight stop` (default: "
            "OPENWEIGHT_KEEP_ALIVE, else 5m)")),
    )
    return options


class LazyOptions:
    """``Model.Options`` as llm reads it (on the class or an instance), built on first use."""

    def __get__(self, obj: object, owner: type | None = None) -> type[llm.Options]:
        return options_class()


CLIENT_ONLY = ("device", "dtype", "quantize", "remote", "keep_alive")
