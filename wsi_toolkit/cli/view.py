"""``wsi-view OUT`` / ``wsi-view SLIDE --results OUT/<slide>``: review results in a web browser;
``--export SITE`` writes the same viewer as static files. See docs/viewer.md."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import click

from wsi_toolkit.cli._common import check_mpp_option, run_click, setup_logging

log = logging.getLogger("wsi_toolkit.view")


@click.command(name="wsi-view", context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("path", type=click.Path(exists=True, path_type=Path))
@click.option("--results", "results_dir", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="With a slide file as PATH: its folder of a wsi-infer results folder (OUT/<slide>/).")
@click.option("--slides", "slides_dir", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="With a results folder as PATH: look slides up here by file name when the path recorded in "
                   "run.json does not exist (results moved to another machine).")
@click.option("--mpp", type=float, default=None, callback=check_mpp_option,
              help="um per level-0 pixel for a slide without metadata and without results (results record theirs).")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on. Anything but a loopback address shows the slides to your network.")
@click.option("--port", type=click.IntRange(0, 65535), default=0, show_default=True, help="Port; 0 picks a free one.")
@click.option("--open", "open_browser", is_flag=True, help="Open the page in the default web browser.")
@click.option("--export", "export_dir", type=click.Path(path_type=Path), default=None,
              help="Write a static site (page + Deep Zoom tiles) to this folder instead of serving.")
@click.option("--workers", type=click.IntRange(1, 64), default=None, help="Tile-rendering threads [default: cores].")
@click.option("--cache-mb", type=click.IntRange(0, 65536), default=256, show_default=True,
              help="Memory for rendered tiles (least recently used dropped first).")
@click.option("-v", "--verbose", count=True)
def _command(path, results_dir, slides_dir, mpp, host, port, open_browser, export_dir, workers, cache_mb,
             verbose) -> int:
    """Show PATH -- a wsi-infer results folder (every slide of its summary.csv) or a slide file with
    --results -- in a web browser: the slide, its heatmap and its tumour regions."""
    from wsi_toolkit.view.catalogue import Catalogue

    setup_logging(verbose)
    if path.is_dir():
        if results_dir is not None:
            raise click.UsageError("--results goes with a slide file; PATH is already a results folder")
        catalogue = Catalogue.from_results(path, slides_dir=slides_dir)
    else:
        catalogue = Catalogue.from_slide(path, results_dir, mpp=mpp)
    if export_dir is not None:
        return _export(catalogue, export_dir, workers)
    return _serve(catalogue, host=host, port=port, open_browser=open_browser, workers=workers,
                  cache_bytes=cache_mb * 2**20)


def _export(catalogue, export_dir: Path, workers: int | None) -> int:
    from wsi_toolkit.view.site import export_site

    def progress(done: int, total: int) -> None:
        click.echo(f"\r[wsi-view] {done}/{total} tiles", nl=done == total, err=True)

    report = export_site(catalogue, export_dir, workers=workers, progress=progress if sys.stderr.isatty() else None)
    click.echo(f"[wsi-view] wrote {report.site}: {report.slides} slide(s), {report.tiles} tiles "
               f"({report.bytes / 2**20:.1f} MiB) in {report.seconds:.1f} s; open {report.site / 'index.html'} "
               "or serve the folder with any static web server", err=True)
    for error in report.errors:
        click.echo(f"[wsi-view] warning: {error}", err=True)
    if report.error_tiles:
        click.echo(f"[wsi-view] warning: {report.error_tiles} tile(s) could not be read and are error tiles", err=True)
    return 0


def _serve(catalogue, *, host: str, port: int, open_browser: bool, workers: int | None, cache_bytes: int) -> int:
    try:
        from wsi_toolkit.view.server import LOOPBACK_HOSTS, ViewerServer, create_app
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise click.ClickException(f"the wsi-view server needs the view extra: pip install 'wsi-toolkit[view]' "
                                   f"({exc})") from None
    allowed = list(LOOPBACK_HOSTS) if host in LOOPBACK_HOSTS else ["*"]
    app = create_app(catalogue, cache_bytes=cache_bytes, workers=workers, allowed_hosts=allowed)
    try:
        server = ViewerServer(app, host=host, port=port)
    except OSError as exc:
        raise click.ClickException(f"cannot listen on {host}:{port} ({exc.strerror or exc})") from None
    if host not in LOOPBACK_HOSTS:
        click.echo(f"[wsi-view] listening on {host}: anyone who can reach this machine can see these slides", err=True)
    click.echo(f"[wsi-view] {len(catalogue)} slide(s) at {server.url}  (Ctrl-C stops)", err=True)
    click.echo(server.url)
    sys.stdout.flush()
    if open_browser:
        import webbrowser

        webbrowser.open(server.url)
    try:
        server.serve_forever()
    finally:
        catalogue.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_click(_command, argv)


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
