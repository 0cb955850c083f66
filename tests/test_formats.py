"""Layouts real archives hold that the first synthetic slides did not: Aperio SVS with JPEG 2000
tiles (compression 33003, YCbCr in the codestream) and an SVS with no mpp anywhere. Both are made
here as SYNTHETIC slides with tifffile + imagecodecs (see ``wsi_toolkit.synthetic``)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tifffile

from wsi_toolkit.errors import MissingMppError
from wsi_toolkit.slide import open_slide
from wsi_toolkit.synthetic import APERIO_JP2K_YCBCR, make_spec, write_synthetic_slide


@pytest.fixture(scope="module")
def svs_pair(tmp_path_factory):
    """The same small SYNTHETIC specimen as a JPEG SVS and as a JPEG 2000 SVS, 0.499 um/px."""
    root = tmp_path_factory.mktemp("formats")
    spec = make_spec(tissue_mm2=0.3, n_tumors=1, faint=False, pen=False, seed=5)
    jpeg = write_synthetic_slide(root / "jpeg.svs", spec, mpp=0.499, flavour="svs", tile=256, quality=95)
    j2k = write_synthetic_slide(root / "j2k.svs", spec, mpp=0.499, flavour="svs-j2k", tile=256, quality=95)
    nompp = write_synthetic_slide(root / "nompp.svs", spec, mpp=0.499, flavour="svs-nompp", tile=256)
    return jpeg, j2k, nompp


def _tissue_xy(s, n=6):
    """Top-left corners of ``n`` patches lying wholly inside the specimen's tissue."""
    import shapely

    minx, miny, maxx, maxy = s.tissue_l0.bounds
    side = 96 * 0.972 / s.mpp
    xy = [(x, y) for y in np.linspace(miny, maxy - side, 12) for x in np.linspace(minx, maxx - side, 12)
          if s.tissue_l0.contains(shapely.box(x, y, x + side, y + side))]
    assert len(xy) >= n
    return xy[:: max(1, len(xy) // n)][:n]


def test_jpeg2000_svs_is_what_aperio_writes(svs_pair):
    _, j2k, _ = svs_pair
    with tifffile.TiffFile(j2k.path) as tif:
        levels = [p for p in tif.pages if p.is_tiled]
        assert levels and all(p.compression == APERIO_JP2K_YCBCR for p in levels)
        assert tif.pages[0].description.startswith("Aperio Image Library") and "J2K" in tif.pages[0].description


@pytest.mark.parametrize("backend", ["openslide", "tifffile"])
def test_jpeg2000_svs_reads_the_same_tissue_as_the_jpeg_svs(svs_pair, backend):
    """Same specimen, two codecs: the patches agree to within compression noise on either
    backend. (tifffile hands back Aperio's YCbCr samples unconverted: without the conversion the
    tifffile backend's colours were off by ~100 grey levels.)"""
    jpeg, j2k, _ = svs_pair
    with open_slide(jpeg.path, backend=backend) as a, open_slide(j2k.path, backend=backend) as b:
        assert b.vendor == "aperio" and b.mpp == pytest.approx(0.499) and len(b.levels) == len(a.levels)
        for xy in _tissue_xy(j2k):
            pa = a.read_at_mpp(xy, (96, 96), 0.972).astype(float)
            pb = b.read_at_mpp(xy, (96, 96), 0.972).astype(float)
            assert pa.std() > 5
            assert np.abs(pa - pb).mean() < 4, (backend, xy, np.abs(pa - pb).mean())


def test_jpeg2000_svs_same_pixels_through_both_backends(svs_pair):
    _, j2k, _ = svs_pair
    with open_slide(j2k.path, backend="openslide") as a, open_slide(j2k.path, backend="tifffile") as b:
        for level in range(len(a.levels)):
            w, h = a.levels[level].size
            box = (min(512, w), min(512, h))
            ra = a.read_region((0, 0), level, box).astype(int)
            rb = b.read_region((0, 0), level, box).astype(int)
            assert np.abs(ra - rb).max() <= 2, level  # YCbCr -> RGB rounding only


def test_svs_without_mpp_asks_for_mpp_and_runs_with_it(svs_pair, tmp_path, capsys):
    from wsi_toolkit.cli.infer import main as infer_main
    from wsi_toolkit.cli.inspect import main as inspect_main
    from wsi_toolkit.synthetic_model import make_colour_rule_package

    _, _, nompp = svs_pair
    with pytest.raises(MissingMppError, match="--mpp"):
        open_slide(nompp.path)
    assert inspect_main([str(nompp.path)]) == 1
    said = capsys.readouterr()
    assert "--mpp" in said.out + said.err
    model = make_colour_rule_package(tmp_path / "model", input_size=96).path
    assert infer_main([str(nompp.path), "--model", str(model), "--out", str(tmp_path / "no"), "--no-progress"]) == 1
    assert infer_main([str(nompp.path), "--model", str(model), "--out", str(tmp_path / "out"), "--mpp", "0.499",
                       "--no-progress"]) == 0
    run = json.loads((tmp_path / "out" / nompp.path.stem / "run.json").read_text())
    assert "override" in json.dumps(run)
