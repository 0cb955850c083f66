"""The patch grid: where the model looks, at its own physical resolution.

Convention (the origin and the cells)
-------------------------------------
The grid divides the slide into square *cells* of ``stride_px`` model pixels, i.e.
``cell_l0 = stride_px * spacing_um_px / l0_mpp`` level-0 pixels. Cell ``(r, c)`` covers
level-0 ``[c * cell_l0, (c + 1) * cell_l0) x [r * cell_l0, (r + 1) * cell_l0)``; cell ``(0, 0)``
starts at the slide's top-left corner. The patch of a cell is ``patch_px`` model pixels centred
on the cell, so its top-left corner is at

    l0_xy = (c * cell_l0 - offset_l0, r * cell_l0 - offset_l0),
    offset_l0 = (patch_px - stride_px) / 2 * spacing_um_px / l0_mpp

For PCam (96 px at 0.972 um/px, stride 32) the cell is exactly the 32x32 centre region that a
PCam label speaks about, so one probability per cell is a dense, seamless heatmap whose pixel
``[r, c]`` is cell ``(r, c)``. Patches at the slide border reach outside it (read as white glass).

A cell is kept when tissue covers at least ``min_tissue_fraction`` of it (its area is measured
exactly on the tissue mask, pixel overlaps included). Kept cells are listed in row-major order.
Level-0 positions are floats: on a 0.226 um/px slide one PCam cell is 137.6 level-0 pixels.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np

from wsi_toolkit.errors import ConfigError, NoPatchesError
from wsi_toolkit.limits import (
    MAX_GRID_CELLS,
    MPP_RANGE_UM,
    PATCH_PX_RANGE,
    SLIDE_MAX_SIDE_PX,
    SPACING_RANGE_UM,
    STRIDE_PX_RANGE,
    in_range,
    range_text,
)

__all__ = ["GridConfig", "PatchGrid", "make_grid", "cell_coverage"]


@dataclass(frozen=True)
class GridConfig:
    """The patch grid, in the model's pixels. Defaults are PCam's: 96 px at 0.972 um/px, stride 32.

    Accepted: ``patch_px`` 8..4096, ``stride_px`` 1..4096, ``spacing_um_px`` 0.05..20 um/px,
    ``min_tissue_fraction`` 0..1 (reasons in :mod:`wsi_toolkit.limits`); else :class:`ConfigError`.
    """

    patch_px: int = 96
    spacing_um_px: float = 0.972
    stride_px: int = 32
    min_tissue_fraction: float = 0.5

    def __post_init__(self) -> None:
        # Ranges and their reasons: wsi_toolkit.limits (patch 8..4096 px, spacing 0.05..20 um/px).
        if not in_range(self.patch_px, PATCH_PX_RANGE, integer=True):
            raise ConfigError("patch_px must be an integer number of model pixels in "
                              f"{range_text(PATCH_PX_RANGE, 'px')} "
                              f"(PCam: 96); got {self.patch_px!r}")
        if not in_range(self.stride_px, STRIDE_PX_RANGE, integer=True):
            raise ConfigError(f"stride_px must be an integer number of model pixels in "
                              f"{range_text(STRIDE_PX_RANGE, 'px')} (PCam: 32); got {self.stride_px!r}")
        if not in_range(self.spacing_um_px, SPACING_RANGE_UM):
            raise ConfigError(f"spacing_um_px must be the model's micrometres per pixel in "
                              f"{range_text(SPACING_RANGE_UM, 'um/px')} (PCam: 0.972); got {self.spacing_um_px!r}")
        if not in_range(self.min_tissue_fraction, (0.0, 1.0)):
            raise ConfigError(f"min_tissue_fraction must be in [0, 1]; got {self.min_tissue_fraction!r}")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class PatchGrid:
    """Kept cells of the grid over one slide. See the module docstring for the convention.

    Attributes
    ----------
    config : GridConfig
    l0_mpp : float
        um per level-0 pixel of the slide.
    l0_size : (int, int)
        (width, height) of level 0.
    shape_rc : (int, int)
        (rows, cols) of the full grid covering the slide: ``ceil(h0 / cell_l0)``, ``ceil(w0 / cell_l0)``.
    grid_rc : ndarray, int64, (N, 2)
        (row, col) of each kept cell, row-major order.
    tissue_fraction : ndarray, float32, (N,)
        Tissue coverage of each kept cell (1.0 when no tissue mask was given).
    """

    config: GridConfig
    l0_mpp: float
    l0_size: tuple[int, int]
    shape_rc: tuple[int, int]
    grid_rc: np.ndarray
    tissue_fraction: np.ndarray = field(repr=False)

    def __len__(self) -> int:
        return len(self.grid_rc)

    @property
    def l0_per_px(self) -> float:
        """Level-0 pixels per model pixel."""
        return self.config.spacing_um_px / self.l0_mpp

    @property
    def cell_l0(self) -> float:
        """Side of a cell in level-0 pixels."""
        return self.config.stride_px * self.l0_per_px

    @property
    def patch_l0(self) -> float:
        """Side of a patch in level-0 pixels."""
        return self.config.patch_px * self.l0_per_px

    @property
    def offset_l0(self) -> float:
        """How far a patch's top-left lies up and left of its cell's top-left, in level-0 pixels."""
        return (self.config.patch_px - self.config.stride_px) / 2 * self.l0_per_px

    def cell_l0_xy(self, grid_rc: np.ndarray | None = None) -> np.ndarray:
        """Top-left (x, y) of cells in level-0 px, float64 (N, 2). Default: the kept cells."""
        rc = self.grid_rc if grid_rc is None else np.asarray(grid_rc)
        return rc[:, ::-1].astype(np.float64) * self.cell_l0

    def patch_l0_xy(self, grid_rc: np.ndarray | None = None) -> np.ndarray:
        """Top-left (x, y) of the patches in level-0 px, float64 (N, 2). Default: the kept cells."""
        return self.cell_l0_xy(grid_rc) - self.offset_l0

    def rc_from_l0(self, l0_xy: np.ndarray) -> np.ndarray:
        """(row, col) of the cell containing each level-0 point (x, y); int64 (N, 2)."""
        xy = np.atleast_2d(np.asarray(l0_xy, np.float64))
        return np.floor(xy[:, ::-1] / self.cell_l0).astype(np.int64)

    def keep_mask(self) -> np.ndarray:
        """Bool (rows, cols) image of the kept cells (the heatmap's support)."""
        m = np.zeros(self.shape_rc, bool)
        m[self.grid_rc[:, 0], self.grid_rc[:, 1]] = True
        return m


def _overlap_matrix(n_cells: int, cell: float, n_px: int):
    """Sparse (n_cells, n_px): fraction of each cell's 1-D interval covered by each mask pixel.

    Cell i spans [i * cell, (i + 1) * cell) and pixel j spans [j, j + 1), both in mask pixels.
    """
    from scipy.sparse import csr_matrix

    rows, cols, vals = [], [], []
    for i in range(n_cells):
        a, b = i * cell, (i + 1) * cell
        j0, j1 = int(math.floor(a)), min(int(math.ceil(b)), n_px)
        for j in range(max(j0, 0), j1):
            ov = min(b, j + 1) - max(a, j)
            if ov > 0:
                rows.append(i)
                cols.append(j)
                vals.append(ov / cell)
    return csr_matrix((vals, (rows, cols)), shape=(n_cells, n_px), dtype=np.float64)


def cell_coverage(mask: np.ndarray, *, mask_l0_per_px: float, cell_l0: float, shape_rc: tuple[int, int]) -> np.ndarray:
    """Fraction of each grid cell covered by ``mask``, as float32 (rows, cols).

    ``mask`` is bool (H, W) whose pixel [i, j] covers level-0 ``[j*k, (j+1)*k) x [i*k, (i+1)*k)``
    with ``k = mask_l0_per_px``; cells are squares of ``cell_l0`` level-0 pixels from (0, 0).
    Exact area overlap (separable: rows and columns weighted by interval overlaps).
    """
    n_rows, n_cols = shape_rc
    cell = cell_l0 / mask_l0_per_px  # cell side in mask pixels
    wy = _overlap_matrix(n_rows, cell, mask.shape[0])
    wx = _overlap_matrix(n_cols, cell, mask.shape[1])
    m = np.asarray(mask, np.float64)
    cov = wy @ m @ wx.T  # (rows, H) (H, W) (W, cols)
    return np.asarray(cov, np.float32)


def make_grid(
    *,
    l0_size: tuple[int, int],
    l0_mpp: float,
    config: GridConfig = GridConfig(),
    tissue_mask: np.ndarray | None = None,
    mask_l0_per_px: float | None = None,
    require_patches: bool = True,
) -> PatchGrid:
    """The grid over a slide of ``l0_size`` (w, h) level-0 px at ``l0_mpp`` um/px.

    With ``tissue_mask`` (bool, pixel [i, j] covering level-0 ``[j*k, (j+1)*k)`` ... with
    ``k = mask_l0_per_px``, as :class:`wsi_toolkit.tissue.TissueMask` gives), only cells with
    at least ``config.min_tissue_fraction`` tissue (and some tissue) are kept; without, all cells.

    Raises
    ------
    NoPatchesError
        The mask has tissue but no cell is kept (unless ``require_patches=False``): a run on it
        would "succeed" with nothing analysed. A mask without tissue gives an empty grid.
    ConfigError
        ``l0_mpp`` outside [0.05, 20] um/px, a bad size, or more than
        :data:`wsi_toolkit.limits.MAX_GRID_CELLS` cells.
    """
    if not in_range(l0_mpp, MPP_RANGE_UM):
        raise ConfigError(f"l0_mpp must be the slide's micrometres per pixel in {range_text(MPP_RANGE_UM, 'um/px')}; "
                          f"got {l0_mpp!r}")
    try:
        w0, h0 = (int(v) for v in l0_size)
    except (TypeError, ValueError, OverflowError):
        raise ConfigError(f"l0_size must be (width, height) in level-0 px; got {l0_size!r}") from None
    if not (0 < w0 <= SLIDE_MAX_SIDE_PX and 0 < h0 <= SLIDE_MAX_SIDE_PX):
        raise ConfigError(f"l0_size must be positive and at most {SLIDE_MAX_SIDE_PX:,} px a side; got {l0_size!r}")
    cell_l0 = config.stride_px * config.spacing_um_px / l0_mpp
    shape_rc = (math.ceil(h0 / cell_l0 - 1e-9), math.ceil(w0 / cell_l0 - 1e-9))
    if shape_rc[0] * shape_rc[1] > MAX_GRID_CELLS:
        raise ConfigError(
            f"the grid over a {w0:,} x {h0:,} px slide at {l0_mpp:g} um/px with stride {config.stride_px} px at "
            f"{config.spacing_um_px:g} um/px has {shape_rc[0]:,} x {shape_rc[1]:,} cells, "
            f"more than {MAX_GRID_CELLS:,}; "
            "use a larger stride")
    if tissue_mask is None:
        grid_rc = np.empty((shape_rc[0] * shape_rc[1], 2), np.int64)  # row-major, no temporaries
        grid_rc[:, 0], grid_rc[:, 1] = np.divmod(np.arange(len(grid_rc), dtype=np.int64), shape_rc[1])
        frac = np.ones(len(grid_rc), np.float32)
    else:
        if mask_l0_per_px is None or not mask_l0_per_px > 0:
            raise ConfigError("mask_l0_per_px (level-0 px per mask px) is required with tissue_mask")
        cov = cell_coverage(np.asarray(tissue_mask, bool), mask_l0_per_px=mask_l0_per_px, cell_l0=cell_l0,
                            shape_rc=shape_rc)
        keep = (cov >= config.min_tissue_fraction - 1e-6) & (cov > 0)
        grid_rc = np.argwhere(keep).astype(np.int64)  # row-major
        frac = cov[keep].astype(np.float32)
        if len(grid_rc) == 0 and require_patches and np.any(tissue_mask):
            tissue_um2 = float(np.count_nonzero(tissue_mask)) * (mask_l0_per_px * l0_mpp) ** 2
            best = float(cov.max()) if cov.size else 0.0
            raise NoPatchesError(
                f"the slide has tissue ({tissue_um2 / 1e6:.3g} mm^2) but no grid cell is kept: cells are "
                f"{cell_l0 * l0_mpp:,.1f} um ({config.stride_px} px at {config.spacing_um_px:g} um/px) and the best "
                f"is {best * 100:.3g}% tissue, below min_tissue_fraction {config.min_tissue_fraction:g}; "
                "lower --min-tissue, "
                "or check the model's patch_size_pixels/spacing_um_px and the stride")
    return PatchGrid(config=config, l0_mpp=float(l0_mpp), l0_size=(w0, h0), shape_rc=shape_rc,
                     grid_rc=grid_rc, tissue_fraction=frac)
