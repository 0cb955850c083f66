"""``wsi-infer SLIDE_OR_DIR... --model DIR --out DIR``: tumour heatmaps, overlays and regions per slide."""

from __future__ import annotations

import time
from pathlib import Path
from typing import NoReturn

import click

from wsi_toolkit.cli._common import check_mpp_option, console, run_click, setup_logging
from wsi_toolkit.inference import InferenceConfig, head_dropout_ps
from wsi_toolkit.model_package import ModelPackage, load_model_package
from wsi_toolkit.pipeline import RunConfig, run_batch
from wsi_toolkit.runtime.names import PRECISIONS, RUNTIMES
from wsi_toolkit.slide import READ_FROM, find_slides


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
              help="Reader threads (sharing one slide handle; 0 = read between forward passes) [default: 1 on "
                   "CPU (the network is the bottleneck there), min(4, cpus - 1) on a GPU].")
@click.option("--device", default="auto", show_default=True, help="auto | cpu | cuda | cuda:N | mps")
@click.option("--runtime", type=click.Choice(RUNTIMES), default="auto", show_default=True,
              help="auto: OpenVINO on a CPU where installed (wsi-toolkit[openvino]; its fp32 agrees with torch "
                   "within 1e-4), torch on CUDA/MPS; a model OpenVINO cannot convert runs on torch (logged).")
@click.option("--precision", type=click.Choice(PRECISIONS), default="auto",
              show_default=True,
              help="auto: mixed precision (bf16, else fp16) on CUDA; fp32 on CPU and MPS, so every CPU gives the "
                   "same heatmap. bf16 on a CPU is opt-in (fast with AVX512-BF16/AMX; probabilities move ~1e-2). "
                   "int8 (OpenVINO): the model quantized with NNCF, calibrated once per package on tissue of the "
                   "slides of the first int8 run and cached (or --calibration).")
@click.option("--calibration", type=click.Path(path_type=Path, exists=True, file_okay=False), default=None,
              help="int8: calibrate on this PCam folder (HDF5 or Kaggle layout) [default: a few hundred "
                   "patches of tissue of the slides of the package's first int8 run, drawn once and cached with "
                   "the quantized graph].")
@click.option("--ov-requests", type=_BatchSize(), default="1", show_default=True,
              help="OpenVINO infer requests in flight: 1 runs one batch at a time on every thread (LATENCY "
                   "hint); auto compiles with the THROUGHPUT hint and keeps its optimal number of requests "
                   "running while the next batches are read; N: N requests in flight on those streams. Same "
                   "probabilities either way.")
@click.option("--ov-preprocess", type=click.Choice(["graph", "torch"]), default="graph", show_default=True,
              help="OpenVINO: graph puts the package's preprocessing (uint8 -> float, layout, upsampling, "
                   "normalisation) into the compiled model (PrePostProcessor), torch runs it before the model. "
                   "Same fp32 probabilities within 1e-4; a Resize that shrinks the patch always runs in torch.")
@click.option("--read-from", type=click.Choice(list(READ_FROM)), default=InferenceConfig.read_from, show_default=True,
              help="Pyramid level the patches are read from: nearest, the level nearest the model's um/px (fewest "
                   "pixels, ~20% faster; hands the model that level's own JPEG artefacts); finer, a level at least "
                   "2x finer, handed to a resizing model at twice the pixels so its Resize makes the input in one "
                   "step; level0, level 0 (as WSInfer). Changes outputs: recorded in run.json. docs/frames.md.")
@click.option("--tta", type=click.Choice(["none", "flips", "dihedral"]), default="none", show_default=True,
              help="Test-time augmentation: each patch predicted in several orientations (flips: identity, "
                   "horizontal, vertical and both flips, 4 views; dihedral: the 8 rotations and reflections), the "
                   "heatmap the mean of the views' probabilities; adds uncertainty.tif (the views' standard "
                   "deviation), a tta_std column in tiles.csv and an uncertainty summary in run.json. The slide is "
                   "read once; the model runs views x longer.")
@click.option("--mc-dropout", "mc_dropout", type=click.IntRange(min=0), default=0, metavar="K",
              help="Monte-Carlo dropout instead of TTA (K >= 2 samples; 0: off): the backbone runs once per patch, "
                   "the classifier head K times with its dropout on (fastai vision_learner packages); the heatmap "
                   "is the samples' mean, uncertainty.tif their standard deviation (an mc_dropout_std column in "
                   "tiles.csv). Runs on torch (--runtime auto picks it); not with --tta.")
@click.option("--mc-dropout-seed", type=click.IntRange(min=0), default=0, show_default=True,
              help="Seed of the MC-dropout masks (with the patch's index): the same seed gives the same outputs.")
@click.option("--profile", is_flag=True,
              help="Print where the time went, stage by stage (process start and imports, package load, "
                   "INT8 graph, tissue, grid, model set-up, model, reads, stitching, exports) and write it "
                   "to OUT/profile.json.")
@click.option("--cache-dir", type=click.Path(path_type=Path, file_okay=False), default=None,
              help="Converted models [default: $WSI_TOOLKIT_CACHE, else ~/.cache/wsi-toolkit].")
@click.option("--check-precision", is_flag=True,
              help="Do not write outputs: run each slide as set and with torch fp32, and report max/mean |dp|, "
                   "label flips at --threshold and the tumour-area change (OUT/precision_check.json).")
@click.option("--ray", "ray_address", default=None, is_flag=False, flag_value="local", metavar="[ADDRESS|auto|local]",
              help="Run the slides on Ray workers (wsi-toolkit[ray]), one per GPU or per --cpus-per-worker CPUs: "
                   "local starts Ray here, auto joins this machine's cluster (ray start), or HOST:PORT. Slides, "
                   "model and OUT must be on a filesystem every node sees at the same path.")
@click.option("--cpus-per-worker", type=click.IntRange(min=1), default=None,
              help="With --ray: CPUs per worker [default: 1 beside a GPU, else 4 (at most the cluster's)].")
@click.option("--backend", type=click.Choice(["auto", "openslide", "tifffile"]), default="auto", show_default=True)
@click.option("--overwrite", is_flag=True,
              help="Redo slides that already finished [default: redo only those whose slide, model or output "
                   "settings changed].")
@click.option("--no-progress", is_flag=True)
@click.option("-v", "--verbose", count=True)
def _command(slides, model_dir, out_dir, mpp, stride_px, merge, threshold, min_tissue, batch_size, workers, device,
             runtime, precision, calibration, ov_requests, ov_preprocess, read_from, tta, mc_dropout, mc_dropout_seed,
             profile, cache_dir, check_precision, ray_address, cpus_per_worker, backend, overwrite, no_progress,
             verbose) -> int:
    """Tumour-probability heatmaps for SLIDES (files and folders mixed).

    Per slide, in OUT/<slide-stem>/ (the stem made a safe, unique folder name): heatmap.tif,
    overlay.png, tumor.geojson (QuPath), tumor.xml (ASAP), tiles.csv, run.json; and OUT/summary.csv.
    A failed (or missing, or unreadable) slide is recorded and the others go on; the exit status
    is 1 if any slide failed. A finished slide is skipped only if its model and settings are
    unchanged; runs sharing OUT share the slides. With --ray the same happens on a Ray cluster.
    """
    from wsi_toolkit.profiling import process_age_s

    batch_timings: dict = {"seconds_imports": process_age_s()}
    t_command = time.perf_counter()
    setup_logging(verbose)
    if ray_address is not None and check_precision:
        raise click.UsageError("--check-precision runs in one process; drop --ray")
    if cpus_per_worker is not None and ray_address is None:
        raise click.UsageError("--cpus-per-worker needs --ray")
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
    inference = InferenceConfig(batch_size=batch_size, workers=workers, device=device, precision=precision,
                                progress=not no_progress, runtime=runtime,
                                cache_dir=None if cache_dir is None else str(cache_dir),
                                calibration=None if calibration is None else str(calibration),
                                ov_requests=None if ov_requests == "auto" else ov_requests,
                                ov_preprocess=ov_preprocess, read_from=read_from, tta=tta, mc_dropout=mc_dropout,
                                mc_dropout_seed=mc_dropout_seed)
    config = RunConfig(
        mpp_override=mpp, stride_px=stride_px, merge=merge, threshold=threshold, min_tissue_fraction=min_tissue,
        overwrite=overwrite, backend=backend, inference=inference,
    )
    model: Path | ModelPackage = model_dir
    if mc_dropout and paths:
        t = time.perf_counter()
        model = load_model_package(model_dir)  # loaded once: the check and the batch share it
        batch_timings["seconds_package_load"] = time.perf_counter() - t
        head_dropout_ps(model.load_torchscript(), source=model.path)  # a package MC-dropout cannot sample: refused now
    if check_precision:
        return _check_precision(paths, model_dir, out_dir, config)
    if ray_address is not None:
        from wsi_toolkit.scale import RaySettings, run_batch_ray

        settings = RaySettings(address=ray_address, cpus_per_worker=cpus_per_worker)
        results = run_batch_ray(paths, model_dir, out_dir, config, settings=settings, failures=failures,
                                on_int8=lambda graph: click.echo(graph.describe(), err=True))
    else:
        results = run_batch(paths, model, out_dir, config, failures=failures, timings=batch_timings,
                            on_int8=lambda graph: click.echo(graph.describe(), err=True))
    for r in results:
        if r.status == "failed":
            click.echo(f"FAILED   {r.slide}\n  {r.error}", err=True)
        elif r.status == "busy" or r.slide_score is None:
            click.echo(f"{r.status:<8} {r.slide}: {r.error or 'no score recorded'} -> {r.out_dir}")
        else:
            click.echo(f"{r.status:<8} {r.slide}: score {r.slide_score:.3f}, tumour {r.tumor_area_mm2:.3f} mm^2, "
                       f"{r.n_patches} patches -> {r.out_dir}")
    n_bad = sum(r.status == "failed" for r in results)
    failed = f"; {n_bad} of {len(results)} slides failed" if n_bad else ""
    click.echo(f"summary: {Path(out_dir) / 'summary.csv'}{failed}", err=bool(n_bad))
    if profile:
        age = process_age_s()
        wall = time.perf_counter() - t_command
        batch_timings["seconds_wall"] = wall + (batch_timings["seconds_imports"] or 0.0) if age is None else age
        _write_profile(Path(out_dir), results, batch_timings)
    return 1 if n_bad else 0


def _write_profile(out_dir: Path, results: list, batch_timings: dict) -> None:
    """The stage table of this run's analysed slides (not the skipped ones): printed, and saved as
    ``OUT/profile.json`` (the rows and every slide's timings)."""
    import json

    from wsi_toolkit.atomic import write_json_atomic
    from wsi_toolkit.profiling import profile_rows, profile_table

    slides = []
    for r in results:
        if r.status != "ok" or not r.out_dir:
            continue
        try:
            slides.append(json.loads((Path(r.out_dir) / "run.json").read_text(encoding="utf-8"))["timings"])
        except (OSError, ValueError, KeyError):
            continue
    click.echo(f"profile (seconds; {len(slides)} slide(s) analysed by this run):\n"
               + profile_table(slides, batch_timings), err=True)
    write_json_atomic(out_dir / "profile.json", {
        "batch": batch_timings, "rows": [{"stage": k, "seconds": round(v, 4)} for k, v in
                                         profile_rows(slides, batch_timings)], "slides": slides})


def _check_precision(paths: list[Path], model_dir: Path, out_dir: Path, config: RunConfig) -> int:
    from wsi_toolkit.atomic import write_json_atomic
    from wsi_toolkit.errors import WsiToolkitError
    from wsi_toolkit.model_package import load_model_package
    from wsi_toolkit.precision_check import check_precision

    package = load_model_package(model_dir)
    reports, n_bad = [], 0
    for path in paths:
        try:
            r = check_precision(path, package, config)
        except WsiToolkitError as exc:
            click.echo(f"FAILED   {path}\n  {exc}", err=True)
            reports.append({"slide": str(path), "error": str(exc)})
            n_bad += 1
            continue
        reports.append(r)
        p, area = r["patches"], r["tumor_area_mm2"]
        run = r["run"]
        click.echo(f"{path.name}: {run.get('runtime')} {run.get('precision')} vs torch fp32 on {p['n_patches']} "
                   "patches: "
                   f"max |dp| {p['max_abs_dp']:.2e}, mean |dp| {p['mean_abs_dp']:.2e}, {p['label_flips']} label "
                   f"flip(s) at {p['threshold']:g} ({100 * p['label_flip_fraction']:.2f}%), tumour area "
                   f"{area['reference']:.4f} -> {area['run']:.4f} mm^2 ({area['change']:+.4f})"
                   + (f" [fell back: {run['fallback']}]" if run.get("fallback") else ""))
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    write_json_atomic(Path(out_dir) / "precision_check.json", {"settings": config.to_dict(), "slides": reports})
    click.echo(f"report: {Path(out_dir) / 'precision_check.json'}")
    return 1 if n_bad else 0


def main(argv: list[str] | None = None) -> int:
    return run_click(_command, argv)


def console_main() -> NoReturn:
    """The ``wsi-infer`` console script (:func:`~wsi_toolkit.cli._common.console`)."""
    console(main)


if __name__ == "__main__":  # pragma: no cover
    console_main()
