"""Choosing the runtime of a run: torch or OpenVINO, the precision, and the fallback to torch.

:func:`select_runtime` is the one place that turns ``runtime`` / ``precision`` settings into a model
to call: ``None`` (the package's torch model, run as before) or an :class:`~.openvino.OpenVinoModel`,
plus ``info``, the facts a run records (``run.json``, ``eval.json``): which runtime ran, at which
precision, what that changes, and why torch ran when OpenVINO was asked for.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch

from wsi_toolkit.errors import ConfigError
from wsi_toolkit.runtime import cpu  # cpu.cpu_has_fast_bf16 looked up when called (tests patch it there)
from wsi_toolkit.runtime.calibration import CalibrationSet
from wsi_toolkit.runtime.names import PRECISIONS, RUNTIMES
from wsi_toolkit.runtime.openvino import ConversionError, OpenVinoModel, load_openvino_model, openvino_available

if TYPE_CHECKING:
    from wsi_toolkit.model_package import ModelPackage

__all__ = ["RuntimeChoice", "resolve_runtime", "select_runtime"]

log = logging.getLogger(__name__)



def resolve_runtime(runtime: str, device: torch.device) -> str:
    """``auto``: OpenVINO on a CPU where it is installed, torch elsewhere (CUDA, MPS) or without it.
    ``openvino`` on a GPU device is a :class:`ConfigError` (OpenVINO runs here on the CPU only)."""
    if runtime not in RUNTIMES:
        raise ConfigError(f"runtime must be one of {', '.join(RUNTIMES)}; got {runtime!r}")
    if runtime == "torch":
        return "torch"
    if device.type != "cpu":
        if runtime == "openvino":
            raise ConfigError(f"runtime openvino runs on the CPU; device is {device} (use --device cpu)")
        return "torch"
    if runtime == "openvino":
        return "openvino"
    return "openvino" if openvino_available() else "torch"


#: The OpenVINO model compiled last, by what it was compiled from (:func:`_memo_key`): the next slide of a
#: batch runs it again instead of compiling it anew (which costs seconds per slide). One entry; keyed by
#: content, not by the package object's ``id()`` (which a later package may reuse once one is collected),
#: so a package loaded again from the same folder reuses it too. The one-runner-per-batch design (issue
#: 30) replaces this module-global memo.
_LOADED: dict[tuple, OpenVinoModel] = {}


def _memo_key(package: ModelPackage, *settings: Any) -> tuple:
    """What a compiled model depends on: the weights (sha256), ``config.json``'s content (the
    preprocessing compiled into the graph, the tumour column) and the compile settings."""
    config = json.dumps(package.config.to_dict(), sort_keys=True, ensure_ascii=True, default=str)
    return (package.sha256, hashlib.sha256(config.encode("utf-8")).hexdigest(), *settings)


@dataclass
class RuntimeChoice:
    """``model``: the OpenVINO model to call, or None to run the package's torch model.
    ``precision``: what torch should run at when ``model`` is None (its ``precision`` setting).
    ``info``: what the run records about the runtime (``run.json`` ``runtime``); ``stats``: how the
    model was loaded (cache hit or built, seconds), for the timings."""

    model: OpenVinoModel | None
    precision: str
    info: dict[str, Any] = field(default_factory=dict)
    stats: dict[str, Any] = field(default_factory=dict)


def select_runtime(package: ModelPackage, *, runtime: str = "auto", precision: str = "auto",
                   device: torch.device | None = None, cache_dir: str | Path | None = None,
                   calibration: CalibrationSet | Callable[[], CalibrationSet] | None = None,
                   force_bf16: bool = False, requests: int | None = 1,
                   preprocess: Literal["graph", "torch"] = "graph") -> RuntimeChoice:
    """The model a run calls, from its ``runtime`` and ``precision`` settings.

    On a CPU, ``auto`` is OpenVINO where installed (fp32 there agrees with torch within 1e-4: each
    conversion is checked before it is used), except fp16, and bf16 on a CPU without native bf16.
    ``int8`` needs OpenVINO and ``calibration``: a set (its fingerprint keys the quantized graph), or
    a function making one, called only when the cache has no automatically calibrated graph of the
    package yet (:func:`~.openvino.prepare_openvino_graph`). ``requests``: OpenVINO infer requests
    in flight (:func:`~.openvino.load_openvino_model`; 1 = one at a time, None = THROUGHPUT hint);
    ``preprocess``: the package's preprocessing in OpenVINO's graph (``graph``, where exact) or torch's.
    Settings that cannot work raise :class:`ConfigError`; a model OpenVINO cannot convert runs on
    torch (fp32 where int8 was asked for), with a warning in the log and the reason in
    ``info["fallback"]``.
    """
    if precision not in PRECISIONS:
        raise ConfigError(f"precision must be one of {', '.join(PRECISIONS)}; got {precision!r}")
    device = package.device if device is None else device
    which = resolve_runtime(runtime, device)
    if which == "openvino" and precision == "fp16":
        if runtime == "openvino":
            raise ConfigError("precision fp16 is not an OpenVINO CPU precision here; use fp32, bf16 or int8")
        which = "torch"
    if which == "openvino" and runtime == "auto" and precision == "bf16" and not force_bf16:
        if not cpu.cpu_has_fast_bf16():  # emulated either way: torch, as before OpenVINO was a runtime
            which = "torch"
    if precision == "int8" and which != "openvino":
        why = "OpenVINO is not installed (pip install 'wsi-toolkit[openvino]')" if device.type == "cpu" \
            else f"the device is {device}"
        raise ConfigError(f"precision int8 runs on OpenVINO on the CPU (--runtime openvino); {why}")
    requested = {"runtime": runtime, "precision": precision}
    if which == "torch":
        return RuntimeChoice(None, precision, {"runtime": "torch", "requested": requested})
    ov_precision = "fp32" if precision == "auto" else precision
    cal_key = None if ov_precision != "int8" else (
        calibration.fingerprint if isinstance(calibration, CalibrationSet) else "auto")
    memo_key = _memo_key(package, ov_precision, None if cache_dir is None else str(cache_dir), cal_key, force_bf16,
                         torch.get_num_threads(), requests, preprocess)
    loaded = _LOADED.get(memo_key)
    if loaded is not None:
        # The next slide of a batch: the model compiled for the last one (no cache lookup, no compile).
        return RuntimeChoice(loaded, ov_precision, {**loaded.info, "requested": requested},
                             {"cache": "memory", "cache_entry": loaded.stats.get("cache_entry"), "seconds_load": 0.0,
                              "requests": loaded.n_requests})
    try:
        model = load_openvino_model(package, precision=ov_precision, cache_dir=cache_dir,
                                    calibration=calibration if ov_precision == "int8" else None,
                                    force_bf16=force_bf16, requests=requests, preprocess=preprocess)
    except ConversionError as exc:
        torch_precision = "fp32" if ov_precision == "int8" else precision
        log.warning("OpenVINO: %s; running the model with torch at %s instead", exc,
                    "fp32" if torch_precision == "auto" else torch_precision)
        return RuntimeChoice(None, torch_precision, {"runtime": "torch", "requested": requested, "fallback": str(exc)})
    _LOADED.clear()  # one compiled model kept: the one the batch's slides run
    _LOADED[memo_key] = model
    return RuntimeChoice(model, ov_precision, {**model.info, "requested": requested}, dict(model.stats))
