"""Alignment of wsi-infer's heatmap with known tumour geometry (SYNTHETIC slides, colour-rule model).

For one specimen "scanned" at 0.243 and 0.226 um/px: IoU of the heatmap's tumour cells
(probability >= 0.5) with the true tumour rasterised at the heatmap's resolution (31.1 um/px),
centroid error in heatmap cells (one cell = one stride), and tumour area found vs true.
The issue's bar: IoU >= 0.7, centroid error < 1 stride.

    python scripts/bench_alignment.py [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import tifffile

from wsi_toolkit.annotations import rasterize
from wsi_toolkit.cli.infer import main as wsi_infer
from wsi_toolkit.synthetic import ALIGNMENT_SPEC, write_synthetic_slide
from wsi_toolkit.synthetic_model import make_colour_rule_package

SPEC = ALIGNMENT_SPEC  # the specimen tests/test_infer.py uses


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("bench_data/alignment"))
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    model = args.out / "colour_rule"
    make_colour_rule_package(model, input_size=96, overwrite=True)
    for mpp in (0.243, 0.226):
        s = write_synthetic_slide(args.out / f"align_{mpp:g}.tif", SPEC, mpp=mpp, tile=256)
        code = wsi_infer([str(s.path), "--model", str(model), "--out", str(args.out / "results"), "--workers", "0",
                          "--no-progress", "--overwrite"])
        if code:
            return code
        d = args.out / "results" / s.path.stem
        run = json.loads((d / "run.json").read_text())
        cell_l0 = run["heatmap"]["cell_l0"]
        heat = tifffile.imread(d / "heatmap.tif", key=0)
        truth = rasterize(s.tumor_l0, l0_size=s.level0_size, l0_mpp=mpp, mask_mpp=cell_l0 * mpp)
        found = (heat >= 128)[: truth.shape[0], : truth.shape[1]]
        iou = (found & truth).sum() / (found | truth).sum()
        err = np.hypot(*(np.argwhere(found).mean(axis=0) - np.argwhere(truth).mean(axis=0)))
        print(json.dumps({"bench": "alignment", "synthetic": True, "slide_mpp": mpp,
                          "heatmap_um_px": run["heatmap"]["mpp"],
                          "backend": run["slide"]["backend"], "iou": round(float(iou), 3),
                          "centroid_error_cells": round(float(err), 3),
                          "tumor_mm2_found": round(run["tumor_area_mm2"], 4),
                          "tumor_mm2_truth": round(s.tumor_mm2, 4)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
