"""A package's fitted temperature (``wsi_toolkit.calibration`` in config.json) applied on every path:
the config and its schema, ModelPackage.predict_class_proba, the inference loop on a synthetic
slide and run.json, OpenVINO, and pcam-eval (--fit-temperature recovers the temperature the labels
were drawn with; calibration and selective-prediction outputs).

The model is the SYNTHETIC colour-rule package, whose logits are known in closed form:
``P(tumor) = sigmoid(60 * (0.52 - g))`` with ``g`` the mean green in [0, 1] over the patch's centre
third (wsi_toolkit.synthetic_model), so at temperature T ``P(tumor) = sigmoid(60 * (0.52 - g) / T)``.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import jsonschema
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from wsi_toolkit.analysis import RunConfig, analyse_slide, output_key, write_outputs
from wsi_toolkit.errors import ModelPackageError
from wsi_toolkit.inference import InferenceConfig, run_inference
from wsi_toolkit.model_package import CONFIG_NAME, load_model_package, pcam_config, set_calibration
from wsi_toolkit.records import RunRecord
from wsi_toolkit.slide import open_slide
from wsi_toolkit.tiling import GridConfig, make_grid

T = 2.5
CALIBRATION = {"method": "temperature", "temperature": T, "fitted_on": "test: set by hand"}

# WSInfer-zoo's model-config JSON schema (spec 1.0), as published in SBU-BMI/wsinfer-zoo
# wsinfer_zoo/schemas/model-config.schema.json, copied to tests/data. No "additionalProperties" at the
# top level: extra keys (our "wsi_toolkit" object, calibration included) are allowed and ignored.
WSINFER_SCHEMA = json.loads((Path(__file__).parent / "data" / "wsinfer_model_config.schema.json").read_text())


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def _uniform_patches(greens: list[int]) -> np.ndarray:
    """One 96x96 patch per green value (uint8), red and blue 200."""
    x = np.full((len(greens), 96, 96, 3), 200, np.uint8)
    x[..., 1] = np.asarray(greens, np.uint8)[:, None, None]
    return x


@pytest.fixture()
def calibrated(model_dir, tmp_path):
    """A copy of the session's colour-rule package with temperature T recorded."""
    path = tmp_path / "calibrated"
    shutil.copytree(model_dir, path)
    set_calibration(path, CALIBRATION)
    return path


# --------------------------------------------------------------------------------------------
# The config


def test_config_temperature_is_one_without_calibration_and_T_with_it():
    cfg = pcam_config()
    assert cfg.temperature == 1.0
    assert cfg.with_extra(calibration=CALIBRATION).temperature == T
    assert cfg.with_extra(calibration=None).temperature == 1.0


@pytest.mark.parametrize("bad,needle", [
    ({"method": "temperature", "temperature": 0.0}, "calibration.temperature"),
    ({"method": "temperature", "temperature": -2}, "calibration.temperature"),
    ({"method": "temperature"}, "calibration.temperature': is missing"),
    ({"method": "platt", "temperature": 2.0}, "calibration.method"),
    ("2.0", "wsi_toolkit.calibration"),
])
def test_bad_calibration_is_refused_naming_the_field(bad, needle):
    with pytest.raises(ModelPackageError, match=needle):
        pcam_config().with_extra(calibration=bad)


_CAL_VALUES = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6), st.floats(), st.text(max_size=4),
                        st.just("temperature"), st.lists(st.floats(), max_size=2))


@settings(max_examples=200, deadline=None)
@given(st.one_of(_CAL_VALUES, st.dictionaries(st.sampled_from(["method", "temperature", "fitted_on", "other"]),
                                               _CAL_VALUES, max_size=4)))
def test_any_calibration_is_refused_cleanly_or_gives_a_temperature_in_range(cal):
    try:
        cfg = pcam_config().with_extra(calibration=cal)
    except ModelPackageError:
        return
    assert 0.01 <= cfg.temperature <= 100 or cal is None
    assert cfg.temperature == (1.0 if cal is None else float(cal["temperature"]))


def test_calibrated_config_is_still_a_wsinfer_config(calibrated):
    d = json.loads((calibrated / CONFIG_NAME).read_text())
    assert d["wsi_toolkit"]["calibration"]["temperature"] == T
    jsonschema.Draft4Validator(WSINFER_SCHEMA).validate(d)  # raises when WSInfer would refuse it
    assert "calibration" not in d  # ours stays inside the namespaced object


def test_set_calibration_keeps_the_weights_and_can_remove_it(model_dir, calibrated):
    assert load_model_package(calibrated).sha256 == load_model_package(model_dir).sha256
    before = json.loads((calibrated / CONFIG_NAME).read_text())
    set_calibration(calibrated, None)
    after = json.loads((calibrated / CONFIG_NAME).read_text())
    assert "calibration" not in after["wsi_toolkit"]
    assert {k: v for k, v in before["wsi_toolkit"].items() if k != "calibration"} == after["wsi_toolkit"]
    assert load_model_package(calibrated).temperature == 1.0
    assert not [p for p in calibrated.iterdir() if p.name not in {CONFIG_NAME, "torchscript_model.pt", "model.pt2"}]


def test_set_calibration_refuses_a_bad_temperature_and_leaves_the_file(calibrated):
    text = (calibrated / CONFIG_NAME).read_text()
    with pytest.raises(ModelPackageError, match="config.json"):
        set_calibration(calibrated, {"method": "temperature", "temperature": 1000.0})
    assert (calibrated / CONFIG_NAME).read_text() == text


# --------------------------------------------------------------------------------------------
# predict_class_proba and the inference loop


@pytest.mark.parametrize("green", [110, 128, 140, 150])
def test_predict_class_proba_divides_the_logits_by_the_temperature(model_dir, calibrated, green):
    g = green / 255
    x = torch.from_numpy(_uniform_patches([green]))
    plain = load_model_package(model_dir).predict_proba(x)
    scaled = load_model_package(calibrated).predict_proba(x)
    assert float(plain[0]) == pytest.approx(_sigmoid(60 * (0.52 - g)), abs=2e-5)
    assert float(scaled[0]) == pytest.approx(_sigmoid(60 * (0.52 - g) / T), abs=2e-5)
    # the package's raw logits are the same either way
    assert torch.allclose(load_model_package(model_dir).predict_logits(x),
                          load_model_package(calibrated).predict_logits(x))


def test_inference_loop_applies_the_packages_temperature(model_dir, calibrated, synthetic_slides):
    slide = synthetic_slides(0.243, "tiff").path
    with open_slide(slide) as s:
        mask = np.ones((40, 40), bool)
        grid = make_grid(l0_size=s.dimensions, l0_mpp=s.mpp, config=GridConfig(stride_px=96), tissue_mask=mask,
                         mask_l0_per_px=max(s.dimensions) / 40)
    cfg = InferenceConfig(device="cpu", runtime="torch", progress=False)
    p1 = run_inference(slide, grid, load_model_package(model_dir), config=cfg).probs[:, 1].astype(np.float64)
    pt = run_inference(slide, grid, load_model_package(calibrated), config=cfg).probs[:, 1].astype(np.float64)
    assert len(p1) > 20 and (p1 > 0.99).any() and (p1 < 0.01).any()  # tumour and normal tissue both in it
    # logit(p1) read back from float32 probabilities is exact enough away from 1 (float32 steps of 6e-8)
    ok = p1 < 1 - 1e-5
    assert (p1[ok] > 0.9).any()
    logit = np.log(p1[ok]) - np.log1p(-p1[ok])
    expected = 1 / (1 + np.exp(-logit / T))
    assert np.abs(pt[ok] - expected).max() < 2e-5
    assert np.abs(pt - p1).max() > 0.05  # the temperature did change them


def test_tta_averages_the_views_at_temperature_one(model_dir, calibrated, synthetic_slides):
    """The single-view temperature is not applied to TTA views (it over-softens their mean, which averaging
    already calibrates): a calibrated package under --tta flips gives the uncalibrated package's TTA."""
    slide = synthetic_slides(0.243, "tiff").path
    with open_slide(slide) as s:
        grid = make_grid(l0_size=s.dimensions, l0_mpp=s.mpp, config=GridConfig(stride_px=96),
                         tissue_mask=np.ones((40, 40), bool), mask_l0_per_px=max(s.dimensions) / 40)
    cfg = InferenceConfig(device="cpu", runtime="torch", progress=False, tta="flips")
    plain = run_inference(slide, grid, load_model_package(model_dir), config=cfg)
    cal = run_inference(slide, grid, load_model_package(calibrated), config=cfg)
    assert np.abs(cal.probs - plain.probs).max() < 1e-6
    assert cal.extra["temperature_applied"] == 1.0
    single = run_inference(slide, grid, load_model_package(calibrated),
                           config=InferenceConfig(device="cpu", runtime="torch", progress=False))
    assert single.extra["temperature_applied"] == T


def test_run_json_records_the_calibration_and_the_resume_key_sees_it(model_dir, calibrated, synthetic_slides,
                                                                     tmp_path):
    slide = synthetic_slides(0.243, "tiff").path
    pkg = load_model_package(calibrated)
    record = write_outputs(analyse_slide(slide, pkg), tmp_path / "out")
    run = RunRecord.read(tmp_path / "out" / "run.json")
    assert run.model.calibration is not None and run.model.calibration["temperature"] == T
    assert record.model.calibration == run.model.calibration
    # the weights are the same; the config is not, so wsi-infer redoes a slide made at another temperature
    key_plain = output_key(slide, load_model_package(model_dir), RunConfig())
    key_cal = output_key(slide, pkg, RunConfig())
    assert key_plain["model_sha256"] == key_cal["model_sha256"]
    assert key_plain["model_config_sha256"] != key_cal["model_config_sha256"]


def test_old_run_json_without_calibration_still_reads(model_dir, synthetic_slides, tmp_path):
    slide = synthetic_slides(0.243, "tiff").path
    write_outputs(analyse_slide(slide, load_model_package(model_dir)), tmp_path / "out")
    doc = json.loads((tmp_path / "out" / "run.json").read_text())
    assert doc["model"]["calibration"] is None
    del doc["model"]["calibration"]  # as written before calibration existed
    assert RunRecord.from_dict(doc).model.calibration is None


# --------------------------------------------------------------------------------------------
# OpenVINO


def test_openvino_applies_the_temperature_after_its_graph(model_dir, calibrated, tmp_path):
    pytest.importorskip("openvino")
    from wsi_toolkit.runtime import load_openvino_model

    x = _uniform_patches([110, 128, 135, 140, 150])
    cache = tmp_path / "ov"
    plain = load_openvino_model(load_model_package(model_dir), cache_dir=cache)
    scaled = load_openvino_model(load_model_package(calibrated), cache_dir=cache)
    assert scaled.stats["cache"] == "hit"  # same weights, same graph: the temperature is not in it
    want = np.array([_sigmoid(60 * (0.52 - g / 255) / T) for g in (110, 128, 135, 140, 150)])
    assert np.abs(scaled.predict_proba(x) - want).max() < 1e-4
    assert np.abs(plain.predict_proba(x) - want).max() > 0.05
    assert np.allclose(scaled.predict_logits(x), plain.predict_logits(x))


# --------------------------------------------------------------------------------------------
# pcam-eval


@pytest.fixture()
def drawn_pcam(tmp_path):
    """PCam HDF5 layout of uniform-colour patches (green 0.45..0.60) whose labels are drawn from the
    colour rule at temperature 3: P(label 1) = sigmoid(60 (0.52 - g) / 3). SYNTHETIC."""
    pytest.importorskip("h5py")
    from patch_model.data import write_pcam_h5

    root = tmp_path / "drawn"
    rng = np.random.default_rng(7)
    for split, n in (("train", 64), ("valid", 1500), ("test", 600)):
        greens = rng.integers(115, 154, n)
        p = np.array([_sigmoid(60 * (0.52 - g / 255) / 3.0) for g in greens])
        write_pcam_h5(root, split, _uniform_patches(list(greens)), (rng.random(n) < p).astype(np.uint8))
    return root


def test_pcam_eval_fit_temperature_recovers_the_temperature_and_reports(model_dir, drawn_pcam, tmp_path, capsys):
    from patch_model.cli import eval_main

    pkg = tmp_path / "pkg"
    shutil.copytree(model_dir, pkg)
    rc = eval_main([str(pkg), "--data", str(drawn_pcam), "--split", "valid", "--fit-temperature",
                    "--out", str(tmp_path / "fit"), "--no-progress", "--device", "cpu"])
    assert rc == 0
    cal = json.loads((pkg / CONFIG_NAME).read_text())["wsi_toolkit"]["calibration"]
    assert cal["method"] == "temperature" and cal["n"] == 1500 and "valid split" in cal["fitted_on"]
    assert cal["temperature"] == pytest.approx(3.0, rel=0.2)
    assert cal["nll_after"] < cal["nll_before"] and cal["ece_after"] < cal["ece_before"]

    # then the held-out split, with the package's temperature and TTA
    rc = eval_main([str(pkg), "--data", str(drawn_pcam), "--split", "test", "--tta", "--out", str(tmp_path / "test"),
                    "--no-progress", "--device", "cpu"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "ECE (15 bins)" in out and "error AUROC" in out
    ev = json.loads((tmp_path / "test" / "eval.json").read_text())
    c = ev["calibration"]
    assert c["temperature"] == cal["temperature"] and c["package"]["temperature"] == cal["temperature"]
    assert c["ece"] < c["ece_uncalibrated"]  # the rule at T = 1 is overconfident for labels drawn at T = 3
    assert c["nll"] < c["nll_uncalibrated"]
    # selective prediction: the uncertain (green near 0.52) are the ones the labels contradict most
    m = ev["selective"]["margin"]
    assert m["error_auroc"] > 0.6
    acc = m["accuracy_referring"]
    assert set(acc) == {"0", "0.05", "0.1", "0.2"}
    assert acc["0.2"] > acc["0"]
    assert ev["accuracy"] == pytest.approx(acc["0"])
    # uniform patches look the same in every view: the spread is no signal (ties: AUROC 0.5)
    assert ev["selective"]["tta_spread"]["error_auroc"] == pytest.approx(0.5, abs=0.05)
    for png in ("roc.png", "reliability.png", "risk_coverage.png"):
        assert (tmp_path / "test" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_pcam_eval_without_calibration_reports_temperature_one(model_dir, drawn_pcam, tmp_path):
    from patch_model.patch_eval import evaluate_package

    r = evaluate_package(model_dir, drawn_pcam, split="test", out=tmp_path / "e", progress=False, device="cpu")
    assert r.calibration["temperature"] == 1.0 and r.calibration["package"] is None
    assert "ece_uncalibrated" not in r.calibration
    assert "tta_spread" not in r.selective
    p = r.probs[:, 1].astype(np.float64)
    truth = r.labels == 1
    # the ECE by hand over 15 bins (bin k: k/15 < p <= (k+1)/15)
    k = np.clip(np.ceil(p * 15) - 1, 0, 14)
    ece = sum((k == b).sum() / len(p) * abs(p[k == b].mean() - truth[k == b].mean())
              for b in range(15) if (k == b).any())
    assert r.calibration["ece"] == pytest.approx(ece, abs=1e-9)
