"""Issue 11 (reliability) §2 and §5: bounded memory and one-line errors for inputs out of physical sense.

Every case runs the real CLI in a subprocess and measures its peak RSS with ``resource.getrusage``
(the process itself and its reader workers): it must stay under 2 GB, and every bad input must end
in one line naming the problem and a non-zero exit, never a traceback.

The slides are made cheap: one compressed 1024 px tile written (or pointed at) thousands of times,
so a 24000 x 24000 px single-level TIFF (2.3 GB as an RGBA level read whole, what OpenSlide's
``read_region`` of the level would take) is 2-4 MB on disk, and a header claiming 10^6 x 10^6 px
is a few hundred bytes.
"""

from __future__ import annotations

import json
import math
import os
import struct
import subprocess
import sys
import textwrap
import zlib
from pathlib import Path

import numpy as np
import pytest
import tifffile

RSS_LIMIT_KB = 2 * 1024 * 1024  # 2 GiB, as getrusage reports it on Linux (KiB)
SAFETY_AS_BYTES = 16 * 2**30   # address-space cap of the child: a regression fails instead of swapping the VM

# --------------------------------------------------------------------------------------------
# Cheap big slides
# --------------------------------------------------------------------------------------------


def _tile(tissue: bool, size: int = 1024) -> np.ndarray:
    tile = np.full((size, size, 3), 240, np.uint8)  # glass
    if tissue:
        tile[size // 5 : 4 * size // 5, size // 5 : 4 * size // 5] = (180, 80, 160)  # H&E-ish pink-purple
    return tile


def write_repeated_tile_tiff(path: Path, side: int, *, tissue: bool, mpp: float = 0.25) -> Path:
    """A ``side`` x ``side`` px single-level (no pyramid) tiled zlib TIFF of one repeated 1024 px
    tile, written pre-compressed: a few MB and a fraction of a second."""
    enc = zlib.compress(_tile(tissue).tobytes(), 9)
    n = math.ceil(side / 1024) ** 2
    tifffile.imwrite(path, (enc for _ in range(n)), shape=(side, side, 3), dtype=np.uint8, tile=(1024, 1024),
                     compression="zlib", photometric="rgb", resolution=(1e4 / mpp, 1e4 / mpp),
                     resolutionunit="CENTIMETER", metadata=None)
    return path


def write_raw_tiff(path: Path, width: int, height: int, *, tile: tuple[int, int] | None = None,
                   mpp: float | None = 0.25, rows_per_strip: int | None = None) -> Path:
    """A classic little-endian RGB zlib TIFF written byte by byte, whose every tile (or strip) points
    at one small compressed block: any header (10^6 x 10^6 px, one strip of a whole slide) in a file
    of at most a few MB. The block decodes to less than the header claims: a reader that gets as far
    as decoding sees a damaged tile."""
    block = zlib.compress(np.full((16, 16, 3), 230, np.uint8).tobytes(), 9)
    if tile:
        n = math.ceil(width / tile[0]) * math.ceil(height / tile[1])
    else:
        rows_per_strip = rows_per_strip or height
        n = math.ceil(height / rows_per_strip)
    entries: list[tuple[int, int, int, bytes]] = [
        (256, 4, 1, struct.pack("<I", width)),
        (257, 4, 1, struct.pack("<I", height)),
        (258, 3, 3, struct.pack("<3H", 8, 8, 8)),
        (259, 3, 1, struct.pack("<H", 8)),        # zlib (Adobe deflate)
        (262, 3, 1, struct.pack("<H", 2)),        # RGB
        (277, 3, 1, struct.pack("<H", 3)),
        (284, 3, 1, struct.pack("<H", 1)),
    ]
    if mpp is not None:
        res = struct.pack("<2I", round(1e4 / mpp), 1)
        entries += [(282, 5, 1, res), (283, 5, 1, res), (296, 3, 1, struct.pack("<H", 3))]  # px per cm
    if tile:
        entries += [(322, 4, 1, struct.pack("<I", tile[0])), (323, 4, 1, struct.pack("<I", tile[1]))]
        offsets_tag, counts_tag = 324, 325
    else:
        entries += [(278, 4, 1, struct.pack("<I", rows_per_strip))]
        offsets_tag, counts_tag = 273, 279
    entries.sort()
    n_entries = len(entries) + 2
    ifd_size = 2 + 12 * n_entries + 4
    blob_offset = 8 + ifd_size
    entries += [(offsets_tag, 4, n, struct.pack(f"<{n}I", *([blob_offset] * n))),
                (counts_tag, 4, n, struct.pack(f"<{n}I", *([len(block)] * n)))]
    entries.sort()
    ifd, tail = bytearray(struct.pack("<H", n_entries)), bytearray()
    tail_start = blob_offset + len(block)
    for tag, typ, count, value in entries:
        if len(value) <= 4:
            ifd += struct.pack("<HHI", tag, typ, count) + value.ljust(4, b"\0")
        else:
            ifd += struct.pack("<HHII", tag, typ, count, tail_start + len(tail))
            tail += value + (b"\0" if len(value) % 2 else b"")
    ifd += struct.pack("<I", 0)
    path.write_bytes(b"II*\0" + struct.pack("<I", 8) + bytes(ifd) + block + bytes(tail))
    return path


# --------------------------------------------------------------------------------------------
# Running a CLI with its memory measured
# --------------------------------------------------------------------------------------------

_RUNNER = textwrap.dedent("""
    import importlib, resource, sys
    limit = int(sys.argv[1])
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    module = importlib.import_module(sys.argv[2])
    try:
        rc = module.main(sys.argv[3:])
    finally:
        # This process's own high-water mark (VmHWM): ru_maxrss of RUSAGE_SELF keeps the forking
        # parent's peak across fork + exec (Linux), i.e. a pytest process that trained a model before.
        own = None
        try:
            with open("/proc/self/status") as f:
                own = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
        except (OSError, StopIteration, ValueError):
            own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        peak = max(own, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
        sys.stderr.write(f"\\nPEAK_RSS_KB {peak}\\n")
    sys.exit(rc)
""")


class Run:
    def __init__(self, proc: subprocess.CompletedProcess):
        self.rc = proc.returncode
        err, _, peak = proc.stderr.rpartition("PEAK_RSS_KB ")
        self.peak_kb = int(peak.strip()) if peak.strip().isdigit() else None
        self.out, self.err = proc.stdout, err.strip()
        self.text = self.out + "\n" + self.err

    def lines_with(self, needle: str) -> list[str]:
        return [line for line in self.text.splitlines() if needle in line]


def run_cli(module: str, *argv: str, cwd: Path) -> Run:
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", _RUNNER, str(SAFETY_AS_BYTES), module, *map(str, argv)],
                          capture_output=True, text=True, cwd=cwd, env=env, timeout=600)
    return Run(proc)


def assert_bounded(run: Run) -> None:
    assert run.peak_kb is not None, run.text
    assert run.peak_kb < RSS_LIMIT_KB, f"peak RSS {run.peak_kb / 2**20:.2f} GiB\n{run.text}"
    assert "Traceback" not in run.text, run.text
    assert "MemoryError" not in run.text, run.text


def assert_one_line_error(run: Run, *needles: str, rc: int | tuple[int, ...] = (1, 2)) -> str:
    """A non-zero exit, no traceback, and one line holding every ``needle`` (the error message)."""
    assert run.rc in ((rc,) if isinstance(rc, int) else rc), f"exit {run.rc}\n{run.text}"
    assert_bounded(run)
    lines = [line for line in run.text.splitlines() if all(n in line for n in needles)]
    assert lines, f"no line with {needles}\n{run.text}"
    return lines[0]


def model_with(tmp_path: Path, model_dir: Path, **changes) -> Path:
    """A copy of the model package with config.json fields changed."""
    dst = tmp_path / "model_changed"
    dst.mkdir()
    cfg = json.loads((model_dir / "config.json").read_text())
    cfg.update(changes)
    (dst / "config.json").write_text(json.dumps(cfg))
    (dst / "torchscript_model.pt").write_bytes((model_dir / "torchscript_model.pt").read_bytes())
    return dst


# --------------------------------------------------------------------------------------------
# Class 1: a big slide without a pyramid (the thumbnail used to decode the whole level)
# --------------------------------------------------------------------------------------------

BIG_SIDE = 24_000  # 576 Mpx: 1.6 GiB as RGB, 2.1 GiB as OpenSlide's RGBA, if read whole


@pytest.fixture(scope="module")
def big_slides(tmp_path_factory):
    root = tmp_path_factory.mktemp("big")
    return {"tissue": write_repeated_tile_tiff(root / "big_tissue.tif", BIG_SIDE, tissue=True),
            "glass": write_repeated_tile_tiff(root / "big_glass.tif", BIG_SIDE, tissue=False)}


@pytest.mark.parametrize("backend", ["openslide", "tifffile"])
def test_inspect_of_a_big_slide_without_pyramid_is_bounded(big_slides, tmp_path, backend):
    run = run_cli("wsi_toolkit.cli.inspect", big_slides["tissue"], "--backend", backend, "--json", cwd=tmp_path)
    assert run.rc == 0, run.text
    assert_bounded(run)
    (report,) = json.loads(run.out)
    assert report["ok"] and report["level_count"] == 1 and report["backend"] == backend
    # 36% of the 6 x 6 mm slide is the pink square of each tile.
    assert report["tissue_mm2"] == pytest.approx(0.36 * (BIG_SIDE * 0.25 / 1000) ** 2, rel=0.1)


def test_infer_of_a_big_slide_without_pyramid_is_bounded(big_slides, model_dir, tmp_path):
    run = run_cli("wsi_toolkit.cli.infer", big_slides["glass"], "--model", model_dir, "--out", tmp_path / "out",
                  "--backend", "tifffile", "--workers", "0", "--no-progress", cwd=tmp_path)
    assert run.rc == 0, run.text
    assert_bounded(run)


@pytest.mark.slow
@pytest.mark.parametrize("cli", ["inspect", "infer"])
def test_the_60000_px_slide_of_the_issue_is_bounded(tmp_path, model_dir, cli):
    slide = write_repeated_tile_tiff(tmp_path / "huge_flat.tif", 60_000, tissue=cli == "inspect")
    if cli == "inspect":
        run = run_cli("wsi_toolkit.cli.inspect", slide, cwd=tmp_path)
    else:
        run = run_cli("wsi_toolkit.cli.infer", slide, "--model", model_dir, "--out", tmp_path / "out",
                      "--workers", "0", "--no-progress", cwd=tmp_path)
    assert run.rc == 0, run.text
    assert_bounded(run)


# --------------------------------------------------------------------------------------------
# Class 2: numbers out of physical sense (--mpp, model spacing and patch size, grids with no patch)
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_slide(tmp_path_factory):
    return write_repeated_tile_tiff(tmp_path_factory.mktemp("small") / "small.tif", 4096, tissue=True)


@pytest.mark.parametrize("mpp", ["1e-6", "50", "0", "nan"])
def test_inspect_refuses_mpp_out_of_range(small_slide, tmp_path, mpp):
    run = run_cli("wsi_toolkit.cli.inspect", small_slide, "--mpp", mpp, cwd=tmp_path)
    assert_one_line_error(run, "--mpp", "[0.05, 20] um/px", rc=2)


@pytest.mark.parametrize("mpp", ["1e-6", "50"])
def test_infer_refuses_mpp_out_of_range(small_slide, model_dir, tmp_path, mpp):
    run = run_cli("wsi_toolkit.cli.infer", small_slide, "--model", model_dir, "--out", tmp_path / "out",
                  "--mpp", mpp, "--workers", "0", "--no-progress", cwd=tmp_path)
    assert_one_line_error(run, "[0.05, 20] um/px", "--mpp", rc=2)  # a usage error, before any slide runs
    assert not (tmp_path / "out").exists()


def test_eval_refuses_mpp_out_of_range(tmp_path):
    (tmp_path / "res").mkdir()
    (tmp_path / "ann").mkdir()
    (tmp_path / "res" / "a.csv").write_text("0.5,10,10\n")
    run = run_cli("wsi_toolkit.cli.eval", "--results", tmp_path / "res", "--annotations", tmp_path / "ann",
                  "--mpp", "1e-6", cwd=tmp_path)
    assert_one_line_error(run, "[0.05, 20] um/px", rc=2)


@pytest.mark.parametrize("field,value", [("spacing_um_px", 1e-9), ("spacing_um_px", 1e9),
                                         ("patch_size_pixels", 10**9), ("patch_size_pixels", 2)])
def test_infer_refuses_model_config_out_of_range(small_slide, model_dir, tmp_path, field, value):
    model = model_with(tmp_path, model_dir, **{field: value})
    run = run_cli("wsi_toolkit.cli.infer", small_slide, "--model", model, "--out", tmp_path / "out",
                  "--workers", "0", "--no-progress", cwd=tmp_path)
    line = assert_one_line_error(run, "config.json", field, rc=2)
    assert "um/px" in line or "px" in line


@pytest.mark.parametrize("args,needle", [
    (["--patch-px", "1000000000"], "patch_px"),
    (["--spacing-um-px", "1e-9"], "spacing_um_px"),
    (["--stride-px", "0"], "stride_px"),
])
def test_inspect_refuses_grid_out_of_range(small_slide, tmp_path, args, needle):
    run = run_cli("wsi_toolkit.cli.inspect", small_slide, *args, cwd=tmp_path)
    assert_one_line_error(run, needle, rc=2)


def test_no_patch_on_a_slide_with_tissue_is_a_failure(small_slide, tmp_path):
    # 4096 px patches at 20 um/px: one cell is 82 mm, the 1 mm slide covers a sliver of it.
    run = run_cli("wsi_toolkit.cli.inspect", small_slide, "--patch-px", "4096", "--stride-px", "4096",
                  "--spacing-um-px", "20", cwd=tmp_path)
    line = assert_one_line_error(run, "NoPatchesError", "small.tif", rc=1)
    assert "min_tissue_fraction" in line and "tissue" in line


def test_no_patch_error_from_make_grid():
    from wsi_toolkit.errors import NoPatchesError
    from wsi_toolkit.tiling import make_grid

    mask = np.zeros((10, 10), bool)
    mask[4, 4] = True  # one mask pixel of tissue: 1/16 of a cell
    with pytest.raises(NoPatchesError) as info:
        make_grid(l0_size=(320, 320), l0_mpp=0.243, tissue_mask=mask, mask_l0_per_px=32)
    assert isinstance(info.value, ValueError) and "min_tissue_fraction 0.5" in str(info.value)
    empty = make_grid(l0_size=(320, 320), l0_mpp=0.243, tissue_mask=np.zeros((10, 10), bool), mask_l0_per_px=32)
    assert len(empty) == 0  # no tissue, no patch: not an error
    loose = make_grid(l0_size=(320, 320), l0_mpp=0.243, tissue_mask=mask, mask_l0_per_px=32, require_patches=False)
    assert len(loose) == 0


# --------------------------------------------------------------------------------------------
# Class 3: TIFF headers claiming what no slide is
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def forged(tmp_path_factory):
    root = tmp_path_factory.mktemp("forged")
    return {
        "one-strip": write_raw_tiff(root / "one_strip.tif", 10**6, 10**6),
        "tiled": write_raw_tiff(root / "tiled.tif", 10**6, 10**6, tile=(1024, 1024)),
        "no-mpp": write_raw_tiff(root / "no_mpp.tif", 10**6, 10**6, tile=(4096, 4096), mpp=None),
    }


@pytest.mark.parametrize("kind,extra,needle", [
    ("one-strip", [], "SlideTooLargeError"),
    ("tiled", [], "250 mm"),
    ("tiled", ["--backend", "tifffile"], "250 mm"),
    ("one-strip", ["--mpp", "0.05"], "strips of 1,000,000 x 1,000,000 px"),
    ("no-mpp", ["--mpp", "0.25"], "250 mm"),
])
def test_inspect_refuses_a_forged_huge_header(forged, tmp_path, kind, extra, needle):
    run = run_cli("wsi_toolkit.cli.inspect", forged[kind], *extra, cwd=tmp_path)
    assert_one_line_error(run, needle, forged[kind].name, rc=1)


def test_infer_refuses_a_forged_huge_header(forged, model_dir, tmp_path):
    run = run_cli("wsi_toolkit.cli.infer", forged["tiled"], forged["one-strip"], "--model", model_dir,
                  "--out", tmp_path / "out", "--workers", "0", "--no-progress", cwd=tmp_path)
    assert run.rc == 1, run.text
    assert_bounded(run)
    # Each slide's error is one line (the pipeline also logs it: it may appear twice, whole each time).
    assert run.lines_with("250 mm") and all("tiled.tif" in ln and "--mpp" in ln for ln in run.lines_with("250 mm"))
    assert all("one_strip.tif" in ln and "vips" in ln for ln in run.lines_with("strips of"))
    assert run.lines_with("strips of")


# --------------------------------------------------------------------------------------------
# Class 4: wsi-eval, a detection far outside the slide
# --------------------------------------------------------------------------------------------


def test_eval_detection_far_outside_is_a_false_positive_not_a_bigger_mask(tmp_path):
    res, ann = tmp_path / "res", tmp_path / "ann"
    res.mkdir()
    ann.mkdir()
    square = [[[1000, 1000], [5000, 1000], [5000, 5000], [1000, 5000], [1000, 1000]]]
    (ann / "s.geojson").write_text(json.dumps({"type": "Feature", "properties": {"classification": {"name": "Tumor"}},
                                               "geometry": {"type": "Polygon", "coordinates": square}}))
    (res / "s.csv").write_text("prob,x,y\n0.9,3000,3000\n0.5,2000000,2000000\n")
    run = run_cli("wsi_toolkit.cli.eval", "--results", res, "--annotations", ann, "--out", tmp_path / "e",
                  "--mpp", "0.25", cwd=tmp_path)
    assert run.rc == 0, run.text
    assert_bounded(run)
    metrics = json.loads((tmp_path / "e" / "metrics.json").read_text())
    assert metrics["n_false_positives"] == 1 and metrics["n_lesions_found"] == 1


# --------------------------------------------------------------------------------------------
# §5: what a path is when it is not a slide
# --------------------------------------------------------------------------------------------


def test_symlink_loop_fifo_and_dangling_link_say_what_they_are(tmp_path, capsys):
    from wsi_toolkit.cli.inspect import main

    loop = tmp_path / "loop.tif"
    os.symlink(loop, loop)
    fifo = tmp_path / "pipe.tif"
    os.mkfifo(fifo)
    dangling = tmp_path / "dangling.tif"
    os.symlink(tmp_path / "gone.tif", dangling)
    assert main([str(loop), str(fifo), str(dangling), "--json"]) == 1
    loop_r, fifo_r, dangling_r = json.loads(capsys.readouterr().out)
    assert "symbolic link loop" in loop_r["error"] and loop_r["error_type"] == "SlideNotFoundError"
    assert "FIFO" in fifo_r["error"] and "0 bytes" not in fifo_r["error"]
    assert fifo_r["error_type"] == "SlideFormatError"
    assert "gone.tif" in dangling_r["error"] and "symbolic link" in dangling_r["error"]


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -1.0, 0, True, "1", None])
def test_check_number_positive_refuses(value):
    from wsi_toolkit.errors import ConfigError
    from wsi_toolkit.limits import check_number

    with pytest.raises(ConfigError, match=r"^thumb_mpp must be a positive number of um/px; got "):
        check_number(value, "thumb_mpp", positive=True, unit="um/px")


def test_check_helpers_accept_and_name_the_range():
    from wsi_toolkit.errors import ConfigError
    from wsi_toolkit.limits import MPP_RANGE_UM, check_fraction, check_int, check_number

    assert check_number(0.25, "mpp", bounds=MPP_RANGE_UM, unit="um/px") == 0.25
    assert check_int(3, "n", minimum=0) == 3 and check_fraction(1, "t") == 1.0
    with pytest.raises(ConfigError, match=r"mpp must be a number in \[0.05, 20\] um/px; got 25"):
        check_number(25, "mpp", bounds=MPP_RANGE_UM, unit="um/px")
    with pytest.raises(ConfigError, match="n must be a non-negative integer; got -1"):
        check_int(-1, "n", minimum=0)
    with pytest.raises(ConfigError, match="n must be a positive integer; got 2.0"):
        check_int(2.0, "n")
    with pytest.raises(ConfigError, match=r"t must be a number in \[0, 1\]"):
        check_fraction(1.5, "t")
