"""Where the model runs: torch (the package's model as loaded) or OpenVINO on a CPU.

- :mod:`.openvino`: conversion (``openvino.convert_model``), fp32 / bf16 / INT8 (NNCF), the
  :class:`OpenVinoModel` the inference loop calls, fallback errors.
- :mod:`.cache`: converted graphs cached by package sha256 and settings, published atomically under a
  file lock.
- :mod:`.calibration`: INT8 calibration patches from slide tissue or a PCam folder.
- :mod:`.select`: :func:`select_runtime`, the one place settings become a model to call (with
  the fallback to torch).
- :mod:`.cpu`: :func:`cpu_has_fast_bf16`, what the CPU computes natively.
- :func:`compare_probabilities`: how far a reduced-precision run moved the probabilities.

Imports flow one way: this package may import :mod:`wsi_toolkit.model_package` (the logits rule,
preprocessing, the TorchScript guard), never :mod:`wsi_toolkit.inference`, which imports it.

Nothing here imports OpenVINO or NNCF until a model is converted; ``pip install
'wsi-toolkit[openvino]'`` installs both.
"""

from __future__ import annotations

import numpy as np

from wsi_toolkit.runtime.cache import CACHE_ENV, CacheKey, default_cache_dir
from wsi_toolkit.runtime.calibration import (
    CALIBRATION_PATCHES,
    CalibrationSet,
    calibration_from_dataset,
    calibration_from_pcam,
    calibration_from_slides,
    load_calibration,
    save_calibration,
)
from wsi_toolkit.runtime.cpu import cpu_has_fast_bf16
from wsi_toolkit.runtime.names import OV_PRECISIONS, PRECISIONS, RUNTIMES, OvPrecision, Precision, Runtime
from wsi_toolkit.runtime.openvino import (
    FP32_TOLERANCE,
    ConversionError,
    OpenVinoModel,
    check_precision_supported,
    load_openvino_model,
    openvino_available,
    openvino_versions,
)
from wsi_toolkit.runtime.select import RuntimeChoice, resolve_runtime, select_runtime

__all__ = ["CACHE_ENV", "CALIBRATION_PATCHES", "FP32_TOLERANCE", "OV_PRECISIONS", "PRECISIONS", "RUNTIMES", "CacheKey",
           "CalibrationSet", "ConversionError", "OpenVinoModel", "OvPrecision", "Precision", "Runtime", "RuntimeChoice",
           "calibration_from_dataset", "calibration_from_pcam", "calibration_from_slides", "check_precision_supported",
           "compare_probabilities", "cpu_has_fast_bf16", "default_cache_dir", "load_calibration", "load_openvino_model",
           "openvino_available", "openvino_versions", "resolve_runtime", "save_calibration", "select_runtime"]

def compare_probabilities(reference: np.ndarray, other: np.ndarray, *, threshold: float = 0.5) -> dict:
    """How far ``other`` moved from ``reference`` (same patches, tumour probabilities, (N,)):
    max and mean |dp|, and the patches whose label changes at ``threshold`` (count and fraction)."""
    ref, oth = np.asarray(reference, np.float64).ravel(), np.asarray(other, np.float64).ravel()
    if ref.shape != oth.shape:
        raise ValueError(f"probabilities of different lengths: {ref.shape} vs {oth.shape}")
    n = len(ref)
    dp = np.abs(ref - oth)
    flips = int(((ref >= threshold) != (oth >= threshold)).sum())
    return {"n_patches": n, "max_abs_dp": float(dp.max()) if n else 0.0, "mean_abs_dp": float(dp.mean()) if n else 0.0,
            "label_flips": flips, "label_flip_fraction": flips / n if n else 0.0, "threshold": threshold}
