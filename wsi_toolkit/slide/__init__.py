"""Open whole-slide images and read them at true physical scale.

>>> from wsi_toolkit.slide import open_slide
>>> with open_slide("tumor_001.tif") as slide:             # doctest: +SKIP
...     patch = slide.read_at_mpp((10_000, 20_000), (96, 96), 0.972)   # PCam scale
...     thumb = slide.thumbnail(mpp=8.0)

Backends: OpenSlide first (every format it reads), then tifffile for tiled TIFF / OME-TIFF
OpenSlide refuses. Both sit behind :class:`SlideReader`.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
from pathlib import Path
from typing import Literal

from wsi_toolkit.errors import (
    ConfigError,
    MissingMppError,
    SlideFormatError,
    SlideNotFoundError,
    SlidePermissionError,
    SlideTooLargeError,
)
from wsi_toolkit.limits import MPP_RANGE_UM, SLIDE_MAX_SIDE_MM, SLIDE_MAX_SIDE_PX, in_range, range_text
from wsi_toolkit.slide._metadata import check_tiff_integrity
from wsi_toolkit.slide._reader import BACKGROUND_RGB, FINER_OVERSAMPLE, READ_FROM, LevelInfo, ReadFrom, SlideReader

__all__ = ["open_slide", "SlideReader", "LevelInfo", "BACKGROUND_RGB", "SLIDE_SUFFIXES", "find_slides", "check_mpp",
           "ReadFrom", "READ_FROM", "FINER_OVERSAMPLE"]

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
    ConfigError
        ``mpp`` is not a number of um/px in :data:`wsi_toolkit.limits.MPP_RANGE_UM` ([0.05, 20]).
    SlideNotFoundError
        ``path`` does not exist, is a folder, a dangling symbolic link or a symbolic link loop.
    SlideFormatError
        Empty file, a FIFO/socket/device, not a slide, or a layout no backend reads; the metadata's
        um/px is outside [0.05, 20].
    SlideTooLargeError
        Level 0 is longer than 130 mm or 2**22 px on a side (a wrong mpp or a forged header), or
        a stored tile/strip decodes to more than 256 MiB (see :mod:`wsi_toolkit.limits`).
    SlideReadError
        The file is truncated or its data is damaged.
    MissingMppError
        No resolution metadata and no ``mpp`` given.
    """
    path = Path(path)
    check_mpp(mpp, what="mpp override (--mpp)")
    if backend not in ("auto", "openslide", "tifffile"):
        raise ConfigError(f"backend must be 'auto', 'openslide' or 'tifffile'; got {backend!r}")
    _check_regular_file(path)
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
        _check_extent(reader)
    except BaseException:
        reader.close()
        raise
    log.debug("opened %r", reader)
    return reader


def check_mpp(mpp: object, *, what: str = "mpp") -> None:
    """Raise :class:`ConfigError` unless ``mpp`` is None or a number of um/px in
    :data:`wsi_toolkit.limits.MPP_RANGE_UM` ([0.05, 20]: the finest scanners sample 0.1 um/px, a
    0.5x overview 20 um/px; anything else is a typo or another unit, and would size thumbnails and
    grids by gigabytes)."""
    if mpp is None:
        return
    if not in_range(mpp, MPP_RANGE_UM):
        raise ConfigError(
            f"{what} must be micrometres per level-0 pixel in {range_text(MPP_RANGE_UM, 'um/px')} "
            f"(0.25 at 40x, 0.5 at 20x); got {mpp!r}. Pass the scanner's um/px, e.g. --mpp 0.243")


def _check_regular_file(path: Path) -> None:
    """Refuse what is not a regular, non-empty file, saying what it is."""
    try:
        st = os.stat(path)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise SlideNotFoundError(
                f"{path} is a symbolic link loop (it points back to itself through links); point it at "
                "the slide file") from None
        if os.path.islink(path):
            target = os.readlink(path)
            raise SlideNotFoundError(
                f"{path} is a symbolic link to {target}, which does not exist; fix the link or pass the "
                "slide file") from None
        if exc.errno in (errno.ENOENT, errno.ENOTDIR):
            raise SlideNotFoundError(f"{path} does not exist; check the path") from None
        if exc.errno == errno.EACCES:
            raise SlidePermissionError(f"{path}: permission denied on a folder of its path; make it readable "
                                       "for this user") from None
        raise SlideNotFoundError(f"{path} cannot be accessed ({exc.strerror}); check the path and its "
                                 "permissions") from None
    mode = st.st_mode
    if stat.S_ISDIR(mode):
        raise SlideNotFoundError(f"{path} is a folder, not a slide file; pass the slide file itself")
    if not stat.S_ISREG(mode):
        kind = ("a FIFO (named pipe)" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode)
                else "a character device" if stat.S_ISCHR(mode) else "a block device" if stat.S_ISBLK(mode)
                else "not a regular file")
        raise SlideFormatError(f"{path} is {kind}, not a slide file; slides are read by random access, "
                               "copy the slide to a regular file first")
    if st.st_size == 0:
        raise SlideFormatError(f"{path} is empty (0 bytes); copy or download the slide again")
    if not os.access(path, os.R_OK):
        raise SlidePermissionError(f"{path}: permission denied; make it readable (chmod +r) for this user")


def _check_extent(reader: SlideReader) -> None:
    """Refuse a level 0 no microscope slide can have (a wrong mpp or a damaged/forged header)."""
    w, h = reader.dimensions
    side_mm = max(w * reader.mpp_xy[0], h * reader.mpp_xy[1]) / 1000
    where = f"{reader.path}: level 0 is {w:,} x {h:,} px"
    if max(w, h) > SLIDE_MAX_SIDE_PX:
        raise SlideTooLargeError(
            f"{where}, more than {SLIDE_MAX_SIDE_PX:,} px on a side (130 mm at 0.05 um/px, the largest slide "
            "any scanner makes); the TIFF header is damaged, copy or convert the slide again")
    if side_mm > SLIDE_MAX_SIDE_MM:
        raise SlideTooLargeError(
            f"{where} at {reader.mpp:.4g} um/px ({reader.mpp_source}), i.e. {side_mm:,.0f} mm on its longest side; "
            f"glass slides are at most {SLIDE_MAX_SIDE_MM:g} mm (75 x 25 standard, 127 x 102 whole-mount). The "
            "um/px is wrong (pass the scanner's with --mpp) or the header is damaged")


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
            raise type(exc)(f"{exc} ({'; '.join(errors)})") from exc
        raise


def _resolve_mpp(reader: SlideReader, override: float | None) -> None:
    found = reader.metadata_mpp()
    reader.mpp_metadata = found[0] if found else None
    if override is not None:
        if found is not None and abs(found[0][0] - override) / override > 0.01:
            log.warning("%s: --mpp %.4f overrides metadata %.4f um/px (%s)", reader.path, override, found[0][0],
                        found[1])
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
    if reader.mpp_source != "override" and not all(in_range(v, MPP_RANGE_UM) for v in reader.mpp_xy):
        raise SlideFormatError(
            f"{reader.path}: the metadata says {reader.mpp_xy[0]:.4g} x {reader.mpp_xy[1]:.4g} um/px "
            f"({reader.mpp_source}), outside {range_text(MPP_RANGE_UM, 'um/px')} for a slide scan; pass the "
            "scanner's true um/px with --mpp (e.g. --mpp 0.243)")
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
