"""scripts/bench_infer.py runs end to end on a tiny SYNTHETIC slide (the GPU run is the same
script with ``--device cuda``; it needs a GPU machine and is not run here)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench_lines(tmp_path_factory):
    data = tmp_path_factory.mktemp("bench")
    cmd = [sys.executable, str(ROOT / "scripts" / "bench_infer.py"), "--data", str(data), "--tissue-mm2", "0.6",
           "--strides", "96", "--only", "floor", "read", "infer", "precision", "readers",
           "--read-workers", "0", "1", "--read-passes", "1", "--precision-diff", "24", "--workers", "1",
           "--batch-size", "16", "--reader-rounds", "1"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    lines = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    return {(r.get("bench"), r.get("workers"), r.get("stride_px"), r.get("design")): r for r in lines}, data


def test_bench_reports_floor_reader_and_wsi_infer(bench_lines):
    got, data = bench_lines
    floor = got[("decode_floor", None, None, None)]
    assert floor["tiles"] > 0 and floor["mp_per_s_one_core"] > 0 and floor["tissue_tiles"] > 0
    for w in (0, 1):
        r = got[("read_only", w, 96, "threads")]
        assert r["patches"] > 0 and r["region_mp_per_cpu_second"] > 0 and r["cpu_seconds_all_processes"] > 0
    assert got[("read_only", 0, 96, "threads")]["patches"] == got[("read_only", 1, 96, "threads")]["patches"]
    run = next(r for k, r in got.items() if k[0] == "wsi_infer")
    assert run["returncode"] == 0 and run["n_patches"] == got[("read_only", 0, 96, "threads")]["patches"]
    assert run["peak_rss_mb"] > 0 and run["peak_pss_mb"] > 0 and run["model_path"]
    assert run["precision"] == "fp32"  # the CPU default, whatever the CPU computes natively
    cfg = json.loads((data / "resnet50_random_96" / "config.json").read_text())
    assert cfg["transform"][0] == {"name": "Resize", "arguments": {"size": 96}}  # what WSInfer needs


def test_bench_compares_bf16_with_fp32(bench_lines):
    got, _ = bench_lines
    p = next(r for k, r in got.items() if k[0] == "precision")
    assert p["patches"] == 24
    lo, hi = p["prob_fp32_range"]
    assert hi - lo > 0.1  # the scaled random model gives probabilities that differ between patches
    assert 0 <= p["max_abs_prob_diff"] < 0.5 and p["mean_abs_prob_diff"] <= p["max_abs_prob_diff"]


def test_bench_compares_reader_designs(bench_lines):
    """The package's reader threads, WSInfer's plain DataLoader and the former slot ring read the
    same patches; each gets a median and spread of patches/s and the load average."""
    got, _ = bench_lines
    rows = {k[3]: r for k, r in got.items() if k[0] == "reader_design" and k[1] == 1}
    assert set(rows) == {"threads", "dataloader", "slots"}
    assert all(r["rounds"] == 1 and r["patches_per_s_min"] <= r["patches_per_s_median"] <= r["patches_per_s_max"]
               for r in rows.values())
    patches = {r["patches"] for k, r in got.items() if k[0] == "read_only" and k[2] == 96}
    assert len(patches) == 1 and patches.pop() > 0


def test_bench_read_runs_alone_on_the_same_slide(bench_lines):
    """scripts/bench_read.py (the reading questions, split out of bench_infer.py) on the slide the
    bench made: the same patch count as bench_infer's reader-alone run."""
    got, data = bench_lines
    slide = next(data.glob("synthetic_*mm2_0.243.tif"))
    cmd = [sys.executable, str(ROOT / "scripts" / "bench_read.py"), str(slide), "--strides", "96",
           "--read-workers", "0", "--read-passes", "1", "--only", "floor", "read"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    rows = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    assert [r["bench"] for r in rows] == ["decode_floor", "read_only"]
    assert rows[1]["patches"] == got[("read_only", 0, 96, "threads")]["patches"]
