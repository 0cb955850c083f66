"""Robustness: a patch model's answers under what real slides do to patches, family by family.

The package's held-back patches (its test part by default, rebuilt from the package's recipe as
``pcam-eval`` and ``scripts/bench_fidelity.py`` do) are perturbed with the functions of
:mod:`patch_model.scanner` (the same ones ``pcam-train --augment ...+scanner`` draws from), each
family at a few strengths:

- ``jpeg``: re-compressed at quality 95, 85, 70, 50;
- ``blur``: Gaussian defocus, sigma 0.5, 1, 1.5, 2 px (x 0.972 um);
- ``resample``: the pyramid's resampling: ``40x box`` (4x bicubic up to 0.243 um/px, two 2x box
  reductions: a 40x pyramid's 10x level), ``40x bilinear`` (4x bicubic up, one antialiased bilinear
  4x shrink), ``20x finer`` (1.944x bicubic up to 0.5 um/px, area-shrunk to 0.972: ``wsi-infer
  --read-from finer`` on a 20x slide), ``20x nearest`` (up to 0.5, box 2x to 1.0 um/px, bilinear to
  0.972: ``--read-from nearest``);
- ``hed``: H&E stain jitter, per patch scale U(1 +- s) and shift U(+-s) in optical density, s = 0.02, 0.05, 0.1;
- ``brightness``, ``contrast``: -20 %, -10 %, +10 %, +20 %;
- ``combined``: the 40x resampling then JPEG Q=85 (a 40x JPEG pyramid's 10x level, patch by patch);
- with ``--slide-path``: the patches as a mosaic slide (bench_fidelity's ``--slide-forms``, default
  a 40x JPEG Q=85 SVS) through ``wsi-infer`` at its defaults.

Each row: accuracy, ROC AUC, labels flipped vs the clean patches (at 0.5), mean and max |dp| vs
clean, patches moved by more than 0.2, accuracy change in points. Deterministic under ``--seed``
(only ``hed`` draws random numbers). Accuracy on Kaggle-layout patches is on a random split: LEAKY.

    python scripts/bench_robustness.py PACKAGE --data PCAM_DIR --out OUT [--slide-path]

Writes ``OUT/robustness.json`` (every row), ``OUT/robustness.md`` (the table) and
``OUT/robustness.png`` (accuracy against strength, one panel per family).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_fidelity as fid  # noqa: E402
from bench_harness import run_measured  # noqa: E402

MOVED_DP = 0.2  # |dp| above which a patch counts as moved (the measure)


@dataclass(frozen=True)
class Perturbation:
    """One strength of one family: ``fn(patch, rng) -> patch`` (uint8 (96, 96, 3) both)."""

    family: str
    strength: str
    fn: Callable[[np.ndarray, np.random.Generator], np.ndarray]


def perturbations() -> list[Perturbation]:
    """The suite, in the order of the table."""
    from patch_model import scanner as sc

    m = sc.PCAM_MPP
    p40_box = [(m / 4, "bicubic"), (m / 2, "box"), (m, "box")]
    paths = {
        "40x box": p40_box,  # bicubic up 4x to 0.243 um/px, box 2x, box 2x (the pyramid's 10x level)
        "40x bilinear": [(m / 4, "bicubic"), (m, "bilinear")],  # bicubic up 4x, bilinear (antialiased) down 4x
        "20x finer": [(0.5, "bicubic"), (m, "box")],  # bicubic up to 0.5 um/px, area-shrunk to 0.972
        "20x nearest": [(0.5, "bicubic"), (1.0, "box"), (m, "bilinear")],  # ... box 2x to 1.0, bilinear to 0.972
    }
    out = [Perturbation("jpeg", f"Q={q}", lambda x, r, q=q: sc.jpeg(x, q)) for q in (95, 85, 70, 50)]
    out += [Perturbation("blur", f"sigma {s:g} px", lambda x, r, s=s: sc.gaussian_blur(x, s)) for s in (0.5, 1, 1.5, 2)]
    out += [Perturbation("resample", name, lambda x, r, p=p: sc.resample(x, p)) for name, p in paths.items()]
    out += [Perturbation("hed", f"sigma {s:g}", lambda x, r, s=s: sc.random_hed(x, s, r)) for s in (0.02, 0.05, 0.1)]
    for fam in ("brightness", "contrast"):
        out += [Perturbation(fam, f"{v:+.0%}", lambda x, r, fam=fam, v=v: sc.brightness_contrast(x, **{fam: v}))
                for v in (-0.2, -0.1, 0.1, 0.2)]
    out.append(Perturbation("combined", "40x resampling + JPEG Q=85",
                            lambda x, r: sc.jpeg(sc.resample(x, p40_box), 85)))
    return out


def apply(pert: Perturbation, patches: np.ndarray, seed: int, index: int) -> np.ndarray:
    """``pert`` over every patch, with a generator seeded by (``seed``, ``index``) drawn in patch order."""
    rng = np.random.default_rng([seed, index])
    return np.stack([pert.fn(p, rng) for p in patches])


def row_metrics(p: np.ndarray, labels: np.ndarray, clean: np.ndarray, clean_acc: float | None) -> dict:
    """bench_fidelity's scores against the labels and the clean patches, plus moved patches and the accuracy change."""
    row = fid.score(p, labels, clean)
    ok = ~np.isnan(p)
    row["moved_gt_0.2"] = int((np.abs(p[ok] - clean[ok]) > MOVED_DP).sum())
    acc = row.get("accuracy")
    row["accuracy_change_points"] = (round(100 * (acc - clean_acc), 2) if acc is not None and clean_acc is not None
                                     else None)
    return row


def slide_rows(args, patches: np.ndarray, labels: np.ndarray, clean: np.ndarray, clean_acc: float | None,
               prob_col: str) -> list[dict]:
    """Each ``--slide-forms`` mosaic (bench_fidelity's) through ``wsi-infer`` at its defaults."""
    rows = []
    tenx = fid.mosaic(patches)
    bin_dir = Path(sys.executable).parent
    (args.out / "slides").mkdir(exist_ok=True)
    for name in args.slide_forms:
        form = fid.FORMS[name]
        slide = fid.write_mosaic_slide(args.out / "slides" / f"mosaic_{name}.{'svs' if form.svs else 'tif'}",
                                       tenx, form)
        out = args.out / "runs" / name
        shutil.rmtree(out, ignore_errors=True)
        m = run_measured([str(bin_dir / "wsi-infer"), str(slide), "--model", str(args.package), "--out", str(out),
                          "--no-progress", "--cache-dir", str(args.out / "cache"), *args.wsi_infer_args])
        row: dict = {"family": "slide", "strength": f"{name} (wsi-infer)", "returncode": m["returncode"],
                     "seconds_wall": round(m["seconds"], 2)}
        tiles = out / slide.stem / "tiles.csv"
        if m["returncode"] == 0 and tiles.exists():
            row.update(row_metrics(fid.cell_probs_wsi_infer(tiles, len(patches), form, prob_col), labels, clean,
                                   clean_acc))
        else:
            row["output_tail"] = m["output_tail"][-800:]
        rows.append(row)
    return rows


def table(rows: list[dict]) -> str:
    head = ("| family | strength | accuracy | change (points) | ROC AUC | flips vs clean | moved > 0.2 | "
            "mean abs dp | max abs dp | scored |\n|---|---|---|---|---|---|---|---|---|---|\n")
    lines = []
    for r in rows:
        if r.get("accuracy") is None:
            lines.append(f"| {r['family']} | {r['strength']} | failed (rc {r.get('returncode')}) | | | | | | | |")
            continue
        auc = "n/a" if r["roc_auc"] is None else f"{r['roc_auc']:.4f}"
        lines.append(f"| {r['family']} | {r['strength']} | {r['accuracy']:.4f} | {r['accuracy_change_points']:+.2f} | "
                     f"{auc} | {r['flips_vs_direct']} | {r['moved_gt_0.2']} | {r['mean_abs_dp_vs_direct']:.4f} | "
                     f"{r['max_abs_dp_vs_direct']:.4f} | {r['n_scored']} |")
    return head + "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path, *, title: str) -> Path:
    """Accuracy against strength, one panel per family, the clean accuracy dashed."""
    from wsi_toolkit import plots

    clean = rows[0]["accuracy"]
    families = list(dict.fromkeys(r["family"] for r in rows[1:]))
    cols = min(4, max(1, len(families)))
    n_rows = -(-len(families) // cols)
    fig = plots.new_figure((3.6 * cols, 3.0 * n_rows + 0.6), layout="constrained")
    accs = [r["accuracy"] for r in rows if r.get("accuracy") is not None]
    lo = min(accs) - 0.02 if accs else 0.0
    for k, fam in enumerate(families):
        ax = fig.add_subplot(n_rows, cols, k + 1)
        sub = [r for r in rows if r["family"] == fam]
        y = [np.nan if r.get("accuracy") is None else r["accuracy"] for r in sub]
        ax.plot(range(len(sub)), y, "o-")
        if clean is not None:
            ax.axhline(clean, ls="--", color="grey", lw=1, label="clean")
        ax.set_xticks(range(len(sub)), [r["strength"] for r in sub], rotation=30, ha="right", fontsize=6)
        ax.set_ylim(lo, 1.0)
        ax.set_title(fam, fontsize=9)
        ax.set_ylabel("accuracy", fontsize=8)
    fig.suptitle(title, fontsize=9)
    return plots.save_figure(fig, path)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("package", type=Path)
    ap.add_argument("--data", type=Path, required=True, help="the PCam folder the package was trained on")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--splits", nargs="+", default=["test"], help="held-back parts of the package's splits")
    ap.add_argument("--max-patches", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0, help="seeds the random stain jitter and --max-patches' pick")
    ap.add_argument("--families", nargs="+", default=None, help="only these families (default: all)")
    ap.add_argument("--slide-path", action="store_true",
                    help="also lay the patches out as mosaic slides and run them through wsi-infer")
    ap.add_argument("--slide-forms", nargs="+", default=["40x-jpeg85-svs"], choices=list(fid.FORMS))
    ap.add_argument("--wsi-infer-args", nargs="*", default=[], help="extra wsi-infer options (e.g. --runtime torch)")
    args = ap.parse_args(argv)

    from patch_model.patch_eval import package_splits
    from wsi_toolkit.atomic import write_json_atomic, write_text_atomic

    cfg = fid.model_config(args.package)
    if abs(cfg.spacing_um_px - fid.MODEL_MPP) > 1e-6:
        raise SystemExit(f"{args.package}: the perturbations are defined at {fid.MODEL_MPP} um/px; this package "
                         f"reads {cfg.spacing_um_px}")
    suite = perturbations()
    known = sorted({p.family for p in suite})
    bad = sorted(set(args.families or ()) - set(known))
    if bad:
        raise SystemExit(f"unknown families {bad}; have {known}")
    prob_col = f"prob_{cfg.class_names[cfg.tumor_index()]}"
    args.out.mkdir(parents=True, exist_ok=True)
    patches, labels = fid.held_back_patches(args.package, args.data, args.splits, args.max_patches, seed=args.seed)
    print(f"{len(patches)} held-back patches ({int(labels.sum())} tumour) from {args.splits}", flush=True)
    t0 = time.perf_counter()
    clean = fid.direct_scores(args.package, patches)
    rows = [{"family": "clean", "strength": "-", **row_metrics(clean, labels, clean, None)}]
    clean_acc = rows[0]["accuracy"]
    rows[0]["accuracy_change_points"] = 0.0
    for index, pert in enumerate(suite):  # the index in the whole suite seeds it: --families changes no draw
        if args.families and pert.family not in args.families:
            continue
        p = fid.direct_scores(args.package, apply(pert, patches, args.seed, index))
        rows.append({"family": pert.family, "strength": pert.strength, **row_metrics(p, labels, clean, clean_acc)})
        print(json.dumps(rows[-1]), flush=True)
    if args.slide_path:
        for row in slide_rows(args, patches, labels, clean, clean_acc, prob_col):
            rows.append(row)
            print(json.dumps(row), flush=True)
    parts = package_splits(cfg, args.data)
    leaky = any(bool(getattr(parts[name], "leaky", False)) for name in args.splits if name in parts)
    synthetic = bool(cfg.extra.get("synthetic", False))
    note = ("SYNTHETIC model; " if synthetic else "") + ("LEAKY random split; " if leaky else "")
    record = {"package": str(args.package), "data": str(args.data), "splits": args.splits, "n_patches": len(patches),
              "n_tumor": int(labels.sum()), "seed": args.seed, "leaky": leaky, "synthetic": synthetic,
              "moved_threshold": MOVED_DP, "seconds": round(time.perf_counter() - t0, 2), "rows": rows}
    write_json_atomic(args.out / "robustness.json", record)
    write_text_atomic(args.out / "robustness.md", table(rows))
    plot(rows, args.out / "robustness.png",
         title=f"{args.package}: {len(patches)} held-back patches ({note}accuracy vs perturbation strength)")
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
