"""``wsi-inspect SLIDE...``: preflight slides (format, levels, mpp and its source, tissue, patches)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import NoReturn

import click
from tqdm import tqdm

from wsi_toolkit.cli._common import check_mpp_option, console, run_click, setup_logging
from wsi_toolkit.preflight import DEFAULT_CHECK_TILES, SlideReport, inspect_slide
from wsi_toolkit.slide import find_slides
from wsi_toolkit.tiling import GridConfig
from wsi_toolkit.tissue import TissueConfig


def _human(r: SlideReport) -> str:
    if not r.ok:
        return f"FAILED  {r.path}\n  {r.error_type}: {r.error}"
    assert r.level0_size is not None and r.grid is not None  # set on every ok report
    w, h = r.level0_size
    lines = [
        f"ok      {r.path}" + ("   [SYNTHETIC]" if r.synthetic else ""),
        f"  format      {r.vendor} via {r.backend}; level 0 {w} x {h} px; {r.level_count} levels",
        f"  mpp         {r.mpp:.4f} um/px ({r.mpp_source})"
        + (f"; metadata said {r.mpp_metadata[0]:.4f}" if r.mpp_source == "override" and r.mpp_metadata else ""),
        "  levels      " + ", ".join(f"{i}: {d[0]}x{d[1]} @ {m:.3f}" for i, (d, m) in
                                     enumerate(zip(r.level_dimensions, r.level_mpp))),
        f"  tissue      {r.tissue_mm2:.2f} mm^2 (saturation threshold {r.tissue_threshold:.3f})",
        f"  patches     {r.n_patches} of {r.grid['patch_px']} px at {r.grid['spacing_um_px']} um/px, "
        f"stride {r.grid['stride_px']} (read from level {r.read_level})",
        f"  tiles       {r.tiles_checked} of the {r.tiles_under_patches} level-{r.read_level} tiles under the "
        "patches decoded",
        f"  time        {r.seconds:.2f} s",
    ]
    if r.qc_png:
        lines.append(f"  QC picture  {r.qc_png}")
    return "\n".join(lines)


@click.command(name="wsi-inspect", context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("slides", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--mpp", type=float, default=None, callback=check_mpp_option,
              help="Micrometres per level-0 pixel, 0.05..20; overrides the slide's metadata.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list of per-slide reports instead of text.")
@click.option("--qc", "qc_dir", type=click.Path(path_type=Path), default=None,
              help="Write a QC picture per slide (thumbnail + tissue outline + grid) into this folder.")
@click.option("--thumb-mpp", type=float, default=TissueConfig.thumb_mpp, show_default=True,
              help="um/px of the thumbnail tissue is detected on.")
@click.option("--patch-px", type=int, default=GridConfig.patch_px, show_default=True)
@click.option("--spacing-um-px", type=float, default=GridConfig.spacing_um_px, show_default=True,
              help="The model's um/px (PCam: 0.972).")
@click.option("--stride-px", type=int, default=GridConfig.stride_px, show_default=True)
@click.option("--min-tissue", type=float, default=GridConfig.min_tissue_fraction, show_default=True,
              help="Keep a grid cell when tissue covers at least this fraction of it.")
@click.option("--backend", type=click.Choice(["auto", "openslide", "tifffile"]), default="auto", show_default=True)
@click.option("--check-tiles", default=str(DEFAULT_CHECK_TILES), show_default=True, metavar="N|all",
              help="Stored tiles of the level inference reads to decode (spread over the kept patches); "
                   "'all' decodes every tile under them, 0 none.")
@click.option("-v", "--verbose", count=True)
def _command(slides, mpp, as_json, qc_dir, thumb_mpp, patch_px, spacing_um_px, stride_px, min_tissue, backend,
             check_tiles, verbose) -> int:
    """Preflight SLIDES (files or folders): format, levels, mpp and where it came from, tissue
    area, patch count. Every slide is inspected; the exit status is 1 if any failed."""
    setup_logging(verbose)
    if check_tiles == "all":
        n_check = None
    else:
        try:
            n_check = int(check_tiles)
        except ValueError:
            n_check = -1
        if n_check < 0:
            raise click.BadParameter(f"{check_tiles!r} is not a number of tiles >= 0 or 'all'",
                                     param_hint="--check-tiles")
    tissue = TissueConfig(thumb_mpp=thumb_mpp)
    grid = GridConfig(patch_px=patch_px, spacing_um_px=spacing_um_px, stride_px=stride_px,
                      min_tissue_fraction=min_tissue)
    paths = find_slides(list(slides))
    if not paths:
        raise click.UsageError(f"no slides found in {', '.join(map(str, slides))}")
    reports = []
    for p in tqdm(paths, desc="inspect", unit="slide", disable=len(paths) < 2 or None):
        qc = qc_dir / f"{p.stem}_qc.png" if qc_dir else None
        r = inspect_slide(p, mpp=mpp, backend=backend, tissue=tissue, grid=grid, qc_path=qc, check_tiles=n_check)
        reports.append(r)
        if not as_json:
            click.echo(_human(r))
    if as_json:
        click.echo(json.dumps([r.to_dict() for r in reports], indent=2))
    n_bad = sum(not r.ok for r in reports)
    if n_bad:
        click.echo(f"{n_bad} of {len(reports)} slides failed", err=True)
    return 1 if n_bad else 0


def main(argv: list[str] | None = None) -> int:
    return run_click(_command, argv)


def console_main() -> NoReturn:
    """The ``wsi-inspect`` console script (:func:`~wsi_toolkit.cli._common.console`)."""
    console(main)


if __name__ == "__main__":  # pragma: no cover
    console_main()
