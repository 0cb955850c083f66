"""The harness the benchmarks share: a command run as a new process with its wall time and the peak
memory of its process tree (:func:`run_measured`), the load average, the CPU's model and the flags
that decide bf16 / INT8 speed, and whether OpenVINO is installed.

Not a benchmark itself: ``scripts/bench_infer.py`` (wsi-infer end to end, against WSInfer),
``scripts/bench_read.py`` (the reading floor and the reader designs) and
``scripts/bench_precision.py`` import it (``scripts/`` is on ``sys.path`` when a script there runs).
"""

from __future__ import annotations

import os
import subprocess
import threading
import time
from pathlib import Path


def process_tree(pid: int) -> list[int]:
    """``pid`` and all its descendants (Linux /proc)."""
    out, stack = [], [pid]
    while stack:
        p = stack.pop()
        out.append(p)
        try:
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    stack.extend(int(c) for c in f.read().split())
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
    return out


def mem_tree_kb(pid: int) -> tuple[int, int]:
    """(RSS, PSS) summed over the process tree, kB. RSS counts pages shared between the main
    process and its forked readers once per process; PSS splits them, so it is the memory the
    tree really holds."""
    rss = pss = 0
    for p in process_tree(pid):
        try:
            with open(f"/proc/{p}/smaps_rollup") as f:
                for line in f:
                    if line.startswith("Rss:"):
                        rss += int(line.split()[1])
                    elif line.startswith("Pss:"):
                        pss += int(line.split()[1])
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
    return rss, pss


def gpu_sample() -> tuple[float, float] | None:
    """(utilisation %, memory used MiB) of GPU 0 from nvidia-smi, or None."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=utilization.gpu,memory.used", "--format=csv,noheader,nounits",
                              "-i", "0"], capture_output=True, text=True, timeout=5).stdout
        util, mem = (float(v) for v in out.strip().splitlines()[0].split(","))
        return util, mem
    except (OSError, ValueError, IndexError, subprocess.SubprocessError):
        return None


def run_measured(cmd: list[str], env: dict | None = None, *, gpu: bool = False) -> dict:
    """Run ``cmd``; wall seconds and peak RSS / PSS of its process tree (sampled every 0.1 s);
    with ``gpu``, GPU utilisation and memory from nvidia-smi (sampled every 0.5 s)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    peak_rss = peak_pss = 0
    gpu_samples: list[tuple[float, float]] = []
    done = threading.Event()

    def sample():
        nonlocal peak_rss, peak_pss
        last_gpu = 0.0
        while not done.is_set():
            rss, pss = mem_tree_kb(proc.pid)
            peak_rss, peak_pss = max(peak_rss, rss), max(peak_pss, pss)
            if gpu and time.perf_counter() - last_gpu >= 0.5:
                last_gpu = time.perf_counter()
                g = gpu_sample()
                if g is not None:
                    gpu_samples.append(g)
            time.sleep(0.1)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    out, _ = proc.communicate()
    done.set()
    th.join()
    rec = {"returncode": proc.returncode, "seconds": time.perf_counter() - t0,
           "peak_rss_mb": round(peak_rss / 1024, 1), "peak_pss_mb": round(peak_pss / 1024, 1),
           "output_tail": out[-2000:]}
    if gpu_samples:
        # Utilisation while the model runs: samples after the first busy one (start-up excluded).
        busy = [u for u, _ in gpu_samples]
        first = next((i for i, u in enumerate(busy) if u > 0), len(busy))
        run = busy[first:] or [0.0]
        rec.update({"gpu_util_mean_pct": round(sum(run) / len(run), 1), "gpu_util_max_pct": max(run),
                    "gpu_mem_max_mib": max(m for _, m in gpu_samples), "gpu_samples": len(gpu_samples)})
    return rec


def loadavg() -> str | None:
    """The 1, 5 and 15 minute load averages (Linux), or None."""
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return None


def openvino_installed() -> bool:
    from wsi_toolkit.runtime import openvino_available

    return openvino_available()


def cpu_flags() -> dict:
    """The CPU's model name and the flags that decide bf16 / INT8 speed."""
    model, flags = "", []
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and not model:
                    model = line.split(":", 1)[1].strip()
                elif line.startswith("flags") and not flags:
                    flags = line.split(":", 1)[1].split()
    except OSError:
        pass
    wanted = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_bf16", "amx_int8", "amx_tile")
    return {"cpu_model": model, "cpu_flags": [f for f in wanted if f in flags]}
