"""Patch data: PCam HDF5 and Kaggle readers, the PCam writer, and cutting patches from slides.

Every fixture is written here, in the published on-disk layouts, with the format's own tools
(h5py, tifffile), not with the code under test.
"""

from __future__ import annotations

import csv
import dataclasses
import gc
import logging
import math
import pickle
import shutil

import h5py
import numpy as np
import pytest
import shapely
import tifffile
import torch

from patch_model.data import (
    PCAM_SPLITS,
    DataLayoutError,
    KaggleFolder,
    PCamH5,
    detect_layout,
    kaggle_split,
    open_splits,
    pcam_paths,
    write_pcam_h5,
)
from patch_model.patches import _allocate, cut_pcam_patches, patch_label
from wsi_toolkit.errors import ConfigError, WsiToolkitError
from wsi_toolkit.synthetic import Blob, make_spec, write_synthetic_slide

PATCH = (96, 96, 3)


# --------------------------------------------------------------------------------------------
# Fixtures in the published layouts
# --------------------------------------------------------------------------------------------


def _write_published_pcam(root, split, n, *, seed=0, chunks=None, compression=None):
    """PCam as published: x (N, 96, 96, 3) uint8 in dataset 'x', y (N, 1, 1, 1) uint8 in 'y'.

    Patch i is filled with the value i % 256 in channel 0 so items can be recognised.
    """
    rng = np.random.default_rng(seed)
    x = np.zeros((n, *PATCH), np.uint8)
    x[..., 0] = (np.arange(n) % 256)[:, None, None]
    x[..., 1] = rng.integers(0, 256, (n, 96, 96), dtype=np.uint8)
    y = rng.integers(0, 2, n).astype(np.uint8).reshape(n, 1, 1, 1)
    with h5py.File(root / f"camelyonpatch_level_2_split_{split}_x.h5", "w") as f:
        f.create_dataset("x", data=x, chunks=chunks, compression=compression)
    with h5py.File(root / f"camelyonpatch_level_2_split_{split}_y.h5", "w") as f:
        f.create_dataset("y", data=y)
    return x, y.reshape(-1)


@pytest.fixture()
def pcam_root(tmp_path):
    root = tmp_path / "pcam"
    root.mkdir()
    truth = {}
    for i, split in enumerate(PCAM_SPLITS):
        truth[split] = _write_published_pcam(root, split, 50, seed=i)
    return root, truth


def _rss_bytes() -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def _kaggle_id(i: int) -> str:
    return f"{i:04x}" + "f38a6374c348f90b587e046aac6079959adf3835"[4:]


@pytest.fixture()
def kaggle_root(tmp_path):
    """Kaggle layout: train/<id>.tif (96x96 RGB), train_labels.csv (id,label), test/."""
    rng = np.random.default_rng(1)
    tmp_path = tmp_path / "kaggle"
    tmp_path.mkdir()
    (tmp_path / "train").mkdir()
    (tmp_path / "test").mkdir()
    rows = []
    for i in range(40):
        img = rng.integers(0, 256, PATCH, dtype=np.uint8)
        img[0, 0, 0] = i
        tifffile.imwrite(tmp_path / "train" / f"{_kaggle_id(i)}.tif", img, photometric="rgb")
        rows.append((_kaggle_id(i), int(i % 3 == 0)))
    for i in range(3):
        tifffile.imwrite(tmp_path / "test" / f"{_kaggle_id(100 + i)}.tif",
                         rng.integers(0, 256, PATCH, dtype=np.uint8), photometric="rgb")
    with open(tmp_path / "train_labels.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["id", "label"])
        w.writerows(rows)
    return tmp_path, dict(rows)


# --------------------------------------------------------------------------------------------
# PCam HDF5
# --------------------------------------------------------------------------------------------


def test_pcam_reader_on_published_layout(pcam_root):
    root, truth = pcam_root
    for split in PCAM_SPLITS:
        ds = PCamH5(root, split)
        x, y = truth[split]
        assert len(ds) == 50
        assert ds.labels.dtype == np.int64 and np.array_equal(ds.labels, y)
        for i in (0, 7, 49, -1):
            patch, label = ds[i]
            assert patch.shape == PATCH and patch.dtype == np.uint8
            assert np.array_equal(patch, x[i]) and label == y[i] and isinstance(label, int)
        assert ds.leaky is False
        with pytest.raises(IndexError):
            ds[50]


def test_pcam_reader_rejects_wrong_shapes(tmp_path):
    with h5py.File(tmp_path / "camelyonpatch_level_2_split_valid_x.h5", "w") as f:
        f.create_dataset("x", data=np.zeros((4, 64, 64, 3), np.uint8))
    with h5py.File(tmp_path / "camelyonpatch_level_2_split_valid_y.h5", "w") as f:
        f.create_dataset("y", data=np.zeros((4, 1, 1, 1), np.uint8))
    with pytest.raises(DataLayoutError, match=r"\(N, 96, 96, 3\) uint8"):
        PCamH5(tmp_path, "valid")


def test_pcam_reader_rejects_length_mismatch(tmp_path):
    _write_published_pcam(tmp_path, "test", 5)
    with h5py.File(tmp_path / "camelyonpatch_level_2_split_test_y.h5", "w") as f:
        f.create_dataset("y", data=np.zeros((4, 1, 1, 1), np.uint8))
    with pytest.raises(DataLayoutError, match="5 patches in x but 4 labels"):
        PCamH5(tmp_path, "test")


@pytest.mark.parametrize("as_chunks", [False, True])
def test_write_pcam_h5_writes_the_published_layout(tmp_path, as_chunks):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (37, *PATCH), dtype=np.uint8)
    y = rng.integers(0, 2, 37)
    data = (x[i : i + 10] for i in range(0, 37, 10)) if as_chunks else x
    write_pcam_h5(tmp_path, "train", data, y)
    x_path, y_path = pcam_paths(tmp_path, "train")
    assert x_path.name == "camelyonpatch_level_2_split_train_x.h5"
    with h5py.File(x_path, "r") as f:
        assert list(f.keys()) == ["x"]
        assert f["x"].shape == (37, *PATCH) and f["x"].dtype == np.uint8
        assert np.array_equal(f["x"][()], x)
    with h5py.File(y_path, "r") as f:
        assert list(f.keys()) == ["y"]
        assert f["y"].shape == (37, 1, 1, 1) and f["y"].dtype == np.uint8
        assert np.array_equal(f["y"][()].reshape(-1), y)
    assert not list(tmp_path.glob(".*partial*"))


def test_write_pcam_h5_count_mismatch_leaves_nothing(tmp_path):
    with pytest.raises(ConfigError, match="5 patches but y has 6"):
        write_pcam_h5(tmp_path, "valid", np.zeros((5, *PATCH), np.uint8), np.zeros(6))
    assert list(tmp_path.iterdir()) == []


def test_pcam_reading_is_lazy_memory(tmp_path):
    """3000 patches (83 MB of incompressible pixels): opening and reading 10 patches costs little memory."""
    n, block = 3000, 250
    rng = np.random.default_rng(0)
    with h5py.File(tmp_path / "camelyonpatch_level_2_split_train_x.h5", "w") as f:
        xd = f.create_dataset("x", shape=(n, *PATCH), dtype=np.uint8, chunks=(32, *PATCH))
        for i in range(0, n, block):  # written in blocks: the test itself never holds the file
            xd[i : i + block] = rng.integers(0, 256, (block, *PATCH), dtype=np.uint8)
    with h5py.File(tmp_path / "camelyonpatch_level_2_split_train_y.h5", "w") as f:
        f.create_dataset("y", data=np.zeros((n, 1, 1, 1), np.uint8))
    file_bytes = (tmp_path / "camelyonpatch_level_2_split_train_x.h5").stat().st_size
    assert file_bytes > 80e6
    gc.collect()
    before = _rss_bytes()
    ds = PCamH5(tmp_path, "train")
    patches = [ds[int(i)][0] for i in np.linspace(0, n - 1, 10)]
    grown = _rss_bytes() - before
    assert len(patches) == 10
    assert grown < file_bytes / 8, f"RSS grew {grown / 1e6:.1f} MB for an {file_bytes / 1e6:.0f} MB file"


def test_pcam_reading_is_lazy_on_a_large_sparse_file(tmp_path):
    """40,000 patches (1.1 GB logical; chunks never written, so a few KB on disk): reading it
    whole would need 1.1 GB of memory; the reader reads one patch. (PCam train is 262,144.)"""
    n = 40_000
    with h5py.File(tmp_path / "camelyonpatch_level_2_split_train_x.h5", "w") as f:
        f.create_dataset("x", shape=(n, *PATCH), dtype=np.uint8, chunks=(1, *PATCH), fillvalue=7)
    with h5py.File(tmp_path / "camelyonpatch_level_2_split_train_y.h5", "w") as f:
        f.create_dataset("y", data=np.ones((n, 1, 1, 1), np.uint8))
    before = _rss_bytes()
    ds = PCamH5(tmp_path, "train")
    patch, label = ds[n - 1]
    assert len(ds) == n and label == 1 and patch.shape == PATCH and (patch == 7).all()
    assert _rss_bytes() - before < 64e6


def test_pcam_getitem_reads_one_patch_only(pcam_root, monkeypatch):
    root, _ = pcam_root
    reads = []
    original = h5py.Dataset.__getitem__

    def spy(self, key, *args, **kwargs):
        out = original(self, key, *args, **kwargs)
        reads.append((self.name, np.asarray(out).nbytes))
        return out

    monkeypatch.setattr(h5py.Dataset, "__getitem__", spy)
    ds = PCamH5(root, "valid")
    assert [r for r in reads if r[0] == "/x"] == []  # construction reads no pixels
    for i in (3, 17, 42):
        ds[i]
    x_reads = [r for r in reads if r[0] == "/x"]
    assert x_reads == [("/x", 96 * 96 * 3)] * 3


def test_pcam_pickles_without_its_handle(pcam_root):
    root, truth = pcam_root
    ds = PCamH5(root, "test")
    ds[0]  # opens the file in this process
    clone = pickle.loads(pickle.dumps(ds))
    assert clone._x is None
    assert np.array_equal(clone[5][0], truth["test"][0][5])


@pytest.mark.parametrize("context", ["fork", "spawn"])
def test_pcam_in_dataloader_workers(pcam_root, context):
    root, truth = pcam_root
    ds = PCamH5(root, "train")
    ds[0]  # a handle opened in the parent must not be reused by forked workers
    loader = torch.utils.data.DataLoader(ds, batch_size=16, num_workers=2, multiprocessing_context=context)
    xs, ys = zip(*loader)
    x, y = torch.cat(xs), torch.cat(ys)
    assert x.shape == (50, *PATCH) and x.dtype == torch.uint8
    assert np.array_equal(x.numpy(), truth["train"][0]) and np.array_equal(y.numpy(), truth["train"][1])


# --------------------------------------------------------------------------------------------
# Kaggle folder
# --------------------------------------------------------------------------------------------


def test_kaggle_folder_reads_the_published_layout(kaggle_root):
    root, labels = kaggle_root
    ds = KaggleFolder(root)
    assert len(ds) == 40 and ds.leaky is False
    assert np.array_equal(ds.labels, [labels[i] for i in ds.ids])
    patch, label = ds[5]
    assert patch.shape == PATCH and patch.dtype == np.uint8 and patch[0, 0, 0] == 5
    assert label == labels[_kaggle_id(5)]


def test_kaggle_split_is_flagged_leaky_and_warns(kaggle_root, caplog):
    root, labels = kaggle_root
    with caplog.at_level(logging.WARNING, logger="patch_model.data"):
        train, valid = kaggle_split(root, valid_fraction=0.25, seed=3)
    assert train.leaky and valid.leaky
    assert "LEAKY" in valid.description
    assert len(train) == 30 and len(valid) == 10 and not set(train.ids) & set(valid.ids)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings and "leak" in warnings[0].getMessage().lower()
    again, _ = kaggle_split(root, valid_fraction=0.25, seed=3)
    assert again.ids == train.ids  # deterministic


def test_kaggle_test_part_is_held_back_from_train_only(kaggle_root):
    from patch_model.data import kaggle_splits

    root, _ = kaggle_root
    parts = kaggle_splits(root, valid_fraction=0.25, test_fraction=0.25, seed=3)
    assert sorted(parts) == ["test", "train", "valid"] and all(p.leaky for p in parts.values())
    ids = {k: set(v.ids) for k, v in parts.items()}
    assert len(ids["valid"]) == 10 and len(ids["test"]) == 10 and len(ids["train"]) == 20
    assert not (ids["train"] & ids["test"] or ids["valid"] & ids["test"] or ids["train"] & ids["valid"])
    _, valid = kaggle_split(root, valid_fraction=0.25, seed=3)
    assert set(valid.ids) == ids["valid"]  # the valid part does not move when a test part is added
    assert set(open_splits(root, valid_fraction=0.25, test_fraction=0.25, seed=3)["test"].ids) == ids["test"]
    for bad in (-0.1, 0.75, 1.0):
        with pytest.raises(ConfigError, match="test_fraction"):
            kaggle_splits(root, valid_fraction=0.25, test_fraction=bad)


def test_kaggle_unknown_id_is_an_error(kaggle_root):
    root, _ = kaggle_root
    with pytest.raises(DataLayoutError, match="not listed"):
        KaggleFolder(root, ids=["nope"])


def test_detect_layout_and_open_splits(pcam_root, kaggle_root, caplog):
    pcam, _ = pcam_root
    kaggle, _ = kaggle_root
    assert detect_layout(pcam) == "pcam-h5"
    assert detect_layout(kaggle) == "kaggle"
    honest = open_splits(pcam)
    assert set(honest) == {"train", "valid", "test"} and not any(d.leaky for d in honest.values())
    with caplog.at_level(logging.WARNING):
        leaky = open_splits(kaggle)
    assert set(leaky) == {"train", "valid"} and all(d.leaky for d in leaky.values())


def test_detect_layout_empty_folder(tmp_path):
    with pytest.raises(DataLayoutError, match="train_labels.csv") as err:
        detect_layout(tmp_path)
    assert "camelyonpatch_level_2_split" in str(err.value)


def test_gzipped_pcam_says_gunzip(tmp_path):
    for xy in "xy":
        (tmp_path / f"camelyonpatch_level_2_split_valid_{xy}.h5.gz").write_bytes(b"\x1f\x8b")
    with pytest.raises(DataLayoutError, match="gunzip -k"):
        detect_layout(tmp_path)
    with pytest.raises(DataLayoutError, match="gunzip them first"):
        pcam_paths(tmp_path, "valid")


# --------------------------------------------------------------------------------------------
# Labels from geometry
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("l0_mpp", [0.243, 0.226])
@pytest.mark.parametrize("side", ["left", "right", "top", "bottom"])
@pytest.mark.parametrize("gap_px, expected", [(-1.0, 1), (1.0, 0), (0.0, 0)])
def test_patch_label_centre_third(l0_mpp, side, gap_px, expected):
    """A 50 px tumour square 1 px inside / 1 px outside / touching the centre 32x32 region."""
    patch_l0 = 96 * 0.972 / l0_mpp  # 384 at 0.243, 412.9 at 0.226
    x0, y0 = 1000.0, 2000.0
    lo, hi = patch_l0 / 3, 2 * patch_l0 / 3  # centre region, relative to the patch
    mid = patch_l0 / 2
    s = 50.0
    box = {
        "left": (lo - gap_px - s, mid - 10, lo - gap_px, mid + 10),
        "right": (hi + gap_px, mid - 10, hi + gap_px + s, mid + 10),
        "top": (mid - 10, lo - gap_px - s, mid + 10, lo - gap_px),
        "bottom": (mid - 10, hi + gap_px, mid + 10, hi + gap_px + s),
    }[side]
    tumor = shapely.box(x0 + box[0], y0 + box[1], x0 + box[2], y0 + box[3])
    assert patch_label(tumor, (x0, y0), patch_l0=patch_l0) == expected


def test_patch_label_empty_geometry_is_negative():
    assert patch_label(shapely.Polygon(), (0, 0), patch_l0=384.0) == 0
    assert patch_label(None, (0, 0), patch_l0=384.0) == 0


# --------------------------------------------------------------------------------------------
# Cutting patches from SYNTHETIC annotated slides
# --------------------------------------------------------------------------------------------


def _tumor_spec(seed, n_tumors):
    spec = make_spec(tissue_mm2=0.6, n_tumors=n_tumors, faint=False, pen=False, seed=seed)
    tumors = []
    for host in spec.tissue[:n_tumors]:
        r = 0.55 * min(host.radii_um)  # ~150 um radius: ~70 PCam cells of tumour
        tumors.append(Blob(host.centre_um, (r, 0.85 * r), angle_deg=20.0 * seed, wobble=0.1, lobes=4))
    return dataclasses.replace(spec, tumors=tuple(tumors))


@pytest.mark.parametrize("n, expected", [
    (1, {"train": 1, "valid": 0, "test": 0}),
    (2, {"train": 1, "valid": 1, "test": 0}),
    (3, {"train": 1, "valid": 1, "test": 1}),
    (10, {"train": 7, "valid": 2, "test": 1}),
    (20, {"train": 14, "valid": 3, "test": 3}),
])
def test_slides_are_shared_over_splits_with_each_split_served_first(n, expected):
    assert _allocate(n, {"train": 0.7, "valid": 0.15, "test": 0.15}) == expected


@pytest.fixture(scope="module")
def cut(tmp_path_factory):
    src = tmp_path_factory.mktemp("slides")
    truth = {
        "tumor_a": write_synthetic_slide(src / "tumor_a.tif", _tumor_spec(1, 1), mpp=0.243, tile=256),
        "tumor_b": write_synthetic_slide(src / "tumor_b.tif", _tumor_spec(2, 2), mpp=0.226, tile=256),
        "tumor_c": write_synthetic_slide(src / "tumor_c.tif", _tumor_spec(3, 1), mpp=0.243, tile=256),
        "normal_a": write_synthetic_slide(src / "normal_a.tif", make_spec(tissue_mm2=0.6, n_tumors=0, faint=False,
                                                                         pen=False, seed=4),
                                          mpp=0.243, tile=256, xml=False),
    }
    damaged = src / "broken.tif"
    damaged.write_bytes((src / "tumor_a.tif").read_bytes()[:30_000])
    unannotated = src / "tumor_noxml.tif"
    shutil.copy(src / "normal_a.tif", unannotated)
    out = tmp_path_factory.mktemp("patches")
    slides = [src / "tumor_a.tif", damaged, src / "tumor_b.tif", src / "tumor_c.tif", src / "normal_a.tif",
              unannotated]
    summary = cut_pcam_patches(slides, annotations=src, out=out, per_slide=80, seed=0)
    metas = {}
    for split in summary["splits"]:
        with open(out / f"camelyonpatch_level_2_split_{split}_meta.csv", newline="") as fh:
            metas[split] = list(csv.DictReader(fh))
    return summary, truth, out, metas


def test_cut_records_failed_slides_and_continues(cut):
    summary, truth, _, _ = cut
    assert set(summary["failed"]) == {"broken", "tumor_noxml"}
    assert "no annotation" in summary["failed"]["tumor_noxml"]["error"]
    assert set(summary["slides"]) == set(truth)
    assert summary["synthetic"] is True


def test_cut_splits_are_slide_disjoint_with_tumor_in_each(cut):
    summary, _, _, metas = cut
    assert set(metas) == {"train", "valid", "test"}
    slides_per_split = {s: {r["slide"] for r in rows} for s, rows in metas.items()}
    for a in PCAM_SPLITS:
        for b in PCAM_SPLITS:
            if a < b:
                assert not slides_per_split[a] & slides_per_split[b]
        assert any(int(r["label"]) for r in metas[a]), f"{a} has no positive"
        assert {r["split"] for r in metas[a]} == {a}
    assert "normal_a" in slides_per_split["train"]


def test_cut_is_balanced(cut):
    summary, _, _, metas = cut
    for split, rows in metas.items():
        n_pos = sum(int(r["label"]) for r in rows)
        assert abs(2 * n_pos - len(rows)) <= 0.1 * len(rows), (split, n_pos, len(rows))
        assert summary["splits"][split]["n"] == len(rows)
    per_slide = {s: v["n_pos"] + v["n_neg"] for s, v in summary["slides"].items()}
    assert all(0 < n <= 80 for n in per_slide.values()), per_slide


def test_cut_labels_match_the_truth_polygon(cut):
    """Recomputed from the synthetic truth (not the XML, not patch_label): centre third overlaps tumour."""
    _, truth, _, metas = cut
    checked = 0
    for rows in metas.values():
        for r in rows:
            t = truth[r["slide"]]
            third = 96 * 0.972 / t.mpp / 3
            x, y = float(r["l0_x"]) + third, float(r["l0_y"]) + third
            centre = shapely.box(x, y, x + third, y + third)
            overlap = t.tumor_l0.intersection(centre).area
            if 0 < overlap < 1 or (overlap == 0 and centre.distance(t.tumor_l0.boundary) < 0.01):
                continue  # within rounding of the XML / 2-decimal CSV: either label is right
            assert int(r["label"]) == int(overlap > 0), r
            checked += 1
    assert checked > 100


def test_cut_positives_look_like_tumor(cut):
    """Synthetic tumour is darker and more purple than normal tissue: so must the positives be."""
    _, _, out, _ = cut
    ds = PCamH5(out, "train")
    centres = np.stack([ds[i][0][32:64, 32:64].reshape(-1, 3).mean(0) for i in range(len(ds))])
    pos, neg = centres[ds.labels == 1].mean(0), centres[ds.labels == 0].mean(0)
    assert pos.sum() < neg.sum() - 30  # darker
    assert (pos[2] - pos[1]) > (neg[2] - neg[1]) + 10  # bluer than green: purple, not pink


def test_cut_outputs_read_back_as_pcam(cut):
    _, truth, out, metas = cut
    for split, rows in metas.items():
        ds = PCamH5(out, split)
        assert len(ds) == len(rows)
        assert np.array_equal(ds.labels, [int(r["label"]) for r in rows])
        patch, _ = ds[len(ds) - 1]
        assert patch.shape == PATCH and patch.dtype == np.uint8
        assert all(math.isfinite(float(r["l0_x"])) and len(r["l0_x"].split(".")[1]) == 2 for r in rows)
    summary_file = out / "patches_summary.json"
    assert summary_file.is_file()


@pytest.mark.parametrize("read_from", ["nearest", "finer"])
def test_cut_explicit_splits_and_patches_match_slide_reads(cut, tmp_path, read_from):
    """Explicit {stem: split} wins; a written patch equals a fresh read at its meta position from the
    level ``read_from`` picks (as wsi-infer --read-from reads it), not the other level's read."""
    from wsi_toolkit.slide import open_slide

    _, truth, _, _ = cut
    slides = [truth["tumor_a"].path, truth["normal_a"].path]
    summary = cut_pcam_patches(slides, annotations=truth["tumor_a"].path.parent, out=tmp_path, per_slide=20,
                               splits={"tumor_a": "valid", "normal_a": "valid"}, read_from=read_from)
    assert set(summary["splits"]) == {"valid"}
    assert summary["settings"]["read_from"] == read_from
    with open(tmp_path / "camelyonpatch_level_2_split_valid_meta.csv", newline="") as fh:
        row = list(csv.DictReader(fh))[3]
    patch = PCamH5(tmp_path, "valid")[3][0]
    other = "finer" if read_from == "nearest" else "nearest"
    with open_slide(truth[row["slide"]].path) as slide:
        xy = (float(row["l0_x"]), float(row["l0_y"]))
        again = slide.read_at_mpp(xy, (96, 96), 0.972, read_from=read_from)
        not_this = slide.read_at_mpp(xy, (96, 96), 0.972, read_from=other)
    assert np.array_equal(patch, again)
    assert not np.array_equal(patch, not_this)


def test_cut_raises_when_no_slide_is_usable(tmp_path):
    bad = tmp_path / "broken.tif"
    bad.write_bytes(b"II*\x00not a slide")
    with pytest.raises(WsiToolkitError, match="no slide could be used"):
        cut_pcam_patches([bad], annotations=None, out=tmp_path / "out")
    assert not (tmp_path / "out").exists()
