"""The model package: the contract between training and inference, in WSInfer's format.

A model package is a directory as the WSInfer model zoo publishes them, plus an optional
``torch.export`` program::

    my-model/
      config.json            WSInfer model config, spec_version "1.0" (:mod:`.config`)
      torchscript_model.pt   the model as TorchScript: (N, 3, S, S) float32 -> (N, num_classes) logits
      model.pt2              optional: the same model as a torch.export program (:mod:`.io`)

so a model trained here runs in WSInfer and QuPath's WSInfer extension, and WSInfer-zoo models run
here. Modules:

- :mod:`.config`: :class:`ModelConfig`, :class:`TransformStep`, :func:`pcam_config`,
  :func:`read_config_json` (no torch);
- :mod:`.schema`: the validation, a JSON Schema (``model_config.schema.json``) plus cross-field rules;
- :mod:`.preprocess`: :class:`Preprocess`, the one interpretation of the ``transform`` list, on uint8
  patches already on the device;
- :mod:`.io`: :class:`ModelPackage`, :func:`load_model_package`, :func:`save_model_package`,
  :func:`set_calibration` (a fitted temperature into ``config.json``);
- :mod:`.logits`: :func:`probabilities`, the one logits -> probabilities rule;
- :mod:`.torchscript`: :func:`quiet_torchscript_deprecation`, the one TorchScript-warning guard.

``import wsi_toolkit.model_package`` does not import torch: the names of :mod:`.preprocess`,
:mod:`.io` and :mod:`.logits` are imported on first use. This package is the contract between
training and inference and imports neither: :mod:`wsi_toolkit.runtime` and
:mod:`wsi_toolkit.inference` import it, never the reverse (``[tool.importlinter]`` in pyproject.toml).

Example::

    save_model_package("pcam-resnet50", model, pcam_config(input_size=224))
    pkg = load_model_package("pcam-resnet50", device="cuda")
    prob = pkg.predict_proba(patches)   # (N, 96, 96, 3) uint8 -> (N,) float32 P(tumour), on the CPU
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from wsi_toolkit.model_package.config import (
    CONFIG_NAME,
    EXPORT_NAME,
    IMAGENET_MEAN,
    IMAGENET_STD,
    MAX_CONFIG_BYTES,
    TORCHSCRIPT_NAME,
    TUMOR_CLASS_SYNONYMS,
    ModelConfig,
    ModelPackageError,
    TransformStep,
    pcam_config,
    read_config_json,
)

if TYPE_CHECKING:
    from wsi_toolkit.model_package.io import (  # noqa: F401
        ExportedModel,
        ModelPackage,
        load_model_package,
        save_model_package,
        set_calibration,
    )
    from wsi_toolkit.model_package.logits import probabilities  # noqa: F401
    from wsi_toolkit.model_package.preprocess import Preprocess  # noqa: F401
    from wsi_toolkit.model_package.torchscript import quiet_torchscript_deprecation  # noqa: F401

#: Names imported when first used -> the module defining them (all but quiet_torchscript_deprecation need torch).
_LAZY = {
    "Preprocess": "wsi_toolkit.model_package.preprocess",
    "ModelPackage": "wsi_toolkit.model_package.io",
    "ExportedModel": "wsi_toolkit.model_package.io",
    "load_model_package": "wsi_toolkit.model_package.io",
    "save_model_package": "wsi_toolkit.model_package.io",
    "set_calibration": "wsi_toolkit.model_package.io",
    "probabilities": "wsi_toolkit.model_package.logits",
    "quiet_torchscript_deprecation": "wsi_toolkit.model_package.torchscript",
}

__all__ = [
    "ModelPackageError",
    "TransformStep",
    "ModelConfig",
    "pcam_config",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "TUMOR_CLASS_SYNONYMS",
    "CONFIG_NAME",
    "TORCHSCRIPT_NAME",
    "EXPORT_NAME",
    "MAX_CONFIG_BYTES",
    "read_config_json",
    *_LAZY,
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
