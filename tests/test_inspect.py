"""wsi-inspect and the preflight library call, on SYNTHETIC slides."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from PIL import Image

from wsi_toolkit.cli.inspect import main
from wsi_toolkit.preflight import inspect_slide

REQUIRED_KEYS = {"path", "ok", "error", "mpp", "mpp_source", "level0_size", "level_count", "tissue_mm2", "n_patches"}


def run_json(argv, capsys):
    code = main([*argv, "--json"])
    out = capsys.readouterr().out
    return code, json.loads(out)


@pytest.mark.parametrize("mpp,flavour", [(0.243, "tiff"), (0.226, "tiff"), (0.243, "svs")])
def test_tissue_area_within_10_percent_of_truth(synthetic_slides, mpp, flavour):
    s = synthetic_slides(mpp, flavour)
    r = inspect_slide(s.path)
    assert r.ok, r.error
    assert r.tissue_mm2 == pytest.approx(s.tissue_mm2, rel=0.10)


def test_patch_count_matches_tissue_area(synthetic_slides):
    s = synthetic_slides(0.243, "tiff")
    r = inspect_slide(s.path)
    cell_mm2 = (32 * 0.972 / 1000) ** 2
    # Cells with >= 50% tissue: about tissue area / cell area (boundary cells cut both ways).
    assert r.n_patches == pytest.approx(s.tissue_mm2 / cell_mm2, rel=0.10)


def test_json_report_fields(synthetic_slides, capsys):
    s = synthetic_slides(0.226, "tiff")
    code, reports = run_json([str(s.path)], capsys)
    assert code == 0
    (r,) = reports
    assert REQUIRED_KEYS <= set(r)
    assert r["ok"] is True and r["error"] is None
    assert r["mpp"] == pytest.approx(0.226)
    assert "XResolution" in r["mpp_source"] or "mpp" in r["mpp_source"]
    assert r["level0_size"] == list(s.level0_size)
    assert r["synthetic"] is True
    # A 0.226 um/px slide is read for a 0.972 um/px model from level 2 (0.904 um/px), resampled.
    assert r["read_level"] == 2


def test_batch_with_bad_slides_inspects_all_and_fails(synthetic_slides, tmp_path, capsys):
    good = synthetic_slides(0.243, "tiff").path
    empty = tmp_path / "empty.tif"
    empty.write_bytes(b"")
    text = tmp_path / "notes.tif"
    text.write_text("not a slide")
    missing = tmp_path / "missing.svs"
    code, reports = run_json([str(empty), str(good), str(text), str(missing)], capsys)
    assert code == 1
    assert [r["ok"] for r in reports] == [False, True, False, False]
    for r in (reports[0], reports[2], reports[3]):
        assert r["path"] in r["error"]
    assert reports[0]["error_type"] == "SlideFormatError"
    assert reports[2]["error_type"] == "SlideFormatError"
    assert reports[3]["error_type"] == "SlideNotFoundError"


def test_missing_mpp_fails_then_override_works(synthetic_slides, capsys):
    s = synthetic_slides(0.243, "tiff-nores")
    code, (r,) = run_json([str(s.path)], capsys)
    assert code == 1
    assert r["error_type"] == "MissingMppError" and "--mpp" in r["error"]
    code, (r,) = run_json([str(s.path), "--mpp", "0.243"], capsys)
    assert code == 0
    assert r["mpp_source"] == "override" and r["mpp"] == pytest.approx(0.243)
    assert r["tissue_mm2"] == pytest.approx(s.tissue_mm2, rel=0.10)


def test_override_is_recorded_next_to_metadata(synthetic_slides, capsys):
    s = synthetic_slides(0.243, "tiff")
    code, (r,) = run_json([str(s.path), "--mpp", "0.25"], capsys)
    assert code == 0
    assert r["mpp"] == pytest.approx(0.25) and r["mpp_source"] == "override"
    assert r["mpp_metadata"] == pytest.approx([0.243, 0.243])


def test_mpp_metadata_has_run_json_shape(synthetic_slides, model_dir, capsys):
    """wsi-inspect --json and run.json give mpp_metadata the same shape: the file's (x, y) um/px pair
    (issue 30: inspect gave x alone, a float)."""
    from wsi_toolkit.analysis import analyse_slide

    s = synthetic_slides(0.243, "tiff")
    _, (r,) = run_json([str(s.path)], capsys)
    run = analyse_slide(s.path, model_dir).slide_info.mpp_metadata
    assert isinstance(r["mpp_metadata"], list) and r["mpp_metadata"] == pytest.approx(run)


def test_folder_input_and_qc_picture(synthetic_slides, tmp_path, capsys):
    s = synthetic_slides(0.243, "tiff")
    folder = tmp_path / "slides"
    folder.mkdir()
    shutil.copy(s.path, folder / "a.tif")
    (folder / "readme.txt").write_text("ignored: not a slide suffix")
    qc = tmp_path / "qc"
    code, reports = run_json([str(folder), "--qc", str(qc)], capsys)
    assert code == 0 and len(reports) == 1
    png = qc / "a_qc.png"
    assert reports[0]["qc_png"] == str(png)
    img = np.asarray(Image.open(png).convert("RGB"))
    assert img.shape[1] >= 1000
    # The kept-cell tint is green-ish somewhere, and the outline blue is drawn.
    assert ((img[..., 2] > 200) & (img[..., 0] < 60)).any()


def test_human_output_names_source_and_failures(synthetic_slides, tmp_path, capsys):
    s = synthetic_slides(0.243, "tiff")
    code = main([str(s.path), str(tmp_path / "nope.tif")])
    out = capsys.readouterr()
    assert code == 1
    assert "SYNTHETIC" in out.out and "um/px" in out.out and "FAILED" in out.out
    assert "1 of 2 slides failed" in out.err


def test_help_works_offline():
    assert main(["--help"]) == 0


def test_damaged_tile_of_the_inference_level_fails_inspect(synthetic_slides, tmp_path, capsys):
    """Issue 11 §5: inspect decoded only the thumbnail's level and said ok for a slide whose level-2
    tile (the level a 0.972 um/px model reads on a 0.243 um/px slide) was damaged."""
    import tifffile

    from wsi_toolkit.preflight import patch_tiles
    from wsi_toolkit.slide import open_slide
    from wsi_toolkit.tiling import make_grid
    from wsi_toolkit.tissue import detect_tissue

    src = synthetic_slides(0.243, "tiff").path
    with open_slide(src) as slide:
        level = slide.best_level_for_mpp(0.972)
        assert level == 2 and slide.best_level_for_mpp(8.0) != level  # the thumbnail does not read level 2
        mask = detect_tissue(slide.thumbnail(mpp=8.0), l0_mpp=slide.mpp)
        grid = make_grid(l0_size=slide.dimensions, l0_mpp=slide.mpp, tissue_mask=mask.mask,
                         mask_l0_per_px=mask.l0_per_px)
        tiles = patch_tiles(slide, grid, level)
        tw, _ = slide.tile_size(level)
        across = -(-slide.level_dimensions[level][0] // tw)
    tx, ty = tiles[len(tiles) // 2]  # a tile under the tissue, in the middle of the list
    data = bytearray(src.read_bytes())
    with tifffile.TiffFile(src) as tif:
        page = tif.pages[level]
        offset, count = page.dataoffsets[ty * across + tx], page.databytecounts[ty * across + tx]
    data[offset:offset + count] = np.random.default_rng(1).integers(0, 256, count, dtype=np.uint8).tobytes()
    bad = tmp_path / "bad_level2.tif"
    bad.write_bytes(bytes(data))

    assert inspect_slide(src).ok
    r = inspect_slide(bad)
    assert not r.ok and r.error_type == "SlideReadError" and "bad_level2.tif" in r.error
    assert inspect_slide(bad, check_tiles=0).ok  # what it said before: only the thumbnail decoded
    code, (rj,) = run_json([str(bad), "--check-tiles", "all"], capsys)
    assert code == 1 and rj["error_type"] == "SlideReadError"


def test_report_says_how_many_tiles_were_decoded(synthetic_slides):
    r = inspect_slide(synthetic_slides(0.243, "tiff").path, check_tiles=5)
    assert r.ok and r.tiles_checked == 5 and r.tiles_under_patches > 5
    r_all = inspect_slide(synthetic_slides(0.243, "tiff").path, check_tiles=None)
    assert r_all.tiles_checked == r_all.tiles_under_patches == r.tiles_under_patches
