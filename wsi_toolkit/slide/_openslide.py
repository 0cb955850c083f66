"""OpenSlide backend: every format OpenSlide reads (the openslide-bin wheel supplies the C library)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from wsi_toolkit.errors import SlideFormatError, SlideReadError, one_line
from wsi_toolkit.slide._metadata import mpp_from_openslide_properties
from wsi_toolkit.slide._reader import BACKGROUND_RGB, LevelInfo, SlideReader, snap_downsample

__all__ = ["OpenSlideReader", "import_openslide"]


def import_openslide():
    """Import openslide-python, or say how to install it."""
    try:
        import openslide
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            "the OpenSlide backend needs openslide-python and the OpenSlide library: "
            "pip install openslide-python openslide-bin"
        ) from exc
    return openslide


class OpenSlideReader(SlideReader):
    """A slide read through OpenSlide. Raises ``openslide.OpenSlideUnsupportedFormatError``
    when OpenSlide does not recognise the file (the caller may then try another backend)."""

    backend = "openslide"

    def __init__(self, path: Path):
        openslide = import_openslide()
        self.path = Path(path)
        self._openslide = openslide
        try:
            self._osr = openslide.OpenSlide(str(self.path))
        except openslide.OpenSlideUnsupportedFormatError:
            raise
        except openslide.OpenSlideError as exc:
            raise SlideFormatError(
                f"{self.path} could not be opened by OpenSlide ({one_line(exc)}); the file is damaged or "
                "not a whole-slide image"
            ) from exc
        self.properties = dict(self._osr.properties)
        self.vendor = self.properties.get("openslide.vendor", "unknown")
        l0 = self._osr.level_dimensions[0]
        self.levels = tuple(
            LevelInfo(size=tuple(d), downsample=snap_downsample(l0, d)) for d in self._osr.level_dimensions
        )
        # OpenSlide maps level-0 coordinates with its own (mean-ratio) downsamples; where those
        # are not integers its reads are shifted by a fraction of a pixel and interpolated.
        self._os_downsamples = tuple(self._osr.level_downsamples)
        self.pixel_exact = all(abs(d - round(d)) < 1e-9 for d in self._os_downsamples)

    def metadata_mpp(self) -> tuple[tuple[float, float], str] | None:
        return mpp_from_openslide_properties(self.properties)

    def _read_level(self, level: int, lvl_xy: tuple[int, int], size: tuple[int, int]) -> np.ndarray:
        lvl_x, lvl_y = lvl_xy
        ds = self._os_downsamples[level]
        l0_xy = (int(round(lvl_x * ds)), int(round(lvl_y * ds)))
        try:
            rgba = np.asarray(self._osr.read_region(l0_xy, level, size))
        except self._openslide.OpenSlideError as exc:
            raise SlideReadError(
                f"{self.path}: reading level {level} at level-0 {l0_xy} size {size} failed ({one_line(exc)}); "
                "the slide's pixel data is damaged, copy or download it again"
            ) from exc
        return _rgba_to_rgb(rgba)

    _cache_px_bytes = 4  # OpenSlide caches decoded tiles as ARGB

    def tile_size(self, level: int) -> tuple[int, int] | None:
        try:
            return (int(self.properties[f"openslide.level[{level}].tile-width"]),
                    int(self.properties[f"openslide.level[{level}].tile-height"]))
        except (KeyError, ValueError):
            return None

    def set_tile_cache(self, nbytes: int) -> None:
        """A private OpenSlide tile cache of ``nbytes`` (OpenSlide >= 4.0 and openslide-python >= 1.3;
        older ones keep their shared 32 MiB cache)."""
        cache_cls = getattr(self._openslide, "OpenSlideCache", None)
        if cache_cls is None or not hasattr(self._osr, "set_cache"):
            return
        try:
            self._osr.set_cache(cache_cls(int(nbytes)))
        except self._openslide.OpenSlideError:  # pragma: no cover - library without cache support
            pass

    def close(self) -> None:
        self._osr.close()


def _rgba_to_rgb(rgba: np.ndarray) -> np.ndarray:
    """Composite OpenSlide's (non-premultiplied) RGBA onto the white background."""
    rgb = rgba[..., :3]
    alpha = rgba[..., 3]
    if alpha.min() == 255:
        return np.ascontiguousarray(rgb)
    a = alpha[..., None].astype(np.float32) / 255.0
    bg = np.asarray(BACKGROUND_RGB, np.float32)
    return np.round(rgb * a + bg * (1 - a)).astype(np.uint8)
