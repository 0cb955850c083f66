"""Which pyramid level a physical-scale read decodes (``read_from``), and what it gives back.

The slides here are written with tifffile, losslessly, with levels made by 2x (or 4x) box
averaging, so a read's pixels can be checked against numpy's own box average of level 0.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import tifffile

from wsi_toolkit.errors import ConfigError
from wsi_toolkit.inference import InferenceConfig
from wsi_toolkit.inference.reading import PatchBlocks, single_patch_blocks
from wsi_toolkit.slide import READ_FROM, open_slide

PCAM_MPP = 0.972


def _box(a: np.ndarray, k: int) -> np.ndarray:
    """``a`` (H, W, 3) shrunk by the integer ``k`` by averaging k x k blocks (float)."""
    h, w = a.shape[0] // k * k, a.shape[1] // k * k
    return a[:h, :w].astype(np.float64).reshape(h // k, k, w // k, k, 3).mean(axis=(1, 3))


def _tissue_like(size_px: int, seed: int = 0) -> np.ndarray:
    """A (size, size, 3) uint8 texture with structure at many scales (smooth blobs + fine grain)."""
    rng = np.random.default_rng(seed)
    coarse = rng.random((size_px // 32, size_px // 32, 3))
    smooth = np.kron(coarse, np.ones((32, 32, 1)))
    fine = rng.random((size_px, size_px, 3))
    return np.clip(120 + 90 * (smooth - 0.5) + 60 * (fine - 0.5), 0, 255).astype(np.uint8)


def _write_pyramid(path, level0: np.ndarray, *, l0_mpp: float, factors: list[int]) -> list[np.ndarray]:
    """A tiled, lossless pyramidal TIFF: level 0, then levels reduced by ``factors`` (each from the
    previous level, box-averaged and rounded). Returns the levels as written."""
    levels = [level0]
    for k in factors:
        levels.append(np.round(_box(levels[-1], k)).astype(np.uint8))
    res = 1e4 / l0_mpp  # px per cm
    with tifffile.TiffWriter(path) as tw:
        ds = 1
        for i, lv in enumerate(levels):
            if i:
                ds *= factors[i - 1]
            tw.write(lv, tile=(128, 128), compression="zlib", photometric="rgb", subfiletype=1 if i else 0,
                     resolution=(res / ds, res / ds), resolutionunit="CENTIMETER")
    return levels


@pytest.fixture(scope="module")
def pyramid_2x(tmp_path_factory):
    """A 40x-like slide: 0.243 um/px level 0, levels 0.486, 0.972, 1.944 um/px."""
    path = tmp_path_factory.mktemp("read_from") / "p2x.tif"
    levels = _write_pyramid(path, _tissue_like(1536), l0_mpp=0.243, factors=[2, 2, 2])
    return path, levels


@pytest.fixture(scope="module")
def pyramid_4x(tmp_path_factory):
    """Levels by 4x: 0.243 and 0.972 um/px only (no level between)."""
    path = tmp_path_factory.mktemp("read_from") / "p4x.tif"
    levels = _write_pyramid(path, _tissue_like(1536, seed=1), l0_mpp=0.243, factors=[4])
    return path, levels


@pytest.mark.parametrize("read_from, want_level", [("nearest", 2), ("finer", 1), ("level0", 0)])
def test_level_chosen_on_a_2x_pyramid(pyramid_2x, read_from, want_level):
    with open_slide(pyramid_2x[0], backend="tifffile") as slide:
        assert slide.read_level_for(PCAM_MPP, read_from) == want_level


@pytest.mark.parametrize("read_from, want_level", [("nearest", 1), ("finer", 0), ("level0", 0)])
def test_finer_falls_to_level0_on_a_4x_pyramid(pyramid_4x, read_from, want_level):
    with open_slide(pyramid_4x[0], backend="tifffile") as slide:
        assert slide.read_level_for(PCAM_MPP, read_from) == want_level


def test_every_option_reads_level0_of_a_single_level_20x_slide(tmp_path):
    path = tmp_path / "20x.tif"
    _write_pyramid(path, _tissue_like(512), l0_mpp=0.5, factors=[])
    with open_slide(path, backend="tifffile") as slide:
        assert {slide.read_level_for(PCAM_MPP, r) for r in READ_FROM} == {0}


def test_unknown_read_from_is_refused(pyramid_2x):
    with open_slide(pyramid_2x[0], backend="tifffile") as slide:
        with pytest.raises(ConfigError, match="read_from"):
            slide.read_at_mpp((0, 0), (96, 96), PCAM_MPP, read_from="coarser")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="read_from"):
        InferenceConfig(read_from="coarser")  # type: ignore[arg-type]


@pytest.mark.parametrize("read_from", READ_FROM)
def test_read_decodes_only_the_chosen_level(pyramid_2x, read_from):
    with open_slide(pyramid_2x[0], backend="tifffile") as slide:
        seen: list[int] = []
        real = slide._read_level
        slide._read_level = lambda level, xy, size: (seen.append(level), real(level, xy, size))[1]  # type: ignore
        slide.read_at_mpp((400, 400), (96, 96), PCAM_MPP, read_from=read_from)
    assert set(seen) == {{"nearest": 2, "finer": 1, "level0": 0}[read_from]}


@pytest.mark.parametrize("read_from", ["finer", "level0"])
def test_shrunk_read_equals_an_antialiased_resize_of_level0(pyramid_2x, read_from):
    """A finer read (level 1 or 0, shrunk by area averaging to 0.972 um/px) equals the 4x box average
    of level 0 computed here with numpy. Stated tolerance: 1.5 grey levels at most, 0.6 on average
    (level 1 was stored rounded, the read rounds again, PIL filters in fixed point), on a texture whose
    fine grain alone spreads ~17 grey levels a pixel."""
    path, levels = pyramid_2x
    l0_xy = (256, 384)  # multiples of 4: the patch is a whole number of level-0 4x4 blocks
    want = _box(levels[0][l0_xy[1]:l0_xy[1] + 384, l0_xy[0]:l0_xy[0] + 384], 4)
    with open_slide(path, backend="tifffile") as slide:
        got = slide.read_at_mpp(l0_xy, (96, 96), PCAM_MPP, read_from=read_from).astype(np.float64)
        nearest = slide.read_at_mpp(l0_xy, (96, 96), PCAM_MPP).astype(np.float64)
    d = np.abs(got - want)
    assert d.max() <= 1.5 and d.mean() <= 0.6, (d.mean(), d.max())
    # A control the check can tell apart: the same box one level-0 4x4 block off.
    off = _box(levels[0][l0_xy[1] + 4:l0_xy[1] + 388, l0_xy[0] + 4:l0_xy[0] + 388], 4)
    assert np.abs(got - off).mean() > 4 * d.mean()
    # nearest returns the stored level 2 untouched (the pyramid's own box average, rounded).
    assert np.array_equal(nearest, levels[2][96:192, 64:160])


def test_finer_averages_out_noise_added_to_the_coarse_level(tmp_path):
    """The reason for the option: a coarse level with its own artefacts (here: noise added to level 2
    only, standing in for that level's JPEG re-compression) is what nearest hands the model; a finer
    read does not see them."""
    base = _tissue_like(1536, seed=3)
    path = tmp_path / "noisy_l2.tif"
    levels = [base, np.round(_box(base, 2)).astype(np.uint8)]
    clean2 = np.round(_box(levels[1], 2)).astype(np.uint8)
    noisy2 = np.clip(clean2 + np.random.default_rng(0).normal(0, 12, clean2.shape), 0, 255).astype(np.uint8)
    levels.append(noisy2)
    res = 1e4 / 0.243
    with tifffile.TiffWriter(path) as tw:
        for i, lv in enumerate(levels):
            tw.write(lv, tile=(128, 128), compression="zlib", photometric="rgb", subfiletype=1 if i else 0,
                     resolution=(res / 2**i, res / 2**i), resolutionunit="CENTIMETER")
    with open_slide(path, backend="tifffile") as slide:
        near = slide.read_at_mpp((512, 512), (96, 96), PCAM_MPP).astype(float)
        finer = slide.read_at_mpp((512, 512), (96, 96), PCAM_MPP, read_from="finer").astype(float)
    truth = clean2[128:224, 128:224].astype(float)
    assert np.abs(finer - truth).mean() < 0.5 * np.abs(near - truth).mean()


@pytest.mark.parametrize("read_from", READ_FROM)
def test_block_reads_equal_single_patch_reads(pyramid_2x, read_from):
    """The inference reader cuts patches from shared regions; a patch cut that way equals the same
    patch read alone (wsi-patches reads them alone) within 1 grey level (resampling rounding)."""
    from wsi_toolkit.tiling import GridConfig, make_grid

    path = pyramid_2x[0]
    with open_slide(path, backend="tifffile") as slide:
        grid = make_grid(l0_size=slide.dimensions, l0_mpp=slide.mpp,
                         config=GridConfig(patch_px=96, spacing_um_px=PCAM_MPP, stride_px=32, min_tissue_fraction=0.0),
                         tissue_mask=np.ones((4, 4), bool), mask_l0_per_px=slide.dimensions[0] / 4)
    from wsi_toolkit.inference.reading import plan_blocks

    blocks = PatchBlocks(path, plan_blocks(grid, block_cells=6), patch_px=96, spacing_um_px=PCAM_MPP,
                         backend="tifffile", read_from=read_from)
    together = np.zeros((len(grid), 96, 96, 3), np.uint8)
    for patches, index, _ in blocks.read():
        together[index] = patches
    pick = np.linspace(0, len(grid) - 1, 12).astype(int)
    xy = grid.patch_l0_xy(grid.grid_rc[pick])
    alone = PatchBlocks(path, single_patch_blocks(xy, 96), patch_px=96, spacing_um_px=PCAM_MPP,
                        backend="tifffile", read_from=read_from)
    for (patch, _index, _), i in zip(alone.read(), pick):
        assert np.abs(patch[0].astype(int) - together[i].astype(int)).max() <= 1


def test_output_key_records_read_from_and_an_old_key_means_nearest(tmp_path, model_dir):
    from wsi_toolkit.analysis import RunConfig, output_key
    from wsi_toolkit.model_package import load_model_package
    from wsi_toolkit.pipeline.resume import _key_differences
    from wsi_toolkit.records import upgrade_output_key

    pkg = load_model_package(model_dir)
    slide = tmp_path / "s.tif"
    slide.write_bytes(b"x")
    default = output_key(slide, pkg, RunConfig())
    near = output_key(slide, pkg, RunConfig(inference=InferenceConfig(read_from="nearest")))
    assert default["read_from"] == "finer" and near["read_from"] == "nearest"
    assert _key_differences(near, default) == ["read_from nearest -> finer"]
    old = {k: v for k, v in json.loads(json.dumps(near)).items() if k != "read_from"}  # made before the option
    assert _key_differences(upgrade_output_key(old), near) == []
    assert _key_differences(upgrade_output_key(old), default) == ["read_from nearest -> finer"]


def test_oversampled_read_is_the_box_at_twice_the_pixels(pyramid_2x, pyramid_4x):
    """oversample=2: the same box at half the um/px; from the 2x pyramid's level 1 (exactly 0.486 um/px)
    its stored pixels untouched, from the 4x pyramid's level 0 (0.243) the 2x box average of level 0."""
    path, levels = pyramid_2x
    with open_slide(path, backend="tifffile") as slide:
        got = slide.read_at_mpp((256, 384), (96, 96), PCAM_MPP, read_from="finer", oversample=2)
        with pytest.raises(ConfigError, match="oversample"):
            slide.read_at_mpp((256, 384), (96, 96), PCAM_MPP, oversample=0)
    assert got.shape == (192, 192, 3) and np.array_equal(got, levels[1][192:384, 128:320])
    path, levels = pyramid_4x
    with open_slide(path, backend="tifffile") as slide:
        got = slide.read_at_mpp((256, 384), (96, 96), PCAM_MPP, read_from="finer", oversample=2).astype(float)
    want = _box(levels[0][384:768, 256:640], 2)
    assert got.shape == (192, 192, 3) and np.abs(got - want).max() <= 1.0
