"""The compiled OpenVINO model kept between the slides of a batch belongs to the package's content, never to
a Python object's identity (issue 30)."""

from __future__ import annotations

import gc
import json
import shutil

import pytest

pytest.importorskip("openvino", reason="OpenVINO is not installed (pip install 'wsi-toolkit[openvino]')")

from wsi_toolkit.model_package import load_model_package  # noqa: E402
from wsi_toolkit.runtime import select  # noqa: E402
from wsi_toolkit.runtime.select import select_runtime  # noqa: E402


@pytest.fixture(autouse=True)
def _empty_memo():
    select._LOADED.clear()
    yield
    select._LOADED.clear()


def _other_preprocessing(model_dir, dest):
    """The same weights (same sha256) with another Normalize in config.json: another compiled graph."""
    shutil.copytree(model_dir, dest)
    cfg = json.loads((dest / "config.json").read_text(encoding="utf-8"))
    for step in cfg["transform"]:
        if step["name"] == "Normalize":
            step["arguments"]["mean"] = [0.25, 0.25, 0.25]
    (dest / "config.json").write_text(json.dumps(cfg), encoding="utf-8")
    return dest


def test_the_same_package_loaded_again_reuses_the_compiled_model(model_dir, tmp_path):
    # analyse_slide(slide, "model/") loads the package per slide: the batch's compiled model serves it
    first = select_runtime(load_model_package(model_dir), runtime="openvino", cache_dir=tmp_path)
    gc.collect()
    again = select_runtime(load_model_package(model_dir), runtime="openvino", cache_dir=tmp_path)
    assert first.model is not None and again.model is first.model and again.stats["cache"] == "memory"


def test_another_config_with_the_same_weights_gets_its_own_model(model_dir, tmp_path):
    a = load_model_package(model_dir)
    b = load_model_package(_other_preprocessing(model_dir, tmp_path / "b"))
    assert a.sha256 == b.sha256
    first = select_runtime(a, runtime="openvino", cache_dir=tmp_path / "cache")
    second = select_runtime(b, runtime="openvino", cache_dir=tmp_path / "cache")
    assert second.stats["cache"] != "memory" and second.model is not first.model
    assert second.model.package is b


def test_a_package_whose_id_an_old_one_had_gets_its_own_model(model_dir, tmp_path, monkeypatch):
    # id() of a collected package can be reused by the next one: make every package share one id
    monkeypatch.setattr(select, "id", lambda obj: 1, raising=False)
    a = load_model_package(model_dir)
    select_runtime(a, runtime="openvino", cache_dir=tmp_path / "cache")
    del a
    gc.collect()
    b = load_model_package(_other_preprocessing(model_dir, tmp_path / "b"))
    got = select_runtime(b, runtime="openvino", cache_dir=tmp_path / "cache")
    assert got.stats["cache"] != "memory" and got.model.package is b
