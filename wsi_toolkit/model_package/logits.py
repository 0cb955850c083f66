"""What a package's model returns, read one way: logits -> class probabilities (:func:`probabilities`).

The model package defines the model's output (``(N, num_classes)`` logits, ``(N,)`` allowed for a
one-output model), so the rule that turns it into probabilities lives here, below everything that
applies it: :meth:`~wsi_toolkit.model_package.ModelPackage.predict_class_proba`, the inference loop
(:mod:`wsi_toolkit.inference`, which re-exports it) and the OpenVINO runtime
(:mod:`wsi_toolkit.runtime`).

A package may carry a fitted temperature (``config.json``: ``wsi_toolkit.calibration``, read as
:attr:`~wsi_toolkit.model_package.ModelConfig.temperature`); every path passes it here, so the
logits are divided by it before the softmax (or sigmoid). The model's graph itself, and anything
cached from it (an OpenVINO conversion), stays the uncalibrated network: a re-fitted temperature
changes no converted model.
"""

from __future__ import annotations

import torch

__all__ = ["probabilities"]


def probabilities(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Class probabilities (float32, ``(N, C)``) from a model's logits: softmax over classes, or
    sigmoid for a one-output model (``(N, 1)`` or ``(N,)`` logits, returned as ``(N, 1)``), of
    ``logits / temperature`` (temperature scaling; ``1.0``, a package without calibration, leaves the
    logits as they are)."""
    logits = logits.float()
    if temperature != 1.0:
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0; got {temperature!r}")
        logits = logits / float(temperature)
    if logits.ndim == 1:
        logits = logits[:, None]
    if logits.shape[1] == 1:
        return torch.sigmoid(logits)
    return torch.softmax(logits, dim=1)
