"""Before/after: two or more ``scripts/bench_robustness.py`` results side by side, row by row.

    python scripts/compare_robustness.py BASE/robustness.json AFTER/robustness.json [...] \\
        [--names base scanner ...] [--out TABLE.md]

Prints a Markdown table: per family and strength, each package's accuracy (its change from its own
clean accuracy, in points), ROC AUC and flips against its own clean answers, then the worst change of
each package over the rows at the issue's "moderate" strengths (JPEG Q=70, blur sigma 1 px, HED 0.05).
Every result must come from the same patches (same data, splits and seed): checked, refused otherwise.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

MODERATE = (("jpeg", "Q=70"), ("blur", "sigma 1 px"), ("hed", "sigma 0.05"))


def load(path: Path) -> dict:
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
        rows = {(r["family"], r["strength"]): r for r in record["rows"]}
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise SystemExit(f"{path}: not a bench_robustness.py result ({exc}); give OUT/robustness.json") from None
    return {"record": record, "rows": rows}


def same_patches(results: list[dict], paths: list[Path]) -> None:
    keys = [(r["record"].get("data"), tuple(r["record"].get("splits") or ()), r["record"].get("seed"),
             r["record"].get("n_patches")) for r in results]
    if len(set(keys)) != 1:
        detail = "; ".join(f"{p}: data {k[0]}, splits {list(k[1])}, seed {k[2]}, {k[3]} patches"
                           for p, k in zip(paths, keys))
        raise SystemExit(f"the results are not on the same patches ({detail}); rerun them with the same "
                         "--data, --splits and --seed")


def table(results: list[dict], names: list[str]) -> str:
    order: list[tuple[str, str]] = []
    for r in results:
        order += [k for k in r["rows"] if k not in order]
    head = "| family | strength | " + " | ".join(f"{n}: accuracy (change) | {n}: AUC | {n}: flips"
                                               for n in names) + " |"
    lines = [head, "|" + "---|" * (2 + 3 * len(names))]
    for key in order:
        cells = []
        for r in results:
            row = r["rows"].get(key)
            if row is None:
                cells += ["-", "-", "-"]
                continue
            cells += [f"{row['accuracy']:.4f} ({row['accuracy_change_points']:+.2f})", f"{row['roc_auc']:.4f}",
                      str(row["flips_vs_direct"])]
        lines.append(f"| {key[0]} | {key[1]} | " + " | ".join(cells) + " |")
    worst = []
    for n, r in zip(names, results):
        changes = [r["rows"][k]["accuracy_change_points"] for k in MODERATE if k in r["rows"]]
        worst.append(f"{n}: {min(changes):+.2f}" if changes else f"{n}: -")
    lines.append("")
    lines.append("worst accuracy change at moderate strength (JPEG Q=70, blur sigma 1 px, HED 0.05), points: "
                 + ", ".join(worst))
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("results", type=Path, nargs="+", help="OUT/robustness.json of bench_robustness.py runs")
    ap.add_argument("--names", nargs="+", default=None, help="a column name per result [default: its package]")
    ap.add_argument("--out", type=Path, default=None, help="also write the table here")
    args = ap.parse_args(argv)
    if len(args.results) < 2:
        ap.error("give at least two results to compare")
    if args.names is not None and len(args.names) != len(args.results):
        ap.error(f"--names: {len(args.names)} names for {len(args.results)} results")
    results = [load(p) for p in args.results]
    same_patches(results, args.results)
    names = args.names or [Path(r["record"].get("package", f"result {i}")).name for i, r in enumerate(results)]
    text = table(results, names)
    sys.stdout.write(text)
    if args.out is not None:
        args.out.write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
