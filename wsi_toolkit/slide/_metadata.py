"""Physical resolution (um/px) from slide metadata, and TIFF integrity checks.

Pure functions over property dictionaries so both backends share one set of rules.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Mapping

from wsi_toolkit.errors import SlideReadError

__all__ = ["mpp_from_openslide_properties", "mpp_from_tiff_resolution", "check_tiff_integrity"]

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


def check_tiff_integrity(path: Path) -> None:
    """Raise :class:`SlideReadError` when a TIFF's tile/strip data runs past the end of file.

    A truncated copy (interrupted download or transfer) usually still opens, since the
    directories sit early in the file, and only fails deep inside a run. This checks every
    directory's data offsets against the file size, which costs a directory parse, no decoding.
    Non-TIFF files are ignored.
    """
    import tifffile

    size = path.stat().st_size
    try:
        with tifffile.TiffFile(path) as tif:
            for i, page in enumerate(tif.pages):
                offsets, counts = page.dataoffsets, page.databytecounts
                if not offsets:
                    continue
                end = max(o + c for o, c in zip(offsets, counts))
                if end > size:
                    raise SlideReadError(
                        f"{path} is truncated: image directory {i} has pixel data up to byte {end:,} "
                        f"but the file has {size:,} bytes; copy or download the slide again"
                    )
    except SlideReadError:
        raise
    except Exception:  # not a TIFF, or a layout tifffile cannot parse: the backend decides
        return
