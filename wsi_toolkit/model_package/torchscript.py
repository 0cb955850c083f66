"""The TorchScript-deprecation guard: WSInfer's format is TorchScript, so its warnings are expected.

:func:`quiet_torchscript_deprecation` lives here, beside the format it is about, so that loading and
saving (:mod:`.io`), the CPU graph path (:mod:`wsi_toolkit.inference.device`) and the OpenVINO
conversion (:mod:`wsi_toolkit.runtime.openvino`) share one guard without importing each other.
No torch import: it only filters warnings.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator

__all__ = ["quiet_torchscript_deprecation"]


@contextlib.contextmanager
def quiet_torchscript_deprecation() -> Iterator[None]:
    """TorchScript is WSInfer's format, so its FutureWarnings ("torch.jit.* is deprecated") are
    expected here; silence only those, only around our own jit calls."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*torch\.jit\..*deprecated", category=FutureWarning)
        yield
