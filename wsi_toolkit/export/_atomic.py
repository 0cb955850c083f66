"""Atomic file writes: a temporary name in the same folder, renamed over the target on success.

A reader (or a crashed run) never sees a half-written output under its final name: either the
old file (or nothing) or the complete new one. The temporary file lives in the target's folder
(same filesystem, so ``os.replace`` is atomic) and is named ``.<name>.partial-<pid>``.
Two threads of one process must not write the same target at the same time (same temp name).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

__all__ = ["atomic_path", "write_text_atomic", "partial_path"]


def partial_path(final: str | os.PathLike[str]) -> Path:
    """The temporary path used while ``final`` is being written: ``.<name>.partial-<pid>``."""
    final = Path(final)
    return final.with_name(f".{final.name}.partial-{os.getpid()}")


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
