"""What an augmentation costs per epoch: ``--augment`` values timed on the same real patches.

For each value (alternating, ``--repeats`` rounds) on the first ``--n`` patches of the train part of a
PCam folder: (1) the train DataLoader alone, one pass (reading + item and batch transforms, no
model; with ``--workers 0`` also its CPU time, steadier than wall time on a busy machine), and
(2) one ``learn.fit(1)`` epoch of ``--arch`` (random initialisation: speed only) with ``--workers``
loader processes. Prints the medians and the seconds each value adds per 1000 images over the first.

    python scripts/bench_augment.py --data PCAM_DIR [--n 320] [--augment dihedral dihedral+scanner]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_harness import cpu_flags, loadavg  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--n", type=int, default=320, help="train patches (the first N of the train part)")
    ap.add_argument("--augment", nargs="+", default=["dihedral", "dihedral+scanner"])
    ap.add_argument("--arch", default="efficientnet_lite0")
    ap.add_argument("--size", type=int, default=96)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--no-fit", action="store_true", help="time the DataLoader pass only")
    args = ap.parse_args(argv)

    import torch

    from patch_model._fastai import ChannelsLast, set_seed
    from patch_model.archs import build_learner, resolve_arch
    from patch_model.data import open_splits
    from patch_model.loaders import build_dataloaders

    parts = open_splits(args.data, valid_fraction=0.1, seed=42)
    splits = {"train": torch.utils.data.Subset(parts["train"], range(min(args.n, len(parts["train"])))),
              "valid": torch.utils.data.Subset(parts["valid"], range(min(args.batch_size, len(parts["valid"]))))}
    spec = resolve_arch(args.arch)
    times: dict[str, dict[str, list[float]]] = {a: {"loader": [], "loader_cpu": [], "epoch": []} for a in args.augment}
    for rep in range(args.repeats):
        for aug in args.augment:
            set_seed(rep)
            data = build_dataloaders(splits, size=args.size, mean=spec.mean, std=spec.std, batch_size=args.batch_size,
                                     workers=args.workers, augment=aug)
            t, c = time.perf_counter(), time.process_time()
            for _ in data.dls.train:
                pass
            times[aug]["loader"].append(time.perf_counter() - t)
            if args.workers == 0:  # the loading ran in this process: its CPU time, steadier than wall on a busy machine
                times[aug]["loader_cpu"].append(time.process_time() - c)
            if not args.no_fit:
                learn = build_learner(data, spec, pretrained=False, monitor_metrics=False)
                if spec.weights_wheel:
                    learn.add_cb(ChannelsLast())
                with learn.no_bar(), learn.no_logging():
                    t = time.perf_counter()
                    learn.fit(1, 1e-3)
                    times[aug]["epoch"].append(time.perf_counter() - t)
            print(json.dumps({"round": rep, "augment": aug, **{k: v[-1] for k, v in times[aug].items() if v}}),
                  flush=True)
    n_img = len(splits["train"]) // args.batch_size * args.batch_size  # fastai drops the last partial batch
    base = args.augment[0]
    summary = {"n_train_images_per_epoch": n_img, "arch": args.arch, "size": args.size, "workers": args.workers,
               "batch_size": args.batch_size, "loadavg": loadavg(), "cpu": cpu_flags().get("cpu_model"), "rows": []}
    for aug in args.augment:
        row: dict = {"augment": aug}
        for k in ("loader", "loader_cpu", "epoch"):
            if times[aug][k]:
                med, med0 = statistics.median(times[aug][k]), statistics.median(times[base][k])
                row[f"{k}_s_median"] = round(med, 2)
                row[f"{k}_s_added_per_1000_images"] = round((med - med0) / n_img * 1000, 2)
        summary["rows"].append(row)
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
