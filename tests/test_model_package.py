"""Model package: WSInfer config validation (schema + rules), Preprocess, save/load (TorchScript and
torch.export), the SYNTHETIC colour-rule model."""

from __future__ import annotations

import copy
import hashlib
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from torchvision.transforms import v2

from wsi_toolkit import limits
from wsi_toolkit.errors import WsiToolkitError
from wsi_toolkit.model_package import (
    CONFIG_NAME,
    EXPORT_NAME,
    IMAGENET_MEAN,
    IMAGENET_STD,
    TORCHSCRIPT_NAME,
    ModelConfig,
    ModelPackageError,
    Preprocess,
    TransformStep,
    load_model_package,
    pcam_config,
    save_model_package,
)

# A config as the WSInfer model zoo publishes them (breast tumour ResNet34 layout), written by hand.
WSINFER_ZOO_CONFIG = {
    "spec_version": "1.0",
    "architecture": "resnet34",
    "num_classes": 2,
    "class_names": ["notumor", "tumor"],
    "patch_size_pixels": 350,
    "spacing_um_px": 0.5,
    "transform": [
        {"name": "Resize", "arguments": {"size": 224}},
        {"name": "ToTensor"},
        {"name": "Normalize", "arguments": {"mean": [0.7238, 0.5716, 0.6779], "std": [0.112, 0.1459, 0.1089]}},
    ],
}


def _zoo(**changes) -> dict:
    d = copy.deepcopy(WSINFER_ZOO_CONFIG)
    d.update(changes)
    return d


class TinyNet(torch.nn.Module):
    """Two conv layers and a linear head: (N, 3, S, S) -> (N, num_classes)."""

    def __init__(self, num_classes: int = 2):
        super().__init__()
        torch.manual_seed(0)
        self.features = torch.nn.Sequential(
            torch.nn.Conv2d(3, 8, 3, stride=2, padding=1), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
            torch.nn.Conv2d(8, 16, 3, stride=2, padding=1), torch.nn.ReLU(),
            torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
        )
        self.head = torch.nn.Linear(16, num_classes)

    def forward(self, x):
        return self.head(self.features(x))


def _patches(n: int = 4, size: int = 96, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, size, size, 3), dtype=torch.uint8, generator=g)


# --------------------------------------------------------------------------------------------
# Config


def test_config_round_trip_keeps_unknown_keys_and_extra():
    d = _zoo(
        model_card={"authors": ["A. N. Other"], "licence": "CC-BY-4.0"},
        wsi_toolkit={"label_semantics": "centre", "tumor_class": "tumor", "sha256": "ab" * 32,
                     "metrics": {"auc": 0.97}, "synthetic": False},
    )
    cfg = ModelConfig.from_dict(d)
    assert cfg.unknown["model_card"]["authors"] == ("A. N. Other",)
    assert cfg.extra["metrics"]["auc"] == 0.97
    assert cfg.tumor_class == "tumor" and cfg.label_semantics == "centre"
    assert "tumor_class" not in cfg.extra
    assert cfg.to_dict() == d
    assert ModelConfig.from_dict(json.loads(cfg.to_json())) == cfg


def test_to_dict_wsinfer_strict_has_only_wsinfer_keys():
    cfg = ModelConfig.from_dict(_zoo(model_card={"x": 1}, wsi_toolkit={"sha256": "00"}))
    strict = cfg.to_dict(wsinfer_strict=True)
    assert list(strict) == ["spec_version", "architecture", "num_classes", "class_names", "patch_size_pixels",
                            "spacing_um_px", "transform"]
    assert strict == WSINFER_ZOO_CONFIG


def test_config_is_immutable():
    cfg = ModelConfig.from_dict(_zoo(wsi_toolkit={"metrics": {"auc": 0.9}}))
    with pytest.raises(TypeError):
        cfg.extra["metrics"]["auc"] = 1.0  # type: ignore[index]
    with pytest.raises(AttributeError):
        cfg.num_classes = 3  # type: ignore[misc]
    assert isinstance(cfg.class_names, tuple)
    assert all(isinstance(s, TransformStep) for s in cfg.transform)
    with pytest.raises(TypeError):
        cfg.transform[0].arguments["size"] = 96  # type: ignore[index]


def test_wsinfer_zoo_config_loads():
    cfg = ModelConfig.from_dict(WSINFER_ZOO_CONFIG)
    assert cfg.architecture == "resnet34"
    assert cfg.input_size == 224
    assert cfg.patch_size_pixels == 350 and cfg.spacing_um_px == 0.5
    assert [s.name for s in cfg.transform] == ["Resize", "ToTensor", "Normalize"]
    assert cfg.tumor_index() == 1
    # No "wsi_toolkit" object: a foreign model whose labels speak of the whole patch.
    assert cfg.label_semantics == "whole"


def test_pcam_config_defaults():
    cfg = pcam_config()
    assert (cfg.patch_size_pixels, cfg.spacing_um_px, cfg.input_size) == (96, 0.972, 224)
    assert cfg.label_semantics == "centre"
    assert cfg.tumor_index() == 1
    assert cfg.to_dict()["transform"][0] == {"name": "Resize", "arguments": {"size": 224}}
    native = pcam_config(input_size=96)
    assert native.input_size == 96
    # Resize kept at the native size: WSInfer reads level 0 (384 px at 0.243 um/px) and relies on it.
    assert native.to_dict()["transform"][0] == {"name": "Resize", "arguments": {"size": 96}}


@pytest.mark.parametrize(
    "change, field",
    [
        (lambda d: d.pop("num_classes"), "num_classes"),
        (lambda d: d.pop("transform"), "transform"),
        (lambda d: d.update(num_classes=0), "num_classes"),
        (lambda d: d.update(num_classes=True), "num_classes"),
        (lambda d: d.update(class_names=["notumor", "tumor", "other"]), "class_names"),
        (lambda d: d.update(class_names=["tumor", "tumor"]), "class_names"),
        (lambda d: d.update(class_names="tumor"), "class_names"),
        (lambda d: d.update(spacing_um_px=-0.5), "spacing_um_px"),
        (lambda d: d.update(spacing_um_px="0.5"), "spacing_um_px"),
        (lambda d: d.update(patch_size_pixels=0), "patch_size_pixels"),
        (lambda d: d.update(architecture=""), "architecture"),
        (lambda d: d.update(spec_version="2.0"), "spec_version"),
        (lambda d: d["transform"].__setitem__(0, {"name": "CenterCrop", "arguments": {"size": 224}}),
         "transform[0].name"),
        (lambda d: d["transform"][2]["arguments"].update(mean=[0.5, 0.5]), "transform[2].arguments.mean"),
        (lambda d: d["transform"][2]["arguments"].update(std=[0.1, 0.0, 0.1]), "transform[2].arguments.std"),
        (lambda d: d["transform"][0]["arguments"].update(size=-3), "transform[0].arguments.size"),
        (lambda d: d["transform"].pop(1), "transform"),
        (lambda d: d.update(wsi_toolkit={"tumor_class": "cancer"}), "wsi_toolkit.tumor_class"),
        (lambda d: d.update(wsi_toolkit={"label_semantics": "middle"}), "wsi_toolkit.label_semantics"),
        (lambda d: d.update(wsi_toolkit=[1, 2]), "wsi_toolkit"),
    ],
)
def test_validation_error_names_field_and_file(change, field):
    d = _zoo()
    change(d)
    with pytest.raises(ModelPackageError) as info:
        ModelConfig.from_dict(d, source="pkg/config.json")
    msg = str(info.value)
    assert f"'{field}'" in msg, msg
    assert "pkg/config.json" in msg, msg
    assert info.value.field == field
    assert isinstance(info.value, ValueError) and isinstance(info.value, WsiToolkitError)


def test_normalize_before_totensor_is_rejected():
    with pytest.raises(ModelPackageError, match="after ToTensor"):
        ModelConfig.from_dict(_zoo(transform=[
            {"name": "Normalize", "arguments": {"mean": [0, 0, 0], "std": [1, 1, 1]}}, {"name": "ToTensor"}]))


def test_tumor_class_explicit():
    cfg = ModelConfig.from_dict(_zoo(class_names=["tumor", "stroma"], wsi_toolkit={"tumor_class": "stroma"}))
    assert cfg.tumor_index() == 1


@pytest.mark.parametrize(
    "names, index",
    [
        (["normal", "Tumour"], 1),
        (["METASTASES", "normal"], 0),
        (["negative", "positive"], 1),
        (["stroma", "lymph", "Tumor tissue"], 2),
        (["benign", "malignant"], 1),
    ],
)
def test_tumor_class_by_synonym(names, index):
    cfg = ModelConfig.from_dict(_zoo(num_classes=len(names), class_names=names))
    assert cfg.tumor_index() == index


def test_tumor_class_single_output_is_zero():
    cfg = ModelConfig.from_dict(_zoo(num_classes=1, class_names=["lesion"]))
    assert cfg.tumor_index() == 0


def test_tumor_class_none_found_lists_names():
    cfg = ModelConfig.from_dict(_zoo(class_names=["lymphocytes", "other"]))
    with pytest.raises(ModelPackageError, match="lymphocytes.*other") as info:
        cfg.tumor_index()
    assert "tumor_class" in str(info.value)


# --------------------------------------------------------------------------------------------
# Preprocess


def _reference(steps, x_uint8: torch.Tensor) -> torch.Tensor:
    """torchvision v2 on each (H, W, 3) uint8 patch, steps in the given order (ToTensor first)."""
    ops = []
    for s in steps:
        if s["name"] == "ToTensor":
            ops += [v2.ToImage(), v2.ToDtype(torch.float32, scale=True)]
        elif s["name"] == "Resize":
            ops.append(v2.Resize(s["arguments"]["size"], antialias=True))
        else:
            ops.append(v2.Normalize(s["arguments"]["mean"], s["arguments"]["std"]))
    t = v2.Compose(ops)
    return torch.stack([t(p.permute(2, 0, 1)) for p in x_uint8])


NORM = {"name": "Normalize", "arguments": {"mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)}}


@pytest.mark.parametrize(
    "steps, size",
    [
        ([{"name": "ToTensor"}, {"name": "Resize", "arguments": {"size": 224}}, NORM], 224),
        ([{"name": "ToTensor"}, {"name": "Resize", "arguments": {"size": 64}}, NORM], 64),  # downsampling
        ([{"name": "ToTensor"}, NORM, {"name": "Resize", "arguments": {"size": 150}}], 150),
        ([{"name": "ToTensor"}, NORM], 96),
    ],
)
def test_preprocess_matches_torchvision(steps, size):
    cfg = ModelConfig.from_dict(_zoo(patch_size_pixels=96, transform=steps))
    x = _patches(3)
    out = Preprocess(cfg)(x)
    assert out.shape == (3, 3, size, size) and out.dtype == torch.float32
    ref = _reference(steps, x)
    assert (out - ref).abs().max().item() < 1e-5


def test_preprocess_resize_before_totensor_as_wsinfer():
    # WSInfer's order: Resize, ToTensor, Normalize. Resizing is linear, so it equals resizing the
    # float image in [0, 1] (what torchvision does after ToTensor).
    cfg = ModelConfig.from_dict(_zoo(patch_size_pixels=96))
    x = _patches(2)
    out = Preprocess(cfg)(x)
    t = v2.Compose([v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Resize(224, antialias=True),
                    v2.Normalize([0.7238, 0.5716, 0.6779], [0.112, 0.1459, 0.1089])])
    ref = torch.stack([t(p.permute(2, 0, 1)) for p in x])
    assert (out - ref).abs().max().item() < 1e-5


def test_preprocess_skips_resize_at_native_size(monkeypatch):
    def no_interpolation(*args, **kwargs):
        raise AssertionError("Resize at the native size must be skipped")

    monkeypatch.setattr(torch.nn.functional, "interpolate", no_interpolation)
    cfg = ModelConfig.from_dict(_zoo(patch_size_pixels=96, transform=[
        {"name": "Resize", "arguments": {"size": 96}}, {"name": "ToTensor"}]))
    x = _patches(2)
    assert torch.equal(Preprocess(cfg)(x), x.permute(0, 3, 1, 2).float() / 255)


def test_preprocess_resize_list_size():
    cfg = ModelConfig.from_dict(_zoo(transform=[{"name": "ToTensor"},
                                                {"name": "Resize", "arguments": {"size": [48, 48]}}]))
    assert cfg.input_size == 48
    assert cfg.to_dict()["transform"][1]["arguments"]["size"] == [48, 48]
    out = Preprocess(cfg)(_patches(1))
    assert out.shape == (1, 3, 48, 48)


def test_preprocess_respects_order():
    a = {"name": "Normalize", "arguments": {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}}
    b = {"name": "Normalize", "arguments": {"mean": [0.1, 0.2, 0.3], "std": [2.0, 2.0, 2.0]}}
    x = _patches(2, size=16)
    ab = Preprocess(ModelConfig.from_dict(_zoo(transform=[{"name": "ToTensor"}, a, b])))(x)
    ba = Preprocess(ModelConfig.from_dict(_zoo(transform=[{"name": "ToTensor"}, b, a])))(x)
    assert (ab - _reference([{"name": "ToTensor"}, a, b], x)).abs().max().item() < 1e-5
    assert (ab - ba).abs().max().item() > 0.1


@pytest.mark.parametrize("bad", [torch.zeros(2, 3, 96, 96, dtype=torch.uint8), torch.zeros(2, 96, 96, 3)])
def test_preprocess_rejects_wrong_layout(bad):
    with pytest.raises(ModelPackageError, match=r"\(N, H, W, 3\) uint8"):
        Preprocess(pcam_config())(bad)


# --------------------------------------------------------------------------------------------
# Save / load


@pytest.fixture
def tiny_package(tmp_path):
    model = TinyNet().eval()
    cfg = pcam_config(architecture="tinynet", input_size=64, extra={"training_data": "none (test)"})
    path = save_model_package(tmp_path / "pkg", model, cfg)
    return path, model, cfg


def test_save_load_round_trip(tiny_package):
    path, model, cfg = tiny_package
    pkg = load_model_package(path)
    assert pkg.config.architecture == "tinynet"
    assert pkg.config.extra["training_data"] == "none (test)"
    assert pkg.config.extra["export"]["torchscript"] == "trace"
    x = _patches(5)
    with torch.no_grad():
        eager = torch.softmax(model(Preprocess(cfg)(x)), dim=1)[:, 1]
    got = pkg.predict_proba(x)
    assert got.shape == (5,) and got.dtype == torch.float32 and got.device.type == "cpu"
    assert torch.allclose(got, eager, atol=1e-6)
    assert torch.allclose(pkg.predict_class_proba(x).sum(dim=1), torch.ones(5), atol=1e-6)


def test_saved_config_is_wsinfer_json(tiny_package):
    path, _, _ = tiny_package
    text = (path / CONFIG_NAME).read_text()
    assert text.startswith('{\n  "spec_version": "1.0"')
    d = json.loads(text)
    assert set(d) == {"spec_version", "architecture", "num_classes", "class_names", "patch_size_pixels",
                      "spacing_um_px", "transform", "wsi_toolkit"}
    assert not any(p.name.endswith(".partial") for p in path.parent.iterdir())


def test_sha256_recorded_matches_file(tiny_package):
    path, _, _ = tiny_package
    sha = hashlib.sha256((path / TORCHSCRIPT_NAME).read_bytes()).hexdigest()
    assert json.loads((path / CONFIG_NAME).read_text())["wsi_toolkit"]["sha256"] == sha
    assert load_model_package(path).sha256 == sha


def test_changed_weights_detected_by_sha256(tiny_package):
    path, _, _ = tiny_package
    pt = path / TORCHSCRIPT_NAME
    pt.write_bytes(pt.read_bytes() + b"\0")
    with pytest.raises(ModelPackageError, match="sha256"):
        load_model_package(path)


def test_overwrite_refused_without_flag(tiny_package):
    path, model, cfg = tiny_package
    with pytest.raises(ModelPackageError, match="overwrite=True"):
        save_model_package(path, model, cfg)
    save_model_package(path, TinyNet(), cfg.with_extra(version=2), overwrite=True)
    assert load_model_package(path).config.extra["version"] == 2


def test_overwrite_refuses_a_directory_that_is_not_a_package(tmp_path):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "thesis.txt").write_text("precious")
    with pytest.raises(ModelPackageError, match="does not look like a model package"):
        save_model_package(tmp_path / "notes", TinyNet(), pcam_config(input_size=64), overwrite=True)
    assert (tmp_path / "notes" / "thesis.txt").read_text() == "precious"


def test_save_refuses_class_count_mismatch(tmp_path):
    cfg = pcam_config(input_size=64)
    with pytest.raises(ModelPackageError, match="num_classes=2.*got 3"):
        save_model_package(tmp_path / "pkg", TinyNet(num_classes=3), cfg)
    assert not (tmp_path / "pkg").exists()


def test_load_detects_class_count_mismatch(tiny_package):
    path, _, _ = tiny_package
    d = json.loads((path / CONFIG_NAME).read_text())
    d["num_classes"], d["class_names"] = 3, ["notumor", "tumor", "other"]
    d["wsi_toolkit"].pop("tumor_class")
    (path / CONFIG_NAME).write_text(json.dumps(d))
    with pytest.raises(ModelPackageError, match=r"expects num_classes=3.*got 2"):
        load_model_package(path)


def test_load_without_config(tiny_package):
    path, _, _ = tiny_package
    (path / CONFIG_NAME).unlink()
    with pytest.raises(ModelPackageError, match=CONFIG_NAME):
        load_model_package(path)


def test_load_broken_json(tiny_package):
    path, _, _ = tiny_package
    (path / CONFIG_NAME).write_text('{"spec_version": "1.0", "architecture": ')
    with pytest.raises(ModelPackageError, match=r"config\.json.*not valid JSON"):
        load_model_package(path)


def test_load_invalid_config_names_file_and_field(tiny_package):
    path, _, _ = tiny_package
    d = json.loads((path / CONFIG_NAME).read_text())
    d["spacing_um_px"] = -1
    (path / CONFIG_NAME).write_text(json.dumps(d))
    with pytest.raises(ModelPackageError, match=r"config\.json.*'spacing_um_px'"):
        load_model_package(path)


def test_load_without_weights_or_with_a_pickle(tiny_package):
    path, model, _ = tiny_package
    pt = path / TORCHSCRIPT_NAME
    pt.unlink()
    with pytest.raises(ModelPackageError, match=TORCHSCRIPT_NAME):
        load_model_package(path)
    torch.save(model.state_dict(), pt)  # a pickle, not TorchScript: must not be unpickled
    with pytest.raises(ModelPackageError, match="TorchScript"):
        load_model_package(path, verify_sha256=False)


class BranchyNet(torch.nn.Module):
    """Value-dependent control flow: tracing records one branch only, so it must be scripted."""

    def __init__(self):
        super().__init__()
        self.head = torch.nn.Linear(3, 2)

    def forward(self, x):
        pooled = x.mean(dim=(2, 3))
        if bool(x.max() > 0):
            return self.head(pooled)
        return -self.head(pooled)


def test_save_scripts_when_tracing_is_wrong(tmp_path):
    model = BranchyNet().eval()
    cfg = pcam_config(architecture="branchy", input_size=96)
    pkg = load_model_package(save_model_package(tmp_path / "b", model, cfg))
    assert pkg.config.extra["export"]["torchscript"] == "script"
    for x in (torch.zeros(2, 3, 96, 96), torch.rand(2, 3, 96, 96)):
        with torch.no_grad():
            assert torch.allclose(pkg.model(x), model(x), atol=1e-6)


def test_load_missing_directory(tmp_path):
    with pytest.raises(ModelPackageError, match="does not exist"):
        load_model_package(tmp_path / "nope")


def test_resnet18_round_trip(tmp_path):
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None, num_classes=2).eval()
    cfg = pcam_config(architecture="resnet18", input_size=96)
    pkg = load_model_package(save_model_package(tmp_path / "r18", model, cfg))
    x = _patches(2)
    with torch.no_grad():
        eager = torch.softmax(model(Preprocess(cfg)(x)), dim=1)[:, 1]
    assert torch.allclose(pkg.predict_proba(x), eager, atol=1e-6)


# --------------------------------------------------------------------------------------------
# The SYNTHETIC colour-rule model


@pytest.fixture(scope="module")
def colour_rule(tmp_path_factory):
    from wsi_toolkit.synthetic_model import make_colour_rule_package

    return make_colour_rule_package(tmp_path_factory.mktemp("cr") / "colour-rule")


@pytest.fixture(scope="module")
def texture():
    from wsi_toolkit.synthetic import _Texture

    return _Texture(seed=0, tile=512)


def _texture_patches(texture, name: str, *, k: int = 4, step: int = 24) -> torch.Tensor:
    """96x96 patches at every ``step`` px over one period of the (periodic) texture."""
    t = texture.level_tile(name, k)
    t = np.concatenate([t, t], 0)
    t = np.concatenate([t, t], 1)
    n = texture.tile
    return torch.from_numpy(np.stack([t[y:y + 96, x:x + 96] for y in range(0, n, step) for x in range(0, n, step)]))


def test_colour_rule_package_is_labelled_synthetic(colour_rule):
    cfg = colour_rule.config
    assert cfg.is_synthetic and cfg.extra["description"].startswith("colour-rule test model")
    assert cfg.architecture == "colour-rule-synthetic"
    assert (cfg.patch_size_pixels, cfg.spacing_um_px, cfg.label_semantics) == (96, 0.972, "centre")


@pytest.mark.parametrize(
    "name, lo, hi",
    [("tumor", 0.9, 1.0), ("normal", 0.0, 0.1), ("faint", 0.0, 0.05), ("background", 0.0, 0.05)],
)
def test_colour_rule_on_synthetic_texture(colour_rule, texture, name, lo, hi):
    p = colour_rule.predict_proba(_texture_patches(texture, name))
    assert lo < p.min().item() and p.max().item() < hi, (name, p.min().item(), p.max().item())


@pytest.mark.parametrize(
    "base, nuclei, coverage, lo, hi",
    [
        ((196, 128, 196), (104, 62, 160), 0.5, 0.9, 1.0),  # tumour
        ((232, 168, 208), (88, 58, 150), 0.2, 0.0, 0.1),  # normal
        ((243, 242, 244), (243, 242, 244), 0.0, 0.0, 0.05),  # glass
        ((238, 224, 234), (214, 196, 222), 0.0, 0.0, 0.05),  # faint tissue
    ],
)
def test_colour_rule_on_colour_numbers(colour_rule, base, nuclei, coverage, lo, hi):
    rng = np.random.default_rng(0)
    mask = rng.random((96, 96)) < coverage
    patch = np.where(mask[..., None], np.array(nuclei, np.uint8), np.array(base, np.uint8))
    p = colour_rule.predict_proba(torch.from_numpy(patch)[None]).item()
    assert lo < p < hi


def test_colour_rule_reads_only_the_centre(colour_rule, texture):
    tumor = texture.level_tile("tumor", 4)[:96, :96]
    normal = texture.level_tile("normal", 4)[:96, :96]
    centre_tumor = normal.copy()
    centre_tumor[32:64, 32:64] = tumor[32:64, 32:64]
    rim_tumor = tumor.copy()
    rim_tumor[32:64, 32:64] = normal[32:64, 32:64]
    p = colour_rule.predict_proba(torch.from_numpy(np.stack([centre_tumor, rim_tumor])))
    assert p[0] > 0.9 and p[1] < 0.1


def test_colour_rule_at_224(tmp_path, texture):
    from wsi_toolkit.synthetic_model import make_colour_rule_package

    pkg = make_colour_rule_package(tmp_path / "cr224", input_size=224)
    assert pkg.config.input_size == 224
    t = _texture_patches(texture, "tumor", step=128)
    n = _texture_patches(texture, "normal", step=128)
    assert pkg.predict_proba(t).min() > 0.9 and pkg.predict_proba(n).max() < 0.1


# --------------------------------------------------------------------------------------------
# Issue 11: numbers out of physical sense, config.json files that are not configs


@pytest.mark.parametrize("field,value", [
    ("spacing_um_px", 1e-9), ("spacing_um_px", 0.04), ("spacing_um_px", 21.0), ("spacing_um_px", float("inf")),
    ("patch_size_pixels", 10**9), ("patch_size_pixels", 7), ("patch_size_pixels", 4097), ("patch_size_pixels", 1e9),
])
def test_config_numbers_outside_physical_range(field, value):
    with pytest.raises(ModelPackageError, match=r"\[(0\.05, 20\] um/px|8, 4096\] px)") as info:
        ModelConfig.from_dict(_zoo(**{field: value}), source="pkg/config.json")
    assert info.value.field == field and "pkg/config.json" in str(info.value)


@pytest.mark.parametrize("field,value", [("spacing_um_px", 0.05), ("spacing_um_px", 20),
                                         ("patch_size_pixels", 8), ("patch_size_pixels", 4096)])
def test_config_numbers_at_the_range_ends_are_accepted(field, value):
    assert getattr(ModelConfig.from_dict(_zoo(**{field: value})), field) == value


def test_resize_size_outside_range():
    d = _zoo()
    d["transform"][0]["arguments"]["size"] = 10**9
    with pytest.raises(ModelPackageError, match=r"\[8, 4096\] px") as info:
        ModelConfig.from_dict(d)
    assert info.value.field == "transform[0].arguments.size"


@pytest.mark.parametrize("text,match", [
    ("[" * 100_000 + "]" * 100_000, "nested too deeply"),
    ('{"spacing_um_px": NaN}', "NaN"),
    ('{"patch_size_pixels": ' + "9" * 5000 + "}", "not valid JSON"),
    (b"\xff\xfe{}", "not UTF-8"),
])
def test_config_json_that_is_no_config(tmp_path, text, match):
    from wsi_toolkit.model_package import read_config_json

    path = tmp_path / CONFIG_NAME
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(ModelPackageError, match=match) as info:
        read_config_json(path)
    assert CONFIG_NAME in str(info.value)


def test_legacy_tumour_class_key_is_read():
    """Packages written before the names settled on ``tumor`` spelt the key ``tumour_class``."""
    d = _zoo(class_names=["tumor", "stroma"], wsi_toolkit={"tumour_class": "stroma"})
    cfg = ModelConfig.from_dict(d)
    assert cfg.tumor_class == "stroma" and cfg.tumor_index() == 1
    ours = cfg.to_dict()["wsi_toolkit"]
    assert "tumour_class" not in ours and ours["tumor_class"] == "stroma"


# --------------------------------------------------------------------------------------------
# Issue 14: the config module without torch, the schema as data, model.pt2 (torch.export)


def test_config_module_does_not_import_torch():
    code = "import sys, wsi_toolkit.model_package.config, wsi_toolkit.model_package; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_schema_is_a_valid_schema_whose_ranges_are_the_limits():
    import jsonschema

    from wsi_toolkit.model_package.schema import config_schema

    schema = config_schema()
    jsonschema.Draft7Validator.check_schema(schema)
    props, side = schema["properties"], schema["definitions"]["side_px"]
    assert (props["patch_size_pixels"]["minimum"], props["patch_size_pixels"]["maximum"]) == limits.PATCH_PX_RANGE
    assert (side["minimum"], side["maximum"]) == limits.PATCH_PX_RANGE
    assert (props["spacing_um_px"]["minimum"], props["spacing_um_px"]["maximum"]) == limits.SPACING_RANGE_UM
    assert limits.range_text(limits.PATCH_PX_RANGE, "px") in props["patch_size_pixels"]["description"]
    assert limits.range_text(limits.SPACING_RANGE_UM, "um/px") in props["spacing_um_px"]["description"]
    # Other tools can check a config.json with the schema file alone.
    jsonschema.Draft7Validator(schema).validate(json.loads(pcam_config().to_json()))
    jsonschema.Draft7Validator(schema).validate(WSINFER_ZOO_CONFIG)


def test_config_from_python_with_nan_names_the_field():
    with pytest.raises(ModelPackageError, match="finite") as info:
        pcam_config(extra={"metrics": {"auc": float("nan")}})
    assert info.value.field == "wsi_toolkit.metrics.auc"
    with pytest.raises(ModelPackageError, match="finite") as info:
        ModelConfig.from_dict(_zoo(spacing_um_px=float("nan")))
    assert info.value.field == "spacing_um_px"


def test_saved_package_has_an_export_program_with_the_torchscript_probabilities(tiny_package):
    path, model, _ = tiny_package
    assert (path / EXPORT_NAME).is_file()
    d = json.loads((path / CONFIG_NAME).read_text())["wsi_toolkit"]
    assert d["pt2_sha256"] == hashlib.sha256((path / EXPORT_NAME).read_bytes()).hexdigest()
    assert d["export"]["torch_export"] == EXPORT_NAME
    exported = load_model_package(path, prefer_export=True)
    scripted = load_model_package(path)  # on the CPU: the TorchScript (its fused graph is the faster one there)
    assert (exported.format, scripted.format) == ("torch.export", "torchscript")
    assert isinstance(scripted.model, torch.jit.ScriptModule) and not isinstance(exported.model, torch.jit.ScriptModule)
    assert exported.sha256 == scripted.sha256  # one identity: the TorchScript, which model.pt2 was checked against
    for n in (1, 7):  # the batch size is dynamic
        x = _patches(n, seed=n)
        assert torch.allclose(exported.predict_class_proba(x), scripted.predict_class_proba(x), atol=1e-5)
    assert exported.load_torchscript().code == scripted.model.code
    assert isinstance(scripted.export_program(), torch.export.ExportedProgram)


def test_exported_model_moves_and_evaluates_but_does_not_train(tiny_package):
    pkg = load_model_package(tiny_package[0], prefer_export=True)
    assert pkg.model.to("cpu").eval() is pkg.model and not pkg.model.training
    with pytest.raises(ModelPackageError, match="no training mode"):
        pkg.model.train()


def test_package_without_export_program_loads_torchscript(tiny_package, tmp_path):
    path, model, cfg = tiny_package
    (path / EXPORT_NAME).unlink()  # e.g. a WSInfer zoo package: torchscript_model.pt only
    pkg = load_model_package(path, prefer_export=True)
    assert pkg.format == "torchscript"
    plain = save_model_package(tmp_path / "plain", model, cfg, export=False)
    assert not (plain / EXPORT_NAME).exists()
    assert "pt2_sha256" not in json.loads((plain / CONFIG_NAME).read_text())["wsi_toolkit"]
    assert load_model_package(plain, prefer_export=True).format == "torchscript"


def test_corrupt_export_program_falls_back_to_torchscript(tiny_package, caplog):
    path, _, _ = tiny_package
    pt2 = path / EXPORT_NAME
    x = _patches(3)
    want = load_model_package(path, prefer_export=False).predict_proba(x)
    assert load_model_package(path, prefer_export=True).format == "torch.export"
    pt2.write_bytes(pt2.read_bytes()[:-100])  # damaged: its sha256 no longer matches
    with caplog.at_level("WARNING"):
        pkg = load_model_package(path, prefer_export=True)
    assert pkg.format == "torchscript" and "falling back" in caplog.text
    assert torch.allclose(pkg.predict_proba(x), want)
    assert pkg.export_program() is None
    # Damaged but recorded as it is: torch.export.load fails, the TorchScript is used.
    pt2.write_bytes(b"PK\x03\x04 not a program")
    d = json.loads((path / CONFIG_NAME).read_text())
    d["wsi_toolkit"]["pt2_sha256"] = hashlib.sha256(pt2.read_bytes()).hexdigest()
    (path / CONFIG_NAME).write_text(json.dumps(d))
    caplog.clear()
    with caplog.at_level("WARNING"):
        pkg = load_model_package(path, prefer_export=True)
    assert pkg.format == "torchscript" and "cannot be used" in caplog.text
    assert torch.allclose(pkg.predict_proba(x), want)


def test_export_program_only_with_its_own_torchscript(tiny_package, tmp_path):
    """A replaced torchscript_model.pt (loaded with verify_sha256=False) is what runs and what the
    sha256 names: the model.pt2 exported beside the old one is not used."""
    path, _, cfg = tiny_package
    net = TinyNet().eval()
    with torch.no_grad():
        net.head.bias += 1.0
    other = load_model_package(save_model_package(tmp_path / "other", net, cfg))
    assert load_model_package(path, prefer_export=True, verify_sha256=False).format == "torch.export"  # intact
    shutil.copy(other.path / TORCHSCRIPT_NAME, path / TORCHSCRIPT_NAME)
    pkg = load_model_package(path, prefer_export=True, verify_sha256=False)
    assert pkg.format == "torchscript" and pkg.sha256 == other.sha256
    x = _patches(3)
    assert torch.equal(pkg.predict_proba(x), other.predict_proba(x))


def test_model_that_cannot_be_exported_is_saved_as_torchscript_only(tmp_path, caplog):
    with caplog.at_level("WARNING"):
        path = save_model_package(tmp_path / "b", BranchyNet().eval(),
                                  pcam_config(architecture="branchy", input_size=96))
    assert not (path / EXPORT_NAME).exists() and "torch.export failed" in caplog.text
    assert json.loads((path / CONFIG_NAME).read_text())["wsi_toolkit"]["export"]["torch_export"] is None
    assert load_model_package(path, prefer_export=True).format == "torchscript"


def test_colour_rule_package_runs_from_its_export_program(colour_rule, texture):
    exported = load_model_package(colour_rule.path, prefer_export=True)
    assert (exported.format, colour_rule.format) == ("torch.export", "torchscript")
    x = torch.cat([_texture_patches(texture, "tumor", step=96), _texture_patches(texture, "normal", step=96)])
    assert torch.allclose(exported.predict_proba(x), colour_rule.predict_proba(x), atol=1e-5)
