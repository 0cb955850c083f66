"""docs/review.md's walk-through, run as written: wsi-synth -> wsi-patches -> pcam-train (a first model)
-> wsi-infer -> wsi-view --review -> wsi-patches --reviews -> pcam-train --init-from -> wsi-infer.

The commands are read from the doc's one bash block and run in-process in a fresh folder; the browser
step (``wsi-view ... --review``) is the viewer's own review server (the app ``wsi-view --review`` runs,
with a per-start token), saved to through its write route as the page does (``PUT /data/<id>/review``
with the token): Tumor = the slide's ASAP tumour outlines, Normal = a ring of tissue around them,
Exclude = a corner of one tumour. The browser itself drawing and saving is tests/test_view_browser.py's.
Everything is SYNTHETIC; the model is a tiny resnet18 at 32 px.
"""

from __future__ import annotations

import hashlib
import json
import re
import shlex
import uuid
from pathlib import Path

import pytest
import shapely
import shapely.geometry

pytest.importorskip("fastai")
pytest.importorskip("h5py")

from patch_model.cli import patches_main, train_main  # noqa: E402
from wsi_toolkit.annotations import read_asap_xml, tumor_region  # noqa: E402
from wsi_toolkit.cli import infer, synth  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "review.md"
PROGRAMS = ["wsi-synth", "wsi-synth", "wsi-patches", "pcam-train", "wsi-infer", "wsi-view", "wsi-patches",
            "pcam-train", "wsi-infer"]


def walkthrough() -> list[list[str]]:
    """The command lines of the doc's "Walk-through" bash block (comments and blank lines dropped)."""
    section = DOC.read_text(encoding="utf-8").split("## Walk-through", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"^```bash\n(.*?)^```$", section, flags=re.S | re.M)
    assert len(blocks) == 1, "docs/review.md: the walk-through is one bash block"
    return [shlex.split(line) for line in blocks[0].splitlines() if line.strip() and not line.lstrip().startswith("#")]


def review_slides(results: Path) -> int:
    """In place of the pathologist at the browser: each slide's outlines saved through the review server."""
    import secrets

    from fastapi.testclient import TestClient

    from wsi_toolkit.view import Catalogue, ReviewSettings, create_app

    catalogue = Catalogue.from_results(results)
    token = secrets.token_urlsafe(24)
    client = TestClient(create_app(catalogue, workers=1, review=ReviewSettings(token=token, author="walkthrough")),
                        base_url="http://127.0.0.1:8123")
    for run in sorted(results.glob("*/run.json")):
        slide = Path(json.loads(run.read_text())["slide"]["path"])
        tumor = tumor_region(read_asap_xml(slide.with_suffix(".xml")))
        x0, y0, x1, y1 = tumor.bounds
        polygons = {"Tumor": tumor, "Normal": tumor.buffer(700).difference(tumor.buffer(150)),
                    "Exclude": shapely.box(x0, y0, x0 + (x1 - x0) / 4, y0 + (y1 - y0) / 4)}
        features = [{"type": "Feature", "id": str(uuid.uuid4()), "geometry": shapely.geometry.mapping(geom),
                     "properties": {"objectType": "annotation", "classification": {"name": name}}}
                    for name, geom in polygons.items()]
        doc = {"type": "FeatureCollection", "features": features, "base_version": 0}
        r = client.put(f"/data/{run.parent.name}/review", content=json.dumps(doc).encode(),
                       headers={"Content-Type": "application/json", "X-WSI-Token": token})
        assert r.status_code == 200 and r.json() == {"version": 1}, r.text
    return 0


def _view(argv: list[str]) -> int:
    assert argv[1:] == ["--review"], argv
    return review_slides(Path(argv[0]))


RUNNERS = {"wsi-synth": synth.main, "wsi-infer": infer.main, "wsi-patches": patches_main, "pcam-train": train_main,
           "wsi-view": _view}


# The walk runs in the default suite (issue 31: the documented loop is run by a test from a fresh clone):
# two tiny trainings and two inferences, ~50 s of CPU.
SLOW = pytest.mark.usefixtures()


@pytest.fixture(scope="module")
def walked(tmp_path_factory):
    """(folder, [(command, exit code)]) after running the walk-through in a fresh folder."""
    root = tmp_path_factory.mktemp("walkthrough")
    done = []
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        for cmd in walkthrough():
            rc = RUNNERS[cmd[0]](cmd[1:])
            done.append((cmd, rc))
            if rc != 0:
                break
    return root, done


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_the_walkthrough_is_the_documented_loop():
    assert [cmd[0] for cmd in walkthrough()] == PROGRAMS


@SLOW
def test_every_step_succeeds(walked):
    _, done = walked
    assert [(cmd[0], rc) for cmd, rc in done] == [(p, 0) for p in PROGRAMS]


@SLOW
def test_first_inference_writes_results_the_review_reads(walked):
    root, _ = walked
    for stem in ("slide_a", "slide_b"):
        assert (root / "results" / stem / "heatmap.tif").is_file()
        assert (root / "results" / stem / "review.geojson").is_file()


@SLOW
def test_review_patches_name_their_review(walked):
    root, _ = walked
    summary = json.loads((root / "patches_v1" / "patches_summary.json").read_text())
    for stem in ("slide_a", "slide_b"):
        assert summary["slides"][stem]["review"]["sha256"] == _sha(root / "results" / stem / "review.geojson")
    assert summary["splits"]["train"]["n_pos"] > 0 and summary["splits"]["train"]["n_neg"] > 0


@SLOW
def test_new_package_lineage_names_the_parent_and_the_reviews(walked):
    root, _ = walked
    lin = json.loads((root / "model_v1" / "model" / "config.json").read_text())["wsi_toolkit"]["lineage"]
    assert lin["parent"]["sha256"] == _sha(root / "model_v0" / "model" / "torchscript_model.pt")
    new = next(d for d in lin["data"] if d["role"] == "new")
    assert new["path"] == str((root / "patches_v1").resolve())
    assert new["reviews"]["slide_a"]["sha256"] == _sha(root / "results" / "slide_a" / "review.geojson")
    assert any(d["role"] == "replay" and d["path"] == str((root / "patches_v0").resolve()) for d in lin["data"])


@SLOW
def test_second_inference_runs_the_new_package(walked):
    root, _ = walked
    child_sha = _sha(root / "model_v1" / "model" / "torchscript_model.pt")
    for stem in ("slide_a", "slide_b"):
        assert (root / "results_v1" / stem / "heatmap.tif").is_file()
        run = json.loads((root / "results_v1" / stem / "run.json").read_text())
        assert run["model"]["sha256"] == child_sha
