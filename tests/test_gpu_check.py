"""``scripts/gpu_check.sh OUT --dry-run-cpu``: the GPU check's every step, on the CPU with tiny sizes,
so the script a GPU machine runs once cannot fail on a typo (slow: a few minutes on 2 cores); and
the nvidia-smi sampler it uses (``scripts/bench_harness.py``) on a stand-in nvidia-smi."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

STEPS = ["machine", "gpu_tests", "slide", "package_lite0_96", "package_lite0_112", "train_data", "infer_resnet50_96",
         "infer_resnet50_112", "train_batch", "train", "infer_lite0_96", "infer_lite0_112"]


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    pytest.importorskip("fastai")
    pytest.importorskip("timm", reason="timm is not installed: pip install 'wsi-toolkit[pretrained]'")
    out = tmp_path_factory.mktemp("gpu_check")
    extras = "train,pretrained,dev"
    # This interpreter's venv, already holding the project: env.sh is told it is installed, so
    # the test installs nothing.
    env = dict(os.environ, WSI_TOOLKIT_VENV=str(Path(sys.executable).parent.parent), WSI_TOOLKIT_EXTRAS=extras,
               WSI_TOOLKIT_INSTALLED=f"{ROOT}[{extras}]")
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), str(out), "--dry-run-cpu"], env=env,
                          capture_output=True, text=True, timeout=1500)
    return proc, out


@pytest.mark.slow
def test_dry_run_passes_every_step(dry_run):
    proc, out = dry_run
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    record = json.loads((out / "gpu_check.json").read_text())
    assert record["mode"] == "dry-run-cpu"
    assert [s["name"] for s in record["steps"]] == STEPS
    assert {s["name"]: s["status"] for s in record["steps"]} == dict.fromkeys(STEPS, "ok")
    log = (out / "gpu_check.log").read_text()
    assert "nvidia-smi" in log and "steps ok" in log
    tests = next(s for s in record["steps"] if s["name"] == "gpu_tests")["results"]
    assert tests["tests"] >= 5 and tests["failures"] == tests["errors"] == 0
    assert tests["skipped"] == tests["tests"] and "CUDA" in tests["skip_reasons"][0]  # no GPU here


@pytest.mark.slow
def test_dry_run_summary_has_every_model_size_and_stride(dry_run):
    _, out = dry_run
    summary = json.loads((out / "gpu_check.json").read_text())["summary"]
    rows = {(r["model"], r["input_px"], r["stride_px"]): r for r in summary["infer"]}
    assert set(rows) == {(m, px, s) for m in ("resnet50", "lite0") for px in (96, 112) for s in (96, 32)}
    for r in rows.values():
        assert r["patches"] > 0 and r["precision"] == "fp32"  # auto is fp32 on a CPU
        for key in ("patches_per_s_patch_loop", "patches_per_s_process", "patches_per_s_model_only"):
            assert r[key] > 0, key
        assert 0 <= r["wait_for_reads_share"] <= 1
        assert r["gpu_util_mean_pct"] is None  # nvidia-smi is not sampled on the CPU
    for m in ("resnet50", "lite0"):  # stride 32 predicts every 96 px patch 9x over: more patches
        assert rows[(m, 96, 32)]["patches"] > 2 * rows[(m, 96, 96)]["patches"]
    train = summary["train"]
    assert train["device"] == "cpu" and train["train_images"] > 0 and train["train_images_per_s"] > 0
    assert train["synthetic_data"] is True
    assert summary["targets"] is None  # the aims are judged on a GPU only


def test_gpu_sampler_reads_one_nvidia_smi_stream(tmp_path, monkeypatch):
    """GpuSampler parses the ``-lms`` stream of a stand-in nvidia-smi: the mean counts from the
    first busy sample (start-up idle excluded), the memory maximum over all samples."""
    fake = tmp_path / "nvidia-smi"
    fake.write_text("#!/bin/sh\nprintf '0, 500\\n0, 600\\n50, 900\\n100, 1000\\n30, 700\\nnot a sample\\n'\n"
                    "exec sleep 30\n")  # exec: one process, as nvidia-smi is, which the sampler ends
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.syspath_prepend(str(ROOT / "scripts"))
    from bench_harness import GpuSampler

    with GpuSampler(period_ms=200) as sampler:
        deadline = time.monotonic() + 10
        while len(sampler.samples) < 5 and time.monotonic() < deadline:
            time.sleep(0.05)
    got = sampler.summary()
    assert got["gpu_samples"] == 5
    assert got["gpu_util_mean_pct"] == 60.0  # (50 + 100 + 30) / 3
    assert got["gpu_util_max_pct"] == 100 and got["gpu_mem_max_mib"] == 1000


def test_gpu_sampler_without_nvidia_smi_gives_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no nvidia-smi there
    monkeypatch.syspath_prepend(str(ROOT / "scripts"))
    from bench_harness import GpuSampler

    with GpuSampler() as sampler:
        pass
    assert sampler.summary() == {}
