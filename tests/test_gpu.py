"""The CUDA path on a GPU: heatmaps against the fp32 CPU ones, bf16/fp16 autocast, the batch-size
probe, a damaged slide, pcam-train for one epoch. Every test skips without CUDA, saying so;
``bash scripts/gpu_check.sh OUT`` runs them on a GPU machine (``pytest -m gpu tests/test_gpu.py``).

Tolerances (probabilities in [0, 1]; the packages are RANDOM ResNet18s with the last layer scaled so
their probabilities spread over (0, 1), where differences show, and the colour-rule package):
- CUDA fp32 against CPU fp32: 2e-3 max abs. cuDNN may run convolutions in TF32 (torch's default
  for cuDNN), a 10-bit mantissa, so this is looser than float rounding.
- CUDA mixed precision (bf16 or fp16 autocast) against CPU fp32: 0.05 max abs, 0.01 mean, at most 2%
  of the patches changing side at 0.5 (bf16 on a CPU moved them by 0.024 max, BENCHMARKS.md).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(),
                       reason="needs a CUDA GPU (torch.cuda.is_available() is False here); "
                              "bash scripts/gpu_check.sh OUT runs these on a GPU machine"),
]

FP32_ATOL = 2e-3
AMP_MAX, AMP_MEAN, AMP_FLIPS = 0.05, 0.01, 0.02


def _amp_dtype_name() -> str:
    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


@pytest.fixture(scope="module")
def slide(synthetic_slides):
    return synthetic_slides(mpp=0.243).path


@pytest.fixture(scope="module")
def resnet_package(tmp_path_factory, slide):
    """A RANDOM ResNet18 package at 96 px whose last layer is scaled and shifted (on CPU fp32,
    from 64 patches of the slide) so its tumour probabilities spread over (0, 1)."""
    import torchvision

    from wsi_toolkit.model_package import Preprocess, pcam_config, save_model_package
    from wsi_toolkit.slide import open_slide

    torch.manual_seed(0)
    net = torchvision.models.resnet18(weights=None, num_classes=2).eval()
    cfg = pcam_config(architecture="resnet18", input_size=96, extra={"synthetic": True})
    with open_slide(slide) as s:
        w, h = s.dimensions
        xy = [(int(x), int(y)) for x in np.linspace(0, w - 400, 8) for y in np.linspace(0, h - 400, 8)]
        probe = np.stack([s.read_at_mpp(p, (96, 96), 0.972) for p in xy])
    with torch.no_grad():
        gap = net(Preprocess(cfg)(torch.from_numpy(probe))) @ torch.tensor([-1.0, 1.0])
        scale = 3.0 / max(float(gap.std()), 1e-6)
        net.fc.weight.mul_(scale)
        net.fc.bias.mul_(scale)
        net.fc.bias[1] -= float(gap.mean()) * scale
    path = tmp_path_factory.mktemp("resnet") / "resnet18_random_96"
    save_model_package(path, net, cfg, overwrite=True)
    return path


@pytest.fixture(scope="module")
def grid_xy(slide):
    """Level-0 corners of the slide's PCam grid at stride 32 (about a thousand patches)."""
    from wsi_toolkit.slide import open_slide
    from wsi_toolkit.tiling import GridConfig, make_grid
    from wsi_toolkit.tissue import TissueConfig, detect_tissue

    with open_slide(slide) as s:
        cfg = TissueConfig()
        tissue = detect_tissue(s.thumbnail(mpp=cfg.thumb_mpp), l0_mpp=s.mpp, config=cfg)
        grid = make_grid(l0_size=s.dimensions, l0_mpp=s.mpp, config=GridConfig(stride_px=32),
                         tissue_mask=tissue.mask, mask_l0_per_px=tissue.l0_per_px)
    return grid


def _analyse(slide, package_dir, device, precision):
    from wsi_toolkit.analysis import RunConfig, analyse_slide
    from wsi_toolkit.inference import InferenceConfig
    from wsi_toolkit.model_package import load_model_package

    pkg = load_model_package(package_dir, device=device)
    cfg = RunConfig(inference=InferenceConfig(device=device, precision=precision, progress=False, runtime="torch"))
    return analyse_slide(slide, pkg, cfg)


def _infer(slide, grid, package_dir, device, precision, batch_size=64):
    from wsi_toolkit.inference import InferenceConfig, run_inference
    from wsi_toolkit.model_package import load_model_package

    pkg = load_model_package(package_dir, device=device)
    return run_inference(slide, grid, pkg, config=InferenceConfig(
        device=device, precision=precision, batch_size=batch_size, progress=False, runtime="torch"))


@pytest.fixture(scope="module")
def cpu_heatmaps(slide, resnet_package, model_dir):
    return {name: _analyse(slide, pkg, "cpu", "fp32") for name, pkg in
            (("resnet18", resnet_package), ("colour_rule", model_dir))}


@pytest.mark.parametrize("name", ["resnet18", "colour_rule"])
@pytest.mark.parametrize("precision", ["fp32", "auto"])
def test_cuda_heatmap_equals_fp32_cpu(slide, resnet_package, model_dir, cpu_heatmaps, name, precision):
    cpu = cpu_heatmaps[name]
    gpu = _analyse(slide, {"resnet18": resnet_package, "colour_rule": model_dir}[name], "cuda", precision)
    assert gpu.runtime["precision"] == ("fp32" if precision == "fp32" else _amp_dtype_name())
    a, b = cpu.heatmap.prob, gpu.heatmap.prob
    assert a.shape == b.shape and np.array_equal(cpu.heatmap.predicted, gpu.heatmap.predicted)
    on = cpu.heatmap.predicted
    assert on.sum() > 100
    d = np.abs(a[on] - b[on])
    if name == "resnet18":  # the scaled model's probabilities spread: differences can show
        assert np.ptp(a[on]) > 0.3
    if precision == "fp32":
        assert d.max() <= FP32_ATOL, d.max()
    else:
        assert d.max() <= AMP_MAX and d.mean() <= AMP_MEAN, (d.max(), d.mean())
        assert ((a[on] >= 0.5) != (b[on] >= 0.5)).mean() <= AMP_FLIPS


@pytest.fixture(scope="module")
def cpu_probs(slide, grid_xy, resnet_package):
    return _infer(slide, grid_xy, resnet_package, "cpu", "fp32")


@pytest.mark.parametrize("precision", ["bf16", "fp16", "auto"])
def test_autocast_precisions_run_and_stay_close_to_fp32(slide, grid_xy, resnet_package, cpu_probs, precision):
    if precision == "bf16" and not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU has no bf16")
    ref = cpu_probs
    got = _infer(slide, grid_xy, resnet_package, "cuda", precision)
    want = _amp_dtype_name() if precision == "auto" else precision
    assert got.precision == want and got.device.startswith("cuda")
    assert got.extra["model_path"] == "channels_last"
    p0, p1 = ref.probs[:, 1], got.probs[:, 1]
    assert np.isfinite(p1).all() and np.allclose(got.probs.sum(1), 1, atol=1e-3)
    d = np.abs(p0 - p1)
    assert d.max() <= AMP_MAX and d.mean() <= AMP_MEAN, (d.max(), d.mean())
    assert d.max() > 0  # it did run in reduced precision: bit-equal fp32 would mean autocast was off


def test_auto_batch_size_probe_fills_half_the_free_memory(slide, grid_xy, resnet_package):
    """The probe's batch is a power-of-two multiple of 64 up to 1024; a forward pass at that size
    stays within half the free memory (+25% for the probe's linear extrapolation) unless it is the
    smallest; and wsi-infer's auto batch gives the fixed-batch probabilities."""
    from wsi_toolkit.inference import autocast_dtype, cuda_batch_size, prepare_model
    from wsi_toolkit.model_package import Preprocess, load_model_package

    dev = torch.device("cuda")
    pkg = load_model_package(resnet_package, device=dev)
    amp = autocast_dtype(dev, "auto")
    model = prepare_model(pkg.model, dev, amp_dtype=amp, optimize=True)
    pre = Preprocess(pkg.config).to(dev)
    bs = cuda_batch_size(model, pre, dev, amp, 96)
    assert bs in {64 * 2**k for k in range(5)}
    torch.cuda.synchronize(dev)
    torch.cuda.empty_cache()
    free, _ = torch.cuda.mem_get_info(dev)
    base = torch.cuda.memory_allocated(dev)
    torch.cuda.reset_peak_memory_stats(dev)
    x = torch.zeros((bs, 96, 96, 3), dtype=torch.uint8, device=dev)
    with torch.inference_mode(), torch.autocast("cuda", dtype=amp):
        model(pre(x).contiguous(memory_format=torch.channels_last))
    torch.cuda.synchronize(dev)
    used = torch.cuda.max_memory_allocated(dev) - base
    assert bs == 64 or used <= 0.5 * free * 1.25, (bs, used, free)

    auto = _infer(slide, grid_xy, resnet_package, "cuda", "fp32", batch_size="auto")
    fixed = _infer(slide, grid_xy, resnet_package, "cuda", "fp32", batch_size=64)
    assert len(grid_xy) > 64 and auto.batch_size in {64 * 2**k for k in range(5)}
    np.testing.assert_allclose(auto.probs, fixed.probs, atol=FP32_ATOL)


def _garble_tile_under(src: Path, dst: Path, l0_xy) -> None:
    """``src`` with the tile of page 2 (0.972 um/px on a 0.243 um/px slide: the level the model
    reads) under level-0 point ``l0_xy`` overwritten by bytes that are not JPEG."""
    data = bytearray(src.read_bytes())
    with tifffile.TiffFile(src) as tif:
        page = tif.pages[2]
        assert abs(page.shape[1] * 4 - tif.pages[0].shape[1]) <= 4
        per_row = -(-page.shape[1] // page.tilewidth)
        x, y = int(l0_xy[0]) // 4, int(l0_xy[1]) // 4
        i = (y // page.tilelength) * per_row + x // page.tilewidth
        offset, count = page.dataoffsets[i], page.databytecounts[i]
    data[offset: offset + count] = np.random.default_rng(7).integers(0, 256, count, dtype=np.uint8).tobytes()
    dst.write_bytes(bytes(data))


def test_damaged_slide_on_the_gpu_is_one_clean_line(slide, grid_xy, model_dir, tmp_path, capsys):
    from wsi_toolkit.cli.infer import main

    bad = tmp_path / "garbled.tif"
    xy = grid_xy.patch_l0_xy()
    _garble_tile_under(slide, bad, xy[len(xy) // 2] + 192)  # the centre of a patch the grid reads
    good = tmp_path / "good.tif"
    good.write_bytes(slide.read_bytes())
    out = tmp_path / "out"
    rc = main([str(bad), str(good), "--model", str(model_dir), "--out", str(out), "--device", "cuda",
               "--batch-size", "8", "--no-progress"])
    assert rc == 1
    with open(out / "summary.csv", newline="", encoding="utf-8") as fh:
        rows = {r["slide"]: r for r in csv.DictReader(fh)}
    assert rows[str(good)]["status"] == "ok" and rows[str(bad)]["status"] != "ok"
    error = rows[str(bad)]["error"]
    assert "garbled.tif" in error and "\n" not in error and "Traceback" not in error
    assert json.loads((out / "good" / "run.json").read_text())["timings"]["device"].startswith("cuda")
    assert "Traceback" not in capsys.readouterr().err


@pytest.fixture(scope="module")
def tiny_pcam(tmp_path_factory, synthetic_slides):
    """A PCam-layout set cut by wsi-patches from two SYNTHETIC slides: one for train, one for valid."""
    pytest.importorskip("fastai")
    pytest.importorskip("h5py")
    from patch_model.patches import cut_pcam_patches

    a, b = synthetic_slides(mpp=0.243).path, synthetic_slides(mpp=0.226).path
    out = tmp_path_factory.mktemp("pcam")
    cut_pcam_patches([a, b], annotations=None, out=out, per_slide=128, splits={a.stem: "train", b.stem: "valid"})
    return out


def test_pcam_train_runs_one_epoch_on_cuda(tiny_pcam, tmp_path):
    from patch_model.cli import train_main
    from wsi_toolkit.model_package import load_model_package

    out = tmp_path / "run"
    rc = train_main(["--data", str(tiny_pcam), "--out", str(out), "--arch", "resnet18", "--size", "96",
                     "--no-pretrained", "--epochs-frozen", "0", "--epochs", "1", "--batch-size", "32",
                     "--lr-find-iters", "0", "--lr", "1e-3", "--lr-unfrozen", "1e-3", "--device", "cuda",
                     "--workers", "0", "--top-losses", "0", "--no-progress"])
    assert rc == 0
    settings = json.loads((out / "settings.json").read_text())["resolved"]
    assert settings["device"].startswith("cuda") and settings["precision"] == _amp_dtype_name()
    metrics = json.loads((out / "metrics.json").read_text())
    loss = metrics["epochs"][0]["train_loss"]
    assert len(metrics["epochs"]) == 1 and loss is not None and np.isfinite(loss)
    assert metrics["export_parity_max_abs_diff"] <= 2e-2  # the package against the learner, mixed precision
    pkg = load_model_package(out / "model", device="cuda")
    x = torch.zeros((2, 96, 96, 3), dtype=torch.uint8, device="cuda")
    assert torch.allclose(pkg.predict_class_proba(x).sum(1).float().cpu(), torch.ones(2), atol=1e-4)
