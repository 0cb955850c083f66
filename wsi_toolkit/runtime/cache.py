"""The converted-model cache: one folder per (package, graph, settings), published atomically.

An entry is a folder ``<root>/openvino/<name>/`` holding ``model.xml``, ``model.bin`` and
``entry.json`` (the key it was built for and the sha256 of both files). The folder is built under a
temporary name (``.<name>.partial-<pid>``) and renamed into place when complete, under a file lock
(``.<name>.lock``) so that two processes asking for the same entry convert it once: the second waits
and then reads what the first wrote. An entry whose ``entry.json`` does not match the key asked for,
or whose files do not match their recorded sha256 (a damaged or hand-edited cache), is rebuilt.

The root is ``cache_dir`` when given (``--cache-dir``), else ``$WSI_TOOLKIT_CACHE``, else
``$XDG_CACHE_HOME/wsi-toolkit`` (``~/.cache/wsi-toolkit``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from wsi_toolkit.atomic import file_sha256, partial_path, write_json_atomic

__all__ = ["CACHE_ENV", "CACHE_LAYOUT", "CacheKey", "default_cache_dir", "entry_dir", "lookup", "get_or_build"]

log = logging.getLogger(__name__)

#: Environment variable naming the cache root (``--cache-dir`` wins over it).
CACHE_ENV = "WSI_TOOLKIT_CACHE"
#: Version of the entry layout; a new layout never reads an old one (it is rebuilt).
CACHE_LAYOUT = 2
ENTRY_JSON = "entry.json"
MODEL_XML = "model.xml"
MODEL_BIN = "model.bin"
#: How long a process waits for another one converting the same entry before giving up, seconds.
LOCK_TIMEOUT_S = 3600.0


def default_cache_dir() -> Path:
    """``$WSI_TOOLKIT_CACHE``, else ``$XDG_CACHE_HOME/wsi-toolkit``, else ``~/.cache/wsi-toolkit``."""
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "wsi-toolkit"


@dataclass(frozen=True)
class CacheKey:
    """Everything a converted graph depends on. ``graph`` is ``"fp32"`` (also compiled for bf16,
    which is a compile-time hint) or ``"int8"``; ``calibration`` is the calibration set's
    fingerprint and ``quantization`` NNCF's settings (int8 only). Whether the graph came from the
    package's ``model.pt2`` or its TorchScript is not part of the key: both are the model that
    ``package_sha256`` names (``model.pt2`` is bound to it), and ``entry.json`` records which."""

    package_sha256: str
    graph: str
    input_size: int
    openvino: str
    nncf: str | None = None
    calibration: str | None = None
    quantization: Mapping[str, Any] = field(default_factory=dict)
    layout: int = CACHE_LAYOUT

    def to_dict(self) -> dict[str, Any]:
        """JSON types only (as read back from ``entry.json``: tuples become lists)."""
        return json.loads(json.dumps({**asdict(self), "quantization": dict(self.quantization)}))

    def digest(self) -> str:
        text = json.dumps(self.to_dict(), sort_keys=True, ensure_ascii=True)
        return hashlib.sha256(text.encode("ascii")).hexdigest()

    def name(self) -> str:
        """The entry's folder name: readable prefix, then the key's digest."""
        return f"{self.package_sha256[:12]}-{self.graph}-{self.input_size}px-{self.digest()[:16]}"


def entry_dir(root: str | os.PathLike, key: CacheKey) -> Path:
    return Path(root) / "openvino" / key.name()


def _problem(folder: Path, key: CacheKey) -> str | None:
    """Why ``folder`` is not a usable entry for ``key`` (None: it is)."""
    try:
        meta = json.loads((folder / ENTRY_JSON).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return f"no {ENTRY_JSON}"
    except (OSError, ValueError) as e:
        return f"{ENTRY_JSON} unreadable ({type(e).__name__})"
    if not isinstance(meta, dict) or meta.get("key") != key.to_dict():
        return f"{ENTRY_JSON} was written for other settings"
    files = meta.get("files")
    if not isinstance(files, dict):
        return f"{ENTRY_JSON} lists no files"
    for name in (MODEL_XML, MODEL_BIN):
        want = files.get(name)
        path = folder / name
        if not isinstance(want, dict) or not path.is_file():
            return f"{name} missing"
        if path.stat().st_size != want.get("bytes") or file_sha256(path) != want.get("sha256"):
            return f"{name} does not match its recorded sha256"
    return None


def lookup(root: str | os.PathLike, key: CacheKey) -> tuple[Path, dict] | None:
    """The entry for ``key`` and its ``entry.json``, or None when absent or unusable."""
    folder = entry_dir(root, key)
    if not folder.is_dir():
        return None
    problem = _problem(folder, key)
    if problem is not None:
        log.warning("OpenVINO cache entry %s is unusable (%s); it will be rebuilt", folder, problem)
        return None
    return folder, json.loads((folder / ENTRY_JSON).read_text(encoding="utf-8"))


def _remove(path: Path) -> None:
    """Rename ``path`` aside, then delete it (a reader never sees a half-deleted entry)."""
    aside = path.with_name(f".{path.name}.stale-{os.getpid()}")
    try:
        os.rename(path, aside)
    except FileNotFoundError:
        return
    shutil.rmtree(aside, ignore_errors=True)


def get_or_build(root: str | os.PathLike, key: CacheKey, build: Callable[[Path], Mapping[str, Any]]
                 ) -> tuple[Path, dict, bool]:
    """The entry for ``key``, built by ``build(folder)`` when absent or unusable.

    ``build`` writes ``model.xml`` and ``model.bin`` into the (temporary) folder it is given and
    returns facts to record in ``entry.json`` (under ``"info"``). Returns ``(folder, entry, built)``.
    Concurrent callers (threads or processes) for one key build it once: the others wait on the
    lock and read the published entry. Exceptions from ``build`` propagate; nothing is published.
    """
    from filelock import FileLock

    found = lookup(root, key)
    if found is not None:
        return (*found, False)
    final = entry_dir(root, key)
    final.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(final.with_name(f".{final.name}.lock")), timeout=LOCK_TIMEOUT_S)
    with lock:
        found = lookup(root, key)  # another process may have built it while we waited
        if found is not None:
            return (*found, False)
        # Holding the lock, we are the only builder of this entry: any partial folder is stale.
        for stale in final.parent.glob(f".{final.name}.partial-*"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp = partial_path(final)
        tmp.mkdir()
        try:
            info = dict(build(tmp))
            files = {}
            for name in (MODEL_XML, MODEL_BIN):
                path = tmp / name
                if not path.is_file():
                    raise FileNotFoundError(f"the converter did not write {name}")
                files[name] = {"bytes": path.stat().st_size, "sha256": file_sha256(path)}
            entry = {"key": key.to_dict(), "files": files, "info": info}
            write_json_atomic(tmp / ENTRY_JSON, entry)
            if final.exists():
                _remove(final)
            os.rename(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    log.info("OpenVINO cache entry written: %s", final)
    return final, json.loads((final / ENTRY_JSON).read_text(encoding="utf-8")), True
