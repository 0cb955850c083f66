"""Overlay picture: slide thumbnail + colour-mapped heatmap, tissue outline, legend, title.

Geometry
--------
Thumbnail pixel ``[r, c]`` covers level-0 ``[c*k, (c+1)*k) x [r*k, (r+1)*k)`` with
``k = thumb_l0_per_px`` (as :class:`wsi_toolkit.tissue.TissueMask` and the slide readers use).
The heatmap is resampled to the picture's pixels *by geometry*, never by image size: the
picture pixel whose centre is at level-0 ``((c + 0.5) * k, (r + 0.5) * k)`` shows heatmap cell
``(floor(y / cell_l0), floor(x / cell_l0))``. Only predicted cells are coloured.
Thumbnails narrower than ``min_width`` (1000 px) are first enlarged by an integer factor ``s``
(nearest neighbour), and the heatmap is sampled at the enlarged pixels (``k / s``), so cell
edges stay sharp.

Colour map
----------
:data:`INFERNO_LUT`, 256 entries: matplotlib's perceptually uniform "inferno" (black -> purple ->
red -> orange -> pale yellow; readable in greyscale and by colour-blind viewers, and absent from
H&E's pink/purple at the top end): matplotlib's map at 17 evenly spaced indices (as uint8), linearly
interpolated in between (within 7/255 of the full map; the same table, to the bit, as before).

Picture layout (top to bottom)
------------------------------
1. Title bar, :data:`TITLE_BAR_PX` high: the title on the left, heatmap scale and merge on the right.
2. The map panel: the (enlarged) thumbnail with the heatmap alpha-blended, the tissue outline
   (green) and, with ``threshold``, tumour-region outlines (cyan); its top-left is picture
   pixel ``(0, TITLE_BAR_PX)``.
3. The legend strip, :data:`LEGEND_PX` high: a colour bar 0..1 with tick labels (and the
   threshold marked), and keys for the outlines.

With an uncertainty map (``wsi-infer --tta``) a second panel of the same size stands right of the
map panel (its top-left at picture pixel ``(panel width, TITLE_BAR_PX)``): the thumbnail with the
standard deviation of the views blended in :data:`VIRIDIS_LUT` over 0..:data:`UNCERTAINTY_MAX` (the
largest standard deviation of values in [0, 1]), the tissue outline and the same tumour-region
outlines; its colour bar is in the legend strip under it. Without one the picture is as before.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import shapely
from PIL import Image, ImageDraw, ImageFont

from wsi_toolkit.atomic import atomic_path
from wsi_toolkit.errors import ConfigError
from wsi_toolkit.geometry import polygonal_parts
from wsi_toolkit.heatmap import Heatmap
from wsi_toolkit.limits import check_fraction, check_number

__all__ = [
    "INFERNO_LUT",
    "VIRIDIS_LUT",
    "UNCERTAINTY_MAX",
    "TITLE_BAR_PX",
    "LEGEND_PX",
    "colormap",
    "heatmap_on_grid",
    "blend_heatmap",
    "render_overlay",
]

def _build_lut(name: str = "inferno") -> np.ndarray:
    from matplotlib import colormaps

    anchors = np.rint(np.linspace(0, 255, 17)).astype(np.intp)  # 0, 16, ..., 128, 143, ..., 239, 255
    anchor_rgb = np.rint(colormaps[name](anchors)[:, :3] * 255.0)
    idx = np.arange(256, dtype=np.float64)
    lut = np.stack([np.interp(idx, anchors, anchor_rgb[:, ch]) for ch in range(3)], axis=1)
    lut = np.rint(lut).astype(np.uint8)
    lut.flags.writeable = False
    return lut


#: uint8 (256, 3): the colour of probability ``i / 255``.
INFERNO_LUT: np.ndarray = _build_lut()
#: uint8 (256, 3): the colour of uncertainty ``i / 255 * UNCERTAINTY_MAX`` (matplotlib's "viridis",
#: built like :data:`INFERNO_LUT`), so the uncertainty panel is not read as probability.
VIRIDIS_LUT: np.ndarray = _build_lut("viridis")
#: The top of the uncertainty colour scale: the largest standard deviation of values in [0, 1].
UNCERTAINTY_MAX = 0.5

#: Height in px of the title bar at the top of the picture.
TITLE_BAR_PX = 40
#: Height in px of the legend strip at the bottom of the picture.
LEGEND_PX = 72

_TITLE_BG = (32, 32, 32)
_TITLE_FG = (255, 255, 255)
_LEGEND_BG = (255, 255, 255)
_LEGEND_FG = (0, 0, 0)
_TISSUE_RGB = (0, 200, 0)
_TUMOR_RGB = (0, 255, 255)
_BAR_PX = 512  # colour bar length: each LUT entry spans 2 px
_BAR_X0 = 16


def colormap(values01: np.ndarray, lut: np.ndarray = INFERNO_LUT) -> np.ndarray:
    """Colours of values in [0, 1]: uint8 ``(*values.shape, 3)`` from ``lut`` (:data:`INFERNO_LUT`).

    Value ``v`` gets entry ``round(v * 255)``; values are clipped to [0, 1]; NaN maps to 0.
    """
    v = np.nan_to_num(np.asarray(values01, dtype=np.float64), nan=0.0)
    idx = np.rint(np.clip(v, 0.0, 1.0) * 255.0).astype(np.intp)
    return lut[idx]


def heatmap_on_grid(heatmap: Heatmap, shape_rc: tuple[int, int], l0_per_px: float) -> tuple[np.ndarray, np.ndarray]:
    """Sample the heatmap at the pixel centres of an image of ``shape_rc`` with ``l0_per_px``.

    Image pixel ``[r, c]`` (centre at level-0 ``((c+0.5)*k, (r+0.5)*k)``) takes cell
    ``floor(centre / cell_l0)``; pixels beyond the heatmap are not predicted.

    Returns
    -------
    prob : float32 (H, W); predicted : bool (H, W)
    """
    h, w = (int(v) for v in shape_rc)
    n_rows, n_cols = heatmap.shape_rc
    cell_rows = np.floor((np.arange(h) + 0.5) * l0_per_px / heatmap.cell_l0).astype(np.intp)
    cell_cols = np.floor((np.arange(w) + 0.5) * l0_per_px / heatmap.cell_l0).astype(np.intp)
    ok_r = cell_rows < n_rows
    ok_c = cell_cols < n_cols
    rows = np.minimum(cell_rows, n_rows - 1)
    cols = np.minimum(cell_cols, n_cols - 1)
    prob = heatmap.prob[np.ix_(rows, cols)]
    predicted = heatmap.predicted[np.ix_(rows, cols)] & ok_r[:, None] & ok_c[None, :]
    return np.where(predicted, prob, np.float32(0)), predicted


def _as_rgb_uint8(thumb_rgb: np.ndarray) -> np.ndarray:
    arr = np.asarray(thumb_rgb)
    if arr.ndim != 3 or arr.shape[2] not in (3, 4) or arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ConfigError(f"thumb_rgb must be an RGB image (H, W, 3) (or RGBA); got shape {arr.shape}")
    if arr.dtype != np.uint8:
        raise ConfigError(f"thumb_rgb must be uint8; got dtype {arr.dtype}")
    return np.ascontiguousarray(arr[..., :3])


def blend_heatmap(
    thumb_rgb: np.ndarray,
    thumb_l0_per_px: float,
    heatmap: Heatmap,
    *,
    alpha: float = 0.5,
    min_width: int = 1000,
    lut: np.ndarray = INFERNO_LUT,
    scale_max: float = 1.0,
) -> tuple[np.ndarray, float]:
    """The map panel without outlines: thumbnail enlarged to ``>= min_width`` px, heatmap blended.

    ``lut``, ``scale_max``: cell value ``v`` takes ``lut``'s colour of ``v / scale_max`` (the
    uncertainty panel: :data:`VIRIDIS_LUT`, :data:`UNCERTAINTY_MAX`).

    Returns
    -------
    panel : uint8 (H * s, W * s, 3)
        ``round((1 - alpha) * thumb + alpha * colour)`` on predicted cells, the thumbnail elsewhere.
    panel_l0_per_px : float
        Level-0 px per panel px (``thumb_l0_per_px / s``).
    """
    thumb = _as_rgb_uint8(thumb_rgb)
    thumb_l0_per_px = check_number(thumb_l0_per_px, "thumb_l0_per_px", positive=True)
    alpha = check_fraction(alpha, "alpha")
    scale = max(1, math.ceil(min_width / thumb.shape[1]))
    if scale > 1:
        thumb = np.repeat(np.repeat(thumb, scale, axis=0), scale, axis=1)
    panel_l0_per_px = thumb_l0_per_px / scale
    prob, predicted = heatmap_on_grid(heatmap, thumb.shape[:2], panel_l0_per_px)
    panel = thumb.copy()
    if predicted.any():
        colours = colormap(prob[predicted] / scale_max, lut).astype(np.float64)
        base = thumb[predicted].astype(np.float64)
        panel[predicted] = np.rint((1.0 - alpha) * base + alpha * colours).astype(np.uint8)
    return panel, panel_l0_per_px


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: bitmap font only
        return ImageFont.load_default()


def _polygons(geoms) -> list[shapely.Polygon]:
    if geoms is None:
        return []
    if isinstance(geoms, shapely.Geometry):
        geoms = [geoms]
    out: list[shapely.Polygon] = []
    for g in geoms:
        g = getattr(g, "polygon_l0", g)  # TumorRegion
        out.extend(polygonal_parts(g))
    return out


def _draw_outlines(draw: ImageDraw.ImageDraw, polygons: Iterable[shapely.Polygon], *, l0_per_px: float,
                   y0: int, colour: tuple[int, int, int], width: int) -> None:
    for poly in polygons:
        for ring in (poly.exterior, *poly.interiors):
            xy = np.asarray(ring.coords, dtype=np.float64) / l0_per_px - 0.5  # pixel-centre frame
            xy[:, 1] += y0
            draw.line([tuple(p) for p in xy.tolist()], fill=colour, width=width, joint="curve")


def _draw_legend(draw: ImageDraw.ImageDraw, img: Image.Image, *, top: int, width: int,
                 threshold: float | None, tissue: bool, line_px: int) -> None:
    font = _font(13)
    bar_top, bar_h = top + 14, 16
    draw.text((_BAR_X0 + _BAR_PX + 10, bar_top), "tumour probability", fill=_LEGEND_FG, font=font)
    bar = np.repeat(INFERNO_LUT[np.arange(_BAR_PX) * 256 // _BAR_PX][None], bar_h, axis=0)
    img.paste(Image.fromarray(np.ascontiguousarray(bar), "RGB"), (_BAR_X0, bar_top))
    for tick in (0.0, 0.25, 0.5, 0.75, 1.0):
        x = _BAR_X0 + min(round(tick * _BAR_PX), _BAR_PX - 1)
        draw.line([(x, bar_top + bar_h), (x, bar_top + bar_h + 4)], fill=_LEGEND_FG, width=1)
        label = f"{tick:g}"
        tw = draw.textlength(label, font=font)
        draw.text((x - tw / 2, bar_top + bar_h + 6), label, fill=_LEGEND_FG, font=font)
    if threshold is not None:
        x = _BAR_X0 + min(round(threshold * _BAR_PX), _BAR_PX - 1)
        draw.polygon([(x - 4, bar_top - 7), (x + 4, bar_top - 7), (x, bar_top - 1)], fill=_LEGEND_FG)
    kx = _BAR_X0 + _BAR_PX + 10 + round(draw.textlength("tumour probability", font=font)) + 40
    keys: list[tuple[tuple[int, int, int] | None, str]] = []
    if tissue:
        keys.append((_TISSUE_RGB, "tissue outline"))
    if threshold is not None:
        keys.append((_TUMOR_RGB, f"tumour region (p >= {threshold:g})"))
    keys.append((None, "no colour = not predicted"))
    for i, (colour, label) in enumerate(keys):
        y = top + 10 + 20 * i
        if kx + 40 > width:
            break
        if colour is not None:
            draw.line([(kx, y + 7), (kx + 28, y + 7)], fill=colour, width=max(2, line_px))
        draw.text((kx + 36, y), label, fill=_LEGEND_FG, font=font)


def _draw_uncertainty_legend(draw: ImageDraw.ImageDraw, img: Image.Image, *, top: int, x0: int,
                             over: str = "TTA views") -> None:
    """The uncertainty panel's colour bar: 0..UNCERTAINTY_MAX in :data:`VIRIDIS_LUT`."""
    font = _font(13)
    bar_top, bar_h = top + 14, 16
    bar = np.repeat(VIRIDIS_LUT[np.arange(_BAR_PX) * 256 // _BAR_PX][None], bar_h, axis=0)
    img.paste(Image.fromarray(np.ascontiguousarray(bar), "RGB"), (x0, bar_top))
    draw.text((x0 + _BAR_PX + 10, bar_top), f"uncertainty: std of tumour probability over {over}", fill=_LEGEND_FG,
              font=font)
    for tick in (0.0, 0.1, 0.2, 0.3, 0.4, 0.5):
        x = x0 + min(round(tick / UNCERTAINTY_MAX * _BAR_PX), _BAR_PX - 1)
        draw.line([(x, bar_top + bar_h), (x, bar_top + bar_h + 4)], fill=_LEGEND_FG, width=1)
        label = f"{tick:g}"
        tw = draw.textlength(label, font=font)
        draw.text((x - tw / 2, bar_top + bar_h + 6), label, fill=_LEGEND_FG, font=font)


def render_overlay(
    thumb_rgb: np.ndarray,
    thumb_l0_per_px: float,
    heatmap: Heatmap,
    *,
    tissue_polygons_l0=None,
    alpha: float = 0.5,
    title: str = "",
    threshold: float | None = None,
    path: str | os.PathLike[str] | None = None,
    min_width: int = 1000,
    uncertainty: Heatmap | None = None,
    uncertainty_over: str = "TTA views",
) -> np.ndarray:
    """Render the overlay picture (layout in the module docstring); write it as PNG if ``path``.

    Parameters
    ----------
    thumb_rgb : uint8 (H, W, 3)
        Slide thumbnail; pixel ``[r, c]`` covers level-0 ``[c*k, (c+1)*k) x [r*k, (r+1)*k)``.
    thumb_l0_per_px : float
        ``k``, level-0 px per thumbnail px.
    heatmap : Heatmap
    tissue_polygons_l0 : shapely geometry or iterable of them, optional
        Tissue outline in level-0 px (e.g. ``TissueMask.polygons()``), drawn green.
    alpha : float
        Opacity of the heatmap colours over the thumbnail, 0..1.
    title : str
        Text of the title bar (e.g. the slide name).
    threshold : float, optional
        Draw the outlines of :func:`~wsi_toolkit.export.regions.tumor_regions` at this
        probability (cyan) and mark it on the colour bar.
    path : str or os.PathLike, optional
        PNG to write (atomically).
    min_width : int
        Thumbnails narrower than this are enlarged by an integer factor (nearest).
    uncertainty : Heatmap, optional
        The uncertainty map (TTA views' standard deviation) on the heatmap's cells: drawn as a
        second panel right of the first (module docstring).
    uncertainty_over : str
        What the spread is over, for its legend (``"TTA views"``, ``"8 MC-dropout samples"``).

    Returns
    -------
    uint8 (TITLE_BAR_PX + panel height + LEGEND_PX, panel width (x 2 with ``uncertainty``), 3): the picture.
    """
    if threshold is not None:
        check_fraction(threshold, "threshold")
    panel, panel_l0_per_px = blend_heatmap(thumb_rgb, thumb_l0_per_px, heatmap, alpha=alpha, min_width=min_width)
    ph, pw = panel.shape[:2]
    panels = [panel]
    if uncertainty is not None:
        panels.append(blend_heatmap(thumb_rgb, thumb_l0_per_px, uncertainty, alpha=alpha, min_width=min_width,
                                    lut=VIRIDIS_LUT, scale_max=UNCERTAINTY_MAX)[0])
    width = pw * len(panels)
    img = Image.new("RGB", (width, TITLE_BAR_PX + ph + LEGEND_PX), _LEGEND_BG)
    for i, p in enumerate(panels):
        img.paste(Image.fromarray(p, "RGB"), (i * pw, TITLE_BAR_PX))
    draw = ImageDraw.Draw(img)
    line_px = max(1, round(pw / 600))

    tissue = _polygons(tissue_polygons_l0)
    regions = []
    if threshold is not None:
        from wsi_toolkit.export.regions import tumor_regions

        regions = _polygons(tumor_regions(heatmap, threshold=threshold))
    for i in range(len(panels)):
        # Outlines are clipped to their own panel: each panel drawn on its own layer, then pasted.
        layer = img.crop((i * pw, 0, (i + 1) * pw, img.height)) if len(panels) > 1 else img
        layer_draw = ImageDraw.Draw(layer) if len(panels) > 1 else draw
        _draw_outlines(layer_draw, tissue, l0_per_px=panel_l0_per_px, y0=TITLE_BAR_PX, colour=_TISSUE_RGB,
                       width=line_px)
        _draw_outlines(layer_draw, regions, l0_per_px=panel_l0_per_px, y0=TITLE_BAR_PX, colour=_TUMOR_RGB,
                       width=line_px + 1)
        if layer is not img:
            img.paste(layer, (i * pw, 0))
    # Outlines may overflow into the bars: draw the bars last.
    draw.rectangle([(0, 0), (width - 1, TITLE_BAR_PX - 1)], fill=_TITLE_BG)
    draw.rectangle([(0, TITLE_BAR_PX + ph), (width - 1, TITLE_BAR_PX + ph + LEGEND_PX - 1)], fill=_LEGEND_BG)
    title_font = _font(20)
    draw.text((10, (TITLE_BAR_PX - 20) // 2), title, fill=_TITLE_FG, font=title_font)
    info = f"heatmap {heatmap.mpp:.2f} um/px, {heatmap.merge} merge"
    info_font = _font(14)
    draw.text((width - 10 - draw.textlength(info, font=info_font), (TITLE_BAR_PX - 14) // 2), info,
              fill=_TITLE_FG, font=info_font)
    _draw_legend(draw, img, top=TITLE_BAR_PX + ph, width=pw, threshold=threshold, tissue=bool(tissue),
                 line_px=line_px)
    if uncertainty is not None:
        _draw_uncertainty_legend(draw, img, top=TITLE_BAR_PX + ph, x0=pw + _BAR_X0, over=uncertainty_over)

    out = np.asarray(img, dtype=np.uint8).copy()
    if path is not None:
        with atomic_path(Path(path)) as tmp:
            img.save(tmp, format="PNG")
    return out
