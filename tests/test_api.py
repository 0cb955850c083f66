"""The public API: the example in docs/api.md runs as written, and the package exports what it says."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

import wsi_toolkit

DOCS = Path(__file__).resolve().parents[1] / "docs"


def _example() -> str:
    blocks = re.findall(r"```python\n(.*?)```", (DOCS / "api.md").read_text(encoding="utf-8"), flags=re.S)
    assert blocks, "docs/api.md has no python example"
    return blocks[0]


def test_api_doc_example_runs(tmp_path):
    script = tmp_path / "example.py"
    script.write_text(_example(), encoding="utf-8")
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "inside the drawn tumour: True" in out
    assert "'run.json'" in out and "'heatmap.tif'" in out and "'tumor.geojson'" in out
    n_regions = int(re.search(r"regions: (\d+)", out).group(1))
    assert n_regions >= 1


def test_public_names_resolve_and_import_is_light():
    for name in wsi_toolkit.__all__:
        assert getattr(wsi_toolkit, name) is not None, name
    with pytest.raises(AttributeError):
        wsi_toolkit.no_such_name  # noqa: B018
    code = "import sys, wsi_toolkit; assert 'torch' not in sys.modules, 'import wsi_toolkit imported torch'"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_version_is_the_installed_distributions():
    from importlib.metadata import version

    assert wsi_toolkit.__version__ == version("wsi-toolkit")


def test_heatmap_tiff_round_trip_and_refusal(tmp_path):
    import numpy as np
    import tifffile

    from wsi_toolkit.errors import SlideFormatError

    rng = np.random.default_rng(0)
    prob = rng.random((300, 420)).astype(np.float32)
    predicted = prob > 0.2
    prob[~predicted] = 0
    hm = wsi_toolkit.Heatmap(prob=prob, predicted=predicted, cell_l0=128.0, l0_mpp=0.243, merge="centre")
    wsi_toolkit.write_heatmap_tiff(tmp_path / "h.tif", hm)
    back = wsi_toolkit.read_heatmap_tiff(tmp_path / "h.tif")
    assert back.shape_rc == hm.shape_rc and back.cell_l0 == 128.0 and back.l0_mpp == 0.243
    assert np.abs(back.prob - hm.prob).max() <= 0.5 / 255 + 1e-7
    assert np.array_equal(back.predicted, np.rint(prob * 255) > 0)
    tifffile.imwrite(tmp_path / "plain.tif", np.zeros((8, 8), np.uint8))
    with pytest.raises(SlideFormatError, match=r"plain\.tif: not a wsi-toolkit heatmap TIFF"):
        wsi_toolkit.read_heatmap_tiff(tmp_path / "plain.tif")
    (tmp_path / "junk.tif").write_bytes(b"not a tiff")
    with pytest.raises(SlideFormatError, match=r"junk\.tif: cannot be read as a heatmap TIFF"):
        wsi_toolkit.read_heatmap_tiff(tmp_path / "junk.tif")
