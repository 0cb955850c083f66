"""SYNTHETIC whole-slide images with known tissue and tumour regions, in real on-disk layouts.

Nothing here is patient data. The slides exist so that tests, benchmarks and the demo can check
geometry (physical scale, alignment, areas) against an exactly known truth. The texture is
H&E-like (pink eosin background, purple nuclei; tumour denser and more purple), enough for the
toolkit's own colour-rule test models, not for judging a real classifier.

A :class:`SyntheticSpec` describes a specimen in micrometres (so one specimen can be "scanned"
at 0.243 and at 0.226 um/px); :func:`write_synthetic_slide` renders it, tile by tile, into

- ``"tiff"``: a pyramidal tiled JPEG TIFF with resolution tags in cm (Camelyon16's layout),
- ``"svs"``: an Aperio-style SVS (``MPP = `` in the ImageDescription, stripped thumbnail page),
- ``"svs-j2k"``: the same SVS with JPEG 2000 tiles in YCbCr, as Aperio scanners write them
  (TIFF compression 33003: JFIF full-range YCbCr in the codestream, no colour transform),
- ``"svs-nompp"``: the SVS without ``MPP =`` (an export that lost it: needs ``--mpp``),
- ``"tiff-nores"``: the TIFF without resolution metadata (needs ``--mpp``),

plus, with ``xml=True``, the ASAP XML of the tumour regions next to the slide.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import shapely
from shapely.geometry import LineString, Polygon

from wsi_toolkit.atomic import atomic_path
from wsi_toolkit.errors import ConfigError
from wsi_toolkit.geometry import scale_xy
from wsi_toolkit.limits import check_number

__all__ = [
    "Blob",
    "PenStroke",
    "SyntheticSpec",
    "SyntheticSlide",
    "make_spec",
    "write_synthetic_slide",
    "write_pyramidal_tiff",
    "SYNTHETIC_LABEL",
    "ALIGNMENT_SPEC",
]

SYNTHETIC_LABEL = "SYNTHETIC slide made by wsi_toolkit.synthetic - not patient data"

Flavour = Literal["tiff", "svs", "svs-j2k", "svs-nompp", "tiff-nores"]
FLAVOURS: tuple[str, ...] = ("tiff", "svs", "svs-j2k", "svs-nompp", "tiff-nores")
#: TIFF compression code of Aperio's JPEG 2000 YCbCr tiles.
APERIO_JP2K_YCBCR = 33003

# Colours (RGB) of the synthetic stain. Tumour is denser and more purple than normal tissue.
_BACKGROUND = (243, 242, 244)
_NORMAL = ((232, 168, 208), (88, 58, 150))  # (eosin base, nuclei), nuclei ~ lymphocytes
_TUMOR = ((196, 128, 196), (104, 62, 160))
_FAINT = ((238, 224, 234), (214, 196, 222))
PEN_COLOURS = {"blue": (38, 72, 190), "green": (40, 150, 78), "black": (28, 28, 36)}


@dataclass(frozen=True)
class Blob:
    """A star-shaped region: an ellipse whose radius wobbles with angle. Units: micrometres.

    A point is inside when, in the ellipse's normalised polar coordinates (rho, theta),
    ``rho <= 1 + wobble * sin(lobes * theta + phase)``.
    """

    centre_um: tuple[float, float]
    radii_um: tuple[float, float]
    angle_deg: float = 0.0
    wobble: float = 0.15
    lobes: int = 5
    phase: float = 0.0

    def bounds_um(self) -> tuple[float, float, float, float]:
        r = max(self.radii_um) * (1 + abs(self.wobble))
        cx, cy = self.centre_um
        return cx - r, cy - r, cx + r, cy + r

    def contains(self, x_um: np.ndarray, y_um: np.ndarray) -> np.ndarray:
        """Boolean array: which points (micrometres, broadcastable arrays) lie inside."""
        cx, cy = self.centre_um
        rx, ry = self.radii_um
        t = math.radians(self.angle_deg)
        dx, dy = x_um - cx, y_um - cy
        u = (dx * math.cos(t) + dy * math.sin(t)) / rx
        v = (-dx * math.sin(t) + dy * math.cos(t)) / ry
        rho = np.hypot(u, v)
        theta = np.arctan2(v, u)
        return rho <= 1 + self.wobble * np.sin(self.lobes * theta + self.phase)

    def polygon_um(self, n: int = 720) -> Polygon:
        """The boundary as a polygon with ``n`` vertices (micrometres)."""
        theta = np.linspace(0, 2 * math.pi, n, endpoint=False)
        rho = 1 + self.wobble * np.sin(self.lobes * theta + self.phase)
        u, v = rho * np.cos(theta) * self.radii_um[0], rho * np.sin(theta) * self.radii_um[1]
        t = math.radians(self.angle_deg)
        x = self.centre_um[0] + u * math.cos(t) - v * math.sin(t)
        y = self.centre_um[1] + u * math.sin(t) + v * math.cos(t)
        return Polygon(np.column_stack([x, y]))


@dataclass(frozen=True)
class PenStroke:
    """A marker line on the glass: a polyline of ``width_um`` in one of :data:`PEN_COLOURS`."""

    points_um: tuple[tuple[float, float], ...]
    colour: Literal["blue", "green", "black"] = "blue"
    width_um: float = 120.0

    def geometry_um(self) -> Polygon:
        return LineString(self.points_um).buffer(self.width_um / 2)


@dataclass(frozen=True)
class SyntheticSpec:
    """A synthetic specimen on a slide, in micrometres. Tumours are clipped to tissue."""

    size_um: tuple[float, float]
    tissue: tuple[Blob, ...]
    tumors: tuple[Blob, ...] = ()
    faint: tuple[Blob, ...] = ()
    pen: tuple[PenStroke, ...] = ()
    seed: int = 0

    def tissue_um(self):
        """All tissue (normal, tumour and faint) as one shapely geometry in micrometres."""
        return shapely.union_all([b.polygon_um() for b in self.tissue + self.faint])

    def tumor_um(self):
        """Tumour regions (clipped to the normal-tissue blobs) in micrometres."""
        if not self.tumors:
            return Polygon()
        tissue = shapely.union_all([b.polygon_um() for b in self.tissue])
        return shapely.union_all([b.polygon_um() for b in self.tumors]).intersection(tissue)


@dataclass(frozen=True)
class SyntheticSlide:
    """What :func:`write_synthetic_slide` wrote, with the truth in level-0 pixels."""

    path: Path
    xml_path: Path | None
    mpp: float
    flavour: str
    level0_size: tuple[int, int]
    spec: SyntheticSpec
    tissue_l0: Any  # shapely geometry, level-0 px
    tumor_l0: Any

    @property
    def tissue_mm2(self) -> float:
        return self.tissue_l0.area * self.mpp**2 / 1e6

    @property
    def tumor_mm2(self) -> float:
        return self.tumor_l0.area * self.mpp**2 / 1e6


def make_spec(
    *,
    tissue_mm2: float = 4.0,
    n_tumors: int = 2,
    faint: bool = True,
    pen: bool = True,
    seed: int = 0,
) -> SyntheticSpec:
    """A lymph-node-like specimen: two tissue sections of ``tissue_mm2`` in all (about),
    ``n_tumors`` tumour regions inside them, optionally a faint section and pen strokes."""
    tissue_mm2 = check_number(tissue_mm2, "tissue_mm2", positive=True, unit="mm^2")
    rng = np.random.default_rng(seed)
    wobble, lobes = 0.12, 5
    area_factor = math.pi * (1 + wobble**2 / 2)  # area of a wobbly ellipse with unit radii
    main_um2 = tissue_mm2 * 1e6 * (0.88 if faint else 1.0)
    # Two sections, 60/40 split, aspect 1.4:1.
    blobs = []
    margin = 600.0
    x = margin
    height = 0.0
    for share in (0.6, 0.4):
        a = main_um2 * share
        ry = math.sqrt(a / (area_factor * 1.4))
        rx = 1.4 * ry
        r_out = max(rx, ry) * (1 + wobble)
        blobs.append(Blob((x + r_out, margin + r_out), (rx, ry), angle_deg=float(rng.uniform(-20, 20)),
                          wobble=wobble, lobes=lobes, phase=float(rng.uniform(0, 2 * math.pi))))
        x += 2 * r_out + 400.0
        height = max(height, 2 * r_out)
    faint_blobs = []
    if faint:
        a = tissue_mm2 * 1e6 * 0.12
        r = math.sqrt(a / area_factor)
        faint_blobs.append(Blob((x + r * 1.15, margin + r * 1.15), (r, r), wobble=wobble, lobes=3,
                                phase=float(rng.uniform(0, 6))))
        x += 2 * r * 1.15 + 400.0
        height = max(height, 2 * r * 1.15)
    tumors = []
    for i in range(n_tumors):
        host = blobs[i % len(blobs)]
        rx, ry = host.radii_um
        ang = float(rng.uniform(0, 2 * math.pi))
        d = float(rng.uniform(0.15, 0.35))
        c = (host.centre_um[0] + d * rx * math.cos(ang), host.centre_um[1] + d * ry * math.sin(ang))
        r = float(rng.uniform(0.18, 0.28)) * min(rx, ry)
        tumors.append(Blob(c, (r, r * float(rng.uniform(0.7, 1.0))), angle_deg=float(rng.uniform(0, 180)),
                            wobble=0.2, lobes=4, phase=float(rng.uniform(0, 6))))
    width = x - 400.0 + margin
    height = height + 2 * margin
    strokes = []
    if pen:
        # Marker lines on the glass, below the tissue: blue, green and a black dot.
        y = height + 300.0
        strokes = [
            PenStroke(((margin, y), (margin + 0.3 * width, y + 150)), "blue"),
            PenStroke(((margin + 0.4 * width, y + 100), (margin + 0.6 * width, y)), "green"),
            PenStroke(((margin + 0.75 * width, y), (margin + 0.75 * width + 60, y + 60)), "black", 200.0),
        ]
        height = y + 150 + 400.0
    return SyntheticSpec((width, height), tuple(blobs), tuple(tumors), tuple(faint_blobs), tuple(strokes), seed)


#: One large tumour in one tissue section: big enough that the IoU of a heatmap at 31 um/px with
#: the truth is meaningful (tests/test_infer.py, scripts/bench_alignment.py). At 0.243 um/px its
#: level 0 (10700 x 8228 px) divides by 4, so OpenSlide's level-2 downsample is exactly 4.
ALIGNMENT_SPEC = SyntheticSpec(
    size_um=(2600.0, 1999.3),
    tissue=(Blob((1300.0, 1000.0), (1050.0, 780.0), angle_deg=10, wobble=0.1, lobes=5, phase=0.3),),
    tumors=(Blob((1150.0, 950.0), (380.0, 290.0), angle_deg=30, wobble=0.15, lobes=4, phase=1.0),),
    seed=11,
)


# --------------------------------------------------------------------------------------------
# Rendering


class _Texture:
    """Periodic H&E-like textures, one period = one tile at level 0, block-averaged for coarser
    levels; tiles start at multiples of the tile size, so each (texture, level) is one tile."""

    def __init__(self, seed: int, tile: int):
        rng = np.random.default_rng(seed + 1)
        self.tile = tile
        scale = (tile / 512) ** 2
        self._l0 = {
            "normal": self._make(rng, *_NORMAL, n_nuclei=int(260 * scale), radius=(5, 8)),
            "tumor": self._make(rng, *_TUMOR, n_nuclei=int(300 * scale), radius=(8, 13)),
            "faint": self._make(rng, *_FAINT, n_nuclei=int(200 * scale), radius=(5, 8)),
            "background": self._noise(rng, _BACKGROUND, 2.0),
        }
        self._cache: dict[tuple[str, int], np.ndarray] = {}

    def _noise(self, rng, colour, sigma) -> np.ndarray:
        base = np.asarray(colour, np.float32)
        return base + rng.normal(0, sigma, (self.tile, self.tile, 3)).astype(np.float32)

    def _make(self, rng, base, nucleus, *, n_nuclei, radius) -> np.ndarray:
        from skimage.draw import disk

        p = self.tile
        img = self._noise(rng, base, 6.0)
        nuc = np.asarray(nucleus, np.float32)
        for _ in range(n_nuclei):
            r = rng.uniform(*radius)
            cy, cx = rng.uniform(0, p, 2)
            rr, cc = disk((cy, cx), r, shape=None)
            img[rr % p, cc % p] = np.clip(nuc * rng.uniform(0.85, 1.15), 0, 255)
        return img

    def level_tile(self, name: str, k: int) -> np.ndarray:
        """A full (tile, tile, 3) uint8 tile of texture ``name`` at downsample ``k``."""
        key = (name, k)
        if key not in self._cache:
            t = self._l0[name]
            n = max(self.tile // k, 1)  # period at this level, in level pixels
            kk = self.tile // n
            t = t.reshape(n, kk, n, kk, 3).mean(axis=(1, 3))
            reps = self.tile // n
            self._cache[key] = np.clip(np.round(np.tile(t, (reps, reps, 1))), 0, 255).astype(np.uint8)
        return self._cache[key]


class _Shapes:
    """The spec's regions as prepared shapely geometries (micrometres), to classify whole tiles."""

    def __init__(self, spec: SyntheticSpec):
        self.spec = spec
        self.normal = shapely.union_all([b.polygon_um() for b in spec.tissue])
        self.faint = shapely.union_all([b.polygon_um() for b in spec.faint]) if spec.faint else Polygon()
        self.tumor = spec.tumor_um()
        self.pen = shapely.union_all([s.geometry_um() for s in spec.pen]) if spec.pen else Polygon()
        self.anything = shapely.union_all([self.normal, self.faint, self.pen])
        for g in (self.normal, self.faint, self.tumor, self.pen, self.anything):
            shapely.prepare(g)


def _render_tile(shapes: _Shapes, tex: _Texture, *, mpp: float, k: int, lvl_y: int, lvl_x: int,
                 tile: int) -> np.ndarray:
    """One (tile, tile, 3) uint8 tile of the level with downsample ``k`` at level px (lvl_x, lvl_y)."""
    spec = shapes.spec
    px_um = mpp * k
    x0_um, y0_um = lvl_x * px_um, lvl_y * px_um
    x1_um, y1_um = x0_um + tile * px_um, y0_um + tile * px_um
    box = shapely.box(x0_um, y0_um, x1_um, y1_um)
    # Whole-tile fast paths: most tiles are all glass or all of one tissue class.
    if not shapes.anything.intersects(box):
        return tex.level_tile("background", k)
    if shapes.tumor.contains(box):
        return tex.level_tile("tumor", k)
    if shapes.normal.contains(box) and not shapes.tumor.intersects(box) and not shapes.pen.intersects(box):
        return tex.level_tile("normal", k)

    # Pixel centres in micrometres.
    ys = (np.arange(lvl_y, lvl_y + tile) + 0.5)[:, None] * px_um
    xs = (np.arange(lvl_x, lvl_x + tile) + 0.5)[None, :] * px_um
    out = tex.level_tile("background", k)

    def hits(bounds):
        bx0, by0, bx1, by1 = bounds
        return bx1 >= x0_um and bx0 <= x1_um and by1 >= y0_um and by0 <= y1_um

    def union_mask(blobs) -> np.ndarray | None:
        near = [b for b in blobs if hits(b.bounds_um())]
        if not near:
            return None
        m = np.zeros((tile, tile), bool)
        for b in near:
            m |= b.contains(xs, ys)
        return m

    faint = union_mask(spec.faint)
    if faint is not None:
        out = np.where(faint[..., None], tex.level_tile("faint", k), out)
    normal = union_mask(spec.tissue)
    if normal is not None:
        out = np.where(normal[..., None], tex.level_tile("normal", k), out)
        tumor = union_mask(spec.tumors)
        if tumor is not None:
            out = np.where((tumor & normal)[..., None], tex.level_tile("tumor", k), out)
    for s in spec.pen:
        if hits(s.geometry_um().bounds):
            m = _capsules_contain(s, xs, ys)
            out = np.where(m[..., None], np.asarray(PEN_COLOURS[s.colour], np.uint8), out)
    return out


def _capsules_contain(stroke: PenStroke, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """Points within width/2 of the stroke's polyline."""
    r = stroke.width_um / 2
    m = np.zeros(np.broadcast_shapes(xs.shape, ys.shape), bool)
    pts = stroke.points_um
    for (ax, ay), (bx, by) in zip(pts[:-1], pts[1:]):
        dx, dy = bx - ax, by - ay
        L2 = dx * dx + dy * dy or 1e-12
        t = np.clip(((xs - ax) * dx + (ys - ay) * dy) / L2, 0, 1)
        m |= (xs - ax - t * dx) ** 2 + (ys - ay - t * dy) ** 2 <= r * r
    return m


def _level_sizes(l0_size: tuple[int, int], *, min_size: int) -> list[tuple[int, int]]:
    """(w, h) per level, halving (rounding up) until the longer side is <= min_size."""
    sizes = [l0_size]
    while max(sizes[-1]) > min_size:
        w, h = sizes[-1]
        sizes.append((math.ceil(w / 2), math.ceil(h / 2)))
    return sizes


def write_pyramidal_tiff(
    path: str | Path,
    level_tiles,
    *,
    l0_size: tuple[int, int],
    mpp: float | None,
    flavour: Flavour = "tiff",
    tile: int = 512,
    min_level_size: int = 512,
    quality: int = 90,
    description: str = SYNTHETIC_LABEL,
) -> list[tuple[int, int]]:
    """Write a tiled, JPEG-compressed, pyramidal TIFF (or Aperio SVS) from a tile source.

    ``level_tiles(k, lvl_x, lvl_y, tile)`` returns the (tile, tile, 3) uint8 tile of the level
    with downsample ``k`` whose top-left is (lvl_x, lvl_y). Levels halve (rounding up) until the
    longer side is at most ``min_level_size``. Returns the level sizes (w, h). ``mpp=None`` or
    flavour ``"tiff-nores"`` writes no resolution. Written to a temporary name, then renamed.
    """
    import tifffile

    path = Path(path)
    if flavour not in FLAVOURS:
        raise ConfigError(f"flavour must be one of {', '.join(FLAVOURS)}; got {flavour!r}")
    svs = flavour.startswith("svs")
    j2k = flavour == "svs-j2k"
    sizes = _level_sizes(l0_size, min_size=min_level_size)
    w0, h0 = l0_size

    def tiles(level: int) -> Iterator[np.ndarray | bytes]:
        k = 2**level
        w, h = sizes[level]
        for ty in range(0, h, tile):
            for tx in range(0, w, tile):
                t = level_tiles(k, tx, ty, tile)
                yield _jp2k_ycbcr_tile(t, quality) if j2k else t

    with atomic_path(path) as tmp, tifffile.TiffWriter(tmp, bigtiff=w0 * h0 * 3 > 2**31) as tw:
        for level, (w, h) in enumerate(sizes):
            k = 2**level
            kw: dict = dict(
                shape=(h, w, 3), dtype=np.uint8, tile=(tile, tile), photometric="rgb",
                compression="jpeg", compressionargs={"level": quality}, metadata=None,
                subfiletype=0 if level == 0 else 1,
            )
            if j2k:  # tiles arrive encoded (bytes); tifffile writes them as they are
                kw.update(compression=APERIO_JP2K_YCBCR, compressionargs=None)
            if mpp is not None and flavour == "tiff":
                ppcm = 1e4 / (mpp * k)
                kw.update(resolution=(ppcm, ppcm), resolutionunit="CENTIMETER")
            if svs:
                head = f"Aperio Image Library v12.0.15 \r\n{w0}x{h0} [0,0 {w0}x{h0}] ({tile}x{tile})"
                if level > 0:
                    head += f" -> {w}x{h}"
                mpp_txt = f"|MPP = {mpp:.6f}" if mpp is not None and flavour != "svs-nompp" else ""
                codec = "J2K/YUV16" if j2k else "JPEG/RGB"
                kw["description"] = f"{head} {codec} Q={quality}|AppMag = 40{mpp_txt}|Title = {description}"
                kw["subfiletype"] = 0
            else:
                kw["description"] = description if level == 0 else None
            tw.write(tiles(level), **kw)  # type: ignore[arg-type]  # tifffile takes an iterator of tiles (arrays or encoded bytes)
            if svs and level == 0:
                # Aperio's second directory: a stripped thumbnail (an associated image, not a level).
                thumb_level = len(sizes) - 1
                tk = 2**thumb_level
                tw_, th_ = sizes[thumb_level]
                thumb = np.concatenate(
                    [np.concatenate([level_tiles(tk, tx, ty, tile) for tx in range(0, tw_, tile)], axis=1)
                     for ty in range(0, th_, tile)], axis=0)[:th_, :tw_]
                tw.write(thumb, photometric="rgb", compression="jpeg", compressionargs={"level": quality},
                         metadata=None,
                         description=f"Aperio Image Library v12.0.15 \r\n{w0}x{h0} -> {tw_}x{th_} - "
                                     f"|Title = {description}")
    return sizes


def _jp2k_ycbcr_tile(rgb: np.ndarray, quality: int) -> bytes:
    """One tile as Aperio writes JPEG 2000 (compression 33003): RGB -> JFIF full-range YCbCr
    (PIL), encoded without the codestream's own colour transform (``mct=False``)."""
    import imagecodecs
    from PIL import Image

    ycc = np.asarray(Image.fromarray(np.ascontiguousarray(rgb)).convert("YCbCr"))
    # quality 90 -> PSNR 45 dB-ish; 100 -> reversible (lossless)
    if quality >= 100:
        return bytes(imagecodecs.jpeg2k_encode(ycc, codecformat="J2K", mct=False, reversible=True))
    return bytes(imagecodecs.jpeg2k_encode(ycc, level=max(30, quality // 2), codecformat="J2K", mct=False))


def write_synthetic_slide(
    path: str | Path,
    spec: SyntheticSpec | None = None,
    *,
    mpp: float = 0.243,
    flavour: Flavour = "tiff",
    tile: int = 512,
    xml: bool = True,
    quality: int = 90,
) -> SyntheticSlide:
    """Render ``spec`` (default :func:`make_spec`) at ``mpp`` um/px into ``path``.

    Returns the slide's truth (tissue and tumour regions) in level-0 pixels. With ``xml=True``
    the tumour regions are also written as ASAP XML (Camelyon16's format) at ``path`` with
    suffix ``.xml``.
    """
    mpp = check_number(mpp, "mpp", positive=True, unit="um/px")
    spec = spec or make_spec()
    path = Path(path)
    if tile < 16 or tile & (tile - 1):
        raise ConfigError(f"tile must be a power of two >= 16; got {tile}")
    tex = _Texture(spec.seed, tile)
    shapes = _Shapes(spec)
    l0_size = (math.ceil(spec.size_um[0] / mpp), math.ceil(spec.size_um[1] / mpp))

    def level_tiles(k, lvl_x, lvl_y, t):
        return _render_tile(shapes, tex, mpp=mpp, k=k, lvl_y=lvl_y, lvl_x=lvl_x, tile=t)

    tiff_mpp = None if flavour in ("tiff-nores", "svs-nompp") else mpp
    write_pyramidal_tiff(path, level_tiles, l0_size=l0_size, mpp=tiff_mpp, flavour=flavour, tile=tile, quality=quality)
    tissue_l0 = scale_xy(spec.tissue_um(), 1.0 / mpp)
    tumor_l0 = scale_xy(spec.tumor_um(), 1.0 / mpp)
    xml_path = None
    if xml:
        from wsi_toolkit.annotations import Annotation, write_asap_xml

        xml_path = path.with_suffix(".xml")
        parts = getattr(tumor_l0, "geoms", [tumor_l0]) if not tumor_l0.is_empty else []
        write_asap_xml(xml_path, [Annotation(polygon=p, group="Tumor", name=f"Annotation {i}")
                                  for i, p in enumerate(parts)])
    return SyntheticSlide(path, xml_path, mpp, flavour, l0_size, spec, tissue_l0, tumor_l0)
