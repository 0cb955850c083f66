"""The slide-path perturbations (patch_model.scanner) and the ``+scanner`` training augmentation.

Each op on its own: it changes a patch at a nonzero strength, is the identity at zero where that
means something, is repeatable under a seed, and does what its name says on literal inputs
(brightness +10 % of 100 is 110; a box reduction is the block mean; JPEG at 95 is closer than at 50).
Then the fastai item transform (train items only, labels untouched) and the recipe's record of it.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from patch_model import scanner as sc
from wsi_toolkit.errors import ConfigError


def _patch(seed: int = 0) -> np.ndarray:
    """A (96, 96, 3) uint8 H&E-ish texture: smooth pink/purple blobs plus fine grain, values 40..230."""
    rng = np.random.default_rng(seed)
    coarse = np.kron(rng.random((6, 6, 3)), np.ones((16, 16, 1)))
    fine = rng.random((96, 96, 3))
    base = np.array([200.0, 140.0, 190.0])
    return np.clip(base - 80 * coarse + 50 * (fine - 0.5), 40, 230).astype(np.uint8)


P40_BOX = [(sc.PCAM_MPP / 4, "bicubic"), (sc.PCAM_MPP / 2, "box"), (sc.PCAM_MPP, "box")]

OPS = {
    "jpeg": lambda x: sc.jpeg(x, 85),
    "blur": lambda x: sc.gaussian_blur(x, 1.0),
    "resample": lambda x: sc.resample(x, P40_BOX),
    "hed": lambda x: sc.hed_shift(x, [1.05, 0.95, 1.0], [0.02, -0.02, 0.0]),
    "brightness": lambda x: sc.brightness_contrast(x, brightness=0.1),
    "contrast": lambda x: sc.brightness_contrast(x, contrast=0.1),
}


@pytest.mark.parametrize("name", list(OPS))
def test_each_op_changes_the_patch_and_keeps_its_form(name):
    x = _patch()
    before = x.copy()
    out = OPS[name](x)
    assert out.dtype == np.uint8 and out.shape == x.shape
    assert np.array_equal(x, before)  # the input is not written to
    assert np.abs(out.astype(int) - x).mean() > 0.5


@pytest.mark.parametrize("op", [
    lambda x: sc.gaussian_blur(x, 0),
    lambda x: sc.resample(x, []),
    lambda x: sc.hed_shift(x, [1, 1, 1], [0, 0, 0]),
    lambda x: sc.brightness_contrast(x, brightness=0, contrast=0),
    lambda x: sc.ScannerAugment(p=0.0)(x, np.random.default_rng(0)),
], ids=["blur0", "resample-empty", "hed-identity", "bc0", "scanner-p0"])
def test_zero_strength_is_the_identity(op):
    x = _patch(1)
    out = op(x)
    assert np.array_equal(out, x) and out is not x


def test_brightness_and_contrast_on_literal_values():
    x = np.full((2, 2, 3), 100, np.uint8)
    assert np.all(sc.brightness_contrast(x, brightness=0.1) == 110)
    assert np.all(sc.brightness_contrast(x, brightness=-0.2) == 80)
    y = np.array([[[100] * 3, [200] * 3]], np.uint8)  # mean 150
    assert sc.brightness_contrast(y, contrast=0.2)[0, :, 0].tolist() == [90, 210]
    assert sc.brightness_contrast(y, contrast=-0.5)[0, :, 0].tolist() == [125, 175]
    assert np.all(sc.brightness_contrast(np.full((1, 1, 3), 240, np.uint8), brightness=0.2) == 255)  # clipped


def test_jpeg_error_grows_as_quality_falls():
    x = _patch(2)
    err = [np.abs(sc.jpeg(x, q).astype(int) - x).mean() for q in (95, 85, 70, 50)]
    assert err == sorted(err) and err[0] < err[-1]
    with pytest.raises(ConfigError, match="quality"):
        sc.jpeg(x, 0)


def test_blur_keeps_the_mean_and_removes_fine_detail():
    x = _patch(3)

    def detail(a):  # energy of the difference between neighbours
        return np.abs(np.diff(a.astype(float), axis=1)).mean()

    outs = [sc.gaussian_blur(x, s) for s in (0.5, 1.0, 1.5, 2.0)]
    d = [detail(o) for o in outs]
    assert d == sorted(d, reverse=True) and d[-1] < 0.5 * detail(x)
    for o in outs:
        assert abs(o.astype(float).mean() - x.astype(float).mean()) < 1.0


def test_40x_box_path_is_the_block_mean_of_the_bicubic_upsample():
    """The 40x pyramid path: 4x bicubic up (PIL), then two 2x area reductions; each reduction is the
    2x2 block mean (to within rounding)."""
    from PIL import Image

    x = _patch(4)
    up = np.asarray(Image.fromarray(x).resize((384, 384), Image.Resampling.BICUBIC)).astype(float)
    half = np.rint(up.reshape(192, 2, 192, 2, 3).mean(axis=(1, 3)))
    want = half.reshape(96, 2, 96, 2, 3).mean(axis=(1, 3))
    got = sc.resample(x, P40_BOX).astype(float)
    assert np.abs(got - want).max() <= 1.0
    assert np.abs(got - x).mean() > 0.5  # and the round trip is not the identity


def test_resample_path_must_end_at_the_patch_scale_with_a_known_filter():
    x = _patch()
    with pytest.raises(ConfigError, match="end at"):
        sc.resample(x, [(0.5, "bicubic")])
    with pytest.raises(ConfigError, match="filter"):
        sc.resample(x, [(0.5, "cubic"), (sc.PCAM_MPP, "box")])


def test_hed_shift_agrees_with_the_training_batch_jitter():
    """The numpy stain shift equals augment.hed_jitter (the device batch transform) on the same numbers."""
    pytest.importorskip("fastai")
    from skimage.color import hed_from_rgb, rgb_from_hed

    from patch_model.augment import hed_jitter

    x = _patch(5)
    scale, shift = np.array([1.08, 0.93, 1.0]), np.array([0.05, -0.03, 0.01])
    got = sc.hed_shift(x, scale, shift).astype(float)
    t = torch.from_numpy(x).permute(2, 0, 1)[None].float() / 255
    ref = hed_jitter(t, torch.tensor(scale, dtype=torch.float32).view(1, 1, 3),
                     torch.tensor(shift, dtype=torch.float32).view(1, 1, 3),
                     to_hed=torch.as_tensor(hed_from_rgb, dtype=torch.float32),
                     to_rgb=torch.as_tensor(rgb_from_hed, dtype=torch.float32))
    ref = (ref[0].permute(1, 2, 0).numpy() * 255).round()
    assert np.abs(got - ref).max() <= 1.0
    assert np.abs(got - x).mean() > 1.0


def test_random_hed_and_the_scanner_augment_repeat_under_a_seed():
    x = _patch(6)
    first, again = (sc.random_hed(x, 0.1, np.random.default_rng(7)) for _ in range(2))
    assert np.array_equal(first, again) and not np.array_equal(first, x)
    aug = sc.ScannerAugment()
    a = [aug(x, np.random.default_rng(s)) for s in range(8)]
    b = [aug(x, np.random.default_rng(s)) for s in range(8)]
    assert all(np.array_equal(u, v) for u, v in zip(a, b))
    assert len({u.tobytes() for u in a}) > 1  # different seeds, different draws


def test_scanner_augment_with_every_op_on_changes_every_patch():
    aug = sc.ScannerAugment(p=1.0)
    for s in range(5):
        x = _patch(s)
        assert np.abs(aug(x, np.random.default_rng(s)).astype(int) - x).mean() > 0.5


@pytest.mark.parametrize("kwargs", [{"p": 1.5}, {"blur_sigma_px": (1.0, 0.5)}, {"resample_factor": (0.5, 2.0)},
                                    {"resample_filters": ("cubic",)}, {"jpeg_quality": (50, 101)},
                                    {"brightness": 1.0}])
def test_scanner_augment_rejects_bad_settings(kwargs):
    with pytest.raises(ConfigError):
        sc.ScannerAugment(**kwargs)


# --------------------------------------------------------------------------------------------
# The fastai item transform and the recipe


def _item(x: np.ndarray, label: int):
    from fastai.torch_core import TensorCategory, TensorImage

    return TensorImage(torch.from_numpy(x).permute(2, 0, 1).contiguous()), TensorCategory(label)


def test_scanner_item_changes_train_images_only_and_never_the_label():
    pytest.importorskip("fastai")
    from patch_model.augment import ScannerItem

    tfm = ScannerItem(sc.ScannerAugment(p=1.0))
    x = _patch(8)
    img, lab = _item(x, 1)
    torch.manual_seed(3)
    out_img, out_lab = tfm((img, lab), split_idx=0)
    assert out_img.dtype == torch.uint8 and out_img.shape == (3, 96, 96)
    assert (out_img.int() - img.int()).abs().float().mean() > 0.5
    assert int(out_lab) == 1
    torch.manual_seed(3)
    again, _ = tfm((img, lab), split_idx=0)
    assert torch.equal(again, out_img)  # the same torch seed, the same image
    valid_img, valid_lab = tfm((img, lab), split_idx=1)
    assert torch.equal(valid_img, img) and int(valid_lab) == 1


@pytest.fixture(scope="module")
def kaggle_small(tmp_path_factory):
    """A Kaggle-layout folder of 64 textured patches, half labelled tumour."""
    import tifffile

    root = tmp_path_factory.mktemp("scanner_kaggle")
    (root / "train").mkdir()
    rows = ["id,label"]
    for i in range(64):
        pid = f"{i:040x}"
        tifffile.imwrite(root / "train" / f"{pid}.tif", _patch(100 + i), photometric="rgb")
        rows.append(f"{pid},{i % 2}")
    (root / "train_labels.csv").write_text("\n".join(rows) + "\n")
    return root


def test_scanner_dataloaders_augment_train_batches_repeatably_and_leave_valid_alone(kaggle_small):
    pytest.importorskip("fastai")
    from patch_model._fastai import set_seed
    from patch_model.augment import ScannerItem
    from patch_model.data import open_splits
    from patch_model.loaders import build_dataloaders

    splits = open_splits(kaggle_small, valid_fraction=0.25, seed=1)

    def first_batches(augment):
        set_seed(11)
        data = build_dataloaders(splits, size=96, batch_size=16, workers=0, augment=augment)
        return data, next(iter(data.dls.train)), next(iter(data.dls.valid))

    data, (xt, yt), (xv, yv) = first_batches("dihedral+scanner")
    assert any(isinstance(t, ScannerItem) for t in data.dls.train.after_item.fs)
    _, (xt2, yt2), _ = first_batches("dihedral+scanner")
    assert torch.equal(xt, xt2) and torch.equal(yt, yt2)  # repeatable under the seed
    plain, (xp, yp), (xpv, ypv) = first_batches("dihedral")
    assert not any(isinstance(t, ScannerItem) for t in plain.dls.train.after_item.fs)
    assert torch.equal(xv, xpv) and torch.equal(yv, ypv)  # validation batches: no scanner
    assert torch.equal(yt, yp)  # the same patches drawn, labels untouched
    assert not torch.equal(xt, xp)  # ... and their pixels changed


def test_augment_values_agree_between_the_cli_and_the_registry():
    pytest.importorskip("fastai")
    import click

    from patch_model.augment import AUGMENTS, describe_augment, parse_augment
    from patch_model.cli import _train_command

    opt = next(p for p in _train_command.params if p.name == "augment")
    assert isinstance(opt.type, click.Choice) and tuple(opt.type.choices) == AUGMENTS
    spec = parse_augment("dihedral+scanner")
    assert (spec.geometric, spec.hed, spec.scanner) == ("dihedral", False, True)
    assert "JPEG" in describe_augment("flips+scanner") and "JPEG" not in describe_augment("dihedral+hed")


def test_scanner_recipe_is_recorded_in_the_package(kaggle_small, tmp_path, capsys):
    pytest.importorskip("fastai")
    from patch_model.cli import train_main

    out = tmp_path / "out"
    rc = train_main(["--data", str(kaggle_small), "--out", str(out), "--arch", "resnet18", "--size", "32",
                     "--no-pretrained", "--epochs-frozen", "0", "--epochs", "1", "--batch-size", "16",
                     "--lr-find-iters", "0", "--lr-unfrozen", "1e-3", "--valid-fraction", "0.25", "--top-losses", "0",
                     "--workers", "0", "--no-progress", "--augment", "dihedral+scanner"])
    assert rc == 0
    recipe = json.loads((out / "model" / "config.json").read_text())["wsi_toolkit"]["training"]["recipe"]
    assert recipe["augmentation"] == "dihedral+scanner"
    settings = json.loads((out / "settings.json").read_text())
    assert settings["augment"] == "dihedral+scanner"
    assert "JPEG" in settings["resolved"]["augmentation"] and "blur" in settings["resolved"]["augmentation"]
