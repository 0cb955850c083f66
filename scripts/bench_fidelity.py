"""Slide-path fidelity: what a slide does to the model's answers, per pyramid level read.

Held-back patches of a PCam set (the package's own test/valid parts, rebuilt as it was trained) are
laid edge to edge as mosaic slides in the forms scanners write (``--forms``):

- ``10x-lossless``: level 0 at 0.972 um/px, the patches' own pixels, deflate tiles, 2x levels;
- ``10x-jpeg85``: the same, every level JPEG Q=85;
- ``40x-lossless``: level 0 at 0.243 um/px (4x bicubic upsample), levels by 2x box reduction, deflate;
- ``40x-jpeg85-svs``: the same as an Aperio-style SVS with every level JPEG Q=85 (what the issue measured);
- ``40x-jpeg85-4x``: a TIFF with 4x levels (0.243 and 0.972 um/px), JPEG Q=85;
- ``20x-jpeg85``: level 0 at 0.5 um/px (1.944x bicubic upsample; no level near 0.972), 2x levels, JPEG Q=85.

Each mosaic is run through ``wsi-infer`` at its defaults (stride 32) with each ``--read-from`` option
whose level differs on that slide (options reading the same level give the same pixels and are run
once), and through WSInfer 0.6.x (``--wsinfer BIN``) at its defaults. Each patch's probability is
read where a grid cell sees exactly that patch (wsi-infer: the tiles.csv row whose box is the patch;
WSInfer: the row whose box centre lies in the patch) and scored against the labels and against the
patches scored directly (torch fp32): accuracy, ROC AUC, false positives, tumour found, mean |dp|,
flips at 0.5, patches/s. Accuracy on Kaggle-layout patches is on a random split: LEAKY.

    python scripts/bench_fidelity.py PACKAGE --data PCAM_DIR --out OUT [--wsinfer ~/.venvs/wsinfer/bin/wsinfer]

Writes ``OUT/fidelity.json`` (every row) and ``OUT/fidelity.md`` (the table); mosaics and runs under OUT.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import shlex
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_harness import run_measured  # noqa: E402

MODEL_MPP = 0.972
MOSAIC_LABEL = "mosaic of real PCam patches laid edge to edge by scripts/bench_fidelity.py (not a scanned slide)"


@dataclass(frozen=True)
class Form:
    """How a mosaic is written: level-0 um/px, the reduction from each level to the next, the codec."""

    name: str
    l0_mpp: float
    factors: tuple[int, ...]  # level k+1 = level k reduced by factors[k] (box average)
    jpeg_quality: int | None  # None: lossless (deflate)
    svs: bool = False


FORMS = {f.name: f for f in [
    Form("10x-lossless", 0.972, (2, 2), None),
    Form("10x-jpeg85", 0.972, (2, 2), 85),
    Form("40x-lossless", 0.243, (2, 2, 2, 2), None),
    Form("40x-jpeg85-svs", 0.243, (2, 2, 2, 2), 85, svs=True),
    Form("40x-jpeg85-4x", 0.243, (4, 4), 85),
    Form("20x-jpeg85", 0.5, (2, 2, 2), 85),
]}


def held_back_patches(package_dir: Path, data: Path, splits: list[str], max_patches: int | None,
                      seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(patches (N, 96, 96, 3) uint8, labels (N,)) of ``splits`` as the package was trained on ``data``."""
    from patch_model.patch_eval import package_splits

    parts = package_splits(model_config(package_dir), data)
    xs, ys = [], []
    for name in splits:
        if name not in parts:
            raise SystemExit(f"{data}: the package's splits have no {name!r} part (have {sorted(parts)})")
        ds = parts[name]
        for i in range(len(ds)):
            x, y = ds[i]
            xs.append(np.asarray(x, np.uint8))
            ys.append(int(y))
    x, y = np.stack(xs), np.asarray(ys, np.int64)
    if max_patches is not None and len(x) > max_patches:
        pick = np.sort(np.random.default_rng(seed).choice(len(x), max_patches, replace=False))
        x, y = x[pick], y[pick]
    return x, y


def model_config(package_dir: Path):
    """The package's validated ``config.json`` (no model loaded)."""
    from wsi_toolkit.model_package import CONFIG_NAME, ModelConfig, read_config_json

    path = Path(package_dir) / CONFIG_NAME
    return ModelConfig.from_dict(read_config_json(path), source=path)


def mosaic_grid(n: int) -> tuple[int, int]:
    """(rows, cols) of the mosaic of ``n`` patches: near square."""
    cols = math.ceil(math.sqrt(n))
    return math.ceil(n / cols), cols


def mosaic(patches: np.ndarray) -> np.ndarray:
    """The patches edge to edge, row-major; cells without a patch are white glass."""
    rows, cols = mosaic_grid(len(patches))
    p = patches.shape[1]
    out = np.full((rows * p, cols * p, 3), 255, np.uint8)
    for i, patch in enumerate(patches):
        r, c = divmod(i, cols)
        out[r * p:(r + 1) * p, c * p:(c + 1) * p] = patch
    return out


def _box_reduce(a: np.ndarray, k: int) -> np.ndarray:
    h, w = a.shape[:2]
    hp, wp = math.ceil(h / k) * k, math.ceil(w / k) * k
    if (hp, wp) != (h, w):  # pad by edge replication so the last block is an average of real pixels
        a = np.pad(a, ((0, hp - h), (0, wp - w), (0, 0)), mode="edge")
    return np.round(a.reshape(hp // k, k, wp // k, k, 3).mean(axis=(1, 3), dtype=np.float64)).astype(np.uint8)


def write_mosaic_slide(path: Path, tenx: np.ndarray, form: Form) -> Path:
    """``tenx`` (the mosaic at 0.972 um/px) written as ``form``: upsampled (bicubic) to the form's
    level 0, levels by box reduction, tiled, every level compressed alike. Returns the path."""
    import tifffile
    from PIL import Image

    scale = MODEL_MPP / form.l0_mpp
    if abs(scale - 1) < 1e-9:
        level0 = tenx
    else:
        size = (round(tenx.shape[1] * scale), round(tenx.shape[0] * scale))
        level0 = np.asarray(Image.fromarray(tenx).resize(size, Image.Resampling.BICUBIC))
    levels = [level0]
    for k in form.factors:
        levels.append(_box_reduce(levels[-1], k))
    h0, w0 = level0.shape[:2]
    comp = ({"compression": "jpeg", "compressionargs": {"level": form.jpeg_quality}} if form.jpeg_quality
            else {"compression": "zlib"})
    tmp = path.with_name(path.name + ".part")
    with tifffile.TiffWriter(tmp, bigtiff=w0 * h0 * 3 > 2**31) as tw:
        ds = 1
        for i, lv in enumerate(levels):
            if i:
                ds *= form.factors[i - 1]
            kw: dict = dict(tile=(256, 256), photometric="rgb", metadata=None, **comp)
            if form.svs:
                h, w = lv.shape[:2]
                head = f"Aperio Image Library v12.0.15 \r\n{w0}x{h0} [0,0 {w0}x{h0}] (256x256)"
                head += f" -> {w}x{h}" if i else ""
                q = f"JPEG/RGB Q={form.jpeg_quality}" if form.jpeg_quality else "RAW"
                kw["description"] = f"{head} {q}|AppMag = 40|MPP = {form.l0_mpp:.6f}|Title = {MOSAIC_LABEL}"
            else:
                ppcm = 1e4 / (form.l0_mpp * ds)
                kw.update(resolution=(ppcm, ppcm), resolutionunit="CENTIMETER", subfiletype=1 if i else 0,
                          description=MOSAIC_LABEL if i == 0 else None)
            tw.write(lv, **kw)
    os.replace(tmp, path)
    return path


def cell_probs_wsi_infer(tiles_csv: Path, n: int, form: Form, prob_col: str) -> np.ndarray:
    """Each mosaic patch's probability from wsi-infer's tiles.csv: the row whose box is the patch
    (within 1 level-0 px); NaN where no cell sees exactly that patch (e.g. no tissue)."""
    p_l0 = 96 * MODEL_MPP / form.l0_mpp
    _, cols = mosaic_grid(n)
    out = np.full(n, np.nan)
    with open(tiles_csv, newline="") as f:
        for row in csv.DictReader(f):
            x, y, w = float(row["minx"]), float(row["miny"]), float(row["width"])
            c, r = round(x / p_l0), round(y / p_l0)
            i = r * cols + c
            if abs(x - c * p_l0) <= 1 and abs(y - r * p_l0) <= 1 and abs(w - p_l0) <= 1.5 and 0 <= c < cols and i < n:
                out[i] = float(row[prob_col])
    return out


def cell_probs_wsinfer(csv_path: Path, n: int, form: Form, prob_col: str) -> np.ndarray:
    """Each mosaic patch's probability from WSInfer's CSV: the row whose box centre is in the patch
    (closest to the patch's own box where several are); NaN where none."""
    p_l0 = 96 * MODEL_MPP / form.l0_mpp
    _, cols = mosaic_grid(n)
    out, best = np.full(n, np.nan), np.full(n, np.inf)
    with open(csv_path, newline="") as f:
        for row in csv.DictReader(f):
            x, y, w, h = (float(row[k]) for k in ("minx", "miny", "width", "height"))
            c, r = int((x + w / 2) // p_l0), int((y + h / 2) // p_l0)
            i = r * cols + c
            if not (0 <= c < cols and 0 <= i < n):
                continue
            off = abs(x - c * p_l0) + abs(y - r * p_l0)
            if off < best[i]:
                best[i], out[i] = off, float(row[prob_col])
    return out


def score(p: np.ndarray, labels: np.ndarray, direct: np.ndarray) -> dict:
    """Metrics of ``p`` over the patches it has (not NaN)."""
    from sklearn.metrics import roc_auc_score

    ok = ~np.isnan(p)
    q, y, d = p[ok], labels[ok], direct[ok]
    pred = q >= 0.5
    return {
        "n_scored": int(ok.sum()), "n_missing": int((~ok).sum()),
        "accuracy": round(float((pred == (y == 1)).mean()), 4) if ok.any() else None,
        "roc_auc": round(float(roc_auc_score(y, q)), 4) if ok.any() and len(set(y)) == 2 else None,
        "false_positives": int((pred & (y == 0)).sum()), "n_normal": int((y == 0).sum()),
        "tumour_found": int((pred & (y == 1)).sum()), "n_tumour": int((y == 1).sum()),
        "mean_abs_dp_vs_direct": round(float(np.abs(q - d).mean()), 5) if ok.any() else None,
        "max_abs_dp_vs_direct": round(float(np.abs(q - d).max()), 5) if ok.any() else None,
        "flips_vs_direct": int(((q >= 0.5) != (d >= 0.5)).sum()),
    }


def direct_scores(package_dir: Path, patches: np.ndarray, batch: int = 128) -> np.ndarray:
    """Tumour probability of each patch fed to the package's model directly (torch fp32, CPU)."""
    import torch

    from wsi_toolkit.model_package import load_model_package

    pkg = load_model_package(package_dir, device="cpu")
    out = []
    with torch.inference_mode():
        for i in range(0, len(patches), batch):
            out.append(pkg.predict_proba(torch.from_numpy(patches[i:i + batch])).numpy())
    return np.concatenate(out).astype(np.float64)


def levels_read(slide: Path) -> dict[str, int]:
    """The level each ``--read-from`` option reads on ``slide`` at the model's um/px."""
    from wsi_toolkit.slide import READ_FROM, open_slide

    with open_slide(slide) as s:
        return {r: s.read_level_for(MODEL_MPP, r) for r in READ_FROM}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("package", type=Path)
    ap.add_argument("--data", type=Path, required=True, help="the PCam folder the package was trained on")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--splits", nargs="+", default=["test", "valid"], help="held-back parts laid out as the mosaic")
    ap.add_argument("--max-patches", type=int, default=None)
    ap.add_argument("--forms", nargs="+", default=list(FORMS), choices=list(FORMS))
    ap.add_argument("--read-from", nargs="+", default=["nearest", "finer", "level0"],
                    choices=["nearest", "finer", "level0"])
    ap.add_argument("--wsi-infer-args", default="", help="extra wsi-infer options, one quoted string (e.g. "
                    "'--runtime torch')")
    ap.add_argument("--wsinfer", default=None, help="a WSInfer 0.6.x `wsinfer` executable (its own venv)")
    args = ap.parse_args(argv)

    cfg = model_config(args.package)
    if (cfg.patch_size_pixels, cfg.spacing_um_px) != (96, MODEL_MPP):
        raise SystemExit(f"{args.package}: the mosaic is of 96 px patches at {MODEL_MPP} um/px; this package reads "
                         f"{cfg.patch_size_pixels} px at {cfg.spacing_um_px}")
    prob_col = f"prob_{cfg.class_names[cfg.tumor_index()]}"
    args.out.mkdir(parents=True, exist_ok=True)
    patches, labels = held_back_patches(args.package, args.data, args.splits, args.max_patches)
    print(f"{len(patches)} held-back patches ({int(labels.sum())} tumour) from {args.splits}", flush=True)
    t = time.perf_counter()
    direct = direct_scores(args.package, patches)
    rows = [{"form": "(patches)", "path": "scored directly (torch fp32)", "level_read": None,
             **score(direct, labels, direct), "patches_per_s": round(len(patches) / (time.perf_counter() - t), 1)}]
    print(json.dumps(rows[-1]), flush=True)
    tenx = mosaic(patches)
    bin_dir = Path(sys.executable).parent
    (args.out / "slides").mkdir(exist_ok=True)
    for name in args.forms:
        form = FORMS[name]
        slide = write_mosaic_slide(args.out / "slides" / f"mosaic_{name}.{'svs' if form.svs else 'tif'}", tenx, form)
        done: dict[int, dict] = {}
        for read_from in args.read_from:
            level = levels_read(slide)[read_from]
            if level in done:  # the same level, the same pixels: the run already made
                rows.append({**done[level], "path": f"wsi-infer --read-from {read_from}",
                             "same_as": done[level]["path"]})
                print(json.dumps(rows[-1]), flush=True)
                continue
            out = args.out / "runs" / name / read_from
            shutil.rmtree(out, ignore_errors=True)
            m = run_measured([str(bin_dir / "wsi-infer"), str(slide), "--model", str(args.package), "--out", str(out),
                              "--read-from", read_from, "--no-progress", "--cache-dir", str(args.out / "cache"),
                              *shlex.split(args.wsi_infer_args)])
            row: dict = {"form": name, "path": f"wsi-infer --read-from {read_from}", "level_read": level,
                         "returncode": m["returncode"], "seconds_wall": round(m["seconds"], 2)}
            run_json = out / slide.stem / "run.json"
            if m["returncode"] == 0 and run_json.exists():
                run = json.loads(run_json.read_text())
                p = cell_probs_wsi_infer(out / slide.stem / "tiles.csv", len(patches), form, prob_col)
                tim, rt = run["timings"], run.get("runtime", {})
                row.update(score(p, labels, direct), n_patches_run=tim.get("n_patches"),
                           patches_per_s=tim.get("patches_per_s"), runtime=f"{rt.get('runtime')} {rt.get('precision')}")
            else:
                row["output_tail"] = m["output_tail"][-800:]
            done[level] = row
            rows.append(row)
            print(json.dumps(row), flush=True)
        if args.wsinfer:
            rows.append(run_wsinfer_on(args.wsinfer, slide, args.package, args.out / "wsinfer" / name, form,
                                       patches, labels, direct, prob_col))
            print(json.dumps(rows[-1]), flush=True)
    (args.out / "fidelity.json").write_text(json.dumps({"n_patches": len(patches), "splits": args.splits,
                                                         "rows": rows}, indent=1))
    (args.out / "fidelity.md").write_text(table(rows))
    print(table(rows))
    return 0


def run_wsinfer_on(wsinfer: str, slide: Path, pkg: Path, work: Path, form: Form, patches, labels, direct,
                   prob_col: str) -> dict:
    """WSInfer at its defaults on ``slide`` (offline: an empty model registry, HF_HUB_OFFLINE)."""
    shutil.rmtree(work, ignore_errors=True)
    (work / "in").mkdir(parents=True)
    (work / "in" / slide.name).symlink_to(slide.resolve())
    reg = Path.home() / ".wsinfer-zoo" / "wsinfer-zoo-registry.json"
    if not reg.exists():
        reg.parent.mkdir(parents=True, exist_ok=True)
        reg.write_text(json.dumps({"models": {}}))
    m = run_measured([wsinfer, "run", "--wsi-dir", str(work / "in"), "--results-dir", str(work / "out"),
                      "--model-path", str(pkg / "torchscript_model.pt"), "--config", str(pkg / "config.json")],
                     env=dict(os.environ, HF_HUB_OFFLINE="1"))
    row: dict = {"form": form.name, "path": "WSInfer 0.6 (defaults)", "level_read": 0, "returncode": m["returncode"],
                 "seconds_wall": round(m["seconds"], 2)}
    csvs = list((work / "out" / "model-outputs-csv").glob("*.csv"))
    if m["returncode"] == 0 and csvs:
        p = cell_probs_wsinfer(csvs[0], len(patches), form, prob_col)
        n_run = sum(1 for _ in open(csvs[0])) - 1
        row.update(score(p, labels, direct), n_patches_run=n_run, patches_per_s=round(n_run / m["seconds"], 1))
    else:
        row["output_tail"] = m["output_tail"][-800:]
    return row


def table(rows: list[dict]) -> str:
    head = ("| mosaic | path | level | accuracy | ROC AUC | false pos. | tumour found | mean abs dp vs direct | "
            "flips vs direct | scored | patches/s |\n|---|---|---|---|---|---|---|---|---|---|---|\n")
    lines = []
    for r in rows:
        same = f" (= {r['same_as'].split()[-1]})" if r.get("same_as") else ""
        if r.get("accuracy") is None:
            lines.append(f"| {r['form']} | {r['path']} | {r.get('level_read')} | failed (rc {r.get('returncode')}) "
                         "| | | | | | | |")
            continue
        lines.append(
            f"| {r['form']} | {r['path']}{same} | {r.get('level_read') if r.get('level_read') is not None else ''} | "
            f"{r['accuracy']:.4f} | {r['roc_auc']:.4f} | {r['false_positives']} / {r['n_normal']} | "
            f"{r['tumour_found']} / {r['n_tumour']} | {r['mean_abs_dp_vs_direct']:.4f} | {r['flips_vs_direct']} | "
            f"{r['n_scored']} | {r.get('patches_per_s') or ''} |")
    return head + "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
