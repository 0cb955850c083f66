"""Monte-Carlo dropout (wsi-infer / pcam-eval --mc-dropout): the body once, the head K times.

The packages here are SYNTHETIC fastai-like models (random weights, not classifiers of tissue):
``Sequential(body, head)`` with fastai's head layout (pool, flatten, BatchNorm1d, Dropout, Linear,
ReLU, BatchNorm1d, Dropout, Linear), saved as a package (traced TorchScript, dropout baked in eval
mode). References are computed from the eager model's own layers with explicitly built masks.
"""

from __future__ import annotations

import csv
import json
import shutil

import numpy as np
import pytest
import tifffile
import torch

from wsi_toolkit.cli.infer import main
from wsi_toolkit.errors import ConfigError, ModelPackageError
from wsi_toolkit.inference import InferenceConfig, head_dropout_ps, run_inference, split_for_mc_dropout
from wsi_toolkit.model_package import Preprocess, load_model_package, pcam_config, save_model_package, set_calibration
from wsi_toolkit.slide import open_slide
from wsi_toolkit.synthetic import ALIGNMENT_SPEC, write_synthetic_slide
from wsi_toolkit.tiling import GridConfig, make_grid
from wsi_toolkit.tissue import detect_tissue


def fastai_like(p1: float = 0.25, p2: float = 0.5, *, dropout: bool = True) -> torch.nn.Sequential:
    """A tiny SYNTHETIC model laid out as fastai's vision_learner: body, then its head; BatchNorm
    running statistics far from (0, 1), so eval-mode and batch statistics differ."""
    g = torch.Generator().manual_seed(5)
    body = torch.nn.Sequential(torch.nn.Conv2d(3, 6, 5, stride=4), torch.nn.ReLU())
    head_layers: list[torch.nn.Module] = [torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.BatchNorm1d(6)]
    head_layers += [torch.nn.Dropout(p1)] if dropout else []
    head_layers += [torch.nn.Linear(6, 16, bias=False), torch.nn.ReLU(), torch.nn.BatchNorm1d(16)]
    head_layers += [torch.nn.Dropout(p2)] if dropout else []
    head_layers += [torch.nn.Linear(16, 2)]
    model = torch.nn.Sequential(body, torch.nn.Sequential(*head_layers))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm1d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.5)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) * 0.5 + 0.5)
    return model.eval()


def _save(path, model):
    save_model_package(path, model, pcam_config(architecture="fastai-like-test", input_size=96,
                                                extra={"synthetic": True}))
    return path


@pytest.fixture(scope="module")
def eager():
    return fastai_like()


@pytest.fixture(scope="module")
def mc_package_dir(tmp_path_factory, eager):
    return _save(tmp_path_factory.mktemp("mc") / "fastai_like", eager)


@pytest.fixture(scope="module")
def align_slide(tmp_path_factory):
    return write_synthetic_slide(tmp_path_factory.mktemp("mcslide") / "mc_slide.tif", ALIGNMENT_SPEC, mpp=0.243,
                                 tile=256)


def _x(n=5, seed=0):
    return torch.randn(n, 3, 96, 96, generator=torch.Generator().manual_seed(seed))


def _reference(model: torch.nn.Sequential, x: torch.Tensor, index: list[int], *, samples: int, seed: int):
    """(samples, N, 2) logits from the eager layers, masks drawn by the documented rule: per patch
    numpy's PCG64 seeded with SeedSequence([seed, index]), drawing (samples, d) float32 uniforms per
    Dropout in order; keep where >= p, kept values x 1 / (1 - p)."""
    body, head = model[0], list(model[1])
    out = torch.zeros(samples, len(index), 2)
    with torch.no_grad():
        for j, i in enumerate(index):
            g = np.random.default_rng(np.random.SeedSequence([seed, i]))
            feats = body(x[j:j + 1])
            draws = {}
            for layer in head:
                if isinstance(layer, torch.nn.Dropout):
                    d = 6 if not draws else 16
                    draws[id(layer)] = torch.from_numpy(g.random((samples, d), dtype=np.float32))
            for k in range(samples):
                y = feats
                for layer in head:
                    if isinstance(layer, torch.nn.Dropout):
                        y = y * (draws[id(layer)][k] >= layer.p).float() / (1 - layer.p)
                    else:
                        y = layer(y)
                out[k, j] = y[0]
    return out


def test_samples_equal_the_eager_head_with_explicit_masks(mc_package_dir, eager):
    package = load_model_package(mc_package_dir)
    mc = split_for_mc_dropout(package.model, samples=6, seed=3, input_size=96, source=mc_package_dir)
    assert mc.dropout_ps == pytest.approx([0.25, 0.5])  # read from the traced graph's constants
    x, index = _x(5), [10, 3, 7, 0, 42]
    with torch.no_grad():
        got = mc(x, torch.tensor(index)).reshape(6, 5, 2)
    want = _reference(eager, x, index, samples=6, seed=3)
    assert torch.allclose(got, want, atol=1e-5)
    assert got.std(0).max() > 0.1  # the samples really differ


def test_dropout_off_gives_the_plain_model_and_batchnorm_stays_in_eval(tmp_path, eager):
    # p = 0: every sample is the deterministic model, whose BatchNorm uses its running statistics
    package = load_model_package(_save(tmp_path / "p0", fastai_like(0.0, 0.0)))
    mc = split_for_mc_dropout(package.model, samples=4, seed=0)
    x = _x(3)
    with torch.no_grad():
        got = mc(x, torch.arange(3)).reshape(4, 3, 2)
        want = package.model(x)
        batch_stats = fastai_like(0.0, 0.0).train()(x)  # what BatchNorm in training mode would give
    assert torch.allclose(got, want.expand(4, 3, 2), atol=1e-5)
    assert got.std(0).max() < 1e-6
    assert (batch_stats - want).abs().max() > 0.1  # the check above could tell the two apart


def test_the_mean_of_many_samples_is_unbiased():
    # one dropout before the last (linear) layer: E[logits] = the deterministic logits
    g = torch.Generator().manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Sequential(torch.nn.Conv2d(3, 8, 5, stride=4)),
                                torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                                                    torch.nn.Dropout(0.5), torch.nn.Linear(8, 2))).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    mc = split_for_mc_dropout(model, samples=4000, seed=0)
    x = _x(2)
    with torch.no_grad():
        samples = mc(x, torch.arange(2)).reshape(4000, 2, 2)
        want = model(x)
    sem = samples.std(0) / 4000 ** 0.5
    assert ((samples.mean(0) - want).abs() <= 4 * sem + 1e-6).all()
    assert sem.min() > 0  # the samples spread


def test_samples_depend_on_seed_and_index_not_on_the_batch(mc_package_dir):
    package = load_model_package(mc_package_dir)
    x, index = _x(6), torch.tensor([5, 1, 9, 2, 8, 4])
    mc = split_for_mc_dropout(package.model, samples=5, seed=11)
    with torch.no_grad():
        whole = mc(x, index).reshape(5, 6, 2)
        parts = torch.cat([mc(x[:2], index[:2]).reshape(5, 2, 2), mc(x[2:], index[2:]).reshape(5, 4, 2)], dim=1)
        again = split_for_mc_dropout(package.model, samples=5, seed=11)(x, index).reshape(5, 6, 2)
        other = split_for_mc_dropout(package.model, samples=5, seed=12)(x, index).reshape(5, 6, 2)
    assert torch.equal(whole, again)
    assert torch.allclose(whole, parts, atol=1e-6)
    assert (whole - other).abs().max() > 0.1


def test_a_model_without_a_body_head_split_or_head_dropout_is_refused(tmp_path, model_dir):
    colour_rule = load_model_package(model_dir)
    with pytest.raises(ModelPackageError, match=r"Sequential\(body, head\)") as err:
        split_for_mc_dropout(colour_rule.model, samples=4, source=model_dir)
    assert str(model_dir) in str(err.value) and "--tta" in str(err.value)
    no_drop = load_model_package(_save(tmp_path / "nodrop", fastai_like(dropout=False)))
    with pytest.raises(ModelPackageError, match="needs a Dropout layer in the model's head"):
        head_dropout_ps(no_drop.model, source=no_drop.path)
    with pytest.raises(ConfigError):
        split_for_mc_dropout(no_drop.model, samples=1)


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"mc_dropout": 1}, "mc_dropout"),
    ({"mc_dropout": 4, "tta": "dihedral"}, "choose one uncertainty method"),
    ({"mc_dropout": 4, "runtime": "openvino"}, "MC-dropout runs on the torch runtime: use --runtime torch"),
    ({"mc_dropout": 4, "precision": "int8"}, "MC-dropout runs on the torch runtime"),
])
def test_inference_config_refuses_impossible_mc_dropout(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        InferenceConfig(**kwargs)


def test_run_inference_mc_dropout_is_the_mean_and_spread_of_the_samples(align_slide, mc_package_dir, tmp_path):
    calibrated = tmp_path / "calibrated"
    shutil.copytree(mc_package_dir, calibrated)
    set_calibration(calibrated, {"method": "temperature", "temperature": 2.0, "fitted_on": "test: set by hand"})
    package = load_model_package(calibrated)
    with open_slide(align_slide.path) as slide:
        tissue = detect_tissue(slide.thumbnail(mpp=8.0), l0_mpp=slide.mpp)
        grid = make_grid(l0_size=slide.dimensions, l0_mpp=slide.mpp, config=GridConfig(stride_px=96),
                         tissue_mask=tissue.mask, mask_l0_per_px=tissue.l0_per_px)
        idx = np.linspace(0, len(grid) - 1, 12).astype(int)
        patches = np.stack([slide.read_at_mpp(xy, (96, 96), 0.972) for xy in grid.patch_l0_xy()[idx]])
    runs = [run_inference(align_slide.path, grid, package,
                          config=InferenceConfig(workers=0, progress=False, device="cpu", read_from="nearest",
                                                 batch_size=bs, mc_dropout=8, mc_dropout_seed=2))
            for bs in (7, 64)]
    # the reference: the split model on the same patches, indexed by their place in the grid, each sample
    # at the package's temperature (2) before the mean
    mc = split_for_mc_dropout(package.model, samples=8, seed=2)
    with torch.no_grad():
        x = Preprocess(package.config)(torch.from_numpy(patches))
        p = torch.softmax(mc(x, torch.from_numpy(idx)).reshape(8, len(idx), 2) / 2.0, dim=-1)[..., 1].double()
    for r in runs:
        assert r.runtime["runtime"] == "torch"
        assert np.abs(r.probs[idx, 1] - p.mean(0).numpy()).max() < 1e-5
        assert np.abs(r.probs_std[idx, 1] - p.std(0, unbiased=False).numpy()).max() < 1e-5
        assert r.extra["mc_dropout_samples"] == 8 and r.extra["temperature_applied"] == 2.0
    # batch size does not change a patch's samples (float rounding of other matrix shapes aside)
    assert np.abs(runs[0].probs - runs[1].probs).max() < 1e-6
    assert p.std(0).max() > 0.02


def _infer(slide, model_dir, out, *extra) -> int:
    return main([str(slide), "--model", str(model_dir), "--out", str(out), "--workers", "0", "--no-progress",
                 "--stride-px", "96", *extra])


def test_wsi_infer_mc_dropout_writes_an_aligned_uncertainty_map_and_records_it(align_slide, mc_package_dir,
                                                                               tmp_path):
    out = tmp_path / "mc"
    assert _infer(align_slide.path, mc_package_dir, out, "--mc-dropout", "4", "--mc-dropout-seed", "1") == 0
    d = out / align_slide.path.stem
    run = json.loads((d / "run.json").read_text())
    assert run["output_key"]["mc_dropout"] == {"samples": 4, "seed": 1}
    assert "tta" not in run["output_key"]
    assert run["settings"]["run"]["inference"]["mc_dropout"] == 4
    assert run["uncertainty"]["method"] == "mc-dropout" and run["uncertainty"]["mc_dropout_samples"] == 4
    assert run["timings"]["mc_dropout_p"] == pytest.approx([0.25, 0.5])
    assert run["runtime"]["runtime"] == "torch"  # --runtime auto picked torch
    assert "uncertainty.tif" in run["outputs"]
    with tifffile.TiffFile(d / "heatmap.tif") as h, tifffile.TiffFile(d / "uncertainty.tif") as u:
        assert len(h.pages) == len(u.pages) > 0
        for ph, pu in zip(h.pages, u.pages):
            assert ph.shape == pu.shape and ph.tile == pu.tile
            for tag in ("XResolution", "YResolution", "ResolutionUnit"):
                assert ph.tags[tag].value == pu.tags[tag].value
        level_h, level_u = h.pages[0].asarray(), u.pages[0].asarray()
    rows = list(csv.DictReader(open(d / "tiles.csv")))
    assert "mc_dropout_std_tumor" in rows[0] and "tta_std_tumor" not in rows[0]
    grid = run["grid"]
    cells = np.array([[round((int(r["miny"]) + grid["offset_l0"]) / grid["cell_l0"]),
                       round((int(r["minx"]) + grid["offset_l0"]) / grid["cell_l0"])] for r in rows])
    predicted = np.zeros(level_h.shape, bool)
    predicted[cells[:, 0], cells[:, 1]] = True
    assert not level_u[~predicted].any() and not level_h[~predicted].any()
    std = np.array([float(r["mc_dropout_std_tumor"]) for r in rows])
    assert np.abs(level_u[cells[:, 0], cells[:, 1]] / 255.0 - std).max() <= 0.5 / 255 + 1e-6
    assert std.max() > 0.02
    for feat in json.loads((d / "tumor.geojson").read_text())["features"]:
        m = feat["properties"]["measurements"]
        assert 0 <= m["mean_mc_dropout_std"] <= m["max_mc_dropout_std"] <= 0.5

    # the same setting skips the slide; another seed redoes it
    assert _infer(align_slide.path, mc_package_dir, out, "--mc-dropout", "4", "--mc-dropout-seed", "1") == 0
    assert next(csv.DictReader(open(out / "summary.csv")))["status"] == "skipped"
    assert _infer(align_slide.path, mc_package_dir, out, "--mc-dropout", "4", "--mc-dropout-seed", "2") == 0
    assert next(csv.DictReader(open(out / "summary.csv")))["status"] == "ok"


def test_wsi_infer_mc_dropout_refuses_a_package_without_head_dropout(align_slide, model_dir, tmp_path, capsys):
    assert _infer(align_slide.path, model_dir, tmp_path / "o", "--mc-dropout", "4") != 0
    err = capsys.readouterr().err
    assert str(model_dir) in err and "Sequential(body, head)" in err and "--tta" in err
    assert _infer(align_slide.path, model_dir, tmp_path / "o2", "--mc-dropout", "4", "--runtime", "openvino") != 0
    assert "MC-dropout runs on the torch runtime: use --runtime torch" in capsys.readouterr().err


def test_pcam_eval_mc_dropout_reports_the_reliability_metrics(mc_package_dir, tmp_path, capsys):
    pytest.importorskip("h5py")
    from patch_model.cli import eval_main
    from patch_model.data import write_pcam_h5

    rng = np.random.default_rng(4)
    data = tmp_path / "pcam"
    for split, n in (("train", 8), ("valid", 8), ("test", 40)):  # SYNTHETIC noise patches, random labels
        write_pcam_h5(data, split, rng.integers(0, 256, (n, 96, 96, 3), dtype=np.uint8),
                      rng.integers(0, 2, n).astype(np.uint8))
    pkg = tmp_path / "pkg"
    shutil.copytree(mc_package_dir, pkg)
    rc = eval_main([str(pkg), "--data", str(data), "--split", "test", "--mc-dropout", "6", "--out", str(tmp_path / "e"),
                    "--no-progress", "--device", "cpu", "--batch-size", "16"])
    assert rc == 0
    assert "MC-dropout(6, seed 0)" in capsys.readouterr().out
    ev = json.loads((tmp_path / "e" / "eval.json").read_text())
    assert ev["mc_dropout"] == {"samples": 6, "seed": 0, "dropout_p": pytest.approx([0.25, 0.5])}
    spread = ev["selective"]["mc_dropout_spread"]
    assert "6 MC-dropout samples" in spread["uncertainty"]
    assert set(spread["accuracy_referring"]) == {"0", "0.05", "0.1", "0.2"}
    assert "ece" in ev["calibration"] and "tta_spread" not in ev["selective"]
    # the scored probabilities are the samples' mean: the same patches through run-alone MC-dropout
    package = load_model_package(pkg)
    import h5py

    with h5py.File(data / "camelyonpatch_level_2_split_test_x.h5") as f:
        x = torch.from_numpy(f["x"][:])
    mc = split_for_mc_dropout(package.model, samples=6, seed=0)
    with torch.no_grad():
        p = torch.softmax(mc(package.preprocess(x), torch.arange(40)).reshape(6, 40, 2), -1).mean(0)
    acc = float((p.argmax(1).numpy() == ev_labels(data)).mean())
    assert ev["accuracy"] == pytest.approx(acc)
    assert rc == 0 and eval_main([str(pkg), "--data", str(data), "--mc-dropout", "6", "--tta", "--no-progress",
                                  "--device", "cpu"]) != 0


def ev_labels(data) -> np.ndarray:
    import h5py

    with h5py.File(data / "camelyonpatch_level_2_split_test_y.h5") as f:
        return np.asarray(f["y"][:]).reshape(-1).astype(int)


def test_a_torch_export_package_is_sampled_through_its_torchscript(align_slide, mc_package_dir):
    exported = load_model_package(mc_package_dir, prefer_export=True)
    if exported.format != "torch.export":
        pytest.skip("this torch did not write or read model.pt2 for the test model")
    with pytest.raises(ModelPackageError, match="model.pt2"):  # its graph has no dropout left to sample
        split_for_mc_dropout(exported.model, samples=2, source=exported.path)
    corners = np.array([[2000.0, 2000.0], [2400.0, 2400.0], [2800.0, 2000.0]])  # level-0 (x, y)
    config = InferenceConfig(workers=0, progress=False, device="cpu", mc_dropout=4, read_from="nearest")
    got = run_inference(align_slide.path, corners, exported, config=config)
    want = run_inference(align_slide.path, corners, load_model_package(mc_package_dir), config=config)
    assert np.abs(got.probs - want.probs).max() < 1e-5 and np.abs(got.probs_std - want.probs_std).max() < 1e-5
    assert want.probs_std.max() > 0
