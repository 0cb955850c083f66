"""Transforms of the training DataLoaders: dihedral symmetries, H&E stain jitter, resize, scanner.

The batch transforms run on the device, on whole batches: :class:`DihedralBatch` and
:class:`HedJitterBatch` touch training batches only; :class:`ResizeBatch` is the same op as
inference's ``Resize``. :class:`ScannerItem` (``+scanner``) is an item transform: it runs per
uint8 patch on the CPU, in the DataLoader's workers, training items only, and applies
:class:`patch_model.scanner.ScannerAugment` (JPEG, blur, resampling, stain, brightness/contrast).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from patch_model._fastai import RandTransform, TensorImage, Transform
from patch_model.scanner import ScannerAugment
from wsi_toolkit.errors import ConfigError

__all__ = ["SYMMETRIES", "AUGMENTS", "AugmentSpec", "parse_augment", "describe_augment", "DihedralBatch",
           "HedJitterBatch", "hed_jitter", "ResizeBatch", "ScannerItem"]

#: The symmetries of the square each augmentation draws from, as fastai ``TensorImage.dihedral``
#: indices: ``flips`` = the article's horizontal and vertical flips (identity, left-right,
#: top-bottom, both = 180-degree rotation); ``dihedral`` adds the 90-degree rotations and
#: transposes (all 8). Tissue has no up or left, so every one is a valid view of a patch.
SYMMETRIES: Mapping[str, tuple[int, ...]] = {"none": (0,), "flips": (0, 1, 2, 4), "dihedral": tuple(range(8))}

#: The additions a geometric set takes after ``+``: ``hed`` = :class:`HedJitterBatch` (Tellez's
#: HED-light, on the device); ``scanner`` = :class:`ScannerItem` (the slide path's JPEG, blur,
#: resampling, stronger stain jitter, brightness/contrast; per item on the CPU).
EXTRAS = ("hed", "scanner")

#: ``TrainConfig.augment`` values: a geometric set from :data:`SYMMETRIES`, optionally ``+`` one of :data:`EXTRAS`.
AUGMENTS = ("none", "flips", "dihedral", "flips+hed", "dihedral+hed", "flips+scanner", "dihedral+scanner")

#: Half-width of the HED jitter (Tellez et al.'s "HED-light"), in natural-log optical density.
HED_SIGMA = 0.05

#: The ``+scanner`` augmentation's settings.
SCANNER = ScannerAugment()


@dataclass(frozen=True)
class AugmentSpec:
    """An ``augment`` value taken apart: the geometric set and which extras are on."""

    geometric: str
    hed: bool = False
    scanner: bool = False


def parse_augment(augment: str) -> AugmentSpec:
    """``"dihedral+hed"`` -> ``AugmentSpec("dihedral", hed=True)``; :class:`ConfigError` for anything
    else than :data:`AUGMENTS`."""
    if augment not in AUGMENTS:
        raise ConfigError(f"augment must be one of {', '.join(AUGMENTS)}; got {augment!r}")
    geometric, _, extra = augment.partition("+")
    return AugmentSpec(geometric, hed=extra == "hed", scanner=extra == "scanner")


def describe_augment(augment: str) -> str:
    """One line of plain words for ``settings.json``."""
    spec = parse_augment(augment)
    text = {"none": "no geometric augmentation",
            "flips": "horizontal and vertical flips (the article's), each with p=0.5",
            "dihedral": "dihedral (8 symmetries of the square: flips and 90-degree rotations)"}[spec.geometric]
    if spec.hed:
        text += f" + H&E stain jitter (HED, sigma {HED_SIGMA:g})"
    if spec.scanner:
        text += f" + {SCANNER.describe()}"
    return text + ", train only"


class DihedralBatch(RandTransform):
    """Each training image gets one of ``symmetries`` (fastai ``TensorImage.dihedral`` indices,
    default all 8 symmetries of the square: identity, flips, 90-degree rotations and their
    combinations), drawn uniformly per image: exact pixel permutations, no resampling. Training
    batches only."""

    order, split_idx = 30, 0

    def __init__(self, symmetries: Sequence[int] = tuple(range(8))):
        super().__init__(p=1.0)
        self.symmetries = torch.as_tensor(sorted(set(int(k) for k in symmetries)))
        if not len(self.symmetries) or self.symmetries.min() < 0 or self.symmetries.max() > 7:
            raise ConfigError(f"symmetries must be dihedral indices 0..7; got {list(symmetries)}")

    def before_call(self, b, split_idx):
        super().before_call(b, split_idx)
        while isinstance(b, (tuple, list)):
            b = b[0]
        pick = torch.randint(0, len(self.symmetries), (b.shape[0],), device=b.device)
        self.k = self.symmetries.to(b.device)[pick]

    def encodes(self, x: TensorImage):
        out = x.clone()
        for k in range(1, 8):
            sel = (self.k == k).nonzero().flatten()
            if len(sel):
                out[sel] = x[sel].dihedral(k)
        return out


class HedJitterBatch(RandTransform):
    """H&E stain augmentation after Tellez et al. (2018): per training image and stain channel,
    the haematoxylin-eosin-DAB optical density ``s`` (natural log, scikit-image's deconvolution
    matrices) becomes ``s * a + b`` with ``a`` in ``[1 - sigma, 1 + sigma]`` and ``b`` in
    ``[-sigma, sigma]``; back to RGB, clipped to [0, 1]. Float ``(N, 3, H, W)`` in [0, 1] (after
    ``IntToFloatTensor``); training only. Why the natural-log unit and not ``rgb2hed``'s:
    docs/training.md, "HED jitter".
    """

    order, split_idx = 25, 0

    def __init__(self, sigma: float = HED_SIGMA):
        super().__init__(p=1.0)
        from skimage.color import hed_from_rgb, rgb_from_hed

        self.sigma = float(sigma)
        self._to_hed = torch.as_tensor(hed_from_rgb, dtype=torch.float32)
        self._to_rgb = torch.as_tensor(rgb_from_hed, dtype=torch.float32)

    def before_call(self, b, split_idx):
        super().before_call(b, split_idx)
        while isinstance(b, (tuple, list)):
            b = b[0]
        n = b.shape[0]
        self.scale = 1 + (torch.rand(n, 1, 3, device=b.device) * 2 - 1) * self.sigma
        self.shift = (torch.rand(n, 1, 3, device=b.device) * 2 - 1) * self.sigma

    def encodes(self, x: TensorImage):
        return TensorImage(hed_jitter(x, self.scale, self.shift, to_hed=self._to_hed, to_rgb=self._to_rgb))


def hed_jitter(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, *, to_hed: torch.Tensor,
               to_rgb: torch.Tensor) -> torch.Tensor:
    """RGB float ``(N, 3, H, W)`` in [0, 1] -> stain optical densities ``* scale + shift`` (both
    ``(N, 1, 3)``; OD = ``-ln(max(rgb, 1e-6))`` deconvolved with ``to_hed``) -> RGB, clipped to
    [0, 1]. With ``scale = 1, shift = 0`` it returns ``x`` (up to float rounding). The stains are
    ``skimage.color.rgb2hed``'s times ``-ln(1e-6)`` (before its clipping at 0)."""
    n, c, h, w = x.shape
    rgb = x.float().permute(0, 2, 3, 1).reshape(n, h * w, c).clamp_min(1e-6)
    stains = -torch.log(rgb) @ to_hed.to(x.device)
    stains = stains * scale + shift
    out = torch.exp(-(stains @ to_rgb.to(x.device))).clamp(0, 1)
    return out.reshape(n, h, w, c).permute(0, 3, 1, 2).to(x.dtype).contiguous()


class ResizeBatch(Transform):
    """Float ``(N, 3, H, W)`` -> ``(N, 3, size, size)``, exactly like inference's
    :class:`~wsi_toolkit.model_package.Preprocess` ``Resize``: ``F.interpolate(mode="bilinear",
    antialias=True, align_corners=False)``. Train and valid alike (``split_idx=None``)."""

    order, split_idx = 40, None

    def __init__(self, size: int):
        super().__init__()
        self.size = int(size)

    def encodes(self, x: TensorImage):
        if tuple(x.shape[-2:]) == (self.size, self.size):
            return x
        return TensorImage(F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False,
                                         antialias=True))


class ScannerItem(Transform):
    """Item transform ``+scanner``: each training patch (uint8 ``TensorImage`` ``(3, H, W)``, on the
    CPU, in the DataLoader's workers) through ``augment`` (:class:`~patch_model.scanner.ScannerAugment`:
    the slide path's JPEG, blur, resampling, stain, brightness and contrast at random strengths).
    Labels pass untouched; validation and test items too (``split_idx=0``). The randomness is
    drawn from torch's generator (one seed per item), which fastai and torch seed per worker, so a
    run is repeatable under ``set_seed``."""

    order, split_idx = 10, 0

    def __init__(self, augment: ScannerAugment = SCANNER):
        super().__init__()
        self.augment = augment

    def encodes(self, x: TensorImage):
        rng = np.random.default_rng(int(torch.randint(0, 2**62, ())))
        hwc = np.ascontiguousarray(x.permute(1, 2, 0).numpy())
        out = self.augment(hwc, rng)
        return TensorImage(torch.from_numpy(out).permute(2, 0, 1).contiguous())
