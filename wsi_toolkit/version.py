"""The installed version of wsi-toolkit, read from the package metadata (it lives in ``pyproject.toml``).

Here, at the bottom of the package, so that library modules (``analysis`` records it in
``run.json``) read it without importing the public facade :mod:`wsi_toolkit`, which re-exports it.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

__all__ = ["__version__"]

try:
    __version__ = version("wsi-toolkit")
except PackageNotFoundError:  # pragma: no cover - running from a source tree that was never installed
    __version__ = "0+unknown"
