"""``wsi-infer SLIDE_OR_DIR... --model DIR --out DIR``: tumour heatmaps, overlays and regions per slide."""

from __future__ import annotations

from pathlib import Path

import click

from wsi_toolkit.cli._common import check_mpp_option, run_click, setup_logging
from wsi_toolkit.inference import InferenceConfig
from wsi_toolkit.pipeline import RunConfig, run_batch
from wsi_toolkit.slide import find_slides


class _BatchSize(click.ParamType):
    name = "N|auto"

    def convert(self, value, param, ctx):
        if value == "auto" or isinstance(value, int):
            return value
        try:
            n = int(value)
        except ValueError:
            self.fail(f"{value!r} is not a positive integer or 'auto'", param, ctx)
        if n <= 0:
            self.fail(f"{value!r} is not a positive integer or 'auto'", param, ctx)
        return n


@click.command(name="wsi-infer", context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("slides", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--model", "model_dir", required=True, type=click.Path(path_type=Path),
              help="Model package folder (config.json + torchscript_model.pt, WSInfer format).")
@click.option("--out", "out_dir", required=True, type=click.Path(path_type=Path), help="Output folder.")
@click.option("--mpp", type=float, default=None, callback=check_mpp_option,
              help="Micrometres per level-0 pixel; overrides slide metadata.")
@click.option("--stride-px", type=int, default=None,
              help="Grid stride in model pixels [default: patch/3 for centre-label models (PCam: 32), else patch].")
@click.option("--merge", type=click.Choice(["centre", "mean"]), default=None,
              help="centre: each patch paints its centre cell (PCam labels); mean: whole footprint, overlaps "
                   "averaged [default: from the model's label semantics].")
@click.option("--threshold", type=float, default=0.5, show_default=True, help="Probability for tumour regions.")
@click.option("--min-tissue", type=float, default=0.5, show_default=True,
              help="Predict a grid cell when tissue covers at least this fraction of it.")
@click.option("--batch-size", type=_BatchSize(), default="auto", show_default=True,
              help="Patches per forward pass; auto: 64 on CPU, on CUDA what fills half the free GPU memory "
                   "(at most 1024).")
@click.option("--workers", type=int, default=None,
              help="Reader processes [default: 1 on CPU (the network is the bottleneck there), min(4, cpus - 1) "
                   "on a GPU].")
@click.option("--device", default="auto", show_default=True, help="auto | cpu | cuda | cuda:N | mps")
@click.option("--precision", type=click.Choice(["auto", "fp32", "bf16", "fp16"]), default="auto", show_default=True,
              help="auto: mixed precision (bf16, else fp16) on CUDA; fp32 on CPU and MPS, so every CPU gives the "
                   "same heatmap. bf16 on a CPU is opt-in (fast with AVX512-BF16/AMX; probabilities move ~1e-2).")
@click.option("--backend", type=click.Choice(["auto", "openslide", "tifffile"]), default="auto", show_default=True)
@click.option("--overwrite", is_flag=True,
              help="Redo slides that already finished [default: redo only those whose slide, model or output "
                   "settings changed].")
@click.option("--no-progress", is_flag=True)
@click.option("-v", "--verbose", count=True)
def _command(slides, model_dir, out_dir, mpp, stride_px, merge, threshold, min_tissue, batch_size, workers, device,
             precision, backend, overwrite, no_progress, verbose) -> int:
    """Tumour-probability heatmaps for SLIDES (files and folders mixed).

    Per slide, in OUT/<slide-stem>/ (the stem made a safe, unique folder name): heatmap.tif,
    overlay.png, tumor.geojson (QuPath), tumor.xml (ASAP), tiles.csv, run.json; and OUT/summary.csv.
    A failed (or missing, or unreadable) slide is recorded and the others go on; the exit status
    is 1 if any slide failed. A finished slide is skipped only if its model and settings are
    unchanged; runs sharing OUT share the slides.
    """
    setup_logging(verbose)
    # Each argument on its own: one unreadable folder is a failed entry, not the end of the batch
    # (a missing or unreadable slide file is recorded by run_batch like any failed slide).
    paths, failures = [], []
    for arg in slides:
        try:
            paths.extend(find_slides([arg]))
        except OSError as exc:
            failures.append((arg, f"{arg}: cannot list this folder ({exc.strerror or exc}); make it readable "
                                  "(chmod +rx) or pass the slide files"))
    if not paths and not failures:
        raise click.UsageError(f"no slides found in {', '.join(map(str, slides))}")
    config = RunConfig(
        mpp_override=mpp, stride_px=stride_px, merge=merge, threshold=threshold, min_tissue_fraction=min_tissue,
        overwrite=overwrite, backend=backend,
        inference=InferenceConfig(batch_size=batch_size, workers=workers, device=device, precision=precision,
                                  progress=not no_progress),
    )
    results = run_batch(paths, model_dir, out_dir, config, failures=failures)
    for r in results:
        if r.status == "failed":
            click.echo(f"FAILED   {r.slide}\n  {r.error}", err=True)
        elif r.status == "busy" or r.slide_score is None:
            click.echo(f"{r.status:<8} {r.slide}: {r.error or 'no score recorded'} -> {r.out_dir}")
        else:
            click.echo(f"{r.status:<8} {r.slide}: score {r.slide_score:.3f}, tumour {r.tumor_area_mm2:.3f} mm^2, "
                       f"{r.n_patches} patches -> {r.out_dir}")
    n_bad = sum(r.status == "failed" for r in results)
    click.echo(f"summary: {Path(out_dir) / 'summary.csv'}" + (f"; {n_bad} of {len(results)} slides failed" if n_bad else ""),
               err=bool(n_bad))
    return 1 if n_bad else 0


def main(argv: list[str] | None = None) -> int:
    return run_click(_command, argv)


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
