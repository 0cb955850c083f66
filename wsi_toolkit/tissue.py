"""Tissue detection on a low-resolution RGB thumbnail, and mask -> polygon conversion.

Pure array functions: the caller reads the thumbnail (at ``TissueConfig.thumb_mpp``) and
passes it in; nothing here touches a file.

Frames and units (see DESIGN.md)
--------------------------------
- The thumbnail and the mask are indexed ``[row, col]`` at ``thumb_mpp`` um/px.
- ``k = thumb_mpp / l0_mpp`` is the number of level-0 pixels per thumbnail pixel
  (``TissueMask.l0_per_px``). Thumbnail pixel ``[r, c]`` covers the level-0 pixels
  ``[c*k, (c+1)*k) x [r*k, (r+1)*k)`` (x by y). Pixels beyond the slide edge are white.
- Polygons are ``(x, y)`` in level-0 pixels; pixel ``[r, c]`` of a mask is the square
  ``[c, c+1] x [r, r+1]`` before scaling by ``k``.

Method of :func:`detect_tissue`
-------------------------------
1. HSV as :func:`skimage.color.rgb2hsv` defines it (hue in degrees, saturation and value in
   0..1), computed here directly and the hue only for saturated pixels: 4x faster on a
   full-slide thumbnail, where rgb2hsv took 6 of 11 s (3000 x 6000 px).
2. Ink (only when ``suppress_pen``): ``value < min_value`` (black ink, dark debris), or
   ``saturation >= pen_min_saturation`` with hue in ``blue_pen_hue`` (blue ballpoint /
   marker, hue ~200-240 degrees, G >= R) or in ``green_pen_hue`` (green marker).
   Haematoxylin -- nuclei, dense lymphocyte sheets of a lymph node -- is blue-*purple*,
   hue ~250-300 degrees with R > G, and eosin is pink, hue ~300-350; the blue window
   therefore stops at 245 degrees so dense purple tissue is never taken for ink.
3. Saturation is median-filtered (``median_um``, converted to an odd number of pixels >= 1).
4. A threshold is chosen with Otsu's method (:func:`skimage.filters.threshold_otsu`) over
   the non-ink pixels and clipped to ``[saturation_floor, saturation_ceiling]``. Otsu runs
   on ``log(min(saturation, saturation_ceiling) + 0.01)``, not on saturation itself: glass
   sits near 0.00-0.03 and tissue spans 0.08 (faint eosin) to 0.6 (dense haematoxylin), so
   on saturation itself Otsu splits *faint from dense tissue* whenever dense tissue
   dominates (~0.27, clipped to the 0.20 ceiling, and the faint tissue is lost). Pixels
   above the ceiling are tissue whatever the threshold, so their exact value must not pull
   it; on the log scale the widest gap is then glass vs. the faintest tissue, while a
   tinted glass (saturation ~0.08) still lifts the threshold above itself.
   When the pixels are (nearly) all identical the floor is used.
5. ``tissue = saturation > threshold and not ink``; ink dilated by ``closing_um`` is removed
   as well (the blurred rim of a pen stroke is saturated but no longer has the pen's hue).
6. Morphological closing (radius ``closing_um``) then opening (radius ``opening_um``) with
   disks, radii ``round(um / thumb_mpp)`` px, skipped when 0; then objects smaller than
   ``min_object_um2`` are removed (8-connected) and holes smaller than ``min_hole_um2``
   filled (4-connected holes).

Example
-------
>>> import numpy as np
>>> thumb = np.full((64, 64, 3), 240, np.uint8)
>>> thumb[16:48, 16:48] = (220, 150, 200)        # 32 x 32 px of pink tissue at 8 um/px
>>> tm = detect_tissue(thumb, l0_mpp=0.25)
>>> int(tm.mask.sum()), round(tm.area_mm2(), 4), tm.l0_per_px
(1020, 0.0653, 32.0)
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import shapely
from shapely.geometry import MultiPolygon, Polygon
from skimage import filters, measure, morphology

from wsi_toolkit.errors import ConfigError

__all__ = ["TissueConfig", "TissueMask", "detect_tissue", "mask_to_polygons"]

logger = logging.getLogger(__name__)

# Otsu runs on log(saturation + offset); the offset keeps exact-grey pixels finite and
# squeezes the glass-noise range (saturation below ~0.01 is noise) into one mode.
_LOG_SAT_OFFSET = 0.01
# Saturation spread below which the thumbnail is treated as uniform (threshold = floor).
_UNIFORM_SAT_SPREAD = 1e-3


def _check_number(name: str, value: Any, lo: float, hi: float, *, lo_open: bool = False) -> None:
    """Raise ConfigError unless ``value`` is a real number in [lo, hi] (or (lo, hi])."""
    ok = isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)
    if ok:
        v = float(value)
        ok = math.isfinite(v) and (v > lo if lo_open else v >= lo) and v <= hi
    if not ok:
        left = "(" if lo_open else "["
        raise ConfigError(f"TissueConfig.{name} must be a number in {left}{lo:g}, {hi:g}]; got {value!r}")


@dataclass(frozen=True)
class TissueConfig:
    """Settings of :func:`detect_tissue`; validated on construction (raises ConfigError).

    Lengths are micrometres (``_um``), areas square micrometres (``_um2``), hues degrees
    (0..360), saturation and value fractions (0..1).
    """

    thumb_mpp: float = 8.0
    """um/px of the thumbnail to detect on."""
    saturation_floor: float = 0.05
    """The saturation threshold never goes below this (glass noise stays out)."""
    saturation_ceiling: float = 0.20
    """...nor above this (protects faint tissue when dense tissue dominates)."""
    median_um: float = 24.0
    """Median filter size applied to saturation before thresholding (odd px >= 1)."""
    closing_um: float = 16.0
    """Radius of the morphological closing; also how far ink is grown before removal."""
    opening_um: float = 8.0
    """Radius of the morphological opening."""
    min_object_um2: float = 20_000.0
    """Tissue objects smaller than this are removed."""
    min_hole_um2: float = 20_000.0
    """Holes in tissue smaller than this are filled."""
    suppress_pen: bool = True
    """Remove ink (black, blue, green) from the mask; False disables all three ink rules."""
    min_value: float = 0.20
    """HSV value (max channel / 255) below this is black ink / dark debris, not tissue."""
    blue_pen_hue: tuple[float, float] = (180.0, 245.0)
    """Hue window (degrees) of blue pen; must stay below haematoxylin's ~250-300."""
    green_pen_hue: tuple[float, float] = (75.0, 170.0)
    """Hue window (degrees) of green pen."""
    pen_min_saturation: float = 0.25
    """Minimum saturation for a blue/green pixel to count as ink."""

    def __post_init__(self) -> None:
        _check_number("thumb_mpp", self.thumb_mpp, 0.0, math.inf, lo_open=True)
        _check_number("saturation_floor", self.saturation_floor, 0.0, 1.0)
        _check_number("saturation_ceiling", self.saturation_ceiling, 0.0, 1.0)
        if self.saturation_floor > self.saturation_ceiling:
            raise ConfigError(
                f"TissueConfig.saturation_floor ({self.saturation_floor!r}) must be <= "
                f"saturation_ceiling ({self.saturation_ceiling!r})"
            )
        for name in ("median_um", "closing_um", "opening_um", "min_object_um2", "min_hole_um2"):
            _check_number(name, getattr(self, name), 0.0, math.inf)
        if not isinstance(self.suppress_pen, (bool, np.bool_)):
            raise ConfigError(f"TissueConfig.suppress_pen must be True or False; got {self.suppress_pen!r}")
        _check_number("min_value", self.min_value, 0.0, 1.0)
        _check_number("pen_min_saturation", self.pen_min_saturation, 0.0, 1.0)
        for name in ("blue_pen_hue", "green_pen_hue"):
            window = getattr(self, name)
            try:
                lo, hi = window
            except (TypeError, ValueError):
                raise ConfigError(
                    f"TissueConfig.{name} must be a pair (low, high) of degrees in [0, 360]; got {window!r}"
                ) from None
            _check_number(f"{name}[0]", lo, 0.0, 360.0)
            _check_number(f"{name}[1]", hi, 0.0, 360.0)
            if lo >= hi:
                raise ConfigError(f"TissueConfig.{name} must have low < high (degrees); got {window!r}")
            # Lists (e.g. from JSON) become tuples so the config stays hashable and immutable.
            object.__setattr__(self, name, (float(lo), float(hi)))

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict of every setting (hue windows as 2-element lists)."""
        d = asdict(self)
        d["blue_pen_hue"] = list(self.blue_pen_hue)
        d["green_pen_hue"] = list(self.green_pen_hue)
        return d


@dataclass(frozen=True, eq=False)
class TissueMask:
    """Result of :func:`detect_tissue`.

    Attributes:
        mask: bool (H, W) at ``thumb_mpp`` um/px, True = tissue; read-only.
        thumb_mpp: um/px of the mask.
        l0_per_px: level-0 pixels per mask pixel (``k = thumb_mpp / l0_mpp``).
        threshold: saturation threshold (0..1) that was applied.
        pen_fraction: fraction of thumbnail pixels flagged as ink (0 when pen suppression is off).
    """

    mask: np.ndarray = field(repr=False)
    thumb_mpp: float
    l0_per_px: float
    threshold: float
    pen_fraction: float

    def area_um2(self) -> float:
        """Tissue area in square micrometres (``mask.sum() * thumb_mpp**2``)."""
        return float(np.count_nonzero(self.mask)) * self.thumb_mpp**2

    def area_mm2(self) -> float:
        """Tissue area in square millimetres."""
        return self.area_um2() / 1e6

    def polygons(self) -> MultiPolygon:
        """Tissue outline as a MultiPolygon in LEVEL-0 pixels, holes kept.

        Edges follow the mask's pixel edges scaled by ``l0_per_px``; see :func:`mask_to_polygons`.
        """
        return mask_to_polygons(self.mask, scale=self.l0_per_px)


def _as_unit_rgb(thumb_rgb: np.ndarray) -> np.ndarray:
    """(H, W, 3|4) uint8 or float in [0, 1] -> float32 (H, W, 3) in [0, 1]."""
    arr = np.asarray(thumb_rgb)
    if arr.ndim != 3 or arr.shape[2] not in (3, 4) or arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ValueError(f"thumb_rgb must be an RGB image shaped (H, W, 3) (or RGBA); got shape {arr.shape}")
    arr = arr[..., :3]
    if arr.dtype == np.uint8:
        return arr.astype(np.float32) / np.float32(255.0)
    if np.issubdtype(arr.dtype, np.floating):
        return np.clip(arr, 0.0, 1.0).astype(np.float32)
    raise TypeError(f"thumb_rgb must be uint8 (0..255) or float (0..1); got dtype {arr.dtype}")


def _radius_px(um: float, mpp: float) -> int:
    return int(round(um / mpp))


def _odd_px(um: float, mpp: float) -> int:
    n = max(1, int(round(um / mpp)))
    return n if n % 2 == 1 else n + 1


def _max_size_below(area_px: float) -> int:
    """Largest integer pixel count strictly smaller than ``area_px`` (skimage ``max_size``)."""
    return max(0, math.ceil(area_px) - 1)


def _in_window(hue_deg: np.ndarray, window: tuple[float, float]) -> np.ndarray:
    lo, hi = window
    return (hue_deg >= lo) & (hue_deg <= hi)


def _value_saturation(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """HSV value and saturation (float32, 0..1) of float RGB in [0, 1], as skimage's rgb2hsv."""
    mx = rgb.max(axis=-1)
    mn = rgb.min(axis=-1)
    sat = mx - mn
    np.divide(sat, mx, out=sat, where=mx > 0)
    sat[mx <= 0] = 0
    return mx, sat


def _hue_deg(rgb: np.ndarray) -> np.ndarray:
    """HSV hue in degrees [0, 360) of float RGB pixels (N, 3), as skimage's rgb2hsv."""
    r, g, b = rgb[:, 0], rgb[:, 1], rgb[:, 2]
    mx = rgb.max(axis=-1)
    delta = mx - rgb.min(axis=-1)
    safe = np.where(delta > 0, delta, 1)
    hue = np.where(mx == r, ((g - b) / safe) % 6, np.where(mx == g, (b - r) / safe + 2, (r - g) / safe + 4))
    hue = np.where(delta > 0, hue * 60.0, 0.0)
    return hue.astype(np.float32)


def _ink_mask(rgb: np.ndarray, sat: np.ndarray, val: np.ndarray, config: TissueConfig) -> np.ndarray:
    """Pen ink and black debris. Hue is computed only for the saturated pixels (speed)."""
    if not config.suppress_pen:
        return np.zeros(sat.shape, dtype=bool)
    ink = val < config.min_value
    coloured = sat >= config.pen_min_saturation
    if coloured.any():
        hue_deg = _hue_deg(rgb[coloured])
        ink[coloured] |= _in_window(hue_deg, config.blue_pen_hue) | _in_window(hue_deg, config.green_pen_hue)
    return ink


def _saturation_threshold(sat_values: np.ndarray, config: TissueConfig) -> float:
    """Otsu on log(min(saturation, ceiling) + 0.01) of the (non-ink) pixels, clipped to [floor, ceiling]."""
    floor, ceiling = config.saturation_floor, config.saturation_ceiling
    if sat_values.size == 0 or float(np.ptp(sat_values)) < _UNIFORM_SAT_SPREAD:
        return float(floor)
    # Pixels above the ceiling are tissue whatever the threshold; clipping them to the ceiling
    # keeps their exact saturation from pulling Otsu into the tissue range.
    clipped = np.minimum(sat_values.astype(np.float64), ceiling)
    log_sat = np.log(clipped + _LOG_SAT_OFFSET)
    otsu = math.exp(float(filters.threshold_otsu(log_sat))) - _LOG_SAT_OFFSET
    return float(min(max(otsu, floor), ceiling))


def detect_tissue(
    thumb_rgb: np.ndarray,
    *,
    l0_mpp: float,
    config: TissueConfig = TissueConfig(),
) -> TissueMask:
    """Tissue mask of a slide thumbnail (method in the module docstring).

    Args:
        thumb_rgb: (H, W, 3) uint8 RGB thumbnail at ``config.thumb_mpp`` um/px (float in
            [0, 1] and RGBA are accepted too); pixels beyond the slide edge are white.
        l0_mpp: um/px of the slide's level 0; gives ``l0_per_px = thumb_mpp / l0_mpp``.
        config: detection settings.

    Returns:
        TissueMask with a bool (H, W) mask at ``config.thumb_mpp``.
    """
    if not isinstance(config, TissueConfig):
        raise TypeError(f"config must be a TissueConfig; got {type(config).__name__}")
    is_number = isinstance(l0_mpp, (int, float, np.integer, np.floating)) and not isinstance(l0_mpp, bool)
    if not (is_number and math.isfinite(l0_mpp) and l0_mpp > 0):
        raise ValueError(f"l0_mpp must be a positive number of um/px; got {l0_mpp!r}")
    rgb = _as_unit_rgb(thumb_rgb)
    mpp = float(config.thumb_mpp)

    val, sat = _value_saturation(rgb)
    ink = _ink_mask(rgb, sat, val, config)
    median_px = _odd_px(config.median_um, mpp)
    if median_px > 1:
        sat = filters.median(sat, footprint=np.ones((median_px, median_px), dtype=bool), mode="nearest")
    threshold = _saturation_threshold(sat[~ink], config)
    tissue = (sat > threshold) & ~ink

    closing_px = _radius_px(config.closing_um, mpp)
    if ink.any():
        grown_ink = morphology.dilation(ink, morphology.disk(closing_px)) if closing_px else ink
        tissue &= ~grown_ink
    if closing_px:
        tissue = morphology.closing(tissue, morphology.disk(closing_px), mode="ignore")
    opening_px = _radius_px(config.opening_um, mpp)
    if opening_px:
        tissue = morphology.opening(tissue, morphology.disk(opening_px), mode="ignore")

    px_area_um2 = mpp * mpp
    max_object_px = _max_size_below(config.min_object_um2 / px_area_um2)
    if max_object_px:
        tissue = morphology.remove_small_objects(tissue, max_size=max_object_px, connectivity=2)
    max_hole_px = _max_size_below(config.min_hole_um2 / px_area_um2)
    if max_hole_px:
        tissue = morphology.remove_small_holes(tissue, max_size=max_hole_px, connectivity=1)

    tissue = np.ascontiguousarray(tissue, dtype=bool)
    tissue.flags.writeable = False
    pen_fraction = float(np.count_nonzero(ink)) / ink.size
    logger.debug(
        "tissue: threshold %.3f, %d px (%.2f mm2), ink fraction %.4f",
        threshold, int(tissue.sum()), tissue.sum() * px_area_um2 / 1e6, pen_fraction,
    )
    return TissueMask(
        mask=tissue,
        thumb_mpp=mpp,
        l0_per_px=mpp / float(l0_mpp),
        threshold=threshold,
        pen_fraction=pen_fraction,
    )


def _square_ring(contour_rc: np.ndarray) -> np.ndarray:
    """Midpoint contour of a padded bool mask -> ring along pixel edges, (row, col), open.

    ``find_contours(level=0.5)`` on a 0/1 image puts every vertex at the midpoint of a
    pixel edge and cuts each corner diagonally. A diagonal step always crosses one
    marching-squares cell, whose centre is the pixel corner being cut; inserting it makes
    the ring follow pixel edges exactly. Collinear vertices are then dropped.
    """
    ring = np.round(contour_rc * 2.0) / 2.0
    if len(ring) > 1 and np.array_equal(ring[0], ring[-1]):
        ring = ring[:-1]
    nxt = np.roll(ring, -1, axis=0)
    step = nxt - ring
    diagonal = (step[:, 0] != 0) & (step[:, 1] != 0)
    if diagonal.any():
        half = (ring * 2.0) % 2.0 == 1.0  # coordinate lies on a pixel edge line
        corner = np.where(half, ring, nxt)[diagonal]
        n_before = np.cumsum(diagonal) - diagonal
        pos = np.arange(len(ring)) + n_before
        out = np.empty((len(ring) + int(diagonal.sum()), 2))
        out[pos] = ring
        out[pos[diagonal] + 1] = corner
        ring = out
    prev = np.roll(ring, 1, axis=0)
    nxt = np.roll(ring, -1, axis=0)
    a, b = ring - prev, nxt - ring
    turn = a[:, 0] * b[:, 1] - a[:, 1] * b[:, 0]
    return ring[turn != 0]


def mask_to_polygons(mask: np.ndarray, *, scale: float = 1.0) -> MultiPolygon:
    """Outline of a bool mask as a MultiPolygon whose edges follow pixel edges, scaled.

    Pixel ``[r, c]`` is the square ``[c, c+1] x [r, r+1]`` in (x, y) before scaling, so the
    polygon area equals ``mask.sum() * scale**2`` and a single pixel's centroid is
    ``((c + 0.5) * scale, (r + 0.5) * scale)``. Holes are kept, islands inside holes are
    separate polygons. Foreground touching only diagonally forms separate polygons that
    meet at a point. Built from :func:`skimage.measure.find_contours` (level 0.5 on the
    zero-padded mask) with the cut corners restored, then :func:`shapely.make_valid`.

    Args:
        mask: bool (H, W) (nonzero = True).
        scale: size of one mask pixel in the output frame (e.g. level-0 px per mask px).

    Returns:
        MultiPolygon of the polygonal parts; empty when the mask has no True pixel.

    Example:
        >>> m = np.zeros((4, 4), bool); m[1, 2] = True
        >>> mp = mask_to_polygons(m, scale=10.0)
        >>> mp.area, mp.centroid.x, mp.centroid.y
        (100.0, 25.0, 15.0)
    """
    m = np.asarray(mask)
    if m.ndim != 2:
        raise ValueError(f"mask must be 2-D (H, W); got shape {m.shape}")
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"scale must be a positive number; got {scale!r}")
    m = m.astype(bool)
    if not m.any():
        return MultiPolygon()

    padded = np.pad(m, 1).astype(np.float64)
    shells: list[np.ndarray] = []
    holes: list[np.ndarray] = []
    for contour in measure.find_contours(padded, 0.5):
        ring = _square_ring(contour)
        if len(ring) < 3:
            continue
        # padded (row, col) -> (x, y) of the unpadded mask: pixel centre (r+1, c+1) -> (c+.5, r+.5)
        xy = np.column_stack([ring[:, 1] - 0.5, ring[:, 0] - 0.5]) * float(scale)
        x, y = xy[:, 0], xy[:, 1]
        signed_area = 0.5 * float(np.dot(x, np.roll(y, -1)) - np.dot(np.roll(x, -1), y))
        # find_contours keeps low values on the left of the contour; with x = col, y = row
        # (y down) outlines of foreground have positive shoelace area, holes negative.
        (shells if signed_area > 0 else holes).append(xy)

    shell_polys = [Polygon(s) for s in shells]
    hole_lists: list[list[np.ndarray]] = [[] for _ in shells]
    if holes:
        hole_polys = [Polygon(h) for h in holes]
        tree = shapely.STRtree(shell_polys)
        hole_idx, shell_idx = tree.query(hole_polys, predicate="covered_by")
        areas = shapely.area(shell_polys)
        parent: dict[int, int] = {}
        for h, s in zip(hole_idx.tolist(), shell_idx.tolist()):
            if h not in parent or areas[s] < areas[parent[h]]:
                parent[h] = s
        for h, s in parent.items():
            hole_lists[s].append(holes[h])
    polys = [Polygon(s, hole_lists[i]) for i, s in enumerate(shells)]

    return MultiPolygon(_polygonal_parts(shapely.make_valid(MultiPolygon(polys))))


def _polygonal_parts(geom: shapely.Geometry) -> list[Polygon]:
    """Non-empty Polygons of a geometry, collections flattened, lines and points dropped."""
    if geom.geom_type == "Polygon":
        return [] if geom.is_empty else [geom]
    if geom.geom_type in ("MultiPolygon", "GeometryCollection"):
        return [p for part in shapely.get_parts(geom) for p in _polygonal_parts(part)]
    return []
