"""Shared CLI plumbing: running a click command as ``main(argv) -> int``, logging set-up."""

from __future__ import annotations

import logging
import sys

import click

from wsi_toolkit.errors import WsiToolkitError


def run_click(command: click.Command, argv: list[str] | None) -> int:
    """Run ``command`` without letting click call ``sys.exit``; return the exit code."""
    try:
        rv = command.main(args=argv, standalone_mode=False, prog_name=command.name)
    except click.exceptions.Exit as exc:  # --help
        return int(exc.exit_code or 0)
    except click.ClickException as exc:
        exc.show()
        return exc.exit_code
    except click.Abort:
        click.echo("Aborted.", err=True)
        return 130
    except WsiToolkitError as exc:
        click.echo(f"error: {exc}", err=True)
        return 2
    return int(rv or 0)


def setup_logging(verbose: int) -> None:
    level = logging.WARNING if verbose <= 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
