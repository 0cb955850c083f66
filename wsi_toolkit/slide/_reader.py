"""The one reader interface; backends implement only the low-level level read and metadata.

Frames and units (docs/frames.md):

- ``l0_xy``: (x, y) in level-0 pixels of the slide; may be fractional for physical reads.
- ``lvl_xy``: (x, y) in pixels of one pyramid level.
- sizes are (width, height); arrays are indexed [row, col] and shaped (height, width, 3).
- ``mpp``: micrometres per pixel. The slide's ``mpp`` is the level-0 value.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image

from wsi_toolkit.errors import ConfigError
from wsi_toolkit.limits import MAX_THUMBNAIL_PIXELS, in_range, range_text

__all__ = ["SlideReader", "LevelInfo", "BACKGROUND_RGB", "ReadFrom", "READ_FROM", "FINER_OVERSAMPLE"]

#: Which pyramid level a physical-scale read decodes (:meth:`SlideReader.read_level_for`):
#: ``nearest`` the coarsest level not coarser than the target um/px (fewest pixels decoded);
#: ``finer`` the coarsest level at least :data:`FINER_OVERSAMPLE` times finer than the target, shrunk
#: with an antialiasing filter (averages out that level's JPEG artefacts; ~4x the pixels on a 2x
#: pyramid); ``level0`` level 0, as WSInfer reads (16x the pixels of a 40x slide's 10x level).
#: docs/frames.md says what each reads and why.
ReadFrom = Literal["nearest", "finer", "level0"]
READ_FROM: tuple[ReadFrom, ...] = ("nearest", "finer", "level0")
#: ``read_from="finer"``: the level read has pixels at least this many times smaller than the target.
FINER_OVERSAMPLE = 2.0

#: Colour returned for pixels outside the slide (glass is white).
BACKGROUND_RGB = (255, 255, 255)

# A level whose downsample is within this relative tolerance of the wanted one is read as is.
_EXACT_TOL = 1e-6

# A thumbnail is read in blocks of at most this many level pixels on a side (~48 MiB RGB).
_THUMB_BLOCK_PX = 4096
# Thumbnail resolutions that make sense: finer is a level read, coarser a few pixels per slide.
_THUMB_MPP_RANGE = (0.05, 100.0)
# Thumbnail blocks shrunk more than this (a level far finer than the thumbnail: no pyramid) are box-
# averaged first: the same picture at a fraction of the cost of a wide bilinear kernel.
_THUMB_REDUCING_GAP = 3.0


@dataclass(frozen=True)
class LevelInfo:
    """One pyramid level: its size (width, height) and downsample from level 0."""

    size: tuple[int, int]
    downsample: float


def snap_downsample(l0_size: tuple[int, int], lvl_size: tuple[int, int]) -> float:
    """Downsample of a pyramid level relative to level 0.

    Pyramids are written by integer reduction with the last row/column rounded up or down,
    so a level of ``ceil(w / k)`` or ``floor(w / k)`` pixels has downsample exactly ``k``.
    When both dimensions agree with one integer ``k`` that integer is returned; otherwise
    the mean of the two ratios (what OpenSlide reports).
    """
    l0_w, l0_h = l0_size
    w, h = lvl_size
    ratio_w, ratio_h = l0_w / w, l0_h / h
    k = round((ratio_w + ratio_h) / 2)
    if k >= 1:
        ok_w = w in (math.floor(l0_w / k), math.ceil(l0_w / k))
        ok_h = h in (math.floor(l0_h / k), math.ceil(l0_h / k))
        if ok_w and ok_h:
            return float(k)
    return (ratio_w + ratio_h) / 2


def _as_pair(value: Sequence[float], name: str) -> tuple[float, float]:
    try:
        a, b = value
    except (TypeError, ValueError):
        raise ConfigError(f"{name} must be a pair (x, y) or (width, height); got {value!r}") from None
    return float(a), float(b)


class SlideReader(ABC):
    """A whole-slide image opened for reading. Use :func:`wsi_toolkit.slide.open_slide`.

    Subclasses (backends) implement :meth:`_read_level` and fill the metadata attributes
    in their constructor; everything else, including argument checks and physical-scale
    resampling, lives here.

    Attributes
    ----------
    path : Path
    backend : str
        ``"openslide"`` or ``"tifffile"``.
    vendor : str
        Format as the backend names it (``"aperio"``, ``"generic-tiff"``, ``"ome"``...).
    levels : tuple[LevelInfo, ...]
        Pyramid levels, level 0 first.
    mpp : float
        Micrometres per level-0 pixel (the mean of x and y when they differ).
    mpp_xy : tuple[float, float]
        Micrometres per level-0 pixel along x and y.
    mpp_source : str
        Where ``mpp`` came from: ``"override"`` or the metadata field that gave it.
    mpp_metadata : tuple[float, float] | None
        What the metadata said, kept when an override wins.
    properties : dict[str, str]
        Backend metadata, as strings.
    """

    path: Path
    backend: str
    vendor: str
    levels: tuple[LevelInfo, ...]
    mpp: float
    mpp_xy: tuple[float, float]
    mpp_source: str
    mpp_metadata: tuple[float, float] | None = None
    properties: dict[str, str]

    @abstractmethod
    def metadata_mpp(self) -> tuple[tuple[float, float], str] | None:
        """((mpp_x, mpp_y), source) found in the file's metadata, or None."""

    # -- low level: the only thing a backend must provide -------------------------------
    @abstractmethod
    def _read_level(self, level: int, lvl_xy: tuple[int, int], size: tuple[int, int]) -> np.ndarray:
        """Pixels of ``level`` in the box starting at ``lvl_xy`` of ``size`` (w, h).

        The box lies fully inside the level (the caller clips). Returns RGB uint8 (h, w, 3).
        """

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release file handles."""

    # -- decoded-tile cache (optional; backends that have one override these) --------------
    #: bytes per cached pixel (RGB 3, OpenSlide's ARGB 4)
    _cache_px_bytes = 3

    def tile_size(self, level: int) -> tuple[int, int] | None:
        """(width, height) of the stored tiles (or strips) of ``level``; None when unknown."""
        return None

    def set_tile_cache(self, nbytes: int) -> None:  # noqa: B027 - optional hook
        """Give this handle a decoded-tile cache of ``nbytes`` (no-op for backends without one)."""

    def reserve_tile_cache(self, mpp: float, *, rows: int = 3, min_bytes: int = 64 * 2**20,
                           max_bytes: int = 256 * 2**20, read_from: ReadFrom = "nearest") -> int:
        """Size the tile cache for reads at ``mpp`` that sweep the slide row by row: ``rows`` full
        rows of tiles of the level those reads use (:meth:`read_level_for` with ``read_from``),
        clamped to [``min_bytes``, ``max_bytes``]. A block read then finds the tiles it shares with
        the block above it (and the one to its left) still decoded. Returns the size set."""
        level = self.read_level_for(mpp, read_from)
        tile = self.tile_size(level)
        if tile is None:
            nbytes = min_bytes
        else:
            tw, th = tile
            across = math.ceil(self.levels[level].size[0] / tw)
            nbytes = across * tw * th * self._cache_px_bytes * rows
        nbytes = int(min(max(nbytes, min_bytes), max_bytes))
        self.set_tile_cache(nbytes)
        return nbytes

    # -- metadata helpers ----------------------------------------------------------------
    @property
    def level_count(self) -> int:
        return len(self.levels)

    @property
    def level_dimensions(self) -> tuple[tuple[int, int], ...]:
        """(width, height) of each level, level 0 first."""
        return tuple(lv.size for lv in self.levels)

    @property
    def level_downsamples(self) -> tuple[float, ...]:
        return tuple(lv.downsample for lv in self.levels)

    @property
    def dimensions(self) -> tuple[int, int]:
        """(width, height) of level 0 in pixels."""
        return self.levels[0].size

    @property
    def is_synthetic(self) -> bool:
        """True when the file's description/title says SYNTHETIC (slides made by
        :mod:`wsi_toolkit.synthetic`), so outputs made from it can say so."""
        keys = ("description", "title", "comment")
        return any("SYNTHETIC" in str(v) for k, v in self.properties.items() if any(w in k.lower() for w in keys))

    def level_mpp(self, level: int) -> float:
        """Micrometres per pixel at ``level``."""
        return self.mpp * self.levels[level].downsample

    def best_level_for_mpp(self, mpp: float) -> int:
        """The coarsest level whose pixels are no larger than ``mpp`` (so reads only shrink).

        Falls back to level 0 when ``mpp`` is finer than level 0.
        """
        if not mpp > 0:
            raise ConfigError(f"mpp must be positive; got {mpp!r}")
        want_ds = mpp / self.mpp
        best = 0
        for i, lv in enumerate(self.levels):
            if lv.downsample <= want_ds * (1 + _EXACT_TOL):
                best = i
        return best

    def read_level_for(self, mpp: float, read_from: ReadFrom = "nearest") -> int:
        """The level a read at ``mpp`` um/px decodes under the policy ``read_from`` (:data:`ReadFrom`).

        ``nearest``: :meth:`best_level_for_mpp`. ``finer``: the coarsest level whose pixels are at
        least :data:`FINER_OVERSAMPLE` times smaller than ``mpp`` (level 0 when none is). ``level0``: 0.
        On a slide whose only level near ``mpp`` is level 0 all three read the same level.
        """
        if read_from == "nearest":
            return self.best_level_for_mpp(mpp)
        if read_from == "finer":
            if not mpp > 0:
                raise ConfigError(f"mpp must be positive; got {mpp!r}")
            return self.best_level_for_mpp(mpp / FINER_OVERSAMPLE)
        if read_from == "level0":
            return 0
        raise ConfigError(f"read_from must be one of {', '.join(READ_FROM)}; got {read_from!r}")

    # -- reads -----------------------------------------------------------------------------
    def read_region(self, l0_xy: Sequence[int], level: int, size: Sequence[int]) -> np.ndarray:
        """Read ``size`` (w, h) pixels of ``level`` whose top-left is ``l0_xy`` in level-0 px.

        Same convention as OpenSlide's ``read_region``. Pixels outside the slide are white.
        Returns RGB uint8 of shape (h, w, 3).
        """
        if not 0 <= int(level) < self.level_count:
            raise ConfigError(f"level {level} does not exist in {self.path} ({self.level_count} levels)")
        l0_x, l0_y = _as_pair(l0_xy, "l0_xy")
        w, h = (int(v) for v in _as_pair(size, "size"))
        if w <= 0 or h <= 0:
            raise ConfigError(f"size must be positive; got {(w, h)}")
        ds = self.levels[level].downsample
        lvl_x, lvl_y = int(math.floor(l0_x / ds)), int(math.floor(l0_y / ds))
        return self._read_level_padded(level, (lvl_x, lvl_y), (w, h))

    def _read_level_padded(self, level: int, lvl_xy: tuple[int, int], size: tuple[int, int]) -> np.ndarray:
        """Like :meth:`_read_level` but any box is allowed; outside pixels are white."""
        lvl_x, lvl_y = lvl_xy
        w, h = size
        lvl_w, lvl_h = self.levels[level].size
        x0, y0 = max(lvl_x, 0), max(lvl_y, 0)
        x1, y1 = min(lvl_x + w, lvl_w), min(lvl_y + h, lvl_h)
        if x0 == lvl_x and y0 == lvl_y and x1 == lvl_x + w and y1 == lvl_y + h:
            return self._read_level(level, (lvl_x, lvl_y), (w, h))
        out = np.empty((h, w, 3), np.uint8)
        out[:] = BACKGROUND_RGB
        if x1 > x0 and y1 > y0:
            out[y0 - lvl_y : y1 - lvl_y, x0 - lvl_x : x1 - lvl_x] = self._read_level(
                level, (x0, y0), (x1 - x0, y1 - y0)
            )
        return out

    def read_at_mpp(self, l0_xy: Sequence[float], size_px: Sequence[int], mpp: float, *,
                    read_from: ReadFrom = "nearest", oversample: int = 1) -> np.ndarray:
        """Read a box at a physical resolution.

        The box starts at ``l0_xy`` (level-0 px, may be fractional) and is ``size_px`` (w, h)
        pixels of exactly ``mpp`` um each, so it covers ``size_px * mpp / self.mpp`` level-0
        pixels. The level :meth:`read_level_for` picks under ``read_from`` is read and resampled to
        exactly ``mpp``; when that level already has ``mpp`` and the box is pixel-aligned, its pixels
        are returned unchanged. ``read_from="nearest"`` reads the coarsest level not coarser than
        ``mpp`` and resamples with PIL's antialiased bilinear (a triangle filter widened by the shrink
        factor). ``"finer"`` reads a level at least 2x finer and ``"level0"`` level 0, and shrink by
        area averaging (PIL's box filter: each output pixel the mean of the level pixels it covers,
        as a pyramid level is made), which averages out the coarse level's own JPEG artefacts at ~4x
        (finer, 2x pyramid) or ~16x (level0, 40x slide) the pixels decoded. Returns RGB uint8 (h, w, 3).

        ``oversample`` k > 1: the same box from the same level, returned at ``mpp / k`` um/px
        (``size_px * k`` pixels), area-averaged where that level is finer still, enlarged (bilinear)
        where it is not: what ``wsi-infer --read-from finer`` hands a model whose package resizes
        its input, so the coarse picture is made once, by the model's own Resize (docs/frames.md).

        Example: on a 0.226 um/px slide, ``read_at_mpp((0, 0), (96, 96), 0.972)`` reads level 2
        (0.904 um/px) and shrinks 104.2 level-2 px to 96, giving a true PCam-scale patch; with
        ``read_from="finer"`` it reads level 1 (0.452 um/px) and shrinks 208.4 px to 96.
        """
        if not (isinstance(oversample, int) and oversample >= 1):
            raise ConfigError(f"oversample must be a whole number >= 1; got {oversample!r}")
        level = self.read_level_for(mpp, read_from)
        out_mpp = mpp / oversample
        w, h = (int(v) for v in _as_pair(size_px, "size_px"))
        if read_from == "nearest" or self.level_mpp(level) >= out_mpp * (1 - _EXACT_TOL):
            resample = Image.Resampling.BILINEAR
        else:
            resample = Image.Resampling.BOX
        return self._read_at_mpp(l0_xy, (w * oversample, h * oversample), out_mpp, level=level, resample=resample)

    def _read_at_mpp(self, l0_xy: Sequence[float], size_px: Sequence[int], mpp: float, *,
                     reducing_gap: float | None = None, level: int | None = None,
                     resample: Image.Resampling = Image.Resampling.BILINEAR) -> np.ndarray:
        """:meth:`read_at_mpp` from ``level`` (default :meth:`best_level_for_mpp`) with the filter
        ``resample``; with
        ``reducing_gap`` (PIL's), a large shrink is first done by box averaging down to within that
        factor of the target (thumbnails of slides without a pyramid)."""
        if not mpp > 0:
            raise ConfigError(f"mpp must be positive; got {mpp!r}")
        l0_x, l0_y = _as_pair(l0_xy, "l0_xy")
        w, h = (int(v) for v in _as_pair(size_px, "size_px"))
        if w <= 0 or h <= 0:
            raise ConfigError(f"size_px must be positive; got {(w, h)}")
        if level is None:
            level = self.best_level_for_mpp(mpp)
        lvl_ds = self.levels[level].downsample
        # Level pixels per output pixel (>= 1 unless mpp is finer than level 0).
        scale = mpp / (self.mpp * lvl_ds)
        lvl_x0, lvl_y0 = l0_x / lvl_ds, l0_y / lvl_ds
        if abs(scale - 1) < _EXACT_TOL and _is_int(lvl_x0) and _is_int(lvl_y0):
            return self._read_level_padded(level, (round(lvl_x0), round(lvl_y0)), (w, h))
        lvl_x1, lvl_y1 = lvl_x0 + w * scale, lvl_y0 + h * scale
        # Integer box with a margin for the resampling filter's support.
        margin = int(math.ceil(max(scale, 1.0))) + 1
        rx0, ry0 = int(math.floor(lvl_x0)) - margin, int(math.floor(lvl_y0)) - margin
        rx1, ry1 = int(math.ceil(lvl_x1)) + margin, int(math.ceil(lvl_y1)) + margin
        region = self._read_level_padded(level, (rx0, ry0), (rx1 - rx0, ry1 - ry0))
        box = (lvl_x0 - rx0, lvl_y0 - ry0, lvl_x1 - rx0, lvl_y1 - ry0)
        out = Image.fromarray(region).resize((w, h), resample, box=box, reducing_gap=reducing_gap)
        return np.array(out)  # a writeable copy, like every other read

    def thumbnail(self, *, mpp: float = 8.0) -> np.ndarray:
        """The whole slide at ``mpp`` um/px, RGB uint8.

        Thumbnail pixel [r, c] covers level-0 pixels ``[c * k, (c + 1) * k)`` by
        ``[r * k, (r + 1) * k)`` with ``k = mpp / self.mpp``; the shape is
        ``(ceil(h0 / k), ceil(w0 / k), 3)``, the part of the last row/column beyond the slide
        is white. So thumbnail and level-0 coordinates differ by exactly the factor ``k``.

        Read block by block (each block a :meth:`read_at_mpp` of at most ~4096 x 4096 pixels of the
        level it reads), so memory is the thumbnail plus one block whatever the slide: a slide
        without a pyramid is not decoded whole.

        Raises
        ------
        ConfigError
            ``mpp`` is not within [0.05, 100] um/px, or the thumbnail would have more than
            :data:`wsi_toolkit.limits.MAX_THUMBNAIL_PIXELS` pixels.
        """
        if not in_range(mpp, _THUMB_MPP_RANGE):
            raise ConfigError(f"thumbnail mpp must be within {range_text(_THUMB_MPP_RANGE, 'um/px')} (tissue is "
                              f"found at 8); got {mpp!r}")
        k = mpp / self.mpp
        w0, h0 = self.dimensions
        size = (max(1, math.ceil(w0 / k - 1e-9)), max(1, math.ceil(h0 / k - 1e-9)))
        if size[0] * size[1] > MAX_THUMBNAIL_PIXELS:
            raise ConfigError(
                f"{self.path}: a thumbnail at {mpp:g} um/px would be {size[0]:,} x {size[1]:,} px, more than "
                f"{MAX_THUMBNAIL_PIXELS:,}; use a coarser thumbnail mpp (8 um/px is the default)")
        level = self.best_level_for_mpp(mpp)
        scale = mpp / (self.mpp * self.levels[level].downsample)  # level px per thumbnail px
        block = int(max(1, min(_THUMB_BLOCK_PX, _THUMB_BLOCK_PX // max(scale, 1.0))))
        if size[0] <= block and size[1] <= block:
            return self.read_at_mpp((0, 0), size, mpp)
        out = np.empty((size[1], size[0], 3), np.uint8)
        for y in range(0, size[1], block):
            for x in range(0, size[0], block):
                bw, bh = min(block, size[0] - x), min(block, size[1] - y)
                out[y : y + bh, x : x + bw] = self._read_at_mpp((x * k, y * k), (bw, bh), mpp,
                                                                reducing_gap=_THUMB_REDUCING_GAP)
        return out

    def decode_tiles(self, level: int, tiles_xy: Sequence[tuple[int, int]]) -> None:
        """Decode the stored tiles ``(tile_x, tile_y)`` of ``level`` (tile units, as
        :meth:`tile_size` gives them; 512 px boxes when the backend does not say), discarding the
        pixels: :class:`~wsi_toolkit.errors.SlideReadError` when one is damaged. A preflight check
        of what later reads will decode."""
        if not 0 <= int(level) < self.level_count:
            raise ConfigError(f"level {level} does not exist in {self.path} ({self.level_count} levels)")
        tw, th = self.tile_size(level) or (512, 512)
        lw, lh = self.levels[level].size
        for tx, ty in tiles_xy:
            x, y = int(tx) * tw, int(ty) * th
            if 0 <= x < lw and 0 <= y < lh:
                self._read_level(level, (x, y), (min(tw, lw - x), min(th, lh - y)))

    # -- context manager -------------------------------------------------------------------
    def __enter__(self) -> SlideReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        w, h = self.dimensions
        return (
            f"<{type(self).__name__} {self.path.name!r} {self.vendor} {w}x{h} px, "
            f"{self.level_count} levels, mpp={self.mpp:.4f} ({self.mpp_source})>"
        )


def _is_int(v: float) -> bool:
    return abs(v - round(v)) < 1e-6
