"""Training the PCam patch classifier with fastai (the article's ResNet50 one-cycle recipe).

Depends on :mod:`wsi_toolkit`, never the reverse. Importing this package does not import fastai;
the names below load their module on first use (``from patch_model import train_model``).

- :func:`train_model` / :class:`TrainConfig` (``pcam-train``): the recipe, writing a model package,
  metrics, plots, settings and a log. Its parts: :mod:`~patch_model.archs` (backbones, the
  learner), :mod:`~patch_model.loaders` (DataLoaders), :mod:`~patch_model.augment` (batch
  transforms), :mod:`~patch_model.callbacks`, :mod:`~patch_model.reports` (plots, Grad-CAM).
- :func:`export_learner` / :func:`learner_config`: a fastai learner -> a model package.
- :func:`evaluate_package` (``pcam-eval``): a model package on a split, optionally with TTA.
- :func:`open_splits`, :class:`PCamH5`, :class:`KaggleFolder`: the patch data sets.
- :func:`cut_pcam_patches` (``wsi-patches``): a PCam-layout set cut from annotated slides.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = [
    "TrainConfig",
    "TrainResult",
    "MissingWeightsError",
    "train_model",
    "build_dataloaders",
    "build_learner",
    "resolve_arch",
    "export_learner",
    "learner_config",
    "evaluate_package",
    "EvalResult",
    "open_splits",
    "detect_layout",
    "PCamH5",
    "KaggleFolder",
    "DataLayoutError",
    "cut_pcam_patches",
]

_WHERE = {
    "TrainConfig": "train", "TrainResult": "train", "train_model": "train",
    "MissingWeightsError": "archs", "build_learner": "archs", "resolve_arch": "archs",
    "build_dataloaders": "loaders",
    "export_learner": "export", "learner_config": "export",
    "evaluate_package": "patch_eval", "EvalResult": "patch_eval",
    "open_splits": "data", "detect_layout": "data", "PCamH5": "data", "KaggleFolder": "data",
    "DataLayoutError": "data",
    "cut_pcam_patches": "patches",
}


def __getattr__(name: str) -> Any:
    # Lazy: `import patch_model` stays cheap and fastai loads only when training is asked for.
    if name in _WHERE:
        module = importlib.import_module(f"patch_model.{_WHERE[name]}")
        return getattr(module, name)
    raise AttributeError(f"module 'patch_model' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
