"""Property-based fuzzing (Hypothesis) of every parser of user files and every user number (issue 11 §6).

The property, for ASAP XML, GeoJSON, detection CSV, model config.json, the TIFF structure check and
slide opening, the mpp / grid / threshold settings: the call returns a valid result or raises the
toolkit's own error (a :class:`WsiToolkitError` subclass naming the problem), never any other
exception, and it allocates a bounded amount of memory (tracemalloc peak, which sees numpy and
Python allocations; the C libraries' own are bounded by the subprocess tests of test_limits.py).

A few hundred examples per parser in the default run (profile ``wsi-default``, the whole file in
about a minute on two slow cores); ``-m slow`` runs each property again with ten times as many
(profile ``wsi-slow``). No example database is written (``database=None``), so runs are
reproducible from the seed Hypothesis prints on failure.
"""

from __future__ import annotations

import json
import math
import struct
import tracemalloc
from contextlib import contextmanager
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import tifffile
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_limits import write_raw_tiff

from wsi_toolkit import limits
from wsi_toolkit.errors import (
    AnnotationError,
    ConfigError,
    DetectionFileError,
    ModelPackageError,
    SlideFormatError,
    SlideReadError,
    WsiToolkitError,
)

_COMMON = dict(deadline=None, database=None, derandomize=False, print_blob=True,
               suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                      HealthCheck.data_too_large, HealthCheck.filter_too_much])
settings.register_profile("wsi-default", max_examples=200, **_COMMON)
settings.register_profile("wsi-slow", max_examples=2000, **_COMMON)
FAST = settings.get_profile("wsi-default")
SLOW = settings.get_profile("wsi-slow")

#: Peak of Python/numpy allocations allowed for parsing one small fuzzed input.
MEMORY_BOUND = 256 * 2**20


@contextmanager
def bounded_memory(limit: int = MEMORY_BOUND):
    tracemalloc.start()
    try:
        yield
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < limit, f"peak {peak / 2**20:.1f} MiB"


def fuzz(*strategies, examples: int | None = None):
    """Two tests of one property: the default run (``FAST``) and a ``slow`` one with 10x examples.
    The strategies bind to the last parameters of the property (Hypothesis' rule); pytest fixtures
    come first."""

    def deco(fn):
        fast_settings = settings(FAST, max_examples=examples) if examples else FAST
        slow_settings = settings(SLOW, max_examples=10 * examples) if examples else SLOW
        fast = fast_settings(given(*strategies)(fn))
        slow = pytest.mark.slow(slow_settings(given(*strategies)(fn)))
        return fast, slow

    return deco


def expect_clean(call, allowed: type[WsiToolkitError] | tuple = WsiToolkitError):
    """Run ``call``; a WsiToolkitError of ``allowed`` is fine (its message one line), anything else fails."""
    try:
        with bounded_memory():
            return call(), None
    except allowed as exc:
        assert isinstance(exc, WsiToolkitError)
        assert "\n" not in str(exc), str(exc)
        return None, exc


# --------------------------------------------------------------------------------------------
# Shared strategies
# --------------------------------------------------------------------------------------------

numbers_text = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.integers(min_value=-(10**30), max_value=10**30).map(str),
    st.sampled_from(["", " ", "1e308", "-1e308", "1e-320", "nan", "inf", "-inf", "Infinity", "NaN", "1,5",
                     "1.5.5", "0x10", "١٢", "1_000", "+5", "--5", "1e", "e5", ".", "9" * 400]),
    st.text(max_size=12),
)
coord_float = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.floats(min_value=-5000, max_value=5000),
    st.sampled_from([0.0, 1e308, -1e308, 2.0**24, 2.0**24 + 2, 1e300]),
)


def write(tmp_path: Path, name: str, data: bytes | str) -> Path:
    path = tmp_path / name
    path.write_bytes(data.encode("utf-8", "surrogatepass") if isinstance(data, str) else data)
    return path


@pytest.fixture(scope="module")
def fuzz_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz")


# --------------------------------------------------------------------------------------------
# ASAP XML
# --------------------------------------------------------------------------------------------


@st.composite
def asap_documents(draw):
    def attr(v: str) -> str:
        return v.replace("&", "&amp;").replace('"', "&quot;").replace("<", "&lt;")

    anns = []
    for _ in range(draw(st.integers(0, 4))):
        coords = "".join(
            f'<Coordinate Order="{attr(draw(numbers_text))}" X="{attr(draw(numbers_text))}" '
            f'Y="{attr(draw(numbers_text))}"/>' if draw(st.booleans()) else
            f'<Coordinate Order="{i}" X="{draw(coord_float)!r}" Y="{draw(coord_float)!r}"/>'
            for i in range(draw(st.integers(0, 7))))
        typ = draw(st.sampled_from(["Polygon", "Spline", "Rectangle", "Dot", "PointSet", "", "Weird"]))
        group = draw(st.sampled_from(["_0", "_1", "_2", "None", "Tumor", "", "x"]))
        anns.append(f'<Annotation Name="{attr(draw(st.text(max_size=5)))}" Type="{typ}" PartOfGroup="{group}">'
                    f"<Coordinates>{coords}</Coordinates></Annotation>")
    doc = f'<?xml version="1.0"?><ASAP_Annotations><Annotations>{"".join(anns)}</Annotations></ASAP_Annotations>'
    mutation = draw(st.sampled_from(["none", "none", "truncate", "byte", "root", "nest", "entity"]))
    data = doc.encode()
    if mutation == "truncate":
        data = data[: draw(st.integers(0, len(data)))]
    elif mutation == "byte":
        i = draw(st.integers(0, len(data) - 1))
        data = data[:i] + bytes([draw(st.integers(0, 255))]) + data[i + 1:]
    elif mutation == "root":
        data = data.replace(b"ASAP_Annotations", draw(st.sampled_from([b"svg", b"ASAP", b"a:b"])))
    elif mutation == "nest":
        n = draw(st.integers(1, 20_000))
        data = b"<ASAP_Annotations>" + b"<a>" * n + b"</a>" * n + b"</ASAP_Annotations>"
    elif mutation == "entity":
        data = (b'<?xml version="1.0"?><!DOCTYPE r [<!ENTITY a "aaaaaaaaaa"><!ENTITY b "&a;&a;&a;&a;&a;&a;&a;&a;">'
                b'<!ENTITY c "&b;&b;&b;&b;&b;&b;&b;&b;"><!ENTITY d "&c;&c;&c;&c;&c;&c;&c;&c;">]>'
                b'<ASAP_Annotations><Annotations><Annotation Name="&d;&d;&d;"/></Annotations></ASAP_Annotations>')
    size = draw(st.one_of(st.none(), st.tuples(st.integers(1, 10**5), st.integers(1, 10**5))))
    return data, size


def _check_annotations(got) -> None:
    """A parser's result, when it returned one: annotations with area, coordinates in range."""
    from wsi_toolkit.annotations import Annotation

    for ann in got or ():
        assert isinstance(ann, Annotation) and ann.polygon.area > 0
        assert np.all(np.abs(np.asarray(ann.polygon.bounds)) <= limits.MAX_COORD_L0)


def _asap(fuzz_dir, doc):
    from wsi_toolkit.annotations import read_asap_xml

    data, size = doc
    path = write(fuzz_dir, "a.xml", data)
    got, _ = expect_clean(lambda: read_asap_xml(path, l0_size=size), AnnotationError)
    _check_annotations(got)


test_fuzz_asap_xml, test_fuzz_asap_xml_slow = fuzz(asap_documents(), examples=300)(_asap)


# --------------------------------------------------------------------------------------------
# GeoJSON
# --------------------------------------------------------------------------------------------

json_leaf = st.one_of(st.none(), st.booleans(), st.integers(min_value=-(10**20), max_value=10**20),
                      st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=6))
json_any = st.recursive(json_leaf, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                           st.dictionaries(st.text(max_size=6), inner, max_size=4)),
                        max_leaves=20)
ring = st.lists(st.lists(coord_float, min_size=2, max_size=3), min_size=0, max_size=8)


@st.composite
def geometries(draw):
    kind = draw(st.sampled_from(["Polygon", "MultiPolygon", "Point", "LineString", "GeometryCollection", "Bogus"]))
    if kind == "Polygon":
        coords = draw(st.lists(ring, max_size=3))
        if coords and coords[0] and draw(st.booleans()):
            coords[0].append(coords[0][0])  # closed, as GeoJSON wants
        return {"type": kind, "coordinates": coords}
    if kind == "MultiPolygon":
        return {"type": kind, "coordinates": draw(st.lists(st.lists(ring, max_size=2), max_size=2))}
    if kind == "GeometryCollection":
        point = {"type": "Point", "coordinates": [1, 2]}
        return {"type": kind, "geometries": draw(st.lists(st.just(point), max_size=2))}
    return {"type": kind, "coordinates": draw(st.one_of(json_any, ring))}


@st.composite
def geojson_documents(draw):
    feature = st.builds(lambda g, p: {"type": "Feature", "geometry": g, "properties": p},
                        st.one_of(geometries(), json_any),
                        st.one_of(st.none(), json_any,
                                  st.fixed_dictionaries({"classification": st.one_of(
                                      st.just({"name": "Tumor"}), json_any)})))
    doc = draw(st.one_of(
        st.builds(lambda fs: {"type": "FeatureCollection", "features": fs}, st.lists(feature, max_size=4)),
        st.lists(st.one_of(feature, geometries()), max_size=4), feature, geometries(), json_any))
    text = json.dumps(doc, allow_nan=True)  # NaN / Infinity literals, as some writers produce
    mutation = draw(st.sampled_from(["none", "none", "truncate", "nest", "byte", "bigint"]))
    data = text.encode()
    if mutation == "truncate":
        data = data[: draw(st.integers(0, len(data)))]
    elif mutation == "nest":
        n = draw(st.integers(1, 200_000))
        data = b"[" * n + b"]" * draw(st.sampled_from([n, 0, n // 2]))
    elif mutation == "byte" and data:
        i = draw(st.integers(0, len(data) - 1))
        data = data[:i] + bytes([draw(st.integers(0, 255))]) + data[i + 1:]
    elif mutation == "bigint":
        data = b'{"type": "Polygon", "coordinates": [[[0, 0], [' + b"9" * 5000 + b', 0], [5, 5], [0, 0]]]}'
    size = draw(st.one_of(st.none(), st.tuples(st.integers(1, 10**5), st.integers(1, 10**5))))
    return data, size


def _geojson(fuzz_dir, doc):
    from wsi_toolkit.annotations import read_geojson

    data, size = doc
    path = write(fuzz_dir, "a.geojson", data)
    got, _ = expect_clean(lambda: read_geojson(path, l0_size=size), AnnotationError)
    _check_annotations(got)


test_fuzz_geojson, test_fuzz_geojson_slow = fuzz(geojson_documents(), examples=300)(_geojson)


# --------------------------------------------------------------------------------------------
# Detection CSV (wsi-eval)
# --------------------------------------------------------------------------------------------

csv_cell = st.one_of(numbers_text, st.sampled_from(["p", "prob", "x", "y", "score", '"0.5"', '"', "\x00"]))


@st.composite
def detection_csvs(draw):
    rows = draw(st.lists(st.lists(csv_cell, min_size=0, max_size=5), max_size=12))
    sep = draw(st.sampled_from(["\n", "\r\n", "\r"]))
    text = sep.join(",".join(r) for r in rows)
    if draw(st.booleans()):
        text = draw(st.sampled_from(["prob,x,y", "x,y,p", "p,x", "a,b,c", ""])) + sep + text
    data = text.encode("utf-8", "surrogatepass")
    if draw(st.booleans()) and data:
        i = draw(st.integers(0, len(data) - 1))
        data = data[:i] + bytes([draw(st.integers(0, 255))]) + data[i + 1:]
    return data


def _csv(fuzz_dir, data):
    from wsi_toolkit.evaluate import read_detections_csv

    path = write(fuzz_dir, "d.csv", data)
    got, _ = expect_clean(lambda: read_detections_csv(path), DetectionFileError)
    if got is not None:
        assert got.ndim == 2 and got.shape[1] == 3 and np.all(np.isfinite(got))
        assert np.all(got[:, 0] >= 0) and np.all(np.abs(got[:, 1:]) <= limits.MAX_COORD_L0)


test_fuzz_detection_csv, test_fuzz_detection_csv_slow = fuzz(detection_csvs(), examples=300)(_csv)


# --------------------------------------------------------------------------------------------
# Model config.json
# --------------------------------------------------------------------------------------------

ZOO = {
    "spec_version": "1.0", "architecture": "resnet34", "num_classes": 2, "class_names": ["notumor", "tumor"],
    "patch_size_pixels": 350, "spacing_um_px": 0.5,
    "transform": [{"name": "Resize", "arguments": {"size": 224}}, {"name": "ToTensor"},
                  {"name": "Normalize", "arguments": {"mean": [0.7, 0.5, 0.6], "std": [0.1, 0.1, 0.1]}}],
}
config_values = st.one_of(json_any, st.floats(allow_nan=True, allow_infinity=True),
                          st.integers(min_value=-(10**12), max_value=10**12),
                          st.sampled_from([1e-9, 1e9, 10**9, 0, -1, 7, 8, 4096, 4097, 0.05, 20, 20.01, True]))


@st.composite
def configs(draw):
    cfg = json.loads(json.dumps(ZOO))
    for key in draw(st.lists(st.sampled_from([*ZOO, "wsi_toolkit", "extra_key"]), max_size=4, unique=True)):
        if draw(st.booleans()) and key in cfg:
            del cfg[key]
        else:
            cfg[key] = draw(config_values)
    if draw(st.booleans()):
        step = draw(st.integers(0, 2))
        if isinstance(cfg.get("transform"), list) and step < len(cfg["transform"]):
            cfg["transform"][step] = draw(st.one_of(json_any, st.fixed_dictionaries(
                {"name": st.sampled_from(["Resize", "ToTensor", "Normalize", "Crop"]),
                 "arguments": st.one_of(json_any, st.fixed_dictionaries({"size": config_values}))})))
    text = json.dumps(cfg, allow_nan=True)
    mutation = draw(st.sampled_from(["none", "none", "truncate", "nest", "byte"]))
    data = text.encode()
    if mutation == "truncate":
        data = data[: draw(st.integers(0, len(data)))]
    elif mutation == "nest":
        n = draw(st.integers(1, 100_000))
        data = b"{\"a\": " * n + b"1" + b"}" * n
    elif mutation == "byte":
        i = draw(st.integers(0, len(data) - 1))
        data = data[:i] + bytes([draw(st.integers(0, 255))]) + data[i + 1:]
    return data


def _config(fuzz_dir, data):
    from wsi_toolkit.model_package import ModelConfig, read_config_json

    path = write(fuzz_dir, "config.json", data)

    def parse():
        return ModelConfig.from_dict(read_config_json(path), source=path)

    cfg, _ = expect_clean(parse, ModelPackageError)
    if cfg is not None:
        assert limits.PATCH_PX_RANGE[0] <= cfg.patch_size_pixels <= limits.PATCH_PX_RANGE[1]
        assert limits.SPACING_RANGE_UM[0] <= cfg.spacing_um_px <= limits.SPACING_RANGE_UM[1]
        assert limits.PATCH_PX_RANGE[0] <= cfg.input_size <= limits.PATCH_PX_RANGE[1]
        json.loads(cfg.to_json())  # writes back as strict JSON


test_fuzz_model_config, test_fuzz_model_config_slow = fuzz(configs(), examples=300)(_config)


# --------------------------------------------------------------------------------------------
# TIFF structure check and slide opening (tifffile backend: OpenSlide is a C library whose own
# parser is not ours to fuzz in-process)
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def seed_tiffs(tmp_path_factory):
    """Small valid slides the mutations start from: a 2-level pyramid written by tifffile and a
    hand-written one-level TIFF."""
    root = tmp_path_factory.mktemp("seed_tiffs")
    img = np.full((512, 640, 3), 235, np.uint8)
    img[100:300, 200:500] = (170, 70, 150)
    pyr = root / "pyr.tif"
    with tifffile.TiffWriter(pyr) as tw:
        tw.write(img, tile=(256, 256), compression="zlib", photometric="rgb", subifds=1,
                 resolution=(1e4 / 0.5, 1e4 / 0.5), resolutionunit="CENTIMETER", metadata=None)
        tw.write(img[::2, ::2], tile=(256, 256), compression="zlib", photometric="rgb", subfiletype=1,
                 metadata=None)
    raw = write_raw_tiff(root / "raw.tif", 300, 200, tile=(128, 128), mpp=0.5)
    return {"pyr": pyr.read_bytes(), "raw": raw.read_bytes()}


@st.composite
def tiff_bytes(draw, seeds):
    kind = draw(st.sampled_from(["pyr", "raw", "header"]))
    if kind == "header":  # any header: sizes, tiles, strips, resolution
        w = draw(st.one_of(st.integers(1, 5000), st.sampled_from([10**6, 2**22 + 1, 2**32 - 1])))
        h = draw(st.one_of(st.integers(1, 5000), st.sampled_from([10**6, 2**22 + 1, 2**32 - 1])))
        tile = draw(st.one_of(st.none(), st.tuples(st.sampled_from([16, 256, 1024, 65536]),
                                                  st.sampled_from([16, 256, 1024, 65536]))))
        if tile is not None and math.ceil(w / tile[0]) * math.ceil(h / tile[1]) > 200_000:
            tile = None
        rps = draw(st.one_of(st.none(), st.integers(1, 10**6)))
        if tile is None and rps is not None and math.ceil(h / rps) > 200_000:
            rps = None
        mpp = draw(st.one_of(st.none(), st.sampled_from([1e-4, 0.05, 0.25, 20.0, 400.0])))
        return ("header", (w, h, tile, rps, mpp))
    data = bytearray(seeds[kind])
    for _ in range(draw(st.integers(0, 6))):
        op = draw(st.sampled_from(["byte", "u16", "u32", "truncate"]))
        if op == "truncate":
            data = data[: draw(st.integers(0, len(data)))]
            continue
        if len(data) < 16:
            continue
        # Mostly the directory (first ~1 KB and the last one), where the structure lives.
        i = draw(st.one_of(st.integers(0, min(len(data), 1024) - 4), st.integers(0, len(data) - 4)))
        if op == "byte":
            data[i] = draw(st.integers(0, 255))
        elif op == "u16":
            data[i:i + 2] = struct.pack("<H", draw(st.sampled_from([0, 1, 2, 3, 7, 255, 0xFFFF])))
        else:
            data[i:i + 4] = struct.pack("<I", draw(st.sampled_from([0, 1, 8, 2**16, 2**31, 2**32 - 1])))
    return ("bytes", bytes(data))


def _tiff(spec, fuzz_dir):
    from wsi_toolkit.slide import open_slide
    from wsi_toolkit.slide._metadata import check_tiff_integrity

    kind, value = spec
    path = fuzz_dir / "s.tif"
    if kind == "header":
        w, h, tile, rps, mpp = value
        write_raw_tiff(path, w, h, tile=tile, mpp=mpp, rows_per_strip=rps)
    else:
        path.write_bytes(value)
    if path.stat().st_size == 0:
        return
    expect_clean(lambda: check_tiff_integrity(path), SlideReadError)

    def open_and_read():
        with open_slide(path, backend="tifffile", mpp=None if kind == "header" else 0.5) as slide:
            w0, h0 = slide.dimensions
            slide.read_region((0, 0), 0, (64, 64))
            slide.read_region((w0 - 8, h0 - 8), slide.level_count - 1, (16, 16))
            if w0 * h0 <= 4096 * 4096:
                slide.thumbnail(mpp=8.0)

    expect_clean(open_and_read)


def test_fuzz_tiff_structure(seed_tiffs, fuzz_dir):
    given(tiff_bytes(seed_tiffs))(settings(FAST, max_examples=250)(lambda spec: _tiff(spec, fuzz_dir)))()


@pytest.mark.slow
def test_fuzz_tiff_structure_slow(seed_tiffs, fuzz_dir):
    given(tiff_bytes(seed_tiffs))(settings(SLOW, max_examples=2500)(lambda spec: _tiff(spec, fuzz_dir)))()


# --------------------------------------------------------------------------------------------
# mpp / grid (patch, stride, spacing, min tissue) / threshold validation
# --------------------------------------------------------------------------------------------

any_number = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True), st.integers(min_value=-(10**30), max_value=10**30),
    st.sampled_from([0.05, 20.0, 0.049999, 20.000001, 8, 4096, 1, 0.5, True, False, None, "0.25", np.float32(0.25),
                     np.int64(96), np.nan]),
)


def _open_mpp(pattern_slide, mpp):
    from wsi_toolkit.slide import open_slide

    def call():
        with open_slide(pattern_slide, mpp=mpp, backend="tifffile") as slide:
            return slide.mpp

    got, _ = expect_clean(call, (ConfigError, SlideFormatError))
    if got is not None:
        assert limits.MPP_RANGE_UM[0] <= got <= limits.MPP_RANGE_UM[1]


@pytest.fixture(scope="module")
def pattern_slide(tmp_path_factory):
    path = tmp_path_factory.mktemp("pattern") / "p.tif"
    img = np.full((512, 512, 3), 235, np.uint8)
    img[100:400, 100:400] = (170, 70, 150)
    tifffile.imwrite(path, img, tile=(256, 256), photometric="rgb", compression="zlib",
                     resolution=(1e4 / 0.25, 1e4 / 0.25), resolutionunit="CENTIMETER", metadata=None)
    return path


test_fuzz_mpp_override, test_fuzz_mpp_override_slow = fuzz(any_number, examples=200)(_open_mpp)


def _grid(patch, stride, spacing, min_tissue, l0_mpp, size):
    from wsi_toolkit import tiling
    from wsi_toolkit.tiling import GridConfig, make_grid

    def call():
        cfg = GridConfig(patch_px=patch, stride_px=stride, spacing_um_px=spacing, min_tissue_fraction=min_tissue)
        mask = np.zeros((64, 64), bool)
        mask[10:50, 10:50] = True
        k = max(size) / 64
        return make_grid(l0_size=size, l0_mpp=l0_mpp, config=cfg, tissue_mask=mask, mask_l0_per_px=k)

    with mock.patch.object(tiling, "MAX_GRID_CELLS", 2**20):  # the cap's logic, at a test-sized bound
        grid, err = expect_clean(call, ConfigError)
    if grid is not None:
        assert len(grid) > 0 and grid.shape_rc[0] * grid.shape_rc[1] <= 2**20


test_fuzz_grid_settings, test_fuzz_grid_settings_slow = fuzz(
    any_number, any_number, any_number, any_number, any_number,
    st.tuples(st.integers(1, 20_000), st.integers(1, 20_000)), examples=300)(_grid)


def _thresholds(min_prob, nms, mpp, threshold):
    from wsi_toolkit.evaluate import EvalConfig
    from wsi_toolkit.pipeline import RunConfig

    cfg, _ = expect_clean(lambda: EvalConfig(min_prob=min_prob, nms_radius_um=nms, mpp=mpp), ConfigError)
    if cfg is not None:
        assert 0 < cfg.min_prob <= 1 and cfg.nms_radius_um >= 0
    run, _ = expect_clean(lambda: RunConfig(threshold=threshold), ConfigError)
    if run is not None:
        assert 0 <= run.threshold <= 1


test_fuzz_thresholds, test_fuzz_thresholds_slow = fuzz(any_number, any_number, any_number, any_number,
                                                       examples=200)(_thresholds)
