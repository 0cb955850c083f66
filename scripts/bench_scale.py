"""Benchmark the Ray scale-out (``wsi-infer --ray``) against the plain single-process batch.

The same ``--slides`` SYNTHETIC slides (default 8, ``--tissue-mm2`` each) with the SYNTHETIC
colour-rule model at the model's default stride (32 px for a centre-label model), each batch
into a fresh output folder:

- ``plain``: :func:`wsi_toolkit.pipeline.run_batch` in this process (torch on every core);
- ``ray-1``: one Ray worker holding every core (``cpus_per_worker = cores``);
- ``ray-2``: two Ray workers (``cpus_per_worker = cores // 2``).

Ray is started once (``--ray local``, no dashboard) and its start-up timed on its own. For each
batch: wall seconds, slides/hour, and the steady-state seconds per slide (from the first worker
ready to the last slide done, i.e. without worker start-up), the per-slide split recorded in
run.json (tissue, reading + model, export), and CPU-seconds of the driver, the workers and Ray's
own processes (GCS, raylet) during the batch: the CPU overhead of Ray per slide is measured
this way too, as wall time on a shared machine moves with the other tenants' load. ``--rounds``
repeats the three batches interleaved. On a machine with few cores the batch is CPU-bound: more
workers share the same cores.
One JSON document on stdout. Run from the repository root:

    python scripts/bench_scale.py [--data /tmp/bench_scale] [--slides 8] [--tissue-mm2 1.0] [--rounds 2]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import time
from pathlib import Path


def _batch_timings(out: Path) -> dict:
    """Median per-slide seconds from the run.json files in ``out``."""
    rows = [json.loads(p.read_text()) for p in sorted(out.glob("*/run.json"))]
    keys = ("seconds_slide", "seconds_tissue", "seconds_export")
    med = {k: round(statistics.median(r["timings"].get(k, 0.0) for r in rows), 3) for k in keys}
    med["n_patches_median"] = int(statistics.median(r["counts"]["n_patches"] for r in rows))
    med["n_patches_total"] = int(sum(r["counts"]["n_patches"] for r in rows))
    return med


class _CpuTracker:
    """CPU-seconds during a batch of this process (the driver), of Ray's workers (``ray::...``
    processes) and of Ray's own processes (GCS, raylet, ...): every descendant is sampled at each
    event (workers are gone by the end of a batch, so their last sample counts). ``cpu_s_per_slide``
    leaves out the workers' start-up (a cost per batch, not per slide)."""

    def __init__(self) -> None:
        import psutil

        self.me = psutil.Process()
        self.base = self._now()
        self.last = dict(self.base)
        self.ready: dict[int, float] = {}

    def _now(self) -> dict[int, tuple[str, float]]:
        import psutil

        t = self.me.cpu_times()
        out = {self.me.pid: ("driver", t.user + t.system)}
        for child in self.me.children(recursive=True):
            try:
                ct = child.cpu_times()
                name = (child.cmdline() or [child.name()])[0]
            except psutil.Error:
                continue
            out[child.pid] = ("workers" if name.startswith("ray::") else "ray", ct.user + ct.system)
        return out

    def sample(self, ready_pid: int | None = None) -> None:
        """Sample every process; ``ready_pid``: a worker that has just started (its CPU so far is
        start-up: process, imports, model load)."""
        self.last.update(self._now())
        if ready_pid is not None and ready_pid in self.last:
            self.ready[ready_pid] = self.last[ready_pid][1]

    def totals(self) -> dict[str, float]:
        """CPU-s of the driver, Ray's processes, and the workers split into start-up and slides."""
        self.sample()
        out = {"driver": 0.0, "ray": 0.0, "workers_start": 0.0, "workers_slides": 0.0}
        for pid, (kind, sec) in self.last.items():
            since = sec - self.base.get(pid, (kind, 0.0))[1]
            if kind == "workers":
                at_ready = self.ready.get(pid, sec) - self.base.get(pid, (kind, 0.0))[1]
                out["workers_start"] += at_ready
                out["workers_slides"] += since - at_ready
            else:
                out[kind] += since
        return {k: round(v, 2) for k, v in out.items()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=Path("/tmp/bench_scale"))
    ap.add_argument("--slides", type=int, default=8)
    ap.add_argument("--tissue-mm2", type=float, default=1.0)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args(argv)

    import ray

    from wsi_toolkit.inference import InferenceConfig
    from wsi_toolkit.pipeline import RunConfig, run_batch
    from wsi_toolkit.scale import RaySettings, run_batch_ray
    from wsi_toolkit.synthetic import make_spec, write_synthetic_slide
    from wsi_toolkit.synthetic_model import make_colour_rule_package

    cores = os.cpu_count() or 1
    data = args.data
    (data / "slides").mkdir(parents=True, exist_ok=True)
    slides = []
    for i in range(args.slides):
        path = data / "slides" / f"s{i}.tif"
        if not path.exists():
            write_synthetic_slide(path, make_spec(tissue_mm2=args.tissue_mm2, n_tumors=1, seed=100 + i), mpp=0.243,
                                  tile=256)
        slides.append(path)
    model = data / "model"
    if not (model / "config.json").exists():
        make_colour_rule_package(model, input_size=96)
    config = RunConfig(inference=InferenceConfig(workers=0, progress=False))

    t0 = time.perf_counter()
    ray.init(address="local", num_cpus=cores, include_dashboard=False, logging_level="WARNING")
    ray_start_s = time.perf_counter() - t0

    def run(kind: str, rnd: int) -> dict:
        out = data / f"out_{kind}_{rnd}"
        shutil.rmtree(out, ignore_errors=True)
        ready: list[float] = []
        load = os.getloadavg()[0]
        cpu = _CpuTracker()
        t = time.perf_counter()
        if kind == "plain":
            results = run_batch(slides, model, out, config)
        else:
            per = cores if kind == "ray-1" else max(1, cores // 2)
            def on_event(kind: str, worker: dict, slide: str | None) -> None:
                cpu.sample(worker.get("pid") if kind == "ready" else None)
                if kind == "ready":
                    ready.append(time.perf_counter())

            results = run_batch_ray(slides, model, out, config, settings=RaySettings(cpus_per_worker=per),
                                    progress=False, on_event=on_event)
        wall = time.perf_counter() - t
        cpu_s = cpu.totals()
        assert all(r.status == "ok" for r in results), [r.error for r in results if r.status != "ok"]
        steady = (t + wall - min(ready)) if ready else wall
        return {"batch": kind, "round": rnd, "wall_s": round(wall, 2),
                "slides_per_hour": round(len(slides) / wall * 3600),
                "steady_s_per_slide": round(steady / len(slides), 3),
                "worker_start_s": round(min(ready) - t, 2) if ready else 0.0,
                "load_avg_1min": round(load, 2),
                "cpu_s": cpu_s,
                "cpu_s_per_slide": round((cpu_s["driver"] + cpu_s["ray"] + cpu_s["workers_slides"]) / len(slides), 3),
                **_batch_timings(out)}

    rows = []
    try:
        for rnd in range(args.rounds):
            for kind in ("plain", "ray-1", "ray-2"):
                rows.append(run(kind, rnd))
                print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    finally:
        ray.shutdown()

    def med(kind: str, key: str) -> float:
        return statistics.median(r[key] for r in rows if r["batch"] == kind)

    plain = med("plain", "steady_s_per_slide")
    summary = {
        "machine": {"platform": platform.platform(), "cpus": cores, "python": platform.python_version()},
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "slides": len(slides), "tissue_mm2": args.tissue_mm2, "ray_init_s": round(ray_start_s, 2),
        "rows": rows,
        "median": {k: {"wall_s": med(k, "wall_s"), "slides_per_hour": med(k, "slides_per_hour"),
                       "steady_s_per_slide": med(k, "steady_s_per_slide"), "worker_start_s": med(k, "worker_start_s")}
                   for k in ("plain", "ray-1", "ray-2")},
        "ray_overhead_per_slide": {k: round(med(k, "steady_s_per_slide") / plain - 1, 4) for k in ("ray-1", "ray-2")},
        "ray_processes_cpu_s_per_slide": {
            k: round(statistics.median(r["cpu_s"]["ray"] for r in rows if r["batch"] == k) / len(slides), 4)
            for k in ("ray-1", "ray-2")},
        "cpu_overhead_per_slide": {
            k: round(med(k, "cpu_s_per_slide") / med("plain", "cpu_s_per_slide") - 1, 4) for k in ("ray-1", "ray-2")},
    }
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
