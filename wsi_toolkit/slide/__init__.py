"""Open whole-slide images and read them at true physical scale.

>>> from wsi_toolkit.slide import open_slide
>>> with open_slide("tumor_001.tif") as slide:             # doctest: +SKIP
...     patch = slide.read_at_mpp((10_000, 20_000), (96, 96), 0.972)   # PCam scale
...     thumb = slide.thumbnail(mpp=8.0)

Backends: OpenSlide first (every format it reads), then tifffile for tiled TIFF / OME-TIFF
OpenSlide refuses. Both sit behind :class:`SlideReader`.
"""

from __future__ import annotations

import logging
import math
import numbers
import os
from pathlib import Path
from typing import Literal

from wsi_toolkit.errors import ConfigError, MissingMppError, SlideFormatError, SlideNotFoundError
from wsi_toolkit.slide._metadata import check_tiff_integrity
from wsi_toolkit.slide._reader import BACKGROUND_RGB, LevelInfo, SlideReader

__all__ = ["open_slide", "SlideReader", "LevelInfo", "BACKGROUND_RGB", "SLIDE_SUFFIXES", "find_slides"]

log = logging.getLogger(__name__)

Backend = Literal["auto", "openslide", "tifffile"]

#: File suffixes taken as slides when a folder is given.
SLIDE_SUFFIXES = (".tif", ".tiff", ".svs", ".ndpi", ".mrxs", ".scn", ".vms", ".vmu", ".bif", ".svslide",
                  ".dcm")


def open_slide(path: str | os.PathLike, *, mpp: float | None = None, backend: Backend = "auto") -> SlideReader:
    """Open a whole-slide image.

    Parameters
    ----------
    path
        The slide file.
    mpp
        Micrometres per level-0 pixel. Overrides the metadata (``mpp_source == "override"``);
        required when the slide has none.
    backend
        ``"auto"`` tries OpenSlide, then tifffile. TIFF-based slides go to tifffile when OpenSlide
        would not read them pixel-exactly: OME-TIFF (pyramid in SubIFDs, which OpenSlide does not
        see) and pyramids whose level sizes are rounded (OpenSlide then maps coordinates through a
        non-integer downsample such as 3.99896 and interpolates a fraction of a pixel).

    Raises
    ------
    SlideNotFoundError
        ``path`` does not exist or is a folder.
    SlideFormatError
        Empty file, not a slide, or a layout no backend reads.
    SlideReadError
        The file is truncated or its data is damaged.
    MissingMppError
        No resolution metadata and no ``mpp`` given.
    """
    path = Path(path)
    if mpp is not None and not (isinstance(mpp, numbers.Real) and not isinstance(mpp, bool)
                                and math.isfinite(mpp) and mpp > 0):
        raise ConfigError(f"mpp override must be a positive number of micrometres per pixel; got {mpp!r}")
    if backend not in ("auto", "openslide", "tifffile"):
        raise ConfigError(f"backend must be 'auto', 'openslide' or 'tifffile'; got {backend!r}")
    if not path.exists():
        raise SlideNotFoundError(f"{path} does not exist; check the path")
    if path.is_dir():
        raise SlideNotFoundError(f"{path} is a folder, not a slide file; pass the slide file itself")
    if path.stat().st_size == 0:
        raise SlideFormatError(f"{path} is empty (0 bytes); copy or download the slide again")
    tiff_flavour = check_tiff_integrity(path)
    if backend == "auto" and tiff_flavour == "ome":
        # OpenSlide reads an OME-TIFF as a one-level generic TIFF (its pyramid sits in SubIFDs)
        # without the OME physical size: tifffile reads the pyramid and the metadata.
        backend = "tifffile"
    reader = _open_backend(path, backend)
    if backend == "auto" and tiff_flavour is not None and not getattr(reader, "pixel_exact", True):
        # OpenSlide maps level-0 coordinates through its mean-ratio downsample (e.g. 3.99896), so
        # reads on such a level are shifted by a fraction of a pixel and interpolated; tifffile
        # reads the level's own pixels. Same file, exact geometry.
        log.debug("%s: OpenSlide level downsamples %s are not integers; reading with tifffile",
                  path, reader.level_downsamples)
        reader.close()
        reader = _open_backend(path, "tifffile")
    try:
        _resolve_mpp(reader, mpp)
    except BaseException:
        reader.close()
        raise
    log.debug("opened %r", reader)
    return reader


def _open_backend(path: Path, backend: Backend) -> SlideReader:
    errors: list[str] = []
    if backend in ("auto", "openslide"):
        from wsi_toolkit.slide._openslide import OpenSlideReader, import_openslide

        openslide = import_openslide()
        try:
            return OpenSlideReader(path)
        except openslide.OpenSlideUnsupportedFormatError:
            errors.append("OpenSlide does not recognise the format")
            if backend == "openslide":
                raise SlideFormatError(f"{path}: {errors[0]}; try backend='tifffile'") from None
    from wsi_toolkit.slide._tifffile import TiffFileReader

    try:
        return TiffFileReader(path)
    except SlideFormatError as exc:
        if errors:
            raise SlideFormatError(f"{exc} ({'; '.join(errors)})") from exc
        raise


def _resolve_mpp(reader: SlideReader, override: float | None) -> None:
    found = reader.metadata_mpp()
    reader.mpp_metadata = found[0] if found else None
    if override is not None:
        if found is not None and abs(found[0][0] - override) / override > 0.01:
            log.warning("%s: --mpp %.4f overrides metadata %.4f um/px (%s)", reader.path, override, found[0][0], found[1])
        override = float(override)
        reader.mpp_xy = (override, override)
        reader.mpp_source = "override"
    elif found is not None:
        reader.mpp_xy, reader.mpp_source = found
    else:
        raise MissingMppError(
            f"{reader.path} has no microns-per-pixel metadata (no OpenSlide mpp, Aperio MPP, OME "
            "PhysicalSizeX or TIFF resolution tags); pass --mpp (e.g. --mpp 0.243 for a Camelyon16 "
            "Radboudumc slide, 0.226 for Utrecht), or open_slide(path, mpp=...)"
        )
    reader.mpp = (reader.mpp_xy[0] + reader.mpp_xy[1]) / 2
    if abs(reader.mpp_xy[0] - reader.mpp_xy[1]) / reader.mpp > 0.01:
        log.warning("%s: non-square pixels %.4f x %.4f um; using the mean", reader.path, *reader.mpp_xy)


def find_slides(paths: list[str | os.PathLike]) -> list[Path]:
    """Expand files and folders (non-recursive, sorted) into slide paths; files are kept as given."""
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            out.extend(sorted(c for c in p.iterdir() if c.is_file() and c.suffix.lower() in SLIDE_SUFFIXES))
        else:
            out.append(p)
    return out
