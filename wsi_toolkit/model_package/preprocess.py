"""The one preprocessing: a config's ``transform`` list on batches of uint8 patches, on any device."""

from __future__ import annotations

import json

import torch
import torch.nn.functional as F

from wsi_toolkit.errors import ModelPackageError
from wsi_toolkit.model_package.config import ModelConfig

__all__ = ["Preprocess"]


class Preprocess(torch.nn.Module):
    """The config's ``transform`` list on batches of uint8 patches, on any device.

    Input ``(N, H, W, 3)`` uint8 RGB; output ``(N, 3, S, S)`` float32, ``S = config.input_size``.

    - ``ToTensor``: uint8 -> float32 / 255, NHWC -> NCHW (torchvision's ``ToTensor``).
    - ``Resize``: ``F.interpolate(mode="bilinear", antialias=True, align_corners=False)`` on the
      float image; this is exactly what torchvision's tensor ``Resize(size, antialias=True)`` does
      on a float tensor. ``Resize(int)`` scales the shorter side (torchvision's rule); it is skipped
      when the image already has that size.
    - ``Normalize``: ``(x - mean) / std`` per channel.

    Steps run in the config's order. The uint8 -> [0, 1] scaling is done first, whatever the
    position of ``ToTensor``: resizing is linear, so resizing and then scaling by 1/255 equals
    scaling and then resizing. WSInfer's own order ``Resize, ToTensor, Normalize`` resizes a PIL
    uint8 image, whose result is rounded to whole grey levels; resizing in float skips that
    rounding (differences of at most ~1/255 per pixel, and PIL's filter differs slightly).
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.steps = tuple(config.transform)

    def forward(self, patches_uint8: torch.Tensor) -> torch.Tensor:
        x = patches_uint8
        if not isinstance(x, torch.Tensor) or x.ndim != 4 or x.shape[-1] != 3 or x.dtype != torch.uint8:
            desc = (f"shape {tuple(x.shape)} dtype {x.dtype}" if isinstance(x, torch.Tensor) else type(x).__name__)
            raise ModelPackageError(f"Preprocess expects (N, H, W, 3) uint8 RGB patches; got {desc}")
        x = x.permute(0, 3, 1, 2).to(torch.float32).div_(255.0)
        for step in self.steps:
            if step.name == "Resize" and step.size is not None:
                x = _resize(x, step.size, exact=not isinstance(step.arguments["size"], int))
            elif step.name == "Normalize":
                mean = torch.as_tensor(step.arguments["mean"], dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
                std = torch.as_tensor(step.arguments["std"], dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
                x = (x - mean) / std
            # ToTensor: done above (see the class docstring).
        return x.contiguous()

    def extra_repr(self) -> str:
        return ", ".join(json.dumps(s.to_dict()) for s in self.steps)


def _resize(x: torch.Tensor, size: int, *, exact: bool = False) -> torch.Tensor:
    """torchvision's ``Resize(size)`` (shorter side -> size; ``exact``: ``Resize([size, size])``)
    on float NCHW, bilinear, antialiased."""
    h, w = int(x.shape[-2]), int(x.shape[-1])
    if exact:
        oh, ow = size, size
    else:
        short, long = (h, w) if h <= w else (w, h)
        new_short, new_long = size, int(size * long / short)
        oh, ow = (new_short, new_long) if h <= w else (new_long, new_short)
    if (oh, ow) == (h, w):
        return x
    return F.interpolate(x, size=(oh, ow), mode="bilinear", align_corners=False, antialias=True)
