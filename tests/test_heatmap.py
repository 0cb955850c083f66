"""Stitching per-patch probabilities into a heatmap: merge modes, geometry, validation."""

from __future__ import annotations

import json

import numpy as np
import pytest

from wsi_toolkit.errors import ConfigError
from wsi_toolkit.heatmap import Heatmap, stitch
from wsi_toolkit.tiling import GridConfig, make_grid


def _tissue_grid(l0_mpp: float, config: GridConfig = GridConfig()):
    """A 4000 x 3000 level-0 slide with an L-shaped tissue mask at 32 level-0 px per mask px."""
    mask = np.zeros((94, 125), bool)
    mask[10:80, 15:50] = True
    mask[55:80, 15:110] = True
    return make_grid(l0_size=(4000, 3000), l0_mpp=l0_mpp, config=config, tissue_mask=mask, mask_l0_per_px=32.0)


def _painted_by_geometry(grid, patch_rc):
    """Cells whose centre lies in the half-open level-0 square of the patch of cell ``patch_rc``.

    Brute force over all cells, from the level-0 definition of the patch footprint.
    """
    config = grid.config
    l0_per_px = config.spacing_um_px / grid.l0_mpp
    cell = config.stride_px * l0_per_px
    side = config.patch_px * l0_per_px
    r, c = patch_rc
    x0 = c * cell - (config.patch_px - config.stride_px) / 2 * l0_per_px
    y0 = r * cell - (config.patch_px - config.stride_px) / 2 * l0_per_px
    cy = (np.arange(grid.shape_rc[0]) + 0.5) * cell
    cx = (np.arange(grid.shape_rc[1]) + 0.5) * cell
    in_y = (y0 <= cy) & (cy < y0 + side)
    in_x = (x0 <= cx) & (cx < x0 + side)
    out = in_y[:, None] & in_x[None, :]
    return out


@pytest.mark.parametrize("l0_mpp", [0.243, 0.226])
def test_centre_merge_puts_each_probability_at_its_cell(l0_mpp):
    grid = _tissue_grid(l0_mpp)
    rng = np.random.default_rng(1)
    probs = rng.uniform(0, 1, len(grid))
    hm = stitch(grid, probs, merge="centre")
    assert hm.prob.shape == grid.shape_rc and hm.prob.dtype == np.float32
    assert hm.predicted.dtype == bool
    for (r, c), p in zip(grid.grid_rc.tolist(), probs):
        assert hm.prob[r, c] == np.float32(p)
        assert hm.predicted[r, c]
    untouched = np.ones(grid.shape_rc, bool)
    untouched[grid.grid_rc[:, 0], grid.grid_rc[:, 1]] = False
    assert untouched.any()
    assert not hm.predicted[untouched].any()
    assert np.all(hm.prob[untouched] == 0)


@pytest.mark.parametrize("l0_mpp", [0.243, 0.226])
def test_mean_merge_of_uniform_probability_is_uniform(l0_mpp):
    grid = _tissue_grid(l0_mpp)
    hm = stitch(grid, np.full(len(grid), 0.37), merge="mean")
    assert np.allclose(hm.prob[hm.predicted], 0.37, atol=1e-6)
    assert np.all(hm.prob[~hm.predicted] == 0)
    # Every kept cell is predicted, and the support grows by the patch margin only.
    assert hm.predicted[grid.grid_rc[:, 0], grid.grid_rc[:, 1]].all()
    expected = np.zeros(grid.shape_rc, bool)
    for rc in grid.grid_rc.tolist():
        expected |= _painted_by_geometry(grid, rc)
    assert np.array_equal(hm.predicted, expected)


@pytest.mark.parametrize("l0_mpp", [0.243, 0.226])
def test_mean_merge_spreads_one_hot_patch_to_its_3x3_cells(l0_mpp):
    grid = make_grid(l0_size=(2000, 1500), l0_mpp=l0_mpp)  # every cell kept
    hot = (5, 7)
    probs = np.zeros(len(grid))
    index = int(np.flatnonzero((grid.grid_rc[:, 0] == hot[0]) & (grid.grid_rc[:, 1] == hot[1]))[0])
    probs[index] = 1.0
    hm = stitch(grid, probs, merge="mean")
    painted = _painted_by_geometry(grid, hot)
    three_by_three = np.zeros(grid.shape_rc, bool)
    three_by_three[hot[0] - 1 : hot[0] + 2, hot[1] - 1 : hot[1] + 2] = True
    assert np.array_equal(painted, three_by_three)  # the geometry itself says 3x3 at stride 32
    assert np.array_equal(hm.prob > 0, three_by_three)
    # Interior cells are painted by the 9 patches around them; one of them is hot.
    assert np.allclose(hm.prob[three_by_three], 1 / 9)
    assert hm.predicted.all()


def test_mean_merge_footprint_for_a_224_px_patch_is_7x7():
    config = GridConfig(patch_px=224, stride_px=32)
    grid = make_grid(l0_size=(4000, 4000), l0_mpp=0.226, config=config)
    hot = (12, 9)
    probs = np.zeros(len(grid))
    probs[hot[0] * grid.shape_rc[1] + hot[1]] = 0.8
    hm = stitch(grid, probs, merge="mean")
    painted = _painted_by_geometry(grid, hot)
    assert painted.sum() == 49
    assert np.array_equal(hm.prob > 0, painted)


@pytest.mark.parametrize("l0_mpp", [0.243, 0.226])
def test_mean_equals_centre_when_patch_equals_stride(l0_mpp):
    grid = _tissue_grid(l0_mpp, GridConfig(patch_px=96, stride_px=96))
    probs = np.random.default_rng(2).uniform(0, 1, len(grid))
    centre = stitch(grid, probs, merge="centre")
    mean = stitch(grid, probs, merge="mean")
    assert np.array_equal(centre.predicted, mean.predicted)
    assert np.allclose(centre.prob, mean.prob, atol=1e-7)


@pytest.mark.parametrize("l0_mpp", [0.243, 0.226])
def test_heatmap_geometry(l0_mpp):
    grid = _tissue_grid(l0_mpp)
    hm = stitch(grid, np.zeros(len(grid)))
    assert hm.cell_l0 == pytest.approx(32 * 0.972 / l0_mpp)
    assert hm.mpp == pytest.approx(31.104)
    assert hm.l0_mpp == l0_mpp
    geometry = json.loads(json.dumps(hm.geometry()))
    assert geometry == {
        "shape_rc": list(grid.shape_rc),
        "cell_l0": pytest.approx(32 * 0.972 / l0_mpp),
        "mpp": pytest.approx(31.104),
        "origin_l0": [0, 0],
        "merge": "centre",
        "l0_mpp": l0_mpp,
    }


def test_heatmap_arrays_are_read_only():
    grid = make_grid(l0_size=(512, 512), l0_mpp=0.243)
    hm = stitch(grid, np.full(len(grid), 0.5))
    with pytest.raises(ValueError):
        hm.prob[0, 0] = 1.0
    with pytest.raises(ValueError):
        hm.predicted[0, 0] = False


@pytest.mark.parametrize(
    "probs, merge",
    [
        (np.zeros(3), "centre"),  # wrong length
        (np.full(16, np.nan), "centre"),
        (np.full(16, 1.5), "centre"),
        (np.full(16, -0.1), "mean"),
        (np.full(16, 0.5), "max"),  # unknown merge mode
        (np.zeros((16, 2)), "centre"),
    ],
)
def test_stitch_rejects_bad_input(probs, merge):
    grid = make_grid(l0_size=(512, 512), l0_mpp=0.243)  # 4 x 4 cells
    assert len(grid) == 16
    with pytest.raises(ConfigError):
        stitch(grid, probs, merge=merge)


def test_heatmap_rejects_mismatched_arrays():
    with pytest.raises(ConfigError):
        Heatmap(prob=np.zeros((3, 4)), predicted=np.zeros((4, 3), bool), cell_l0=128.0, l0_mpp=0.243, merge="centre")
    with pytest.raises(ConfigError):
        Heatmap(prob=np.zeros((3, 4)), predicted=np.zeros((3, 4), bool), cell_l0=0.0, l0_mpp=0.243, merge="centre")
