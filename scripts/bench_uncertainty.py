"""Cost of an uncertainty map per patch: no uncertainty vs TTA vs MC-dropout, the model alone.

Times the package's model on the patches of one split of a PCam set (the package's own held-back
part for a Kaggle folder, rebuilt as ``pcam-eval`` does), as ``wsi-infer`` runs it on a CPU: uint8
batches, the package's preprocessing, the frozen oneDNN graph (``prepare_model``); variants:

- ``none``: one view per patch, ``batch_size`` patches per forward pass;
- ``tta-dihedral``: 8 views per patch, ``batch_size // 8`` patches x 8 views per pass;
- ``mc-dropout-K``: the body on ``batch_size`` patches, the head K times (:mod:`wsi_toolkit.inference.mc_dropout`).

Each variant is warmed up (the fused graph compiles per shape), then the variants alternate for
``--rounds`` rounds, so a loaded machine slows them alike; medians are reported as seconds per 1000
patches and as a ratio to ``none``. Reading, tissue and exports are not in it (``scripts/bench_infer.py
--variants`` times ``wsi-infer`` end to end). One JSON line per timing, then a summary line::

    python scripts/bench_uncertainty.py PACKAGE --data PCAM_FOLDER [--split test] [--samples 8 32]
        [--rounds 3] [--batch-size 64] [--max-patches N]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from bench_harness import cpu_flags, loadavg


def _patches(package, data: Path, split: str, max_patches: int | None) -> np.ndarray:
    from patch_model.patch_eval import package_splits

    ds = package_splits(package.config, data)[split]
    n = len(ds) if max_patches is None else min(len(ds), max_patches)
    return np.stack([np.asarray(ds[i][0]) for i in range(n)])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("package", type=Path)
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--split", default="test")
    ap.add_argument("--samples", type=int, nargs="+", default=[8, 32], help="MC-dropout sample counts")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--max-patches", type=int, default=None)
    args = ap.parse_args()

    from wsi_toolkit.inference import make_views, prepare_model, split_for_mc_dropout
    from wsi_toolkit.model_package import load_model_package

    package = load_model_package(args.package)
    patches = torch.from_numpy(_patches(package, args.data, args.split, args.max_patches))
    n, bs = len(patches), args.batch_size
    device = torch.device("cpu")
    plain = prepare_model(package.model, device, optimize=True)
    mcs = {k: split_for_mc_dropout(package.load_torchscript(), samples=k, seed=0) for k in args.samples}
    body = prepare_model(next(iter(mcs.values())).body, device, optimize=True)
    for mc in mcs.values():
        mc.body = body

    def run_plain(views: int) -> None:
        step = max(1, bs // views)
        for i in range(0, n, step):
            package_x = package.preprocess(make_views(patches[i:i + step], "dihedral" if views > 1 else "none"))
            plain(package_x)

    def run_mc(k: int) -> None:
        for i in range(0, n, bs):
            mcs[k](package.preprocess(patches[i:i + bs]), torch.arange(i, min(i + bs, n)))

    variants = {"none": lambda: run_plain(1), "tta-dihedral": lambda: run_plain(8),
                **{f"mc-dropout-{k}": (lambda k=k: run_mc(k)) for k in args.samples}}
    times: dict[str, list[float]] = {v: [] for v in variants}
    with torch.inference_mode(), plain, body:
        for name, fn in variants.items():  # warm-up: the fused graphs compile for these shapes
            t0 = time.perf_counter()
            fn()
            print(json.dumps({"bench": "uncertainty_warmup", "variant": name,
                              "seconds": round(time.perf_counter() - t0, 2)}), flush=True)
        for r in range(args.rounds):
            for name, fn in variants.items():
                load = loadavg()
                t0 = time.perf_counter()
                fn()
                s = time.perf_counter() - t0
                times[name].append(s)
                print(json.dumps({"bench": "uncertainty", "variant": name, "round": r, "patches": n,
                                  "seconds": round(s, 3), "s_per_1000": round(1000 * s / n, 2),
                                  "loadavg_1m": load}), flush=True)
    base = statistics.median(times["none"])
    summary = {name: {"s_per_1000_median": round(1000 * statistics.median(t) / n, 2),
                      "s_per_1000_all": [round(1000 * x / n, 2) for x in t],
                      "x_none": round(statistics.median(t) / base, 2)} for name, t in times.items()}
    print(json.dumps({"bench": "uncertainty_summary", "package": str(args.package), "split": args.split, "patches": n,
                      "batch_size": bs, "rounds": args.rounds, "graph": plain.path, "body_graph": body.path,
                      "torch_threads": torch.get_num_threads(), "cpu": platform.processor() or platform.machine(),
                      "cpu_flags": cpu_flags(), "variants": summary}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
