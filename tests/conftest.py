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
