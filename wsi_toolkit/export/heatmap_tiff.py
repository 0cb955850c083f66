"""The heatmap as a tiled pyramidal TIFF that overlays the slide at its physical scale.

Layout
------
- One channel, uint8 ``round(prob * 255)`` (photometric ``minisblack``); 0 also where no
  prediction was made (outside tissue).
- Tiled (``tile`` x ``tile``), deflate (zlib) compression with horizontal predictor: lossless,
  so pixel values read back exactly, and a codec OpenSlide 4's generic-TIFF driver (libtiff)
  and tifffile both decode. OpenSlide 4.0 opens single-channel tiled deflate TIFFs directly
  (checked: grayscale is read as grey RGBA), so no RGB replication is needed.
- Pyramid: level 0 is the heatmap itself (one pixel per grid cell); each further level halves
  the previous one (sizes rounded up) until the longer side is at most ``tile``. Reduced levels
  are TIFF pages with ``NewSubfileType = 1``. A reduced pixel is the mean of the *predicted*
  pixels of its 2x2 block (0 when none is predicted), so probabilities at the tissue border are
  not diluted by the glass around them.
- Resolution tags in centimetres: ``1e4 / (heatmap.mpp * 2**level)`` px/cm, so OpenSlide
  reports ``openslide.mpp-x == heatmap.mpp`` and viewers (QuPath, ASAP) overlay it on the slide
  at the same physical scale, origin at the slide's top-left.
- ImageDescription (level 0): JSON with ``content`` ("tumour probability x 255"), ``scale``
  (255) and the heatmap geometry (:meth:`Heatmap.geometry`).

``uncertainty.tif`` (``wsi-infer --tta``) is written by the same function, so it has the same
levels, tiles, resolution tags and predicted-cell handling as ``heatmap.tif``: its cells hold the
standard deviation of the tumour probability over the TTA views x 255 (at most 0.5 x 255), and its
``content`` is :data:`UNCERTAINTY_TIFF_CONTENT`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from wsi_toolkit.atomic import atomic_path
from wsi_toolkit.errors import ConfigError, SlideFormatError
from wsi_toolkit.heatmap import Heatmap

__all__ = ["write_heatmap_tiff", "read_heatmap_tiff", "heatmap_pyramid", "HEATMAP_TIFF_CONTENT",
           "UNCERTAINTY_TIFF_CONTENT"]

HEATMAP_TIFF_CONTENT = "tumour probability x 255"
#: ``content`` of ``uncertainty.tif``: the spread of the test-time-augmentation views.
UNCERTAINTY_TIFF_CONTENT = "tumour probability standard deviation over TTA views x 255"


def _to_uint8(prob: np.ndarray) -> np.ndarray:
    return np.rint(np.clip(prob.astype(np.float64), 0.0, 1.0) * 255.0).astype(np.uint8)


def _halve(prob: np.ndarray, weight: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """2x2 weighted mean (weights = predicted counts), sizes rounded up."""
    h, w = prob.shape
    ph, pw = (-h) % 2, (-w) % 2
    p = np.pad(prob * weight, ((0, ph), (0, pw)))
    wt = np.pad(weight, ((0, ph), (0, pw)))
    p_sum = p.reshape(p.shape[0] // 2, 2, p.shape[1] // 2, 2).sum(axis=(1, 3))
    w_sum = wt.reshape(wt.shape[0] // 2, 2, wt.shape[1] // 2, 2).sum(axis=(1, 3))
    out = np.zeros_like(p_sum)
    np.divide(p_sum, w_sum, out=out, where=w_sum > 0)
    return out, w_sum


def heatmap_pyramid(heatmap: Heatmap, *, tile: int = 256) -> list[np.ndarray]:
    """uint8 levels of the heatmap TIFF: level 0 = ``round(prob * 255)``, then halving.

    Levels continue until the longer side is at most ``tile``.
    """
    prob = heatmap.prob.astype(np.float64)
    weight = heatmap.predicted.astype(np.float64)
    levels = [_to_uint8(prob)]
    while max(prob.shape) > tile:
        prob, weight = _halve(prob, weight)
        levels.append(_to_uint8(prob))
    return levels


def write_heatmap_tiff(path: str | os.PathLike[str], heatmap: Heatmap, *, tile: int = 256,
                       content: str = HEATMAP_TIFF_CONTENT) -> list[tuple[int, int]]:
    """Write ``heatmap`` as a tiled pyramidal TIFF (layout in the module docstring), atomically.

    Parameters
    ----------
    path : str or os.PathLike
        Output ``.tif``; its folder must exist.
    heatmap : Heatmap
    tile : int
        Tile side in px, a positive multiple of 16 (TIFF requirement); also the size below
        which no further level is made.
    content : str
        What the values are, written to the ImageDescription (:data:`HEATMAP_TIFF_CONTENT`, or
        :data:`UNCERTAINTY_TIFF_CONTENT` for the uncertainty map).

    Returns
    -------
    list of (width, height)
        Size of each level.
    """
    import tifffile

    if not isinstance(tile, (int, np.integer)) or tile <= 0 or tile % 16:
        raise ConfigError(f"tile must be a positive multiple of 16 px; got {tile!r}")
    if not isinstance(heatmap, Heatmap):
        raise TypeError(f"heatmap must be a Heatmap; got {type(heatmap).__name__}")
    levels = heatmap_pyramid(heatmap, tile=int(tile))
    description = json.dumps({"content": content, "scale": 255, **heatmap.geometry()})
    with atomic_path(Path(path)) as tmp:
        with tifffile.TiffWriter(tmp) as tw:
            for level, data in enumerate(levels):
                ppcm = 1e4 / (heatmap.mpp * 2**level)
                tw.write(
                    data,
                    photometric="minisblack",
                    tile=(int(tile), int(tile)),
                    compression="zlib",
                    predictor=True,
                    resolution=(ppcm, ppcm),
                    resolutionunit="CENTIMETER",
                    subfiletype=0 if level == 0 else 1,
                    description=description if level == 0 else None,
                    metadata=None,
                )
    return [(int(a.shape[1]), int(a.shape[0])) for a in levels]


def read_heatmap_tiff(path: str | os.PathLike[str], *, content: str = HEATMAP_TIFF_CONTENT) -> Heatmap:
    """Read a heatmap TIFF written by :func:`write_heatmap_tiff` back into a :class:`Heatmap`.

    ``prob`` is level 0 / 255 (exact to 1/255), placed by the geometry in the ImageDescription.
    The TIFF keeps no separate prediction mask, so ``predicted`` is the non-zero cells (a
    predicted cell of probability < 0.5/255 reads as not predicted). Raises
    :class:`~wsi_toolkit.errors.SlideFormatError` naming the file when it is not such a TIFF (or its
    ``content`` is not ``content``: :data:`UNCERTAINTY_TIFF_CONTENT` reads ``uncertainty.tif``).
    """
    import tifffile

    path = Path(path)
    try:
        with tifffile.TiffFile(path) as tif:
            page = tif.pages.first
            meta = json.loads(page.description or "null")
            if not isinstance(meta, dict) or meta.get("content") != content:
                raise SlideFormatError(f"{path}: not a wsi-toolkit heatmap TIFF (its ImageDescription lacks "
                                       f"content {content!r}); pass a heatmap.tif written by wsi-infer")
            data = page.asarray()
    except (OSError, ValueError, tifffile.TiffFileError) as exc:
        raise SlideFormatError(f"{path}: cannot be read as a heatmap TIFF ({exc}); pass a heatmap.tif written "
                               "by wsi-infer") from None
    if data.ndim != 2 or list(data.shape) != list(meta.get("shape_rc", [])):
        raise SlideFormatError(f"{path}: level 0 is {data.shape} but its description says {meta.get('shape_rc')}")
    prob = data.astype(np.float32) / float(meta.get("scale", 255))
    try:
        return Heatmap(prob=prob, predicted=data > 0, cell_l0=meta["cell_l0"], l0_mpp=meta["l0_mpp"],
                       merge=str(meta.get("merge", "centre")))
    except (KeyError, ConfigError) as exc:
        raise SlideFormatError(f"{path}: its description has no valid heatmap geometry ({exc})") from None
