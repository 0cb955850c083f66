"""Detections: lesion candidates from a heatmap (local maxima + NMS), and the Camelyon16 detection CSV.

A detection is a row ``(prob, x, y)``, x = column, y = row, in level-0 px. How the defaults were
chosen: ``docs/camelyon16.md`` ("Detections from heatmaps").
"""

from __future__ import annotations

import csv
import io
import math
import os
from pathlib import Path
from typing import Any

import numpy as np

from wsi_toolkit.atomic import write_text_atomic
from wsi_toolkit.errors import ConfigError, DetectionFileError, one_line
from wsi_toolkit.limits import MAX_COORD_L0, check_number

__all__ = ["MAX_DETECTION_CSV_BYTES", "detections_from_heatmap", "read_detections_csv", "write_detections_csv"]

#: Detection CSVs larger than this are refused, not read into memory (~2 million detections).
MAX_DETECTION_CSV_BYTES = 64 * 2**20

def _check_detections(detections: Any, where: str = "detections") -> np.ndarray:
    try:
        det = np.asarray(detections, dtype=np.float64)
    except (TypeError, ValueError):
        raise ConfigError(f"{where} must be an array of (prob, x, y) rows; got {type(detections).__name__}") from None
    if det.size == 0:
        return np.zeros((0, 3), np.float64)
    if det.ndim != 2 or det.shape[1] != 3:
        raise ConfigError(f"{where} must have shape (N, 3) = (prob, x, y); got {det.shape}")
    if not np.all(np.isfinite(det)):
        raise ConfigError(f"{where} has non-finite values (row {int(np.flatnonzero(~np.isfinite(det).all(1))[0])})")
    if det[:, 0].min() < 0:
        raise ConfigError(f"{where}: probabilities must be >= 0; got {det[:, 0].min()!r}")
    return det


def detections_from_heatmap(
    prob: np.ndarray,
    cell_l0: float,
    *,
    l0_mpp: float,
    nms_radius_um: float = 150.0,
    min_prob: float = 0.1,
    origin_l0: tuple[float, float] = (0.0, 0.0),
) -> np.ndarray:
    """Lesion candidates of a heatmap: local maxima after non-maximum suppression.

    Parameters
    ----------
    prob : ndarray, float, (rows, cols)
        Tumour probability per heatmap cell, in [0, 1].
    cell_l0 : float
        Level-0 px per heatmap cell (cell ``[r, c]`` covers level-0
        ``[c*cell_l0, (c+1)*cell_l0) x [r*cell_l0, (r+1)*cell_l0)`` from ``origin_l0``).
    l0_mpp : float
        um per level-0 px (to turn ``nms_radius_um`` into cells).
    nms_radius_um : float
        Suppression radius (um): a detection is the maximum of the disk of this radius around it,
        and no two detections are closer than it (greedy, highest probability first; ties in
        raster order). 0 keeps every cell >= ``min_prob``.
    min_prob : float
        Keep detections with probability >= this, in (0, 1].
    origin_l0 : (float, float)
        Level-0 ``(x, y)`` of the heatmap's top-left corner.

    Returns
    -------
    ndarray, float64, (N, 3)
        Rows ``(prob, x, y)``, x = column, y = row, in level-0 px: the cell centre
        ``origin + (c + 0.5) * cell_l0`` floored to the level-0 pixel that contains it (integer
        valued, so that a CSV of them evaluates the same). Sorted by decreasing probability.

    Example
    -------
    >>> p = np.zeros((4, 6)); p[1, 4] = 0.9
    >>> detections_from_heatmap(p, 128, l0_mpp=0.243).tolist()
    [[0.9, 576.0, 192.0]]
    """
    from scipy import ndimage

    p = np.asarray(prob, dtype=np.float64)
    if p.ndim != 2:
        raise ConfigError(f"prob must be a 2-D heatmap (rows, cols); got shape {p.shape}")
    cell_l0 = check_number(cell_l0, "cell_l0", positive=True)
    l0_mpp = check_number(l0_mpp, "l0_mpp", positive=True)
    nms_radius_um = check_number(nms_radius_um, "nms_radius_um", bounds=(0.0, math.inf), unit="um")
    if not (0 < min_prob <= 1):
        raise ConfigError(f"min_prob must be in (0, 1]; got {min_prob!r} (0 would make every empty cell a detection)")
    if p.size and not np.all(np.isfinite(p)):
        raise ConfigError("prob has non-finite values")
    if p.size == 0:
        return np.zeros((0, 3), np.float64)
    r_cells = float(nms_radius_um) / (float(cell_l0) * float(l0_mpp))
    rad = int(math.floor(r_cells))
    dy, dx = np.mgrid[-rad:rad + 1, -rad:rad + 1]
    footprint = dy.astype(np.float64) ** 2 + dx.astype(np.float64) ** 2 <= r_cells**2
    peak = (p >= min_prob) & (p == ndimage.maximum_filter(p, footprint=footprint, mode="constant", cval=-np.inf))
    rr, cc = np.nonzero(peak)
    order = np.lexsort((cc, rr, -p[rr, cc]))  # probability down, then raster order
    suppressed = np.zeros(p.shape, bool)
    h, w = p.shape
    keep = []
    for i in order:
        r, c = int(rr[i]), int(cc[i])
        if suppressed[r, c]:
            continue
        keep.append(i)
        ra, rb, ca, cb = max(r - rad, 0), min(r + rad + 1, h), max(c - rad, 0), min(c + rad + 1, w)
        suppressed[ra:rb, ca:cb] |= footprint[ra - r + rad:rb - r + rad, ca - c + rad:cb - c + rad]
    keep_idx = np.asarray(keep, dtype=np.int64)
    r_k, c_k = rr[keep_idx], cc[keep_idx]
    x = np.floor(origin_l0[0] + (c_k + 0.5) * float(cell_l0))
    y = np.floor(origin_l0[1] + (r_k + 0.5) * float(cell_l0))
    return np.column_stack([p[r_k, c_k], x, y]).astype(np.float64).reshape(-1, 3)


def write_detections_csv(path: str | os.PathLike[str], detections: np.ndarray) -> None:
    """Write detections in the Camelyon16 submission format, atomically.

    One line per detection, no header: ``prob,x,y`` with the probability written exactly
    (``repr``) and ``x``, ``y`` integer level-0 px (floored).
    """
    det = _check_detections(detections)
    lines = [f"{float(p)!r},{int(math.floor(x))},{int(math.floor(y))}\n" for p, x, y in det.tolist()]
    write_text_atomic(path, "".join(lines))


_PROB_NAMES = ("p", "prob", "probability", "confidence", "score")


def read_detections_csv(path: str | os.PathLike[str]) -> np.ndarray:
    """Read a Camelyon16 detection CSV: ``prob,x,y`` per line (level-0 px, x = column).

    A header is accepted when it names the columns (``p``/``prob``/``probability``/``confidence``,
    ``x``, ``y``, as the data-release evaluator expects); without one the first three columns are
    ``prob, x, y`` (the challenge's submission format). Coordinates are floored to integers (the
    challenge parses them with ``int``). Blank lines are skipped.

    Returns
    -------
    ndarray, float64, (N, 3)

    Raises
    ------
    DetectionFileError
        Missing file, not UTF-8, unparseable number, fewer than three columns, negative probability,
        a coordinate beyond any slide (``|x|, |y| > 2**24``), a file over 64 MiB. The message names
        the file and the line (counted in the file: the header and blank lines included).
    """
    path = Path(path)
    try:
        size = path.stat().st_size
        if size > MAX_DETECTION_CSV_BYTES:
            raise DetectionFileError(
                f"{path}: {size:,} bytes; a detection CSV holds at most a few thousand 'prob,x,y' lines (files up to "
                f"{MAX_DETECTION_CSV_BYTES // 2**20} MiB are read); keep the candidates above a low probability")
        data = path.read_bytes()
    except OSError as exc:
        raise DetectionFileError(f"{path}: cannot read the detection CSV ({exc.strerror or exc})") from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise DetectionFileError(
            f"{path}: line {line} is not UTF-8 text (byte {data[exc.start]:#04x} at offset {exc.start}); a detection "
            "CSV is plain 'prob,x,y' text, save it as UTF-8") from None
    reader = csv.reader(io.StringIO(text, newline=""))
    rows: list[tuple[int, list[str]]] = []  # (line number in the file, cells)
    try:
        for row in reader:
            if row and any(cell.strip() for cell in row):
                rows.append((reader.line_num, row))
    except csv.Error as exc:
        raise DetectionFileError(f"{path}: line {reader.line_num} is not CSV ({one_line(exc)})") from None
    cols = (0, 1, 2)
    if rows:
        head = [cell.strip().casefold() for cell in rows[0][1]]
        try:
            float(head[0])
        except ValueError:
            try:
                i_p = next(i for i, name in enumerate(head) if name in _PROB_NAMES)
                cols = (i_p, head.index("x"), head.index("y"))
            except (StopIteration, ValueError):
                raise DetectionFileError(
                    f"{path}: header {rows[0][1]!r} does not name the columns p (or prob/probability/confidence), "
                    "x and y; write 'prob,x,y' lines without a header or name the columns") from None
            rows = rows[1:]
    out = np.zeros((len(rows), 3), np.float64)
    for n, (line, row) in enumerate(rows):
        try:
            out[n] = [float(row[i]) for i in cols]
        except (IndexError, ValueError):
            raise DetectionFileError(
                f"{path}: line {line} {','.join(row)[:200]!r} is not 'prob,x,y' (numbers, x and y in level-0 px)"
            ) from None
        p, x, y = out[n]
        if not (math.isfinite(p) and math.isfinite(x) and math.isfinite(y)):
            raise DetectionFileError(f"{path}: line {line} {','.join(row)[:200]!r} has a non-finite number")
        if p < 0:
            raise DetectionFileError(f"{path}: line {line}: probabilities must be >= 0; got {p!r}")
        if abs(x) > MAX_COORD_L0 or abs(y) > MAX_COORD_L0:
            raise DetectionFileError(
                f"{path}: line {line}: ({x:g}, {y:g}) is not a level-0 pixel of any slide (|x|, |y| <= "
                f"{MAX_COORD_L0:,.0f}); write x and y in level-0 px of the slide")
    out[:, 1:] = np.floor(out[:, 1:])
    return out
