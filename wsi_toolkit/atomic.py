"""The one module for atomic file writes: a temporary name in the same folder, renamed over the target on success.

A reader (or a crashed run) never sees a half-written output under its final name: either the
old file (or nothing) or the complete new one. The temporary file lives in the target's folder
(same filesystem, so ``os.replace`` is atomic) and is named ``.<name>.partial-<pid>``.
Two threads of one process must not write the same target at the same time (same temp name).
A process killed with ``kill -9`` cannot delete its temporary file: :func:`clean_stale_partials`
removes those of processes that no longer run.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
from collections.abc import Iterator, Mapping
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["file_sha256", "atomic_path", "write_text_atomic", "write_bytes_atomic", "write_json_atomic", "to_jsonable",
           "partial_path", "clean_stale_partials"]


def partial_path(final: str | os.PathLike[str]) -> Path:
    """The temporary path used while ``final`` is being written: ``.<name>.partial-<pid>``."""
    final = Path(final)
    return final.with_name(f".{final.name}.partial-{os.getpid()}")


# ``.<name>.partial-<pid>``.
_PARTIAL = re.compile(r"^\.(?P<name>.+)\.partial-(?P<pid>[0-9]+)$")


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, but another user's
        return True
    except OSError:  # pragma: no cover - other platforms
        return True
    return True


def clean_stale_partials(folder: str | os.PathLike[str]) -> list[Path]:
    """Delete the temporary files ``.<name>.partial-<pid>`` in ``folder`` left by processes that no
    longer run (e.g. killed with ``kill -9``), and this process's own leftovers.

    Files of live processes are left alone. Returns the deleted paths; a missing folder is
    not an error.
    """
    folder = Path(folder)
    removed: list[Path] = []
    try:
        entries = list(folder.iterdir())
    except (FileNotFoundError, NotADirectoryError):
        return removed
    me = os.getpid()
    for entry in entries:
        m = _PARTIAL.match(entry.name)
        if m is None:
            continue
        pid = int(m.group("pid"))
        if pid != me and _pid_alive(pid):
            continue
        try:
            if entry.is_file() or entry.is_symlink():
                entry.unlink()
                removed.append(entry)
        except FileNotFoundError:  # another process cleaned it first
            pass
    return removed


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(final: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path next to ``final``; rename it to ``final`` when the block succeeds.

    The block must create the file at the yielded path. On any exception (including
    KeyboardInterrupt) the temporary file is deleted, ``final`` is left as it was, and the
    exception propagates. The folder of ``final`` must exist.

    Example
    -------
    >>> with atomic_path(out / "heatmap.tif") as tmp:          # doctest: +SKIP
    ...     tifffile.imwrite(tmp, data)
    """
    final = Path(final)
    if not final.parent.is_dir():
        raise FileNotFoundError(f"{final}: folder {final.parent} does not exist; create it first")
    tmp = partial_path(final)
    tmp.unlink(missing_ok=True)  # a leftover from a killed run of this same process id
    try:
        yield tmp
        if not tmp.is_file():
            raise FileNotFoundError(f"{final}: the writer did not create the temporary file {tmp}")
        _fsync(tmp)
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text_atomic(path: str | os.PathLike[str], text: str) -> None:
    """Write ``text`` as UTF-8 to ``path`` atomically (line endings written as given)."""
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8", newline="") as fh:
            fh.write(text)


def file_sha256(path: str | os.PathLike[str]) -> str:
    """sha256 hex digest of a file, read in 1 MiB blocks (what a finished write is checked by)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_bytes_atomic(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            fh.write(data)


def to_jsonable(obj: Any) -> Any:
    """``obj`` with numpy scalars/arrays, paths, tuples, sets and dataclasses turned into JSON
    types; non-finite floats become ``None`` (JSON has no NaN)."""
    if isinstance(obj, Mapping):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if is_dataclass(obj) and not isinstance(obj, type):
        return to_jsonable(asdict(obj))
    if isinstance(obj, np.ndarray):
        return to_jsonable(obj.tolist())
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, (set, frozenset)):
        return [to_jsonable(v) for v in sorted(obj, key=repr)]
    if isinstance(obj, np.generic):
        return to_jsonable(obj.item())
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if obj is None or isinstance(obj, (str, int, bool)):
        return obj
    raise TypeError(f"cannot write {type(obj).__name__} as JSON: {obj!r}")


def write_json_atomic(path: str | os.PathLike[str], obj: Any) -> None:
    """Write ``obj`` as indented UTF-8 JSON (see :func:`to_jsonable`), atomically."""
    text = json.dumps(to_jsonable(obj), indent=2, ensure_ascii=False, allow_nan=False)
    write_text_atomic(Path(path), text + "\n")
