"""wsi-infer end to end on SYNTHETIC slides with the SYNTHETIC colour-rule model.

Alignment against known tumour geometry, parity with independently read patches, the exports
re-read by independent readers, and fault handling (bad slides, interrupted runs).
"""

from __future__ import annotations

import csv
import json
import shutil

import numpy as np
import pytest
import shapely
import tifffile
import torch

from wsi_toolkit.annotations import rasterize, read_asap_xml, read_geojson
from wsi_toolkit.cli.infer import main
from wsi_toolkit.model_package import Preprocess, load_model_package
from wsi_toolkit.slide import open_slide
from wsi_toolkit.synthetic import ALIGNMENT_SPEC, write_synthetic_slide
from wsi_toolkit.tiling import GridConfig, make_grid

ALIGN_SPEC = ALIGNMENT_SPEC  # level 0 at 0.243 um/px divides by 4: OpenSlide reads level 2 pixel-exactly


@pytest.fixture(scope="module")
def align_slides(tmp_path_factory):
    root = tmp_path_factory.mktemp("align")
    return {mpp: write_synthetic_slide(root / f"align_{mpp:g}.tif", ALIGN_SPEC, mpp=mpp, tile=256)
            for mpp in (0.243, 0.226)}


def infer(slides, model_dir, out, *extra) -> int:
    return main([*map(str, slides), "--model", str(model_dir), "--out", str(out), "--workers", "0",
                 "--no-progress", *extra])


def read_tiles(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.parametrize("mpp", [0.243, 0.226])
def test_heatmap_aligns_with_known_tumor(align_slides, model_dir, tmp_path, mpp):
    s = align_slides[mpp]
    assert infer([s.path], model_dir, tmp_path) == 0
    run = json.loads((tmp_path / s.path.stem / "run.json").read_text())
    geo = run["heatmap"]
    cell_l0 = geo["cell_l0"]
    assert cell_l0 * mpp == pytest.approx(31.104)
    with tifffile.TiffFile(tmp_path / s.path.stem / "heatmap.tif") as tif:
        heat = tif.pages[0].asarray()
    heat = heat[..., 0] if heat.ndim == 3 else heat
    found = heat >= 128  # probability >= 0.5
    truth = rasterize(s.tumor_l0, l0_size=s.level0_size, l0_mpp=mpp, mask_mpp=cell_l0 * mpp)
    h, w = truth.shape
    found = found[:h, :w]
    iou = (found & truth).sum() / (found | truth).sum()
    assert iou >= 0.7, iou
    # Centroid error below one stride (one heatmap cell).
    fr, fc = np.argwhere(found).mean(axis=0)
    tr, tc = np.argwhere(truth).mean(axis=0)
    assert np.hypot(fr - tr, fc - tc) < 1.0
    # The GeoJSON region is in level-0 px and overlaps the truth polygon.
    regions = read_geojson(tmp_path / s.path.stem / "tumor.geojson")
    assert len(regions) == 1
    poly = regions[0].polygon
    assert poly.is_valid
    overlap = poly.intersection(s.tumor_l0).area / poly.union(s.tumor_l0).area
    assert overlap >= 0.7


@pytest.mark.parametrize("read_from", ["nearest", "finer"])
@pytest.mark.parametrize("merge", ["centre", "mean"])
@pytest.mark.parametrize("backend,mpp", [("openslide", 0.243), ("tifffile", 0.226), ("auto", 0.226)])
def test_probabilities_equal_model_on_independently_read_patches(align_slides, model_dir, tmp_path, merge, backend,
                                                                 mpp, read_from):
    # nearest: 0.243: level 2 is exactly the model's 0.972 um/px (pixels copied); 0.226: level 2 (0.904) is
    # resampled. OpenSlide cannot read the 0.226 slide pixel-exactly (its level-2 downsample is
    # 11505 / 2877 = 3.99896, a fractional-pixel shift), so "auto" reads it with tifffile. finer (the
    # default): level 1 at twice the pixels (192 px at 0.486 um/px), which the package's Resize shrinks.
    s = align_slides[mpp]
    assert infer([s.path], model_dir, tmp_path, "--merge", merge, "--backend", backend, "--stride-px", "48",
                 "--read-from", read_from) == 0
    rows = read_tiles(tmp_path / s.path.stem / "tiles.csv")
    package = load_model_package(model_dir)
    # Rebuild the grid and read each patch independently, through the public reader only.
    with open_slide(s.path, backend=backend) as slide:
        from wsi_toolkit.tissue import detect_tissue

        tissue = detect_tissue(slide.thumbnail(mpp=8.0), l0_mpp=slide.mpp)
        grid = make_grid(l0_size=slide.dimensions, l0_mpp=slide.mpp, config=GridConfig(stride_px=48),
                         tissue_mask=tissue.mask, mask_l0_per_px=tissue.l0_per_px)
        assert len(rows) == len(grid) > 50
        idx = np.random.default_rng(0).choice(len(grid), 40, replace=False)
        k = 2 if read_from == "finer" else 1
        patches = np.stack([slide.read_at_mpp(xy, (96, 96), 0.972, read_from=read_from, oversample=k)
                            for xy in grid.patch_l0_xy()[idx]])
        assert patches.shape[1] == 96 * k
    with torch.no_grad():
        x = Preprocess(package.config)(torch.from_numpy(patches))
        expected = torch.softmax(package.model(x).float(), dim=1)[:, package.config.tumor_index()].numpy()
    got = np.array([float(rows[i]["prob_tumor"]) for i in idx])
    # finer on the 0.226 slide area-averages level 1 (0.452 um/px) at fractional offsets: a region read and a
    # lone patch round a few pixels to the neighbouring grey level (tests/test_read_from.py bounds it by 1).
    tol = 1e-3 if (read_from, mpp) == ("finer", 0.226) else 1e-4
    assert np.abs(got - expected).max() < tol
    minxy = np.array([[int(rows[i]["minx"]), int(rows[i]["miny"])] for i in idx])
    assert np.abs(minxy - grid.patch_l0_xy()[idx]).max() <= 0.5


def test_exports_reopen_in_independent_readers(align_slides, model_dir, tmp_path):
    import openslide

    s = align_slides[0.243]
    assert infer([s.path], model_dir, tmp_path) == 0
    d = tmp_path / s.path.stem
    run = json.loads((d / "run.json").read_text())
    mpp = run["heatmap"]["mpp"]
    with openslide.OpenSlide(str(d / "heatmap.tif")) as osr:
        assert float(osr.properties["openslide.mpp-x"]) == pytest.approx(mpp, rel=1e-6)
        assert osr.level_dimensions[0] == tuple(run["heatmap"]["shape_rc"][::-1])
    with tifffile.TiffFile(d / "heatmap.tif") as tif:
        xres = tif.pages[0].tags["XResolution"].value
        assert 1e4 / (xres[0] / xres[1]) == pytest.approx(mpp, rel=1e-6)
    geo = read_geojson(d / "tumor.geojson")
    xml = read_asap_xml(d / "tumor.xml")
    assert len(geo) >= 1
    g_union = shapely.union_all([a.polygon for a in geo])
    x_tumor = shapely.union_all([a.polygon for a in xml if a.group == "Tumor"])
    assert g_union.symmetric_difference(x_tumor).area < 1e-6 * g_union.area
    minx, miny, maxx, maxy = g_union.bounds
    assert 0 <= minx and maxx <= s.level0_size[0] and 0 <= miny and maxy <= s.level0_size[1]
    feature = json.loads((d / "tumor.geojson").read_text())["features"][0]
    assert feature["properties"]["classification"]["name"] == "Tumor"
    assert {"max_probability", "mean_probability", "area_mm2", "longest_diameter_um"} <= set(
        feature["properties"]["measurements"])
    assert run["synthetic"] is True
    assert run["model"]["sha256"] and run["timings"]["patches_per_s"] > 0


def test_batch_with_damaged_slide_finishes_the_good_one(align_slides, model_dir, tmp_path, capsys):
    good = align_slides[0.243].path
    bad = tmp_path / "broken.tif"
    bad.write_bytes(good.read_bytes()[:5000])
    out = tmp_path / "out"
    assert infer([bad, good], model_dir, out) == 1
    rows = {r["slide"]: r for r in csv.DictReader(open(out / "summary.csv"))}
    assert rows[str(bad)]["status"] == "failed" and "broken.tif" in rows[str(bad)]["error"]
    assert rows[str(good)]["status"] == "ok" and float(rows[str(good)]["slide_score"]) > 0.9
    assert (out / good.stem / "run.json").is_file()
    assert not (out / "broken" / "run.json").exists()
    assert "broken.tif" in capsys.readouterr().err


def _comparable_outputs(d):
    run = json.loads((d / "run.json").read_text())
    with tifffile.TiffFile(d / "heatmap.tif") as tif:
        heat = tif.pages[0].asarray()
    geo = sorted((round(a.polygon.area, 3), a.polygon.wkt) for a in read_geojson(d / "tumor.geojson"))
    xml = sorted(a.polygon.wkt for a in read_asap_xml(d / "tumor.xml"))
    return {"tiles": (d / "tiles.csv").read_text(), "heat": heat.tobytes(), "geo": geo, "xml": xml,
            "score": run["slide_score"], "area": run["tumor_area_mm2"], "counts": run["counts"]}


def test_interrupted_run_resumes_to_identical_outputs(align_slides, model_dir, tmp_path, monkeypatch):
    a, b = align_slides[0.243].path, align_slides[0.226].path
    ref = tmp_path / "ref"
    assert infer([a, b], model_dir, ref) == 0

    # Interrupt the second slide after some of its files were written (as a kill would).
    import wsi_toolkit.analysis as pipeline  # write_outputs lives there

    real = pipeline.write_regions_asap
    calls = {"n": 0}

    def dying(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(pipeline, "write_regions_asap", dying)
    out = tmp_path / "out"
    assert infer([a, b], model_dir, out) == 130  # Ctrl-C: the CLI reports "Aborted." and exits 130
    monkeypatch.setattr(pipeline, "write_regions_asap", real)
    assert (out / a.stem / "run.json").is_file()
    assert not (out / b.stem / "run.json").exists()
    assert not list(out.rglob("*.partial*"))
    first_done = (out / a.stem / "run.json").stat().st_mtime_ns

    assert infer([a, b], model_dir, out) == 0
    assert (out / a.stem / "run.json").stat().st_mtime_ns == first_done  # finished slide skipped
    rows = {r["slide"]: r["status"] for r in csv.DictReader(open(out / "summary.csv"))}
    assert rows == {str(a): "skipped", str(b): "ok"}
    for s in (a, b):
        assert _comparable_outputs(out / s.stem) == _comparable_outputs(ref / s.stem)


def test_overwrite_redoes_finished_slides(align_slides, model_dir, tmp_path):
    a = align_slides[0.243].path
    assert infer([a], model_dir, tmp_path) == 0
    before = (tmp_path / a.stem / "run.json").stat().st_mtime_ns
    assert infer([a], model_dir, tmp_path, "--overwrite") == 0
    assert (tmp_path / a.stem / "run.json").stat().st_mtime_ns != before


def test_overwrite_into_a_fresh_folder_redoes_nothing(align_slides, model_dir, tmp_path, caplog):
    """--overwrite on a folder with no finished slide runs it without a 'redoing' warning (the demo's case)."""
    from wsi_toolkit.inference import InferenceConfig
    from wsi_toolkit.pipeline import RunConfig, run_batch

    config = RunConfig(overwrite=True, inference=InferenceConfig(progress=False, runtime="torch"))
    with caplog.at_level("INFO", logger="wsi_toolkit.pipeline"):
        (result,) = run_batch([align_slides[0.243].path], model_dir, tmp_path, config)
    assert result.status == "ok"
    assert not [r for r in caplog.records if "redoing" in r.getMessage()]
    with caplog.at_level("INFO", logger="wsi_toolkit.pipeline"):
        run_batch([align_slides[0.243].path], model_dir, tmp_path, config)
    assert [r for r in caplog.records if "redoing" in r.getMessage() and "--overwrite" in r.getMessage()]


def test_folder_input_and_same_stem_slides(align_slides, model_dir, tmp_path):
    folder = tmp_path / "slides"
    folder.mkdir()
    shutil.copy(align_slides[0.243].path, folder / "case.tif")
    shutil.copy(align_slides[0.226].path, folder / "case.svs")
    out = tmp_path / "out"
    assert infer([folder], model_dir, out) == 0
    # Sorted: case.svs takes OUT/case, case.tif gets OUT/case_tif; neither overwrites the other.
    assert (out / "case" / "run.json").is_file() and (out / "case_tif" / "run.json").is_file()
    runs = {json.loads((out / d / "run.json").read_text())["slide"]["path"] for d in ("case", "case_tif")}
    assert runs == {str(folder / "case.svs"), str(folder / "case.tif")}


def test_missing_model_fails_before_any_slide(align_slides, tmp_path, capsys):
    code = infer([align_slides[0.243].path], tmp_path / "no_model", tmp_path / "out")
    assert code == 2
    assert "no_model" in capsys.readouterr().err


@pytest.mark.parametrize("value,ok", [("auto", True), ("32", True), ("0", False), ("lots", False)])
def test_batch_size_option(align_slides, model_dir, tmp_path, capsys, value, ok):
    code = infer([align_slides[0.243].path], model_dir, tmp_path, "--batch-size", value)
    if ok:
        assert code == 0
        run = json.loads((tmp_path / align_slides[0.243].path.stem / "run.json").read_text())
        assert run["timings"]["batch_size"] == (64 if value == "auto" else int(value))
    else:
        assert code != 0
        assert "positive integer or 'auto'" in capsys.readouterr().err


def test_read_from_is_recorded_and_a_change_redoes_the_slide(align_slides, model_dir, tmp_path, caplog):
    """The default (finer) reads level 1 of the 40x slide at twice the pixels: recorded in run.json's settings,
    timings and output_key; the heatmap differs from a nearest run's; going to nearest redoes the slide,
    saying why."""
    a = align_slides[0.243].path
    assert infer([a], model_dir, tmp_path / "near", "--read-from", "nearest") == 0
    assert infer([a], model_dir, tmp_path) == 0
    run = json.loads((tmp_path / a.stem / "run.json").read_text())
    assert run["settings"]["run"]["inference"]["read_from"] == "finer"
    assert run["output_key"]["read_from"] == "finer"
    assert (run["timings"]["read_level"], run["timings"]["read_oversample"]) == (1, 2)
    near_run = json.loads((tmp_path / "near" / a.stem / "run.json").read_text())
    assert (near_run["timings"]["read_level"], near_run["timings"]["read_oversample"]) == (2, 1)
    near = [float(r["prob_tumor"]) for r in read_tiles(tmp_path / "near" / a.stem / "tiles.csv")]
    finer = [float(r["prob_tumor"]) for r in read_tiles(tmp_path / a.stem / "tiles.csv")]
    assert len(near) == len(finer) and near != finer
    with caplog.at_level("INFO", logger="wsi_toolkit.pipeline"):
        assert infer([a], model_dir, tmp_path, "--read-from", "nearest") == 0
    assert [r for r in caplog.records if "read_from finer -> nearest" in r.getMessage()]
