"""The model store: installed models, the catalog, pulling and removing.

Nothing here imports torch or transformers until a GGUF file is converted.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import InvalidRequestError, ModelLoadError, ModelNotFoundError, OpenWeightError
from ..settings import check_model_name, is_path
from ..types import ModelInfo
from .catalog import CATALOG, DEFAULT_EMBEDDING_MODEL, DEFAULT_MODEL, CatalogEntry
from .kinds import (
    checked_kind,
    default_embedding_model,
    defaults_of,
    embedding_model_names,
    kind_of,
)
from .registry import home, locked, read_registry, update_registry
from .sources import (
    Notify,
    check_gguf,
    convert_gguf,
    dir_size,
    fetch_catalog,
    fetch_hub,
    is_offline,
    new_tmp_dir,
    sha256_file,
)

if TYPE_CHECKING:
    from ..local import LocalEmbedder, LocalEngine

__all__ = [
    "CATALOG",
    "DEFAULT_EMBEDDING_MODEL",
    "DEFAULT_MODEL",
    "default_embedding_model",
    "default_model",
    "embedding_model_names",
    "ensure_model",
    "home",
    "list_models",
    "model_info",
    "open_engine",
    "packed_cache",
    "pull",
    "remove_model",
    "set_default",
]

HUB_ID_RE = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _derive_name(raw: str) -> str:
    name = re.sub(r"[^a-z0-9._-]+", "-", raw.lower()).strip("-.") or "model"
    return name[:64]


def default_model() -> str:
    """The model used when none is named: set by `openweight default`, else smollm2-135m."""
    value = read_registry().get("default")
    return value if isinstance(value, str) else DEFAULT_MODEL


def _record_path(rec: dict[str, Any]) -> Path:
    """Store-owned models are recorded relative to the home, so the store can move."""
    path = Path(rec["path"])
    return path if path.is_absolute() else home() / path


def _record_to_info(name: str, rec: dict[str, Any], defaults: dict[str, str]) -> ModelInfo:
    entry = CATALOG.get(name)
    kind = kind_of(name, rec)
    return ModelInfo(
        name=name,
        installed=True,
        source=rec.get("source"),
        path=str(_record_path(rec)),
        size_bytes=rec.get("size_bytes"),
        family=rec.get("family") or (entry.family if entry else None),
        description=entry.description if entry else None,
        default=name == defaults[kind],
        kind=kind,
    )


def list_models() -> list[ModelInfo]:
    """Installed models first, then catalog models not yet installed."""
    reg = read_registry()
    defaults = defaults_of(reg)
    out = [_record_to_info(n, r, defaults) for n, r in sorted(reg["models"].items())]
    out += [
        ModelInfo(name=e.name, installed=False, source=f"hub:{e.hub_id}",
                  size_bytes=e.approx_bytes, family=e.family, description=e.description,
                  default=e.name == defaults[e.kind], kind=e.kind)
        for e in CATALOG.values()
        if e.name not in reg["models"]
    ]
    return out


def model_info(name: str) -> dict[str, Any]:
    """Everything known about one model: its registry record and catalog entry; for a
    model directory written as a path (``./DIR``), what loading it would take."""
    if is_path(name):
        return _dir_info(Path(name).expanduser())
    check_model_name(name)
    reg = read_registry()
    rec = reg["models"].get(name)
    entry = CATALOG.get(name)
    if rec is None and entry is None:
        raise ModelNotFoundError(_unknown(name))
    kind = kind_of(name, rec)
    info: dict[str, Any] = {"name": name, "installed": rec is not None, "kind": kind,
                            "default": name == defaults_of(reg)[kind]}
    if entry is not None:
        info.update(hub_id=entry.hub_id, family=entry.family, parameters=entry.params,
                    description=entry.description)
    if rec is not None:
        info.update(rec, path=str(_record_path(rec)))
        info["memory_estimate"] = _estimate(_record_path(rec))
    else:
        info["approx_bytes"] = entry.approx_bytes if entry else None
    return info


def _dir_info(path: Path) -> dict[str, Any]:
    if not path.is_dir():
        raise InvalidRequestError(f"{path} is not a model directory; `openweight info` takes "
                                  "a store name or a directory (pull a .gguf file first)")
    path = path.resolve()
    return {"name": path.name, "installed": False, "path": str(path),
            "size_bytes": dir_size(path), "memory_estimate": _estimate(path)}


def _estimate(path: Path) -> dict[str, Any] | str:
    """What loading this model with the auto settings would take, against what is free."""
    from ..local.embed_config import is_embedding_dir

    if is_embedding_dir(path):
        return {"weights_bytes": sum(p.stat().st_size for p in path.rglob("*.safetensors")),
                "note": "an embedding model: its weights load in float32, as stored"}
    from ..local import kernels
    from ..local.memory import estimate_memory
    from ..local.resolve import auto_quantize, resolve_device, resolve_dtype

    device = resolve_device("auto")
    try:
        quantize, why = auto_quantize(device, path)
        estimate = estimate_memory(path, device, resolve_dtype("auto", device),
                                   quantize=quantize).as_dict()
    except Exception as exc:  # a broken config is reported, not fatal for `info`
        if "trust_remote_code" in str(exc):
            return ("unavailable: the model needs Python code shipped in its folder (auto_map "
                    "in config.json), and openweight never runs a model's own code")
        return f"unavailable: {exc}"
    extra = {"kernels": kernels.route()} if device == "cpu" and quantize != "none" else {}
    return {**estimate, "quantize_reason": why, **extra}


def _unknown(name: str) -> str:
    return (f"unknown model {name!r}: it is not installed and not in the catalog. "
            "`openweight models` lists both; `openweight pull ORG/NAME` fetches a hub model, "
            "`openweight pull ./DIR` registers a local directory or .gguf file (a path)")


def ensure_model(name: str | None = None, *, notify: Notify = _stderr) -> tuple[str, Path]:
    """The installed model's name and path, pulling a catalog model on first use."""
    name = check_model_name(name or default_model())
    rec = read_registry()["models"].get(name)
    if rec is not None:
        path = _record_path(rec)
        if not path.is_dir():
            raise ModelLoadError(f"model {name} is registered at {path} but that directory is "
                                 f"gone; run `openweight rm {name}` and pull it again")
        return name, path
    if name not in CATALOG:
        raise ModelNotFoundError(_unknown(name))
    if is_offline():
        raise ModelNotFoundError(f"model {name} is not installed and offline mode is on; run "
                                 f"`openweight pull {name}` with network access")
    notify(f"openweight: {name} is not installed yet; pulling it (once)...")
    info = pull(name, notify=notify)
    return name, Path(info.path or "")


def _classify(source: str, name: str | None) -> tuple[str, str, CatalogEntry | None]:
    """What kind of source this is (dir, gguf, catalog, hub) and the store name it gets.
    A directory or file is taken only when written as a path (``is_path``), or for a
    GGUF file, when it names an existing ``.gguf`` file (no store name or repo id does)."""
    if is_path(source) or (source.endswith(".gguf") and Path(source).expanduser().is_file()):
        path = Path(source).expanduser()
        if not path.exists():
            raise InvalidRequestError(f"{source} does not exist; give an existing model "
                                      "directory or .gguf file")
        kind = "dir" if path.is_dir() else "gguf"
        if kind == "gguf":
            check_gguf(path)
        return kind, check_model_name(name or _derive_name(
            path.stem if kind == "gguf" else path.name)), None
    if source in CATALOG:
        return "catalog", check_model_name(name or source), CATALOG[source]
    if HUB_ID_RE.match(source) and not source.endswith(".gguf"):
        return "hub", check_model_name(name or _derive_name(source.split("/", 1)[1])), None
    if Path(source).expanduser().exists():
        raise InvalidRequestError(f"{source!r} is not a catalog name or hub repo id; to pull "
                                  f"the file or folder of that name here, write it as a "
                                  f"path: ./{source}")
    if source.endswith(".gguf"):
        raise InvalidRequestError(f"{source} does not exist; give an existing .gguf file, "
                                  "written as a path (./FILE.gguf, /DIR/FILE.gguf)")
    raise ModelNotFoundError(_unknown(source))


def _install(kind: str, source: str, entry: CatalogEntry | None, target: str, work: Path,
             notify: Notify, progress: bool) -> dict[str, Any]:
    """Fetch or convert the model into ``work``, move it into the store; its registry record."""
    path = Path(source).expanduser()
    record: dict[str, Any] = {"origin": source}
    if kind == "dir":
        from ..local.loader import check_model_dir

        check_model_dir(path.resolve())
        record.update(source=f"dir:{path.resolve()}", format="safetensors",
                      in_place=True, path=str(path.resolve()), size_bytes=dir_size(path))
        return record
    built = work / "model"
    if kind == "gguf":
        convert_gguf(path, built, progress=progress)
        record.update(source=f"gguf:{path.resolve()}", format="gguf",
                      sha256=sha256_file(path))
    elif kind == "hub":
        revision = fetch_hub(source, built, progress=progress)
        record.update(source=f"hub:{source}", format="safetensors", revision=revision)
    else:
        assert entry is not None
        record.update(fetch_catalog(entry, work, notify, progress=progress))
        record["family"] = entry.family
    final = home() / "models" / target
    final.parent.mkdir(parents=True, exist_ok=True)
    if final.exists():  # left by a pull killed between rename and registry write
        shutil.rmtree(final)
    os.replace(built, final)
    record.update(path=str(final.relative_to(home())), size_bytes=dir_size(final),
                  in_place=False)
    return record



def pull(source: str, *, name: str | None = None, progress: bool = True,
         notify: Notify = _stderr) -> ModelInfo:
    """Install a model from a catalog name, a hub repo id, a model directory or a .gguf file
    (both written as paths). A pull that fails or is interrupted (disk full, Ctrl-C) leaves
    neither files nor a registry entry, and the next pull starts clean."""
    kind, target, entry = _classify(source, name)
    with locked(f"model-{target}"):
        reg = read_registry()
        existing = reg["models"].get(target)
        if existing is not None:
            if existing.get("origin") == source:  # already pulled (maybe by a racing process)
                return _record_to_info(target, existing, defaults_of(reg))
            raise InvalidRequestError(f"the name {target!r} is already taken by "
                                      f"{existing.get('origin')}; choose another with --name or "
                                      f"`openweight rm {target}` first")
        work = new_tmp_dir()
        try:
            record = _install(kind, source, entry, target, work, notify, progress)
            record["kind"] = checked_kind(_record_path(record))
            record["installed_at"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
            with update_registry() as data:
                data["models"][target] = record
        except BaseException as exc:
            _undo_install(kind, target)
            if isinstance(exc, OSError) and not isinstance(exc, OpenWeightError):
                raise OpenWeightError(_write_failed(target, exc)) from exc
            raise
        finally:
            shutil.rmtree(work, ignore_errors=True)
        return _record_to_info(target, record, defaults_of(read_registry()))


def _undo_install(kind: str, target: str) -> None:
    """After a failed pull: no model directory in the store that the registry lacks."""
    final = home() / "models" / target
    try:
        registered = target in read_registry()["models"]
    except OpenWeightError:
        registered = False
    if kind != "dir" and not registered and final.exists():
        shutil.rmtree(final, ignore_errors=True)


def _write_failed(target: str, exc: OSError) -> str:
    where = home()
    if exc.errno == errno.ENOSPC:
        return (f"pulling {target} failed: no space left on the device holding {where}; "
                "nothing was installed. Free some space, or set OPENWEIGHT_HOME to a store "
                "on a larger disk, and pull again")
    return (f"pulling {target} failed: {exc}; nothing was installed. Check that {where} is "
            "writable and has room, and pull again")


def remove_model(name: str) -> None:
    """Forget a model and delete its files (a directory registered in place is kept)."""
    check_model_name(name)
    with locked(f"model-{name}"):
        with update_registry() as data:
            rec = data["models"].pop(name, None)
            if rec is None:
                raise ModelNotFoundError(f"model {name!r} is not installed; "
                                         "`openweight models` lists what is")
            if data.get("default") == name:
                data["default"] = None
        from ..local.packed_cache import forget_kept

        forget_kept(packed_cache(), _record_path(rec))
        if not rec.get("in_place"):
            shutil.rmtree(_record_path(rec), ignore_errors=True)


def packed_cache() -> Path:
    """Where quantised models' packed forms are kept between loads (see
    ``openweight.local.packed_cache``)."""
    return home() / "packed"


def set_default(name: str) -> None:
    """Make ``name`` (installed or in the catalog) the model used when none is named: the
    default chat model, or for an embedding model, the default embedding model."""
    check_model_name(name)
    rec = read_registry()["models"].get(name)
    if rec is None and name not in CATALOG:
        raise ModelNotFoundError(_unknown(name))
    with update_registry() as data:
        data["default_embedding" if kind_of(name, rec) == "embedding" else "default"] = name


def open_engine(model: str | None = None, *, device: str | None = None,
                dtype: str | None = None, quantize: str | None = None,
                ) -> LocalEngine | LocalEmbedder:
    """The local engine for a store name (pulled first if it is a catalog model; None: the
    default model) or a model directory of the caller's written as a path (``./DIR``,
    ``/DIR``, ``~/DIR``: ``settings.is_path``), used as it is. The weights load on first
    use. An embedding model's directory gets a ``LocalEmbedder``."""
    from ..local import open_local

    if model and is_path(model):
        path = Path(model).expanduser()
        return open_local(path, name=path.name, device=device, dtype=dtype, quantize=quantize)
    name, path = ensure_model(model)  # a store model: its packed form is kept in the store
    return open_local(path, name=name, device=device, dtype=dtype, quantize=quantize,
                      packed_cache=packed_cache())
