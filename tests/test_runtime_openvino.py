"""The OpenVINO CPU runtime: fp32 agreement with torch, the conversion cache, fallback, INT8, calibration."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("openvino", reason="OpenVINO is not installed (pip install 'wsi-toolkit[openvino]')")

from wsi_toolkit.errors import ConfigError  # noqa: E402
from wsi_toolkit.model_package import load_model_package, pcam_config, save_model_package  # noqa: E402
from wsi_toolkit.runtime import (  # noqa: E402
    CalibrationSet,
    ConversionError,
    calibration_from_pcam,
    calibration_from_slides,
    compare_probabilities,
    load_openvino_model,
    resolve_runtime,
)
from wsi_toolkit.runtime import openvino as ov_runtime  # noqa: E402
from wsi_toolkit.runtime.cache import ENTRY_JSON, MODEL_BIN, lookup  # noqa: E402


def _patches(n: int, px: int = 96, seed: int = 7) -> np.ndarray:
    """Noise and smooth colour fields (other seeds than the conversion's own probe)."""
    return np.concatenate([ov_runtime.probe_patches(px, n=n, seed=seed),
                           np.random.default_rng(seed).integers(60, 230, (n, px, px, 3), dtype=np.uint8)])


def _torch_p(package, x: np.ndarray) -> np.ndarray:
    return package.predict_proba(torch.from_numpy(x)).numpy()


@pytest.fixture(scope="module")
def r18_package(tmp_path_factory):
    """A random-weight ResNet18 package at 96 px, made with save_model_package."""
    import torchvision

    torch.manual_seed(0)
    net = torchvision.models.resnet18(num_classes=2).eval()
    path = save_model_package(tmp_path_factory.mktemp("r18") / "pkg", net,
                              pcam_config(architecture="resnet18", input_size=96))
    return load_model_package(path)


@pytest.fixture(scope="module")
def colour_package(model_dir):
    return load_model_package(model_dir)


@pytest.fixture(scope="module")
def r18_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("ov_cache_r18")


@pytest.mark.parametrize("which", ["r18_package", "colour_package"])
def test_fp32_agrees_with_torch(which, request, tmp_path):
    package = request.getfixturevalue(which)
    model = load_openvino_model(package, precision="fp32", cache_dir=tmp_path)
    x = _patches(32)
    report = compare_probabilities(_torch_p(package, x), model.predict_proba(x))
    assert report["max_abs_dp"] <= 1e-4, report
    assert model.info["fp32_vs_torch"]["max_abs_dp"] <= 1e-4
    assert model.path == "openvino-fp32" and model.stats["cache"] == "built"
    # The loop's interface: the uint8 patches in (preprocessing in the graph), logits out.
    assert model.takes_uint8 and model.info["preprocessing"].startswith("in the graph")
    logits = model(torch.from_numpy(x[:5]))
    assert logits.shape == (5, 2) and logits.dtype == torch.float32
    with pytest.raises(ConfigError, match="uint8"):
        model(package.preprocess(torch.from_numpy(x[:5])))
    plain = load_openvino_model(package, precision="fp32", cache_dir=tmp_path, preprocess="torch")
    assert not plain.takes_uint8 and plain.info["preprocessing"] == "torch"
    torch.testing.assert_close(plain(package.preprocess(torch.from_numpy(x[:5]))), logits, atol=1e-4, rtol=0)


@pytest.mark.parametrize("input_size", [96, 128, 64])
def test_preprocessing_in_the_graph_gives_torchs_probabilities(input_size, tmp_path):
    """OpenVINO's PrePostProcessor does the package's preprocessing (uint8 -> [0, 1], NHWC -> NCHW,
    Resize 96 -> 128, Normalize) inside the compiled graph with torch's result (5e-5); a Resize that
    shrinks (96 -> 64: torch's antialiased filter) stays in torch."""
    import torchvision

    torch.manual_seed(1)
    net = torchvision.models.resnet18(num_classes=2).eval()
    package = load_model_package(save_model_package(tmp_path / "pkg", net,
                                                    pcam_config(architecture="resnet18", input_size=input_size)))
    graph = load_openvino_model(package, cache_dir=tmp_path / "c")
    plain = load_openvino_model(package, cache_dir=tmp_path / "c", preprocess="torch")
    assert graph.takes_uint8 is (input_size >= 96) and not plain.takes_uint8
    x = _patches(24)
    dp = np.abs(graph.predict_class_proba(x) - plain.predict_class_proba(x)).max()
    assert dp <= 5e-5, dp
    assert compare_probabilities(_torch_p(package, x), graph.predict_proba(x))["max_abs_dp"] <= 1e-4


def test_converts_from_torch_export_or_torchscript(r18_package, tmp_path):
    """model.pt2 where the package has one; the TorchScript of a package without (a WSInfer zoo package)."""
    import shutil

    assert load_openvino_model(r18_package, cache_dir=tmp_path / "a").info["source"] == "torch.export"
    zoo = tmp_path / "zoo"
    shutil.copytree(r18_package.path, zoo, ignore=shutil.ignore_patterns("model.pt2"))
    package = load_model_package(zoo)
    model = load_openvino_model(package, cache_dir=tmp_path / "b")
    assert model.info["source"] == "torchscript" and model.stats["cache"] == "built"
    x = _patches(16)
    assert compare_probabilities(_torch_p(package, x), model.predict_proba(x))["max_abs_dp"] <= 1e-4


def test_cache_hit_does_not_convert(colour_package, tmp_path, monkeypatch):
    first = load_openvino_model(colour_package, cache_dir=tmp_path)
    entry = Path(first.stats["cache_entry"])
    stamp = (entry / MODEL_BIN).stat().st_mtime_ns

    def no_conversion(*a, **k):
        raise AssertionError("converted again although the cache holds the model")

    monkeypatch.setattr(ov_runtime, "_convert", no_conversion)
    second = load_openvino_model(colour_package, cache_dir=tmp_path)
    assert (first.stats["cache"], second.stats["cache"]) == ("built", "hit")
    assert Path(second.stats["cache_entry"]) == entry and (entry / MODEL_BIN).stat().st_mtime_ns == stamp
    x = _patches(8)
    np.testing.assert_array_equal(first.predict_class_proba(x), second.predict_class_proba(x))


def test_cache_dir_from_environment(colour_package, tmp_path, monkeypatch):
    monkeypatch.setenv("WSI_TOOLKIT_CACHE", str(tmp_path / "env_cache"))
    model = load_openvino_model(colour_package)
    assert Path(model.stats["cache_entry"]).is_relative_to(tmp_path / "env_cache" / "openvino")


def test_cache_entry_for_other_settings_is_rebuilt(colour_package, tmp_path, caplog):
    entry = Path(load_openvino_model(colour_package, cache_dir=tmp_path).stats["cache_entry"])
    meta = json.loads((entry / ENTRY_JSON).read_text())
    meta["key"]["package_sha256"] = "0" * 64  # an entry written for another package under this name
    (entry / ENTRY_JSON).write_text(json.dumps(meta))
    with caplog.at_level(logging.WARNING, logger="wsi_toolkit.runtime.cache"):
        again = load_openvino_model(colour_package, cache_dir=tmp_path)
    assert again.stats["cache"] == "built" and "other settings" in caplog.text
    assert json.loads((entry / ENTRY_JSON).read_text())["key"]["package_sha256"] == colour_package.sha256


def test_corrupt_cache_entry_is_rebuilt(colour_package, tmp_path, caplog):
    entry = Path(load_openvino_model(colour_package, cache_dir=tmp_path).stats["cache_entry"])
    data = (entry / MODEL_BIN).read_bytes()
    (entry / MODEL_BIN).write_bytes(data[: len(data) // 2])  # truncated, as by a full disk
    with caplog.at_level(logging.WARNING, logger="wsi_toolkit.runtime.cache"):
        again = load_openvino_model(colour_package, cache_dir=tmp_path)
    assert again.stats["cache"] == "built" and "sha256" in caplog.text
    x = _patches(8)
    assert compare_probabilities(_torch_p(colour_package, x), again.predict_proba(x))["max_abs_dp"] <= 1e-4
    assert not list(entry.parent.glob(".*.partial-*")) and not list(entry.parent.glob(".*.stale-*"))


def test_two_processes_converting_at_once(model_dir, tmp_path):
    """Both processes get the model; it is converted once; the entry is whole; no temporary folder stays."""
    cache, go = tmp_path / "cache", tmp_path / "go"
    script = textwrap.dedent(f"""
        import json, sys, time
        from pathlib import Path
        from wsi_toolkit.model_package import load_model_package
        from wsi_toolkit.runtime import load_openvino_model
        package = load_model_package({str(model_dir)!r})
        Path(sys.argv[1]).write_text("ready")
        while not Path({str(go)!r}).exists():
            time.sleep(0.01)
        model = load_openvino_model(package, cache_dir={str(cache)!r})
        print(json.dumps({{**model.stats, "source": model.info["source"]}}))
    """)
    ready = [tmp_path / f"ready{i}" for i in range(2)]
    procs = [subprocess.Popen([sys.executable, "-c", script, str(r)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for r in ready]
    deadline = time.monotonic() + 300
    while not all(r.exists() for r in ready):
        assert time.monotonic() < deadline and all(p.poll() is None for p in procs), [p.communicate() for p in procs]
        time.sleep(0.05)
    go.write_text("go")
    results = []
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
        results.append(json.loads(out.strip().splitlines()[-1]))
    assert sorted(r["cache"] for r in results) == ["built", "hit"]
    assert results[0]["cache_entry"] == results[1]["cache_entry"]
    entry = Path(results[0]["cache_entry"])
    assert not list(entry.parent.glob(".*.partial-*"))
    package = load_model_package(model_dir)
    key = ov_runtime.CacheKey(package_sha256=package.sha256, graph="fp32", input_size=96,
                              openvino=ov_runtime.openvino_versions()["openvino"])
    assert lookup(cache, key) is not None


class _Cummax(torch.nn.Module):
    """A model with an op OpenVINO has no conversion rule for (aten::cummax)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cummax(x.mean(dim=(2, 3)), dim=1)[0][:, 1:]


def test_unconvertible_model_raises_conversion_error(tmp_path):
    path = save_model_package(tmp_path / "cummax", _Cummax(), pcam_config(architecture="cummax", input_size=96))
    package = load_model_package(path)
    with pytest.raises(ConversionError, match="cummax"):
        load_openvino_model(package, cache_dir=tmp_path / "cache")
    assert not [p for p in (tmp_path / "cache" / "openvino").iterdir() if not p.name.endswith(".lock")]


def test_fp32_graph_disagreeing_with_torch_is_refused(colour_package, tmp_path, monkeypatch):
    real = ov_runtime._torch_probs
    monkeypatch.setattr(ov_runtime, "_torch_probs", lambda pkg, x: real(pkg, x) + 1e-3)
    with pytest.raises(ConversionError, match="disagrees with torch"):
        load_openvino_model(colour_package, cache_dir=tmp_path)
    monkeypatch.setattr(ov_runtime, "_torch_probs", real)
    assert load_openvino_model(colour_package, cache_dir=tmp_path).stats["cache"] == "built"  # nothing was cached


def test_int8_runs_close_to_fp32(r18_package, r18_cache, synthetic_slides):
    slide = synthetic_slides().path
    calibration = calibration_from_slides([slide], r18_package, n=64, seed=0)
    assert calibration.patches.shape == (64, 96, 96, 3)
    int8 = load_openvino_model(r18_package, precision="int8", cache_dir=r18_cache, calibration=calibration)
    fp32 = load_openvino_model(r18_package, precision="fp32", cache_dir=r18_cache)
    assert int8.path == "openvino-int8" and int8.info["calibration"]["fingerprint"] == calibration.fingerprint
    assert int8.info["int8_vs_fp32"]["n_patches"] == 64
    x = calibration_from_slides([slide], r18_package, n=64, seed=1).patches
    report = compare_probabilities(fp32.predict_proba(x), int8.predict_proba(x))
    assert report["mean_abs_dp"] < 0.01 and report["max_abs_dp"] < 0.05, report


def test_calibration_fingerprint_keys_the_int8_graph(r18_package, r18_cache, synthetic_slides):
    slide = synthetic_slides().path
    a = calibration_from_slides([slide], r18_package, n=32, seed=0)
    assert calibration_from_slides([slide], r18_package, n=32, seed=0).fingerprint == a.fingerprint  # seeded
    b = calibration_from_slides([slide], r18_package, n=32, seed=5)
    assert a.fingerprint != b.fingerprint
    ma = load_openvino_model(r18_package, precision="int8", cache_dir=r18_cache, calibration=a)
    mb = load_openvino_model(r18_package, precision="int8", cache_dir=r18_cache, calibration=b)
    assert ma.stats["cache_entry"] != mb.stats["cache_entry"]
    again = load_openvino_model(r18_package, precision="int8", cache_dir=r18_cache, calibration=a)
    assert (again.stats["cache"], again.stats["cache_entry"]) == ("hit", ma.stats["cache_entry"])


def test_automatic_calibration_is_drawn_once_per_package(colour_package, synthetic_slides, tmp_path, monkeypatch):
    """No --calibration: the first int8 load draws patches of its slide and quantizes; a later load on
    another slide finds that graph in the cache and neither draws, converts nor quantizes."""
    calls: list[str] = []

    def draw(slide):
        def f():
            calls.append(slide.name)
            return calibration_from_slides([slide], colour_package, n=32, seed=0)
        return f

    first_slide, other_slide = synthetic_slides().path, synthetic_slides(mpp=0.5).path
    first = load_openvino_model(colour_package, precision="int8", cache_dir=tmp_path, calibration=draw(first_slide))
    assert calls == [first_slide.name]
    assert first.stats["calibration"] == "drawn" and first.stats["cache"] == "built"
    assert first.stats["seconds_calibration"] >= 0 and first.stats["seconds_quantize"] > 0
    entry = Path(first.stats["cache_entry"])
    kept = np.load(entry / ov_runtime.CALIBRATION_NPY)  # the patches it was calibrated on, with the graph
    assert kept.shape == (32, 96, 96, 3)
    assert CalibrationSet(kept, source="kept").fingerprint == first.info["calibration"]["fingerprint"]

    def nothing(*a, **k):
        raise AssertionError("converted or quantized again although the cache holds the int8 graph")

    monkeypatch.setattr(ov_runtime, "_convert", nothing)
    monkeypatch.setattr(ov_runtime, "_build_int8", nothing)
    second = load_openvino_model(colour_package, precision="int8", cache_dir=tmp_path, calibration=draw(other_slide))
    assert calls == [first_slide.name]  # nothing drawn for the second slide
    assert second.stats["calibration"] == "cached" and second.stats["cache"] == "hit"
    assert "seconds_quantize" not in second.stats and "seconds_calibration" not in second.stats
    assert Path(second.stats["cache_entry"]) == entry and second.info["calibration"] == first.info["calibration"]
    x = _patches(8)
    np.testing.assert_array_equal(first.predict_class_proba(x), second.predict_class_proba(x))
    # A given set is keyed by its fingerprint: another graph, not the automatic one.
    monkeypatch.undo()
    given = load_openvino_model(colour_package, precision="int8", cache_dir=tmp_path,
                                calibration=calibration_from_slides([other_slide], colour_package, n=16, seed=0))
    assert given.stats["calibration"] == "given" and Path(given.stats["cache_entry"]) != entry


def test_int8_needs_calibration(colour_package, tmp_path):
    with pytest.raises(ConfigError, match="calibration"):
        load_openvino_model(colour_package, precision="int8", cache_dir=tmp_path)


def test_bf16_refused_without_native_support(colour_package, tmp_path, monkeypatch):
    import wsi_toolkit.runtime.cpu as cpu

    monkeypatch.setattr(cpu, "cpu_has_fast_bf16", lambda: False)
    with pytest.raises(ConfigError, match="native bfloat16"):
        load_openvino_model(colour_package, precision="bf16", cache_dir=tmp_path)
    forced = load_openvino_model(colour_package, precision="bf16", cache_dir=tmp_path, force_bf16=True)
    assert forced.info["forced"] and forced.info["inference_precision_hint"] == "bf16"


def test_resolve_runtime():
    assert resolve_runtime("auto", torch.device("cpu")) == "openvino"
    assert resolve_runtime("torch", torch.device("cpu")) == "torch"
    assert resolve_runtime("auto", torch.device("cuda")) == "torch"
    with pytest.raises(ConfigError, match="CPU"):
        resolve_runtime("openvino", torch.device("cuda"))
    with pytest.raises(ConfigError, match="runtime must be"):
        resolve_runtime("onnx", torch.device("cpu"))


def test_calibration_from_pcam_folders(tmp_path):
    import tifffile

    rng = np.random.default_rng(0)
    kaggle = tmp_path / "kaggle"
    (kaggle / "train").mkdir(parents=True)
    rows = ["id,label"]
    for i in range(20):
        tifffile.imwrite(kaggle / "train" / f"p{i:02d}.tif", rng.integers(0, 256, (96, 96, 3), dtype=np.uint8))
        rows.append(f"p{i:02d},{i % 2}")
    (kaggle / "train_labels.csv").write_text("\n".join(rows) + "\n")
    cal = calibration_from_pcam(kaggle, n=8, seed=3)
    assert cal.patches.shape == (8, 96, 96, 3) and "kaggle" in cal.source
    assert calibration_from_pcam(kaggle, n=8, seed=3).fingerprint == cal.fingerprint
    assert calibration_from_pcam(kaggle, n=8, seed=4).fingerprint != cal.fingerprint
    pytest.importorskip("h5py")
    from patch_model.data import write_pcam_h5

    x = rng.integers(0, 256, (12, 96, 96, 3), dtype=np.uint8)
    write_pcam_h5(tmp_path / "pcam", "train", x, np.arange(12) % 2)
    cal = calibration_from_pcam(tmp_path / "pcam", n=5)
    assert cal.patches.shape == (5, 96, 96, 3) and "pcam-h5" in cal.source


def test_calibration_set_checks_its_patches():
    with pytest.raises(ConfigError, match="uint8"):
        CalibrationSet(np.zeros((4, 96, 96, 3), np.float32), source="x")
    with pytest.raises(ConfigError, match="non-empty"):
        CalibrationSet(np.zeros((0, 96, 96, 3), np.uint8), source="x")


def _kaggle_folder(root: Path, n: int = 40) -> Path:
    import tifffile

    rng = np.random.default_rng(1)
    (root / "train").mkdir(parents=True)
    rows = ["id,label"]
    for i in range(n):
        tumor = i % 2
        patch = rng.integers(0, 60, (96, 96, 3), dtype=np.uint8) + np.uint8(120 if tumor else 170)  # dark = tumour
        tifffile.imwrite(root / "train" / f"p{i:03d}.tif", patch)
        rows.append(f"p{i:03d},{tumor}")
    (root / "train_labels.csv").write_text("\n".join(rows) + "\n")
    return root


def test_pcam_eval_with_openvino(model_dir, tmp_path):
    from patch_model.cli import eval_main
    from patch_model.patch_eval import evaluate_package

    data = _kaggle_folder(tmp_path / "kaggle")
    common = {"split": "valid", "valid_fraction": 0.5, "seed": 0, "progress": False, "cache_dir": tmp_path / "cache"}
    ref = evaluate_package(model_dir, data, out=tmp_path / "torch", **common)
    ov32 = evaluate_package(model_dir, data, out=tmp_path / "ov32", runtime="openvino", precision="fp32", **common)
    assert ref.runtime["runtime"] == "torch" and ov32.runtime["runtime"] == "openvino"
    assert np.abs(ref.probs - ov32.probs).max() <= 1e-4 and ref.metrics["roc_auc"] == ov32.metrics["roc_auc"]
    rc = eval_main([str(model_dir), "--data", str(data), "--split", "valid", "--valid-fraction", "0.5", "--seed", "0",
                    "--runtime", "openvino", "--precision", "int8", "--cache-dir", str(tmp_path / "cache"),
                    "--out", str(tmp_path / "int8"), "--no-progress"])
    assert rc == 0
    ev = json.loads((tmp_path / "int8" / "eval.json").read_text())
    assert ev["runtime"]["precision"] == "int8" and "train split" in ev["runtime"]["calibration"]["source"]
    assert ev["runtime"]["int8_vs_fp32"]["n_patches"] == 20
    # Keyed by its patches' fingerprint, not wsi-infer's automatic per-package calibration.
    keys = [json.loads(e.read_text())["key"] for e in (tmp_path / "cache" / "openvino").glob(f"*-int8-*/{ENTRY_JSON}")]
    assert [k["calibration"] for k in keys] == [ev["runtime"]["calibration"]["fingerprint"]]
    assert abs(ev["roc_auc"] - ref.metrics["roc_auc"]) <= 0.05
    with pytest.raises(ConfigError, match="int8"):
        evaluate_package(model_dir, data, out=tmp_path / "x", runtime="torch", precision="int8", **common)


# ------------------------------------------------------------------------------------------------
# Wired in: run_inference, wsi-infer


def _grid(slide_path, package, stride_px: int = 96):
    from wsi_toolkit.analysis import RunConfig, grid_settings
    from wsi_toolkit.slide import open_slide
    from wsi_toolkit.tiling import make_grid
    from wsi_toolkit.tissue import detect_tissue

    grid_cfg, _ = grid_settings(package, RunConfig(stride_px=stride_px))
    with open_slide(slide_path) as slide:
        tissue = detect_tissue(slide.thumbnail(mpp=8.0), l0_mpp=slide.mpp)
        return make_grid(l0_size=slide.dimensions, l0_mpp=slide.mpp, config=grid_cfg, tissue_mask=tissue.mask,
                         mask_l0_per_px=tissue.l0_per_px)


def test_run_inference_with_openvino_agrees_with_torch(r18_package, r18_cache, synthetic_slides):
    from wsi_toolkit.inference import InferenceConfig, run_inference

    slide = synthetic_slides().path
    grid = _grid(slide, r18_package)
    cfg = {"workers": 0, "progress": False, "device": "cpu", "batch_size": 16, "cache_dir": str(r18_cache)}
    torch_run = run_inference(slide, grid, r18_package, config=InferenceConfig(runtime="torch", **cfg))
    ov_run = run_inference(slide, grid, r18_package, config=InferenceConfig(**cfg))  # auto: OpenVINO on a CPU
    assert len(grid) >= 32 and torch_run.runtime["runtime"] == "torch"
    assert ov_run.runtime["runtime"] == "openvino" and ov_run.extra["model_path"] == "openvino-fp32"
    assert ov_run.precision == "fp32" and ov_run.runtime["requested"] == {"runtime": "auto", "precision": "auto"}
    assert np.abs(ov_run.probs - torch_run.probs).max() <= 1e-4
    few = run_inference(slide, grid.patch_l0_xy()[:5], r18_package, config=InferenceConfig(**cfg))
    assert few.runtime["runtime"] == "torch"  # auto: a few patches are not worth compiling for


@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_asynchronous_requests_give_the_plain_probabilities(precision, r18_package, r18_cache, synthetic_slides):
    """Batches run on several infer requests at once (THROUGHPUT hint, AsyncInferQueue), finishing in
    any order: every patch gets the probability of the one-request run (1e-5 fp32)."""
    from wsi_toolkit.inference import InferenceConfig, run_inference

    slide = synthetic_slides().path
    grid = _grid(slide, r18_package)
    base = InferenceConfig(workers=0, progress=False, device="cpu", batch_size=8, cache_dir=str(r18_cache),
                           runtime="openvino", precision=precision)
    runs = {}  # int8: the first run calibrates automatically, the others run that same cached graph
    for requests in (1, 3, None):
        runs[requests] = run_inference(slide, grid, r18_package,
                                       config=dataclasses.replace(base, ov_requests=requests))
    assert len(grid) >= 4 * 8  # several batches in flight at once
    assert runs[1].extra["runtime_requests"] == 1 and runs[3].extra["runtime_requests"] == 3
    assert runs[None].extra["runtime_requests"] >= 1
    for requests in (3, None):
        assert runs[requests].runtime["precision"] == precision
        assert np.abs(runs[requests].probs - runs[1].probs).max() <= (1e-5 if precision == "fp32" else 1e-4)
        assert (runs[requests].probs.sum(axis=1) > 0.99).all()  # every patch was written


def test_run_inference_with_preprocessing_in_the_graph_or_in_torch(r18_package, r18_cache, synthetic_slides):
    """The loop hands the uint8 patches to a graph that preprocesses them itself: the same
    probabilities as torch's Preprocess before the graph (5e-5), and run.json says which ran."""
    from wsi_toolkit.inference import InferenceConfig, run_inference

    slide = synthetic_slides().path
    grid = _grid(slide, r18_package)
    base = InferenceConfig(workers=0, progress=False, device="cpu", batch_size=16, cache_dir=str(r18_cache),
                           runtime="openvino", read_from="nearest")
    graph = run_inference(slide, grid, r18_package, config=base)
    plain = run_inference(slide, grid, r18_package, config=dataclasses.replace(base, ov_preprocess="torch"))
    assert graph.runtime["preprocessing"].startswith("in the graph") and plain.runtime["preprocessing"] == "torch"
    assert np.abs(graph.probs - plain.probs).max() <= 5e-5
    # read_from finer hands the model 192 px patches of level 1: its Resize runs in torch, whatever was asked
    finer = run_inference(slide, grid, r18_package, config=dataclasses.replace(base, read_from="finer"))
    assert finer.runtime["preprocessing"] == "torch" and finer.extra["read_oversample"] == 2
    with pytest.raises(ConfigError, match="ov_preprocess"):
        InferenceConfig(ov_preprocess="numpy")


def test_a_failing_asynchronous_batch_raises_in_the_caller(r18_package, r18_cache):
    model = load_openvino_model(r18_package, cache_dir=r18_cache, requests=2)
    seen = []

    def on_logits(logits, userdata):
        seen.append(userdata)
        if userdata == 1:
            raise ValueError("bad batch 1")

    x = torch.zeros(4, 96, 96, 3, dtype=torch.uint8) if model.takes_uint8 else torch.zeros(4, 3, 96, 96)
    with pytest.raises(ValueError, match="bad batch 1"):
        with model.pipelined(on_logits) as submit:
            for i in range(3):
                submit(x, i)
    assert 1 in seen


def test_unconvertible_model_falls_back_to_torch_with_a_log_line(tmp_path, synthetic_slides, caplog):
    from wsi_toolkit.inference import InferenceConfig, run_inference

    path = save_model_package(tmp_path / "cummax", _Cummax(), pcam_config(architecture="cummax", input_size=96))
    package = load_model_package(path)
    slide = synthetic_slides().path
    xy = _grid(slide, package).patch_l0_xy()[:40]
    cfg = {"workers": 0, "progress": False, "device": "cpu", "batch_size": 8, "cache_dir": str(tmp_path / "cache")}
    with caplog.at_level(logging.WARNING):
        got = run_inference(slide, xy, package, config=InferenceConfig(runtime="openvino", **cfg))
    assert "running the model with torch" in caplog.text and "cummax" in caplog.text
    assert got.runtime["runtime"] == "torch" and "cummax" in got.runtime["fallback"]
    want = run_inference(slide, xy, package, config=InferenceConfig(runtime="torch", **cfg))
    np.testing.assert_array_equal(got.probs, want.probs)


def test_wsi_infer_int8_records_the_runtime_and_redoes_on_a_runtime_change(model_dir, synthetic_slides, tmp_path):
    from wsi_toolkit.cli.infer import main

    slide = synthetic_slides().path
    out, cache = tmp_path / "out", tmp_path / "cache"
    base = [str(slide), "--model", str(model_dir), "--out", str(out), "--no-progress", "--workers", "0",
            "--stride-px", "96", "--cache-dir", str(cache)]
    assert main([*base, "--precision", "int8"]) == 0
    run = json.loads(next(out.glob("*/run.json")).read_text())
    rt = run["runtime"]
    assert rt["runtime"] == "openvino" and rt["precision"] == "int8" and "quantized to int8" in rt["changes"]
    assert "tissue of 1 slide(s)" in rt["calibration"]["source"] and rt["int8_vs_fp32"]["n_patches"] > 0
    assert run["output_key"]["runtime"] == "auto" and run["output_key"]["precision"] == "int8"
    assert run["output_key"]["calibration"] == "auto"
    assert run["timings"]["runtime_calibration"] == "cached"  # the batch step calibrated; the slide found it
    assert "seconds" not in json.dumps(rt)  # run.json's runtime is the same on every run; times go to timings
    assert main([*base, "--precision", "int8"]) == 0  # same graph: the slide is skipped
    assert json.loads(next(out.glob("*/run.json")).read_text())["runtime"] == rt
    assert main([*base, "--runtime", "torch"]) == 0  # another runtime: redone
    assert json.loads(next(out.glob("*/run.json")).read_text())["runtime"]["runtime"] == "torch"


def test_wsi_infer_int8_second_batch_calibrates_nothing(model_dir, synthetic_slides, tmp_path, monkeypatch, capsys):
    """The second int8 batch, on another slide, runs the package's cached graph: no patches are drawn,
    nothing is converted or quantized, and the log says so."""
    import wsi_toolkit.runtime.calibration as calibration_module
    from wsi_toolkit.cli.infer import main

    cache = tmp_path / "cache"
    common = ["--model", str(model_dir), "--no-progress", "--workers", "0", "--stride-px", "96",
              "--cache-dir", str(cache), "--precision", "int8"]
    assert main([str(synthetic_slides().path), "--out", str(tmp_path / "a"), *common]) == 0
    assert "calibrated now on" in capsys.readouterr().err
    first = json.loads(next((tmp_path / "a").glob("*/run.json")).read_text())

    def nothing(*a, **k):
        raise AssertionError("calibrated, converted or quantized again")

    monkeypatch.setattr(calibration_module, "calibration_from_slides", nothing)
    monkeypatch.setattr("wsi_toolkit.runtime.calibration_from_slides", nothing)
    monkeypatch.setattr(ov_runtime, "_convert", nothing)
    monkeypatch.setattr(ov_runtime, "_build_int8", nothing)
    assert main([str(synthetic_slides(mpp=0.5).path), "--out", str(tmp_path / "b"), *common]) == 0
    assert "nothing calibrated now" in capsys.readouterr().err
    second = json.loads(next((tmp_path / "b").glob("*/run.json")).read_text())
    assert second["runtime"]["precision"] == "int8"
    assert second["runtime"]["calibration"] == first["runtime"]["calibration"]
    # "memory": this process compiled it for the first batch; either way nothing was converted or quantized
    assert second["timings"]["runtime_cache"] in ("hit", "memory")
    if second["timings"]["runtime_cache"] == "hit":
        assert second["timings"]["runtime_calibration"] == "cached"


def test_wsi_infer_check_precision(model_dir, synthetic_slides, tmp_path):
    from wsi_toolkit.cli.infer import main

    slide = synthetic_slides().path
    out = tmp_path / "check"
    rc = main([str(slide), "--model", str(model_dir), "--out", str(out), "--no-progress", "--workers", "0",
               "--stride-px", "96", "--cache-dir", str(tmp_path / "cache"), "--runtime", "openvino",
               "--precision", "bf16", "--check-precision"])
    assert rc == 0
    report = json.loads((out / "precision_check.json").read_text())["slides"][0]
    assert report["run"] == {"runtime": "openvino", "precision": "bf16"}
    assert report["reference"] == {"runtime": "torch", "precision": "fp32"}
    p = report["patches"]
    assert p["n_patches"] > 0 and 0 < p["max_abs_dp"] < 0.2 and p["label_flips"] <= 0.05 * p["n_patches"]
    assert set(report["tumor_area_mm2"]) == {"reference", "run", "change"}
    assert not list(out.glob("*/run.json"))  # a check writes no slide outputs


_TELEMETRY_PROBE = textwrap.dedent("""
    import json, sys, threading
    if sys.argv[1] == "declined":
        from wsi_toolkit.runtime import openvino as r
        r._ov()
        r._import_nncf()
    else:  # the control: the libraries as they come
        import openvino, nncf  # noqa: F401
    import openvino_telemetry
    print(json.dumps({"consent": bool(openvino_telemetry.Telemetry().consent),
                      "sender_threads": [t.name for t in threading.enumerate()
                                         if t.name.startswith("ThreadPoolExecutor")]}))
""")


def test_openvino_and_nncf_telemetry_is_declined(tmp_path):
    """OpenVINO's converter and NNCF count an import with no consent file under ~/intel as consent to
    send usage events (a client id and a usage count are written there, a sender thread starts).
    Imported through wsi-toolkit: no consent, no sender thread, nothing under ~/intel. The control
    (the libraries imported as they come, same fresh HOME) shows what is declined."""
    pytest.importorskip("openvino_telemetry", reason="this OpenVINO has no telemetry package")
    drop = {"CI", "TF_BUILD", "JENKINS_URL", "NNCF_CI", "NNCF_DEV"}  # each makes the libraries decline anyway
    results = {}
    for mode in ("as-they-come", "declined"):
        home = tmp_path / mode
        home.mkdir()
        env = {k: v for k, v in os.environ.items() if k not in drop} | {"HOME": str(home)}
        proc = subprocess.run([sys.executable, "-c", _TELEMETRY_PROBE, mode], env=env, capture_output=True,
                              text=True, timeout=120, check=True)
        results[mode] = (json.loads(proc.stdout.strip().splitlines()[-1]),
                         sorted(p.name for p in (home / "intel").glob("*")) if (home / "intel").exists() else [])
    control, control_files = results["as-they-come"]
    if not control["consent"]:
        pytest.skip(f"this OpenVINO/NNCF does not consent by default (control: {control}, {control_files})")
    assert control_files, "the control should show the files telemetry writes"
    declined, files = results["declined"]
    assert declined == {"consent": False, "sender_threads": []}
    assert files == []


def test_run_batch_api_calibrates_int8_on_the_batch_like_wsi_infer(model_dir, synthetic_slides, tmp_path, monkeypatch):
    """The library's run_batch owns the INT8 calibration policy, as wsi-infer does: one automatic
    calibration before any slide runs, drawn from the batch's slides (all of them here, up to 8), not
    from whichever slide happens to run first (the defect: the API calibrated on the first slide only,
    and cached it under the same "auto" key as wsi-infer's batch calibration)."""
    import wsi_toolkit.runtime as runtime_pkg
    from wsi_toolkit.analysis import RunConfig
    from wsi_toolkit.inference import InferenceConfig
    from wsi_toolkit.pipeline import run_batch

    real = runtime_pkg.calibration_from_slides
    calls: list[list[str]] = []

    def recording(paths, *a, **k):
        calls.append([Path(p).name for p in paths])
        return real(paths, *a, **k)

    monkeypatch.setattr(runtime_pkg, "calibration_from_slides", recording)
    monkeypatch.setattr("wsi_toolkit.runtime.calibration.calibration_from_slides", recording)
    slides = [synthetic_slides().path, synthetic_slides(mpp=0.5).path]
    config = RunConfig(stride_px=96, inference=InferenceConfig(precision="int8", cache_dir=str(tmp_path / "cache"),
                                                                workers=0, progress=False))
    got: list = []
    results = run_batch(slides, model_dir, tmp_path / "out", config, on_int8=got.append)
    assert [r.status for r in results] == ["ok", "ok"]
    assert calls == [[Path(s).name for s in slides]]
    assert len(got) == 1 and got[0].calibration == "drawn"
    for s in slides:
        assert Path(s).name in (got[0].source or "")
