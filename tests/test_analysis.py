"""analyse_slide given an open SlideReader: the reader's mpp override is the analysis's (issue 30)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from wsi_toolkit.analysis import RunConfig, analyse_slide, output_key, write_outputs
from wsi_toolkit.errors import ConfigError, MissingMppError
from wsi_toolkit.inference import InferenceConfig
from wsi_toolkit.slide import open_slide

#: torch on the CPU: no OpenVINO conversion, the same numbers on every machine.
_INF = InferenceConfig(device="cpu", runtime="torch", progress=False, workers=0)


def _settings(**kw) -> RunConfig:
    return RunConfig(inference=_INF, **kw)


def test_reader_override_on_a_slide_without_metadata(synthetic_slides, model_dir, tmp_path):
    slide = synthetic_slides(mpp=0.243, flavour="tiff-nores")
    with pytest.raises(MissingMppError):
        analyse_slide(slide.path, model_dir, _settings())  # the file alone has no mpp
    with open_slide(slide.path, mpp=0.243) as reader:
        analysis = analyse_slide(reader, model_dir, _settings())
    assert analysis.slide_info.mpp == pytest.approx(0.243)
    assert analysis.slide_info.mpp_source == "override"
    assert analysis.settings.mpp_override == pytest.approx(0.243)
    assert len(analysis.grid) > 0 and analysis.heatmap.predicted.any()
    record = write_outputs(analysis, tmp_path / "out")
    run = json.loads((tmp_path / "out" / "run.json").read_text(encoding="utf-8"))
    assert run["slide"]["mpp"] == pytest.approx(0.243) and run["slide"]["mpp_source"] == "override"
    assert run["output_key"]["mpp_override"] == pytest.approx(0.243) == record.output_key["mpp_override"]


def test_reader_override_wins_over_the_metadata(synthetic_slides, model_dir):
    slide = synthetic_slides(mpp=0.243)  # metadata: 0.243 um/px
    override = 0.3
    with open_slide(slide.path, mpp=override) as reader:
        analysis = analyse_slide(reader, model_dir, _settings())
    # the same analysis as the path with the override in the settings (what wsi-infer --mpp runs)
    reference = analyse_slide(slide.path, model_dir, _settings(mpp_override=override))
    assert analysis.grid.l0_mpp == pytest.approx(override)
    assert analysis.heatmap.l0_mpp == pytest.approx(override)
    assert analysis.heatmap.mpp == pytest.approx(analysis.heatmap.cell_l0 * override)
    assert analysis.slide_info.mpp == pytest.approx(override)
    assert analysis.slide_info.mpp_metadata == pytest.approx([0.243, 0.243])
    assert analysis.heatmap.shape_rc == reference.heatmap.shape_rc
    np.testing.assert_array_equal(analysis.heatmap.predicted, reference.heatmap.predicted)
    np.testing.assert_allclose(analysis.p_tumor, reference.p_tumor, atol=1e-6)
    assert output_key(slide.path, analysis.package, analysis.settings)["mpp_override"] == pytest.approx(override)


def test_reader_override_conflicting_with_settings_is_refused(synthetic_slides, model_dir):
    slide = synthetic_slides(mpp=0.243)
    with open_slide(slide.path, mpp=0.25) as reader, pytest.raises(ConfigError) as err:
        analyse_slide(reader, model_dir, _settings(mpp_override=0.3))
    assert "0.25" in str(err.value) and "0.3" in str(err.value)


def test_reader_without_override_keeps_the_settings_override(synthetic_slides, model_dir):
    slide = synthetic_slides(mpp=0.243)
    with open_slide(slide.path) as reader:  # metadata mpp; the settings' override still wins, as for a path
        analysis = analyse_slide(reader, model_dir, _settings(mpp_override=0.3))
    assert analysis.heatmap.l0_mpp == pytest.approx(0.3) and analysis.slide_info.mpp_source == "override"
