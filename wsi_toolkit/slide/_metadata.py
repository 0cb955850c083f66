"""Physical resolution (um/px) from slide metadata, and TIFF integrity checks.

Pure functions over property dictionaries so both backends share one set of rules.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from wsi_toolkit.errors import SlideReadError, one_line

__all__ = ["mpp_from_openslide_properties", "mpp_from_tiff_resolution", "mpp_from_tiff_tags", "largest_series",
           "check_tiff_integrity"]

# TIFF ResolutionUnit values -> micrometres per unit. 1 = none (no physical meaning).
# 4 and 5 are not baseline TIFF but written by some converters (tifffile's RESUNIT enum).
_UM_PER_UNIT = {2: 25_400.0, 3: 10_000.0, 4: 1_000.0, 5: 1.0}
_UNIT_NAMES = {"inch": 2, "centimeter": 3, "centimetre": 3, "millimeter": 4, "millimetre": 4,
               "micrometer": 5, "micrometre": 5}

# Plausible range for a microscope slide scan: 0.05 um/px (beyond 100x) to 100 um/px.
_MPP_RANGE = (0.01, 1000.0)


def _plausible(v: float) -> bool:
    return math.isfinite(v) and _MPP_RANGE[0] <= v <= _MPP_RANGE[1]


def mpp_from_tiff_resolution(
    x_resolution: float | None, y_resolution: float | None, unit: int | str | None
) -> tuple[float, float] | None:
    """(mpp_x, mpp_y) from TIFF XResolution/YResolution (pixels per unit) and ResolutionUnit.

    ``unit`` is the TIFF code (2 inch, 3 cm, 4 mm, 5 um) or its name. Returns None when the unit
    is "none"/missing or the values are not plausible (tifffile writes 1 px/unit by default).
    """
    if unit is None or x_resolution is None:
        return None
    if isinstance(unit, str):
        code = _UNIT_NAMES.get(unit.strip().lower())
        if code is None and unit.strip().isdigit():
            code = int(unit)
    else:
        code = int(unit)
    if code not in _UM_PER_UNIT:
        return None
    y_resolution = x_resolution if y_resolution is None else y_resolution
    try:
        mpp_x = _UM_PER_UNIT[code] / float(x_resolution)
        mpp_y = _UM_PER_UNIT[code] / float(y_resolution)
    except (ZeroDivisionError, ValueError, TypeError):
        return None
    if _plausible(mpp_x) and _plausible(mpp_y):
        return mpp_x, mpp_y
    return None


def _rational(value: Any) -> float | None:
    """A TIFF RATIONAL ``(num, den)`` or a number as a float; None when missing or malformed."""
    try:
        if isinstance(value, tuple):
            num, den = value[:2]
            return num / den if den else None
        return float(value) if value is not None else None
    except (TypeError, ValueError, OverflowError):
        return None


def mpp_from_tiff_tags(page: Any, *, default_unit: int | None = 2) -> tuple[float, float] | None:
    """(mpp_x, mpp_y) from a tifffile page's XResolution/YResolution/ResolutionUnit tags, or None.

    A missing ResolutionUnit is ``default_unit`` (2, inch: the TIFF default; None: no mpp, as the
    slide reader wants); the units and the plausibility rule are those of
    :func:`mpp_from_tiff_resolution`.
    """
    try:
        tags = page.tags
        if "XResolution" not in tags:
            return None
        x_res = _rational(tags["XResolution"].value)
        y_res = _rational(tags["YResolution"].value) if "YResolution" in tags else x_res
        if "ResolutionUnit" in tags:
            unit = int(tags["ResolutionUnit"].value)
        elif default_unit is None:
            return None
        else:
            unit = default_unit
    except (AttributeError, KeyError, TypeError, ValueError):
        return None
    if x_res is None or not x_res > 0 or y_res is None or not y_res > 0:
        return None
    return mpp_from_tiff_resolution(x_res, y_res, unit)


def largest_series(tif: Any) -> Any | None:
    """The series of a :class:`tifffile.TiffFile` with the largest level 0 (the main image: labels
    and macro images are smaller); None when the file holds no series."""
    if not tif.series:
        return None
    return max(tif.series,
               key=lambda s: int(s.levels[0].keyframe.imagewidth) * int(s.levels[0].keyframe.imagelength))


def _float(value: str | None) -> float | None:
    if value is None:
        return None
    try:
        v = float(str(value).strip().replace(",", "."))
    except ValueError:
        return None
    return v if _plausible(v) else None


def mpp_from_openslide_properties(props: Mapping[str, str]) -> tuple[tuple[float, float], str] | None:
    """((mpp_x, mpp_y), source) from OpenSlide-style properties, or None.

    Order: ``openslide.mpp-x/y`` (OpenSlide's vendor-normalised value), Aperio ``aperio.MPP``,
    then the TIFF resolution tags (``tiff.XResolution`` with ``tiff.ResolutionUnit``).
    """
    mx, my = _float(props.get("openslide.mpp-x")), _float(props.get("openslide.mpp-y"))
    if mx is not None:
        return (mx, my if my is not None else mx), "openslide.mpp-x"
    aperio = _float(props.get("aperio.MPP"))
    if aperio is not None:
        return (aperio, aperio), "aperio.MPP"
    unit = props.get("tiff.ResolutionUnit")
    xr, yr = _float_any(props.get("tiff.XResolution")), _float_any(props.get("tiff.YResolution"))
    got = mpp_from_tiff_resolution(xr, yr, unit)
    if got is not None:
        return got, f"tiff.XResolution ({unit})"
    return None


def _float_any(value: str | None) -> float | None:
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


_APERIO_MPP = re.compile(r"\|\s*MPP\s*=\s*([0-9.eE+-]+)")


def mpp_from_aperio_description(description: str) -> float | None:
    """The ``MPP = ...`` field of an Aperio ImageDescription, if any."""
    m = _APERIO_MPP.search(description or "")
    return _float(m.group(1)) if m else None


_TIFF_TYPE_SIZES = {1: 1, 2: 1, 3: 2, 4: 4, 5: 8, 6: 1, 7: 1, 8: 2, 9: 4, 10: 8, 11: 4, 12: 8, 13: 4,
                    16: 8, 17: 8, 18: 8}


def _walk_ifds(fh, size: int) -> str | None:
    """Follow a TIFF's directory chain; return why it is damaged, or None when every directory
    and every out-of-line tag value lies inside the file. Non-TIFF files return None."""
    import struct

    fh.seek(0)
    head = fh.read(16)
    if len(head) < 8 or head[:2] not in (b"II", b"MM"):
        return None
    bo = "<" if head[:2] == b"II" else ">"
    version = struct.unpack(bo + "H", head[2:4])[0]
    if version == 42:
        offset = struct.unpack(bo + "I", head[4:8])[0]
        cnt_fmt, cnt_size, entry_size, off_fmt, off_size = "H", 2, 12, "I", 4
    elif version == 43 and len(head) >= 16:
        offset = struct.unpack(bo + "Q", head[8:16])[0]
        cnt_fmt, cnt_size, entry_size, off_fmt, off_size = "Q", 8, 20, "Q", 8
    else:
        return None
    seen = set()
    i = 0
    while offset:
        if offset in seen:
            return f"image directory {i} loops back to an earlier one"
        seen.add(offset)
        if offset + cnt_size > size:
            return f"image directory {i} starts at byte {offset:,}, past the end"
        fh.seek(offset)
        (n,) = struct.unpack(bo + cnt_fmt, fh.read(cnt_size))
        end = offset + cnt_size + n * entry_size + off_size
        if end > size:
            return f"image directory {i} ends at byte {end:,}, past the end"
        entries = fh.read(n * entry_size)
        for e in range(n):
            ent = entries[e * entry_size : (e + 1) * entry_size]
            typ = struct.unpack(bo + "H", ent[2:4])[0]
            count = struct.unpack(bo + off_fmt, ent[4 : 4 + off_size])[0]
            nbytes = _TIFF_TYPE_SIZES.get(typ, 1) * count
            if nbytes > off_size:
                (val_off,) = struct.unpack(bo + off_fmt, ent[4 + off_size : 4 + 2 * off_size])
                if val_off + nbytes > size:
                    tag = struct.unpack(bo + "H", ent[0:2])[0]
                    return f"tag {tag} of image directory {i} has values up to byte {val_off + nbytes:,}, past the end"
        (offset,) = struct.unpack(bo + off_fmt, fh.read(off_size))
        i += 1
    return None


def check_tiff_integrity(path: Path) -> str | None:
    """Raise :class:`SlideReadError` when a TIFF is truncated or its structure is damaged.

    Returns the TIFF flavour tifffile sees (``"ome"``, ``"svs"``, ``"tiff"``), None for non-TIFF.

    A truncated copy (interrupted download or transfer) often still opens, since directories
    may sit early in the file, and then fails deep inside a run or silently loses pyramid
    levels. This walks the directory chain (every directory and out-of-line tag value must lie
    inside the file) and checks every directory's pixel data offsets against the file size:
    a directory parse, no decoding. Files that are not TIFF are left to the backends.
    """
    import tifffile

    size = path.stat().st_size
    with open(path, "rb") as fh:
        problem = _walk_ifds(fh, size)
    flavour = None
    if problem is None:
        try:
            with tifffile.TiffFile(path) as tif:
                flavour = "ome" if tif.is_ome else "svs" if tif.is_svs else "tiff"
                for i, page in enumerate(tif.pages):
                    offsets, counts = page.dataoffsets, page.databytecounts
                    if not offsets:
                        problem = f"image directory {i} has no pixel data offsets"
                        break
                    end = max(o + c for o, c in zip(offsets, counts))
                    if end > size:
                        problem = f"image directory {i} has pixel data up to byte {end:,}"
                        break
        except Exception as exc:  # noqa: BLE001 - tifffile raises TiffFileError, struct.error, ValueError,
            # IndexError, KeyError... on damaged structures
            with open(path, "rb") as fh:
                is_tiff = fh.read(2) in (b"II", b"MM")
            if not is_tiff:
                return None  # not a TIFF: the backends decide
            problem = f"its TIFF structure is damaged ({one_line(exc)})"
    if problem is not None:
        raise SlideReadError(
            f"{path} is truncated or damaged: {problem} (the file has {size:,} bytes); "
            "copy or download the slide again"
        )
    return flavour
