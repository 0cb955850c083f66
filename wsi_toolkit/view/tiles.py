"""Deep Zoom tiles of a slide, and the bounded cache that serves them.

The tile contract is Microsoft Deep Zoom as :class:`openslide.deepzoom.DeepZoomGenerator` makes it
(``limit_bounds=False``): Deep Zoom level ``z`` of ``n`` is the slide's level 0 shrunk by
``2 ** (n - 1 - z)`` (sizes rounded up, down to 1 x 1 px), cut into ``tile_size`` squares, each
with ``overlap`` extra px on every interior edge. Deep Zoom pixel ``(zx, zy)`` of level ``z``
covers level-0 ``[zx * d, (zx + 1) * d) x [zy * d, (zy + 1) * d)`` with ``d = 2 ** (n - 1 - z)``;
the origin is the slide's top-left, so a layer drawn with the same geometry is aligned to the
pixel at every zoom.

- :class:`OpenSlideTiles`: ``DeepZoomGenerator`` on an ``openslide.OpenSlide`` (slides OpenSlide
  reads). A failed read puts an OpenSlide handle in an error state, so the handle is reopened.
  ``get_tile`` shrinks with ``thumbnail()``, which keeps the read box's aspect ratio and can return
  an edge tile 1 px short of its Deep Zoom size; such a tile is resized to the contract's size.
- :class:`ReaderTiles`: the same tiles from our :class:`~wsi_toolkit.slide.SlideReader` (slides
  only the tifffile backend reads): the same level choice, box and Lanczos shrink.
- :class:`TileCache`: encoded tiles by key, least recently used dropped past ``max_bytes``; two
  threads asking for the same missing tile render it once.
- :func:`error_tile`: the grey "tile error" picture sent in place of a tile that cannot be read.
"""

from __future__ import annotations

import io
import logging
import math
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol
from xml.sax.saxutils import quoteattr

from PIL import Image, ImageDraw, ImageFont

from wsi_toolkit.errors import ConfigError, WsiToolkitError, one_line
from wsi_toolkit.limits import check_int
from wsi_toolkit.slide import SlideReader

__all__ = ["DeepZoomGeometry", "TileSource", "OpenSlideTiles", "ReaderTiles", "TileCache", "TileAddressError",
           "TileRenderError", "error_tile", "encode_jpeg", "JPEG_QUALITY", "TILE_SIZE", "TILE_OVERLAP"]

log = logging.getLogger(__name__)

#: Deep Zoom tile side and overlap (openslide's defaults: 254 + 2 x 1 = 256 px tiles inside the slide).
TILE_SIZE = 254
TILE_OVERLAP = 1
#: JPEG quality of slide tiles (openslide's deepzoom example uses 75).
JPEG_QUALITY = 80
#: Most memory for decoded slide tiles while an export sweeps a level row by row.
SWEEP_CACHE_BYTES = 512 * 2**20


class TileAddressError(WsiToolkitError, LookupError):
    """A Deep Zoom level or tile address the image does not have (HTTP 404)."""


class TileRenderError(WsiToolkitError, OSError):
    """A tile that exists could not be read or rendered (damaged pixel data, unreadable slide)."""


@dataclass(frozen=True)
class DeepZoomGeometry:
    """Deep Zoom levels of an image of ``width`` x ``height`` level-0 px."""

    width: int
    height: int
    tile_size: int = TILE_SIZE
    overlap: int = TILE_OVERLAP

    def __post_init__(self) -> None:
        check_int(self.width, "width")
        check_int(self.height, "height")
        check_int(self.tile_size, "tile_size", minimum=16)
        check_int(self.overlap, "overlap", minimum=0)

    @property
    def level_count(self) -> int:
        return len(self.level_dimensions)

    @property
    def level_dimensions(self) -> tuple[tuple[int, int], ...]:
        """(width, height) of each Deep Zoom level, the 1 x 1 px level first."""
        size = (self.width, self.height)
        sizes = [size]
        while size[0] > 1 or size[1] > 1:
            size = (max(1, math.ceil(size[0] / 2)), max(1, math.ceil(size[1] / 2)))
            sizes.append(size)
        return tuple(reversed(sizes))

    @property
    def level_tiles(self) -> tuple[tuple[int, int], ...]:
        """(columns, rows) of tiles of each level."""
        return tuple((math.ceil(w / self.tile_size), math.ceil(h / self.tile_size)) for w, h in self.level_dimensions)

    @property
    def tile_count(self) -> int:
        return sum(c * r for c, r in self.level_tiles)

    def downsample(self, level: int) -> int:
        """Level-0 px per Deep Zoom px of ``level``."""
        return 2 ** (self.level_count - 1 - int(level))

    def tile_box(self, level: int, col: int, row: int) -> tuple[int, int, int, int]:
        """``(zx, zy, w, h)``: the tile's box in px of its Deep Zoom level, overlap included.

        Raises :class:`TileAddressError` when the level or address does not exist.
        """
        if not 0 <= level < self.level_count:
            raise TileAddressError(f"Deep Zoom level {level} does not exist (0..{self.level_count - 1})")
        cols, rows = self.level_tiles[level]
        if not (0 <= col < cols and 0 <= row < rows):
            raise TileAddressError(f"tile ({col}, {row}) does not exist at level {level} ({cols} x {rows} tiles)")
        zw, zh = self.level_dimensions[level]
        ts, ov = self.tile_size, self.overlap
        box = []
        for t, n, lim in ((col, cols, zw), (row, rows, zh)):
            before, after = ov * (t != 0), ov * (t != n - 1)
            box.append((ts * t - before, min(ts, lim - ts * t) + before + after))
        return box[0][0], box[1][0], box[0][1], box[1][1]

    def dzi(self, fmt: str) -> str:
        """The ``.dzi`` XML (as ``DeepZoomGenerator.get_dzi``)."""
        return ('<?xml version="1.0" encoding="UTF-8"?>\n'
                f'<Image xmlns="http://schemas.microsoft.com/deepzoom/2008" TileSize="{self.tile_size}" '
                f'Overlap="{self.overlap}" Format={quoteattr(fmt)}><Size Width="{self.width}" '
                f'Height="{self.height}"/></Image>\n')

    def to_json(self) -> dict:
        return {"width": self.width, "height": self.height, "tile_size": self.tile_size, "overlap": self.overlap,
                "level_count": self.level_count}


class TileSource(Protocol):
    """What the server and the export need of a slide's tiles."""

    geometry: DeepZoomGeometry
    fmt: str

    def render(self, level: int, col: int, row: int) -> bytes:
        """The encoded tile; :class:`TileAddressError` or :class:`TileRenderError` when it cannot be."""
        ...

    def prepare_sweep(self, level: int) -> None:
        """Size the slide's decoded-tile cache for rendering ``level`` row by row (the export)."""
        ...

    def close(self) -> None: ...


def encode_jpeg(img: Image.Image, quality: int = JPEG_QUALITY) -> bytes:
    buf = io.BytesIO()
    img.convert("RGB").save(buf, "JPEG", quality=quality)
    return buf.getvalue()


class OpenSlideTiles:
    """Tiles from :class:`openslide.deepzoom.DeepZoomGenerator` (thread-safe: OpenSlide reads of one
    handle may run in parallel; the handle is replaced under a lock after a failed read)."""

    fmt = "jpeg"

    def __init__(self, path: str | Path, *, tile_size: int = TILE_SIZE, overlap: int = TILE_OVERLAP,
                 quality: int = JPEG_QUALITY):
        self.path = Path(path)
        self._tile_size, self._overlap, self._quality = tile_size, overlap, quality
        self._lock = threading.Lock()
        self._generation = 0
        self._osr, self._dz = self._open()
        w, h = self._osr.dimensions
        self.geometry = DeepZoomGeometry(int(w), int(h), tile_size, overlap)
        if tuple(self._dz.level_dimensions) != self.geometry.level_dimensions:  # pragma: no cover - contract drift
            raise ConfigError(f"{self.path}: DeepZoomGenerator levels differ from the Deep Zoom contract")

    def _open(self):
        import openslide
        from openslide.deepzoom import DeepZoomGenerator

        osr = openslide.OpenSlide(str(self.path))
        return osr, DeepZoomGenerator(osr, tile_size=self._tile_size, overlap=self._overlap, limit_bounds=False)

    def render(self, level: int, col: int, row: int) -> bytes:
        import openslide

        size = self.geometry.tile_box(level, col, row)[2:]  # TileAddressError before OpenSlide's ValueError
        with self._lock:
            dz, generation = self._dz, self._generation
        try:
            img = dz.get_tile(level, (col, row))
        except openslide.OpenSlideError as exc:
            self._reopen(generation)
            raise TileRenderError(f"{self.path.name}: tile {level}/{col}_{row} cannot be read "
                                  f"({one_line(exc)})") from exc
        if img.size != size:  # get_tile shrinks with thumbnail(), which keeps the read box's aspect: 1 px short
            img = img.resize(size, Image.Resampling.LANCZOS)
        return encode_jpeg(img, self._quality)

    def prepare_sweep(self, level: int, *, nbytes: int = SWEEP_CACHE_BYTES) -> None:
        """A private OpenSlide tile cache large enough for rows of tiles (OpenSlide >= 4.0)."""
        import openslide

        cache_cls = getattr(openslide, "OpenSlideCache", None)
        with self._lock:
            if cache_cls is not None and hasattr(self._osr, "set_cache"):
                self._osr.set_cache(cache_cls(int(nbytes)))

    def _reopen(self, generation: int) -> None:
        """OpenSlide refuses every read after a failed one: open a fresh handle (once per failure)."""
        with self._lock:
            if generation != self._generation:
                return
            old = self._osr
            try:
                self._osr, self._dz = self._open()
            except Exception as exc:  # noqa: BLE001 - keep serving error tiles
                log.warning("%s: reopening after a read error failed: %s", self.path, one_line(exc))
                return
            self._generation += 1
        log.info("%s: reopened after a read error", self.path)
        # The old handle may still be in use by another thread's read: leave it to the garbage collector.
        del old

    def close(self) -> None:
        with self._lock:
            self._osr.close()


class ReaderTiles:
    """The Deep Zoom tile contract on a :class:`~wsi_toolkit.slide.SlideReader` (for slides the
    tifffile backend reads): Deep Zoom level ``z`` reads the coarsest slide level no coarser than its
    downsample, the box ``DeepZoomGenerator`` would read, shrunk with Lanczos to the tile size."""

    fmt = "jpeg"

    def __init__(self, reader: SlideReader, *, tile_size: int = TILE_SIZE, overlap: int = TILE_OVERLAP,
                 quality: int = JPEG_QUALITY):
        self.reader = reader
        self._quality = quality
        w, h = reader.dimensions
        self.geometry = DeepZoomGeometry(int(w), int(h), tile_size, overlap)
        downsamples = reader.level_downsamples
        self._slide_level = tuple(
            max((i for i, ds in enumerate(downsamples) if ds <= self.geometry.downsample(z) * (1 + 1e-6)), default=0)
            for z in range(self.geometry.level_count))

    def region(self, level: int, col: int, row: int) -> tuple[tuple[int, int], int, tuple[int, int], tuple[int, int]]:
        """``(l0_xy, slide_level, read_size, tile_size)``: what a tile reads and how large it is."""
        zx, zy, zw, zh = self.geometry.tile_box(level, col, row)
        slide_level = self._slide_level[level]
        l_per_z = self.geometry.downsample(level) / self.reader.level_downsamples[slide_level]
        lvl_w, lvl_h = self.reader.level_dimensions[slide_level]
        lx, ly = zx * l_per_z, zy * l_per_z
        ds = self.reader.level_downsamples[slide_level]
        l0_xy = (int(lx * ds), int(ly * ds))
        size = (max(1, int(min(math.ceil(zw * l_per_z), lvl_w - math.ceil(lx)))),
                max(1, int(min(math.ceil(zh * l_per_z), lvl_h - math.ceil(ly)))))
        return l0_xy, slide_level, size, (zw, zh)

    def prepare_sweep(self, level: int) -> None:
        """Keep three rows of the slide level's stored tiles decoded (at most 512 MiB): a row of Deep Zoom
        tiles then decodes each stored tile it shares with the row above once, not again."""
        slide_level = self._slide_level[level]
        self.reader.reserve_tile_cache(self.reader.level_mpp(slide_level), rows=3, max_bytes=SWEEP_CACHE_BYTES)

    def render(self, level: int, col: int, row: int) -> bytes:
        l0_xy, slide_level, size, tile_wh = self.region(level, col, row)
        try:
            rgb = self.reader.read_region(l0_xy, slide_level, size)
        except (WsiToolkitError, OSError, ValueError) as exc:
            raise TileRenderError(f"{self.reader.path.name}: tile {level}/{col}_{row} cannot be read "
                                  f"({one_line(exc)})") from exc
        img = Image.fromarray(rgb)
        if img.size != tile_wh:
            img = img.resize(tile_wh, Image.Resampling.LANCZOS)
        return encode_jpeg(img, self._quality)

    def close(self) -> None:
        self.reader.close()


class TileCache:
    """Encoded tiles by key, at most ``max_bytes`` (least recently used dropped first).

    :meth:`get` renders a missing tile with the given function; concurrent callers of the same
    missing key wait for the one render. Failed renders are not cached. Thread-safe.
    """

    def __init__(self, max_bytes: int = 256 * 2**20):
        self.max_bytes = check_int(max_bytes, "max_bytes", minimum=0)
        self._items: OrderedDict[Hashable, bytes] = OrderedDict()
        self._pending: dict[Hashable, Future] = {}
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._items)

    @property
    def nbytes(self) -> int:
        return self._bytes

    def get(self, key: Hashable, render: Callable[[], bytes]) -> tuple[bytes, bool]:
        """``(data, hit)``: the cached tile, or ``render()`` stored and returned."""
        with self._lock:
            data = self._items.get(key)
            if data is not None:
                self._items.move_to_end(key)
                self.hits += 1
                return data, True
            future = self._pending.get(key)
            owner = future is None
            if owner:
                future = self._pending[key] = Future()
                self.misses += 1
        assert future is not None
        if not owner:
            return future.result(), False
        try:
            data = render()
        except BaseException as exc:
            with self._lock:
                del self._pending[key]
            future.set_exception(exc)
            raise
        with self._lock:
            del self._pending[key]
            self._put(key, data)
        future.set_result(data)
        return data, False

    def _put(self, key: Hashable, data: bytes) -> None:
        if len(data) > self.max_bytes:
            return
        old = self._items.pop(key, None)
        if old is not None:
            self._bytes -= len(old)
        self._items[key] = data
        self._bytes += len(data)
        while self._bytes > self.max_bytes:
            _, dropped = self._items.popitem(last=False)
            self._bytes -= len(dropped)


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def error_tile(size: tuple[int, int], message: str = "tile error") -> bytes:
    """A grey JPEG of ``size`` (w, h) crossed in red with ``message``: what the page shows where a
    tile could not be read."""
    w, h = max(1, int(size[0])), max(1, int(size[1]))
    img = Image.new("RGB", (w, h), (200, 200, 200))
    draw = ImageDraw.Draw(img)
    draw.rectangle([0, 0, w - 1, h - 1], outline=(190, 0, 0), width=2)
    draw.line([(0, 0), (w - 1, h - 1)], fill=(190, 0, 0), width=2)
    draw.line([(0, h - 1), (w - 1, 0)], fill=(190, 0, 0), width=2)
    if w >= 64 and h >= 24:
        draw.text((6, 6), message[:40], fill=(120, 0, 0), font=_font(12))
    return encode_jpeg(img)

