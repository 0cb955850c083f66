"""``wsi-synth OUT``: write a SYNTHETIC H&E-like slide with known tumour regions (+ ASAP XML)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import NoReturn

import click

from wsi_toolkit.cli._common import console, run_click, setup_logging


@click.command(name="wsi-synth", context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--mpp", type=float, default=0.243, show_default=True,
              help="um per level-0 pixel (Camelyon16: 0.243 Radboudumc, 0.226 Utrecht).")
@click.option("--flavour", type=click.Choice(["tiff", "svs", "svs-j2k", "svs-nompp", "tiff-nores"]), default="tiff",
              show_default=True,
              help="tiff: pyramidal JPEG TIFF with resolution tags; svs: Aperio-style; "
                   "svs-j2k: Aperio SVS with JPEG 2000 "
                   "(YCbCr, compression 33003) tiles; svs-nompp and tiff-nores: no mpp metadata.")
@click.option("--tissue-mm2", type=float, default=4.0, show_default=True)
@click.option("--tumors", type=int, default=2, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--no-faint", is_flag=True, help="Leave out the faint tissue section.")
@click.option("--no-pen", is_flag=True, help="Leave out the pen marks on the glass.")
@click.option("--tile", type=int, default=512, show_default=True)
@click.option("-v", "--verbose", count=True)
def _command(out, mpp, flavour, tissue_mm2, tumors, seed, no_faint, no_pen, tile, verbose) -> int:
    """Write a SYNTHETIC slide to OUT (and its tumour annotations to OUT with suffix .xml).
    Not patient data: for tests, demos and benchmarks."""
    from wsi_toolkit.synthetic import make_spec, write_synthetic_slide

    setup_logging(verbose)
    spec = make_spec(tissue_mm2=tissue_mm2, n_tumors=tumors, faint=not no_faint, pen=not no_pen, seed=seed)
    out.parent.mkdir(parents=True, exist_ok=True)
    s = write_synthetic_slide(out, spec, mpp=mpp, flavour=flavour, tile=tile)
    click.echo(json.dumps({"path": str(s.path), "xml": str(s.xml_path), "synthetic": True, "mpp": s.mpp,
                           "flavour": s.flavour, "level0_size": list(s.level0_size),
                           "tissue_mm2": round(s.tissue_mm2, 4), "tumor_mm2": round(s.tumor_mm2, 4)}))
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_click(_command, argv)


def console_main() -> NoReturn:
    """The ``wsi-synth`` console script (:func:`~wsi_toolkit.cli._common.console`)."""
    console(main)


if __name__ == "__main__":  # pragma: no cover
    console_main()
