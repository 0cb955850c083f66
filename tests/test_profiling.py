"""wsi-infer --profile: the stage table adds up to the wall time and names every stage."""

from __future__ import annotations

import json
import time

import pytest

from wsi_toolkit.profiling import SLIDE_STAGES, process_age_s, profile_rows, profile_table


def test_process_age_grows():
    a = process_age_s()
    if a is None:
        pytest.skip("no /proc on this system")
    time.sleep(0.05)
    b = process_age_s()
    assert b is not None and 0 < a < b  # resolution: one clock tick (usually 10 ms)


def test_rows_add_up_to_the_wall_time():
    slides = [{"seconds_open_thumbnail": 0.5, "seconds_tissue_detect": 0.25, "seconds_grid": 0.125,
               "seconds_model_setup": 1.0, "seconds_model": 4.0, "seconds_wait_for_reads": 0.5,
               "seconds_total": 6.0, "seconds_stitch_regions": 0.25, "seconds_export": 0.75, "n_patches": 100}] * 2
    batch = {"seconds_imports": 2.0, "seconds_package_load": 0.5, "seconds_int8_prepare": None, "seconds_wall": 30.0}
    rows = dict(profile_rows(slides, batch))
    assert "INT8 graph (calibrate + quantize, or cache lookup)" not in rows  # not measured: no row
    assert rows["model (forward passes; async: waits for a free request)"] == 8.0  # summed over slides
    assert rows["patch loop, rest (cutting patches, preprocessing, re-batching)"] == 2 * (6.0 - 5.5)
    named = sum(v for k, v in rows.items() if k not in ("other (outside the stages above)", "total wall"))
    assert named == 2.0 + 0.5 + 2 * (0.5 + 0.25 + 0.125 + 1.0 + 4.0 + 0.5 + 0.25 + 0.75) + 2 * 0.5
    assert rows["other (outside the stages above)"] == pytest.approx(30.0 - named)
    table = profile_table(slides, batch)
    assert "| **total wall** | **30.00** |" in table and "200 patches, 6.7 patches/s" in table


def test_wsi_infer_profile(model_dir, synthetic_slides, tmp_path, capsys):
    from wsi_toolkit.cli.infer import main

    out = tmp_path / "out"
    assert main([str(synthetic_slides().path), "--model", str(model_dir), "--out", str(out), "--no-progress",
                 "--workers", "0", "--stride-px", "96", "--runtime", "torch", "--profile"]) == 0
    err = capsys.readouterr().err
    assert "profile (seconds; 1 slide(s) analysed by this run)" in err and "total wall" in err
    report = json.loads((out / "profile.json").read_text())
    rows = {r["stage"]: r["seconds"] for r in report["rows"]}
    for label, _ in SLIDE_STAGES:
        assert label in rows and rows[label] >= 0
    assert rows["process start + imports"] > 0 and rows["model package load"] > 0
    assert rows["model (forward passes; async: waits for a free request)"] > 0
    parts = sum(v for k, v in rows.items() if k != "total wall")
    assert parts == pytest.approx(rows["total wall"], abs=1e-3)
    run = json.loads(next(out.glob("*/run.json")).read_text())
    assert report["slides"] == [run["timings"]]
    # A second run skips the finished slide: nothing analysed, nothing summed.
    assert main([str(synthetic_slides().path), "--model", str(model_dir), "--out", str(out), "--no-progress",
                 "--workers", "0", "--stride-px", "96", "--runtime", "torch", "--profile"]) == 0
    assert "0 slide(s) analysed" in capsys.readouterr().err
