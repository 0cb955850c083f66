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
    except MemoryError as exc:  # a bound missed somewhere: still one line, not a traceback
        click.echo(f"error: out of memory ({exc or 'MemoryError'}); the input is larger than this machine can "
                   "hold, please report it with the file's size", err=True)
        return 2
    return int(rv or 0)


def setup_logging(verbose: int) -> None:
    level = logging.WARNING if verbose <= 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)


def check_mpp_option(ctx: click.Context, param: click.Parameter, value: float | None) -> float | None:
    """click callback for ``--mpp``: refuse values outside [0.05, 20] um/px when parsed, once, before
    any slide is opened (the slide opener checks again for library callers)."""
    from wsi_toolkit.slide import check_mpp

    try:
        check_mpp(value, what=f"--{param.name.replace('_', '-')}")
    except WsiToolkitError as exc:
        raise click.BadParameter(str(exc)) from None
    return value
