"""A trained fastai learner -> the model package ``wsi-infer`` (and WSInfer, QuPath) loads.

The package holds the whole fastai model (body + head) in eval mode, mapping ``(N, 3, S, S)``
normalised float32 to the 2 class **logits** (no softmax inside: the inference path applies
softmax), as TorchScript (``torchscript_model.pt``, WSInfer's file) and as a ``torch.export``
program (``model.pt2``, batch size dynamic, written when the model exports; see
:func:`wsi_toolkit.model_package.save_model_package`), and a WSInfer config whose ``transform``
list is the preprocessing the learner's validation DataLoader applies (``Resize`` to S - kept at
S = 96 for WSInfer, which reads level 0 - ``ToTensor``, ``Normalize`` with the backbone's
statistics), so probabilities through :mod:`wsi_toolkit.inference` equal the learner's
``get_preds`` (to float rounding).

Example::

    cfg = learner_config(learn, arch="resnet50", size=224, mean=IMAGENET_MEAN, std=IMAGENET_STD,
                         extra={"training": {...}})
    export_learner(learn, "out/model", config=cfg)
"""

from __future__ import annotations

import copy
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from wsi_toolkit.errors import ConfigError
from wsi_toolkit.model_package import IMAGENET_MEAN, IMAGENET_STD, ModelConfig, pcam_config, save_model_package

__all__ = ["learner_config", "export_learner"]


def _vocab(learn) -> list[str] | None:
    vocab = getattr(learn.dls, "vocab", None)
    return None if vocab is None else [str(v) for v in vocab]


def learner_config(
    learn,
    *,
    arch: str,
    size: int,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    extra: Mapping[str, Any] | None = None,
) -> ModelConfig:
    """The package config of ``learn``: :func:`~wsi_toolkit.model_package.pcam_config` with the
    learner's class names (its vocab, in label order: ``("notumor", "tumor")``, tumour = index 1 =
    PCam label 1), ``input_size=size``, ``mean``/``std`` and ``extra`` (provenance, metrics,
    ``"synthetic"``) in the ``"wsi_toolkit"`` object."""
    names = _vocab(learn) or ["notumor", "tumor"]
    if len(names) != 2:
        raise ConfigError(f"a PCam classifier has 2 classes; the learner's vocab is {names}")
    return pcam_config(architecture=arch, input_size=int(size), mean=[float(m) for m in mean],
                       std=[float(s) for s in std], class_names=tuple(names), extra=dict(extra or {}))


def export_learner(learn, path: str | os.PathLike, *, config: ModelConfig, overwrite: bool = False) -> Path:
    """Write ``learn.model`` (eval mode, logits) and ``config`` as a model package at ``path``
    (TorchScript and, when it exports, ``model.pt2``).

    The model is copied to the CPU in float32 first, so the learner is left as it was (device,
    train/eval mode). A learner whose vocab differs from ``config.class_names`` is refused.
    """
    names = _vocab(learn)
    if names is not None and tuple(names) != tuple(config.class_names):
        raise ConfigError(f"the learner's classes {names} differ from the config's {list(config.class_names)}")
    model = getattr(learn.model, "module", learn.model)  # unwrap DataParallel / DDP
    # contiguous (NCHW) weights whatever the training used (fastai's ChannelsLast): the package
    # does not depend on the memory format of the run that made it
    model = copy.deepcopy(model).cpu().float().to(memory_format=torch.contiguous_format).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return save_model_package(path, model, config, overwrite=overwrite)
