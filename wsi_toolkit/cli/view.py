"""``wsi-view OUT`` / ``wsi-view SLIDE --results OUT/<slide>``: review results in a web browser;
``--review`` lets the page save a pathologist's outlines (guarded writes); ``--import-review ID FILE``
saves a QuPath/ASAP file as a slide's review; ``--export SITE`` writes the same viewer as static files
(read-only). See docs/viewer.md."""

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
@click.option("--review", "review_mode", is_flag=True,
              help="Review mode: draw, label and save outlines (OUT/<slide>/review.geojson). Writes need the token "
                   "in the printed URL.")
@click.option("--author", default=None,
              help="Name saved with each reviewed outline [default: the login name].")
@click.option("--import-review", "import_review", nargs=2, type=(str, click.Path(exists=True, dir_okay=False,
              path_type=Path)), default=None, metavar="SLIDE_ID FILE",
              help="Save FILE (a QuPath GeoJSON or ASAP .xml of that slide) as the next review version of SLIDE_ID "
                   "(its results folder name), then exit.")
@click.option("-v", "--verbose", count=True)
def _command(path, results_dir, slides_dir, mpp, host, port, open_browser, export_dir, workers, cache_mb,
             review_mode, author, import_review, verbose) -> int:
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
    author = author if author is not None else _login_name()
    if import_review is not None:
        return _import_review(catalogue, *import_review, author=author)
    if export_dir is not None:
        if review_mode:
            raise click.UsageError("--review goes with the server; an --export is always read-only")
        return _export(catalogue, export_dir, workers)
    return _serve(catalogue, host=host, port=port, open_browser=open_browser, workers=workers,
                  cache_bytes=cache_mb * 2**20, review_author=author if review_mode else None)


def _login_name() -> str:
    import getpass

    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no login name (a container without /etc/passwd entry)
        return "unknown"


def _import_review(catalogue, slide_id: str, file: Path, *, author: str) -> int:
    from wsi_toolkit.annotations.review import import_review

    if slide_id not in catalogue:
        ids = ", ".join(e.id for e in catalogue.entries[:20])
        raise click.ClickException(f"no slide {slide_id!r} here; the slide ids are the results folder names: {ids}")
    entry = catalogue.entry(slide_id)
    if entry.results_dir is None or entry.record is None:
        raise click.ClickException(f"{entry.name} has no wsi-infer results folder to keep a review in")
    version = import_review(entry.results_dir, file, l0_size=tuple(entry.record.slide.level0_size), author=author,
                            slide=entry.name)
    click.echo(f"[wsi-view] {file} saved as review version {version} of {slide_id} "
               f"({entry.results_dir / 'review.geojson'})", err=True)
    return 0


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


def _serve(catalogue, *, host: str, port: int, open_browser: bool, workers: int | None, cache_bytes: int,
           review_author: str | None = None) -> int:
    try:
        from wsi_toolkit.view.server import LOOPBACK_HOSTS, ReviewSettings, ViewerServer, create_app
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise click.ClickException(f"the wsi-view server needs the view extra: pip install 'wsi-toolkit[view]' "
                                   f"({exc})") from None
    allowed = list(LOOPBACK_HOSTS) if host in LOOPBACK_HOSTS else ["*"]
    review = ReviewSettings.new(review_author) if review_author is not None else None
    app = create_app(catalogue, cache_bytes=cache_bytes, workers=workers, allowed_hosts=allowed, review=review)
    try:
        server = ViewerServer(app, host=host, port=port)
    except OSError as exc:
        raise click.ClickException(f"cannot listen on {host}:{port} ({exc.strerror or exc})") from None
    if host not in LOOPBACK_HOSTS:
        click.echo(f"[wsi-view] listening on {host}: anyone who can reach this machine can see these slides", err=True)
    url = server.url
    if review is not None:  # the token in the fragment: browsers send it in no request, Referer or log
        url = f"{server.url}#token={review.token}"
        click.echo(f"[wsi-view] review mode: saves go to OUT/<slide>/review.geojson as {review.author}; open the URL "
                   "with its #token (without it the page cannot save)", err=True)
    click.echo(f"[wsi-view] {len(catalogue)} slide(s) at {server.url}  (Ctrl-C stops)", err=True)
    click.echo(url)
    sys.stdout.flush()
    if open_browser:
        import webbrowser

        webbrowser.open(url)
    try:
        server.serve_forever()
    finally:
        catalogue.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_click(_command, argv)


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
