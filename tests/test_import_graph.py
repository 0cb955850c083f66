"""Imports flow one way: the contracts in pyproject.toml (``[tool.importlinter]``) hold.

The same check as ``lint-imports`` in ``.ci/run``: no import circle between sibling modules, no low
module importing a higher one (``inference -> runtime -> model_package``, the layers of
``wsi_toolkit``), no library module importing the public facade or the training side
(``patch_model``). Skips where import-linter is not installed (``pip install -e '.[dev]'``).
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("importlinter") is None,
    reason="import-linter is not installed (it is in the dev extra: pip install -e '.[dev]')")


def test_import_contracts_are_kept():
    code = ("import sys; from importlinter.cli import lint_imports; "
            "sys.exit(lint_imports(config_filename='pyproject.toml', no_cache=True, no_logo=True))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"lint-imports found broken contracts:\n{proc.stdout}\n{proc.stderr}"
    assert "0 broken" in proc.stdout
