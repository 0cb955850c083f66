"""The runtime and precision vocabulary, defined once: every setting's type and every CLI's choices
come from here (``click.Choice(PRECISIONS)``, ``InferenceConfig.precision: Precision``, ...).

- :data:`Runtime`: what runs the network: ``auto`` (OpenVINO on a CPU where installed, else torch),
  ``torch``, ``openvino``.
- :data:`Precision`: what a run may ask for; ``int8`` runs on OpenVINO only, ``fp16`` on torch only.
- :data:`TorchPrecision`: torch's autocast (inference on CPU/CUDA, and training).
- :data:`OvPrecision`: the OpenVINO graphs (``auto`` resolves to one of them).
"""

from __future__ import annotations

from typing import Literal, get_args

__all__ = ["Runtime", "Precision", "TorchPrecision", "OvPrecision", "RUNTIMES", "PRECISIONS", "TORCH_PRECISIONS",
           "OV_PRECISIONS", "EVAL_PRECISIONS"]

Runtime = Literal["auto", "torch", "openvino"]
Precision = Literal["auto", "fp32", "bf16", "fp16", "int8"]
TorchPrecision = Literal["auto", "fp32", "bf16", "fp16"]
OvPrecision = Literal["fp32", "bf16", "int8"]

RUNTIMES: tuple[str, ...] = get_args(Runtime)
PRECISIONS: tuple[str, ...] = get_args(Precision)
TORCH_PRECISIONS: tuple[str, ...] = get_args(TorchPrecision)
OV_PRECISIONS: tuple[str, ...] = get_args(OvPrecision)
#: ``pcam-eval --precision``: fp32 torch, or an OpenVINO precision (fp16 autocast is a training/GPU
#: setting, not an evaluation runtime).
EVAL_PRECISIONS: tuple[str, ...] = tuple(p for p in PRECISIONS if p != "fp16")
