"""wsi-infer reliability (issue 11): outputs stay inside --out, no stale or lost results when runs
are repeated, interrupted (a real SIGKILL) or run side by side, and errors are one clear line.

Every slide here is a tiny SYNTHETIC slide (under 1 mm^2 of tissue) made by the test itself; the
model is the SYNTHETIC colour-rule package.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch

from wsi_toolkit.cli.infer import main
from wsi_toolkit.export import (
    clean_stale_partials,
    csv_text,
    region_feature_id,
    write_regions_geojson,
    write_summary_csv,
)
from wsi_toolkit.export.regions import TumorRegion
from wsi_toolkit.model_package import pcam_config, save_model_package
from wsi_toolkit.pipeline import RESERVED_NAMES, safe_dir_name
from wsi_toolkit.synthetic import Blob, SyntheticSpec, write_synthetic_slide
from wsi_toolkit.synthetic_model import ColourRuleNet

REPO = Path(__file__).resolve().parents[1]

# ~0.5 mm^2 of tissue with one tumour: a few hundred patches, well under a second of model time.
TINY_SPEC = SyntheticSpec(
    size_um=(1000.0, 800.0),
    tissue=(Blob((500.0, 400.0), (380.0, 290.0), angle_deg=10, wobble=0.1, lobes=5, phase=0.3),),
    tumors=(Blob((470.0, 380.0), (150.0, 110.0), angle_deg=30, wobble=0.15, lobes=4, phase=1.0),),
    seed=11,
)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Path of a tiny SYNTHETIC slide (copy it to give it another name)."""
    root = tmp_path_factory.mktemp("tiny")
    return write_synthetic_slide(root / "tiny.tif", TINY_SPEC, mpp=0.243, tile=256, xml=False).path


def copy_as(src: Path, folder: Path, name: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    dst = folder / name
    shutil.copyfile(src, dst)
    return dst


def infer(slides, model_dir, out, *extra, workers: str | None = "0") -> int:
    args = [*map(str, slides), "--model", str(model_dir), "--out", str(out), "--no-progress", *extra]
    if workers is not None:
        args += ["--workers", workers]
    return main(args)


def summary(out: Path) -> dict[str, dict]:
    with open(out / "summary.csv", newline="", encoding="utf-8") as fh:
        return {r["slide"]: r for r in csv.DictReader(fh)}


def all_files(root: Path) -> set[Path]:
    return {p for p in root.rglob("*") if p.is_file()}


def dead_pid() -> int:
    """The pid of a process that has exited."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


# ------------------------------------------------------------------------------------------------
# §3 Outputs stay inside --out; names cannot kill the batch
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("stem,expected", [
    ("..", "slide"), (".", "slide"), ("", "slide"), (".hidden", "hidden"), ("a/b", "a_b"), ("a\\b", "a_b"),
    ("tab\there", "tab_here"), ("summary.csv", "summary.csv_slide"), ("SUMMARY.CSV", "SUMMARY.CSV_slide"),
    ("case 1", "case 1"), ("tumor_001", "tumor_001"), ("trailing. ", "trailing"),
])
def test_safe_dir_name(stem, expected):
    assert safe_dir_name(stem) == expected
    assert safe_dir_name(stem).casefold() not in RESERVED_NAMES


def test_dot_names_and_reserved_names_stay_inside_out(tiny, model_dir, tmp_path):
    slides = tmp_path / "slides"
    names = ["...tif", "..tif", "summary.csv.tif", "SLIDE.tif"]
    paths = [copy_as(tiny, slides, n) for n in names]
    parent = tmp_path / "parent"
    out = parent / "out"
    out.mkdir(parents=True)
    sentinel = parent / "heatmap.tif"
    sentinel.write_bytes(b"not ours")
    before_outside = all_files(tmp_path) - all_files(out)

    assert infer(paths, model_dir, out) == 0
    assert (out / "summary.csv").is_file()
    assert all_files(tmp_path) - all_files(out) == before_outside  # nothing written outside OUT
    assert sentinel.read_bytes() == b"not ours"
    assert not any((out / f).exists() for f in ("heatmap.tif", "run.json", "tiles.csv"))  # not in OUT itself
    rows = summary(out)
    assert {rows[str(p)]["status"] for p in paths} == {"ok"}
    dirs = sorted(p.name for p in out.iterdir() if p.is_dir() and not p.name.startswith("."))
    assert len(dirs) == len(paths)  # one folder each, none shared ("..", "." and "SLIDE" all differ)
    for d in dirs:
        run = json.loads((out / d / "run.json").read_text())
        assert Path(run["slide"]["path"]).name in names
    assert "summary.csv" not in dirs


def test_a_second_batch_does_not_overwrite_another_slides_folder(tiny, model_dir, tmp_path):
    # case.svs and case.tif share the stem; run separately, each keeps its own folder.
    a = copy_as(tiny, tmp_path / "s", "case.svs")
    b = tmp_path / "s" / "case.tif"
    b.write_bytes(a.read_bytes() + b"\0" * 16)  # another file (another size), same stem
    out = tmp_path / "out"
    assert infer([a], model_dir, out) == 0
    assert infer([b], model_dir, out) == 0
    assert json.loads((out / "case" / "run.json").read_text())["slide"]["path"] == str(a)
    assert json.loads((out / "case_tif" / "run.json").read_text())["slide"]["path"] == str(b)


def test_csv_text_neutralises_formulas():
    for bad in ("=1+1", "+1", "-1", "@SUM(A1)", "\tx", "\rx"):
        assert csv_text(bad) == "'" + bad
    for good in ("tumor_001.tif", "/slides/=x.tif", "", "a=b"):
        assert csv_text(good) == good


def test_summary_csv_neutralises_formula_cells(tmp_path):
    write_summary_csv(tmp_path / "summary.csv", [
        {"slide": "=HYPERLINK(\"http://x\")", "status": "failed", "error": "@cmd", "slide_score": -0.5,
         "-extra": "+1"}])
    text = (tmp_path / "summary.csv").read_text()
    row = next(csv.DictReader(open(tmp_path / "summary.csv", newline="")))
    assert row["slide"] == "'=HYPERLINK(\"http://x\")" and row["error"] == "'@cmd"
    assert row["slide_score"] == "-0.5"  # numbers stay numbers
    assert row["'-extra"] == "'+1"  # column names too
    assert "\n=" not in text and ",=" not in text


def test_slide_named_like_a_formula_lands_in_summary_as_text(tiny, model_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    copy_as(tiny, tmp_path, "=1+1.tif")
    (tmp_path / "+bad.tif").write_bytes(b"not a tiff")
    assert infer(["=1+1.tif", "+bad.tif"], model_dir, "out") == 1
    rows = summary(tmp_path / "out")
    assert rows["'=1+1.tif"]["status"] == "ok"
    assert rows["'+bad.tif"]["status"] == "failed"
    assert rows["'+bad.tif"]["error"].startswith("'+bad.tif")


# ------------------------------------------------------------------------------------------------
# §4 Stale results: skip only when slide, model and settings match
# ------------------------------------------------------------------------------------------------


def test_rerun_redoes_a_slide_when_settings_or_model_change(tiny, model_dir, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="wsi_toolkit.pipeline")
    s = copy_as(tiny, tmp_path / "s", "a.tif")
    out = tmp_path / "out"
    assert infer([s], model_dir, out) == 0
    run_json = out / "a" / "run.json"
    first = run_json.read_bytes()

    caplog.clear()
    assert infer([s], model_dir, out, "--batch-size", "16") == 0  # batch size does not change outputs
    assert summary(out)[str(s)]["status"] == "skipped" and run_json.read_bytes() == first
    assert any("skipped" in r.getMessage() and "same slide, model and settings" in r.getMessage()
               for r in caplog.records)

    caplog.clear()
    assert infer([s], model_dir, out, "--threshold", "0.6") == 0
    assert summary(out)[str(s)]["status"] == "ok"
    assert json.loads(run_json.read_text())["settings"]["run"]["threshold"] == 0.6
    assert any("redoing" in r.getMessage() and "threshold 0.5 -> 0.6" in r.getMessage() for r in caplog.records)

    caplog.clear()
    assert infer([s], model_dir, out, "--threshold", "0.6", "--stride-px", "48") == 0
    assert any("grid.stride_px 32 -> 48" in r.getMessage() for r in caplog.records)

    # Another model (other weights): redone, and the log names the sha256 change.
    other = tmp_path / "other_model"
    with torch.no_grad():
        net = torch.jit.script(ColourRuleNet(threshold=0.5).eval())
    save_model_package(other, net, pcam_config(architecture="colour-rule-synthetic", input_size=96,
                                               extra={"synthetic": True}))
    caplog.clear()
    assert infer([s], other, out, "--threshold", "0.6", "--stride-px", "48") == 0
    assert summary(out)[str(s)]["status"] == "ok"
    assert any("redoing" in r.getMessage() and "model_sha256" in r.getMessage() for r in caplog.records)
    assert json.loads(run_json.read_text())["model"]["path"] == str(other)


def test_summary_lists_every_finished_slide_in_out(tiny, model_dir, tmp_path):
    # Two runs into one OUT with different slides: the second summary keeps the first's rows.
    a, b = copy_as(tiny, tmp_path / "s", "a.tif"), copy_as(tiny, tmp_path / "s", "b.tif")
    bad = tmp_path / "s" / "bad.tif"
    bad.write_bytes(b"II*\0garbage")
    out = tmp_path / "out"
    assert infer([a, bad], model_dir, out) == 1
    assert infer([b], model_dir, out) == 0
    rows = summary(out)
    assert {k: v["status"] for k, v in rows.items()} == {str(b): "ok", str(a): "ok", str(bad): "failed"}
    assert float(rows[str(a)]["slide_score"]) > 0.9


# ------------------------------------------------------------------------------------------------
# §4 Concurrent runs share the work
# ------------------------------------------------------------------------------------------------


def test_a_slide_locked_by_another_process_is_left_to_it(tiny, model_dir, tmp_path):
    a, b = copy_as(tiny, tmp_path / "s", "a.tif"), copy_as(tiny, tmp_path / "s", "b.tif")
    out = tmp_path / "out"
    (out / ".locks").mkdir(parents=True)
    holder = subprocess.Popen(
        [sys.executable, "-c", "import filelock, sys, time\n"
         "lock = filelock.FileLock(sys.argv[1]); lock.acquire(); print('locked', flush=True); time.sleep(120)",
         str(out / ".locks" / "a.lock")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert infer([a, b], model_dir, out) == 0  # busy is not a failure
        rows = summary(out)
        assert rows[str(a)]["status"] == "busy" and "another wsi-infer" in rows[str(a)]["error"]
        assert rows[str(b)]["status"] == "ok"
        assert not (out / "a" / "run.json").exists()
    finally:
        holder.kill()
        holder.wait()
    # The lock dies with its process: the next run does the slide.
    assert infer([a, b], model_dir, out) == 0
    assert {k: v["status"] for k, v in summary(out).items()} == {str(a): "ok", str(b): "skipped"}


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "wsi_toolkit.cli.infer", *args]


def test_two_concurrent_runs_share_the_slides(tiny, model_dir, tmp_path):
    slides = [copy_as(tiny, tmp_path / "s", f"s{i}.tif") for i in range(4)]
    out = tmp_path / "out"
    cmd = _cli(*map(str, slides), "--model", str(model_dir), "--out", str(out), "--workers", "0", "--no-progress")
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
             for _ in range(2)]
    outputs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    done = [line.split()[1].rstrip(":") for o, _ in outputs for line in o.splitlines() if line.startswith("ok ")]
    assert sorted(done) == sorted(map(str, slides))  # each slide run by exactly one of the two
    rows = summary(out)
    assert set(rows) == set(map(str, slides)) and {r["status"] for r in rows.values()} <= {"ok", "skipped"}
    assert all((out / s.stem / "run.json").is_file() for s in slides)


# ------------------------------------------------------------------------------------------------
# §4 kill -9: stale partials, deterministic outputs, byte-identical resume
# ------------------------------------------------------------------------------------------------


def test_clean_stale_partials_keeps_live_processes_files(tmp_path):
    gone = dead_pid()
    stale = [tmp_path / f".heatmap.tif.partial-{gone}", tmp_path / f".tumor.xml.partial-{gone}",
             tmp_path / f".x.partial-{os.getpid()}"]
    live = tmp_path / ".tiles.csv.partial-1"  # pid 1 always runs
    keep = [live, tmp_path / "heatmap.tif", tmp_path / ".partial-notapid"]
    for p in stale + keep:
        p.write_text("x")
    assert sorted(clean_stale_partials(tmp_path)) == sorted(stale)
    assert all(p.exists() for p in keep)
    assert clean_stale_partials(tmp_path / "missing") == []


def test_stale_partials_of_dead_processes_are_removed_when_a_slide_starts(tiny, model_dir, tmp_path):
    s = copy_as(tiny, tmp_path / "s", "a.tif")
    out = tmp_path / "out"
    (out / "a").mkdir(parents=True)
    gone = dead_pid()
    left = [out / "a" / f".heatmap.tif.partial-{gone}", out / f".summary.csv.partial-{gone}"]
    for p in left:
        p.write_bytes(b"half")
    assert infer([s], model_dir, out) == 0
    assert not any(p.exists() for p in left)
    assert not list(out.rglob("*.partial-*"))


def test_geojson_feature_ids_are_deterministic(tmp_path):
    import shapely

    regions = [TumorRegion(shapely.box(0, 0, 10, 10), 0.9, 0.8, 1e-4, 14.0),
               TumorRegion(shapely.box(20, 0, 30, 10), 0.7, 0.6, 1e-4, 14.0)]
    write_regions_geojson(tmp_path / "a.geojson", regions, slide_name="s.tif")
    write_regions_geojson(tmp_path / "b.geojson", regions, slide_name="s.tif")
    assert (tmp_path / "a.geojson").read_bytes() == (tmp_path / "b.geojson").read_bytes()
    ids = [f["id"] for f in json.loads((tmp_path / "a.geojson").read_text())["features"]]
    assert ids == [region_feature_id("s.tif", 1), region_feature_id("s.tif", 2)]
    assert all(uuid.UUID(i).version == 5 for i in ids) and len(set(ids)) == 2
    assert region_feature_id("t.tif", 1) != ids[0]
    assert sorted(os.listdir(tmp_path)) == ["a.geojson", "b.geojson"]


def _without_timings(run_json: Path) -> dict:
    run = json.loads(run_json.read_text())
    run.pop("timings")
    return run


def _compare_trees(got: Path, ref: Path) -> None:
    files = sorted(p.relative_to(ref) for p in all_files(ref) if p.name != "summary.csv" and ".locks" not in p.parts)
    got_files = sorted(p.relative_to(got) for p in all_files(got) if p.name != "summary.csv"
                       and ".locks" not in p.parts)
    assert got_files == files
    for rel in files:
        if rel.name == "run.json":
            assert _without_timings(got / rel) == _without_timings(ref / rel), rel
        else:
            assert (got / rel).read_bytes() == (ref / rel).read_bytes(), rel


def test_sigkill_mid_batch_then_resume_gives_byte_identical_outputs(tiny, model_dir, tmp_path):
    slides = [copy_as(tiny, tmp_path / "s", f"s{i}.tif") for i in range(3)]
    args = [*map(str, slides), "--model", str(model_dir), "--workers", "0", "--no-progress"]
    ref = tmp_path / "ref"
    assert main([*args, "--out", str(ref)]) == 0  # the uninterrupted run (in this process: same code, fp32 CPU)

    out = tmp_path / "out"
    proc = subprocess.Popen(_cli(*args, "--out", str(out)), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            cwd=REPO)
    first = out / "s0" / "run.json"
    deadline = time.monotonic() + 300
    while not first.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert first.is_file()
    assert not (out / "s2" / "run.json").exists()  # killed mid-batch
    # What a kill inside a write leaves behind (the process is dead now).
    (out / "s1").mkdir(exist_ok=True)
    (out / "s1" / f".tiles.csv.partial-{proc.pid}").write_text("minx,miny\n1,")

    rerun = subprocess.run(_cli(*args, "--out", str(out)), capture_output=True, text=True, cwd=REPO, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    assert not list(out.rglob("*.partial-*"))
    _compare_trees(out, ref)
    assert {r["status"] for r in summary(out).values()} <= {"ok", "skipped"}
    assert summary(out)[str(slides[0])]["status"] == "skipped"


# ------------------------------------------------------------------------------------------------
# §5 Errors are one clear line
# ------------------------------------------------------------------------------------------------


def garble_model_level_tile(src: Path, dst: Path, level: int = 1) -> None:
    """Copy ``src`` with the middle tile of ``level`` overwritten by garbage: not decodable JPEG. Level 1
    (0.486 um/px of a 0.243 um/px slide) is the level the default ``--read-from finer`` reads for a
    0.972 um/px model; level 2 (0.972 um/px) the one ``nearest`` reads."""
    data = bytearray(src.read_bytes())
    with tifffile.TiffFile(src) as tif:
        page = tif.pages[level]
        assert abs(page.shape[1] * 2**level - tif.pages[0].shape[1]) <= 2**level
        i = len(page.dataoffsets) // 2
        offset, count = page.dataoffsets[i], page.databytecounts[i]
    data[offset: offset + count] = np.random.default_rng(7).integers(0, 256, count, dtype=np.uint8).tobytes()
    dst.write_bytes(bytes(data))


@pytest.mark.parametrize("workers", [None, "0"], ids=["default-workers", "workers-0"])
def test_undecodable_tile_is_one_clean_line_with_any_reader_count(tiny, model_dir, tmp_path, capsys, workers):
    bad = tmp_path / "garbled.tif"
    garble_model_level_tile(tiny, bad)  # the level the default read_from (finer) reads
    good = copy_as(tiny, tmp_path, "good.tif")
    out = tmp_path / "out"
    # --batch-size 8: the slide has more patches than a batch, so the default (1 reader) really
    # starts a reader process.
    assert infer([bad, good], model_dir, out, "--batch-size", "8", workers=workers) == 1
    rows = summary(out)
    error = rows[str(bad)]["error"]
    assert rows[str(good)]["status"] == "ok"
    assert "\n" not in error and "Traceback" not in error and "DataLoader" not in error
    assert "garbled.tif" in error
    if workers is None:
        run = json.loads((out / "good" / "run.json").read_text())
        assert run["timings"]["workers"] == 1  # the reader-process path was taken
    err = capsys.readouterr().err
    assert "Traceback" not in err


def test_default_and_zero_workers_give_the_same_error(tiny, model_dir, tmp_path):
    bad = tmp_path / "garbled.tif"
    garble_model_level_tile(tiny, bad, level=2)  # the level --read-from nearest reads
    errors = []
    for workers in (None, "0"):
        out = tmp_path / f"out_{workers}"
        assert infer([bad], model_dir, out, "--batch-size", "8", "--read-from", "nearest", workers=workers) == 1
        errors.append(summary(out)[str(bad)]["error"])
    assert errors[0] == errors[1]


class _BatchBreaker(torch.nn.Module):
    """Right on a batch of one patch (the load check), wrong on larger batches."""

    def __init__(self, mode: str):
        super().__init__()
        self.mode = mode

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        if n > 1:
            if self.mode == "classes":
                return torch.zeros(n, 3)
            if self.mode == "batch":
                return torch.zeros(n - 1, 2)
            raise RuntimeError("this model cannot take more than one patch")
        return torch.zeros(n, 2)


@pytest.mark.parametrize("mode,expected", [
    ("classes", "shape (8, 3) for a batch of 8 patches"),
    ("batch", "shape (7, 2) for a batch of 8 patches"),
    ("raise", "this model cannot take more than one patch"),
])
def test_model_failing_on_batches_is_one_line_naming_the_package(tiny, tmp_path, capsys, mode, expected):
    pkg = tmp_path / f"bad_{mode}"
    save_model_package(pkg, torch.jit.script(_BatchBreaker(mode)),
                       pcam_config(architecture="batch-breaker", input_size=96, extra={"synthetic": True}))
    s = copy_as(tiny, tmp_path / "s", "a.tif")
    out = tmp_path / "out"
    assert infer([s], pkg, out, "--batch-size", "8") == 1
    error = summary(out)[str(s)]["error"]
    assert "\n" not in error and "Traceback" not in error
    assert str(pkg) in error and expected in error
    assert not (out / "a" / "run.json").exists()
    assert "Traceback" not in capsys.readouterr().err


def test_missing_and_unlistable_arguments_are_failed_slides(tiny, model_dir, tmp_path, monkeypatch, capsys):
    import wsi_toolkit.cli.infer as cli

    good = copy_as(tiny, tmp_path / "s", "good.tif")
    missing = tmp_path / "s" / "missing.tif"
    dangling = tmp_path / "s" / "dangling.tif"
    dangling.symlink_to(tmp_path / "nowhere.tif")
    locked = tmp_path / "locked"
    locked.mkdir()
    real = cli.find_slides

    def find_slides(args):
        if Path(args[0]) == locked:
            raise PermissionError(13, "Permission denied", str(locked))
        return real(args)

    monkeypatch.setattr(cli, "find_slides", find_slides)
    out = tmp_path / "out"
    assert infer([missing, locked, dangling, good], model_dir, out) == 1
    rows = summary(out)
    assert rows[str(good)]["status"] == "ok"
    for p in (missing, locked, dangling):
        assert rows[str(p)]["status"] == "failed" and str(p) in rows[str(p)]["error"]
    assert "Permission denied" in rows[str(locked)]["error"]
    assert "does not exist" in rows[str(missing)]["error"]
    assert not (out / "missing").exists()
    err = capsys.readouterr().err
    assert "Traceback" not in err and "3 of 4 slides failed" in err


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root reads files without read permission")
def test_unreadable_slide_file_is_a_failed_slide(tiny, model_dir, tmp_path):
    good = copy_as(tiny, tmp_path / "s", "good.tif")
    secret = copy_as(tiny, tmp_path / "s", "secret.tif")
    secret.chmod(0)
    try:
        out = tmp_path / "out"
        assert infer([secret, good], model_dir, out) == 1
        rows = summary(out)
        assert rows[str(good)]["status"] == "ok"
        assert rows[str(secret)]["status"] == "failed" and "permission denied" in rows[str(secret)]["error"]
    finally:
        secret.chmod(0o644)
