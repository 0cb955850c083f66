"""wsi-patches --reviews: PCam patches labelled by a pathologist's review (wsi-view --review's
OUT/<slide>/review.geojson), with each patch's review version and file sha256 recorded.

The slide is SYNTHETIC (tests/conftest.py); the review.geojson is written here in the agreed format
(level-0 px polygons classified Tumor / Normal / Exclude, a "wsi_toolkit" object with kind "review",
version, slide name), standing in for the viewer's save.
"""

from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import shapely
import shapely.geometry

pytest.importorskip("h5py")

from patch_model.cli import patches_main  # noqa: E402
from patch_model.patches import cut_pcam_patches, review_labels  # noqa: E402
from wsi_toolkit.errors import ConfigError  # noqa: E402
from wsi_toolkit.pcam import PCamH5  # noqa: E402


def write_review(path: Path, polygons: dict[str, object], *, slide: str, version: int = 3) -> Path:
    """A review.geojson as wsi-view --review saves it: one Feature per (class, polygon)."""
    features = [{"type": "Feature", "id": f"f{i}", "geometry": shapely.geometry.mapping(geom),
                 "properties": {"objectType": "annotation", "classification": {"name": name, "color": [255, 0, 0]},
                                "author": "test", "time": "2026-01-01T00:00:00Z"}}
                for i, (name, geom) in enumerate(polygons.items())]
    doc = {"type": "FeatureCollection", "features": features,
           "wsi_toolkit": {"kind": "review", "version": version, "slide": slide, "saved": "2026-01-01T00:00:00Z"}}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc))
    return path


def _polygons(slide) -> dict[str, object]:
    """Tumor = the synthetic truth; Normal = tissue at least 300 px from it; Exclude = the left half of the
    tumour's bounding box (so some tumour is excluded)."""
    tumor = slide.tumor_l0
    x0, y0, x1, y1 = tumor.bounds
    return {"Tumor": tumor, "Normal": slide.tissue_l0.difference(tumor.buffer(300)),
            "Exclude": shapely.box(x0 - 10, y0 - 10, (x0 + x1) / 2, y1 + 10)}


@pytest.fixture(scope="module")
def reviewed(synthetic_slides, tmp_path_factory):
    slide = synthetic_slides()
    results = tmp_path_factory.mktemp("results")
    review = write_review(results / slide.path.stem / "review.geojson", _polygons(slide), slide=slide.path.name)
    out = tmp_path_factory.mktemp("patches")
    summary = cut_pcam_patches([slide.path], annotations=None, reviews=results, out=out, per_slide=60,
                               split_fractions={"train": 1.0})
    with open(out / "camelyonpatch_level_2_split_train_meta.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    return slide, review, summary, out, rows


def _boxes(row, mpp: float):
    side = 96 * 0.972 / mpp
    x, y = float(row["l0_x"]), float(row["l0_y"])
    third = side / 3
    return shapely.box(x + third, y + third, x + 2 * third, y + 2 * third), shapely.box(x, y, x + side, y + side)


def test_review_patches_follow_the_reviewed_classes(reviewed):
    """Recomputed from the polygons the test drew (with 1 px of slack for the CSV's 2 decimals)."""
    slide, _, _, _, rows = reviewed
    polys = _polygons(slide)
    assert {int(r["label"]) for r in rows} == {0, 1}
    for r in rows:
        centre, whole = _boxes(r, slide.mpp)
        assert polys["Exclude"].intersection(whole).area < 1.0, r
        inside = polys["Tumor"] if int(r["label"]) else polys["Normal"]
        assert centre.difference(inside).area < 1.0, r


def test_review_patches_record_the_review_version_and_sha256(reviewed):
    slide, review, summary, _, rows = reviewed
    sha = hashlib.sha256(review.read_bytes()).hexdigest()
    assert {(r["slide"], r["review_version"], r["review_sha256"]) for r in rows} == {(slide.path.stem, "3", sha)}
    rec = summary["slides"][slide.path.stem]["review"]
    assert rec["version"] == 3 and rec["sha256"] == sha and rec["path"] == str(review)
    assert rec["polygons"] == {"tumor": 1, "normal": 1, "exclude": 1, "ignored": 0}
    assert "Exclude" in summary["label"] and summary["settings"]["reviews"] is not None


def test_review_patches_read_back_with_their_labels(reviewed):
    _, _, _, out, rows = reviewed
    ds = PCamH5(out, "train")
    assert np.array_equal(ds.labels, [int(r["label"]) for r in rows])


@pytest.mark.parametrize(("xy", "expected"), [
    ((0, 0), 1),          # centre inside Tumor
    ((800, 0), 0),        # centre inside Normal, far from Tumor
    ((250, 0), -1),       # centre straddles Tumor and Normal: neither inside
    ((0, 800), -1),       # outside every polygon: not sampled (unlike ASAP mode, where it is negative)
    ((1600, 0), -1),      # inside Normal, but the patch touches Exclude
])
def test_review_labels_table(xy, expected):
    tumor, normal, exclude = shapely.box(0, 0, 400, 400), shapely.box(400, 0, 1900, 400), shapely.box(1950, 0, 2100, 50)
    got = review_labels(tumor, normal, exclude, np.array([xy], float), patch_l0=384.0)
    assert got.tolist() == [expected]


def test_a_slide_without_review_fails_and_names_the_folder(synthetic_slides, tmp_path, capsys):
    slide = synthetic_slides()
    rc = patches_main([str(slide.path), "--reviews", str(tmp_path), "--out", str(tmp_path / "o")])
    assert rc != 0
    err = capsys.readouterr().err
    assert "review.geojson" in err and str(tmp_path / slide.path.stem) in err and "--review" in err


def test_a_review_of_another_slide_is_not_used(synthetic_slides, tmp_path):
    slide = synthetic_slides()
    write_review(tmp_path / slide.path.stem / "review.geojson", _polygons(slide), slide="other.svs")
    with pytest.raises(Exception, match="no review.geojson"):
        cut_pcam_patches([slide.path], annotations=None, reviews=tmp_path, out=tmp_path / "o")


def test_annotations_and_reviews_together_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="not both"):
        cut_pcam_patches([tmp_path / "a.tif"], annotations=tmp_path, reviews=tmp_path, out=tmp_path / "o")


def test_review_in_a_suffixed_results_folder_is_found(synthetic_slides, tmp_path):
    """wsi-infer names a second slide with the same stem <stem>_<suffix>: the review naming this slide
    file is found there, the one in <stem>/ naming another slide is passed over."""
    slide = synthetic_slides()
    write_review(tmp_path / slide.path.stem / "review.geojson", _polygons(slide), slide="other.svs")
    mine = write_review(tmp_path / f"{slide.path.stem}_tif" / "review.geojson", _polygons(slide),
                        slide=slide.path.name, version=7)
    summary = cut_pcam_patches([slide.path], annotations=None, reviews=tmp_path, out=tmp_path / "o", per_slide=10,
                               split_fractions={"train": 1.0})
    assert summary["slides"][slide.path.stem]["review"]["path"] == str(mine)
    assert summary["slides"][slide.path.stem]["review"]["version"] == 7
