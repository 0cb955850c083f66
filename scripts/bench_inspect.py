"""Benchmark: wsi-inspect on a SYNTHETIC slide with ~40 mm^2 of tissue (issue: "a few seconds").

Makes (or reuses) the slide in --data (default ./bench_data), then times the `wsi-inspect`
command end to end as a new process (python start-up and imports included) --repeat times, and
the library call alone. Prints one JSON line per measurement and a summary.

    python scripts/bench_inspect.py [--tissue-mm2 40] [--mpp 0.243] [--repeat 3] [--data DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tissue-mm2", type=float, default=40.0)
    ap.add_argument("--mpp", type=float, default=0.243)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--data", type=Path, default=Path("bench_data"))
    args = ap.parse_args()

    from wsi_toolkit.preflight import inspect_slide
    from wsi_toolkit.synthetic import make_spec, write_synthetic_slide

    args.data.mkdir(parents=True, exist_ok=True)
    slide = args.data / f"synthetic_{args.tissue_mm2:g}mm2_{args.mpp:g}.tif"
    if not slide.exists():
        t = time.perf_counter()
        s = write_synthetic_slide(slide, make_spec(tissue_mm2=args.tissue_mm2, seed=7), mpp=args.mpp)
        print(json.dumps({"made_slide": str(slide), "seconds": round(time.perf_counter() - t, 1),
                          "level0_size": s.level0_size, "truth_tissue_mm2": round(s.tissue_mm2, 3)}))
    exe = Path(sys.executable).with_name("wsi-inspect")
    cli_times = []
    for _ in range(args.repeat):
        t = time.perf_counter()
        out = subprocess.run([str(exe), str(slide), "--json"], check=True, capture_output=True, text=True).stdout
        cli_times.append(time.perf_counter() - t)
    report = json.loads(out)[0]
    lib_times = []
    for _ in range(args.repeat):
        t = time.perf_counter()
        r = inspect_slide(slide)
        lib_times.append(time.perf_counter() - t)
    summary = {
        "bench": "inspect", "slide": str(slide), "synthetic": True,
        "level0_size": report["level0_size"], "tissue_mm2": report["tissue_mm2"], "n_patches": report["n_patches"],
        "cli_seconds_min": round(min(cli_times), 3), "cli_seconds_all": [round(x, 3) for x in cli_times],
        "library_seconds_min": round(min(lib_times), 3),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cpus",
        "python": platform.python_version(),
    }
    assert r.ok, r.error
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
