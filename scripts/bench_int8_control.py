"""Does NNCF's accuracy-aware INT8 bring the label flips on held-back real patches to 1%?

For a model package trained on real PCam patches and the patch folder it was trained on: the
package's fp32 OpenVINO graph is quantized (1) as wsi-infer does (``nncf.quantize``, performance
preset, fast bias correction) and (2) with ``nncf.quantize_with_accuracy_control`` for each
``--max-drop``, whose metric is the share of the 300 calibration patches (the train split, as
pcam-eval calibrates) whose label at 0.5 agrees with fp32: NNCF keeps the layers that cost most
agreement in fp32 until the drop is at most ``max_drop``. Labels are not used to quantize. Each
variant is then scored on the held-back split (never seen by the quantizer): label flips against
fp32, ROC AUC, max |dp|, the model's patches/s (graph alone, preprocessed batches of 64) and how
many FakeQuantize nodes are left. Also: how many held-back patches fp32 puts near 0.5, where
INT8's noise can flip a label.

    python scripts/bench_int8_control.py --model OUT/model [--data DIR] [--max-drop 0.01 0.005] [--json OUT.json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from bench_harness import cpu_flags, loadavg


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--data", type=Path, default=Path(os.environ.get("WSI_TOOLKIT_REALDATA", "")) / "pcam_kaggle")
    ap.add_argument("--split", default="test")
    ap.add_argument("--max-drop", type=float, nargs="*", default=[0.01, 0.005])
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    from sklearn.metrics import roc_auc_score

    from patch_model.patch_eval import package_splits
    from wsi_toolkit.model_package import load_model_package
    from wsi_toolkit.runtime import calibration_from_dataset
    from wsi_toolkit.runtime import openvino as r

    pkg = load_model_package(args.model)
    cache = tempfile.mkdtemp(prefix="bench_int8_control_")
    folder, _, _ = r.prepare_openvino_graph(pkg, precision="fp32", cache_dir=cache)
    ov, nncf = r._ov(), r._import_nncf()
    fp32 = ov.Core().read_model(str(folder / r.MODEL_XML))
    splits = package_splits(pkg.config, args.data)
    cal = calibration_from_dataset(splits["train"], source=f"{args.data.name} train split")
    held = splits[args.split]
    x_held = np.stack([np.asarray(held[i][0], np.uint8) for i in range(len(held))])
    y_held = np.array([int(held[i][1]) for i in range(len(held))])
    x_cal = r._preprocessed(pkg, cal.patches)
    x_eval = r._preprocessed(pkg, x_held)
    threads = os.cpu_count() or 1

    def p_tumor(compiled, x: np.ndarray) -> np.ndarray:
        return r._tumor_column(pkg, r._probabilities(r._infer(compiled, x)))

    c32 = r._compile(fp32, "fp32", threads)
    ref_cal = p_tumor(c32, x_cal) >= 0.5
    p32 = p_tumor(c32, x_eval)
    items = [(i, x_cal[i:i + 1]) for i in range(len(x_cal))]

    def agreement(compiled, subset) -> tuple[float, None]:  # NNCF's validation_fn: higher is better
        idx, out = [], []
        for i, x in subset:
            idx.append(i)
            out.append(np.asarray(compiled(x)[0]))
        p = r._tumor_column(pkg, r._probabilities(np.concatenate(out)))
        return float(((p >= 0.5) == ref_cal[idx]).mean()), None

    def speed(compiled, x: np.ndarray, rounds: int = 3) -> float:
        r._infer(compiled, x[:64])
        t = time.perf_counter()
        for _ in range(rounds):
            r._infer(compiled, x)
        return rounds * len(x) / (time.perf_counter() - t)

    batches = [x_cal[i:i + 32] for i in range(0, len(x_cal), 32)]
    common = dict(preset=nncf.QuantizationPreset.PERFORMANCE, fast_bias_correction=True, subset_size=len(batches))
    variants: list[tuple[str, float | None]] = [("nncf.quantize (wsi-infer's)", None)]
    variants += [(f"quantize_with_accuracy_control, max_drop {d:g}", d) for d in args.max_drop]
    rows = []
    near = {w: int((np.abs(p32 - 0.5) <= w).sum()) for w in (0.02, 0.05, 0.1)}
    for name, drop in variants:
        t0 = time.perf_counter()
        with r._quiet(), contextlib.redirect_stdout(sys.stderr):
            if drop is None:
                q = nncf.quantize(fp32, nncf.Dataset(batches), **common)
            else:
                validation = nncf.Dataset(items, lambda it: it[1])
                q = nncf.quantize_with_accuracy_control(fp32, nncf.Dataset(batches), validation, agreement,
                                                        max_drop=drop, **common)
        seconds = time.perf_counter() - t0
        c8 = r._compile(q, "int8", threads)
        p8 = p_tumor(c8, x_eval)
        flipped = (p8 >= 0.5) != (p32 >= 0.5)
        rows.append({"variant": name, "seconds_quantize": round(seconds, 1),
                     "fake_quantize_nodes": sum(op.get_type_name() == "FakeQuantize" for op in q.get_ops()),
                     "calibration_agreement": agreement(c8, items)[0], "flips": int(flipped.sum()),
                     "flips_share": float(flipped.mean()),
                     "flipped_fp32_p": sorted(round(float(v), 3) for v in p32[flipped]),
                     "auc": float(roc_auc_score(y_held, p8)), "max_abs_dp": float(np.abs(p8 - p32).max()),
                     "patches_per_s": round(speed(c8, x_eval[:256])), "loadavg": loadavg()})
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    result = {"cpu": cpu_flags(), "model": str(args.model), "n_held": len(x_held), "split": args.split,
              "auc_fp32": float(roc_auc_score(y_held, p32)), "fp32_patches_per_s": round(speed(c32, x_eval[:256])),
              "held_patches_within_of_0.5": near, "rows": rows}
    print(f"{len(x_held)} held-back patches ({args.split}); fp32 ROC AUC {result['auc_fp32']:.4f}, "
          f"{result['fp32_patches_per_s']} patches/s; fp32 P(tumour) within 0.02 / 0.05 / 0.1 of 0.5: "
          f"{near[0.02]} / {near[0.05]} / {near[0.1]} patches\n")
    print("| INT8 variant | seconds to quantize | FakeQuantize left | calibration agreement | held-back flips | "
          "ROC AUC | max abs dp | patches/s |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        print(f"| {row['variant']} | {row['seconds_quantize']} | {row['fake_quantize_nodes']} | "
              f"{row['calibration_agreement']:.4f} | {row['flips']} ({100 * row['flips_share']:.2f}%) | "
              f"{row['auc']:.4f} | {row['max_abs_dp']:.3f} | {row['patches_per_s']} |")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
