"""OpenVINO model patches/s (preprocessing in the graph) per batch size, INT8 and fp32, 3 interleaved
rounds over 512 patches (RANDOM uint8 patches: speed only; INT8 calibrated on them).

    python scripts/bench_batch.py PACKAGE_DIR [CACHE_DIR]
"""
import statistics
import sys
import time

import numpy as np
import torch

from wsi_toolkit.model_package import load_model_package
from wsi_toolkit.runtime import load_openvino_model
from wsi_toolkit.runtime.calibration import CalibrationSet

pkg = load_model_package(sys.argv[1])
x = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (1024, 96, 96, 3), dtype=np.uint8))
for prec in ("int8", "fp32"):
    cal = CalibrationSet(x[:300].numpy(), source="random") if prec == "int8" else None
    m = load_openvino_model(pkg, precision=prec, cache_dir=sys.argv[2] if len(sys.argv) > 2 else None, calibration=cal)
    sizes = [16, 32, 64, 128, 256]
    res = {b: [] for b in sizes}
    for b in sizes:
        m(x[:b])
    for _ in range(3):
        for b in sizes:
            t = time.perf_counter()
            for i in range(0, 512, b):
                m(x[i:i + b])
            res[b].append(512 / (time.perf_counter() - t))
    medians = {b: round(statistics.median(v)) for b, v in res.items()}
    print(prec, medians, "load", open("/proc/loadavg").read().split()[:3], flush=True)
