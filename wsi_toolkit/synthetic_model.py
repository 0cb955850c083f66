"""A SYNTHETIC "colour-rule" test model: no learned weights, not a classifier of real tissue.

It exists so that the slide-level pipeline (tiling, batched inference, heatmaps, exports) can be
tested end to end on the toolkit's synthetic slides (:mod:`wsi_toolkit.synthetic`) with a model
whose answer is known in advance. Its package says so in ``config.json``:
``"wsi_toolkit": {"synthetic": true, "description": "colour-rule test model, ..."}``.

The rule
--------
The synthetic stain draws tumour denser (more and larger nuclei) and more purple than normal
tissue. Both stains absorb green light, so the mean green transmittance over the patch's centre
third (PCam's centre 32x32 of 96x96) measures how much stain is there:

    g     = mean of G in [0, 1] over rows/cols S//3 .. 2*S//3 (after un-normalising)
    logit = GAIN * (THRESHOLD - g),   THRESHOLD = 0.52, GAIN = 60
    logits = [-logit / 2, +logit / 2]  for ("notumor", "tumor")  ->  P(tumor) = sigmoid(logit)

Measured on the synthetic texture at 0.972 um/px (``_Texture(seed=0, tile=512)``, downsample 4,
every 96x96 patch position on an 8 px step): centre green is 0.375..0.461 for tumour,
0.574..0.634 for normal tissue, >= 0.85 for faint tissue and 0.95 for glass. The green channel
separates tumour from normal better than the red one (0.59..0.71 vs 0.80..0.88).
"""

from __future__ import annotations

from pathlib import Path

import torch

from wsi_toolkit.model_package import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    ModelPackage,
    load_model_package,
    pcam_config,
    save_model_package,
)

__all__ = ["ColourRuleNet", "make_colour_rule_package", "COLOUR_RULE_DESCRIPTION"]

COLOUR_RULE_DESCRIPTION = "colour-rule test model, not a classifier of real tissue"
THRESHOLD = 0.52
GAIN = 60.0


class ColourRuleNet(torch.nn.Module):
    """``(N, 3, S, S)`` ImageNet-normalised float32 -> ``(N, 2)`` logits for ("notumor", "tumor").

    ``P(tumor) = sigmoid(gain * (threshold - g))`` with ``g`` the mean green value in [0, 1] over
    the centre third of the patch. TorchScript-scriptable (the centre adapts to ``S``).
    """

    def __init__(self, *, threshold: float = THRESHOLD, gain: float = GAIN,
                 mean: tuple[float, float, float] = IMAGENET_MEAN, std: tuple[float, float, float] = IMAGENET_STD):
        super().__init__()
        self.threshold = float(threshold)
        self.gain = float(gain)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.shape[-2]
        w = x.shape[-1]
        centre = x[:, 1:2, h // 3: 2 * h // 3, w // 3: 2 * w // 3]
        green = centre * self.std[:, 1:2] + self.mean[:, 1:2]  # back to [0, 1]
        g = green.mean(dim=(1, 2, 3))
        logit = self.gain * (self.threshold - g)
        return torch.stack([-0.5 * logit, 0.5 * logit], dim=1)


def make_colour_rule_package(path: str | Path, *, input_size: int = 96, overwrite: bool = False) -> ModelPackage:
    """Write the SYNTHETIC colour-rule model as a PCam-style model package at ``path`` and load it.

    The config is :func:`~wsi_toolkit.model_package.pcam_config` with architecture
    ``"colour-rule-synthetic"`` (96 px at 0.972 um/px, resized to ``input_size``) and
    ``"wsi_toolkit": {"synthetic": true, "description": ..., "rule": {...}}``.
    """
    config = pcam_config(
        architecture="colour-rule-synthetic",
        input_size=input_size,
        extra={
            "synthetic": True,
            "description": COLOUR_RULE_DESCRIPTION,
            "rule": {"channel": "green", "region": "centre third", "threshold": THRESHOLD, "gain": GAIN},
        },
    )
    # The eager module: saved as TorchScript (traced at input_size) and as a torch.export program.
    save_model_package(path, ColourRuleNet().eval(), config, overwrite=overwrite)
    return load_model_package(path)
