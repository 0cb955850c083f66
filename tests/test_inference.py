"""The inference reader (region blocks, patch cutting, reader threads) and device/precision resolution."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from wsi_toolkit.errors import ConfigError
from wsi_toolkit.inference import (
    InferenceConfig,
    PatchBlocks,
    autocast_dtype,
    cut_patches,
    plan_blocks,
    probabilities,
    resolve_device,
    run_inference,
)
from wsi_toolkit.model_package import load_model_package
from wsi_toolkit.slide import open_slide
from wsi_toolkit.synthetic_model import make_colour_rule_package
from wsi_toolkit.tiling import GridConfig, make_grid


def _grid(slide, stride_px=32):
    mask = np.zeros((60, 80), bool)
    mask[5:50, 10:70] = True  # a rectangle of "tissue" at 8 um/px
    return make_grid(l0_size=slide.dimensions, l0_mpp=slide.mpp, config=GridConfig(stride_px=stride_px),
                     tissue_mask=mask, mask_l0_per_px=8.0 / slide.mpp)


@pytest.mark.parametrize("block_cells", [1, 3, 8])
def test_blocks_cover_every_patch_once_and_contain_it(synthetic_slides, block_cells):
    with open_slide(synthetic_slides(0.226, "tiff").path) as slide:
        grid = _grid(slide)
    blocks = plan_blocks(grid, block_cells=block_cells)
    idx = np.concatenate([b.index for b in blocks])
    assert sorted(idx.tolist()) == list(range(len(grid)))
    scale = grid.l0_per_px
    for b in blocks:
        w, h = b.region_px
        assert (b.offsets_px >= 0).all()
        assert (b.offsets_px[:, 0] + 96 <= w).all() and (b.offsets_px[:, 1] + 96 <= h).all()
        # Offset (model px) * l0_per_px + region origin == the patch's own level-0 corner.
        l0 = np.asarray(b.region_l0_xy) + b.offsets_px * scale
        assert np.allclose(l0, grid.patch_l0_xy()[b.index])


@pytest.mark.parametrize("mpp,backend", [(0.243, "openslide"), (0.243, "tifffile"), (0.226, "tifffile")])
def test_patches_cut_from_regions_equal_patches_read_alone(synthetic_slides, mpp, backend):
    with open_slide(synthetic_slides(mpp, "tiff").path, backend=backend) as slide:
        grid = _grid(slide)
        (b, *_) = [b for b in plan_blocks(grid, block_cells=6) if len(b.index) > 20]
        region = slide.read_at_mpp(b.region_l0_xy, b.region_px, 0.972)
        cut = cut_patches(region, b.offsets_px, 96)
        alone = np.stack([slide.read_at_mpp(xy, (96, 96), 0.972) for xy in grid.patch_l0_xy()[b.index]])
    diff = np.abs(cut.astype(int) - alone.astype(int))
    if mpp == 0.243:
        assert diff.max() == 0  # level 2 is the model's resolution: plain pixel copies
    else:
        assert diff.max() <= 1 and diff.mean() < 0.01  # resampled: float rounding at most


def test_block_size_does_not_change_probabilities(synthetic_slides, tmp_path):
    s = synthetic_slides(0.243, "tiff")
    pkg = load_model_package(make_colour_rule_package(tmp_path / "m", input_size=96).path)
    with open_slide(s.path) as slide:
        grid = _grid(slide)
    runs = [run_inference(s.path, grid, pkg, config=InferenceConfig(workers=0, progress=False, block_cells=k,
                                                                    batch_size=50)).probs
            for k in (1, 5)]
    alone = run_inference(s.path, grid.patch_l0_xy(), pkg, config=InferenceConfig(workers=0, progress=False)).probs
    assert np.array_equal(runs[0], runs[1]) and np.array_equal(runs[0], alone)


def test_workers_give_the_same_result(synthetic_slides, tmp_path):
    s = synthetic_slides(0.243, "tiff")
    pkg = load_model_package(make_colour_rule_package(tmp_path / "m", input_size=96).path)
    with open_slide(s.path) as slide:
        grid = _grid(slide)
    a = run_inference(s.path, grid, pkg, config=InferenceConfig(workers=0, progress=False))
    b = run_inference(s.path, grid, pkg, config=InferenceConfig(workers=2, progress=False, batch_size=16))
    assert b.workers == 2
    assert np.array_equal(a.probs, b.probs)
    assert b.seconds_read > 0 and b.seconds_model > 0 and b.patches_per_s > 0


def test_grid_for_another_model_is_refused(synthetic_slides, tmp_path):
    s = synthetic_slides(0.243, "tiff")
    pkg = load_model_package(make_colour_rule_package(tmp_path / "m", input_size=96).path)
    with open_slide(s.path) as slide:
        grid = make_grid(l0_size=slide.dimensions, l0_mpp=slide.mpp, config=GridConfig(patch_px=224, spacing_um_px=0.5))
    with pytest.raises(ConfigError, match="does not match"):
        run_inference(s.path, grid, pkg, config=InferenceConfig(workers=0, progress=False))


def test_device_resolution():
    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("auto").type in ("cpu", "cuda", "mps")
    for bad in ("gpu", "cuda:x", "tpu"):
        with pytest.raises(ConfigError):
            resolve_device(bad)
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="CUDA is not available"):
            resolve_device("cuda:0")


@pytest.mark.parametrize("kwargs", [dict(batch_size=0), dict(workers=-1), dict(precision="fp8"), dict(block_cells=0),
                                    dict(block_px=0), dict(block_patches=0)])
def test_bad_inference_config(kwargs):
    with pytest.raises(ConfigError):
        InferenceConfig(**kwargs)


class _SmallCnn(torch.nn.Module):
    """conv + batchnorm (non-trivial statistics) + residual add + relu: what the CPU fuser fuses."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(3)
        self.conv1 = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = torch.nn.BatchNorm2d(8)
        self.conv2 = torch.nn.Conv2d(8, 8, 3, padding=1)
        self.bn2 = torch.nn.BatchNorm2d(8)
        self.fc = torch.nn.Linear(8, 2)
        for bn in (self.bn1, self.bn2):
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
            bn.weight.data.uniform_(0.5, 1.5)
        self.fc.weight.data *= 20  # spread the logits so patches get visibly different probabilities

    def forward(self, x):
        y = torch.relu(self.bn1(self.conv1(x)))
        y = torch.relu(self.bn2(self.conv2(y)) + y)
        return self.fc(y.mean(dim=(2, 3)))


def _small_cnn_package(tmp_path):
    from wsi_toolkit.model_package import pcam_config, save_model_package

    save_model_package(tmp_path / "cnn", _SmallCnn().eval(), pcam_config(architecture="smallcnn", input_size=96),
                       overwrite=True)
    return load_model_package(tmp_path / "cnn")


def _xy(s, n=40):
    """``n`` patches spread over the slide's tissue (tissue and background, stain and pen)."""
    from wsi_toolkit.tissue import detect_tissue

    with open_slide(s.path) as slide:
        t = detect_tissue(slide.thumbnail(mpp=8.0), l0_mpp=slide.mpp)
        grid = make_grid(l0_size=slide.dimensions, l0_mpp=slide.mpp, config=GridConfig(stride_px=96),
                         tissue_mask=t.mask, mask_l0_per_px=t.l0_per_px)
    xy = grid.patch_l0_xy()
    return xy[np.linspace(0, len(xy) - 1, n).astype(int)]


def test_cpu_fp32_graph_is_fused_and_matches_the_plain_model(synthetic_slides, tmp_path):
    s = synthetic_slides(0.243, "tiff")
    pkg = _small_cnn_package(tmp_path)
    xy = _xy(s)
    was = torch.jit.onednn_fusion_enabled()
    fast = run_inference(s.path, xy, pkg, config=InferenceConfig(workers=0, progress=False, batch_size=8,
                                                                 device="cpu", precision="fp32", runtime="torch"))
    plain = run_inference(s.path, xy, pkg, config=InferenceConfig(workers=0, progress=False, batch_size=8,
                                                                  device="cpu", precision="fp32", runtime="torch",
                                                                  optimize=False))
    assert fast.extra["model_path"] != plain.extra["model_path"]  # an optimised graph ran, not the model as loaded
    assert torch.jit.onednn_fusion_enabled() == was  # the process-wide switch is restored
    p = plain.probs[:, 1]
    assert p.std() > 1e-3  # probabilities that vary, so the comparison means something
    assert np.abs(fast.probs - plain.probs).max() < 1e-5


def test_cpu_graph_falls_back_when_the_fused_graph_fails(synthetic_slides, tmp_path, monkeypatch, caplog):
    """The fused graph failing at run time: one warning, the fused graph is not tried again, the
    fusion switch is restored, and the probabilities are still the plain model's."""
    s = synthetic_slides(0.243, "tiff")
    pkg = _small_cnn_package(tmp_path)
    xy = _xy(s)
    real_freeze = torch.jit.freeze
    broken_calls = []

    class Broken(torch.nn.Module):
        def forward(self, x):
            broken_calls.append(len(x))
            raise RuntimeError("unsupported partition (simulated)")

    calls = []

    def freeze_once_broken(m, *a, **k):
        calls.append(1)
        return Broken() if len(calls) == 1 else real_freeze(m, *a, **k)

    monkeypatch.setattr(torch.jit, "freeze", freeze_once_broken)
    was = torch.jit.onednn_fusion_enabled()
    got = run_inference(s.path, xy, pkg, config=InferenceConfig(workers=0, progress=False, batch_size=8, device="cpu",
                                                                precision="fp32", runtime="torch"))
    monkeypatch.setattr(torch.jit, "freeze", real_freeze)
    plain = run_inference(s.path, xy, pkg, config=InferenceConfig(workers=0, progress=False, batch_size=8,
                                                                  device="cpu", precision="fp32", runtime="torch",
                                                                  optimize=False))
    assert broken_calls == [8]  # 5 batches of 8: the failed graph ran once, the fallback did the rest
    assert caplog.text.count("oneDNN-fused graph failed") == 1
    assert torch.jit.onednn_fusion_enabled() == was
    assert np.abs(got.probs - plain.probs).max() < 1e-5


@pytest.mark.parametrize("backend", ["openslide", "tifffile"])
@pytest.mark.parametrize("threads,prefetch", [(0, 4), (1, 1), (3, 1), (4, 4)])
def test_reader_threads_give_every_block_its_own_patches_in_order(synthetic_slides, backend, threads, prefetch):
    """Whatever the thread count and read-ahead, the reader yields each block's patches, in block
    order, equal to reading the blocks one after another, and items already handed out are never
    overwritten (all are kept until the end, while the threads read on)."""
    s = synthetic_slides(0.243, "tiff")
    with open_slide(s.path, backend=backend) as slide:
        blocks = plan_blocks(_grid(slide), block_cells=2)[:30]
        want = [cut_patches(slide.read_at_mpp(b.region_l0_xy, b.region_px, 0.972), b.offsets_px, 96) for b in blocks]
    reader = PatchBlocks(s.path, blocks, patch_px=96, spacing_um_px=0.972, backend=backend)
    items = list(reader.read(threads, prefetch=prefetch))
    assert len(items) == len(blocks)
    for (patches, index, seconds), b, w in zip(items, blocks, want):
        assert np.array_equal(index, b.index)
        assert np.array_equal(patches, w)
        assert seconds > 0


def test_reader_errors_reach_the_caller_as_they_are(synthetic_slides, monkeypatch):
    """A read failing in a reader thread raises the same exception in the caller as without threads,
    and stopping early (an error, or the caller breaking off) leaves no reader thread behind."""
    import threading

    from wsi_toolkit.errors import SlideReadError
    from wsi_toolkit.slide._reader import SlideReader

    s = synthetic_slides(0.243, "tiff")
    with open_slide(s.path) as slide:
        blocks = plan_blocks(_grid(slide), block_cells=2)[:20]
    real = SlideReader.read_at_mpp

    def fail_on_the_7th(self, l0_xy, size_px, mpp, **kw):
        if tuple(l0_xy) == blocks[6].region_l0_xy:
            raise SlideReadError(f"{self.path}: tile 7 could not be decoded (simulated)")
        return real(self, l0_xy, size_px, mpp, **kw)

    monkeypatch.setattr(SlideReader, "read_at_mpp", fail_on_the_7th)
    reader = PatchBlocks(s.path, blocks, patch_px=96, spacing_um_px=0.972)
    messages = []
    for threads in (0, 1, 3):
        got = []
        with pytest.raises(SlideReadError) as err:
            for _patches, index, _ in reader.read(threads, prefetch=2):
                got.append(index)
        messages.append(str(err.value))
        assert len(got) == 6  # the blocks before the failing one, in order
    assert len(set(messages)) == 1 and "simulated" in messages[0]
    items = reader.read(2)
    next(items)
    items.close()  # the caller stops early
    assert not [t for t in threading.enumerate() if t.name.startswith("wsi-read")]


def test_block_size_follows_the_stride():
    cfg = InferenceConfig()
    assert cfg.cells_per_block(patch_px=96, stride_px=96) == 16  # 1536 px regions, 256 patches
    assert cfg.cells_per_block(patch_px=96, stride_px=32) == 22  # 484 patches (<= 512), 768 px
    assert cfg.cells_per_block(patch_px=96, stride_px=48) == 22  # 22 * 48 + 48 = 1104 px
    assert cfg.cells_per_block(patch_px=2048, stride_px=512) == 1  # a patch larger than block_px: 1 cell
    assert InferenceConfig(block_px=768).cells_per_block(patch_px=96, stride_px=96) == 8
    assert InferenceConfig(block_cells=3).cells_per_block(patch_px=96, stride_px=32) == 3


def test_cut_patches_refuses_offsets_outside_the_region():
    region = np.zeros((100, 120, 3), np.uint8)
    assert cut_patches(region, np.array([[24, 4]]), 96).shape == (1, 96, 96, 3)
    for bad in ([[25, 0]], [[0, 5]], [[-1, 0]]):
        with pytest.raises(ValueError, match="outside"):
            cut_patches(region, np.array(bad), 96)


@pytest.mark.parametrize("backend", ["openslide", "tifffile"])
def test_tile_cache_is_sized_for_rows_of_the_level_read(synthetic_slides, backend):
    with open_slide(synthetic_slides(0.243, "tiff").path, backend=backend) as slide:
        level = slide.best_level_for_mpp(0.972)
        tw, th = slide.tile_size(level)
        across = -(-slide.levels[level].size[0] // tw)
        px_bytes = 4 if backend == "openslide" else 3
        before = slide.read_at_mpp((1000, 2000), (300, 200), 0.972)
        got = slide.reserve_tile_cache(0.972, rows=3, min_bytes=1, max_bytes=2**40)
        assert got == across * tw * th * px_bytes * 3
        assert slide.reserve_tile_cache(0.972, min_bytes=1, max_bytes=1000) == 1000  # clamped
        assert np.array_equal(slide.read_at_mpp((1000, 2000), (300, 200), 0.972), before)  # tiny cache still reads


def test_tifffile_tile_cache_decodes_shared_tiles_once(synthetic_slides, monkeypatch):
    with open_slide(synthetic_slides(0.243, "tiff").path, backend="tifffile") as slide:
        slide.reserve_tile_cache(0.972)
        decoded = []
        real = slide._decode_segment
        monkeypatch.setattr(slide, "_decode_segment", lambda *a, **k: decoded.append(a[1]) or real(*a, **k))
        slide.read_at_mpp((0, 0), (700, 700), 0.972)
        first = len(decoded)
        slide.read_at_mpp((400, 400), (700, 700), 0.972)  # overlaps the first read
        assert first > 0 and len(decoded) - first < first
        assert len(decoded) == len(set(decoded))  # no tile decoded twice


@pytest.mark.parametrize("backend", ["openslide", "tifffile"])
def test_one_slide_handle_serves_several_threads(synthetic_slides, backend):
    """Threads sharing one handle (and its tile cache, small enough to evict while they read) get
    the same pixels as reads one after another."""
    from concurrent.futures import ThreadPoolExecutor

    boxes = [((x, y), (300, 260)) for x in range(0, 4000, 700) for y in range(0, 3000, 900)]
    with open_slide(synthetic_slides(0.243, "tiff").path, backend=backend) as slide:
        want = [slide.read_at_mpp(xy, size, 0.972) for xy, size in boxes]
        slide.set_tile_cache(3 * 512 * 512 * 4)
        with ThreadPoolExecutor(4) as pool:
            for _ in range(3):
                got = list(pool.map(lambda box: slide.read_at_mpp(box[0], box[1], 0.972), boxes))
                assert all(np.array_equal(g, w) for g, w in zip(got, want))


def test_fused_cpu_graph_pads_a_short_last_batch(synthetic_slides, tmp_path, monkeypatch):
    """41 patches in batches of 8: the last batch (1 patch) runs padded to 8 (the fused graph is
    compiled per input shape, so it only ever sees one), with the same probabilities."""
    s = synthetic_slides(0.243, "tiff")
    pkg = _small_cnn_package(tmp_path)
    xy = _xy(s, n=41)
    real_freeze, shapes = torch.jit.freeze, []

    def recording_freeze(m, *a, **k):
        frozen = real_freeze(m, *a, **k)
        return lambda x: shapes.append(tuple(x.shape)) or frozen(x)

    monkeypatch.setattr(torch.jit, "freeze", recording_freeze)
    fast = run_inference(s.path, xy, pkg, config=InferenceConfig(workers=0, progress=False, batch_size=8,
                                                                 device="cpu", precision="fp32", runtime="torch"))
    plain = run_inference(s.path, xy, pkg, config=InferenceConfig(workers=0, progress=False, batch_size=8,
                                                                  device="cpu", precision="fp32", runtime="torch",
                                                                  optimize=False))
    assert fast.extra["model_path"] != plain.extra["model_path"]
    assert len(shapes) == 6 and set(shapes) == {(8, 3, 96, 96)}  # 5 full batches and the padded last one
    assert np.abs(fast.probs - plain.probs).max() < 1e-5


@pytest.mark.parametrize("native_bf16", [False, True])
def test_auto_precision_is_fp32_on_every_cpu(synthetic_slides, tmp_path, monkeypatch, native_bf16):
    """The default gives the same heatmap on an AVX2-only CPU and on one with AVX512-BF16/AMX:
    ``auto`` means fp32 on a CPU whatever the CPU computes natively."""
    from wsi_toolkit.runtime import cpu

    monkeypatch.setattr(cpu, "cpu_has_fast_bf16", lambda: native_bf16)
    assert autocast_dtype(torch.device("cpu"), "auto") is None
    s = synthetic_slides(0.243, "tiff")
    pkg = _small_cnn_package(tmp_path)
    xy = _xy(s)
    auto = run_inference(s.path, xy, pkg, config=InferenceConfig(workers=0, progress=False, device="cpu"))
    fp32 = run_inference(s.path, xy, pkg, config=InferenceConfig(workers=0, progress=False, device="cpu",
                                                                 precision="fp32"))
    assert auto.precision == "fp32"
    assert np.array_equal(auto.probs, fp32.probs)


def test_bf16_on_request_runs_on_any_cpu(synthetic_slides, tmp_path):
    """``--precision bf16`` is opt-in on a CPU and runs whether bf16 is native or emulated; its
    probabilities stay near fp32's (bf16 keeps 8 bits of mantissa) but are not bit-equal."""
    s = synthetic_slides(0.243, "tiff")
    pkg = _small_cnn_package(tmp_path)
    xy = _xy(s)
    cfg = dict(workers=0, progress=False, device="cpu", batch_size=8)
    bf16 = run_inference(s.path, xy, pkg, config=InferenceConfig(precision="bf16", **cfg))
    fp32 = run_inference(s.path, xy, pkg, config=InferenceConfig(precision="fp32", **cfg))
    assert bf16.precision == "bf16" and fp32.precision == "fp32"
    assert fp32.probs[:, 1].std() > 1e-3
    assert np.abs(bf16.probs - fp32.probs).max() < 0.05
    assert np.allclose(bf16.probs.sum(1), 1, atol=1e-3)


def test_batch_for_memory_fills_the_given_fraction():
    from wsi_toolkit.inference import batch_for_memory

    mib, gib = 2**20, 2**30
    assert batch_for_memory(10 * mib, 9 * gib) == 256  # 512 would need 5 GiB > half of 9 GiB
    assert batch_for_memory(10 * mib, 9 * gib, fraction=0.9) == 512  # 1024 would need 10 GiB
    assert batch_for_memory(1 * mib, 80 * gib) == 1024  # capped
    assert batch_for_memory(1 * gib, 1 * gib) == 64  # never below the probe size


def test_probabilities_softmax_or_sigmoid():
    logits = torch.tensor([[2.0, -1.0], [0.0, 0.0]], dtype=torch.float16)
    p = probabilities(logits)
    assert p.dtype == torch.float32 and torch.allclose(p, torch.softmax(logits.float(), dim=1))
    one = probabilities(torch.tensor([0.0, 3.0]))  # a one-output model may return (N,)
    assert one.shape == (2, 1) and torch.allclose(one[:, 0], torch.sigmoid(torch.tensor([0.0, 3.0])))
    assert torch.equal(probabilities(torch.tensor([[0.0], [3.0]])), one)


@pytest.mark.parametrize("bad", [0, -3, "big", True, 2.5])
def test_batch_size_is_a_positive_int_or_auto(bad):
    assert InferenceConfig(batch_size="auto").nominal_batch_size() == 64
    assert InferenceConfig(batch_size=17).nominal_batch_size() == 17
    with pytest.raises(ConfigError, match="batch_size"):
        InferenceConfig(batch_size=bad)


def test_auto_batch_size_on_cpu_is_the_cpu_choice(synthetic_slides, tmp_path):
    s = synthetic_slides(0.243, "tiff")
    pkg = load_model_package(make_colour_rule_package(tmp_path / "m", input_size=96).path)
    r = run_inference(s.path, _xy(s, n=150), pkg, config=InferenceConfig(workers=0, progress=False, device="cpu"))
    assert r.batch_size == 64 and r.timings()["batch_size"] == 64


def test_cuda_batch_size_probe_logic_with_a_fake_gpu(monkeypatch):
    """The probe's arithmetic and calls, with torch.cuda's memory functions faked (no GPU here):
    64 patches raise the peak by 64 MiB -> 1 MiB a patch; 900 MiB free -> 256 fit in half."""
    from wsi_toolkit.inference import cuda_batch_size
    from wsi_toolkit.model_package import pcam_config

    mib = 2**20
    state = {"peak": 0}
    calls = []

    def model(x):
        calls.append(tuple(x.shape))
        state["peak"] = 100 * mib + x.shape[0] * mib
        return torch.zeros((x.shape[0], 2))

    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 100 * mib)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device=None: state.update(peak=0))
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: state["peak"])
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (900 * mib, 1000 * mib))
    from wsi_toolkit.model_package import Preprocess

    bs = cuda_batch_size(model, Preprocess(pcam_config(input_size=224)), torch.device("cpu"), None, 96)
    assert calls == [(64, 3, 224, 224)]  # one probe of uint8 96 px patches, resized like inference
    assert bs == 256


def test_default_readers_leave_the_cores_to_the_model_on_cpu(monkeypatch):
    import os

    cfg = InferenceConfig()
    for cpus, on_cpu, on_gpu in [(1, 0, 0), (2, 1, 1), (16, 1, 4), (64, 1, 4)]:
        monkeypatch.setattr(os, "cpu_count", lambda cpus=cpus: cpus)
        assert cfg.n_workers(torch.device("cpu")) == on_cpu
        assert cfg.n_workers(torch.device("cuda")) == on_gpu
    assert InferenceConfig(workers=3).n_workers(torch.device("cpu")) == 3
