"""Ground truth of one slide: a mask TIFF or annotation file found by slide name, turned into an evaluation mask.

Annotations are looked up by the slide's stem (``<stem>.xml``, ``.geojson``, ``.json``,
``<stem>_mask.tif``, a single-channel ``<stem>.tif``); a slide without one, or without tumour in it,
is a normal slide.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from wsi_toolkit.errors import AnnotationError, ConfigError, one_line
from wsi_toolkit.evaluate.mask import EVAL_LEVEL, EvaluationMask, evaluation_mask, evaluation_mask_from_tumor
from wsi_toolkit.limits import MAX_EVAL_MASK_PIXELS
from wsi_toolkit.slide._metadata import largest_series, mpp_from_tiff_tags

__all__ = ["CAMELYON16_L0_MPP", "ANNOTATION_PATTERNS", "read_mask_tiff", "find_annotation", "slide_truth",
           "check_eval_mask_size"]

log = logging.getLogger(__name__)

#: The level-0 um/px the challenge code hard-codes; used here only for detection CSVs of slides
#: whose resolution is known from nowhere else.
CAMELYON16_L0_MPP = 0.243


def read_mask_tiff(path: str | os.PathLike[str], *, l0_size: tuple[int, int] | None, l0_per_px: float,
                   tumor_value: int | None = None) -> tuple[np.ndarray, tuple[int, int], float | None]:
    """A Camelyon16-style mask TIFF as a boolean tumour mask on the evaluation grid.

    The mask is mapped onto the slide by its size: the level-0 extent of the slide
    (``l0_size``; the mask's own level-0 size when None) is what the mask covers. The coarsest
    pyramid level at least as fine as the evaluation grid is read (a single-level mask is read
    whole) and sampled at the evaluation pixel centres (nearest neighbour). RGB masks: the first
    channel (as the challenge code reads them).

    Parameters
    ----------
    l0_size : (int, int) or None
        Slide level-0 ``(width, height)`` px.
    l0_per_px : float
        Level-0 px per evaluation pixel (32).
    tumor_value : int or None
        Pixel value of tumour; None = any non-zero value.

    Returns
    -------
    (tumor_rc, l0_size, mask_l0_mpp)
        ``tumor_rc`` bool ``(ceil(h / k), ceil(w / k))``; the level-0 size used; the um/px of the
        mask's level 0 from its resolution tags (None without tags).
    """
    import tifffile

    path = Path(path)
    try:
        tif = tifffile.TiffFile(path)
    except (OSError, ValueError, tifffile.TiffFileError) as exc:
        raise AnnotationError(f"{path}: cannot read the mask TIFF ({one_line(exc)})") from None
    with tif:
        series = largest_series(tif)
        if series is None:
            raise AnnotationError(f"{path}: the mask TIFF holds no image")
        levels = list(series.levels)
        sizes = [(int(lv.keyframe.imagewidth), int(lv.keyframe.imagelength)) for lv in levels]
        tag_mpp = mpp_from_tiff_tags(levels[0].keyframe)
        mask_mpp = tag_mpp[0] if tag_mpp is not None else None
        if l0_size is None:
            l0_size = sizes[0]
        l0_w, l0_h = int(l0_size[0]), int(l0_size[1])
        m0_w, m0_h = sizes[0]
        if abs((l0_w / m0_w) / (l0_h / m0_h) - 1) > 0.02:
            raise AnnotationError(
                f"{path}: mask size {m0_w}x{m0_h} does not have the slide's aspect ({l0_w}x{l0_h}); "
                "is it the mask of another slide?")
        fine_enough = [i for i, (w, _) in enumerate(sizes) if w * l0_per_px >= l0_w - l0_per_px]
        if not fine_enough:
            log.warning("%s: even level 0 (%dx%d) is coarser than the evaluation grid; upsampled", path, m0_w, m0_h)
        i = max(fine_enough) if fine_enough else 0
        check_eval_mask_size((l0_w, l0_h), l0_per_px, where=str(path))
        lw, lh = sizes[i]
        if lw * lh > MAX_EVAL_MASK_PIXELS:
            raise AnnotationError(
                f"{path}: mask level {i} is {lw:,} x {lh:,} px and no coarser level is fine enough for the evaluation "
                f"grid; at most {MAX_EVAL_MASK_PIXELS:,} px are read, save the mask as a pyramid (levels down to "
                f"{l0_per_px:g}x)")
        try:
            arr = np.asarray(levels[i].asarray())
        except (ValueError, RuntimeError, tifffile.TiffFileError) as exc:
            raise AnnotationError(
                f"{path}: mask level {i} cannot be decoded ({one_line(exc)}); the mask TIFF is damaged") from None
    if arr.ndim == 3:
        arr = arr[..., 0]
    if arr.ndim != 2:
        raise AnnotationError(
            f"{path}: mask level {i} has shape {arr.shape}; expected (rows, cols) or (rows, cols, channels)")
    m_h, m_w = arr.shape
    e_h, e_w = max(1, math.ceil(l0_h / l0_per_px - 1e-9)), max(1, math.ceil(l0_w / l0_per_px - 1e-9))
    cols = np.minimum(np.floor((np.arange(e_w) + 0.5) * l0_per_px * m_w / l0_w).astype(np.int64), m_w - 1)
    rows = np.minimum(np.floor((np.arange(e_h) + 0.5) * l0_per_px * m_h / l0_h).astype(np.int64), m_h - 1)
    sampled = arr[np.ix_(rows, cols)]
    tumor = sampled != 0 if tumor_value is None else sampled == tumor_value
    if mask_mpp is not None:
        mask_mpp = mask_mpp * m0_w / l0_w  # um per slide level-0 px
    return tumor, (l0_w, l0_h), mask_mpp


ANNOTATION_PATTERNS = ("{}.xml", "{}.geojson", "{}.json", "{}_mask.tif", "{}_mask.tiff", "{}.tif", "{}.tiff")


def _is_single_channel_tiff(path: Path) -> bool:
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            return int(tif.pages.first.samplesperpixel) == 1
    except Exception:  # not a readable TIFF: let the reader report it if chosen
        return True


def find_annotation(index: Mapping[str, Path], stem: str, slide_path: Path | None) -> Path | None:
    """The annotation of slide ``stem`` in ``index`` (casefolded file name -> path), by
    :data:`ANNOTATION_PATTERNS` in order; a ``<stem>.tif`` that is the slide itself or RGB is skipped."""
    for pattern in ANNOTATION_PATTERNS:
        path = index.get(pattern.format(stem).casefold())
        if path is None:
            continue
        if pattern.startswith("{}.tif"):
            # A plain <stem>.tif next to the slides may be the slide itself, not its mask.
            if slide_path is not None and slide_path.exists() and path.resolve() == slide_path.resolve():
                continue
            if not _is_single_channel_tiff(path):
                log.info("%s: RGB TIFF, taken for a slide rather than a mask; not used as annotation", path)
                continue
        return path
    return None


def slide_truth(ann: Path | None, *, l0_size: tuple[int, int] | None, l0_mpp: float | None, level: int = EVAL_LEVEL,
                mpp: float | None = None, mask_value: int | None = None) -> tuple[bool, EvaluationMask | None, float]:
    """(is tumour slide, evaluation mask or None, level-0 um/px used) of the annotation file ``ann``.

    ``l0_size`` / ``l0_mpp``: the slide's, when known (heatmap results); ``level``, ``mpp``,
    ``mask_value``: the :class:`~wsi_toolkit.evaluate.EvalConfig` settings. Without a known size
    the mask covers the annotations (a detection beyond them is a false positive).
    """
    from wsi_toolkit.annotations import check_on_slide, read_asap_xml, read_geojson, tumor_region

    l0_per_px = float(2**level)
    if ann is None:
        return False, None, l0_mpp if l0_mpp is not None else (mpp or CAMELYON16_L0_MPP)
    suffix = ann.suffix.lower()
    if suffix in (".tif", ".tiff"):
        tumor_rc, l0_size, tag_mpp = read_mask_tiff(ann, l0_size=l0_size, l0_per_px=l0_per_px,
                                                     tumor_value=mask_value)
        if l0_mpp is None:
            l0_mpp = mpp or tag_mpp
            if l0_mpp is None:
                log.warning("%s: resolution unknown; level-0 %.3f um/px assumed (pass --mpp)", ann, CAMELYON16_L0_MPP)
                l0_mpp = CAMELYON16_L0_MPP
        if not tumor_rc.any():
            return False, None, l0_mpp
        return True, evaluation_mask_from_tumor(tumor_rc, eval_mpp=l0_per_px * l0_mpp, l0_per_px=l0_per_px), l0_mpp
    anns = read_asap_xml(ann) if suffix == ".xml" else read_geojson(ann)
    region = tumor_region(anns)
    if l0_mpp is None:
        l0_mpp = mpp
        if l0_mpp is None:
            l0_mpp = CAMELYON16_L0_MPP
            if not region.is_empty:
                log.warning("%s: slide resolution unknown; level-0 %.3f um/px assumed (pass --mpp)", ann, l0_mpp)
    if region.is_empty:
        return False, None, l0_mpp
    if l0_size is None:
        # Detections only, the slide's size unknown: the mask covers the annotations. A detection beyond
        # it is a false positive (label 0) whatever its coordinates; it never grows the mask.
        _, _, max_x, max_y = region.bounds
        l0_size = (int(math.floor(max_x)) + 1, int(math.floor(max_y)) + 1)
    else:
        check_on_slide(anns, l0_size, where=str(ann))
    check_eval_mask_size(l0_size, l0_per_px, where=str(ann))
    return True, evaluation_mask(region, l0_size=l0_size, l0_mpp=l0_mpp, level=level), l0_mpp


def check_eval_mask_size(l0_size: tuple[int, int], l0_per_px: float, *, where: str) -> None:
    """Raise :class:`ConfigError` when the evaluation mask of a slide this size would exceed
    :data:`~wsi_toolkit.limits.MAX_EVAL_MASK_PIXELS`."""
    rows, cols = (math.ceil(int(v) / l0_per_px) for v in (l0_size[1], l0_size[0]))
    if rows * cols > MAX_EVAL_MASK_PIXELS:
        raise ConfigError(
            f"{where}: the evaluation mask of a {int(l0_size[0]):,} x {int(l0_size[1]):,} px slide would be {cols:,} x "
            f"{rows:,} px, more than {MAX_EVAL_MASK_PIXELS:,} (a 130 mm slide at 0.08 um/px); the slide size or the "
            "annotation coordinates are not level-0 px")
