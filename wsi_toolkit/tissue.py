"""Tissue detection on a low-resolution RGB thumbnail.

Pure array functions: the caller reads the thumbnail (at ``TissueConfig.thumb_mpp``) and
passes it in; nothing here touches a file.

Frames and units
----------------
- The thumbnail and the mask are indexed ``[row, col]`` at ``thumb_mpp`` um/px.
- ``k = thumb_mpp / l0_mpp`` is the number of level-0 pixels per thumbnail pixel
  (``TissueMask.l0_per_px``). Thumbnail pixel ``[r, c]`` covers the level-0 pixels
  ``[c*k, (c+1)*k) x [r*k, (r+1)*k)`` (x by y). Pixels beyond the slide edge are white.
- Polygons are ``(x, y)`` in level-0 pixels (:func:`wsi_toolkit.geometry.mask_to_polygons`).

Method of :func:`detect_tissue`
-------------------------------
1. HSV as :func:`skimage.color.rgb2hsv` defines it, the hue only for saturated pixels.
2. Ink (only when ``suppress_pen``): ``value < min_value`` (black ink, debris), or
   ``saturation >= pen_min_saturation`` with hue in ``blue_pen_hue`` or ``green_pen_hue``.
   The blue window stops at 245 degrees: haematoxylin is blue-purple (~250-300) and must not
   be taken for ink.
3. Saturation is median-filtered (``median_um``, an odd number of pixels >= 1).
4. Otsu's threshold on ``log(min(saturation, saturation_ceiling) + 0.01)`` of the non-ink
   pixels, clipped to ``[saturation_floor, saturation_ceiling]`` (on the log scale the widest
   gap is glass vs. the faintest tissue, not faint vs. dense tissue); the floor when the
   pixels are (nearly) all identical.
5. ``tissue = saturation > threshold and not ink``, minus ink dilated by ``closing_um``.
6. Closing (radius ``closing_um``) then opening (``opening_um``) with disks; objects smaller
   than ``min_object_um2`` removed (8-connected), holes smaller than ``min_hole_um2`` filled.

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
from shapely.geometry import MultiPolygon
from skimage import filters, morphology

from wsi_toolkit.errors import ConfigError
from wsi_toolkit.geometry import mask_to_polygons
from wsi_toolkit.limits import check_number

__all__ = ["TissueConfig", "TissueMask", "detect_tissue", "mask_to_polygons"]

logger = logging.getLogger(__name__)

# Otsu runs on log(saturation + offset); the offset keeps exact-grey pixels finite and
# squeezes the glass-noise range (saturation below ~0.01 is noise) into one mode.
_LOG_SAT_OFFSET = 0.01
# Saturation spread below which the thumbnail is treated as uniform (threshold = floor).
_UNIFORM_SAT_SPREAD = 1e-3


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
        check_number(self.thumb_mpp, "TissueConfig.thumb_mpp", positive=True)
        bounds = {"saturation_floor": (0.0, 1.0), "saturation_ceiling": (0.0, 1.0), "median_um": (0.0, math.inf),
                  "closing_um": (0.0, math.inf), "opening_um": (0.0, math.inf), "min_object_um2": (0.0, math.inf),
                  "min_hole_um2": (0.0, math.inf), "min_value": (0.0, 1.0), "pen_min_saturation": (0.0, 1.0)}
        for name, (lo, hi) in bounds.items():
            check_number(getattr(self, name), f"TissueConfig.{name}", bounds=(lo, hi))
        if self.saturation_floor > self.saturation_ceiling:
            raise ConfigError(
                f"TissueConfig.saturation_floor ({self.saturation_floor!r}) must be <= "
                f"saturation_ceiling ({self.saturation_ceiling!r})"
            )
        if not isinstance(self.suppress_pen, (bool, np.bool_)):
            raise ConfigError(f"TissueConfig.suppress_pen must be True or False; got {self.suppress_pen!r}")
        for name in ("blue_pen_hue", "green_pen_hue"):
            window = getattr(self, name)
            try:
                lo, hi = window
            except (TypeError, ValueError):
                raise ConfigError(
                    f"TissueConfig.{name} must be a pair (low, high) of degrees in [0, 360]; got {window!r}"
                ) from None
            check_number(lo, f"TissueConfig.{name}[0]", bounds=(0.0, 360.0))
            check_number(hi, f"TissueConfig.{name}[1]", bounds=(0.0, 360.0))
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
    l0_mpp = check_number(l0_mpp, "l0_mpp", positive=True, unit="um/px")
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
