"""``wsi-eval --results OUT --annotations DIR [--out DIR]``: Camelyon16 lesion FROC and slide-level AUC.

The rules it applies: ``docs/camelyon16.md``.
"""

from __future__ import annotations

from pathlib import Path
from typing import NoReturn

import click

from wsi_toolkit.cli._common import console, run_click, setup_logging
from wsi_toolkit.evaluate import CAMELYON16_L0_MPP, SLIDE_SCORES, EvalConfig, evaluate_results, format_summary


@click.command(name="wsi-eval", context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--results", "results_dir", required=True, type=click.Path(path_type=Path),
              help="wsi-infer output folder (<slide>/heatmap.tif + run.json), and/or a folder of <slide>.csv "
                   "detection files (prob,x,y in level-0 px: the Camelyon16 submission format).")
@click.option("--annotations", "annotations_dir", required=True, type=click.Path(path_type=Path),
              help="Ground truth by slide name: <slide>.xml (ASAP; groups _0/_1/Tumor, minus _2/Exclusion), "
                   "<slide>.geojson, or a mask TIFF <slide>_mask.tif. A slide without one is normal.")
@click.option("--out", "out_dir", type=click.Path(path_type=Path), default=None,
              help="Output folder [default: RESULTS/eval].")
@click.option("--nms-radius-um", type=float, default=EvalConfig.nms_radius_um, show_default=True,
              help="Heatmap detections: suppression radius of the local maxima.")
@click.option("--min-prob", type=float, default=EvalConfig.min_prob, show_default=True,
              help="Heatmap detections: lowest probability kept (low, to trace the FROC curve).")
@click.option("--slide-score", type=click.Choice(sorted(SLIDE_SCORES)), default=EvalConfig.slide_score,
              show_default=True,
              help="Slide score for the ROC: max = highest heatmap probability, top10 = mean of the 10 highest.")
@click.option("--mask-value", type=int, default=None,
              help="Tumour pixel value in mask TIFFs [default: any non-zero; CAMELYON16 data-release masks: 2].")
@click.option("--mpp", type=float, default=None,
              help=f"Level-0 um/px of slides given as detection CSVs [default: the mask's tags, else "
                   f"{CAMELYON16_L0_MPP}].")
@click.option("-v", "--verbose", count=True)
def _command(results_dir, annotations_dir, out_dir, nms_radius_um, min_prob, slide_score, mask_value, mpp,
             verbose) -> int:
    """Lesion-level FROC (Camelyon16 rules) and slide-level ROC AUC of tumour detections.

    Writes metrics.json (froc, sensitivities at 1/4..8 FP per slide, slide_auc, counts),
    slides.csv, froc.csv, froc.png, roc.png and detections/<slide>.csv, and prints a summary.
    """
    setup_logging(verbose)
    config = EvalConfig(nms_radius_um=nms_radius_um, min_prob=min_prob, slide_score=slide_score,
                        mask_value=mask_value, mpp=mpp)
    report = evaluate_results(results_dir, annotations_dir, out_dir, config)
    click.echo(format_summary(report))
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_click(_command, argv)


def console_main() -> NoReturn:
    """The ``wsi-eval`` console script (:func:`~wsi_toolkit.cli._common.console`)."""
    console(main)


if __name__ == "__main__":  # pragma: no cover
    console_main()
