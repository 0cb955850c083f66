"""Accuracy and speed of the CPU runtimes against torch fp32, on real labelled PCam patches.

For a model package trained on real PCam patches (e.g. ``scripts/train_real.sh OUT``, package in
``OUT/model``) and the patch folder it was trained on, it evaluates the held-back split with
``pcam-eval``'s own function (:func:`patch_model.patch_eval.evaluate_package`) once per runtime and
precision: torch fp32 (the reference), OpenVINO fp32, bf16 (where the CPU has native bf16) and
INT8 (NNCF, calibrated on the train split, or ``--calibration DIR``). For each it reports the ROC
AUC and accuracy and their change from torch fp32, max and mean |dp| of P(tumour), and the label
flips at 0.5 (count and share of patches). Then the model alone (preprocessed batches of 64, the
reader excluded) in patches/s, the runtimes interleaved over ``--repeats`` rounds (median).

    python scripts/bench_precision.py --model OUT/model \\
        [--data DIR (default: $WSI_TOOLKIT_REALDATA/pcam_kaggle)] [--split test] \\
        [--precisions fp32 bf16 int8] [--calibration DIR] [--cache-dir DIR] [--repeats 5] [--json OUT.json]

Prints a Markdown table (as in BENCHMARKS.md) and writes the numbers as JSON with ``--json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from bench_harness import cpu_flags, loadavg

from wsi_toolkit.runtime.names import OV_PRECISIONS


def _cpu() -> dict:
    c = cpu_flags()
    return {"model": c["cpu_model"] or platform.processor(), "cores": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "flags": c["cpu_flags"]}


def evaluate(args, runtime: str, precision: str, out_root: Path, pre: str = "graph") -> dict:
    from patch_model.patch_eval import evaluate_package

    t0 = time.perf_counter()
    r = evaluate_package(args.model, args.data, split=args.split, runtime=runtime, precision=precision,
                         cache_dir=args.cache_dir, calibration=args.calibration, progress=False,
                         out=out_root / f"{runtime}_{precision}_{pre}", ov_preprocess=pre)
    tumor = args.package.config.tumor_index()
    return {"runtime": runtime if runtime == "torch" else f"{runtime} ({pre} pre)", "precision": precision,
            "ran": r.runtime, "accuracy": r.metrics["accuracy"],
            "roc_auc": r.metrics["roc_auc"], "p_tumor": r.probs[:, tumor], "seconds": time.perf_counter() - t0}


def train_calibration(args):
    """The INT8 calibration set pcam-eval uses: ``--calibration``, else the train split of ``--data``."""
    from patch_model.patch_eval import package_splits
    from wsi_toolkit.runtime import calibration_from_dataset, calibration_from_pcam

    if args.calibration:
        return calibration_from_pcam(args.calibration)
    splits = package_splits(args.package.config, args.data)
    return calibration_from_dataset(splits["train"], source=f"{args.data.name} train split")


def model_speed(args, precisions: list[str], repeats: int, n: int = 256, batch: int = 64) -> dict[str, dict]:
    """Patches/s of the model on ``n`` uint8 patches, preprocessing included (torch's Preprocess, or
    OpenVINO's graph where it holds it), runtimes interleaved per round."""
    from wsi_toolkit.inference.device import prepare_model
    from wsi_toolkit.runtime import load_openvino_model

    pkg = args.package
    calibration = train_calibration(args) if "int8" in precisions else None
    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.integers(0, 256, (n, 96, 96, 3), dtype=np.uint8))
    batches = list(torch.split(x, batch))
    runners = {}
    torch_model = prepare_model(pkg.model, torch.device("cpu"), optimize=True)
    runners["torch fp32"] = torch_model
    for p in precisions:
        for pre in args.ov_preprocess:
            runners[f"openvino ({pre} pre) {p}"] = load_openvino_model(
                pkg, precision=p, cache_dir=args.cache_dir, calibration=calibration if p == "int8" else None,
                preprocess=pre)

    def call(m, b):
        return m(b) if getattr(m, "takes_uint8", False) else m(pkg.preprocess(b))
    times: dict[str, list[float]] = {k: [] for k in runners}
    with torch.inference_mode(), torch_model:
        for m in runners.values():  # warm-up (the fused torch graph compiles on its first calls)
            for b in batches[:2]:
                call(m, b)
        for _ in range(repeats):
            for name, m in runners.items():
                t0 = time.perf_counter()
                for b in batches:
                    call(m, b)
                times[name].append(n / (time.perf_counter() - t0))
    return {k: {"patches_per_s": statistics.median(v), "min": min(v), "max": max(v), "loadavg": loadavg()}
            for k, v in times.items()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    real = os.environ.get("WSI_TOOLKIT_REALDATA")
    ap.add_argument("--model", type=Path, required=True, help="model package trained on the real patches")
    ap.add_argument("--data", type=Path, default=Path(real) / "pcam_kaggle" if real else None,
                    help="the real PCam patches the model was trained on [default: $WSI_TOOLKIT_REALDATA/pcam_kaggle]")
    ap.add_argument("--split", default="test", choices=["train", "valid", "test"])
    ap.add_argument("--precisions", nargs="+", default=list(OV_PRECISIONS), choices=OV_PRECISIONS)
    ap.add_argument("--calibration", type=Path, default=None, help="PCam folder for INT8 [default: train split]")
    ap.add_argument("--cache-dir", type=Path, default=None)
    ap.add_argument("--repeats", type=int, default=5, help="rounds of the interleaved model-speed comparison")
    ap.add_argument("--no-speed", action="store_true")
    ap.add_argument("--ov-preprocess", nargs="+", default=["graph"], choices=["graph", "torch"],
                    help="OpenVINO rows with the preprocessing in the graph and/or in torch")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    if args.data is None or not args.data.is_dir():
        print(f"bench_precision: no patch folder at {args.data}; pass --data or set WSI_TOOLKIT_REALDATA",
              file=sys.stderr)
        return 2
    from wsi_toolkit.inference.device import cpu_has_fast_bf16
    from wsi_toolkit.model_package import load_model_package
    from wsi_toolkit.runtime import compare_probabilities, openvino_versions

    args.package = load_model_package(args.model)

    precisions = [p for p in args.precisions if p != "bf16" or cpu_has_fast_bf16()]
    if len(precisions) < len(args.precisions):
        print("bf16 skipped: this CPU has no native bfloat16", file=sys.stderr)
    cpu = _cpu()
    print(f"CPU: {cpu['model']}, {cpu['cores']} cores, torch threads {cpu['torch_threads']}, flags "
          f"{' '.join(cpu['flags'])}; load {loadavg()}; {openvino_versions()}", file=sys.stderr)
    with tempfile.TemporaryDirectory(prefix="bench_precision_") as tmp:
        ref = evaluate(args, "torch", "fp32", Path(tmp))
        rows = [ref] + [evaluate(args, "openvino", p, Path(tmp), pre) for p in precisions
                        for pre in args.ov_preprocess]
    results = []
    for r in rows:
        cmp = compare_probabilities(ref["p_tumor"], r["p_tumor"])
        results.append({k: v for k, v in r.items() if k != "p_tumor"} | cmp | {
            "d_auc": r["roc_auc"] - ref["roc_auc"], "d_accuracy": r["accuracy"] - ref["accuracy"]})
    speed = {} if args.no_speed else model_speed(args, precisions, args.repeats)
    n = results[0]["n_patches"]
    print(f"\n{args.split} split of {args.data.name}: {n} patches; reference torch fp32 "
          f"(AUC {ref['roc_auc']:.4f}, accuracy {ref['accuracy']:.4f})\n")
    print("| runtime | precision | ROC AUC | dAUC | accuracy | dacc | max abs dp | mean abs dp | label flips "
          "| model patches/s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        name = f"{r['runtime']} {r['precision']}"
        ran = r["ran"]
        note = " (fell back to torch)" if "fallback" in ran else ""
        s = speed.get(name, {}).get("patches_per_s")
        print(f"| {r['runtime']}{note} | {r['precision']} | {r['roc_auc']:.4f} | {r['d_auc']:+.4f} | "
              f"{r['accuracy']:.4f} | {r['d_accuracy']:+.4f} | {r['max_abs_dp']:.2e} | {r['mean_abs_dp']:.2e} | "
              f"{r['label_flips']} ({100 * r['label_flip_fraction']:.2f}%) | {f'{s:.0f}' if s else 'n/a'} |")
    if args.json:
        args.json.write_text(json.dumps({"cpu": cpu, "versions": openvino_versions(), "split": args.split,
                                         "results": results, "speed": speed}, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
