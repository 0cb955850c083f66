"""What a package's model returns, read one way: logits -> class probabilities (:func:`probabilities`).

The model package defines the model's output (``(N, num_classes)`` logits, ``(N,)`` allowed for a
one-output model), so the rule that turns it into probabilities lives here, below everything that
applies it: :meth:`~wsi_toolkit.model_package.ModelPackage.predict_class_proba`, the inference loop
(:mod:`wsi_toolkit.inference`, which re-exports it) and the OpenVINO runtime
(:mod:`wsi_toolkit.runtime`).
"""

from __future__ import annotations

import torch

__all__ = ["probabilities"]


def probabilities(logits: torch.Tensor) -> torch.Tensor:
    """Class probabilities (float32, ``(N, C)``) from a model's logits: softmax over classes, or
    sigmoid for a one-output model (``(N, 1)`` or ``(N,)`` logits, returned as ``(N, 1)``)."""
    logits = logits.float()
    if logits.ndim == 1:
        logits = logits[:, None]
    if logits.shape[1] == 1:
        return torch.sigmoid(logits)
    return torch.softmax(logits, dim=1)
