"""Shared CLI plumbing: running a click command as ``main(argv) -> int``, ending a console
script's process, logging set-up."""

from __future__ import annotations

import atexit
import logging
import os
import sys
import threading
from collections.abc import Callable
from typing import NoReturn

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


def console(main: Callable[[], int]) -> NoReturn:
    """A console script: run ``main`` and end the process with its exit code.

    Everything a normal exit does that can matter runs first: non-daemon threads have finished
    (otherwise this falls back to a normal exit), the ``atexit`` handlers run (logging flushes and
    closes its handlers, Ray shuts down, temporary folders go, multiprocessing joins its children),
    stdout and stderr are flushed. What is skipped is the interpreter's teardown of its modules and
    of the C++ libraries under them: with torch and OpenVINO loaded that takes 0.6-0.9 s on a 2-core
    CPU, a tenth of a one-slide ``wsi-infer`` run, and writes nothing (every output was written and
    closed before ``main`` returned). ``main`` raising goes the normal way (traceback, exit 1)."""
    code = main()
    others = [t for t in threading.enumerate() if t is not threading.main_thread() and not t.daemon and t.is_alive()]
    if others:
        sys.exit(code)
    atexit._run_exitfuncs()  # what Py_Finalize would run next, in the same (last registered first) order
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe (| head) or stream: nothing more can be written there
            pass
    os._exit(code)


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
