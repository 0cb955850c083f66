"""The physical and memory bounds every user-supplied number is checked against.

A value outside these ranges is not a slide, a model or an annotation anyone can have made; left
unchecked it turns into a many-gigabyte allocation (``--mpp 1e-6``: a 393 GiB thumbnail) or into a
silent nonsense result (``patch_size_pixels: 1e9``: "ok, 0 patches"). Each check raises the
toolkit error of the place that consumes the value, with the range and the reason in the message.

Ranges and why
--------------
``MPP_RANGE_UM`` = [0.05, 20] um/px, a slide's level-0 pixel size.
    Light microscopy resolves about 0.2 um; the finest whole-slide scanners (100x oil) sample
    0.1 um/px, so 0.05 leaves a factor 2 of margin. 20 um/px is coarser than any scan a tissue
    or patch model can use (a 0.5x overview); the usual values are 0.23-0.5 (40x/20x).
``SPACING_RANGE_UM`` = [0.05, 20] um/px, a model's input pixel size (WSInfer ``spacing_um_px``).
    The same physical bounds: a model can't see finer than the slide was scanned, and coarser
    than 20 um/px a 96-px patch spans ~2 mm, more than most lesions and sections.
``PATCH_PX_RANGE`` = [8, 4096] px, a model's patch side (``patch_size_pixels``, ``--patch-px``).
    Below 8 px no convolutional network has anything to look at; 4096 px is 16 times the largest
    patch of any published WSI model (256) and already 48 MiB per RGB float patch.
``STRIDE_PX_RANGE`` = [1, 4096] px, the grid stride in model pixels (at most the patch range).
``SLIDE_MAX_SIDE_MM`` = 130 mm, the longest side of level 0 (pixels x um/px).
    Standard slides are 75 x 25 mm, large-format 75 x 50 mm, whole-mount 127 x 102 mm (5 x 4 in).
    A level 0 larger than that is a wrong mpp or a damaged/forged header (10^6 px at 0.25 um/px
    would be a 250 mm slide).
``SLIDE_MAX_SIDE_PX`` = 2**22 px (4.2 million), the longest side of level 0 in pixels:
    130 mm at 0.05 um/px is 2.6 million px.
``MAX_SEGMENT_BYTES`` = 256 MiB, one stored tile or strip, decoded.
    Scanners write 240-1024 px tiles (3 MiB decoded at most); a single-strip image of a whole
    slide would have to be decoded in one piece to read any pixel of it.
``MAX_THUMBNAIL_PIXELS`` = 2**28 (268 million px, 768 MiB RGB): a 130 x 130 mm slide at 8 um/px.
``MAX_GRID_CELLS`` = 2**25 (33.5 million cells, 512 MiB as the (N, 2) int64 cell list): a 130 x
    130 mm slide has 17.5 million PCam cells (31.1 um); finer grids are far beyond what inference
    could run.
``MAX_COORD_L0`` = 2**24 px (16.8 million), an annotation or detection coordinate (level-0 px):
    six times the longest possible slide; the largest integer a float32 holds exactly. Anything
    beyond is not a pixel of any slide (a different unit or frame, or a damaged file).
``MAX_EVAL_MASK_PIXELS`` = 2**27: the Camelyon16 evaluation mask (level 5, int32 labels, 512 MiB),
    enough for a 130 x 130 mm slide at 0.08 um/px.

Memory: a thumbnail is read region by region (:meth:`wsi_toolkit.slide.SlideReader.thumbnail`),
so reading it costs the thumbnail plus one bounded region (~50 MiB), never a whole pyramid level.
"""

from __future__ import annotations

import math
import numbers
from typing import NoReturn

__all__ = [
    "MPP_RANGE_UM", "SPACING_RANGE_UM", "PATCH_PX_RANGE", "STRIDE_PX_RANGE", "SLIDE_MAX_SIDE_MM",
    "SLIDE_MAX_SIDE_PX", "MAX_SEGMENT_BYTES", "MAX_THUMBNAIL_PIXELS", "MAX_GRID_CELLS", "MAX_COORD_L0",
    "MAX_EVAL_MASK_PIXELS", "in_range", "range_text", "check_number", "check_int", "check_fraction",
]

MPP_RANGE_UM = (0.05, 20.0)
SPACING_RANGE_UM = (0.05, 20.0)
PATCH_PX_RANGE = (8, 4096)
STRIDE_PX_RANGE = (1, 4096)
SLIDE_MAX_SIDE_MM = 130.0
SLIDE_MAX_SIDE_PX = 2**22
MAX_SEGMENT_BYTES = 256 * 2**20
MAX_THUMBNAIL_PIXELS = 2**28
MAX_GRID_CELLS = 2**25
MAX_COORD_L0 = float(2**24)
MAX_EVAL_MASK_PIXELS = 2**27


def in_range(value: object, bounds: tuple[float, float], *, integer: bool = False) -> bool:
    """True when ``value`` is a real number (an integer if ``integer``; never a bool), finite and
    within ``bounds`` (inclusive)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return False
    if integer and not isinstance(value, numbers.Integral):
        return False
    try:
        v = float(value)
    except (OverflowError, ValueError):
        return False
    return math.isfinite(v) and bounds[0] <= v <= bounds[1]


def range_text(bounds: tuple[float, float], unit: str) -> str:
    """``"[0.05, 20] um/px"``."""
    return f"[{bounds[0]:g}, {bounds[1]:g}] {unit}"


# -- one set of checks for user-supplied numbers -------------------------------------------------
# Each returns the value (as float / int) or raises ``error`` (a toolkit error class; ConfigError
# by default) with a message naming ``name`` and what is wanted. Use them at the edges (CLI,
# config files, dataclass __post_init__, public functions), not again in internal helpers.


def _fail(error: type[Exception], name: str, want: str, value: object) -> NoReturn:
    raise error(f"{name} must be {want}; got {value!r}")


def check_number(value: object, name: str, *, bounds: tuple[float, float] | None = None, unit: str = "",
                 positive: bool = False, error: type[Exception] | None = None) -> float:
    """A finite real number (never a bool), > 0 if ``positive``, within ``bounds`` if given."""
    err = error or _config_error()
    want = "a positive number" if positive else "a finite number"
    if bounds is not None:
        want = f"a number in {range_text(bounds, unit).rstrip()}"
    elif unit:
        want += f" of {unit}"
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        _fail(err, name, want, value)
    try:
        v = float(value)
    except (OverflowError, ValueError):
        _fail(err, name, want, value)
    if not math.isfinite(v) or (positive and v <= 0) or (bounds is not None and not bounds[0] <= v <= bounds[1]):
        _fail(err, name, want, value)
    return v


def check_int(value: object, name: str, *, minimum: int | None = 1, bounds: tuple[float, float] | None = None,
              unit: str = "", error: type[Exception] | None = None) -> int:
    """An integer (never a bool), >= ``minimum`` (1: positive, 0: non-negative, None: any), within
    ``bounds`` if given."""
    err = error or _config_error()
    if bounds is not None:
        want = f"an integer in {range_text(bounds, unit).rstrip()}"
    else:
        want = {1: "a positive integer", 0: "a non-negative integer", None: "an integer"}.get(
            minimum, f"an integer >= {minimum}")
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        _fail(err, name, want, value)
    v = int(value)
    if (minimum is not None and v < minimum) or (bounds is not None and not bounds[0] <= v <= bounds[1]):
        _fail(err, name, want, value)
    return v


def check_fraction(value: object, name: str, *, error: type[Exception] | None = None) -> float:
    """A number in [0, 1]."""
    return check_number(value, name, bounds=(0.0, 1.0), error=error)


def _config_error() -> type[Exception]:
    from wsi_toolkit.errors import ConfigError  # errors imports nothing from here; kept lazy anyway

    return ConfigError
