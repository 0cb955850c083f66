"""CSV and JSON outputs: per-patch table (WSInfer's columns), per-run summary, JSON documents.

All writes are atomic (:mod:`wsi_toolkit.atomic`).
"""

from __future__ import annotations

import csv
import io
import math
import os
from collections.abc import Mapping
from typing import Any

import numpy as np

from wsi_toolkit.atomic import to_jsonable, write_json_atomic, write_text_atomic
from wsi_toolkit.errors import ConfigError
from wsi_toolkit.tiling import PatchGrid

__all__ = ["SUMMARY_COLUMNS", "csv_text", "csv_untext", "write_tiles_csv", "write_summary_csv", "write_json_atomic",
           "to_jsonable"]

#: Columns of ``summary.csv``, in order; extra keys of the rows follow them.
SUMMARY_COLUMNS: tuple[str, ...] = ("slide", "status", "error", "slide_score", "tumor_area_mm2", "n_patches", "seconds")


#: First characters that make a spreadsheet (Excel, LibreOffice, Google Sheets) read a cell as a
#: formula or command (OWASP "CSV injection").
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")
#: ... and a leading quote itself, so that the guard's quote is told from one the value had.
_GUARDED_START = (*_FORMULA_START, "'")


def csv_text(value: str) -> str:
    """A user-controlled string (slide name, error message, class name) as a safe CSV text cell.

    A cell starting with ``= + - @``, tab or carriage return is opened by spreadsheets as a
    formula; such a value gets a leading single quote (OWASP's CSV-injection advice), which
    spreadsheets show as text; so does a value starting with a quote, so that :func:`csv_untext`
    gives every value back exactly. Other strings are returned unchanged. Every CSV the toolkit writes
    guards its text cells with it (``summary.csv``, ``tiles.csv``'s header, ``wsi-eval``'s
    ``slides.csv``); readers undo it with :func:`csv_untext`.
    """
    return "'" + value if value.startswith(_GUARDED_START) else value


def csv_untext(value: str) -> str:
    """Undo :func:`csv_text`: a cell read back from a CSV it wrote (``summary.csv``, ``slides.csv``) as
    the original string; ``csv_untext(csv_text(s)) == s`` for every ``s``."""
    return value[1:] if value.startswith("'") and value[1:].startswith(_GUARDED_START) else value


def write_tiles_csv(path: str | os.PathLike[str], grid: PatchGrid, probs_by_class: Mapping[str, np.ndarray], *,
                    extra_columns: Mapping[str, np.ndarray] | None = None) -> None:
    """Write one row per patch, in grid order, with WSInfer's columns.

    Columns: ``minx, miny, width, height`` -- the patch's top-left and size in level-0 px,
    rounded to integers (``np.rint``, half to even; patches at the slide border may start at
    a negative position) -- then ``prob_<class>`` for each class in the mapping's order, with 6
    decimals; then ``extra_columns`` by their own names (e.g. ``tta_std_tumor``), 6 decimals.

    Parameters
    ----------
    path : str or os.PathLike
    grid : PatchGrid
    probs_by_class : mapping of str to array-like, float, (len(grid),)
        e.g. ``{"notumor": p0, "tumor": p1}``; values finite.
    extra_columns : mapping of str to array-like, float, (len(grid),), optional
        More per-patch columns, e.g. ``{"tta_std_tumor": std}``; values finite.
    """
    if not probs_by_class:
        raise ConfigError("probs_by_class is empty; pass at least one class, e.g. {'tumor': probs}")
    columns = []
    names = [f"prob_{name}" for name in probs_by_class] + list(extra_columns or {})
    for name, values in [*probs_by_class.items(), *(extra_columns or {}).items()]:
        if not isinstance(name, str) or not name:
            raise ConfigError(f"class names must be non-empty strings; got {name!r}")
        arr = np.asarray(values, dtype=np.float64)
        if arr.shape != (len(grid),):
            raise ConfigError(
                f"probs_by_class[{name!r}] must have shape ({len(grid)},), one value per patch; got {arr.shape}"
            )
        if arr.size and not np.all(np.isfinite(arr)):
            raise ConfigError(f"probs_by_class[{name!r}] has non-finite values")
        columns.append(arr)
    xy = np.rint(grid.patch_l0_xy()).astype(np.int64)
    side = int(np.rint(grid.patch_l0))
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["minx", "miny", "width", "height", *(csv_text(name) for name in names)])
    probs = np.column_stack(columns) if columns else np.zeros((len(grid), 0))
    for (x, y), row in zip(xy.tolist(), probs.tolist()):
        writer.writerow([x, y, side, side, *(f"{v:.6f}" for v in row)])
    write_text_atomic(path, buf.getvalue())


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, (bool, np.bool_)):
        return "true" if value else "false"
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        return "" if not math.isfinite(value) else f"{float(value):.6g}"
    return csv_text(str(value))


def write_summary_csv(path: str | os.PathLike[str], rows: list[Mapping[str, Any]]) -> None:
    """Write ``summary.csv``: one row per slide, columns :data:`SUMMARY_COLUMNS`.

    Missing keys, ``None`` and NaN are written empty; floats with 6 significant digits. Keys
    beyond the standard columns are appended as extra columns (first-seen order), not dropped.
    Text cells (and column names) that a spreadsheet would run as a formula get a leading single
    quote (:func:`csv_text`).
    """
    columns = list(SUMMARY_COLUMNS)
    for row in rows:
        columns.extend(k for k in row if k not in columns)
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow([csv_text(str(c)) for c in columns])
    for row in rows:
        writer.writerow([_cell(row.get(col)) for col in columns])
    write_text_atomic(path, buf.getvalue())
