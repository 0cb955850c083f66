"""The patch grid: geometry, origin convention, tissue filtering, round trips."""

from __future__ import annotations

import math

import numpy as np
import pytest

from wsi_toolkit.errors import ConfigError
from wsi_toolkit.tiling import GridConfig, cell_coverage, make_grid


@pytest.mark.parametrize("l0_mpp", [0.243, 0.226, 0.5])
def test_cell_and_patch_size_follow_physical_scale(l0_mpp):
    grid = make_grid(l0_size=(1000, 800), l0_mpp=l0_mpp)
    # 32 px at 0.972 um/px = 31.104 um; 96 px = 93.312 um.
    assert grid.cell_l0 * l0_mpp == pytest.approx(31.104)
    assert grid.patch_l0 * l0_mpp == pytest.approx(93.312)
    assert grid.shape_rc == (math.ceil(800 * l0_mpp / 31.104), math.ceil(1000 * l0_mpp / 31.104))


def test_pcam_patch_is_centred_on_its_cell():
    grid = make_grid(l0_size=(4000, 4000), l0_mpp=0.243)
    # Cell (r, c) = level-0 [c*128, (c+1)*128); its 96 px patch (384 l0 px) starts one cell up-left.
    rc = np.array([[0, 0], [2, 5]])
    assert np.allclose(grid.cell_l0_xy(rc), [[0, 0], [5 * 128, 2 * 128]])
    assert np.allclose(grid.patch_l0_xy(rc), [[-128, -128], [4 * 128, 1 * 128]])
    centres = grid.patch_l0_xy(rc) + grid.patch_l0 / 2
    assert np.allclose(centres, grid.cell_l0_xy(rc) + grid.cell_l0 / 2)


def test_stride_equal_to_patch_has_no_offset():
    grid = make_grid(l0_size=(4000, 4000), l0_mpp=0.243, config=GridConfig(stride_px=96))
    assert grid.offset_l0 == 0
    assert np.allclose(grid.patch_l0_xy(np.array([[1, 2]])), [[2 * 384, 384]])


@pytest.mark.parametrize("l0_mpp", [0.243, 0.226])
def test_grid_to_l0_round_trip(l0_mpp):
    grid = make_grid(l0_size=(3001, 2003), l0_mpp=l0_mpp)
    assert len(grid) == grid.shape_rc[0] * grid.shape_rc[1]
    centres = grid.patch_l0_xy() + grid.patch_l0 / 2
    assert np.array_equal(grid.rc_from_l0(centres), grid.grid_rc)
    # Any point strictly inside a cell maps back to that cell.
    rng = np.random.default_rng(0)
    pts = grid.cell_l0_xy() + rng.uniform(0.01, 0.99, (len(grid), 2)) * grid.cell_l0
    assert np.array_equal(grid.rc_from_l0(pts), grid.grid_rc)


def test_order_is_row_major_and_deterministic():
    mask = np.zeros((40, 40), bool)
    mask[5:30, 10:35] = True
    a = make_grid(l0_size=(1280, 1280), l0_mpp=0.243, tissue_mask=mask, mask_l0_per_px=32)
    b = make_grid(l0_size=(1280, 1280), l0_mpp=0.243, tissue_mask=mask, mask_l0_per_px=32)
    assert np.array_equal(a.grid_rc, b.grid_rc)
    keys = a.grid_rc[:, 0] * 10_000 + a.grid_rc[:, 1]
    assert np.all(np.diff(keys) > 0)


def test_tissue_filter_keeps_cells_by_covered_fraction():
    # Mask pixels are 32 l0 px; cells are 128 l0 px = 4x4 mask pixels (0.243 um/px slide).
    mask = np.zeros((8, 8), bool)
    mask[0:4, 0:4] = True  # cell (0, 0) fully covered
    mask[4:6, 0:4] = True  # cell (1, 0) half covered
    mask[4, 4] = True  # cell (1, 1) 1/16 covered
    grid = make_grid(l0_size=(256, 256), l0_mpp=0.243, tissue_mask=mask, mask_l0_per_px=32,
                     config=GridConfig(min_tissue_fraction=0.5))
    assert grid.grid_rc.tolist() == [[0, 0], [1, 0]]
    assert np.allclose(grid.tissue_fraction, [1.0, 0.5])
    loose = make_grid(l0_size=(256, 256), l0_mpp=0.243, tissue_mask=mask, mask_l0_per_px=32,
                      config=GridConfig(min_tissue_fraction=0.0))
    assert loose.grid_rc.tolist() == [[0, 0], [1, 0], [1, 1]]


def test_cell_coverage_is_exact_for_fractional_overlaps():
    # Cells of 1.5 mask pixels: cell 0 = [0, 1.5), cell 1 = [1.5, 3).
    mask = np.array([[1, 0, 1]] * 3, bool)
    cov = cell_coverage(mask, mask_l0_per_px=1.0, cell_l0=1.5, shape_rc=(2, 2))
    # Columns: cell 0 covers pixel 0 (1.0) and half of pixel 1 (0): 1/1.5; cell 1: half of 1 (0) + pixel 2: 1/1.5.
    assert np.allclose(cov, [[2 / 3, 2 / 3], [2 / 3, 2 / 3]], atol=1e-6)


def test_grid_area_matches_tissue_area():
    yy, xx = np.mgrid[0:300, 0:300]
    mask = (yy - 150) ** 2 + (xx - 140) ** 2 < 100**2
    cov = cell_coverage(mask, mask_l0_per_px=32.9, cell_l0=128.0, shape_rc=(78, 78))
    # Total coverage * cell area == mask area (both in level-0 px^2).
    assert cov.sum() * 128.0**2 == pytest.approx(mask.sum() * 32.9**2, rel=1e-6)


@pytest.mark.parametrize("kwargs", [dict(patch_px=0), dict(stride_px=-1), dict(spacing_um_px=0.0),
                                    dict(min_tissue_fraction=1.5), dict(patch_px=9.5)])
def test_bad_config_raises(kwargs):
    with pytest.raises(ConfigError):
        GridConfig(**kwargs)


def test_mask_without_scale_raises():
    with pytest.raises(ConfigError, match="mask_l0_per_px"):
        make_grid(l0_size=(10, 10), l0_mpp=0.25, tissue_mask=np.ones((2, 2), bool))


@pytest.mark.parametrize("kwargs", [dict(patch_px=10**9), dict(patch_px=7), dict(stride_px=4097),
                                    dict(spacing_um_px=1e-9), dict(spacing_um_px=21.0), dict(patch_px=True),
                                    dict(min_tissue_fraction=float("nan"))])
def test_grid_config_outside_physical_range(kwargs):
    with pytest.raises(ConfigError, match=r"\[|min_tissue"):
        GridConfig(**kwargs)


def test_grid_with_too_many_cells_is_refused_before_allocating():
    # 100,000 px at 0.25 um/px with 1 px cells of 0.05 um: 2 billion x 2 billion cells.
    with pytest.raises(ConfigError, match="larger stride"):
        make_grid(l0_size=(100_000, 100_000), l0_mpp=0.25, config=GridConfig(stride_px=1, spacing_um_px=0.05))
    with pytest.raises(ConfigError, match=r"\[0.05, 20\] um/px"):
        make_grid(l0_size=(1000, 1000), l0_mpp=1e-6)
