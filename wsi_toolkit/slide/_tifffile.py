"""tifffile backend: tiled (or stripped) pyramidal TIFF, OME-TIFF and SVS that OpenSlide refuses.

Reads only the tiles a region touches, decoding them with tifffile's codecs (imagecodecs for
JPEG, which release the GIL). One reader may serve several threads: tiles are read with
``os.pread`` on its own descriptor (no shared file position), and the decoded-tile cache and
tifffile's lazily made decoders are guarded by a lock (decoding itself runs outside it).
"""

from __future__ import annotations

import math
import os
import re
import threading
import xml.etree.ElementTree as ET
from collections import OrderedDict
from pathlib import Path

import numpy as np
from PIL import Image

from wsi_toolkit.errors import SlideFormatError, SlideReadError, SlideTooLargeError, one_line
from wsi_toolkit.limits import MAX_SEGMENT_BYTES
from wsi_toolkit.slide._metadata import largest_series, mpp_from_aperio_description, mpp_from_tiff_tags
from wsi_toolkit.slide._reader import BACKGROUND_RGB, LevelInfo, SlideReader, snap_downsample

__all__ = ["TiffFileReader"]

#: TIFF compression of Aperio's JPEG 2000 tiles in YCbCr (33005 is the RGB variant, decoded as is).
APERIO_JP2K_YCBCR = 33003

_OME_UNIT_TO_UM = {"um": 1.0, "µm": 1.0, "nm": 1e-3, "mm": 1e3, "cm": 1e4, "m": 1e6}


class TiffFileReader(SlideReader):
    """A pyramidal TIFF read with tifffile.

    Decoded tiles are kept in a small LRU cache (``cache_bytes``, default 64 MiB), so reads of
    neighbouring regions (overlapping patches, adjacent blocks) decode each tile once. Safe to
    share between threads; two threads that want the same uncached tile at the same moment may
    both decode it (the cache keeps one).
    """

    backend = "tifffile"

    def __init__(self, path: Path, *, cache_bytes: int = 64 * 2**20):
        import tifffile

        self.path = Path(path)
        try:
            self._tif = tifffile.TiffFile(self.path)
        except Exception as exc:  # tifffile raises TiffFileError, ValueError, struct.error...
            raise SlideFormatError(
                f"{self.path} is not a readable TIFF ({one_line(exc)}); whole-slide images must be TIFF-based "
                "(.tif, .svs, .ome.tif) or another format OpenSlide reads (.ndpi, .mrxs, .scn...)"
            ) from exc
        try:
            self._pages = self._pyramid_pages()
            self._check_segments()
        except SlideFormatError:
            self._tif.close()
            raise
        except Exception as exc:  # noqa: BLE001 - tifffile's series/page parsing of a damaged structure
            self._tif.close()
            raise SlideFormatError(
                f"{self.path}: its TIFF structure is not a readable image ({type(exc).__name__}: {one_line(exc)}); "
                "the file is damaged, copy or convert the slide again") from exc
        self._fd: int | None = os.open(self.path, os.O_RDONLY)
        self._cache: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()
        self._cache_bytes = int(cache_bytes)
        self._cached = 0
        # Guards the tile cache (_cache, _cached, _cache_bytes) and the first use of a page's decoder
        # (tifffile makes it lazily, and not thread-safely).
        self._lock = threading.Lock()
        if self._tif.is_ome:
            self.vendor = "ome"
        elif self._tif.is_svs:
            self.vendor = "aperio"
        else:
            self.vendor = "generic-tiff"
        l0 = self._page_size(self._pages[0])
        self.levels = tuple(
            LevelInfo(size=self._page_size(p), downsample=snap_downsample(l0, self._page_size(p)))
            for p in self._pages
        )
        page0 = self._pages[0]
        self.properties = {f"tiff.{t.name}": str(t.value) for t in page0.tags.values() if t.code < 32768
                           and t.name not in ("TileOffsets", "TileByteCounts", "StripOffsets",
                                              "StripByteCounts", "JPEGTables")}

    @staticmethod
    def _page_size(page) -> tuple[int, int]:
        return int(page.imagewidth), int(page.imagelength)

    def _pyramid_pages(self) -> list:
        series = largest_series(self._tif)  # the main image: labels and macros are smaller
        if series is None:
            raise SlideFormatError(f"{self.path} holds no image")
        pages = [lvl.keyframe for lvl in series.levels]
        page0 = pages[0]
        if page0.samplesperpixel not in (1, 3, 4) or page0.planarconfig != 1 and page0.samplesperpixel > 1:
            raise SlideFormatError(
                f"{self.path}: image with {page0.samplesperpixel} samples per pixel "
                f"(planar config {page0.planarconfig}) is not an RGB slide"
            )
        if getattr(page0, "imagedepth", 1) > 1:
            raise SlideFormatError(f"{self.path}: volumetric (z-stack) TIFFs are not supported")
        if page0.dtype != np.uint8:
            raise SlideFormatError(f"{self.path}: pixel type {page0.dtype} is not 8-bit")
        # Keep levels in decreasing size (some writers append levels in other orders).
        pages.sort(key=lambda p: -(p.imagewidth * p.imagelength))
        return pages

    def _check_segments(self) -> None:
        """Every tile/strip is decoded whole to read any pixel of it: refuse ones too large to decode
        (a single-strip image of a whole slide, or a forged tile size)."""
        for level, page in enumerate(self._pages):
            if page.imagewidth < 1 or page.imagelength < 1:
                raise SlideFormatError(f"{self.path}: level {level} is {page.imagewidth} x {page.imagelength} px; "
                                       "the TIFF header is damaged")
            if page.is_tiled:
                seg_w, seg_h, kind = page.tilewidth, page.tilelength, "tiles"
            else:
                rows = min(page.rowsperstrip or page.imagelength, page.imagelength)
                seg_w, seg_h, kind = page.imagewidth, rows, "strips"
            if seg_w < 1 or seg_h < 1:
                raise SlideFormatError(f"{self.path}: level {level} has {kind} of {seg_w} x {seg_h} px; the TIFF "
                                       "header is damaged")
            n_segs = math.ceil(page.imagewidth / seg_w) * math.ceil(page.imagelength / seg_h)
            if len(page.dataoffsets) < n_segs or len(page.databytecounts) < n_segs:
                raise SlideFormatError(
                    f"{self.path}: level {level} needs {n_segs:,} {kind} but lists {len(page.dataoffsets):,} "
                    "offsets and "
                    f"{len(page.databytecounts):,} byte counts; the TIFF header is damaged")
            nbytes = int(seg_w) * int(seg_h) * max(int(page.samplesperpixel), 3)
            if nbytes > MAX_SEGMENT_BYTES:
                raise SlideTooLargeError(
                    f"{self.path}: level {level} ({page.imagewidth:,} x {page.imagelength:,} px) is stored in "
                    f"{kind} of {seg_w:,} x {seg_h:,} px, {nbytes / 2**20:,.0f} MiB each decoded (at most "
                    f"{MAX_SEGMENT_BYTES // 2**20} MiB are read at once); convert it to a tiled pyramid, e.g. "
                    "vips tiffsave in.tif out.tif --tile --pyramid --compression jpeg")

    def metadata_mpp(self) -> tuple[tuple[float, float], str] | None:
        tif = self._tif
        if tif.is_ome:
            got = _ome_mpp(tif.ome_metadata)
            if got is not None:
                return got, "OME PhysicalSizeX"
        page0 = self._pages[0]
        if tif.is_svs:
            m = mpp_from_aperio_description(page0.description)
            if m is not None:
                return (m, m), "aperio.MPP"
        got = mpp_from_tiff_tags(page0, default_unit=None)  # no unit tag: no physical size
        if got is not None:
            unit = page0.tags["ResolutionUnit"].value
            return got, f"tiff.XResolution ({getattr(unit, 'name', str(unit)).lower()})"
        return None

    def _read_level(self, level: int, lvl_xy: tuple[int, int], size: tuple[int, int]) -> np.ndarray:
        page = self._pages[level]
        x0, y0 = lvl_xy
        w, h = size
        if page.is_tiled:
            seg_h, seg_w = page.tilelength, page.tilewidth
        else:
            seg_h, seg_w = page.rowsperstrip or page.imagelength, page.imagewidth
        segs_across = math.ceil(page.imagewidth / seg_w)
        out = np.empty((h, w, 3), np.uint8)
        offsets, counts = page.dataoffsets, page.databytecounts
        for ty in range(y0 // seg_h, (y0 + h - 1) // seg_h + 1):
            for tx in range(x0 // seg_w, (x0 + w - 1) // seg_w + 1):
                index = ty * segs_across + tx
                seg = self._cached_segment((level, index))
                if seg is None:
                    seg = self._decode_segment(page, index, offsets[index], counts[index], (seg_h, seg_w))
                    self._remember((level, index), seg)
                # Intersection of the segment with the wanted box, in level pixels.
                sy0, sx0 = ty * seg_h, tx * seg_w
                iy0, ix0 = max(y0, sy0), max(x0, sx0)
                iy1, ix1 = min(y0 + h, sy0 + seg_h), min(x0 + w, sx0 + seg_w)
                out[iy0 - y0 : iy1 - y0, ix0 - x0 : ix1 - x0] = seg[iy0 - sy0 : iy1 - sy0, ix0 - sx0 : ix1 - sx0]
        return out

    def tile_size(self, level: int) -> tuple[int, int] | None:
        page = self._pages[level]
        if page.is_tiled:
            return int(page.tilewidth), int(page.tilelength)
        return int(page.imagewidth), int(page.rowsperstrip or page.imagelength)

    def set_tile_cache(self, nbytes: int) -> None:
        with self._lock:
            self._cache_bytes = int(nbytes)
            self._evict()

    def _cached_segment(self, key: tuple[int, int]) -> np.ndarray | None:
        """The decoded segment ``key`` from the cache (now the most recently used), or None."""
        with self._lock:
            seg = self._cache.get(key)
            if seg is not None:
                self._cache.move_to_end(key)
            return seg

    def _remember(self, key: tuple[int, int], seg: np.ndarray) -> None:
        with self._lock:
            if seg.nbytes > self._cache_bytes or key in self._cache:  # another thread decoded it meanwhile
                return
            self._cache[key] = seg
            self._cached += seg.nbytes
            self._evict()

    def _evict(self) -> None:
        """Drop least recently used segments until the cache fits (the caller holds the lock)."""
        while self._cached > self._cache_bytes and self._cache:
            _, old = self._cache.popitem(last=False)
            self._cached -= old.nbytes

    def _decode_segment(self, page, index: int, offset: int, count: int, seg_hw: tuple[int, int]) -> np.ndarray:
        seg_h, seg_w = seg_hw
        if count == 0:  # sparse tile: nothing was scanned there
            tile = np.empty((seg_h, seg_w, 3), np.uint8)
            tile[:] = BACKGROUND_RGB
            return tile
        try:
            data = os.pread(self._fd, count, offset)  # type: ignore[arg-type]  # open until close()
            if len(data) != count:
                raise OSError(f"read {len(data)} of {count} bytes")
            with self._lock:
                decode = page.decode
            arr, _, _ = decode(data, index, jpegtables=page.jpegtables)
        except Exception as exc:
            raise SlideReadError(
                f"{self.path}: tile {index} of a {page.imagewidth}x{page.imagelength} level could not be "
                f"decoded ({one_line(exc)}); the slide's pixel data is damaged, copy or download it again"
            ) from exc
        arr = arr.reshape(arr.shape[-3:])  # (1, 1, h, w, s) -> (h, w, s)
        if page.compression == APERIO_JP2K_YCBCR and arr.shape[-1] == 3:
            # Aperio's JPEG 2000 "YCbCr" tiles hold JFIF full-range YCbCr (no colour transform in
            # the codestream); tifffile returns those values as they are, OpenSlide converts them.
            arr = np.asarray(Image.fromarray(np.ascontiguousarray(arr), mode="YCbCr").convert("RGB"))
        if arr.shape[-1] == 1:
            arr = np.repeat(arr, 3, axis=-1)
        elif arr.shape[-1] == 4:
            arr = arr[..., :3]
        if arr.shape[0] < seg_h or arr.shape[1] < seg_w:  # last strip can be short
            full = np.empty((seg_h, seg_w, 3), np.uint8)
            full[:] = BACKGROUND_RGB
            full[: arr.shape[0], : arr.shape[1]] = arr
            arr = full
        return arr

    def close(self) -> None:
        fd = getattr(self, "_fd", None)
        if fd is not None:
            os.close(fd)
            self._fd = None
        self._tif.close()


def _ome_mpp(ome_xml: str | None) -> tuple[float, float] | None:
    if not ome_xml:
        return None
    try:
        root = ET.fromstring(ome_xml)
    except ET.ParseError:
        return None
    for el in root.iter():
        if re.sub(r"^\{.*\}", "", el.tag) == "Pixels" and "PhysicalSizeX" in el.attrib:
            try:
                sx = float(el.attrib["PhysicalSizeX"])
                sy = float(el.attrib.get("PhysicalSizeY", sx))
            except ValueError:
                return None
            f = _OME_UNIT_TO_UM.get(el.attrib.get("PhysicalSizeXUnit", "µm"), None)
            if f is None or sx <= 0 or sy <= 0:
                return None
            return sx * f, sy * f
    return None
