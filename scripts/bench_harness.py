"""The harness the benchmarks share: a command run as a new process with its wall time and the peak
memory of its process tree (:func:`run_measured`), GPU utilisation and memory sampled by nvidia-smi
(:class:`GpuSampler`), the load average, the CPU's model and the flags that decide bf16 / INT8
speed, and whether OpenVINO is installed.

Not a benchmark itself: ``scripts/bench_infer.py`` (wsi-infer end to end, against WSInfer),
``scripts/bench_read.py`` (the reading floor and the reader designs), ``scripts/bench_precision.py``
and ``scripts/gpu_check.py`` import it (``scripts/`` is on ``sys.path`` when a script there runs).
"""

from __future__ import annotations

import contextlib
import os
import signal
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


class GpuSampler:
    """GPU 0's utilisation (%) and memory used (MiB), sampled every ``period_ms`` by one
    ``nvidia-smi --query-gpu=utilization.gpu,memory.used -lms PERIOD`` process in the background
    (one process for the whole run, not one per sample). Use as a context manager around the work;
    :meth:`summary` then gives the figures ({} where nvidia-smi is absent or gave nothing).

    ``utilization.gpu`` is the share of the sample period in which a kernel ran (nvidia-smi's
    definition): the "GPU busy" figure. The mean counts the samples from the first busy one on, so
    the start-up of a new process (imports, reading the model) does not count as idle GPU time.
    """

    def __init__(self, period_ms: int = 200):
        self.period_ms = period_ms
        self.samples: list[tuple[float, float]] = []
        self._proc: subprocess.Popen | None = None
        self._thread: threading.Thread | None = None

    def __enter__(self) -> GpuSampler:
        cmd = ["nvidia-smi", "--query-gpu=utilization.gpu,memory.used", "--format=csv,noheader,nounits", "-i", "0",
               "-lms", str(self.period_ms)]
        try:
            self._proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        except OSError:
            return self
        self._thread = threading.Thread(target=self._read, args=(self._proc,), daemon=True)
        self._thread.start()
        return self

    def _read(self, proc: subprocess.Popen) -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            try:
                util, mem = (float(v) for v in line.strip().split(","))
            except ValueError:
                continue
            self.samples.append((util, mem))

    def __exit__(self, *exc) -> None:
        if self._proc is not None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def summary(self) -> dict:
        if not self.samples:
            return {}
        busy = [u for u, _ in self.samples]
        first = next((i for i, u in enumerate(busy) if u > 0), len(busy))
        run = busy[first:] or [0.0]
        return {"gpu_util_mean_pct": round(sum(run) / len(run), 1), "gpu_util_max_pct": max(run),
                "gpu_mem_max_mib": max(m for _, m in self.samples), "gpu_samples": len(self.samples),
                "gpu_sample_ms": self.period_ms}


def run_measured(cmd: list[str], env: dict | None = None, *, gpu: bool = False, timeout: float | None = None) -> dict:
    """Run ``cmd``; wall seconds and peak RSS / PSS of its process tree (sampled every 0.1 s);
    with ``gpu``, GPU utilisation and memory (:class:`GpuSampler`, every 0.2 s). With ``timeout``
    (seconds) the command is killed when it runs longer: ``returncode`` -9, ``timed_out`` true."""
    t0 = time.perf_counter()
    # With a timeout the command gets a session of its own, so a kill takes its child processes too.
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            start_new_session=timeout is not None)
    peak_rss = peak_pss = 0
    done = threading.Event()

    def sample():
        nonlocal peak_rss, peak_pss
        while not done.is_set():
            rss, pss = mem_tree_kb(proc.pid)
            peak_rss, peak_pss = max(peak_rss, rss), max(peak_pss, pss)
            time.sleep(0.1)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    timed_out = False
    with GpuSampler() if gpu else contextlib.nullcontext() as gpu_sampler:
        try:
            out, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            os.killpg(proc.pid, signal.SIGKILL)
            out, _ = proc.communicate()
    done.set()
    th.join()
    rec = {"returncode": proc.returncode, "seconds": time.perf_counter() - t0,
           "peak_rss_mb": round(peak_rss / 1024, 1), "peak_pss_mb": round(peak_pss / 1024, 1),
           "output_tail": out[-2000:]}
    if timed_out:
        rec["timed_out"] = True
    if gpu_sampler is not None:
        rec.update(gpu_sampler.summary())
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
