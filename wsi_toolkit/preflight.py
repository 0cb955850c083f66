"""Preflight of a slide before a run: can it be read, at what scale, how much tissue, how many patches.

:func:`inspect_slide` never raises for a bad slide: it returns a :class:`SlideReport` with
``ok=False`` and the error, so a batch goes on with the other slides.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from wsi_toolkit.atomic import atomic_path
from wsi_toolkit.errors import NoPatchesError, WsiToolkitError
from wsi_toolkit.slide import SlideReader, open_slide
from wsi_toolkit.tiling import GridConfig, PatchGrid, make_grid
from wsi_toolkit.tissue import TissueConfig, TissueMask, detect_tissue

__all__ = ["SlideReport", "inspect_slide", "render_qc", "patch_tiles", "check_read_tiles", "DEFAULT_CHECK_TILES"]

log = logging.getLogger(__name__)

#: Tiles of the inference level decoded by default by :func:`inspect_slide` (~1 s of decoding).
DEFAULT_CHECK_TILES = 64


@dataclass
class SlideReport:
    """What :func:`inspect_slide` found. Sizes are (width, height) in pixels."""

    path: str
    ok: bool = False
    error: str | None = None
    error_type: str | None = None
    backend: str | None = None
    vendor: str | None = None
    synthetic: bool = False
    mpp: float | None = None
    mpp_source: str | None = None
    mpp_metadata: list[float] | None = None  # (x, y) um/px the file says, as run.json's slide.mpp_metadata
    level0_size: list[int] | None = None
    level_count: int | None = None
    level_dimensions: list[list[int]] = field(default_factory=list)
    level_mpp: list[float] = field(default_factory=list)
    read_level: int | None = None
    tissue_mm2: float | None = None
    tissue_threshold: float | None = None
    n_patches: int | None = None
    tiles_checked: int | None = None
    tiles_under_patches: int | None = None
    grid: dict | None = None
    qc_png: str | None = None
    seconds: float | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def inspect_slide(
    path: str | Path,
    *,
    mpp: float | None = None,
    backend: str = "auto",
    tissue: TissueConfig = TissueConfig(),
    grid: GridConfig = GridConfig(),
    qc_path: str | Path | None = None,
    check_tiles: int | None = DEFAULT_CHECK_TILES,
) -> SlideReport:
    """Open ``path``, find tissue on a ``tissue.thumb_mpp`` thumbnail, count the grid's patches, and
    decode the stored tiles inference will read.

    ``mpp`` overrides the slide's metadata. With ``qc_path`` a QC picture (thumbnail, tissue
    outline, kept grid cells) is written there as PNG.

    What is decoded: the thumbnail decodes every tile of the level it is read from; inference reads
    another level (``read_level``, the one for the model's um/px), so of the tiles of that level
    under the kept patches ``check_tiles`` are decoded too (evenly spread over them, first and last
    included; ``None`` = all of them, 0 = none). A damaged tile there fails the slide here, with the
    error inference would give, instead of an "ok" followed by a failed run.

    A slide with tissue but no kept patch fails (:class:`~wsi_toolkit.errors.NoPatchesError`).
    """
    t0 = time.perf_counter()
    report = SlideReport(path=str(path))
    try:
        with open_slide(path, mpp=mpp, backend=backend) as slide:  # type: ignore[arg-type]  # checked by open_slide
            report.backend, report.vendor = slide.backend, slide.vendor
            report.synthetic = slide.is_synthetic
            report.mpp, report.mpp_source = slide.mpp, slide.mpp_source
            report.mpp_metadata = None if slide.mpp_metadata is None else [float(v) for v in slide.mpp_metadata]
            report.level0_size = list(slide.dimensions)
            report.level_count = slide.level_count
            report.level_dimensions = [list(d) for d in slide.level_dimensions]
            report.level_mpp = [round(slide.level_mpp(i), 6) for i in range(slide.level_count)]
            report.read_level = slide.best_level_for_mpp(grid.spacing_um_px)
            thumb = slide.thumbnail(mpp=tissue.thumb_mpp)
            mask = detect_tissue(thumb, l0_mpp=slide.mpp, config=tissue)
            try:
                patch_grid = make_grid(l0_size=slide.dimensions, l0_mpp=slide.mpp, config=grid,
                                       tissue_mask=mask.mask, mask_l0_per_px=mask.l0_per_px)
            except NoPatchesError as exc:
                raise NoPatchesError(f"{path}: {exc}") from None
            report.tissue_mm2 = round(mask.area_mm2(), 4)
            report.tissue_threshold = round(mask.threshold, 4)
            report.n_patches = len(patch_grid)
            report.tiles_under_patches, report.tiles_checked = check_read_tiles(
                slide, patch_grid, report.read_level, check_tiles)
            report.grid = {**grid.to_dict(), "shape_rc": list(patch_grid.shape_rc),
                           "cell_l0": patch_grid.cell_l0, "patch_l0": patch_grid.patch_l0}
            if qc_path is not None:
                render_qc(thumb, mask, patch_grid, qc_path, title=_qc_title(report, slide))
                report.qc_png = str(qc_path)
            report.ok = True
    except WsiToolkitError as exc:
        report.error, report.error_type = str(exc), type(exc).__name__
    except Exception as exc:  # an unexpected failure on one slide must not stop a batch
        log.exception("unexpected error inspecting %s", path)
        report.error, report.error_type = f"{path}: unexpected {type(exc).__name__}: {exc}", type(exc).__name__
    report.seconds = round(time.perf_counter() - t0, 3)
    return report


def patch_tiles(slide: SlideReader, grid: PatchGrid, level: int) -> np.ndarray:
    """(tile_x, tile_y) of the stored tiles of ``level`` that the kept patches' reads touch (with the
    resampling margin of :meth:`SlideReader.read_at_mpp`), int64 (K, 2), row-major."""
    tw, th = slide.tile_size(level) or (512, 512)
    lw, lh = slide.level_dimensions[level]
    ntx, nty = -(-lw // tw), -(-lh // th)
    if len(grid) == 0:
        return np.zeros((0, 2), np.int64)
    ds = slide.level_downsamples[level]
    margin = int(np.ceil(max(grid.config.spacing_um_px / slide.level_mpp(level), 1.0))) + 1
    xy = grid.patch_l0_xy() / ds
    x0 = np.floor(xy[:, 0]).astype(np.int64) - margin
    y0 = np.floor(xy[:, 1]).astype(np.int64) - margin
    x1 = np.ceil(xy[:, 0] + grid.patch_l0 / ds).astype(np.int64) + margin
    y1 = np.ceil(xy[:, 1] + grid.patch_l0 / ds).astype(np.int64) + margin
    tx0, tx1 = np.clip(x0 // tw, 0, ntx - 1), np.clip((x1 - 1) // tw, 0, ntx - 1)
    ty0, ty1 = np.clip(y0 // th, 0, nty - 1), np.clip((y1 - 1) // th, 0, nty - 1)
    touched = np.zeros((nty, ntx), bool)
    for dy in range(int((ty1 - ty0).max()) + 1):
        for dx in range(int((tx1 - tx0).max()) + 1):
            touched[np.minimum(ty0 + dy, ty1), np.minimum(tx0 + dx, tx1)] = True
    return np.argwhere(touched)[:, ::-1].astype(np.int64)


def check_read_tiles(slide: SlideReader, grid: PatchGrid, level: int, n: int | None) -> tuple[int, int]:
    """Decode ``n`` (None = all) of the tiles of ``level`` under the kept patches, evenly spread.
    Returns (tiles under the patches, tiles decoded); a damaged tile raises SlideReadError."""
    tiles = patch_tiles(slide, grid, level)
    total = len(tiles)
    if n is not None and total > n:
        pick: np.ndarray | list[int] = np.unique(np.linspace(0, total - 1, n).round().astype(np.int64)) if n > 0 else []
        tiles = tiles[pick]
    slide.decode_tiles(level, [tuple(t) for t in tiles])
    return total, len(tiles)


def _qc_title(report: SlideReport, slide: SlideReader) -> str:
    name = Path(report.path).name
    tag = "SYNTHETIC slide - " if report.synthetic else ""
    return (f"{tag}{name}: {slide.mpp:.4f} um/px ({slide.mpp_source}), tissue {report.tissue_mm2:.2f} mm2, "
            f"{report.n_patches} patches")


def render_qc(thumb: np.ndarray, mask: TissueMask, grid: PatchGrid, path: str | Path, *, title: str = "") -> None:
    """Write a QC picture: thumbnail, kept grid cells tinted green, tissue outline in blue.

    The picture is at the thumbnail's resolution (upscaled to at least 1000 px wide so small
    slides stay legible), with a caption bar. Written atomically.
    """
    from PIL import Image, ImageDraw

    h, w = thumb.shape[:2]
    up = max(1, int(np.ceil(1000 / max(w, 1))))
    img = Image.fromarray(thumb).resize((w * up, h * up), Image.Resampling.NEAREST)
    # Kept cells as a translucent tint, drawn at the cell geometry (cells scaled to thumbnail px).
    tint = Image.new("RGBA", img.size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(tint)
    cell_px = grid.cell_l0 / mask.l0_per_px * up
    for r, c in grid.grid_rc:
        x0, y0 = c * cell_px, r * cell_px
        draw.rectangle([x0, y0, x0 + cell_px, y0 + cell_px], fill=(0, 200, 0, 70))
    img = Image.alpha_composite(img.convert("RGBA"), tint)
    draw = ImageDraw.Draw(img)
    scale = up / mask.l0_per_px  # level-0 px -> picture px
    for poly in mask.polygons().geoms:
        for ring in [poly.exterior, *poly.interiors]:
            pts = [(x * scale, y * scale) for x, y in ring.coords]
            draw.line(pts, fill=(0, 60, 255, 255), width=max(2, up))
    bar = 28
    out = Image.new("RGB", (img.width, img.height + bar), (255, 255, 255))
    out.paste(img.convert("RGB"), (0, bar))
    ImageDraw.Draw(out).text((6, 8), title + "  [blue: tissue outline, green: kept patch cells]", fill=(0, 0, 0))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        out.save(tmp, format="PNG")
